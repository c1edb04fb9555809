"""The turbox twin of MapTR's camera pipeline (``turbox.data.fast_pipeline``, MapTR style):
``LoadScaledMultiViewImagesTurbo`` against mmdet3d's ``LoadMultiViewImageFromFiles`` +
``RandomScaleImageMultiViewImage`` (the same draw and geometry, uint8 pixels within
interpolation tolerance), the data preprocessor's refill of the pipeline's padding after
normalisation, the rewrite of the MapTR v1 / v2 configs, and both pipelines on a synthetic
dataset down to the preprocessed image batch."""
import contextlib
import copy
import logging
import os.path as osp

import numpy as np
import pytest
import torch
from mmdet3d.datasets.transforms import LoadMultiViewImageFromFiles
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.logging import MMLogger
from mmengine.structures import BaseDataElement

from conftest import ROOT, make_tiny_synthetic, run_python
from turbox_mm.benchmark.micro import image_pipeline as bench
from turbox_mm.datasets.transforms import (LoadScaledMultiViewImagesTurbo,
                                           RandomScaleImageMultiViewImage, exact_decode_factor)
from turbox_mm.engine.runner.fast_pipeline import apply_fast_pipeline
from turbox_mm.models.data_preprocessors import TurboxDet3DDataPreprocessor

V1 = 'configs/maptr/maptr_tiny_r50_24e'
V1_TINY = 'configs/maptr/maptr_tiny_cpu'
V2 = 'configs/maptr/maptrv2_nusc_r50_24ep'
V2_TINY = 'configs/maptr/maptrv2_tiny_cpu'
CAMS = 6
MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]


def camera_sample(paths, sample_idx=3):
    """A sample after ``NuScenesMapTRAdaptor``: cameras, ``lidar2img`` and identity
    ``img_aug_matrix``."""
    images, lidar2img = {}, []
    for k, path in enumerate(paths):
        intrinsic = np.array([[1266.4, 0.0, 816.3 + k], [0.0, 1266.4, 491.5], [0.0, 0.0, 1.0]])
        lidar2cam = np.eye(4)
        lidar2cam[:3, 3] = [0.01 * k, -0.3, -0.8]
        images[f'CAM_{k}'] = dict(img_path=path, cam2img=intrinsic.tolist(),
                                  lidar2cam=lidar2cam.tolist())
        viewpad = np.eye(4)
        viewpad[:3, :3] = intrinsic
        lidar2img.append(viewpad @ lidar2cam)
    return dict(images=images, lidar2img=lidar2img, sample_idx=sample_idx,
                img_aug_matrix=[np.eye(4) for _ in paths])


@pytest.fixture(scope='module')
def jpegs(tmp_path_factory):
    """Camera-like 1600 x 900 JPEGs (hard-edged boxes, sensor noise), quality 90."""
    return bench.write_camera_jpegs(str(tmp_path_factory.mktemp('maptr_cams')), CAMS)


def stock_chain(paths, scales, seed=0):
    np.random.seed(seed)
    out = RandomScaleImageMultiViewImage(scales)(LoadMultiViewImageFromFiles(
        to_float32=True, num_views=CAMS)(camera_sample(paths)))
    return out, np.random.get_state()


def turbox_chain(paths, scales, seed=0, **kwargs):
    np.random.seed(seed)
    out = LoadScaledMultiViewImagesTurbo(scales=scales, num_views=CAMS, **kwargs)(
        camera_sample(paths))
    return out, np.random.get_state()


def assert_same_value(key, want, got):
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype, key
        np.testing.assert_array_equal(got, want, err_msg=key)
    elif isinstance(want, (list, tuple)) and want and isinstance(want[0], np.ndarray):
        assert type(got) is type(want) and len(got) == len(want), key
        for a, b in zip(want, got):
            assert_same_value(key, a, b)
    elif isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype, key
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=key)
    elif isinstance(want, dict):
        assert want.keys() == got.keys(), key
        for k in want:
            assert_same_value(f'{key}.{k}', want[k], got[k])
    else:
        assert got == want and type(got) is type(want), (key, want, got)


GEOMETRY = ('lidar2img', 'img_aug_matrix', 'img_shape', 'ori_shape', 'scale_factor',
            'pad_shape', 'cam2img', 'lidar2cam', 'ori_cam2img', 'filename', 'num_views')


# -- the transform ----------------------------------------------------------------------------

