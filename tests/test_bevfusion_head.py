"""BEVFusion's TransFusion head: proposals, assignment, targets, losses, decoding."""
import math

import numpy as np
import pytest
import torch
from mmdet3d.structures import LiDARInstance3DBoxes
from mmengine.structures import InstanceData
from scipy.optimize import linear_sum_assignment

from turbox_mm.models.bevfusion import TransFusionBBoxCoder
from turbox_mm.registry import MODELS, TASK_UTILS

PCR = [-25.6, -25.6, -5.0, 25.6, 25.6, 3.0]
VOXEL = [0.8, 0.8, 0.2]
GRID = [64, 64, 40]
CODER = dict(type='turbox_mm.TransFusionBBoxCoder', pc_range=PCR[:2], out_size_factor=8,
             voxel_size=VOXEL[:2], post_center_range=[-30, -30, -10, 30, 30, 10],
             score_threshold=0.0, code_size=10)


def head_cfg(**changes):
    cfg = dict(
        type='turbox_mm.TransFusionHead', num_proposals=20, auxiliary=True, in_channels=16,
        hidden_channel=32, num_classes=10, nms_kernel_size=3, bn_momentum=0.1,
        num_decoder_layers=1,
        decoder_layer=dict(
            type='turbox_mm.TransFusionDecoderLayer',
            self_attn_cfg=dict(embed_dims=32, num_heads=4, dropout=0.1),
            cross_attn_cfg=dict(embed_dims=32, num_heads=4, dropout=0.1),
            ffn_cfg=dict(embed_dims=32, feedforward_channels=64, num_fcs=2, ffn_drop=0.1,
                         act_cfg=dict(type='ReLU', inplace=True)),
            norm_cfg=dict(type='LN'), pos_encoding_cfg=dict(input_channel=2, num_pos_feats=32)),
        common_heads=dict(center=[2, 2], height=[1, 2], dim=[3, 2], rot=[2, 2], vel=[2, 2]),
        bbox_coder=CODER,
        loss_cls=dict(type='mmdet.FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25,
                      reduction='mean', loss_weight=1.0),
        loss_heatmap=dict(type='mmdet.GaussianFocalLoss', reduction='mean', loss_weight=1.0),
        loss_bbox=dict(type='mmdet.L1Loss', reduction='mean', loss_weight=0.25),
        train_cfg=dict(
            dataset='nuScenes', point_cloud_range=PCR, grid_size=GRID, voxel_size=VOXEL,
            out_size_factor=8, gaussian_overlap=0.1, min_radius=2, pos_weight=-1,
            code_weights=[1.0] * 8 + [0.2, 0.2],
            assigner=dict(
                type='turbox_mm.HungarianAssigner3D',
                iou_calculator=dict(type='mmdet3d.BboxOverlaps3D', coordinate='lidar'),
                cls_cost=dict(type='mmdet.FocalLossCost', gamma=2.0, alpha=0.25, weight=0.15),
                reg_cost=dict(type='turbox_mm.BBoxBEVL1Cost', weight=0.25),
                iou_cost=dict(type='turbox_mm.IoU3DCost', weight=0.25))),
        test_cfg=dict(dataset='nuScenes', grid_size=GRID, out_size_factor=8,
                      voxel_size=VOXEL[:2], pc_range=PCR[:2], nms_type=None))
    cfg.update(changes)
    return cfg


