"""MapTR v2's detector on the tiny config and the synthetic dataset: the depth loss from the
packed ``gt_depth`` (present, absent, mixed), the segmentation and one-to-many losses, the
encoder and head in float32 under the backbone's autocast, and prediction."""
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.dataset import pseudo_collate

from conftest import ROOT, make_maptr_tiny

TINY = osp.join(ROOT, 'configs/maptr/maptrv2_tiny_cpu_stock.py')


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    """3 scenes (2 train, 1 val) of 3 frames, 320 x 180 images, lidar points, the map, and
    the map ground truth precomputed into the infos (the tiny config reads it)."""
    return make_maptr_tiny(tmp_path_factory.mktemp('maptrv2') / 'nuscenes', map_gt=True)


def tiny_cfg(data_root):
    cfg = Config.fromfile(TINY)
    for loader in (cfg.train_dataloader, cfg.val_dataloader):
        loader.dataset.data_root = data_root
        for t in loader.dataset.pipeline:
            if t['type'] == 'turbox_mm.LoadMapGT':
                t['data_root'] = data_root
    return cfg


@pytest.fixture(scope='module')
def setup(data_root):
    import turbox_mm  # noqa: F401
    from mmdet3d.registry import DATASETS, MODELS
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet3d')
    cfg = tiny_cfg(data_root)
    np.random.seed(0)
    train = DATASETS.build(cfg.train_dataloader.dataset)
    val = DATASETS.build(cfg.val_dataloader.dataset)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model, train, val


def batch(dataset, indices, model, training):
    data = pseudo_collate([dataset[i] for i in indices])
    return model.data_preprocessor(data, training=training)


def test_losses_with_and_without_depth_targets(setup):
    model, train, _ = setup
    model.train()
    np.random.seed(0)
    data = batch(train, [0, 1], model, training=True)
    depth = torch.stack([s.gt_depth for s in data['data_samples']])
    assert depth.shape == (2, 6, 96, 160) and (depth > 0).any()
    encoder = model.bev_encoder
    seen = {}

    def forward_spy(feats, metas, prev_bev=None):
        seen['out'] = type(encoder).forward(encoder, feats, metas, prev_bev=prev_bev)
        return seen['out']

    def loss_spy(gt_depth, probs):
        seen['loss_args'] = (gt_depth, probs)
        seen['loss'] = type(encoder).get_depth_loss(encoder, gt_depth, probs)
        return seen['loss']

    encoder.forward, encoder.get_depth_loss = forward_spy, loss_spy
    try:
        losses = model(**data, mode='loss')
    finally:
        del encoder.forward, encoder.get_depth_loss
    assert {'loss_depth', 'loss_seg', 'loss_pv_seg', 'loss_cls', 'loss_pts_one2many',
            'd0.loss_pts'} <= set(losses)
    assert 'loss_seg_one2many' not in losses
    assert all(torch.isfinite(v).all() for v in losses.values())
    # the depth loss is the encoder's, on the packed targets in sample order and the
    # encoder's own depth probabilities
    gt_arg, probs_arg = seen['loss_args']
    assert torch.equal(gt_arg, depth) and probs_arg is seen['out'][1]
    assert probs_arg.shape == (2, 6, 68, 3, 5)
    torch.testing.assert_close(probs_arg.sum(2), torch.ones(2, 6, 3, 5))
    assert losses['loss_depth'] is not None and float(losses['loss_depth']) > 0
    torch.testing.assert_close(losses['loss_depth'], seen['loss'])
    sum(losses.values()).backward()
    assert encoder.depth_net.depth_conv[-1].weight.grad.abs().sum() > 0
    assert model.pts_bbox_head.pv_seg_head[0].weight.grad.abs().sum() > 0
    # no sample with gt_depth: no depth loss, as upstream with gt_depth=None
    for sample in data['data_samples']:
        del sample.gt_depth
    assert 'loss_depth' not in model(**data, mode='loss')
    # some with, some without: a named error
    data['data_samples'][1].gt_depth = depth[1]
    with pytest.raises(KeyError, match='sample 0 .*no gt_depth'):
        model(**data, mode='loss')


def test_encoder_and_head_run_in_float32_under_autocast(setup):
    model, train, _ = setup
    model.train()
    np.random.seed(0)
    data = batch(train, [0], model, training=True)
    seen = {}
    encoder_forward = model.bev_encoder.forward

    def spy(feats, metas, prev_bev=None):
        seen['feats'] = [f.dtype for f in feats]
        seen['autocast'] = torch.is_autocast_enabled('cpu')
        return encoder_forward(feats, metas, prev_bev=prev_bev)

    model.bev_encoder.forward = spy
    try:
        with torch.autocast('cpu', dtype=torch.bfloat16):
            losses = model(**data, mode='loss')
    finally:
        del model.bev_encoder.forward
    assert seen == dict(feats=[torch.float32], autocast=False)
    assert all(v.dtype == torch.float32 for v in losses.values())


def test_predict_gives_the_metrics_format(setup):
    model, _, val = setup
    model.eval()
    data = batch(val, [0], model, training=False)
    with torch.no_grad():
        out = model(**data, mode='predict')
    pred = out[0].pred_instances_3d
    assert pred.pts_3d.shape[1:] == (10, 2) and len(pred.scores_3d) <= 6
    assert set(pred.keys()) == {'pts_3d', 'scores_3d', 'labels_3d', 'bboxes'}
