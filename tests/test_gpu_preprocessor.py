"""TurboxDet3DDataPreprocessor: uint8 normalisation, photometric distortion, deferred decode.

References are upstream's own code wherever it exists: mmdet3d's ``Det3DDataPreprocessor`` on
float inputs, mmcv's ``imnormalize`` (what ``NormalizeMultiviewImage`` calls), mmdet's
``PhotoMetricDistortion`` with its random draws fixed, OpenCV's ``cvtColor``, ``imdecode`` and
``warpAffine``. The GPU tests compare the device path with the CPU path of the same class.
"""
import warnings

import cv2
import mmcv
import numpy as np
import pytest
import torch
from mmdet.datasets.transforms import PhotoMetricDistortion
from mmdet3d.datasets.transforms import Pack3DDetInputs
from mmdet3d.models.data_preprocessors import Det3DDataPreprocessor
from mmdet3d.structures import Det3DDataSample
from mmengine.dataset import pseudo_collate
from torch.testing import assert_close

from turbox_mm.benchmark.micro import gpu_preprocess as bench
from turbox_mm.benchmark.micro import image_pipeline
from turbox_mm.datasets.transforms.load_multiview_images import (LoadMultiViewImagesTurbo,
                                                                 block_average)
from turbox_mm.datasets.transforms.multiview_affine_aug import (MultiViewAffineAug,
                                                                block_factor, block_factors,
                                                                crop_box,
                                                                decoded_warp, rotation_mask,
                                                                source_warp)
from turbox_mm.datasets.transforms.pack_jpeg_bytes import PackJpegBytes, pack_jpeg_bytes
from turbox_mm.models.data_preprocessors import TurboxDet3DDataPreprocessor
from turbox_mm.models.data_preprocessors import deferred_decode as dd
from turbox_mm.models.data_preprocessors import gpu_image_preprocessor as gip

MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]
needs_cuda = pytest.mark.cuda


