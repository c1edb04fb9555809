"""MapTR v1's detector and its data glue on the CPU: the tiny config's real pipeline on a
synthetic set packs the map ground truth in MapTRHead's contract with the metas MapTR reads;
the detector (with a stand-in BEV encoder defined here, until the real encoder lands) trains
with falling loss, decodes into MapChamferMetric's format, and keeps upstream's test-time
BEV bookkeeping."""
import copy
import math
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from torch import nn

from conftest import ROOT, make_maptr_tiny

TINY = osp.join(ROOT, 'configs/maptr/maptr_tiny_cpu_stock.py')


class StandInEncoder(nn.Module):
    """A BEV embedding from the image features: a learned grid plus a projection of the mean
    feature; records what the detector passes it."""

    def __init__(self, bev_h, bev_w, embed_dims, **kwargs):
        super().__init__()
        self.bev_h, self.bev_w = bev_h, bev_w
        self.grid = nn.Parameter(torch.randn(bev_h * bev_w, embed_dims) * 0.1)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.calls = []

    def forward(self, mlvl_feats, img_metas, prev_bev=None):
        self.calls.append((copy.deepcopy(img_metas), prev_bev))
        pooled = mlvl_feats[0].mean(dim=(1, 3, 4))
        return self.grid[None] + self.proj(pooled)[:, None]


def register_stand_in():
    from turbox_mm.registry import MODELS
    MODELS.register_module(name='MapTRStandInEncoder', module=StandInEncoder, force=True)


def tiny_cfg(data_root):
    cfg = Config.fromfile(TINY)
    cfg.model.bev_encoder = dict(type='turbox_mm.MapTRStandInEncoder', bev_h=20, bev_w=10,
                                 embed_dims=32)
    for loader in (cfg.train_dataloader, cfg.val_dataloader):
        loader.dataset.data_root = data_root
        for t in loader.dataset.pipeline:
            if t['type'] == 'turbox_mm.LoadMapGT':
                t['data_root'] = data_root
    return cfg


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    """3 scenes (2 train, 1 val) of 3 frames, 320 x 180 images, with the map expansion."""
    return make_maptr_tiny(tmp_path_factory.mktemp('maptr') / 'nuscenes', points=500)


@pytest.fixture(scope='module')
def datasets(data_root):
    import turbox_mm  # noqa: F401
    from mmdet3d.registry import DATASETS
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet3d')
    cfg = tiny_cfg(data_root)
    np.random.seed(0)
    return (DATASETS.build(cfg.train_dataloader.dataset),
            DATASETS.build(cfg.val_dataloader.dataset))


def build_model(data_root, **overrides):
    import turbox_mm  # noqa: F401
    from mmdet3d.registry import MODELS
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet3d')
    register_stand_in()
    cfg = tiny_cfg(data_root)
    cfg.model.update(overrides)
    torch.manual_seed(0)
    return MODELS.build(cfg.model)