def test_exact_decode_factor():
    assert exact_decode_factor([(900, 1600)] * 6, 0.5) == 2
    assert exact_decode_factor([(900, 1600)] * 6, 0.25) == 4
    assert exact_decode_factor([(900, 1600)] * 6, 0.125) == 1  # 113 rows decoded, 112 wanted
    assert exact_decode_factor([(896, 1600)] * 6, 0.125) == 8
    assert exact_decode_factor([(896, 1600)] * 6, 0.125, max_factor=4) == 1
    assert exact_decode_factor([(180, 320)], 0.5) == 2
    assert exact_decode_factor([(900, 1600)], 0.6) == 1
    assert exact_decode_factor([(901, 1600)], 0.5) == 1  # ceil(901 / 2) = 451, int(450.5) = 450
    assert exact_decode_factor([(900, 1600), (900, 1602)], 0.5) == 1  # mixed: stock pads


# Pixel tolerance, grey levels 0-255 over 6 textured cameras. Measured: 1/2 DCT decode mean
# 0.58, p99 7.5, p99.9 18.5, max 62 (hard edges: the scaled IDCT low-passes each 8x8 block,
# the stock 0.5 bilinear averages 2x2 blocks); full decode + uint8 resize: mean 0.25, max
# 0.5 at 0.5 (the uint8 rounding of the stock float average), max 1 at 0.6.
@pytest.mark.parametrize('scales, scaled_decode, tol', [
    ([0.5], True, dict(mean=0.8, p99=10, max=80)),
    ([0.5], False, dict(mean=0.3, p99=0.5, max=0.5)),
    ([0.6], True, dict(mean=0.4, p99=1, max=1)),
    ([0.5, 0.75, 1.0], True, dict(mean=0.8, p99=10, max=80)),
])
def test_loader_has_the_stock_geometry_draw_and_pixels(jpegs, scales, scaled_decode, tol):
    for seed in range(3):
        want, want_state = stock_chain(jpegs, scales, seed)
        got, got_state = turbox_chain(jpegs, scales, seed, scaled_decode=scaled_decode)
        # the same draw, the numpy stream in step for the transforms after it
        assert got['scale_factor'] == want['scale_factor']
        np.testing.assert_array_equal(want_state[1], got_state[1])
        assert want_state[2:] == got_state[2:]
        for key in GEOMETRY:
            assert_same_value(key, want[key], got[key])
        assert all(img.dtype == np.uint8 for img in got['img'])
        assert got['img_decode_scale'] == 1
        scale = want['scale_factor']
        exact = scaled_decode and exact_decode_factor([(900, 1600)], scale) > 1
        assert [s[2] for s in got['img_src_shapes']] == [3] * CAMS
        diff = np.abs(np.stack(got['img']).astype(np.float32) - np.stack(want['img']))
        if exact or scale != 1.0:
            assert diff.mean() < tol['mean'] and np.percentile(diff, 99) <= tol['p99'] and \
                diff.max() <= tol['max'], (scale, diff.mean(), np.percentile(diff, 99),
                                           diff.max())
        else:  # scale 1: the decode is the stock one
            assert diff.max() == 0


def test_loader_refuses_gpu_decode_and_max_resize():
    with pytest.raises(ValueError, match="decode_on='cpu'"):
        LoadScaledMultiViewImagesTurbo(decode_on='gpu')
    with pytest.raises(ValueError, match='max_resize'):
        LoadScaledMultiViewImagesTurbo(max_resize=0.5)
    with pytest.raises(ValueError, match='positive'):
        LoadScaledMultiViewImagesTurbo(scales=[])


# -- the data preprocessor's refill -------------------------------------------------------------

