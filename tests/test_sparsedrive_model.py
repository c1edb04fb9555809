"""SparseDrive stage 1 end to end on the tiny synthetic nuScenes: configs, stock/turbox parity,
prediction, training and evaluation (detection, tracking, map).

The tiny configs (configs/sparsedrive/sparsedrive_tiny_stage1_{stock,turbox}.py) are the full
model with small sizes; everything runs on the CPU in the test suite.
"""
import copy
import os.path as osp
import random

import numpy as np
import pytest
import torch
from mmengine.config import Config

from aggregation_calls import assert_kernel_step_agrees
from conftest import (ROOT, assert_same_gradients, build_model, config_with_root, first_step,
                      logged_losses, make_sparsedrive_tiny, run_python,
                      stacked_layer_losses_only, train_batches,
                      turbox_applied)
from pinned_decisions import DecisionPins

TINY_STOCK = osp.join(ROOT, 'configs/sparsedrive/sparsedrive_tiny_stage1_stock.py')
TINY_TURBOX = osp.join(ROOT, 'configs/sparsedrive/sparsedrive_tiny_stage1_turbox.py')
FULL_STOCK = osp.join(ROOT, 'configs/sparsedrive/sparsedrive_small_stage1_stock.py')
FULL_TURBOX = osp.join(ROOT, 'configs/sparsedrive/sparsedrive_small_stage1_turbox.py')


@pytest.fixture(scope='module')
def tiny_root(tmp_path_factory):
    return make_sparsedrive_tiny(tmp_path_factory.mktemp('data') / 'nuscenes_tiny')


# -- configs ----------------------------------------------------------------------------------

def test_full_stage1_config_holds_upstreams_setting():
    """The values of upstream's sparsedrive_small_stage1.py (docs/design/sparsedrive.md, 1)."""
    cfg = Config.fromfile(FULL_STOCK)
    assert cfg.train_dataloader.batch_size == 8 and cfg.train_dataloader.num_workers == 8
    assert cfg.train_cfg.max_iters == 439 * 100 and cfg.train_cfg.val_interval == 439 * 20
    sampler = cfg.train_dataloader.batch_sampler
    assert (sampler.skip_prob, sampler.sequence_flip_prob) == (0.0, 0.0)
    opt = cfg.optim_wrapper
    assert (opt.type, opt.loss_scale) == ('AmpOptimWrapper', 32.0)
    assert (opt.optimizer.lr, opt.optimizer.weight_decay) == (4e-4, 1e-3)
    assert opt.paramwise_cfg.custom_keys['img_backbone']['lr_mult'] == 0.5
    assert opt.clip_grad.max_norm == 25
    assert cfg.data_aug_conf.rot3d_range == [0, 0]
    head = cfg.model.head
    assert head.task_config == dict(with_det=True, with_map=True, with_motion_plan=False)
    det, map_head = head.det_head, head.map_head
    assert det.sampler.num_dn_groups == 0 and det.sampler.num_temp_dn_groups == 0
    assert det.instance_bank.num_temp_instances == 600 and det.with_instance_id
    assert det.graph_model.type == 'turbox_mm.MultiheadFlashAttention'
    assert det.graph_model.embed_dims == 512 and map_head.graph_model.embed_dims == 256
    assert (map_head.instance_bank.num_anchor, map_head.instance_bank.num_temp_instances) == (
        100, 0)
    assert map_head.instance_bank.feat_grad and not map_head.decouple_attn
    # The map head keeps the first layer's self-attention: 6 + 5 x 7 operations.
    order = map_head.operation_order
    assert len(order) == 41 and order[:3] == ['gnn', 'norm', 'deformable']
    kps = map_head.deformable_model.kps_generator
    assert (kps.num_learnable_pts, tuple(kps.fix_height), kps.ground_height) == (
        3, (0, 0.5, -0.5, 1, -1), -1.84023)
    assert map_head.reg_weights == [1.0] * 40
    assert map_head.loss_reg.loss_line.loss_weight == 10.0
    from turbox_mm.models.sparsedrive.map_target import DEFAULT_ASSIGNER
    assert 'assigner' not in map_head.sampler  # the target's default: upstream's
    assert DEFAULT_ASSIGNER['cost']['reg_cost'] == dict(type='LinesL1Cost', weight=10.0,
                                                        beta=0.01, permute=True)
    assert DEFAULT_ASSIGNER['cost']['cls_cost'] == dict(type='FocalLossCost', weight=1.0)
    metrics = [m['type'] for m in cfg.val_evaluator.metrics]
    assert metrics == ['turbox_mm.NuScenesTrackingMetric', 'turbox_mm.SparseDriveMapMetric']


