"""turbox_mm.ops.deformable_aggregation: reference vs upstream's formula, kernels vs reference.

On the CPU the Triton kernels run in Triton's interpreter (conftest sets ``TRITON_INTERPRET=1``)
at small sizes; the ``cuda`` tests run them compiled at the stock training size.
"""
import math
import warnings
from itertools import product

import numpy as np
import pytest
import torch

from op_checks import (assert_compile_matches_eager,
                       assert_dispatch_warns_once_and_env_forces_reference, assert_gradcheck,
                       assert_op_empty_on_both_paths, assert_opcheck, max_err, quiet_on_path)
from turbox_mm.benchmark.micro import deformable_aggregation as bench
from turbox_mm.ops import deformable_aggregation as da
from turbox_mm.ops.deformable_aggregation import op as da_op
from turbox_mm.ops.deformable_aggregation.reference import (deformable_aggregation_reference,
                                                            feature_maps_format)

triton = pytest.importorskip('triton')
K = pytest.importorskip('turbox_mm.ops.deformable_aggregation.triton_kernels')

SMALL = dict(bs=2, anchors=5, pts=3, cams=3, sizes=((7, 9), (3, 5), (1, 2)), channels=24,
             groups=3)


def make_inputs(bs=2, anchors=5, pts=3, cams=3, sizes=((7, 9), (3, 5), (1, 2)), channels=24,
                groups=3, dtype=torch.float32, device='cpu', seed=0, lo=-0.25, hi=1.25):
    """Random inputs; locations uniform in [lo, hi], so about a third of the pairs are out."""
    gen = torch.Generator().manual_seed(seed)
    maps = [torch.randn(bs, cams, channels, h, w, generator=gen, dtype=torch.float64)
            for h, w in sizes]
    feat, shape, start = feature_maps_format(maps)
    loc = lo + (hi - lo) * torch.rand(bs, anchors, pts, cams, 2, generator=gen,
                                      dtype=torch.float64)
    weights = torch.rand(bs, anchors, pts, cams, len(sizes), groups, generator=gen,
                         dtype=torch.float64)
    return (feat.to(device, dtype), shape.to(device), start.to(device), loc.to(device, dtype),
            weights.to(device, dtype))


def set_border_locations(loc):
    """Put samples exactly on and just inside the image borders, outside, and non-finite."""
    cases = [(0.0, 0.5), (1.0, 0.5), (0.5, 0.0), (0.5, 1.0), (0.0, 0.0), (1e-3, 0.5),
             (0.5, 1e-3), (0.999, 0.999), (1.0 - 1e-6, 0.5), (-0.3, 0.5), (1.7, 0.2),
             (float('nan'), 0.5), (0.5, float('inf')), (-float('inf'), 0.5)]
    flat = loc.view(-1, 2)
    step = max(1, flat.shape[0] // len(cases))
    for i, (x, y) in enumerate(cases[:flat.shape[0]]):
        flat[i * step, 0], flat[i * step, 1] = x, y
    return loc


def reference_grads(args, grad_out, dtype=None):
    """Forward and gradients (feat, loc, weights) of the reference, optionally in ``dtype``."""
    feat, shape, start, loc, weights = args
    if dtype is not None:
        feat, loc, weights = feat.to(dtype), loc.to(dtype), weights.to(dtype)
        grad_out = grad_out.to(dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (feat, loc, weights)]
    out = deformable_aggregation_reference(leaves[0], shape, start, leaves[1], leaves[2])
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), grads


# --------------------------------------------------------------------------------------------
# The reference against upstream's CUDA kernel, transcribed loop by loop
# --------------------------------------------------------------------------------------------


