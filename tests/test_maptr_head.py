"""MapTR's decoder and heads on tiny sizes: shapes, reference-point refinement, the deformable
attention's ops, v2's decoupled attention and its one2one / one2many mask, stock against
turbox losses and gradients, loss keys and decoding."""
import copy
from unittest import mock

import numpy as np
import pytest
import torch
from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttention
from mmdet.models.layers.transformer import inverse_sigmoid
from mmdet3d.structures import Det3DDataSample
from mmengine.structures import InstanceData

from turbox_mm.models.maptr import (CustomMSDeformableAttention, DecoupledMapTRDecoderLayer,
                                    MapTRNMSFreeCoder, pts_to_bbox)
from turbox_mm.models.maptr import maptr_targets
from turbox_mm.registry import MODELS

DIMS, BEV_H, BEV_W, PTS, LAYERS = 16, 6, 4, 5, 3
PC = [-15.0, -30.0, -2.0, 15.0, 30.0, 2.0]
LAYER_CFG = dict(self_attn_cfg=dict(embed_dims=DIMS, num_heads=2, attn_drop=0.0, proj_drop=0.0,
                                    dropout_layer=None),
                 cross_attn_cfg=dict(num_heads=2, num_points=2, dropout=0.0),
                 ffn_cfg=dict(embed_dims=DIMS, feedforward_channels=32, ffn_drop=0.0))
V1_KEYS = ['loss_cls', 'loss_bbox', 'loss_iou', 'loss_pts', 'loss_dir'] + [
    f'd{i}.{k}' for i in range(LAYERS - 1)
    for k in ('loss_cls', 'loss_bbox', 'loss_iou', 'loss_pts', 'loss_dir')]


def head_cfg(op_impl='stock', v2=False, **kw):
    cfg = dict(type='turbox_mm.MapTRv2Head' if v2 else 'turbox_mm.MapTRHead', num_classes=3,
               embed_dims=DIMS, bev_h=BEV_H, bev_w=BEV_W, num_pts_per_vec=PTS,
               num_pts_per_gt_vec=PTS,
               decoder=dict(num_layers=LAYERS, layer_cfg=copy.deepcopy(LAYER_CFG)),
               train_cfg=dict(assigner=dict(type='turbox_mm.MapTRAssigner')), op_impl=op_impl)
    cfg.update(dict(num_vec_one2one=4, num_vec_one2many=12, k_one2many=3) if v2 else
               dict(num_vec=6))
    cfg.update(kw)
    return cfg


def build_pair(v2=False, seed=0, **kw):
    torch.manual_seed(seed)
    stock = MODELS.build(head_cfg('stock', v2, **kw))
    turbox = MODELS.build(head_cfg('turbox', v2, **kw))
    turbox.load_state_dict(stock.state_dict())
    return stock, turbox


def map_gt(count, seed, orders=4):
    gen = torch.Generator().manual_seed(seed)
    shifts = torch.rand(count, orders, PTS, 2, generator=gen)
    shifts = shifts * torch.tensor([30.0, 60.0]) - torch.tensor([15.0, 30.0])
    shifts[:, 2:] = -10000
    return InstanceData(labels=torch.randint(0, 3, (count, ), generator=gen), shifts=shifts)


def bev(batch=2, seed=1):
    return torch.randn(batch, BEV_H * BEV_W, DIMS, generator=torch.Generator().manual_seed(seed))


