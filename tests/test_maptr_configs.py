"""MapTR v1 configs: upstream's values (hustvl/MapTR maptr_tiny_r50_24e @ 67cadd8,
docs/design/maptr.md section 1), the turbox twins are the stock configs plus the turbox base,
the whole models build, and the tiny configs train and evaluate through tools/train.py."""
import math
import os.path as osp
import re

import pytest
import torch
from mmengine.config import Config

from conftest import ROOT

FULL = 'configs/maptr/maptr_tiny_r50_24e'
TINY = 'configs/maptr/maptr_tiny_cpu'
PC_RANGE = [-15.0, -30.0, -2.0, 15.0, 30.0, 2.0]


def load(name):
    return Config.fromfile(osp.join(ROOT, name))


def pipeline_types(pipeline):
    return [t['type'].split('.')[-1] for t in pipeline]


def test_model_values_are_upstreams():
    model = load(FULL + '_stock.py').model
    assert model.type == 'turbox_mm.MapTR' and model.use_grid_mask
    assert not model.video_test_mode
    backbone = model.img_backbone
    assert (backbone.depth, backbone.out_indices, backbone.frozen_stages) == (50, (3, ), 1)
    assert backbone.norm_cfg == dict(type='BN', requires_grad=False) and backbone.norm_eval
    assert backbone.init_cfg == dict(type='Pretrained',
                                     checkpoint='ckpts/resnet50-19c8e357.pth')
    assert model.img_neck.in_channels == [2048] and model.img_neck.num_outs == 1
    assert model.img_neck.add_extra_convs == 'on_output'
    encoder = model.bev_encoder
    assert (encoder.bev_h, encoder.bev_w, encoder.pc_range) == (200, 100, PC_RANGE)
    assert encoder.use_can_bus and encoder.rotate_prev_bev and encoder.use_shift
    assert encoder.positional_encoding.num_feats == 128
    assert encoder.encoder.num_layers == 1 and encoder.encoder.num_points_in_pillar == 4
    layer = encoder.encoder.transformerlayers
    assert [a['type'] for a in layer.attn_cfgs] == ['turbox_mm.TemporalSelfAttention',
                                                    'turbox_mm.GeometrySptialCrossAttention']
    gkt = layer.attn_cfgs[1].attention
    assert (gkt.num_heads, gkt.kernel_size, gkt.dilation) == (4, (3, 5), 1)
    assert layer.feedforward_channels == 512 and layer.ffn_dropout == 0.1
    head = model.pts_bbox_head
    assert (head.num_vec, head.num_pts_per_vec, head.num_pts_per_gt_vec) == (50, 20, 20)
    assert (head.bev_h, head.bev_w, head.num_classes) == (200, 100, 3)
    assert head.gt_shift_pts_pattern == 'v2' and head.with_box_refine
    assert head.decoder.num_layers == 6
    assert head.decoder.layer_cfg.self_attn_cfg == dict(embed_dims=256, num_heads=8,
                                                        dropout=0.1)
    assert head.decoder.layer_cfg.ffn_cfg.feedforward_channels == 512
    assert head.bbox_coder.post_center_range == [-20, -35, -20, -35, 20, 35, 20, 35]
    assert head.bbox_coder.max_num == 50
    assert (head.loss_cls.loss_weight, head.loss_pts.loss_weight,
            head.loss_dir.loss_weight) == (2.0, 5.0, 0.005)
    assert head.loss_bbox.loss_weight == head.loss_iou.loss_weight == 0.0
    assigner = model.train_cfg.pts.assigner
    assert assigner.cls_cost.weight == 2.0 and assigner.pts_cost.weight == 5
    assert assigner.reg_cost.weight == assigner.iou_cost.weight == 0.0