def upstream_loops(feat, shape, start, loc, weights, grad_out):
    """deformable_aggregation_cuda.cu in numpy float64: forward and its three gradients.

    One (batch, anchor, point, camera, level) at a time, all channels at once; skipped unless
    0 < x < 1 and 0 < y < 1; pixel = loc * size - 0.5; corners off the map read zero; channel c
    takes weight group c // (C / groups).
    """
    feat, loc, weights, grad_out = (t.detach().double().numpy()
                                    for t in (feat, loc, weights, grad_out))
    shape, start = shape.numpy(), start.numpy()
    bs, _, channels = feat.shape
    _, anchors, pts, cams, _ = loc.shape
    levels, groups = weights.shape[-2:]
    group_of = np.arange(channels) // (channels // groups)
    out = np.zeros((bs, anchors, channels))
    g_feat, g_loc, g_w = np.zeros_like(feat), np.zeros_like(loc), np.zeros_like(weights)
    for b, a, p, k in product(range(bs), range(anchors), range(pts), range(cams)):
        x, y = loc[b, a, p, k]
        if not (0 < x < 1 and 0 < y < 1):
            continue
        for lvl in range(levels):
            height, width = shape[k, lvl]
            xi, yi = x * width - 0.5, y * height - 0.5
            x0, y0 = math.floor(xi), math.floor(yi)
            lx, ly = xi - x0, yi - y0
            corners = {}
            for dy, dx in product((0, 1), (0, 1)):
                yy, xx = y0 + dy, x0 + dx
                inside = 0 <= yy < height and 0 <= xx < width
                row = start[k, lvl] + yy * width + xx
                corners[dy, dx] = (row if inside else None,
                                   feat[b, row] if inside else np.zeros(channels))
            bw = {(0, 0): (1 - ly) * (1 - lx), (0, 1): (1 - ly) * lx, (1, 0): ly * (1 - lx),
                  (1, 1): ly * lx}
            val = sum(bw[c] * corners[c][1] for c in bw)
            w = weights[b, a, p, k, lvl][group_of]
            out[b, a] += w * val
            top = grad_out[b, a] * w
            for c in bw:
                if corners[c][0] is not None:
                    g_feat[b, corners[c][0]] += bw[c] * top
            v00, v01, v10, v11 = (corners[c][1] for c in ((0, 0), (0, 1), (1, 0), (1, 1)))
            dvx = (1 - ly) * (v01 - v00) + ly * (v11 - v10)
            dvy = (1 - lx) * (v10 - v00) + lx * (v11 - v01)
            g_loc[b, a, p, k, 0] += width * (top * dvx).sum()
            g_loc[b, a, p, k, 1] += height * (top * dvy).sum()
            np.add.at(g_w[b, a, p, k, lvl], group_of, grad_out[b, a] * val)
    return out, (g_feat, g_loc, g_w)