def test_preprocessor_refills_the_pipeline_padding_after_normalising():
    """uint8 images padded with 0 in the workers come out with 0 (normalised) in the padding,
    as the stock pipeline's normalised-then-padded images; per camera where sizes differ."""
    torch.manual_seed(0)
    imgs = torch.randint(0, 256, (2, CAMS, 3, 32, 64), dtype=torch.uint8)
    imgs[..., 27:, :] = 0
    imgs[..., 50:] = 0
    same = [BaseDataElement(metainfo=dict(ori_shape=[(27, 50, 3)] * CAMS)) for _ in range(2)]
    pre = TurboxDet3DDataPreprocessor(mean=MEAN, std=STD, bgr_to_rgb=True, refill_padding=0.0)
    plain = TurboxDet3DDataPreprocessor(mean=MEAN, std=STD, bgr_to_rgb=True)
    out = pre(dict(inputs=dict(img=list(imgs)), data_samples=same))['inputs']['imgs']
    ref = plain(dict(inputs=dict(img=list(imgs)), data_samples=copy.deepcopy(same)))
    ref = ref['inputs']['imgs']
    assert (out[..., 27:, :] == 0).all() and (out[..., 50:] == 0).all()
    torch.testing.assert_close(out[..., :27, :50], ref[..., :27, :50], rtol=0, atol=0)
    assert (ref[..., 27:, :] != 0).any()  # off: the normalised zeros stay
    # per camera sizes, one shape for all cameras
    mixed = [BaseDataElement(metainfo=dict(ori_shape=[(32 - k, 64 - 2 * k, 3)
                                                      for k in range(CAMS)])),
             BaseDataElement(metainfo=dict(ori_shape=(20, 30)))]
    out = pre(dict(inputs=dict(img=list(imgs)), data_samples=mixed))['inputs']['imgs']
    for k in range(CAMS):
        assert (out[0, k, :, 32 - k:] == 0).all() and (out[0, k, :, :, 64 - 2 * k:] == 0).all()
        assert (out[0, k, :, :32 - k, :64 - 2 * k] != 0).any()
    assert (out[1, :, :, 20:] == 0).all() and (out[1, :, :, :, 30:] == 0).all()
    with pytest.raises(KeyError, match='ori_shape'):
        pre(dict(inputs=dict(img=list(imgs)), data_samples=[BaseDataElement()] * 2))
    with pytest.raises(ValueError, match='exceeds'):
        pre(dict(inputs=dict(img=list(imgs)),
                 data_samples=[BaseDataElement(metainfo=dict(ori_shape=(40, 10)))] * 2))


# -- the rewrite of the configs ---------------------------------------------------------------

def turbox_applied(path, **data):
    from turbox_mm.engine.runner.turbox_options import TURBOX_OPTIONS, apply_turbox_options
    from turbox_mm.utils.options import check_options
    cfg = Config.fromfile(osp.join(ROOT, path))
    cfg.turbox.data.update(data)
    changes = apply_turbox_options(cfg, check_options(cfg.get('turbox'), TURBOX_OPTIONS))
    return cfg, changes


def short(pipeline):
    return [t['type'].split('.')[-1] for t in pipeline]


REMOVED = ('RandomScaleImageMultiViewImage', 'PhotoMetricDistortionMultiViewImage',
           'NormalizeMultiviewImage')
# the other options' twins (point loaders)
OTHER_TWINS = {'LoadPointsFromFile': 'LoadPointsFromFileChecked'}


@pytest.mark.parametrize('config', [V1, V1_TINY, V2, V2_TINY])
def test_rewrite_of_the_maptr_configs(config):
    stock = Config.fromfile(osp.join(ROOT, config + '_stock.py'))
    cfg, changes = turbox_applied(config + '_turbox.py')
    line = ('image pipeline -> LoadScaledMultiViewImagesTurbo (uint8, decoded at the scale: '
            'DCT-scaled where exact); photometric distortion and normalisation on the GPU')
    for name in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        pipeline, stock_pipeline = cfg[name].dataset.pipeline, stock[name].dataset.pipeline
        want = [OTHER_TWINS.get(t, t) for t in short(stock_pipeline) if t not in REMOVED]
        want[want.index('LoadMultiViewImageFromFiles')] = 'LoadScaledMultiViewImagesTurbo'
        assert short(pipeline) == want
        loader = next(t for t in pipeline if t['type'].endswith('ScaledMultiViewImagesTurbo'))
        assert loader == dict(type='turbox_mm.LoadScaledMultiViewImagesTurbo', num_views=6,
                              scaled_decode=True, scales=[0.5])
        # the padding stays in the workers, unchanged (it pads the uint8 images)
        pads = [t for t in pipeline if 'PadMultiViewImage' in t['type']]
        stock_pads = [t for t in stock_pipeline if 'PadMultiViewImage' in t['type']]
        assert pads == stock_pads and len(pads) == 1
        assert f'{name}: {line}' in changes
    pre = cfg.model.data_preprocessor
    assert stock.model.data_preprocessor == dict(type='Det3DDataPreprocessor')
    assert pre == dict(type='turbox_mm.TurboxDet3DDataPreprocessor', mean=MEAN, std=STD,
                       bgr_to_rgb=True, photometric=dict(saturation_clip=True),
                       refill_padding=0.0)
    assert ('model.data_preprocessor = turbox_mm.TurboxDet3DDataPreprocessor (uint8 in; '
            'normalisation and photometric distortion on the device; the padding set to 0 '
            'after normalising)') in changes
    # the preprocessor builds
    from mmdet3d.registry import MODELS
    assert type(MODELS.build(copy.deepcopy(pre))).__name__ == 'TurboxDet3DDataPreprocessor'