def test_data_and_schedule_are_upstreams():
    cfg = load(FULL + '_stock.py')
    train = cfg.train_dataloader
    assert train.batch_size == 4 and train.num_workers == 4
    assert cfg.val_dataloader.batch_size == 1
    assert pipeline_types(train.dataset.pipeline) == [
        'NuScenesMapTRAdaptor', 'LoadMultiViewImageFromFiles',
        'PhotoMetricDistortionMultiViewImage', 'LoadMapGT', 'NormalizeMultiviewImage',
        'RandomScaleImageMultiViewImage', 'PadMultiViewImage', 'PackMapTRInputs']
    assert pipeline_types(cfg.val_dataloader.dataset.pipeline) == [
        'NuScenesMapTRAdaptor', 'LoadMultiViewImageFromFiles', 'LoadMapGT',
        'NormalizeMultiviewImage', 'RandomScaleImageMultiViewImage', 'PadMultiViewImage',
        'PackMapTRInputs']
    steps = {t['type'].split('.')[-1]: t for t in train.dataset.pipeline}
    assert steps['NormalizeMultiviewImage'].to_rgb
    assert steps['NormalizeMultiviewImage'].mean == [123.675, 116.28, 103.53]
    assert steps['RandomScaleImageMultiViewImage'].scales == [0.5]
    assert steps['PadMultiViewImage'].size_divisor == 32
    assert steps['LoadMapGT'].patch_size == (60.0, 30.0) and steps['LoadMapGT'].fixed_num == 20
    # upstream's filter_empty_gt in training only
    assert steps['LoadMapGT'].drop_empty
    val_gt = [t for t in cfg.val_dataloader.dataset.pipeline if t['type'].endswith('LoadMapGT')]
    assert not val_gt[0].get('drop_empty', False)
    assert steps['LoadMultiViewImageFromFiles'].to_float32
    assert cfg.val_evaluator.type == 'turbox_mm.MapChamferMetric'
    wrapper = cfg.optim_wrapper
    assert wrapper.type == 'AmpOptimWrapper' and wrapper.loss_scale == 512.0
    assert wrapper.optimizer == dict(type='AdamW', lr=6e-4, weight_decay=0.01)
    assert wrapper.paramwise_cfg.custom_keys == {'img_backbone': dict(lr_mult=0.1)}
    assert wrapper.clip_grad == dict(max_norm=35, norm_type=2)
    assert cfg.train_cfg.max_epochs == 24 and cfg.train_cfg.val_interval == 2


def test_schedule_warms_up_and_anneals_by_epoch():
    """500 warm-up iterations from 1/3, a per-epoch cosine over 24 epochs to 1e-3 of the lr
    (100 iterations an epoch here)."""
    from mmengine.optim import OptimWrapper
    from mmengine.registry import PARAM_SCHEDULERS
    cfg = load(FULL + '_stock.py')
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=6e-4)
    wrapper = OptimWrapper(optimizer)
    schedulers = [PARAM_SCHEDULERS.build(dict(spec, optimizer=wrapper))
                  for spec in cfg.param_scheduler]
    lrs = []
    for it in range(2400):
        lrs.append(optimizer.param_groups[0]['lr'])
        optimizer.step()
        for scheduler in schedulers:
            if not scheduler.by_epoch:
                scheduler.step()
        if (it + 1) % 100 == 0:
            for scheduler in schedulers:
                if scheduler.by_epoch:
                    scheduler.step()

    def cosine(epoch):
        return 6e-4 * (1e-3 + (1 - 1e-3) * (1 + math.cos(math.pi * epoch / 24)) / 2)

    assert lrs[0] == pytest.approx(2e-4)
    assert lrs[250] == pytest.approx(cosine(2) * (1 / 3 + 2 / 3 * 250 / 500), rel=5e-3)
    assert lrs[600] == lrs[699] == pytest.approx(cosine(6), rel=5e-3)  # flat in an epoch
    assert lrs[700] == pytest.approx(cosine(7), rel=5e-3)  # stepped at the epoch's end
    assert lrs[-1] == pytest.approx(cosine(23), rel=5e-3)


@pytest.mark.parametrize('stock', [FULL + '_stock.py', TINY + '_stock.py'])
def test_turbox_twins_are_the_stock_configs_plus_the_base(stock):
    turbox = stock.replace('_stock.py', '_turbox.py')
    text = open(osp.join(ROOT, turbox)).read()
    assert re.findall(r"'([^']+\.py)'", text) == ['./' + osp.basename(stock),
                                                  '../_base_/turbox.py']
    stock_cfg = load(stock).to_dict()
    turbox_cfg = load(turbox).to_dict()
    assert set(turbox_cfg) - set(stock_cfg) == {'runner_type', 'turbox'}
    assert {k: v for k, v in turbox_cfg.items() if k in stock_cfg} == stock_cfg


def test_tiny_config_is_small_and_consistent():
    cfg = load(TINY + '_stock.py')
    model = cfg.model
    assert model.img_backbone.depth == 18 and model.img_backbone.init_cfg is None
    head = model.pts_bbox_head
    assert (head.bev_h, head.bev_w) == (model.bev_encoder.bev_h, model.bev_encoder.bev_w)
    assert (head.bev_h, head.bev_w) == (20, 10) and model.bev_encoder.pc_range == PC_RANGE
    gt = [t for t in cfg.train_dataloader.dataset.pipeline if t['type'].endswith('LoadMapGT')]
    assert gt[0].fixed_num == head.num_pts_per_gt_vec == head.num_pts_per_vec
    assert cfg.optim_wrapper.type == 'OptimWrapper'  # fp32 on the CPU
    assert cfg.val_evaluator.type == 'turbox_mm.MapChamferMetric'