def test_forward_shapes_boxes_and_bev_layouts():
    head = MODELS.build(head_cfg()).eval()
    x = bev()
    out = head(x)
    assert out['all_cls_scores'].shape == (LAYERS, 2, 6, 3)
    assert out['all_pts_preds'].shape == (LAYERS, 2, 6, PTS, 2)
    assert out['all_bbox_preds'].shape == (LAYERS, 2, 6, 4)
    assert out['enc_cls_scores'] is None and out['bev_embed'].shape == (2, BEV_H * BEV_W, DIMS)
    torch.testing.assert_close(out['all_bbox_preds'], pts_to_bbox(out['all_pts_preds']))
    assert float(out['all_pts_preds'].min()) > 0 and float(out['all_pts_preds'].max()) < 1
    grid = x.transpose(1, 2).reshape(2, DIMS, BEV_H, BEV_W)
    torch.testing.assert_close(head(grid)['all_pts_preds'], out['all_pts_preds'])
    # hierarchical queries: instance v + point p
    embeds = head.query_embeds(6).view(6, PTS, 2 * DIMS)
    torch.testing.assert_close(embeds[2, 3], head.instance_embedding.weight[2] +
                               head.pts_embedding.weight[3])
    with pytest.raises(ValueError, match='BEV of shape'):
        head(torch.randn(2, 7, DIMS))
    # upstream's init: class prior 0.01, reference-point bias 0
    assert float(head.cls_branches[1][-1].bias[0]) == pytest.approx(-4.595, abs=1e-3)
    assert float(head.reference_points.bias.abs().sum()) == 0


def test_reference_points_refined_layer_by_layer_and_detached():
    head = MODELS.build(head_cfg()).eval()
    x = bev()
    pos, query = head.query_embeds(6).split(DIMS, 1)
    pos, query = pos[None].expand(2, -1, -1), query[None].expand(2, -1, -1)
    init = head.reference_points(pos).sigmoid()
    states, points, refs = head.decoder(query, pos, x, init, head.bev_spatial_shapes,
                                        head.bev_level_start_index, head.reg_branches)
    torch.testing.assert_close(refs[0], init)
    for layer in range(LAYERS):
        expected = (head.reg_branches[layer](states[layer]) +
                    inverse_sigmoid(refs[layer])).sigmoid()
        torch.testing.assert_close(points[layer], expected)
        if layer:
            torch.testing.assert_close(refs[layer], points[layer - 1])
    # the first layer's references keep their graph (to the reference-point layer), the later
    # ones are detached
    weight = head.reference_points.weight
    (first, ) = torch.autograd.grad(refs[0].sum(), weight, retain_graph=True)
    (later, ) = torch.autograd.grad(refs[1:].sum(), weight, retain_graph=True,
                                    allow_unused=True)
    assert first.abs().sum() > 0 and (later is None or not later.any())
    # without refinement every layer attends around the initial points
    _, _, refs = head.decoder(query, pos, x, init, head.bev_spatial_shapes,
                              head.bev_level_start_index, head.reg_branches, refine=False)
    for layer in range(LAYERS):
        torch.testing.assert_close(refs[layer], init)


def test_deformable_attention_is_mmcvs_and_ops_agree():
    torch.manual_seed(0)
    stock = CustomMSDeformableAttention(DIMS, num_heads=2, num_points=2, dropout=0.0)
    turbox = CustomMSDeformableAttention(DIMS, num_heads=2, num_points=2, dropout=0.0,
                                         op_impl='turbox')
    mmcv_attn = MultiScaleDeformableAttention(DIMS, num_heads=2, num_levels=1, num_points=2,
                                              dropout=0.0, batch_first=True)
    with torch.no_grad():  # non-trivial offsets and weights
        stock.sampling_offsets.weight.normal_(0, 0.1)
        stock.attention_weights.weight.normal_(0, 0.1)
    turbox.load_state_dict(stock.state_dict())
    mmcv_attn.load_state_dict(stock.state_dict())
    query, pos, value = torch.randn(2, 7, DIMS), torch.randn(2, 7, DIMS), bev()
    ref = torch.rand(2, 7, 1, 2)
    shapes, start = torch.tensor([[BEV_H, BEV_W]]), torch.tensor([0])
    out = stock(query, value, ref, shapes, start, query_pos=pos)
    expected = mmcv_attn(query, value=value, query_pos=pos, reference_points=ref,
                         spatial_shapes=shapes, level_start_index=start)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(turbox(query, value, ref, shapes, start, query_pos=pos), out)
    with pytest.raises(ValueError, match="op_impl must be 'stock' or 'turbox'"):
        CustomMSDeformableAttention(DIMS, num_heads=2, op_impl='fast')