def test_fast_pipeline_off_keeps_the_stock_pipelines():
    stock = Config.fromfile(osp.join(ROOT, V2_TINY + '_stock.py'))
    cfg, _ = turbox_applied(V2_TINY + '_turbox.py', fast_pipeline=False)
    for name in ('train_dataloader', 'val_dataloader'):
        assert short(cfg[name].dataset.pipeline) == [
            OTHER_TWINS.get(t, t) for t in short(stock[name].dataset.pipeline)]
    assert cfg.model.data_preprocessor == dict(type='Det3DDataPreprocessor')


@contextlib.contextmanager
def logged():
    logger = MMLogger.get_current_instance()
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def _insert(name, index, transform):
    def edit(cfg):
        cfg[name].dataset.pipeline.insert(index, transform)
    return edit


def _move_pad_before_normalize(cfg):
    pipeline = cfg.val_dataloader.dataset.pipeline
    types = short(pipeline)
    pad = pipeline.pop(types.index('PadMultiViewImage'))
    pipeline.insert(types.index('NormalizeMultiviewImage'), pad)


@pytest.mark.parametrize('config, edit, gpu_decode, reason', [
    (V1_TINY, lambda cfg: None, True, 'gpu_decode is not supported'),
    (V1_TINY, _insert('val_dataloader', 2, dict(type='mmdet.RandomFlip', prob=0.5)), False,
     "RandomFlip' works on the decoded float images"),
    (V1_TINY, _insert('val_dataloader', 2, dict(type='turbox_mm.NuScenesMapTRAdaptor')), False,
     'NuScenesMapTRAdaptor stands between the loader and RandomScaleImageMultiViewImage'),
    (V1_TINY, _insert('val_dataloader', 6, dict(type='turbox_mm.RandomScaleImageMultiViewImage',
                                                scales=[0.5])), False,
     'expected one RandomScaleImageMultiViewImage'),
    (V2_TINY, _move_pad_before_normalize, False, 'pads the images before Normalize'),
    (V2_TINY, lambda cfg: cfg.val_dataloader.dataset.pipeline[4].update(pad_val=1), False,
     'the pipelines pad with different values'),
    (V2_TINY, _insert('train_dataloader', 5, dict(type='GridMask', prob=0.5)), False,
     "GridMask' works on the decoded float images"),
])
def test_pipelines_it_cannot_rewrite_are_kept_with_a_warning(config, edit, gpu_decode, reason):
    cfg = Config.fromfile(osp.join(ROOT, config + '_stock.py'))
    edit(cfg)
    before = copy.deepcopy(cfg.to_dict())
    with logged() as messages:
        changes = apply_fast_pipeline(cfg, dict(fast_pipeline=True, gpu_decode=gpu_decode))
    assert changes == [] and cfg.to_dict() == before
    assert any('the image pipelines are kept as they are' in m and reason in m
               for m in messages), messages


# -- the pipelines on a synthetic dataset -----------------------------------------------------