def test_turbox_twin_is_the_stock_config_plus_the_turbox_base():
    with open(FULL_TURBOX) as f:
        lines = [ln for ln in f.read().splitlines() if ln and not ln.startswith('#')]
    assert lines == ["_base_ = ['./sparsedrive_small_stage1_stock.py', '../_base_/turbox.py']"]
    cfg, changes = turbox_applied(Config.fromfile(FULL_TURBOX))
    head = cfg.model.head
    for sub in (head.det_head, head.map_head):
        assert sub.op_impl == 'turbox' and sub.deformable_model.op_impl == 'turbox'
    # The camera pipeline's turbox twin applies through VectorizeMap and the adaptor.
    types = [t['type'] for t in cfg.train_dataloader.dataset.pipeline]
    assert 'turbox_mm.LoadMultiViewImagesTurbo' in types, types
    assert 'turbox_mm.VectorizeMap' in types and 'turbox_mm.NuScenesSparseDriveAdaptor' in types


def test_head_names_missing_heads_and_tasks():
    from turbox_mm.models.sparsedrive import SparseDriveHead
    with pytest.raises(ValueError, match='needs map_head'):
        SparseDriveHead(task_config=dict(with_det=False, with_map=True))
    with pytest.raises(ValueError, match='needs motion_plan_head'):
        SparseDriveHead(task_config=dict(with_motion_plan=True), det_head=dict(),
                        map_head=dict())
    with pytest.raises(ValueError, match='with_motion_plan needs with_det and with_map'):
        SparseDriveHead(task_config=dict(with_map=False, with_motion_plan=True))
    with pytest.raises(ValueError, match='unknown task_config'):
        SparseDriveHead(task_config=dict(with_planning=True))


def test_upload_ragged_splits_per_sample_and_names_bad_shapes():
    from turbox_mm.models.sparsedrive.sparsedrive import upload_ragged
    arrays = [np.arange(6, dtype=np.float32).reshape(3, 2), np.zeros((0, 2), np.float32),
              np.ones((1, 2), np.float32)]
    out = upload_ragged(arrays, torch.device('cpu'), torch.float32)
    assert [tuple(t.shape) for t in out] == [(3, 2), (0, 2), (1, 2)]
    for t, a in zip(out, arrays):
        assert torch.equal(t, torch.from_numpy(a))
    with pytest.raises(ValueError, match='agree after the first dim'):
        upload_ragged([np.zeros((1, 2)), np.zeros((1, 3))], torch.device('cpu'), torch.float32)


# -- the model --------------------------------------------------------------------------------

def test_stock_and_turbox_models_agree_on_the_first_iteration(tiny_root, full_fp32):
    """Same weights, batch and seed in fp32: the stock model (upstream's per-sample matching,
    grid_sample aggregation) and the turbox one (batched matching with one host copy, row
    weights) give the same det and map losses and gradients; and the turbox step with the
    deformable aggregation's Triton kernel (under its interpreter) gives the same losses, the
    kernel matching the reference on every call's own inputs (aggregation_calls.py says why
    its parameter gradients are not compared)."""
    stock_cfg = config_with_root(TINY_STOCK, tiny_root)
    turbox_cfg, _ = turbox_applied(config_with_root(TINY_TURBOX, tiny_root))
    # seeded weights and augmentation, whatever ran before in this process: unseeded, an
    # initialisation can land on gradients that rounding moves by several percent
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    stock, turbox = build_model(stock_cfg), build_model(turbox_cfg)
    turbox.load_state_dict(stock.state_dict())
    with_kernel = copy.deepcopy(turbox)  # before any step: the instance banks keep frames
    batch = stock.data_preprocessor(train_batches(stock_cfg, 1)[0], training=True)
    assert all(len(s.metainfo['gt_map_labels']) > 0 for s in batch['data_samples'])

    pins = DecisionPins()  # near ties at initialisation (pinned_decisions.py)
    with pins.record():
        stock_losses, stock_grads = first_step(stock, batch)
    # The turbox maths with the reference aggregation: the same network, so the same
    # forward values; only the targets and losses differ in arithmetic. Measured: equal to
    # the last bit on this machine.
    with pins.replay(), stacked_layer_losses_only():
        turbox_losses, turbox_grads = first_step(turbox, batch)
    assert list(stock_losses) == list(turbox_losses)  # the same keys in the same order
    assert {'det_loss_cls_0', 'det_loss_box_1', 'map_loss_cls_0', 'map_loss_line_1',
            'loss_dense_depth'} <= set(stock_losses), sorted(stock_losses)
    for key in stock_losses:
        torch.testing.assert_close(turbox_losses[key], stock_losses[key], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, key=key: f'{key} (pinned near ties: '
                                   f'{pins.flips}): {m}')
    assert stock_grads.keys() == turbox_grads.keys()
    assert any(n.startswith('head.map_head.instance_bank') for n in stock_grads)
    assert_same_gradients(turbox_grads, stock_grads, total=1e-5, each=1e-4)

    # two det and two map layers
    assert_kernel_step_agrees(with_kernel, batch, pins, stock_losses, num_calls=4)