def test_head_op_impl_reaches_the_cross_attention():
    stock, turbox = build_pair()
    assert {layer.cross_attn.op_impl for layer in stock.decoder.layers} == {'stock'}
    assert {layer.cross_attn.op_impl for layer in turbox.decoder.layers} == {'turbox'}


def test_decoupled_layer_matches_upstreams_sequence_layout():
    torch.manual_seed(0)
    layer = DecoupledMapTRDecoderLayer(**copy.deepcopy(LAYER_CFG)).eval()
    num_vec, batch = 3, 2
    query, pos = torch.randn(batch, num_vec * PTS, DIMS), torch.randn(batch, num_vec * PTS, DIMS)
    mask = torch.zeros(num_vec, num_vec, dtype=torch.bool)
    mask[0, 2] = mask[2, 0] = True
    got = layer.self_attention(query, pos, self_attn_mask=mask, num_vec=num_vec,
                               num_pts_per_vec=PTS)
    # upstream: [V * P, B, C] viewed [V, P * B, C], then permuted to [P, V * B, C]
    q, p = query.transpose(0, 1), pos.transpose(0, 1)

    def attend(mha, x, xp, attn_mask=None):
        return x + mha.attn(x + xp, x + xp, x, attn_mask=attn_mask)[0]

    q = q.reshape(num_vec, PTS * batch, DIMS)
    p1 = p.reshape(num_vec, PTS * batch, DIMS)
    q = layer.norms[0](attend(layer.attentions[0], q, p1, mask))
    q = q.view(num_vec, PTS, batch, DIMS).permute(1, 0, 2, 3).reshape(PTS, num_vec * batch, DIMS)
    p2 = p.view(num_vec, PTS, batch, DIMS).permute(1, 0, 2, 3)
    p2 = p2.reshape(PTS, num_vec * batch, DIMS)
    q = layer.norms[1](attend(layer.attentions[1], q, p2))
    q = q.view(PTS, num_vec, batch, DIMS).permute(1, 0, 2, 3).reshape(num_vec * PTS, batch, DIMS)
    torch.testing.assert_close(got, q.transpose(0, 1))


def test_v2_mask_keeps_one2one_and_one2many_apart():
    head = MODELS.build(head_cfg(v2=True)).train()
    mask = head.self_attn_mask
    assert mask.shape == (16, 16)
    assert mask[:4, 4:].all() and mask[4:, :4].all()
    assert not mask[:4, :4].any() and not mask[4:, 4:].any()
    x = bev()
    out = head(x)
    assert out['all_cls_scores'].shape == (LAYERS, 2, 4, 3)
    assert out['one2many_outs']['all_pts_preds'].shape == (LAYERS, 2, 12, PTS, 2)
    with torch.no_grad():  # change every one-to-many query: the one-to-one outputs stay
        head.instance_embedding.weight[4:] += 3.0
    changed = head(x)
    torch.testing.assert_close(changed['all_pts_preds'], out['all_pts_preds'])
    torch.testing.assert_close(changed['all_cls_scores'], out['all_cls_scores'])
    assert not torch.allclose(changed['one2many_outs']['all_pts_preds'],
                              out['one2many_outs']['all_pts_preds'])
    with torch.no_grad():  # and the test-time forward (one-to-one alone) is the same
        test_out = head.eval()(x)
    torch.testing.assert_close(test_out['all_pts_preds'], out['all_pts_preds'])
    assert test_out['one2many_outs'] is None
    head.self_attn_mask.zero_()  # without the mask the groups would mix
    leaked = head.train()(x)
    assert not torch.allclose(leaked['all_pts_preds'], out['all_pts_preds'])