@pytest.fixture(scope='module')
def tiny_root(tmp_path_factory):
    """One scene of 3 frames, 320 x 180 images, the map expansion and the map ground truth
    precomputed into the infos (v2's LoadMapGT reads it)."""
    root = str(make_tiny_synthetic(tmp_path_factory.mktemp('maptr_fast') / 'nus', sweeps=0,
                                   points=1000)) + '/'
    proc = run_python(['tools/create_data.py', 'map-gt', root + 'nuscenes_infos_train.pkl',
                       '--data-root', root, '--workers', '1', '--no-progress'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def without_photometric(cfg):
    """The stock photometric distortion draws numpy per pixel op in the workers, the twin's
    a torch generator on the device: compare the pixels without it."""
    for name in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        pipeline = cfg[name].dataset.pipeline
        pipeline[:] = [t for t in pipeline
                       if not t['type'].endswith('PhotoMetricDistortionMultiViewImage')]
    return cfg


def build(cfg, name, root):
    from mmdet3d.registry import DATASETS, MODELS
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet3d')
    dataset = copy.deepcopy(cfg[name].dataset)
    dataset.update(data_root=root, ann_file='nuscenes_infos_train.pkl', test_mode=False,
                   filter_empty_gt=False)
    return DATASETS.build(dataset), MODELS.build(copy.deepcopy(cfg.model.data_preprocessor))


def seeded(dataset, index, seed):
    np.random.seed(seed)
    torch.manual_seed(seed)
    return dataset.prepare_data(index)


# Normalised units (std about 57). Measured on the synthetic 320 x 180 JPEGs: mean 0.0101,
# max 0.479 (1/2 DCT decode against the stock float decode + 0.5 bilinear rescale; about 0.6
# and 27 grey levels); the padding exactly 0 in both.
TOLERANCE = dict(mean=0.02, max=0.6)


@pytest.mark.parametrize('config', [V1_TINY, V2_TINY])
@pytest.mark.parametrize('name', ['train_dataloader', 'val_dataloader'])
def test_rewritten_pipelines_on_synthetic_samples(tiny_root, monkeypatch, config, name):
    """Stock and rewritten pipelines, one seed per sample: the same metainfo (geometry, pad
    shapes, ...; ``img_norm_cfg`` aside: the twin's images are not normalised in the
    workers), map ground truth, depth and segmentation targets; the preprocessed image
    batches (stock ``Det3DDataPreprocessor`` on the normalised, padded float images; the
    twin's on uint8, CPU path) within the interpolation tolerance, the padding equal."""
    monkeypatch.setenv('NUSCENES_ROOT', tiny_root)
    stock_cfg = without_photometric(Config.fromfile(osp.join(ROOT, config + '_stock.py')))
    turbox_cfg = without_photometric(Config.fromfile(osp.join(ROOT, config + '_turbox.py')))
    assert apply_fast_pipeline(turbox_cfg, dict(fast_pipeline=True, gpu_decode=False))
    stock, stock_pre = build(stock_cfg, name, tiny_root)
    turbox, turbox_pre = build(turbox_cfg, name, tiny_root)
    assert type(turbox.pipeline.transforms[1]).__name__ == 'LoadScaledMultiViewImagesTurbo'
    diffs, checked = [], 0
    for index in range(len(stock)):
        want, got = seeded(stock, index, index), seeded(turbox, index, index)
        if want is None:  # LoadMapGT(drop_empty=True): no map element here, in both
            assert got is None
            continue
        checked += 1
        assert got['inputs']['img'].dtype == torch.uint8
        assert got['inputs']['img'].shape == want['inputs']['img'].shape == (CAMS, 3, 96, 160)
        meta_want, meta_got = want['data_samples'].metainfo, got['data_samples'].metainfo
        assert meta_want.keys() == meta_got.keys()
        for key in meta_want:
            if key != 'img_norm_cfg':
                assert_same_value(key, meta_want[key], meta_got[key])
        assert meta_got['img_shape'] == meta_got['pad_shape'] == [(96, 160, 3)] * CAMS
        assert meta_got['ori_shape'] == [(90, 160, 3)] * CAMS
        for field in ('gt_depth', 'gt_map_bev_seg', 'gt_map_pv_seg'):
            assert (field in want['data_samples']) == (field in got['data_samples'])
            if field in want['data_samples']:
                assert_same_value(field, want['data_samples'].get(field),
                                  got['data_samples'].get(field))
        gt_want = want['data_samples'].gt_instances_3d
        gt_got = got['data_samples'].gt_instances_3d
        assert gt_want.keys() == gt_got.keys()
        for key in gt_want.keys():
            assert_same_value(key, gt_want[key], gt_got[key])
        # the preprocessed batches, evaluation mode (no photometric distortion)
        a = stock_pre(pseudo_collate([want]), False)['inputs']['imgs']
        b = turbox_pre(pseudo_collate([got]), False)['inputs']['imgs']
        assert a.shape == b.shape == (1, CAMS, 3, 96, 160) and b.dtype == torch.float32
        assert (a[..., 90:, :] == 0).all() and (b[..., 90:, :] == 0).all()
        diffs.append((a - b).abs().flatten())
        # training: the photometric distortion on the device leaves the padding at 0
        c = turbox_pre(pseudo_collate([copy.deepcopy(got)]), True)['inputs']['imgs']
        assert (c[..., 90:, :] == 0).all()
    assert checked
    diffs = torch.cat(diffs)
    print('normalised |difference|', name, config, float(diffs.mean()), float(diffs.max()))
    assert diffs.mean() < TOLERANCE['mean'] and diffs.max() < TOLERANCE['max'], (
        diffs.mean(), diffs.max())
