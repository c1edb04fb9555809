"""turbox_mm.ops.image_warp: the Triton warp kernel against its PyTorch reference.

On the CPU the kernel runs in Triton's interpreter (conftest sets ``TRITON_INTERPRET=1``) at
small sizes; the ``cuda`` test runs it compiled at Sparse4D's size (six 1600x900 cameras to
256x704). The op has no gradients: its inputs and outputs are uint8 images.
"""
import warnings

import numpy as np
import pytest
import torch

from turbox_mm.datasets.transforms.multiview_affine_aug import decoded_warp
from turbox_mm.models.data_preprocessors.gpu_image_preprocessor import valid_box_matrix
from turbox_mm.ops import dispatch
from turbox_mm.ops import image_warp as iw

pytest.importorskip('triton')
pytest.importorskip('turbox_mm.ops.image_warp.triton_kernels')


def similarity(scale, angle_deg, flip, shift, center):
    """Output pixel -> source pixel: rotate about ``center``, scale, flip, then shift."""
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) * scale
    if flip:
        rot = rot @ np.diag([-1.0, 1.0])
    warp = np.eye(3)
    warp[:2, :2] = rot
    warp[:2, 2] = np.asarray(center) + np.asarray(shift) - rot @ np.asarray(center)
    return warp


def make_case(num=5, src_hw=(37, 53), out_hw=(17, 29), factor=2, seed=0, masked=(1, 3)):
    """Random images, mixed warps (shrink, rotation, flip, partly off the source) and valid
    boxes on the images in ``masked``."""
    rng = np.random.default_rng(seed)
    src = torch.from_numpy(rng.integers(0, 256, (num, 3, *src_hw), dtype=np.uint8))
    warps, masks = [], []
    for k in range(num):
        scale = 1.6 + 0.9 * rng.random()
        full = similarity(scale, rng.uniform(-8, 8), bool(k % 2), rng.uniform(-6, 6, 2),
                          (out_hw[1] / 2, out_hw[0] / 2))
        warps.append(decoded_warp(full, factor))
        box = (2.5, 1.0, src_hw[1] - 3.0, src_hw[0] - 2.0)
        masks.append(valid_box_matrix(full, box, out_hw) if k in masked else None)
    return src, torch.from_numpy(iw.pack_params(warps, masks)), out_hw


def run_kernel(*args, **kwargs):
    with dispatch.kernel_on_cpu():
        return iw.warp_affine_u8(*args, **kwargs)


@pytest.mark.parametrize('factor', [1, 2, 4])
@pytest.mark.parametrize('reverse', [False, True])
def test_kernel_matches_reference_within_one_level(factor, reverse):
    src, params, out_hw = make_case(factor=factor, seed=factor)
    got = run_kernel(src, params, factor, out_hw, reverse_channels=reverse)
    want = iw.warp_affine_u8_reference(src, params, factor, out_hw, reverse)
    assert got.dtype == torch.uint8 and got.shape == (5, 3, *out_hw)
    diff = (got.int() - want.int()).abs()
    assert diff.max() <= 1, diff.max()
    assert (diff > 0).float().mean() < 0.01
    assert (want > 0).float().mean() > 0.5  # the case is not mostly blank


def test_valid_box_matches_reference_exactly():
    """On a constant image whose taps stay on the source, the output is 0 exactly where the
    reference's box test (OpenCV's fixed point) says outside."""
    src_hw, out_hw = (60, 80), (21, 31)
    src = torch.full((3, 3, *src_hw), 200, dtype=torch.uint8)
    warps, masks = [], []
    for k, angle in enumerate((0.0, 6.5, -11.0)):
        full = similarity(1.5, angle, k == 1, (20.0, 12.0), (15.0, 10.0))
        warps.append(full)
        masks.append(valid_box_matrix(full, (22.3, 14.1, 48.7, 33.9), out_hw))
    params = torch.from_numpy(iw.pack_params(warps, masks))
    got = run_kernel(src, params, 1, out_hw)
    keep = iw.valid_mask(params[:, 6:12].reshape(-1, 2, 3), out_hw, 'cpu')
    assert 0.2 < keep.float().mean() < 0.9
    assert torch.equal(got == 0, ~keep[:, None].expand_as(got))
    kept = got[keep[:, None].expand_as(got)]
    assert torch.equal(kept.unique(), torch.tensor([200], dtype=torch.uint8))