@pytest.mark.parametrize('v2', [False, True])
def test_stock_and_turbox_losses_and_gradients_agree(v2):
    stock, turbox = build_pair(v2=v2)
    gts = [map_gt(3, 0), map_gt(0, 1), map_gt(5, 2)]
    x = bev(3)
    losses = []
    for head in (stock, turbox):
        head.train()
        head.zero_grad()
        out = head.loss_by_feat(head(x), gts)
        sum(out.values()).backward()
        losses.append(out)
    keys = V1_KEYS + ([f'{k}_one2many' for k in V1_KEYS] if v2 else [])
    assert sorted(losses[0]) == sorted(keys) and sorted(losses[1]) == sorted(keys)
    for key in keys:
        torch.testing.assert_close(losses[1][key].reshape(()), losses[0][key].reshape(()),
                                   msg=key)
        assert torch.isfinite(losses[0][key]).all()
    assert float(losses[0]['loss_pts']) > 0 and float(losses[0]['loss_bbox']) == 0
    named = dict(turbox.named_parameters())
    for name, param in stock.named_parameters():
        if param.grad is None:
            assert named[name].grad is None or not named[name].grad.any(), name
            continue
        torch.testing.assert_close(named[name].grad, param.grad, msg=name)


def test_nan_to_num_all_equals_nan_to_num_of_each_loss():
    raw = torch.tensor([1.5, float('nan'), float('inf'), -float('inf'), 2.0, 0.25],
                       requires_grad=True)
    ref_raw = raw.detach().clone().requires_grad_()
    layers = [tuple(raw[j] * (k + 1) for k, j in enumerate(range(i, i + 3))) for i in (0, 3)]
    ref_layers = [tuple(ref_raw[j] * (k + 1) for k, j in enumerate(range(i, i + 3)))
                  for i in (0, 3)]
    got = maptr_targets.nan_to_num_all(layers)
    want = [tuple(torch.nan_to_num(loss) for loss in layer) for layer in ref_layers]
    assert [len(layer) for layer in got] == [3, 3]
    for g_layer, w_layer in zip(got, want):
        for g, w in zip(g_layer, w_layer):
            assert g.shape == w.shape == () and torch.equal(g, w)
    assert got[0][1] == 0 and got[0][2] == torch.finfo(torch.float32).max  # not vacuous
    sum(sum(layer) for layer in got).backward()
    sum(sum(layer) for layer in want).backward()
    assert torch.equal(raw.grad, ref_raw.grad) and ref_raw.grad[1] == 0
    # mixed dtypes: converted one by one, each keeping its dtype
    mixed = maptr_targets.nan_to_num_all([(torch.tensor(float('nan')),
                                           torch.tensor(float('inf'), dtype=torch.float64))])
    assert mixed[0][0] == 0 and mixed[0][1].dtype == torch.float64
    assert maptr_targets.nan_to_num_all([]) == []


def test_turbox_loss_reads_nothing_on_the_host_and_solves_once():
    _, turbox = build_pair(v2=True)
    gts = [map_gt(3, 0), map_gt(0, 1)]
    preds = turbox.train()(bev())
    forbidden = AssertionError('host read')
    with mock.patch.object(torch.Tensor, 'item', side_effect=forbidden), \
            mock.patch.object(torch.Tensor, '__bool__', side_effect=forbidden), \
            mock.patch.object(maptr_targets, 'solve_batched',
                              wraps=maptr_targets.solve_batched) as solved:
        losses = turbox.loss_by_feat(preds, gts)
    assert solved.call_count == 1  # one2one and one2many, all layers and samples
    assert len(losses) == 2 * len(V1_KEYS)


def test_batch_without_any_ground_truth():
    stock, turbox = build_pair()
    gts = [map_gt(0, 0), map_gt(0, 1)]
    out = [head.loss_by_feat(head(bev()), gts) for head in (stock, turbox)]
    for key in V1_KEYS:
        torch.testing.assert_close(out[1][key].reshape(()), out[0][key].reshape(()))
    assert float(out[0]['loss_cls']) > 0 and float(out[0]['loss_pts']) == 0
    assert float(out[0]['loss_dir']) == 0