def test_reference_reproduces_upstream_cuda_kernel():
    args = make_inputs(bs=1, anchors=4, pts=3, cams=2, sizes=((3, 4), (2, 3)), channels=6,
                       groups=2, dtype=torch.float64)
    set_border_locations(args[3])
    grad_out = torch.randn(1, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out, grads = reference_grads(args, grad_out)
    want_out, want_grads = upstream_loops(*args, grad_out)
    np.testing.assert_allclose(out.numpy(), want_out, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-10)
    # The border cases matter: samples on the border (x or y exactly 0 or 1) contribute nothing.
    assert torch.isfinite(out).all()


def test_reference_small_example_and_border_semantics():
    feat = torch.arange(6.).reshape(1, 6, 1)  # one 2x3 map: rows [0 1 2], [3 4 5]
    shape, start = torch.tensor([[[2, 3]]]), torch.tensor([[0]])
    w = torch.ones(1, 1, 1, 1, 1, 1)

    def at(x, y):
        loc = torch.tensor([x, y], dtype=torch.float32).reshape(1, 1, 1, 1, 2)
        return deformable_aggregation_reference(feat, shape, start, loc, w).item()

    assert at(0.5 / 3, 0.25) == pytest.approx(0.0, abs=1e-6)  # centre of pixel (0, 0)
    assert at(2.5 / 3, 0.75) == pytest.approx(5.0, rel=1e-6)  # centre of pixel (1, 2)
    assert at(0.5, 0.5) == pytest.approx(2.5)  # x = 1.0 px, y = 0.5 px: (1 + 4) / 2
    assert at(0.0, 0.5) == 0.0 and at(1.0, 0.5) == 0.0 and at(0.5, 1.0) == 0.0  # on the border
    # Row 1 is [3 4 5]. Just inside the left border x = -0.497 px: the corner at -1 reads zero.
    assert at(1e-3, 0.75) == pytest.approx(0.503 * 3, rel=1e-5)
    assert at(0.999, 0.75) == pytest.approx(0.503 * 5, rel=1e-5)  # x = 2.497 px, (1, 3) is off


def test_feature_maps_format_layout():
    maps = [torch.randn(2, 3, 4, 5, 6), torch.randn(2, 3, 4, 2, 3)]
    feat, shape, start = feature_maps_format(maps)
    assert feat.shape == (2, 3 * (30 + 6), 4)
    assert shape.tolist() == [[[5, 6], [2, 3]]] * 3
    for k, lvl, i, j in ((0, 0, 4, 5), (2, 1, 1, 2), (1, 0, 0, 0), (1, 1, 1, 0)):
        width = shape[k, lvl, 1].item()
        assert torch.equal(feat[:, start[k, lvl] + i * width + j], maps[lvl][:, k, :, i, j])


# --------------------------------------------------------------------------------------------
# Kernels (Triton interpreter on the CPU) against the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize('size', [
    SMALL,
    dict(SMALL, channels=40, groups=8, anchors=3),
    dict(SMALL, channels=16, groups=1, pts=2, cams=1, sizes=((4, 6), )),
    dict(SMALL, bs=1, anchors=7, pts=13, cams=6, sizes=((8, 22), (4, 11)), channels=32, groups=8),
])
def test_kernel_forward_backward_match_reference_fp32(size):
    args = make_inputs(**size)
    set_border_locations(args[3])
    grad_out = torch.randn(size['bs'], size['anchors'], size['channels'],
                           generator=torch.Generator().manual_seed(1))
    out = K.deformable_aggregation_forward(*args)
    want, want_grads = reference_grads(args, grad_out, torch.float64)
    assert out.dtype == torch.float32 and out.shape == want.shape and out.is_contiguous()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    grads = K.deformable_aggregation_backward(grad_out, *args)
    for got, ref, inp in zip(grads, want_grads, (args[0], args[3], args[4])):
        assert got.dtype == inp.dtype and got.shape == inp.shape
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('kind', ['fwd', 'bwd'])
def test_every_autotuning_config(kind):
    """Each configuration autotuning may pick on a GPU computes the same (interpreter)."""
    size = dict(bs=1, anchors=3, pts=2, cams=2, sizes=((5, 7), (2, 3)), channels=128, groups=4)
    args = make_inputs(**size)
    grad_out = torch.randn(1, 3, 128, generator=torch.Generator().manual_seed(1))
    want, want_grads = reference_grads(args, grad_out, torch.float64)
    configs = K.configs(kind, 128, 4)
    assert len(configs) >= 4 and any(c['BLOCK_G'] < 4 for c in configs)  # group split too
    for config in configs:
        if kind == 'fwd':
            got = K.deformable_aggregation_forward(*args, config=config)
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=str(config))
        else:
            grads = K.deformable_aggregation_backward(grad_out, *args, config=config)
            for got, ref in zip(grads, want_grads):
                torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4,
                                           msg=str(config))


def test_kernel_empty_inputs():
    for size in (dict(SMALL, anchors=0), dict(SMALL, bs=0), dict(SMALL, pts=0)):
        args = make_inputs(**size)
        out = K.deformable_aggregation_forward(*args)
        assert out.shape == (size['bs'], size['anchors'], size['channels'])
        assert (out == 0).all()
        grads = K.deformable_aggregation_backward(torch.zeros_like(out), *args)
        assert [g.shape for g in grads] == [args[0].shape, args[3].shape, args[4].shape]
        assert all((g == 0).all() for g in grads)
        assert_op_empty_on_both_paths(da.deformable_aggregation, args, (0, 3, 4),
                                      (size['bs'], size['anchors'], size['channels']))
    args = make_inputs(lo=1.5, hi=2.0)  # every sample outside every image
    assert (K.deformable_aggregation_forward(*args) == 0).all()