def gt_boxes(num=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centre = (torch.rand(num, 3, generator=gen) * 2 - 1) * torch.tensor([18.0, 18.0, 0.5])
    size = torch.rand(num, 3, generator=gen) * torch.tensor([3.0, 1.0, 1.0]) + 1.0
    yaw = (torch.rand(num, 1, generator=gen) * 2 - 1) * math.pi
    vel = torch.randn(num, 2, generator=gen)
    boxes = LiDARInstance3DBoxes(torch.cat([centre, size, yaw, vel], 1), box_dim=9)
    labels = torch.randint(0, 10, (num, ), generator=gen)
    return InstanceData(bboxes_3d=boxes, labels_3d=labels)


def bev(batch=2, seed=0):
    return torch.randn(batch, 16, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_forward_gives_proposals_at_heatmap_peaks():
    torch.manual_seed(0)
    head = MODELS.build(head_cfg()).eval()
    preds = head(bev())
    assert preds['center'].shape == (2, 2, 20) and preds['heatmap'].shape == (2, 10, 20)
    assert preds['dense_heatmap'].shape == (2, 10, 8, 8)
    assert preds['query_labels'].shape == (2, 20)
    heat = preds['dense_heatmap'].sigmoid()
    # each proposal's score is its class's peak at its cell (other classes' peaks may share
    # the cell: upstream gathers every class there)
    top = preds['query_heatmap_score'].gather(1, preds['query_labels'][:, None])[:, 0]
    assert bool((top > 0).all())
    # the proposals are the strongest peaks: no unused peak is stronger than the weakest
    peaks = head._local_maxima(heat).view(2, -1)
    kth = peaks.sort(-1, descending=True).values[:, 19]
    torch.testing.assert_close(top.min(1).values, kth)


def test_border_cells_are_proposals_only_for_the_small_classes():
    head = MODELS.build(head_cfg())
    heat = torch.zeros(1, 10, 8, 8)
    heat[0, 0, 0, 3] = 0.9  # car on the border: suppressed
    heat[0, 0, 4, 4] = 0.8
    heat[0, 8, 0, 0] = 0.7  # pedestrian on the border: kept
    peaks = head._local_maxima(heat)
    assert peaks[0, 0, 0, 3] == 0 and peaks[0, 0, 4, 4] == 0.8 and peaks[0, 8, 0, 0] == 0.7


def test_coder_round_trip():
    coder = TransFusionBBoxCoder(**{k: v for k, v in CODER.items() if k != 'type'})
    boxes = gt_boxes(6).bboxes_3d.tensor
    code = coder.encode(boxes)
    assert code.shape == (6, 10)
    decoded = coder.decode_boxes(code[:, 6:8].T[None], code[:, 3:6].T[None],
                                 code[:, 0:2].T[None], code[:, 2:3].T[None],
                                 code[:, 8:10].T[None])[0]
    torch.testing.assert_close(decoded, boxes, rtol=1e-5, atol=1e-5)


def test_assigner_is_the_lowest_cost_matching_of_the_three_costs():
    assigner = TASK_UTILS.build(head_cfg()['train_cfg']['assigner'])
    gt = gt_boxes(5, seed=1)
    gen = torch.Generator().manual_seed(2)
    proposals = gt_boxes(12, seed=3).bboxes_3d.tensor
    logits = torch.randn(10, 12, generator=gen)
    result = assigner.assign(proposals, gt.bboxes_3d.tensor, gt.labels_3d, logits,
                             head_cfg()['train_cfg'])
    # the definition, written out
    p = logits.T.sigmoid()
    pos = -(p + 1e-12).log() * 0.25 * (1 - p) ** 2
    neg = -(1 - p + 1e-12).log() * 0.75 * p ** 2
    cls_cost = (pos - neg)[:, gt.labels_3d] * 0.15
    norm = lambda b: (b[:, :2] + 25.6) / 51.2  # noqa: E731
    reg_cost = torch.cdist(norm(proposals), norm(gt.bboxes_3d.tensor), p=1) * 0.25
    iou = LiDARInstance3DBoxes.overlaps(LiDARInstance3DBoxes(proposals, box_dim=9),
                                        gt.bboxes_3d)
    cost = cls_cost + reg_cost - 0.25 * iou
    rows, cols = linear_sum_assignment(cost.numpy())
    want = np.zeros(12, dtype=np.int64)
    want[rows] = cols + 1
    assert result.gt_inds.tolist() == want.tolist()
    torch.testing.assert_close(result.max_overlaps[rows], iou[rows, cols].float())


def test_heatmap_target_peaks_at_the_box_cell_indexed_x_first():
    head = MODELS.build(head_cfg())
    boxes = LiDARInstance3DBoxes(torch.tensor([[-10.0, 6.0, -1.0, 4.0, 2.0, 1.5, 0.3, 0, 0]]),
                                 box_dim=9)
    heat = head._heatmap_targets(boxes, torch.tensor([3]), 'cpu')
    assert heat.shape == (10, 8, 8)
    x, y = int((-10.0 + 25.6) / 6.4), int((6.0 + 25.6) / 6.4)
    assert heat[3, x, y] == 1 and int((heat == 1).sum()) == 1 and heat[:3].sum() == 0


def test_losses_train_every_part_and_handle_a_sample_without_boxes():
    torch.manual_seed(0)
    head = MODELS.build(head_cfg()).train()
    samples = [InstanceData(gt_instances_3d=gt_boxes(4)),
               InstanceData(gt_instances_3d=InstanceData(
                   bboxes_3d=LiDARInstance3DBoxes(torch.zeros(0, 9), box_dim=9),
                   labels_3d=torch.zeros(0, dtype=torch.long)))]
    losses = head.loss(bev(), samples)
    assert set(losses) == {'loss_heatmap', 'layer_-1_loss_cls', 'layer_-1_loss_bbox',
                           'matched_ious'}
    total = sum(v for k, v in losses.items() if 'loss' in k)
    assert torch.isfinite(total)
    total.backward()
    unused = [n for n, p in head.named_parameters() if p.grad is None]
    assert unused == [], unused


def test_two_decoder_layers_are_supervised_each():
    torch.manual_seed(0)
    head = MODELS.build(head_cfg(num_decoder_layers=2)).train()
    losses = head.loss(bev(), [InstanceData(gt_instances_3d=gt_boxes(3))] * 2)
    assert {'layer_0_loss_cls', 'layer_-1_loss_bbox'} <= set(losses)
    assert head(bev())['center'].shape == (2, 2, 40)


@pytest.mark.parametrize('nms_type', [None, 'circle'])
def test_predict_decodes_boxes_with_scores_of_the_proposal_class(nms_type):
    torch.manual_seed(0)
    wide = dict(CODER, post_center_range=[-1e3] * 3 + [1e3] * 3)  # every centre kept
    head = MODELS.build(head_cfg(bbox_coder=wide, test_cfg=dict(head_cfg()['test_cfg'],
                                                                nms_type=nms_type))).eval()
    metas = [dict(box_type_3d=LiDARInstance3DBoxes)] * 2
    with torch.no_grad():
        preds = head(bev())
        results = head.predict_by_feat(preds, metas)
    assert len(results) == 2
    for b, res in enumerate(results):
        assert isinstance(res.bboxes_3d, LiDARInstance3DBoxes)
        assert res.bboxes_3d.tensor.shape[1] == 9 and len(res.scores_3d) <= 20
        assert res.labels_3d.dtype == torch.int32
    labels = preds['query_labels'][:, None]
    want = preds['heatmap'].sigmoid().gather(1, labels)[:, 0] * \
        preds['query_heatmap_score'].gather(1, labels)[:, 0]
    if nms_type is None:  # every proposal, in proposal order
        torch.testing.assert_close(results[0].scores_3d, want[0])
        assert torch.equal(results[0].labels_3d.long(), preds['query_labels'][0])


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match='test_cfg must give grid_size'):
        MODELS.build(head_cfg(test_cfg=None))
    with pytest.raises(ValueError, match='nms_kernel_size must be odd'):
        MODELS.build(head_cfg(nms_kernel_size=2))


def test_parameter_names_follow_upstreams_checkpoints():
    head = MODELS.build(head_cfg())
    keys = set(head.state_dict())
    assert 'decoder.0.self_posembed.position_embedding_head.0.weight' in keys
    assert 'decoder.0.cross_posembed.position_embedding_head.3.bias' in keys
    assert 'prediction_heads.0.heatmap.1.weight' in keys and 'shared_conv.bias' in keys
    assert not any(k.startswith('bev_pos') for k in keys)  # a buffer, not saved