def test_training_frames_carry_det_ids_and_no_map_cache(tiny_root):
    """The det bank caches and numbers its instances in training too (the motion head's
    queue needs the ids); the stage-1 map bank keeps nothing from frame to frame."""
    cfg = config_with_root(TINY_STOCK, tiny_root)
    model = build_model(cfg)
    model.train()
    det_bank = model.head.det_head.instance_bank
    map_bank = model.head.map_head.instance_bank
    for batch in train_batches(cfg, 2):
        batch = model.data_preprocessor(batch, training=True)
        feats = [f.float() for f in model.extract_feat(batch['inputs'])]
        from turbox_mm.ops.deformable_aggregation import feature_maps_format
        metas = model.metas(batch['data_samples'], feats[0].device, with_gt=True)
        det, map_out, motion, _ = model.head(feature_maps_format(feats), metas)
        assert motion is None
        assert det['instance_id'].shape == (2, 32) and bool((det['instance_id'] >= 0).all())
        assert det['instance_feature'].shape == (2, 32, 64)
        assert 'instance_id' not in map_out
        assert map_bank.cached_anchor is None and det_bank.cached_anchor is not None
        assert map_out['prediction'][-1].shape == (2, 8, 40)
        assert map_out['quality'][-1] is None
    # the second frame continues the first's ids
    assert det_bank.mask is not None and bool(det_bank.mask.all())


def test_predict_gives_boxes_and_map_polylines(tiny_root):
    cfg = config_with_root(TINY_STOCK, tiny_root)
    model = build_model(cfg)
    model.eval()
    from mmengine.registry import DefaultScope

    from turbox_mm.registry import DATASETS
    with DefaultScope.overwrite_default_scope('mmdet3d'):
        dataset = DATASETS.build(cfg.val_dataloader.dataset)
    from mmengine.dataset import pseudo_collate
    batch = model.data_preprocessor(pseudo_collate([dataset[0]]), training=False)
    with torch.no_grad():
        out = model.predict(batch['inputs'], batch['data_samples'])
    sample = out[0]
    assert len(sample.pred_instances_3d.scores_3d) == 16
    assert 'instance_ids' in sample.pred_instances_3d
    pred_map = sample.pred_map_instances
    assert pred_map.pts.shape == (8, 20, 2) and pred_map.labels.max() < 3
    assert bool((pred_map.scores[:-1] >= pred_map.scores[1:]).all())
    # the map ground truth for the metric, in SparseDrive's class order
    gt = sample.eval_ann_info
    assert len(gt['gt_map_polylines']) == len(gt['gt_map_labels']) > 0
    assert set(np.asarray(gt['gt_map_labels']).tolist()) <= {0, 1, 2}


# -- training ---------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize('config', [TINY_STOCK, TINY_TURBOX], ids=['stock', 'turbox'])
def test_tiny_config_trains_with_falling_loss_and_evaluates(tiny_root, tmp_path, config):
    work = tmp_path / 'work'
    proc = run_python(['tools/train.py', config, '--work-dir', str(work)],
                      env={'NUSCENES_ROOT': tiny_root}, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    losses = logged_losses(work)
    assert sorted(losses) == list(range(1, 21)), sorted(losses)
    first, last = np.mean([losses[i] for i in range(1, 6)]), np.mean(
        [losses[i] for i in range(16, 21)])
    assert last < first, (first, last)
    for key in ('det_loss_cls_0', 'map_loss_cls_0'):
        cls = logged_losses(work, key=key)
        assert np.mean([cls[i] for i in range(16, 21)]) < 0.7 * np.mean(
            [cls[i] for i in range(1, 6)]), (key, cls)
    # The evaluation at the end of training: detection, tracking and the map.
    for key in ('pred_instances_3d_NuScenes/NDS', 'pred_instances_3d_NuScenes/AMOTA',
                'SparseDriveMap/mAP_normal', 'SparseDriveMap/divider_AP@1.0'):
        assert key in log, (key, log[-3000:])
    if config == TINY_TURBOX:
        assert 'turbox_mm.LoadMultiViewImagesTurbo' in log
        assert "model.head.map_head.op_impl = 'turbox'" in log