def test_loss_from_data_samples_with_array_ground_truth_and_boxes():
    stock, turbox = build_pair()
    samples = []
    for seed, count in enumerate((2, 1)):
        gt = map_gt(count, seed)
        sample = Det3DDataSample()
        first = gt.shifts[:, 0].numpy()
        sample.gt_instances_3d = InstanceData(
            labels=gt.labels.numpy(), shifts=gt.shifts.numpy(), pts=first,
            bboxes=np.concatenate([first.min(1), first.max(1)], -1))
        samples.append(sample)
    x = bev()
    losses = [head.loss(x, samples) for head in (stock, turbox)]
    assert sorted(losses[0]) == sorted(V1_KEYS)
    torch.testing.assert_close(losses[1]['loss_pts'], losses[0]['loss_pts'])
    with pytest.raises(KeyError, match="needs 'shifts'"):
        stock.loss_by_feat(stock(x), [InstanceData(labels=torch.zeros(1, dtype=torch.long))] * 2)


def test_nonzero_box_losses_agree_between_paths():
    stock, turbox = build_pair(loss_bbox=dict(type='mmdet.L1Loss', loss_weight=0.5),
                               loss_iou=dict(type='mmdet.GIoULoss', loss_weight=0.25))
    gts = [map_gt(3, 0), map_gt(2, 1)]
    x = bev()
    out = [head.loss_by_feat(head(x), gts) for head in (stock, turbox)]
    assert float(out[0]['loss_bbox']) > 0 and float(out[0]['loss_iou']) > 0
    for key in ('loss_bbox', 'loss_iou', 'd0.loss_bbox'):
        torch.testing.assert_close(out[1][key].reshape(()), out[0][key].reshape(()))


def test_decode_top_k_over_vectors_and_classes_with_range_filter():
    coder = MapTRNMSFreeCoder(PC, [-20, -35, -20, -35, 20, 35, 20, 35], max_num=4,
                              num_classes=3)
    cls = torch.full((1, 1, 3, 3), -9.0)
    cls[0, 0, 0, 2], cls[0, 0, 2, 0], cls[0, 0, 2, 1], cls[0, 0, 1, 1] = 4.0, 3.0, 2.0, 1.0
    pts = torch.full((1, 1, 3, PTS, 2), 0.5)
    pts[0, 0, 1, :, 0] = torch.linspace(1.1, 1.3, PTS)  # x 18..24 m: box beyond 20 m
    preds = dict(all_cls_scores=cls, all_pts_preds=pts, all_bbox_preds=pts_to_bbox(pts))
    det = coder.decode(preds)[0]
    # the top 4 pairs, then the range filter drops vector 1 (label 1, box beyond 20 m)
    assert det['labels'].tolist() == [2, 0, 1]
    torch.testing.assert_close(det['scores'], torch.tensor([4.0, 3.0, 2.0]).sigmoid())
    assert det['pts'].shape == (3, PTS, 2) and det['bboxes'].shape == (3, 4)
    torch.testing.assert_close(det['pts'][0], torch.zeros(PTS, 2))  # centre of the patch
    head = MODELS.build(head_cfg(bbox_coder=dict(
        type='turbox_mm.MapTRNMSFreeCoder', pc_range=PC, max_num=5, num_classes=3,
        post_center_range=[-20, -35, -20, -35, 20, 35, 20, 35])))
    results = head.eval().predict(bev())
    assert len(results) == 2
    for result in results:
        assert set(result.keys()) == {'pts_3d', 'scores_3d', 'labels_3d', 'bboxes'}
        assert result.pts_3d.shape[1:] == (PTS, 2) and len(result.scores_3d) <= 5
        assert (result.scores_3d[:-1] >= result.scores_3d[1:]).all()
        assert float(result.pts_3d[..., 0].abs().max()) <= 15
        assert float(result.pts_3d[..., 1].abs().max()) <= 30