def rand_uint8(*shape, seed=0):
    return torch.randint(0, 256, shape, dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def samples(n):
    return [Det3DDataSample() for _ in range(n)]


def run(pre, imgs, training=False, with_samples=True):
    data = dict(inputs=dict(img=imgs))
    if with_samples:
        data['data_samples'] = samples(len(imgs))
    return pre(data, training)


# -- normalisation ----------------------------------------------------------------------------

@pytest.mark.parametrize('multiview', [True, False])
@pytest.mark.parametrize('bgr_to_rgb', [True, False])
@pytest.mark.parametrize('divisor', [1, 32])
def test_uint8_matches_stock_on_float_input(multiview, bgr_to_rgb, divisor):
    shape = (6, 3, 30, 44) if multiview else (3, 30, 44)
    imgs = [rand_uint8(*shape, seed=s) for s in range(3)]
    cfg = dict(mean=MEAN, std=STD, bgr_to_rgb=bgr_to_rgb, pad_size_divisor=divisor,
               pad_value=-7)
    stock = run(Det3DDataPreprocessor(**cfg), [i.float() for i in imgs])
    turbox = run(TurboxDet3DDataPreprocessor(**cfg), imgs)
    expected = stock['inputs']['imgs']
    assert turbox['inputs']['imgs'].dtype == torch.float32
    assert turbox['inputs']['imgs'].shape == expected.shape
    assert_close(turbox['inputs']['imgs'], expected, rtol=0, atol=1e-5)
    for a, b in zip(turbox['data_samples'], stock['data_samples']):
        assert a.batch_input_shape == b.batch_input_shape
        assert a.pad_shape == b.pad_shape


def test_mixed_sizes_are_padded_as_stock_does():
    imgs = [rand_uint8(6, 3, 30, 44, seed=1), rand_uint8(6, 3, 26, 50, seed=2)]
    cfg = dict(mean=MEAN, std=STD, bgr_to_rgb=True, pad_size_divisor=8, pad_value=3)
    stock = run(Det3DDataPreprocessor(**cfg), [i.float() for i in imgs])['inputs']['imgs']
    turbox = run(TurboxDet3DDataPreprocessor(**cfg), imgs)['inputs']['imgs']
    assert turbox.shape == stock.shape == (2, 6, 3, 32, 56)
    assert_close(turbox, stock, rtol=0, atol=1e-5)
    single = [rand_uint8(3, 20, 30, seed=3), rand_uint8(3, 24, 28, seed=4)]
    stock = run(Det3DDataPreprocessor(**cfg), [i.float() for i in single])['inputs']['imgs']
    turbox = run(TurboxDet3DDataPreprocessor(**cfg), single)['inputs']['imgs']
    assert_close(turbox, stock, rtol=0, atol=1e-5)


def test_matches_cpu_normalize_multiview_image():
    imgs = [rand_uint8(6, 3, 24, 40, seed=s) for s in range(2)]
    out = run(TurboxDet3DDataPreprocessor(mean=MEAN, std=STD, bgr_to_rgb=True), imgs)
    mean, std = np.array(MEAN, np.float32), np.array(STD, np.float32)
    for b, sample in enumerate(imgs):
        for v, img in enumerate(sample):
            ref = mmcv.imnormalize(img.permute(1, 2, 0).numpy().astype(np.float32), mean, std,
                                   to_rgb=True)
            assert_close(out['inputs']['imgs'][b, v], torch.from_numpy(ref).permute(2, 0, 1),
                         rtol=0, atol=1e-5)


def test_bgr_to_rgb_swaps_channels_and_float_input_passes_through():
    img = rand_uint8(2, 3, 8, 10)
    out = run(TurboxDet3DDataPreprocessor(bgr_to_rgb=True), [img])['inputs']['imgs'][0]
    assert torch.equal(out, img.flip(1).float())
    plain = run(TurboxDet3DDataPreprocessor(), [img.float() / 7])['inputs']['imgs'][0]
    assert torch.equal(plain, img.float() / 7)


def test_collated_tensor_input():
    batch = rand_uint8(2, 3, 16, 24)
    cfg = dict(mean=MEAN, std=STD, bgr_to_rgb=True)
    stock = Det3DDataPreprocessor(**cfg)(dict(inputs=dict(img=batch.float())))
    turbox = TurboxDet3DDataPreprocessor(**cfg)(dict(inputs=dict(img=batch)))
    assert_close(turbox['inputs']['imgs'], stock['inputs']['imgs'], rtol=0, atol=1e-5)


@pytest.mark.parametrize('imgs, match', [
    ([rand_uint8(6, 2, 8, 8)], 'must have 3 channels'),
    ([rand_uint8(6, 3, 8, 8), rand_uint8(3, 8, 8)], r'\[C, H, W\] \(single view\)'),
    ([rand_uint8(6, 3, 8, 8), rand_uint8(5, 3, 8, 8)], 'different numbers of views'),
    ([rand_uint8(3, 8, 8), rand_uint8(1, 8, 8)], 'different numbers of channels'),
    ([rand_uint8(2, 6, 3, 8, 8)], r'\[C, H, W\] \(single view\)'),
])
def test_bad_shapes_raise_clear_errors(imgs, match):
    pre = TurboxDet3DDataPreprocessor(mean=MEAN, std=STD, bgr_to_rgb=True)
    with pytest.raises(ValueError, match=match):
        run(pre, imgs, with_samples=False)


def test_single_channel_allowed_with_one_value_mean():
    img = rand_uint8(1, 8, 8)
    out = run(TurboxDet3DDataPreprocessor(mean=[10.0], std=[2.0]), [img])['inputs']['imgs']
    assert_close(out[0], (img.float() - 10) / 2)


def test_deepcopy_drops_runtime_handles():
    import copy
    import threading
    pre = TurboxDet3DDataPreprocessor(mean=MEAN, std=STD, photometric=dict(seed=1))
    pre._decode_stream = threading.Lock()  # stands for handles that cannot be copied
    pre._nvimgcodec_decoder = threading.Lock()
    pre.photometric_generator()
    twin = copy.deepcopy(pre)
    assert twin._decode_stream is None and twin._nvimgcodec_decoder is None
    assert pre._decode_stream is not None
    assert torch.equal(torch.rand(3, generator=twin._generator),
                       torch.rand(3, generator=pre._generator))


def test_registered_in_turbox_scope():
    from turbox_mm.registry import MODELS, TRANSFORMS
    pre = MODELS.build(dict(type='turbox_mm.TurboxDet3DDataPreprocessor', mean=MEAN, std=STD))
    assert isinstance(pre, TurboxDet3DDataPreprocessor)
    assert isinstance(TRANSFORMS.build(dict(type='turbox_mm.PackJpegBytes', keys=['img'])),
                      PackJpegBytes)


# -- photometric distortion -------------------------------------------------------------------

def textured(h, w, seed):
    return bench.textured_image(h, w, seed)


def hwc(t):
    return t.permute(1, 2, 0).numpy()


@pytest.mark.parametrize('low, high', [(0, 255), (-60, 420)])
def test_hsv_conversions_match_opencv(low, high):
    rng = np.random.default_rng(0)
    img = rng.uniform(low, high, (40, 50, 3)).astype(np.float32)
    img[:4] = np.round(img[:4])
    img[4:8, :, 1] = img[4:8, :, 0]  # ties between channels
    img[8:12] = img[8:12, :, :1]  # greys
    ref = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    hsv = hwc(gip.bgr_to_hsv(torch.from_numpy(img).permute(2, 0, 1)))
    dh = np.abs(hsv[..., 0] - ref[..., 0])
    assert np.minimum(dh, 360 - dh).max() < 1e-3
    np.testing.assert_allclose(hsv[..., 1:], ref[..., 1:], rtol=0, atol=1e-3)
    shifted = ref.copy()
    shifted[..., 0] = (shifted[..., 0] + 23.7) % 360
    shifted[..., 1] *= 1.3
    for h in (ref, shifted):
        back = hwc(gip.hsv_to_bgr(torch.from_numpy(h).permute(2, 0, 1)))
        np.testing.assert_allclose(back, cv2.cvtColor(h, cv2.COLOR_HSV2BGR), rtol=0, atol=1e-3)


# mode, brightness, contrast, saturation, hue, swap flags; delta, alpha, saturation, hue, perm
DRAW_CASES = {
    'all off': (0, 0, 0, 0, 0, 0, 20.0, 1.3, 0.7, 10.0, (2, 1, 0)),
    'brightness': (0, 1, 0, 0, 0, 0, -27.5, 1.3, 0.7, 10.0, (2, 1, 0)),
    'contrast first': (1, 0, 1, 0, 0, 0, 20.0, 1.41, 0.7, 10.0, (2, 1, 0)),
    'contrast last': (0, 0, 1, 0, 0, 0, 20.0, 0.62, 0.7, 10.0, (2, 1, 0)),
    'saturation down': (0, 0, 0, 1, 0, 0, 20.0, 1.3, 0.55, 10.0, (2, 1, 0)),
    'saturation up': (0, 0, 0, 1, 0, 0, 20.0, 1.3, 1.45, 10.0, (2, 1, 0)),
    'hue up': (0, 0, 0, 0, 1, 0, 20.0, 1.3, 0.7, 17.0, (2, 1, 0)),
    'hue down': (0, 0, 0, 0, 1, 0, 20.0, 1.3, 0.7, -16.0, (2, 1, 0)),
    'swap': (0, 0, 0, 0, 0, 1, 20.0, 1.3, 0.7, 10.0, (1, 2, 0)),
    'all, contrast first': (1, 1, 1, 1, 1, 1, 31.0, 1.2, 1.3, -12.0, (2, 0, 1)),
    'all, contrast last': (0, 1, 1, 1, 1, 1, -31.0, 0.7, 0.6, 15.0, (0, 2, 1)),
}


def mmdet_distort(img, draws):
    op = PhotoMetricDistortion()
    op._random_flags = lambda: (*draws[:10], np.array(draws[10]))
    return op.transform(dict(img=img.copy()))['img']


def sparse4d_distort(img, draws):
    """Sparse4D's / BEVFormer's PhotoMetricDistortionMultiViewImage with fixed draws (no
    saturation clip), written out with mmcv's conversions as that transform is."""
    mode, fb, fc, fs, fh, fw, delta, alpha, sat, hue, perm = draws
    img = img.astype(np.float32)
    if fb:
        img += delta
    if mode == 1 and fc:
        img *= alpha
    img = mmcv.bgr2hsv(img)
    if fs:
        img[..., 1] *= sat
    if fh:
        img[..., 0] += hue
        img[..., 0][img[..., 0] > 360] -= 360
        img[..., 0][img[..., 0] < 0] += 360
    img = mmcv.hsv2bgr(img)
    if mode == 0 and fc:
        img *= alpha
    if fw:
        img = img[..., list(perm)]
    return img


def turbox_distort(imgs, draws, saturation_clip):
    params = gip.PhotometricParams.from_draws(
        *[np.full(len(imgs), d) for d in draws[:10]], np.tile(draws[10], (len(imgs), 1)),
        saturation_clip=saturation_clip)
    batch = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()
    return gip.apply_photometric(batch, params, params.active()).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize('case', sorted(DRAW_CASES))
def test_photometric_fixed_draws_match_cpu_ops(case):
    draws = DRAW_CASES[case]
    imgs = [textured(24, 32, s) for s in range(3)]
    out = turbox_distort(imgs, draws, saturation_clip=True)
    for img, got in zip(imgs, out):
        np.testing.assert_allclose(got, mmdet_distort(img, draws), rtol=0, atol=1e-3)
    out = turbox_distort(imgs, draws, saturation_clip=False)
    for img, got in zip(imgs, out):
        np.testing.assert_allclose(got, sparse4d_distort(img, draws), rtol=0, atol=1e-3)


def test_photometric_per_image_parameters():
    """Each image of a batch gets its own parameters (here: different cases side by side)."""
    names = sorted(DRAW_CASES)
    imgs = [textured(16, 20, s) for s in range(len(names))]
    draws = [DRAW_CASES[n] for n in names]
    params = gip.PhotometricParams.from_draws(
        *[np.array([d[k] for d in draws]) for k in range(10)], np.array([d[10] for d in draws]))
    batch = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()
    out = gip.apply_photometric(batch, params).permute(0, 2, 3, 1).numpy()
    for img, d, got in zip(imgs, draws, out):
        np.testing.assert_allclose(got, sparse4d_distort(img, d), rtol=0, atol=1e-3)


def test_photometric_draws_follow_the_cpu_distribution():
    gen = torch.Generator().manual_seed(3)
    n, prob = 40000, 0.3
    p = gip.PhotometricParams.sample(n, gen, brightness_delta=10, contrast_range=(0.8, 1.2),
                                     saturation_range=(0.6, 1.1), hue_delta=5, prob=prob)
    assert abs((p.delta != 0).float().mean().item() - prob) < 0.01
    assert p.delta.abs().max() <= 10
    contrast_on = (p.alpha_first != 1) | (p.alpha_last != 1)
    assert abs(contrast_on.float().mean().item() - prob) < 0.01
    assert not ((p.alpha_first != 1) & (p.alpha_last != 1)).any()  # one position per image
    first = (p.alpha_first != 1).sum().item() / contrast_on.sum().item()
    assert abs(first - 0.5) < 0.03
    both = torch.cat([p.alpha_first[p.alpha_first != 1], p.alpha_last[p.alpha_last != 1]])
    assert both.min() >= 0.8 and both.max() <= 1.2
    assert abs(both.mean().item() - 1.0) < 0.01
    sat = p.saturation[p.saturation != 1]
    assert abs(sat.numel() / n - prob) < 0.01 and sat.min() >= 0.6 and sat.max() <= 1.1
    hue = p.hue[p.hue != 0]
    assert abs(hue.numel() / n - prob) < 0.01 and hue.abs().max() <= 5
    swapped = (p.perm != torch.arange(3)).any(1)
    # The identity permutation is one of six: a swap shows in 5/6 of the swapped images.
    assert abs(swapped.float().mean().item() - prob * 5 / 6) < 0.01
    perms, counts = torch.unique(p.perm[swapped], dim=0, return_counts=True)
    assert len(perms) == 5 and (counts.float() / counts.sum() - 0.2).abs().max() < 0.02


def expected_with_params(imgs, params, mean=MEAN, std=STD):
    batch = torch.stack(imgs).float()
    flat = gip.apply_photometric(batch.reshape(-1, *batch.shape[-3:]).clone(), params)
    x = flat.reshape(batch.shape)[..., [2, 1, 0], :, :]
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def test_photometric_in_the_preprocessor():
    imgs = [torch.from_numpy(textured(20, 28, s)).permute(2, 0, 1).repeat(2, 1, 1, 1)
            for s in range(2)]
    cfg = dict(mean=MEAN, std=STD, bgr_to_rgb=True)
    photometric = dict(prob=1.0, seed=7, hue_delta=12)
    pre = TurboxDet3DDataPreprocessor(photometric=photometric, **cfg)
    plain = run(TurboxDet3DDataPreprocessor(**cfg), imgs)['inputs']['imgs']
    # Evaluation: no distortion.
    assert torch.equal(run(pre, imgs, training=False)['inputs']['imgs'], plain)
    # Training: the draws of a generator seeded as documented, one set per image in order.
    out = run(pre, imgs, training=True)['inputs']['imgs']
    gen = torch.Generator().manual_seed(7)
    params = gip.PhotometricParams.sample(4, gen, hue_delta=12, prob=1.0)
    assert_close(out, expected_with_params(imgs, params), rtol=0, atol=1e-4)
    # Reproducible from the seed; another seed draws differently.
    again = TurboxDet3DDataPreprocessor(photometric=photometric, **cfg)
    assert torch.equal(run(again, imgs, training=True)['inputs']['imgs'], out)
    other = TurboxDet3DDataPreprocessor(photometric=dict(photometric, seed=8), **cfg)
    assert (run(other, imgs, training=True)['inputs']['imgs'] - out).abs().max() > 1
    # The next batch continues the stream.
    assert (run(pre, imgs, training=True)['inputs']['imgs'] - out).abs().max() > 1


def test_photometric_seed_from_the_global_generator():
    imgs = [torch.from_numpy(textured(12, 16, 0)).permute(2, 0, 1)]
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        pre = TurboxDet3DDataPreprocessor(photometric=dict(prob=1.0))
        outs.append(run(pre, imgs, training=True)['inputs']['imgs'])
    assert torch.equal(*outs)


@pytest.mark.parametrize('cfg, match', [
    (dict(brightness=3), "unknown keys \\['brightness'\\]"),
    (dict(prob=1.5), 'prob must be in'),
    (dict(contrast_range=(1.5, 0.5)), 'contrast_range must be'),
])
def test_photometric_config_errors(cfg, match):
    with pytest.raises(ValueError, match=match):
        TurboxDet3DDataPreprocessor(photometric=cfg)


# -- deferred decode --------------------------------------------------------------------------

def augment_warp(src_hw, out_hw, scale, crop, flip, angle):
    """Output pixel -> source pixel matrix of a resize, crop, flip and rotation about the
    output centre (the forward transform of a ResizeCropFlipRotate pipeline, inverted)."""
    h, w = out_hw
    fwd = np.array([[scale, 0, -crop[0]], [0, scale, -crop[1]], [0, 0, 1]], dtype=np.float64)
    if flip:
        fwd = np.array([[-1, 0, w - 1], [0, 1, 0], [0, 0, 1]]) @ fwd
    c, s = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
    centre = np.array([(w - 1) / 2, (h - 1) / 2])
    rot = np.eye(3)
    rot[:2, :2] = [[c, s], [-s, c]]
    rot[:2, 2] = centre - rot[:2, :2] @ centre
    return np.linalg.inv(rot @ fwd).astype(np.float32)


def make_sample(seed, views=3, src_hw=(72, 120), out_hw=(40, 64), single=False,
                chroma='420'):
    rng = np.random.default_rng(seed)
    jpegs, warps = [], []
    sampling = {'420': cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420,
                '444': cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444}[chroma]
    for v in range(1 if single else views):
        img = textured(*src_hw, seed * 10 + v)
        jpegs.append(cv2.imencode('.jpg', img, [cv2.IMWRITE_JPEG_QUALITY, 90,
                                                cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                                                sampling])[1].tobytes())
        warps.append(augment_warp(src_hw, out_hw, scale=rng.uniform(0.45, 0.7),
                                  crop=rng.uniform(0, 12, 2), flip=bool(rng.integers(2)),
                                  angle=rng.uniform(-5.4, 5.4)))
    if single:
        return dict(img_bytes=jpegs[0], img_warp=warps[0], img_warp_size=out_hw)
    return dict(img_bytes=jpegs, img_warp=np.stack(warps), img_warp_size=out_hw)


def reference_decode(sample):
    """What a CPU pipeline produces: OpenCV decode, the 2x2 (4x4) block average of
    MultiViewAffineAug where the warp shrinks by 2 (4) or more, and warpAffine with the
    warp re-targeted to the averaged source; uint8 BGR [N, 3, H, W]."""
    jpegs = sample['img_bytes']
    single = not isinstance(jpegs, list)
    warps = np.asarray(sample['img_warp']).reshape(-1, 3, 3)
    h, w = sample['img_warp_size']
    outs = []
    for jpeg, warp in zip([jpegs] if single else jpegs, warps):
        img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        factor = block_factor(warp)
        if factor > 1:
            img = block_average(img, factor)
        out = cv2.warpAffine(img, decoded_warp(warp, factor)[:2], (w, h),
                             flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        outs.append(torch.from_numpy(out).permute(2, 0, 1))
    return outs[0] if single else torch.stack(outs)


def packed_batch(raw_samples):
    pack = PackJpegBytes(keys=['img'])
    return pseudo_collate([pack(dict(s)) for s in raw_samples])


def test_pack_jpeg_bytes_layout_survives_pseudo_collate():
    raws = [make_sample(0), dict(make_sample(1, views=2), img=None)]  # img=None: deferred loader
    batch = packed_batch(raws)
    inputs = batch['inputs']
    assert set(inputs) == set(gip.DEFERRED_KEYS)
    for b, raw in enumerate(raws):
        buf, off = inputs['img_bytes'][b], inputs['img_bytes_offsets'][b]
        assert buf.dtype == np.uint8 and off.tolist()[0] == 0 and off[-1] == buf.size
        for i, jpeg in enumerate(raw['img_bytes']):
            assert buf[off[i]:off[i + 1]].tobytes() == jpeg
        assert inputs['img_warp'][b].dtype == np.float32
        np.testing.assert_array_equal(inputs['img_warp'][b], raw['img_warp'])
        assert inputs['img_warp_size'][b].tolist() == [40, 64]
    assert len(batch['data_samples']) == 2


def test_pack_keeps_the_image_files_for_error_messages():
    """A decode failure on the GPU names the file: the files reach the metainfo as img_path
    even where meta_keys omits them (Sparse4D's configs), from the loaders' filename."""
    raw = dict(make_sample(0, views=2), filename=['a/cam0.jpg', 'a/cam1.jpg'])
    sample = PackJpegBytes(keys=['img'], meta_keys=('timestamp', ))(dict(raw))['data_samples']
    assert sample.img_path == ['a/cam0.jpg', 'a/cam1.jpg']
    listed = PackJpegBytes(keys=['img'], meta_keys=('img_path', ))(
        dict(raw, img_path=['b/0.jpg', 'b/1.jpg']))['data_samples']
    assert listed.img_path == ['b/0.jpg', 'b/1.jpg']  # the listed key wins
    mismatched = PackJpegBytes(keys=['img'], meta_keys=())(dict(raw, filename=['x.jpg']))
    assert 'img_path' not in mismatched['data_samples'].metainfo  # not the images' files


def test_pack_single_view_and_bytes_like_inputs():
    jpeg = make_sample(0, single=True)['img_bytes']
    for buf in (jpeg, bytearray(jpeg), memoryview(jpeg), np.frombuffer(jpeg, np.uint8),
                torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)):
        packed = pack_jpeg_bytes(buf, np.eye(3), (4, 5))
        assert packed['img_bytes'].tobytes() == jpeg and packed['img_bytes'].flags.writeable
        assert packed['img_bytes_offsets'].tolist() == [0, len(jpeg)]
        assert packed['img_warp'].shape == (3, 3) and packed['img_warp'].dtype == np.float32
        assert packed['img_warp_size'].tolist() == [4, 5]


def test_pack_without_bytes_is_pack3ddetinputs():
    img = np.random.default_rng(0).integers(0, 256, (3, 16, 20, 3), dtype=np.uint8)
    results = dict(img=list(img), img_shape=(16, 20), sample_idx=4)
    ours = PackJpegBytes(keys=['img'])(dict(results))
    stock = Pack3DDetInputs(keys=['img'])(dict(results))
    assert torch.equal(ours['inputs']['img'], stock['inputs']['img'])
    assert ours['data_samples'].metainfo == stock['data_samples'].metainfo


@pytest.mark.parametrize('change, error, match', [
    (dict(img_bytes=[b'not a jpeg']), ValueError, 'not a JPEG stream'),
    (dict(img_warp=np.stack([np.eye(3, dtype=np.float32)] * 2)), ValueError, 'img_warp has shape'),
    (dict(img_warp_size=(0, 4)), ValueError, 'img_warp_size must be'),
    (dict(img_bytes=[np.zeros((2, 8), np.uint8)]), TypeError, 'expected bytes or a 1-D'),
    (dict(img=np.zeros((4, 4, 3), np.uint8)), ValueError, 'both decoded images'),
])
def test_pack_errors(change, error, match):
    raw = {**make_sample(0, views=1), **change}
    with pytest.raises(error, match=match):
        PackJpegBytes(keys=['img'])(raw)
    missing = make_sample(0, views=1)
    del missing['img_warp_size']
    with pytest.raises(KeyError, match="lacks \\['img_warp_size'\\]"):
        PackJpegBytes(keys=['img'])(missing)


def exact_bilinear(img, warp, out_hw):
    """Bilinear sampling in float64 at the warped pixel centres, zeros outside: the exact
    value that cv2.warpAffine approximates with 1/32-pixel coordinates and 15-bit weights."""
    h, w = out_hw
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    m = warp.astype(np.float64)
    sx, sy = m[0, 0] * xs + m[0, 1] * ys + m[0, 2], m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = sx - x0, sy - y0
    out = np.zeros((h, w, img.shape[2]))
    for dy in (0, 1):
        for dx in (0, 1):
            xx, yy = x0 + dx, y0 + dy
            weight = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
            inside = (xx >= 0) & (xx < img.shape[1]) & (yy >= 0) & (yy < img.shape[0])
            tap = np.zeros_like(out)
            tap[inside] = img[yy[inside], xx[inside]]
            out += weight[..., None] * tap
    return out


def test_warp_matrix_to_grid_sample_matches_warpaffine():
    """The device warp (affine_grid + grid_sample, align_corners=True), run here on the CPU:
    within rounding of exact bilinear sampling, and close to cv2.warpAffine, whose 1/32-pixel
    coordinate grid moves values by up to a few levels on sharp edges."""
    src_hw, out_hw = (90, 140), (48, 80)
    img = textured(*src_hw, 5)
    warps = [augment_warp(src_hw, out_hw, 0.55, (3.3, 7.9), flip, angle)
             for flip, angle in [(False, 0.0), (True, 0.0), (False, 4.7), (True, -5.4)]]
    warps.append(np.array([[1.7, 0.2, -8.5], [-0.1, 1.9, -6.0], [0, 0, 1]], np.float32))
    rgb = torch.from_numpy(img[..., ::-1].copy()).permute(2, 0, 1)
    outs = dd._warp_on_device([rgb] * len(warps), warps, [out_hw] * len(warps), rgb=True)
    for warp, out in zip(warps, outs):
        ref = cv2.warpAffine(img, warp[:2].astype(np.float64), out_hw[::-1],
                             flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        got = out.permute(1, 2, 0).numpy().astype(np.float64)
        assert out.dtype == torch.uint8 and out.shape == (3, *out_hw)
        assert np.abs(got - exact_bilinear(img, warp, out_hw)).max() <= 0.5 + 1e-3
        diff = np.abs(got - ref)
        assert diff.mean() < 0.3 and diff.max() <= 6, (diff.mean(), diff.max())


def test_deferred_decode_cv2_fallback_matches_direct_decode():
    raws = [make_sample(0), make_sample(1)]
    batch = packed_batch(raws)
    batch['data_samples'] = samples(2)
    pre = TurboxDet3DDataPreprocessor()  # no normalisation: the output is the decoded pixels
    with pytest.warns(UserWarning, match='no GPU JPEG decoder') as record:
        out = pre(batch)
        pre(packed_batch(raws))
    assert len([w for w in record if 'JPEG' in str(w.message)]) == 1  # warned once
    expected = torch.stack([reference_decode(r) for r in raws]).float()
    assert out['inputs']['imgs'].shape == (2, 3, 3, 40, 64)
    assert torch.equal(out['inputs']['imgs'], expected)
    assert pre.decode_counts['cv2'] == 12 and pre.last_decode_backend == 'cv2'
    assert out['data_samples'][0].batch_input_shape == (40, 64)
    assert set(out['inputs']) == {'imgs'}


def test_deferred_decode_then_the_uint8_path():
    """Decoded batches go through normalisation, padding and photometric as uint8 inputs do."""
    raws = [make_sample(2), make_sample(3)]
    cfg = dict(mean=MEAN, std=STD, bgr_to_rgb=True, pad_size_divisor=32,
               photometric=dict(seed=1, prob=1.0))
    deferred = TurboxDet3DDataPreprocessor(decode_backend='cv2', **cfg)
    decoded = TurboxDet3DDataPreprocessor(**cfg)
    got = deferred(packed_batch(raws), True)['inputs']['imgs']
    want = run(decoded, [reference_decode(r) for r in raws], training=True)['inputs']['imgs']
    assert got.shape == (2, 3, 3, 64, 64)
    assert_close(got, want, rtol=0, atol=1e-5)


def test_deferred_single_view_and_mixed_output_sizes():
    raws = [make_sample(4, single=True), make_sample(5, single=True, out_hw=(36, 60))]
    pre = TurboxDet3DDataPreprocessor(decode_backend='cv2', pad_size_divisor=4)
    out = pre(packed_batch(raws))['inputs']['imgs']
    assert out.shape == (2, 3, 40, 64)
    assert torch.equal(out[0], reference_decode(raws[0]).float())
    assert torch.equal(out[1, :, :36, :60], reference_decode(raws[1]).float())
    assert (out[1, :, 36:] == 0).all()


def cv2_rgb_decode(stream):
    return cv2.cvtColor(cv2.imdecode(np.asarray(stream), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


class FakeNvimgcodec:
    """Stands in for nvidia.nvimgcodec: HWC RGB arrays, exported through DLPack as its
    images are."""

    class Decoder:

        def __init__(self, device_id):
            self.device_id = device_id

        def decode(self, streams, cuda_stream=0):
            return [cv2_rgb_decode(s) for s in streams]


@pytest.mark.parametrize('backend', ['torchvision', 'nvimgcodec'])
def test_gpu_decode_path_with_stand_in_decoders(monkeypatch, backend):
    """The GPU path minus CUDA streams: what the decoders return (RGB, CHW tensors or HWC
    DLPack images) is warped, turned to BGR, stacked per sample and counted."""
    monkeypatch.setattr(dd, '_torchvision_decoder', lambda: lambda tensors, device: [
        torch.from_numpy(cv2_rgb_decode(t.numpy())).permute(2, 0, 1) for t in tensors])
    monkeypatch.setattr(dd, '_nvimgcodec_module', lambda: FakeNvimgcodec)
    raws = [make_sample(7, views=4), make_sample(8, views=4, out_hw=(36, 60))]
    pre = TurboxDet3DDataPreprocessor(decode_backend=backend)
    pre._backend = backend  # as resolved on a CUDA device
    out = pre(packed_batch(raws))['inputs']['imgs']
    assert out.shape == (2, 4, 3, 40, 64)
    assert pre.decode_counts == {backend: 8} and pre.last_decode_backend == backend
    for b, raw in enumerate(raws):
        ref = reference_decode(raw).float()
        got = out[b, :, :, :ref.shape[-2], :ref.shape[-1]]
        assert (got - ref).abs().mean() < 0.3 and (got - ref).abs().max() <= 6


def test_deferred_decode_errors():
    raws = [make_sample(0)]
    batch = packed_batch(raws)
    pre = TurboxDet3DDataPreprocessor(decode_backend='cv2')
    with pytest.raises(KeyError, match='lacks'):
        pre(dict(inputs={k: v for k, v in batch['inputs'].items() if k != 'img_warp'}))
    with pytest.raises(ValueError, match='both decoded images'):
        pre(dict(inputs=dict(batch['inputs'], img=[rand_uint8(3, 3, 8, 8)])))
    bad = dict(batch['inputs'], img_bytes_offsets=[np.array([0, 5, 3, 9])])
    with pytest.raises(ValueError, match='do not split'):
        pre(dict(inputs=bad))
    persp = np.asarray(batch['inputs']['img_warp'][0]).copy()
    persp[0, 2] = [0.001, 0, 1]
    with pytest.raises(ValueError, match='non-affine'):
        pre(dict(inputs=dict(batch['inputs'], img_warp=[persp])))
    mixed = packed_batch([make_sample(0), make_sample(1, single=True)])
    with pytest.raises(ValueError, match='mixes single-view'):
        pre(mixed)
    with pytest.raises(ValueError, match='decode_backend must be one of'):
        TurboxDet3DDataPreprocessor(decode_backend='pil')


def test_explicit_gpu_backend_without_cuda_raises(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip('checks the error where no GPU decoder can run')
    for backend in ('torchvision', 'nvimgcodec'):
        pre = TurboxDet3DDataPreprocessor(decode_backend=backend)
        with pytest.raises(RuntimeError, match=f'decode_backend={backend!r} needs a CUDA'):
            pre(packed_batch([make_sample(0)]))
    monkeypatch.setenv(gip.DECODE_BACKEND_ENV, 'cv2')
    pre = TurboxDet3DDataPreprocessor(decode_backend='torchvision')
    pre(packed_batch([make_sample(0)]))  # the environment variable wins
    assert pre.last_decode_backend == 'cv2'


def test_a_failing_gpu_decoder_falls_back_for_that_batch_only(monkeypatch):
    raws = [make_sample(6)]
    batch = packed_batch([dict(raws[0], img_path=[f'cam{i}.jpg' for i in range(3)])])
    pre = TurboxDet3DDataPreprocessor()
    pre._backend = 'torchvision'  # as if a GPU decoder had been found
    fail = {'now': True}

    def flaky(backend, streams, *args):
        if fail['now']:
            raise RuntimeError('nvjpeg says no')
        return [img for img in dd._decode_warp_cv2(streams, *args)]

    monkeypatch.setattr(pre, '_decode_gpu', flaky)
    with pytest.warns(UserWarning, match=r'torchvision GPU decoder failed \(RuntimeError: '
                      r'nvjpeg says no\) on a batch of 3 images \(cam0.jpg, cam1.jpg, '
                      r'cam2.jpg\); 1 failed batch so far; this batch: trying cv2'):
        out = pre(batch)['inputs']['imgs']
    assert torch.equal(out[0], reference_decode(raws[0]).float())
    assert pre.decode_counts == {'cv2': 3} and pre.decode_fallbacks == {'torchvision': 1}
    fail['now'] = False  # the next batch tries the GPU decoder again
    pre(batch)
    assert pre.decode_counts == {'cv2': 3, 'torchvision': 3}
    assert pre.last_decode_backend == 'torchvision'
    strict = TurboxDet3DDataPreprocessor(decode_backend='torchvision')
    strict._backend = 'torchvision'
    fail['now'] = True
    monkeypatch.setattr(strict, '_decode_gpu', flaky)
    with pytest.raises(RuntimeError, match='nvjpeg says no'):
        strict(batch)


def test_a_gpu_decoder_failing_every_batch_is_given_up_with_a_warning(monkeypatch):
    pre = TurboxDet3DDataPreprocessor()
    pre._backend = 'torchvision'

    def broken(*args):
        raise RuntimeError('engine gone')

    monkeypatch.setattr(pre, '_decode_gpu', broken)
    batch = packed_batch([make_sample(3)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        for _ in range(gip.MAX_FAILED_BATCHES_IN_A_ROW + 2):
            pre(batch)
    messages = [str(w.message) for w in caught if 'GPU decoder failed' in str(w.message)]
    # warned at failed batches 1, 2, 4, then the give-up at 8; none after it
    assert [m.split('; ')[1] for m in messages] == [
        '1 failed batch so far', '2 failed batches so far', '4 failed batches so far',
        '8 failed batches so far, 8 in a row: decoding with cv2 for the rest of the run.']
    assert 'image 0 of sample 0' in messages[0]  # no img_path: the position
    assert pre.decode_fallbacks == {'torchvision': 8} and pre._backend == 'cv2'
    assert pre.decode_counts == {'cv2': 3 * (gip.MAX_FAILED_BATCHES_IN_A_ROW + 2)}


def test_an_undecodable_image_names_its_file(monkeypatch):
    raw = make_sample(2)
    raw['img_bytes'][1] = raw['img_bytes'][1][:2] + b'\x00' * 40  # a SOI marker, then junk
    batch = packed_batch([dict(raw, img_path=['a.jpg', 'b.jpg', 'c.jpg'])])
    pre = TurboxDet3DDataPreprocessor(decode_backend='cv2')
    with pytest.raises(ValueError, match=r'b.jpg is not a decodable JPEG \(42 bytes\)'):
        pre(batch)


def test_auto_tries_the_next_gpu_decoder_before_opencv(monkeypatch):
    """'auto' on a CUDA device: nvImageCodec first; when it fails, torchvision takes over
    (with a warning) and OpenCV is not used."""
    monkeypatch.setattr(dd, '_torchvision_decoder', lambda: lambda tensors, device: [
        torch.from_numpy(cv2_rgb_decode(t.numpy())).permute(2, 0, 1) for t in tensors])
    monkeypatch.setattr(dd, '_nvimgcodec_module', lambda: FakeNvimgcodec)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    pre = TurboxDet3DDataPreprocessor()
    monkeypatch.setattr(type(pre), 'device', property(lambda self: torch.device('cuda')))
    assert pre._resolve_backend() == 'nvimgcodec' and pre._fallbacks == ['torchvision']
    monkeypatch.setattr(type(pre), 'device', property(lambda self: torch.device('cpu')))
    real = pre._decode_gpu

    def nvimgcodec_breaks(backend, *args):
        if backend == 'nvimgcodec':
            raise RuntimeError('engine busy')
        return real(backend, *args)

    monkeypatch.setattr(pre, '_decode_gpu', nvimgcodec_breaks)
    raws = [make_sample(5)]
    with pytest.warns(UserWarning, match='nvimgcodec GPU decoder failed.*trying '
                      'torchvision, then cv2'):
        pre(packed_batch(raws))
    pre(packed_batch(raws))
    assert pre.decode_counts == {'torchvision': 6} and pre.last_decode_backend == 'torchvision'


def test_nvimgcodec_decoder_asks_for_the_hardware_engine_first(monkeypatch):
    calls = []

    class Module:
        class BackendKind:
            HW_GPU_ONLY, HYBRID_CPU_GPU, CPU_ONLY = 'hw', 'hybrid', 'cpu'

        Backend = staticmethod(lambda kind: f'backend:{kind}')

        class Decoder:
            def __init__(self, device_id, backends=None):
                calls.append((device_id, backends))
                if backends and 'refuse' in calls[0][1][0]:
                    raise RuntimeError('no such backend')

    dd._nvimgcodec_decoder(Module, 3)
    assert calls == [(3, ['backend:hw', 'backend:hybrid', 'backend:cpu'])]
    calls.clear()
    Module.Backend = staticmethod(lambda kind: f'refuse:{kind}')
    with pytest.warns(UserWarning, match='refused the backends'):
        dd._nvimgcodec_decoder(Module, 0)
    assert calls[-1] == (0, None)  # the library's default decoder
    assert dd._nvimgcodec_decoder(FakeNvimgcodec, 1).device_id == 1  # no BackendKind


def test_one_value_mean_and_std_broadcast_over_three_channels():
    """mmengine allows one mean/std value for every channel; the fused op gets three."""
    imgs = [rand_uint8(2, 3, 8, 12), rand_uint8(2, 3, 8, 12)]
    pre = TurboxDet3DDataPreprocessor(mean=[127.5], std=[50.0])
    out = pre(dict(inputs=dict(img=imgs)))['inputs']['imgs']
    torch.testing.assert_close(out, (torch.stack(imgs).float() - 127.5) / 50.0, rtol=0,
                               atol=0)


# -- deferred decode against the CPU transforms ----------------------------------------------
#
# The deferred path (LoadMultiViewImagesTurbo(decode_on='gpu') + MultiViewAffineAug's
# matrices + PackJpegBytes + the preprocessor) must make the images of the CPU path
# (LoadMultiViewImagesTurbo + MultiViewAffineAug, scaled_decode=False): the same block average
# where the warp shrinks by 2 or more (Sparse4D: about 2.2) and the same black corners where
# the rotation turns the crop. Measured on 1600x900 textured JPEGs to 256x704, 3 cameras:
# the OpenCV fallback is exact (0 levels everywhere); grid_sample instead of cv2.warpAffine
# (the device path, run on the CPU with a stand-in decoder) differs by mean 0.05-0.06 grey
# levels, 99th percentile 1, 99.9th 2, max 4, and zeroes exactly the same pixels.
GRID_SAMPLE_TOL = dict(mean=0.2, p99=1, max=8)
CAMS = 3
PIPELINE_CONFIGS = {
    # Sparse4D v3's draws: resize 0.40-0.47 (a 2.1-2.5x shrink), rotation within 5.4 degrees.
    'sparse4d a': image_pipeline.sparse4d_aug_config(np.random.default_rng(11)),
    'sparse4d b': image_pipeline.sparse4d_aug_config(np.random.default_rng(12)),
    'no rotation, flip': dict(resize=0.44, crop=(30, 140, 734, 396), flip=True, rotate=0.0),
    '4x shrink, rotation': dict(resize=0.24, crop=(20, 15, 340, 195), flip=True, rotate=-4.0),
    'no shrink, big rotation': dict(resize=0.6, crop=(100, 200, 540, 480), rotate=25.0),
}


def write_jpegs(dirname, chroma='420'):
    """Textured 1600x900 camera JPEGs (quality 90) with the given chroma subsampling."""
    sampling = {'420': cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420,
                '444': cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444}[chroma]
    paths = []
    for k in range(CAMS):
        path = str(dirname / f'cam{k}_{chroma}.jpg')
        ok, buf = cv2.imencode('.jpg', image_pipeline.textured_image(k),
                               [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                                sampling])
        assert ok
        buf.tofile(path)
        paths.append(path)
    return paths


@pytest.fixture(scope='module')
def camera_jpegs(tmp_path_factory):
    return write_jpegs(tmp_path_factory.mktemp('cams'))


def cpu_pipeline(paths, config):
    """The CPU turbox images: uint8 BGR [N, H, W, 3]."""
    results = image_pipeline.camera_results(paths, config)
    results = MultiViewAffineAug()(LoadMultiViewImagesTurbo(num_views=len(paths))(results))
    return np.stack(results['img'])


def deferred_results(paths, config):
    results = image_pipeline.camera_results(paths, config)
    return MultiViewAffineAug()(LoadMultiViewImagesTurbo(num_views=len(paths),
                                                         decode_on='gpu')(results))


def deferred_batch(paths, config, with_box=True):
    """The packed, collated batch of one deferred sample."""
    results = deferred_results(paths, config)
    if not with_box:
        del results['img_valid_box']
    return pseudo_collate([PackJpegBytes(keys=['img'])(results)])


def decode_hwc(pre, batch):
    """The preprocessor's decoded images of the batch's first sample: [N, H, W, 3] float."""
    return pre(batch)['inputs']['imgs'][0].permute(0, 2, 3, 1).cpu().numpy()


def cpu_masks(config, paths):
    """The CPU transform's rotation mask (True: kept), per camera, or None."""
    h, w = source_warp(config, 900, 1600)[1]
    mask = rotation_mask(config, (h, w))
    return None if mask is None else np.stack([mask.astype(bool)] * len(paths))


def use_stand_in_torchvision(monkeypatch, pre):
    """Run the device path (block average, grid_sample, mask) on the CPU: the torchvision
    decoder is replaced by OpenCV's (RGB, CHW), the backend forced as on a CUDA device."""
    monkeypatch.setattr(dd, '_torchvision_decoder', lambda: lambda tensors, device: [
        torch.from_numpy(cv2_rgb_decode(t.numpy())).permute(2, 0, 1) for t in tensors])
    pre._backend = 'torchvision'
    return pre


def assert_within_grid_sample_tol(got, want):
    diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    stats = (diff.mean(), np.percentile(diff, 99), diff.max())
    assert stats[0] < GRID_SAMPLE_TOL['mean'], stats
    assert stats[1] <= GRID_SAMPLE_TOL['p99'], stats
    assert stats[2] <= GRID_SAMPLE_TOL['max'], stats


def test_pack_valid_box():
    raw = make_sample(0)
    boxes = np.array([[0.5, 1.5, 100.0, 60.0]] * 3, np.float64)
    inputs = packed_batch([dict(raw, img_valid_box=boxes)])['inputs']
    assert set(inputs) == set(gip.DEFERRED_KEYS) | set(gip.OPTIONAL_DEFERRED_KEYS)
    assert inputs['img_valid_box'][0].dtype == np.float32
    np.testing.assert_array_equal(inputs['img_valid_box'][0], boxes.astype(np.float32))
    single = pack_jpeg_bytes(raw['img_bytes'][0], np.eye(3), (4, 5), (0, 0, 9, 7))
    assert single['img_valid_box'].tolist() == [0, 0, 9, 7]
    assert 'img_valid_box' not in pack_jpeg_bytes(raw['img_bytes'][0], np.eye(3), (4, 5))
    with pytest.raises(ValueError, match='img_valid_box has shape'):
        PackJpegBytes(keys=['img'])(dict(raw, img_valid_box=boxes[:2]))
    with pytest.raises(ValueError, match='x0 < x1'):
        pack_jpeg_bytes(raw['img_bytes'], raw['img_warp'], (40, 64), boxes[:, [2, 1, 0, 3]])


def test_deferred_decode_rejects_bad_boxes():
    batch = packed_batch([dict(make_sample(0), img_valid_box=np.ones((3, 4)) * [0, 0, 9, 9])])
    bad = dict(batch['inputs'], img_valid_box=[np.ones((2, 4)) * [0, 0, 9, 9]])
    with pytest.raises(ValueError, match='img_valid_box'):
        TurboxDet3DDataPreprocessor(decode_backend='cv2')(dict(inputs=bad))


@pytest.mark.parametrize('size', [(90, 160), (91, 163), (45, 81)])
def test_block_average_tensor_equals_the_cpu_block_average(size):
    """Same geometry (edge-completed last blocks) and same rounding as OpenCV's INTER_AREA
    (half up for 2x2, half to even for 4x4 and 8x8), to the level."""
    img = np.random.default_rng(size[1]).integers(0, 256, (*size, 3), dtype=np.uint8)
    img[:8, :8] = (10 + np.arange(8) % 2)[:, None]  # every block's mean is 10.5
    batch = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    for factor in (2, 4, 8):
        got = gip.block_average_tensor(batch.clone(), factor)[0].permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(got, block_average(img, factor), err_msg=str(factor))


def test_block_factor_thresholds():
    def shrink(s, angle=0.0):
        c, n = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
        return np.array([[s * c, -s * n, 3.0], [s * n, s * c, 1.0], [0, 0, 1]])
    assert [block_factor(shrink(s)) for s in (1.0, 1.99, 2.0, 2.2, 3.9, 4.0, 7.9, 8.0, 20)] \
        == [1, 1, 2, 2, 2, 4, 4, 8, 8]
    assert block_factor(shrink(2.2, 5.0) @ np.diag([-1.0, 1, 1])) == 2  # flip, rotation
    assert block_factor(shrink(2.2), decode_factor=2) == 1
    many = np.stack([shrink(s, 7.0 * s) for s in (1.9, 2.0, 3.9, 4.0, 8.5)])
    assert block_factors(many).tolist() == [1, 2, 2, 4, 8]
    assert block_factors(many, decode_factor=2).tolist() == [1, 1, 1, 2, 4]
    assert block_factors(many[:, :2]).tolist() == [1, 2, 2, 4, 8]  # [K, 2, 3] too
    assert block_factor(shrink(4.5)[:2]) == 4
    with pytest.raises(ValueError, match=r'warps must be \[K, 3, 3\] or \[K, 2, 3\]'):
        block_factors(np.zeros((6, 3)))
    with pytest.raises(ValueError, match='valid_box_matrices: expected warps'):
        gip.valid_box_matrices(np.zeros((3, 2, 3)), np.zeros((2, 4)), (8, 8))


def test_valid_box_matrices_of_a_batch():
    """The batched box matrices (one numpy pass per decoded batch) flag exactly the rotated
    images, and their masks are OpenCV's."""
    rng = np.random.default_rng(3)
    configs = [image_pipeline.sparse4d_aug_config(rng) for _ in range(6)]
    configs += [dict(configs[0], flip=True, rotate=0.0), dict(configs[1], rotate=-33.3)]
    warps, boxes, wants = [], [], []
    for config in configs:
        warp, out_hw = source_warp(config, 900, 1600)
        warps.append(warp)
        boxes.append(crop_box(config, 900, 1600))
        wants.append(rotation_mask(config, out_hw))
    matrices, masked = gip.valid_box_matrices(np.stack(warps), np.stack(boxes), out_hw)
    assert masked.tolist() == [w is not None for w in wants]
    for matrix, flag, want in zip(matrices, masked, wants):
        if flag:
            np.testing.assert_array_equal(gip._valid_mask_cv2(matrix, out_hw), want)


@pytest.mark.parametrize('seed', range(6))
def test_valid_box_mask_is_the_cpu_rotation_mask(seed):
    """From a warp and box alone, the device mask (OpenCV's fixed-point rounding replayed in
    float64) and the OpenCV one zero exactly the pixels that MultiViewAffineAug's
    rotation_mask zeroes. With the float32 warp and box that travel, a pixel whose centre
    lies within about 1e-4 pixel of the crop's edge may round the other way: measured 1
    pixel in 400 Sparse4D images (the plain float comparison of the box test: 199)."""
    rng = np.random.default_rng(seed)
    configs = [image_pipeline.sparse4d_aug_config(rng) for _ in range(8)]
    configs += [dict(resize=0.5, crop=(10, 20, 410, 245), flip=flip, rotate=angle)
                for flip in (False, True) for angle in (0.0, 90.0, 180.0, -33.3)]
    edge_pixels = 0
    for config in configs:
        warp, out_hw = source_warp(config, 900, 1600)
        box = crop_box(config, 900, 1600)
        want = rotation_mask(config, out_hw)
        want = np.ones(out_hw, bool) if want is None else want.astype(bool)
        matrix = gip.valid_box_matrix(warp, box, out_hw)
        if matrix is None:  # every sample kept: no rotation, or 180 degrees
            assert want.all(), config
            assert gip.valid_box_matrix(warp.astype(np.float32), box.astype(np.float32),
                                        out_hw) is None
            continue
        assert not want.all(), config
        got = gip.valid_mask(matrix[None], out_hw, 'cpu')[0].numpy()
        np.testing.assert_array_equal(got, want, err_msg=str(config))
        np.testing.assert_array_equal(gip._valid_mask_cv2(matrix, out_hw), want)
        # What the deferred keys carry.
        matrix = gip.valid_box_matrix(warp.astype(np.float32), box.astype(np.float32), out_hw)
        got = gip.valid_mask(matrix[None], out_hw, 'cpu')[0].numpy()
        np.testing.assert_array_equal(got, gip._valid_mask_cv2(matrix, out_hw))
        edge_pixels += int((got != want).sum())
    assert edge_pixels <= 1


@pytest.mark.parametrize('name', sorted(PIPELINE_CONFIGS))
def test_deferred_cv2_fallback_equals_the_cpu_pipeline(camera_jpegs, name):
    """Exact: the fallback makes the CPU transform's operations on libjpeg-turbo's pixels."""
    config = PIPELINE_CONFIGS[name]
    want = cpu_pipeline(camera_jpegs, config)
    batch = deferred_batch(camera_jpegs, config)
    warp = batch['inputs']['img_warp'][0][0]
    assert block_factor(warp) == (4 if '4x' in name else 1 if 'no shrink' in name else 2)
    got = decode_hwc(TurboxDet3DDataPreprocessor(decode_backend='cv2'), batch)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    masks = cpu_masks(config, camera_jpegs)
    if masks is not None:  # black corners, and without the box the corners show the source
        assert (~masks).sum() > 100 and (got[~masks] == 0).all()
        plain = decode_hwc(TurboxDet3DDataPreprocessor(decode_backend='cv2'),
                           deferred_batch(camera_jpegs, config, with_box=False))
        assert (plain[~masks] > 0).any(-1).sum() > 100
        np.testing.assert_array_equal(plain[masks], got[masks])


@pytest.mark.parametrize('name', sorted(PIPELINE_CONFIGS))
def test_deferred_grid_sample_path_matches_the_cpu_pipeline(camera_jpegs, name, monkeypatch):
    """The device path's arithmetic (block average, affine_grid + grid_sample, mask) with
    OpenCV's decoded pixels: within interpolation rounding, the same black corners."""
    config = PIPELINE_CONFIGS[name]
    want = cpu_pipeline(camera_jpegs, config)
    pre = use_stand_in_torchvision(monkeypatch, TurboxDet3DDataPreprocessor())
    got = decode_hwc(pre, deferred_batch(camera_jpegs, config))
    assert pre.last_decode_backend == 'torchvision' and got.shape == want.shape
    assert_within_grid_sample_tol(got, want)
    masks = cpu_masks(config, camera_jpegs)
    if masks is not None:
        assert (got[~masks] == 0).all()


def test_deferred_single_view_with_valid_box(camera_jpegs, monkeypatch):
    """A single-view sample ([3, 3] warp, [4] box) is masked as a camera of a multi-view
    one, on both paths."""
    config = PIPELINE_CONFIGS['sparse4d a']
    results = deferred_results(camera_jpegs, config)
    single = dict(img_bytes=results['img_bytes'][0], img_warp=results['img_warp'][0],
                  img_warp_size=results['img_warp_size'],
                  img_valid_box=results['img_valid_box'][0])
    batch = pseudo_collate([PackJpegBytes(keys=['img'])(single)])
    want = cpu_pipeline(camera_jpegs, config)[0]
    out = TurboxDet3DDataPreprocessor(decode_backend='cv2')(batch)['inputs']['imgs'][0]
    np.testing.assert_array_equal(out.permute(1, 2, 0).numpy(), want)
    pre = use_stand_in_torchvision(monkeypatch, TurboxDet3DDataPreprocessor())
    batch = pseudo_collate([PackJpegBytes(keys=['img'])(single)])
    out = pre(batch)['inputs']['imgs'][0].permute(1, 2, 0).numpy()
    assert_within_grid_sample_tol(out, want)
    assert (out[~cpu_masks(config, camera_jpegs)[0]] == 0).all()


def test_micro_benchmark_quick_on_cpu():
    rows = bench.benchmark('cpu', quick=True)
    assert [r['case'].split(' ')[0] for r in rows] == ['H2D', 'decode', 'photometric']
    assert all(r['stock']['iters'] > 0 and r['turbox']['iters'] > 0 for r in rows)
    assert 'max|stock-turbox|=0.0e+00' in rows[0]['note']
    assert 'decoded by cv2' in rows[1]['note'] and 'max|d|=0 levels' in rows[1]['note']


# -- CUDA ------------------------------------------------------------------------------------

def cuda_pre(**cfg):
    return TurboxDet3DDataPreprocessor(**cfg).cuda()


@needs_cuda
def test_cuda_normalise_matches_cpu():
    imgs = [rand_uint8(6, 3, 30, 44, seed=s) for s in range(3)]
    cfg = dict(mean=MEAN, std=STD, bgr_to_rgb=True, pad_size_divisor=32)
    cpu = run(TurboxDet3DDataPreprocessor(**cfg), imgs)['inputs']['imgs']
    gpu = run(cuda_pre(**cfg), imgs)['inputs']['imgs']
    assert gpu.is_cuda
    assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-5)


@needs_cuda
def test_cuda_photometric_matches_cpu():
    names = sorted(DRAW_CASES)
    imgs = [textured(24, 32, s) for s in range(len(names))]
    draws = [DRAW_CASES[n] for n in names]
    params = gip.PhotometricParams.from_draws(
        *[np.array([d[k] for d in draws]) for k in range(10)], np.array([d[10] for d in draws]))
    batch = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()
    cpu = gip.apply_photometric(batch.clone(), params)
    gpu = gip.apply_photometric(batch.cuda(), params.to('cuda'), params.active())
    assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-3)
    pre = cuda_pre(mean=MEAN, std=STD, bgr_to_rgb=True, photometric=dict(prob=1.0, seed=3))
    tensors = [torch.from_numpy(i).permute(2, 0, 1)[None] for i in imgs[:2]]
    out = run(pre, tensors, training=True)['inputs']['imgs']
    params = gip.PhotometricParams.sample(2, torch.Generator().manual_seed(3), prob=1.0)
    assert_close(out.cpu(), expected_with_params(tensors, params), rtol=0, atol=1e-3)


def _gpu_decode_vs_cpu(backend, stream=None, chroma='444', max_mean=1.0):
    raws = [make_sample(s, views=6, src_hw=(450, 800), out_hw=(128, 352), chroma=chroma)
            for s in range(2)]
    pre = cuda_pre(decode_backend=backend)
    with torch.cuda.stream(stream) if stream is not None else torch.cuda.stream(
            torch.cuda.current_stream()):
        gpu = pre(packed_batch(raws))['inputs']['imgs']
    torch.cuda.synchronize()
    assert pre.decode_counts[backend] == 12 and pre.last_decode_backend == backend
    assert gpu.is_cuda and gpu.shape == (2, 6, 3, 128, 352)
    cpu = torch.stack([reference_decode(r) for r in raws]).float()
    diff = (gpu.cpu() - cpu).abs()
    # With 4:4:4 chroma nvJPEG and libjpeg-turbo decode to identical pixels (measured on the
    # H100 machine), so what remains is the warp's rounding. With 4:2:0 (what nuScenes and
    # cv2's default use) they upsample chroma differently: 2-3.5 grey levels on average,
    # up to 20-40 on sharp colour edges.
    assert diff.mean() < max_mean, diff.mean()
    return pre


@needs_cuda
def test_cuda_deferred_decode_torchvision_matches_cv2():
    pytest.importorskip('torchvision')
    pre = _gpu_decode_vs_cpu('torchvision')
    _gpu_decode_vs_cpu('torchvision', stream=torch.cuda.Stream())
    _gpu_decode_vs_cpu('torchvision', chroma='420', max_mean=5.0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter('always')
        auto = cuda_pre()  # 'auto' finds the GPU decoder: no fallback, no warning
        auto(packed_batch([make_sample(0)]))
    assert not [w for w in record if 'OpenCV' in str(w.message)]
    first = 'nvimgcodec' if dd._nvimgcodec_module() is not None else 'torchvision'
    assert auto.last_decode_backend == first and pre.decode_counts['cv2'] == 0


@needs_cuda
def test_cuda_deferred_decode_nvimgcodec_matches_cv2():
    pytest.importorskip('nvidia.nvimgcodec')
    _gpu_decode_vs_cpu('nvimgcodec')


@needs_cuda
def test_cuda_micro_benchmark_quick():
    rows = bench.benchmark('cuda', quick=True)
    assert rows[0]['turbox'] is not None and 'max|stock-turbox|' in rows[0]['note']
    decode = [r for r in rows if r['case'].startswith('decode')]
    assert any(r['turbox'] is not None for r in decode), [r['note'] for r in decode]


@needs_cuda
def test_cuda_deferred_pipeline_torchvision_matches_cv2_fallback(tmp_path):
    """The whole deferred path on the device (nvJPEG, block average, grid_sample, valid-box
    mask) against the OpenCV fallback, which equals the CPU pipeline. nvJPEG and
    libjpeg-turbo decode 4:4:4 JPEGs to the same pixels, so what remains is grid_sample's
    rounding (GRID_SAMPLE_TOL as measured on the CPU; p99 allowed 2 and mean 0.25 for the
    CUDA kernels), with the same black corners."""
    pytest.importorskip('torchvision')
    paths = write_jpegs(tmp_path, chroma='444')
    pre = cuda_pre(decode_backend='torchvision')
    fallback = TurboxDet3DDataPreprocessor(decode_backend='cv2')
    for name in sorted(PIPELINE_CONFIGS):
        config = PIPELINE_CONFIGS[name]
        got = decode_hwc(pre, deferred_batch(paths, config))
        want = decode_hwc(fallback, deferred_batch(paths, config))
        assert got.shape == want.shape == (CAMS, *source_warp(config, 900, 1600)[1], 3)
        diff = np.abs(got.astype(np.float64) - want)
        stats = (name, diff.mean(), np.percentile(diff, 99), diff.max())
        assert stats[1] < 0.25 and stats[2] <= 2 and stats[3] <= GRID_SAMPLE_TOL['max'], stats
        masks = cpu_masks(config, paths)
        if masks is not None:
            assert (got[~masks] == 0).all() and (want[~masks] == 0).all(), name
    assert pre.decode_counts == {'torchvision': CAMS * len(PIPELINE_CONFIGS)}


def test_out_of_memory_in_the_gpu_decoder_is_raised_not_fallen_back_from(monkeypatch):
    pre = TurboxDet3DDataPreprocessor()
    pre._backend = 'torchvision'

    def oom(*args):
        raise torch.cuda.OutOfMemoryError('CUDA out of memory')

    monkeypatch.setattr(pre, '_decode_gpu', oom)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        pre(packed_batch([make_sample(1)]))
    assert pre.decode_fallbacks == {} and pre.decode_counts == {}


def test_an_image_no_decoder_reads_carries_the_gpu_error_along(monkeypatch):
    raw = make_sample(2)
    raw['img_bytes'][0] = raw['img_bytes'][0][:2] + b'\x00' * 40
    pre = TurboxDet3DDataPreprocessor()
    pre._backend = 'torchvision'

    def broken(*args):
        raise RuntimeError('nvjpeg: bad stream')

    monkeypatch.setattr(pre, '_decode_gpu', broken)
    with pytest.warns(UserWarning, match='GPU decoder failed'):
        with pytest.raises(ValueError, match='is not a decodable JPEG') as info:
            pre(packed_batch([raw]))
    assert 'nvjpeg: bad stream' in str(info.value.__cause__)