def test_pipeline_packs_the_map_ground_truth_in_the_heads_contract(datasets):
    from turbox_mm.datasets.transforms.maptr_adaptor import can_bus_of
    train, _ = datasets
    item = train[0]
    img = item['inputs']['img']
    assert tuple(img.shape) == (6, 3, 96, 160) and img.dtype == torch.float32  # 0.5, pad 32
    sample = item['data_samples']
    gt = sample.gt_instances_3d
    assert set(gt.keys()) == {'labels', 'shifts', 'bboxes', 'pts'}
    count = len(gt.labels)
    assert count > 0 and gt.labels.dtype == torch.int64 and gt.labels.max() <= 2
    assert tuple(gt.shifts.shape) == (count, 9, 10, 2)  # 'v2' orders of 10 points
    assert tuple(gt.pts.shape) == (count, 10, 2) and tuple(gt.bboxes.shape) == (count, 4)
    torch.testing.assert_close(gt.shifts[:, 0], gt.pts)  # the first order is the line
    meta = sample.metainfo
    info = train.get_data_info(0)
    assert meta['scene_token'] == info['scene_token'] and meta['sample_idx'] == 0
    assert meta['img_shape'] == [(96, 160, 3)] * 6 and meta['ori_shape'] == [(90, 160, 3)] * 6
    assert meta['map_location'] == info['map_location']
    # lidar2img: the intrinsics times lidar2cam, scaled by 0.5 in u and v
    cams = list(info['images'].values())
    scale = np.diag([0.5, 0.5, 1.0, 1.0])
    for cam, lidar2img in zip(cams, meta['lidar2img']):
        viewpad = np.eye(4)
        viewpad[:3, :3] = cam['cam2img']
        np.testing.assert_allclose(lidar2img, scale @ viewpad @ np.asarray(cam['lidar2cam']))
    np.testing.assert_allclose(meta['img_aug_matrix'][0], scale)
    can_bus = meta['can_bus']
    np.testing.assert_allclose(can_bus, can_bus_of(info['can_bus'], info['ego2global']))
    assert can_bus[-1] == pytest.approx(np.degrees(can_bus[-2])) and 0 <= can_bus[-1] < 360
    np.testing.assert_allclose(can_bus[:3], np.asarray(info['ego2global'])[:3, 3])
    np.testing.assert_allclose(meta['lidar2global'],
                               np.asarray(info['ego2global']) @ meta['lidar2ego'])


def test_test_pipeline_keeps_the_ground_truth_for_the_metric(datasets):
    _, val = datasets
    sample = val[0]['data_samples']
    assert len(sample.gt_instances_3d) == 0  # test time: images only
    evals = sample.eval_ann_info
    assert len(evals['gt_map_polylines']) == len(evals['gt_map_labels']) > 0