def test_ground_truth_from_the_map_transform():
    """The fields ``LoadMapGT`` writes (``gt_map_labels``, ``gt_map_shifts``,
    ``gt_map_bboxes``, ``gt_map_pts``) are the head's ``labels``, ``shifts``, ``bboxes``,
    ``pts``."""
    map_gt_module = pytest.importorskip('turbox_mm.datasets.map_gt')
    polylines = [np.array([[-10.0, 0.0], [0.0, 5.0], [10.0, 20.0]]),
                 np.array([[0.0, -10.0], [4.0, -10.0], [4.0, -6.0], [0.0, -6.0], [0.0, -10.0]])]
    targets = map_gt_module.map_targets(polylines, np.array([0, 1]), fixed_num=PTS,
                                        rng=np.random.default_rng(0))
    gt = InstanceData(labels=targets['gt_map_labels'], shifts=targets['gt_map_shifts'],
                      bboxes=targets['gt_map_bboxes'], pts=targets['gt_map_pts'])
    stock, turbox = build_pair()
    labels, bboxes, shifts = stock.ground_truth(gt, torch.device('cpu'))
    assert shifts.shape == (2, PTS - 1, PTS, 2) and labels.tolist() == [0, 1]
    x = bev(1)
    out = [head.loss_by_feat(head(x), [gt]) for head in (stock, turbox)]
    torch.testing.assert_close(out[1]['loss_pts'], out[0]['loss_pts'])


AUX_SEG = dict(use_aux_seg=True, bev_seg=True, pv_seg=True, seg_classes=1)
SEG_LOSSES = dict(loss_seg=dict(type='turbox_mm.SimpleLoss', pos_weight=4.0, loss_weight=1.0),
                  loss_pv_seg=dict(type='turbox_mm.SimpleLoss', pos_weight=1.0,
                                   loss_weight=2.0))


def test_simple_loss_is_weighted_bce_with_logits_over_every_element():
    from turbox_mm.models.maptr.simple_loss import SimpleLoss
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 3, 5, 4, generator=gen)
    target = (torch.rand(2, 3, 5, 4, generator=gen) > 0.7).to(torch.uint8)
    expected = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([4.0]))(pred, target.float())
    torch.testing.assert_close(SimpleLoss(4.0, 2.5)(pred, target), expected * 2.5)
    # by hand: -(4 t log s(p) + (1 - t) log(1 - s(p))), the mean
    manual = -(4 * target * torch.nn.functional.logsigmoid(pred) +
               (1 - target.float()) * torch.nn.functional.logsigmoid(-pred)).mean()
    torch.testing.assert_close(SimpleLoss(4.0)(pred, target), manual)
    with pytest.raises(ValueError, match='differ'):
        SimpleLoss(1.0)(pred, target[:1])


def seg_samples(batch, cams, feat_hw, seed=0):
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for b in range(batch):
        sample = Det3DDataSample()
        sample.gt_instances_3d = map_gt(2 + b, seed + b)
        sample.gt_map_bev_seg = (torch.rand(1, BEV_H, BEV_W, generator=gen) > 0.6).to(
            torch.uint8)
        sample.gt_map_pv_seg = (torch.rand(cams, 1, *feat_hw, generator=gen) > 0.8).to(
            torch.uint8)
        samples.append(sample)
    return samples