def test_kernel_non_contiguous_inputs():
    feat, shape, start, loc, weights = make_inputs(**SMALL)
    feat_t = feat.transpose(1, 2).contiguous().transpose(1, 2)  # channels-first storage
    loc_s = torch.stack([loc, loc.flip(-1)], dim=-1)[..., 0]  # strided view of the same values
    w_p = weights.permute(5, 0, 1, 2, 3, 4).contiguous().permute(1, 2, 3, 4, 5, 0)
    shape_t = shape.transpose(0, 1).contiguous().transpose(0, 1)
    for t in (feat_t, loc_s, w_p, shape_t):
        assert not t.is_contiguous()
    got = K.deformable_aggregation_forward(feat_t, shape_t, start, loc_s, w_p)
    torch.testing.assert_close(got, deformable_aggregation_reference(feat, shape, start, loc,
                                                                     weights), rtol=1e-5,
                               atol=1e-5)
    with da_op.kernel_on_cpu():
        leaves = [t.detach().requires_grad_() for t in (feat_t, loc_s, w_p)]
        da.deformable_aggregation(leaves[0], shape_t, start, leaves[1], leaves[2]).sum().backward()
    _, want = reference_grads((feat, shape, start, loc, weights), torch.ones_like(got))
    for leaf, ref in zip(leaves, want):
        torch.testing.assert_close(leaf.grad, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_kernel_low_precision_error_within_twice_reference(dtype):
    """flash-attention's rule: error vs float64 at most twice that of PyTorch in ``dtype``."""
    size = dict(SMALL, channels=32, groups=4, anchors=6)
    args64 = make_inputs(**size, dtype=torch.float64)
    args = tuple(t.to(dtype) if t.is_floating_point() else t for t in args64)
    truth_args = tuple(t.double() if t.is_floating_point() else t for t in args)  # same values
    grad_out = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    truth, truth_grads = reference_grads(truth_args, grad_out, torch.float64)
    ref, ref_grads = reference_grads(args, grad_out, dtype)
    out = K.deformable_aggregation_forward(*args)
    assert out.dtype == dtype
    assert max_err(out, truth) <= 2 * max_err(ref, truth) + 1e-6
    grads = K.deformable_aggregation_backward(grad_out, *args)
    for name, got, want, base in zip(('feat', 'loc', 'weights'), grads, truth_grads, ref_grads):
        assert got.dtype == dtype
        assert max_err(got, want) <= 2 * max_err(base, want) + 1e-6, name


def test_kernel_mixed_dtypes_as_under_autocast():
    """16-bit features with float32 locations and weights: float32 math, 16-bit result."""
    feat, shape, start, loc, weights = make_inputs(**SMALL)
    out = K.deformable_aggregation_forward(feat.half(), shape, start, loc, weights)
    assert out.dtype == torch.float16
    want = deformable_aggregation_reference(feat.half().double(), shape, start, loc.double(),
                                            weights.double())
    assert max_err(out, want) < 2e-3
    grads = K.deformable_aggregation_backward(torch.ones_like(out), feat.half(), shape, start,
                                              loc, weights)
    assert [g.dtype for g in grads] == [torch.float16, torch.float32, torch.float32]


# --------------------------------------------------------------------------------------------
# The op: dispatch, gradcheck, opcheck, torch.compile
# --------------------------------------------------------------------------------------------


def test_dispatch_reference_on_cpu_warns_once_and_env_forces_it(monkeypatch):
    assert_dispatch_warns_once_and_env_forces_reference(
        monkeypatch, da.deformable_aggregation, da, deformable_aggregation_reference, K,
        'deformable_aggregation_forward', make_inputs(**SMALL))


def test_op_rejects_inconsistent_inputs():
    feat, shape, start, loc, weights = make_inputs(**SMALL)
    with pytest.raises(ValueError, match='multiple of groups'):
        da.deformable_aggregation(feat[..., :22], shape, start, loc, weights)
    with pytest.raises(ValueError, match='spatial_shape'):
        da.deformable_aggregation(feat, shape[:2], start, loc, weights)
    with pytest.raises(ValueError, match='weights'):
        da.deformable_aggregation(feat, shape, start, loc, weights[:, :2])
    with pytest.raises(ValueError, match='integer'):
        da.deformable_aggregation(feat, shape.float(), start, loc, weights)


def test_gradcheck_float64_reference_path():
    args = make_inputs(bs=1, anchors=2, pts=2, cams=2, sizes=((3, 4), (2, 2)), channels=4,
                       groups=2, dtype=torch.float64, lo=0.05, hi=0.95)
    assert_gradcheck(da.deformable_aggregation, args, 'reference')


def test_gradcheck_float64_kernel_in_interpreter():
    args = make_inputs(bs=1, anchors=2, pts=2, cams=2, sizes=((3, 4), (2, 2)), channels=4,
                       groups=2, dtype=torch.float64, lo=-0.1, hi=1.1, seed=4)
    assert_gradcheck(da.deformable_aggregation, args, 'kernel')


@pytest.mark.parametrize('path', ['reference', 'kernel'])
def test_opcheck(path):
    args = make_inputs(bs=1, anchors=3, pts=2, cams=2, sizes=((3, 4), (2, 2)), channels=8,
                       groups=2)
    with quiet_on_path(path):
        assert_opcheck(torch.ops.turbox_mm.deformable_aggregation.default, args)


def test_compile_fullgraph_no_graph_break():
    args = make_inputs(bs=1, anchors=3, pts=2, cams=2, sizes=((3, 4), (2, 2)), channels=8,
                       groups=2)
    feat, shape, start, loc, weights = args
    proj = torch.nn.Linear(8, 8).double()

    def block(feat, loc, weights):
        out = da.deformable_aggregation(feat * 2, shape, start, loc.clamp(-1, 2), weights.relu())
        return proj(out.double()).square().sum()

    assert_compile_matches_eager(block, (feat, loc, weights), (0, 1, 2))


# --------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------


def test_benchmark_locations_are_projections_into_one_or_two_cameras():
    loc = bench.sampling_locations(2, bench.STOCK['anchors'], 13, 6)
    assert loc.shape == (2, 1220, 13, 6, 2)
    inside = ((loc > 0) & (loc < 1)).all(dim=-1)
    per_point = inside.sum(dim=-1)
    assert (per_point > 0).float().mean() > 0.9  # nearly every keypoint is seen
    assert 1.0 <= per_point[per_point > 0].float().mean() < 1.5  # mostly by one camera
    assert per_point.max() <= 3


def test_micro_benchmark_quick():
    from turbox_mm.benchmark.micro import available, get
    assert 'deformable_aggregation' in available('op')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        rows = get('deformable_aggregation')('cpu', quick=True)
    assert [r['case'].split()[-1] for r in rows] == ['fwd', 'fwd+bwd']
    for row in rows:
        assert row['component'] == 'deformable_aggregation'
        assert row['stock']['median_ms'] > 0 and row['turbox']['median_ms'] > 0
        assert 'inside' in row['note']


# --------------------------------------------------------------------------------------------
# CUDA (compiled kernels, stock training size)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def stock_inputs():
    """float32 inputs at the stock training size (bench.STOCK) on the GPU."""
    return bench.make_inputs(bench.STOCK, 'cuda', torch.float32)


def _cuda_grad_out(size, dtype):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(size['bs'], size['anchors'], size['channels'], generator=gen).to(
        'cuda', dtype)


def assert_grads_close(grads, wants, rtol):
    """Feature and weight gradients within ``rtol`` of the largest value; the location gradient
    too, except at a few samples: it jumps where a sample crosses a pixel line, and float32
    pixel coordinates (~1e-5 px off) put a few of ~400k samples on the other side."""
    for name, got, want in zip(('feat', 'loc', 'weights'), grads, wants):
        tol = rtol * want.abs().max().item()
        bad = ((got.double() - want.double()).abs() > tol).sum().item()
        allowed = 0 if name != 'loc' else 2 + want.numel() // 10000
        assert bad <= allowed, f'{name}: {bad} of {want.numel()} off by more than {tol:.3g}'


def mean_err(a, b):
    return (a.double() - b.double()).abs().mean().item()


@pytest.mark.cuda
def test_cuda_stock_size_fp32_matches_float64_reference(stock_inputs):
    grad_out = _cuda_grad_out(bench.STOCK, torch.float32)
    truth, truth_grads = reference_grads(stock_inputs, grad_out, torch.float64)
    feat, shape, start, loc, weights = stock_inputs
    assert da.fallback_reason(feat) is None
    leaves = [t.detach().requires_grad_() for t in (feat, loc, weights)]
    out = da.deformable_aggregation(leaves[0], shape, start, leaves[1], leaves[2])
    out.backward(grad_out)
    assert out.dtype == torch.float32
    assert max_err(out, truth) <= 1e-5 * truth.abs().max().item()
    assert_grads_close([t.grad for t in leaves], truth_grads, 1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_cuda_stock_size_low_precision_within_twice_reference(stock_inputs, dtype):
    """Max error for the output and the feature/weight gradients; mean error for the location
    gradient (discontinuous at pixel lines, see :func:`assert_grads_close`)."""
    args = tuple(t.to(dtype) if t.is_floating_point() else t for t in stock_inputs)
    grad_out = _cuda_grad_out(bench.STOCK, dtype)
    truth, truth_grads = reference_grads(args, grad_out, torch.float64)  # same values, float64
    ref, ref_grads = reference_grads(args, grad_out)  # PyTorch in ``dtype``
    leaves = [t.detach().requires_grad_() for t in (args[0], args[3], args[4])]
    out = da.deformable_aggregation(leaves[0], args[1], args[2], leaves[1], leaves[2])
    out.backward(grad_out)
    assert out.dtype == dtype
    assert max_err(out, truth) <= 2 * max_err(ref, truth)
    for name, leaf, want, base in zip(('feat', 'loc', 'weights'), leaves, truth_grads, ref_grads):
        err = mean_err if name == 'loc' else max_err
        assert err(leaf.grad, want) <= 2 * err(base, want), name


@pytest.mark.cuda
@pytest.mark.parametrize('kind', ['fwd', 'bwd'])
def test_cuda_every_autotuning_config(kind):
    """Every candidate against the reference: the same float32 arithmetic, so configurations
    differ only in summation order."""
    size = dict(bench.STOCK, bs=2, anchors=300)
    args = bench.make_inputs(size, 'cuda', torch.float32)
    grad_out = _cuda_grad_out(size, torch.float32)
    want, want_grads = reference_grads(args, grad_out, torch.float64)
    first = None
    for config in K.configs(kind, 256, 8):
        if kind == 'fwd':
            got = K.deformable_aggregation_forward(*args, config=config)
            assert max_err(got, want) <= 1e-5 * want.abs().max().item(), config
        else:
            grads = K.deformable_aggregation_backward(grad_out, *args, config=config)
            assert_grads_close(grads, want_grads, 1e-4)
            if first is None:
                first = grads
            for got, ref in zip(grads, first):
                assert max_err(got, ref) <= 1e-5 * ref.abs().max().item(), config


@pytest.mark.cuda
def test_cuda_odd_shapes_empty_and_non_contiguous():
    for size in (SMALL, dict(SMALL, channels=40, groups=8), dict(SMALL, anchors=0)):
        args = make_inputs(**size, device='cuda')
        set_border_locations(args[3])
        grad_out = torch.randn(size['bs'], size['anchors'], size['channels'], device='cuda')
        want, want_grads = reference_grads(args, grad_out, torch.float64)
        torch.testing.assert_close(K.deformable_aggregation_forward(*args).double(), want,
                                   rtol=1e-5, atol=1e-5)
        grads = K.deformable_aggregation_backward(grad_out, *args)
        for got, ref in zip(grads, want_grads):
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)
    feat, shape, start, loc, weights = make_inputs(**SMALL, device='cuda')
    feat_t = feat.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(da.deformable_aggregation(feat_t, shape.cpu(), start, loc, weights),
                               deformable_aggregation_reference(feat, shape, start, loc, weights),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_autocast_opcheck_and_compile():
    size = dict(bench.STOCK, bs=1, anchors=64)
    feat, shape, start, loc, weights = bench.make_inputs(size, 'cuda', torch.float32)
    with torch.autocast('cuda', dtype=torch.float16):
        out = da.deformable_aggregation(feat.half(), shape, start, loc, weights)
    assert out.dtype == torch.float16
    want = deformable_aggregation_reference(feat.half().double(), shape, start, loc.double(),
                                            weights.double())
    assert max_err(out, want) <= 2e-3 * want.abs().max().item() + 1e-3
    small = make_inputs(bs=1, anchors=3, pts=2, cams=2, sizes=((3, 4), (2, 2)), channels=8,
                        groups=2, device='cuda')
    assert_opcheck(torch.ops.turbox_mm.deformable_aggregation.default, small)

    def block(feat, loc, weights):
        return da.deformable_aggregation(feat, shape, start, loc, weights.softmax(-1)).sum()

    leaves = [t.detach().requires_grad_() for t in (feat, loc, weights)]
    torch.compile(block, fullgraph=True)(*leaves).backward()
    eager = [t.detach().requires_grad_() for t in (feat, loc, weights)]
    block(*eager).backward()
    # The location and feature gradients accumulate with float32 atomics, whose order varies
    # from run to run, and Inductor's softmax rounds differently from eager's: on the H100 2 of
    # 9984 location-gradient entries differed by 2.3e-5 (relative 4.7e-4).
    for got, ref in zip(leaves, eager):
        torch.testing.assert_close(got.grad, ref.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.cuda
def test_cuda_micro_benchmark_quick():
    rows = bench.benchmark('cuda', quick=True)
    assert len(rows) == 4 and all(r['stock'] and r['turbox'] for r in rows)