def test_can_bus_yaw_is_the_patch_angle():
    from turbox_mm.datasets.transforms.maptr_adaptor import can_bus_of
    pose = np.eye(4)
    angle = np.radians(-30.0)
    pose[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    out = can_bus_of(list(range(18)), pose)
    assert out[-1] == pytest.approx(330.0) and out[-2] == pytest.approx(np.radians(330.0))
    np.testing.assert_allclose(out[3:7], [np.cos(angle / 2), 0, 0, np.sin(angle / 2)])
    np.testing.assert_allclose(out[7:16], np.arange(7, 16))  # the motion values kept


def test_adaptor_names_a_camera_without_its_matrices():
    """cam2ego is required (v2's LSS geometry and depth net read it): no silent identity."""
    from turbox_mm.datasets.transforms import NuScenesMapTRAdaptor
    cam = dict(cam2img=np.eye(3).tolist(), lidar2cam=np.eye(4).tolist())
    results = dict(token='tok7', images=dict(CAM_FRONT=cam), ego2global=np.eye(4).tolist(),
                   lidar_points=dict(lidar2ego=np.eye(4).tolist()))
    with pytest.raises(KeyError, match=r"sample tok7, camera CAM_FRONT lacks \['cam2ego'\]"):
        NuScenesMapTRAdaptor()(results)


def test_pack_refuses_boxes_with_the_map():
    from turbox_mm.datasets.transforms import PackMapTRInputs
    with pytest.raises(ValueError, match='gt_instances_3d'):
        PackMapTRInputs(keys=['img', 'gt_bboxes_3d', 'gt_map_labels'])


def batch(dataset, indices, model, training):
    data = pseudo_collate([dataset[i] for i in indices])
    return model.data_preprocessor(data, training=training)


def test_detector_trains_with_falling_loss_and_zeroed_can_bus(data_root, datasets):
    train, _ = datasets
    model = build_model(data_root, use_grid_mask=True,
                        grid_mask=dict(type='turbox_mm.GridMask', prob=1.0))
    assert type(model).__name__ == 'MapTR'
    assert model.pts_bbox_head.assigner is not None  # from train_cfg['pts']
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    np.random.seed(0)
    data = batch(train, [0, 1], model, training=True)
    losses = []
    for _ in range(6):
        loss_dict = model(**data, mode='loss')
        total = sum(v for k, v in loss_dict.items() if 'loss' in k)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(total.item())
    assert {'loss_cls', 'loss_pts', 'loss_dir', 'd0.loss_cls'} <= set(loss_dict)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    metas, prev_bev = model.bev_encoder.calls[-1]
    assert prev_bev is None and len(metas) == 2
    for meta, sample in zip(metas, data['data_samples']):
        assert meta['can_bus'][:3].tolist() == [0, 0, 0] and meta['can_bus'][-1] == 0
        assert sample.metainfo['can_bus'][-1] != 0  # the data sample's own is untouched
        assert 'lidar2img' in meta and 'img_shape' in meta
    grads = [p.grad for p in model.img_backbone.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_grid_mask_in_training_only(data_root, datasets):
    train, _ = datasets
    model = build_model(data_root, grid_mask=dict(type='turbox_mm.GridMask', prob=1.0))
    seen = []
    model.img_backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    data = batch(train, [0], model, training=True)
    model.train()
    model.extract_feat(data['inputs'])
    model.eval()
    model.extract_feat(data['inputs'])
    imgs = data['inputs']['imgs'].flatten(0, 1)
    assert not torch.equal(seen[0], imgs) and (seen[0] == 0).any()
    assert torch.equal(seen[1], imgs)
    assert build_model(data_root, use_grid_mask=False).grid_mask is None


def test_predict_gives_the_metrics_format_and_evaluates(data_root, datasets):
    from turbox_mm.evaluation import MapChamferMetric
    _, val = datasets
    model = build_model(data_root).eval()
    metric = MapChamferMetric()
    metric.dataset_meta = {}
    with torch.no_grad():
        for index in range(len(val)):
            data = batch(val, [index], model, training=False)
            samples = model(**data, mode='predict')
            pred = samples[0].pred_instances_3d
            assert tuple(pred.pts_3d.shape) == (10, 10, 2)  # max_num 10, 10 points, metres
            assert pred.scores_3d.shape == (10, ) and pred.labels_3d.max() <= 2
            assert pred.pts_3d.abs().max() <= 30.0
            metric.process(data, [s.to_dict() for s in samples])
    results = metric.compute_metrics(metric.results)
    assert 0.0 <= results['mAP'] <= 1.0 and 'divider_AP' in results
    metas, prev_bev = model.bev_encoder.calls[-1]
    assert prev_bev is None and metas[0]['can_bus'][-1] == 0  # video_test_mode off
    outputs = model(**batch(val, [0], model, training=False), mode='tensor')
    assert tuple(outputs['all_pts_preds'].shape) == (2, 1, 10, 10, 2)


def test_video_test_mode_carries_the_bev_within_a_scene(data_root, datasets):
    _, val = datasets
    model = build_model(data_root, video_test_mode=True).eval()
    with torch.no_grad():
        for index in (0, 1):
            model(**batch(val, [index], model, training=False), mode='predict')
    (first, prev0), (second, prev1) = model.bev_encoder.calls
    assert prev0 is None and prev1 is not None and tuple(prev1.shape) == (1, 200, 32)
    raw = [val.get_data_info(i) for i in (0, 1)]
    assert raw[0]['scene_token'] == raw[1]['scene_token']
    bus = [val[i]['data_samples'].metainfo['can_bus'] for i in (0, 1)]
    assert first[0]['can_bus'][:3].tolist() == [0, 0, 0]
    np.testing.assert_allclose(second[0]['can_bus'][:3], bus[1][:3] - bus[0][:3])
    assert second[0]['can_bus'][-1] == pytest.approx(bus[1][-1] - bus[0][-1])
    # a new scene drops the previous BEV
    model.prev_frame_info['scene_token'] = 'another scene'
    with torch.no_grad():
        model(**batch(val, [2], model, training=False), mode='predict')
    assert model.bev_encoder.calls[-1][1] is None
    with pytest.raises(ValueError, match='one sample'):
        model(**batch(val, [0, 1], model, training=False), mode='predict')