def test_v2_auxiliary_segmentation_heads_and_losses():
    """Upstream's v2 segmentation: the BEV head on the embedding as [B, C, H, W] (row = y),
    the perspective head on the last image level, SimpleLoss against the stacked masks, in
    training only; stock and turbox agree, one2many gets no segmentation loss."""
    stock, turbox = build_pair(v2=True, aux_seg=AUX_SEG, **SEG_LOSSES)
    cams, feat_hw = 3, (2, 5)
    x = bev(2)
    img_feats = torch.randn(2, cams, DIMS, *feat_hw, generator=torch.Generator().manual_seed(4))
    samples = seg_samples(2, cams, feat_hw)
    losses = []
    for head in (stock, turbox):
        head.train()
        head.zero_grad()
        out = head.loss(x, samples, img_feats=img_feats)
        sum(out.values()).backward()
        losses.append(out)
    expected_keys = ['loss_seg', 'loss_pv_seg'] + V1_KEYS + [f'{k}_one2many' for k in V1_KEYS]
    assert sorted(losses[0]) == sorted(expected_keys) == sorted(losses[1])
    for key in expected_keys:
        torch.testing.assert_close(losses[1][key].reshape(()), losses[0][key].reshape(()),
                                   msg=key)
    preds = stock(x, img_feats=img_feats)
    assert preds['seg'].shape == (2, 1, BEV_H, BEV_W)
    assert preds['pv_seg'].shape == (2, cams, 1, *feat_hw)
    # the BEV head sees the embedding row-major: cell (row r, column c) is token r * W + c
    grid = x.transpose(1, 2).reshape(2, DIMS, BEV_H, BEV_W)
    torch.testing.assert_close(preds['seg'], stock.seg_head(grid))
    bev_masks = torch.stack([s.gt_map_bev_seg for s in samples]).float()
    seg_loss = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([4.0]))
    expected = seg_loss(preds['seg'], bev_masks)
    torch.testing.assert_close(losses[0]['loss_seg'], expected)
    pv_masks = torch.stack([s.gt_map_pv_seg for s in samples]).float()
    expected = 2.0 * torch.nn.functional.binary_cross_entropy_with_logits(preds['pv_seg'],
                                                                          pv_masks)
    torch.testing.assert_close(losses[0]['loss_pv_seg'], expected)
    assert stock.seg_head[0].weight.grad.abs().sum() > 0
    assert stock.pv_seg_head[0].weight.grad.abs().sum() > 0
    test_out = stock.eval()(x, img_feats=img_feats)
    assert test_out['seg'] is None and test_out['pv_seg'] is None
    del samples[1].gt_map_pv_seg
    with pytest.raises(KeyError, match='sample 1 .*gt_map_pv_seg.*RasterizeMapGT'):
        stock.train().loss(x, samples, img_feats=img_feats)
    with pytest.raises(ValueError, match='bev_seg or pv_seg'):
        MODELS.build(head_cfg(v2=True, aux_seg=dict(use_aux_seg=True)))


@pytest.mark.parametrize('kw', [dict(), dict(num_pts_per_vec=PTS + 3),
                                dict(loss_bbox=dict(type='mmdet.L1Loss', loss_weight=0.25))])
def test_all_layers_at_once_equals_layer_by_layer(monkeypatch, kw):
    """The turbox losses of all layers in one pass (upstream's loss configuration) against
    the layer-by-layer loop: values and gradients, points interpolated to the ground truth's
    count too; a configuration the batched path does not know (a weighted box term) takes the
    loop."""
    from turbox_mm.models.maptr import maptr_targets
    _, turbox = build_pair(v2=True, **kw)
    batchable = maptr_targets._layers_batchable
    gts = [map_gt(3, 0), map_gt(0, 1), map_gt(5, 2)]
    x = bev(3)
    results = []
    for use_batched in (True, False):
        monkeypatch.setattr(maptr_targets, '_layers_batchable',
                            batchable if use_batched else (lambda head, preds: False))
        turbox.zero_grad()
        out = turbox.loss_by_feat(turbox(x), gts)
        sum(out.values()).backward()
        results.append((out, {n: p.grad.clone() for n, p in turbox.named_parameters()
                              if p.grad is not None}))
    (batched, batched_grads), (loop, loop_grads) = results
    assert sorted(batched) == sorted(loop)
    for key in loop:
        torch.testing.assert_close(batched[key], loop[key], rtol=1e-5, atol=1e-7, msg=key)
    assert batched_grads.keys() == loop_grads.keys()
    for name, grad in loop_grads.items():
        torch.testing.assert_close(batched_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert batchable(turbox, turbox(x)) == ('loss_bbox' not in kw)