@pytest.mark.parametrize('name', [FULL + '_stock.py', TINY + '_stock.py'])
def test_configs_build_with_their_encoder(name):
    """The whole model of the config builds (weights off): backbone, neck, the BEV encoder
    (``MapTRPerceptionTransformer``), head, assigner and GridMask."""
    import turbox_mm  # noqa: F401
    from mmdet3d.registry import MODELS
    from mmengine.registry import init_default_scope
    cfg = load(name)
    cfg.model.img_backbone.init_cfg = None
    init_default_scope('mmdet3d')
    model = MODELS.build(cfg.model)
    head = model.pts_bbox_head
    assert type(head).__name__ == 'MapTRHead' and head.assigner is not None
    assert type(model.bev_encoder).__name__ == 'MapTRPerceptionTransformer'
    assert head.op_impl == 'stock' and model.grid_mask.prob == 0.7
    width = cfg.model.pts_bbox_head.embed_dims
    feats = model.extract_feat(dict(imgs=torch.zeros(1, 6, 3, 64, 96)))
    assert feats[0].shape[:3] == (1, 6, width)


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    """3 scenes (2 train, 1 val) of 3 frames with 320 x 180 images and the map expansion."""
    from conftest import make_maptr_tiny
    return make_maptr_tiny(tmp_path_factory.mktemp('maptr') / 'nuscenes')


def _train_tiny(name, data_root, work_dir, *options):
    """``tools/train.py`` on the tiny config (``--cfg-options`` ``options``); the logged
    per-iteration losses."""
    from conftest import run_python
    extra = ['--cfg-options', *options] if options else []
    proc = run_python(['tools/train.py', f'{TINY}_{name}.py', '--work-dir', str(work_dir),
                      *extra], env={'NUSCENES_ROOT': data_root}, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    losses = [float(v)
              for v in re.findall(r'Iter\(train\) \[\d+/\d+\][^\n]*? loss: ([0-9.]+)', log)]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses), log[-3000:]
    assert sum(losses[-3:]) < sum(losses[:3])  # falling
    assert re.search(r'NuscMap_chamfer/mAP: \d\.\d{4}', log), log[-3000:]
    return losses


@pytest.mark.slow
def test_tiny_configs_train_and_evaluate_on_the_cpu_from_the_same_first_step(tiny_data,
                                                                             tmp_path):
    """Both tiny configs: 8 iterations with finite, falling loss, then the Chamfer mAP on the
    synthetic val split; one seed, so turbox with the stock image pipeline
    (``turbox.data.fast_pipeline=False``) logs stock's first losses (turbox: batched
    matching, the cross-attention without rebatching, its ops' CPU references, the pipelined
    loop; from the third step its fused AdamW rounds otherwise). The default twin's image
    pipeline (``LoadScaledMultiViewImagesTurbo``: 1/2 DCT-scaled decoding, photometric
    distortion and normalisation in the data preprocessor, from a torch generator) changes
    the pixels within interpolation tolerance (``tests/test_maptr_fast_pipeline.py``) and
    the random draws, so its first losses stay close (measured: 0.34% off), not equal."""
    stock = _train_tiny('stock', tiny_data, tmp_path / 'stock')
    same_pipeline = _train_tiny('turbox', tiny_data, tmp_path / 'turbox_stock_pipeline',
                                'turbox.data.fast_pipeline=False')
    assert same_pipeline[:2] == pytest.approx(stock[:2], rel=1e-5)
    turbox = _train_tiny('turbox', tiny_data, tmp_path / 'turbox')
    assert turbox[:2] == pytest.approx(stock[:2], rel=0.03)


def test_turbox_compiles_the_bev_encoder_and_the_head_like_eager(tiny_data, full_fp32):
    """turbox.compile's 'auto' on MapTR v1: the backbone, the neck, the whole head's forward
    (the detector's declaration, which takes the place of the head's decoder layers) and the
    BEVFormer encoder (temporal self-attention and GKT cross-attention), traced without a
    graph break or an eager fallback, with eager's losses and gradients over three steps (the
    first eager, as by default)."""
    from conftest import compiled_twin_agrees, config_with_root, turbox_applied
    cfg, _ = turbox_applied(config_with_root(osp.join(ROOT, f'{TINY}_turbox.py'), tiny_data))
    names, frames = compiled_twin_agrees(cfg, steps=3)
    assert names == ['img_backbone', 'img_neck', 'pts_bbox_head', 'bev_encoder.encoder'], names
    # the frames Dynamo compiled over the two compiled steps (measured): one each; a per-step
    # recompile would add frames, an encoder left eager remove one
    assert frames['total'] == 4, frames