def test_block_average_rounding_is_exact():
    """Factor 2 rounds half up, factor 4 half to even, as the reference (OpenCV INTER_AREA)."""
    for factor in (2, 4):
        src = torch.from_numpy(np.random.default_rng(factor).integers(
            0, 256, (2, 3, 8 * factor + 3, 6 * factor + 1), dtype=np.uint8))
        hb, wb = -(-src.shape[2] // factor), -(-src.shape[3] // factor)
        identity = np.array([[1.0, 0, 0], [0, 1.0, 0]])  # sample the averaged pixels themselves
        params = torch.from_numpy(iw.pack_params([identity] * 2, [None] * 2))
        got = run_kernel(src, params, factor, (hb, wb))
        want = iw.block_average_tensor(src.float(), factor).to(torch.uint8)
        assert torch.equal(got, want)


def test_non_contiguous_and_float32_params():
    src, params, out_hw = make_case(num=3, seed=7)
    strided = src.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last memory
    assert not strided.is_contiguous()
    got = run_kernel(strided, params.float(), 2, out_hw)
    assert torch.equal(got, run_kernel(src, params, 2, out_hw))


def test_empty_inputs_and_outputs():
    src, params, _ = make_case(num=2)
    assert run_kernel(src[:0], params[:0], 2, (5, 7)).shape == (0, 3, 5, 7)
    assert run_kernel(src, params, 2, (0, 7)).shape == (2, 3, 0, 7)
    assert iw.warp_affine_u8_reference(src[:0], params[:0], 2, (5, 7)).shape == (0, 3, 5, 7)


@pytest.mark.parametrize('bad, match', [
    (dict(src=torch.zeros(2, 4, 5, 5, dtype=torch.uint8)), 'src must be uint8'),
    (dict(src=torch.zeros(2, 3, 5, 5)), 'src must be uint8'),
    (dict(params=torch.zeros(3, 13, dtype=torch.float64)), 'params must be float'),
    (dict(params=torch.zeros(2, 12, dtype=torch.float64)), 'params must be float'),
    (dict(factor=3), 'factor must be one of'),
])
def test_bad_inputs_name_the_argument(bad, match):
    args = dict(src=torch.zeros(2, 3, 5, 5, dtype=torch.uint8),
                params=torch.zeros(2, 13, dtype=torch.float64), factor=1)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        iw.warp_affine_u8(args['src'], args['params'], args['factor'], (4, 4))


def test_reference_on_cpu_warns_once(monkeypatch):
    monkeypatch.setattr(dispatch, '_warned', set())
    src, params, out_hw = make_case(num=2)
    assert 'cpu' in iw.fallback_reason(src)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        out = iw.warp_affine_u8(src, params, 2, out_hw)
        iw.warp_affine_u8(src, params, 2, out_hw)
    assert len([w for w in caught if 'warp_affine_u8 runs the PyTorch reference'
                in str(w.message)]) == 1
    assert torch.equal(out, iw.warp_affine_u8_reference(src, params, 2, out_hw))


def test_opcheck_and_compile_without_graph_break():
    src, params, out_hw = make_case(num=2)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        result = torch.library.opcheck(torch.ops.turbox_mm.warp_affine_u8.default,
                                       (src, params, 2, *out_hw, True))
        assert all(v == 'SUCCESS' for v in result.values()), result

        def fn(x, p):
            return iw.warp_affine_u8(x, p, 2, out_hw, True).float().mean()

        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, backend='aot_eager')
        torch.testing.assert_close(compiled(src, params), fn(src, params))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_kernel_matches_reference_at_sparse4d_size():
    """Six 1600x900 cameras to 256x704 (resize 0.44, bottom crop, rotation and flip on some,
    their valid boxes): kernel against reference on the GPU."""
    src_hw, out_hw = (900, 1600), (256, 704)
    rng = np.random.default_rng(0)
    src = torch.from_numpy(rng.integers(0, 256, (6, 3, *src_hw), dtype=np.uint8)).cuda()
    warps, masks = [], []
    for k in range(6):
        full = similarity(1 / 0.44, (-5.4, 0.0, 3.1, 0.0, 5.0, -2.2)[k], k % 2 == 1,
                          (0.0, 140.0), (352.0, 128.0))
        warps.append(decoded_warp(full, 2))
        masks.append(valid_box_matrix(full, (0.0, 318.0, 1600.0, 900.0), out_hw)
                     if k % 3 else None)
    params = torch.from_numpy(iw.pack_params(warps, masks)).cuda()
    got = iw.warp_affine_u8(src, params, 2, out_hw, True)
    want = iw.warp_affine_u8_reference(src, params, 2, out_hw, True)
    diff = (got.int() - want.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, (diff.max(), diff.float().mean())
