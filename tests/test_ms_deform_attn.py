"""turbox_mm.ops.ms_deform_attn: reference vs mmcv, kernels vs reference, the op, the benchmark.

On the CPU the Triton kernels run in Triton's interpreter (conftest sets ``TRITON_INTERPRET=1``)
at small odd sizes; the ``cuda`` tests run them compiled at MapTR's sizes against mmcv's CUDA op.
"""
import math
from itertools import product

import numpy as np
import pytest
import torch

from op_checks import (assert_benchmark_cli_without_cuda, assert_benchmark_skips_without_cuda,
                       assert_compile_matches_eager,
                       assert_dispatch_warns_once_and_env_forces_reference, assert_gradcheck,
                       assert_op_empty_on_both_paths, assert_opcheck, grad_out_for, max_err,
                       quiet_on_path)
from turbox_mm.benchmark.micro import ms_deform_attn as bench
from turbox_mm.ops import ms_deform_attn as msda
from turbox_mm.ops.ms_deform_attn import op as msda_op
from turbox_mm.ops.ms_deform_attn.reference import (ms_deform_attn_reference,
                                                    multi_scale_deformable_attn_pytorch)

triton = pytest.importorskip('triton')
K = pytest.importorskip('turbox_mm.ops.ms_deform_attn.triton_kernels')

SMALL = dict(bs=2, queries=11, heads=3, dims=16, points=3, shapes=((7, 5), (3, 3)))


def make_inputs(bs=2, queries=11, heads=3, dims=16, points=3, shapes=((7, 5), (3, 3)),
                dtype=torch.float32, device='cpu', seed=0, lo=-0.2, hi=1.2):
    """Random inputs; locations uniform in [lo, hi] (some samples partly or wholly off the map)."""
    gen = torch.Generator().manual_seed(seed)
    shape = torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2)
    counts = shape[:, 0] * shape[:, 1]
    start = counts.cumsum(0) - counts
    levels = len(shapes)
    value = torch.randn(bs, int(counts.sum()), heads, dims, generator=gen, dtype=torch.float64)
    loc = lo + (hi - lo) * torch.rand(bs, queries, heads, levels, points, 2, generator=gen,
                                      dtype=torch.float64)
    weights = torch.rand(bs, queries, heads, levels, points, generator=gen, dtype=torch.float64)
    return (value.to(device, dtype), shape.to(device), start.to(device), loc.to(device, dtype),
            weights.to(device, dtype))


def reference_grads(args, grad_out, dtype=None):
    """Forward and gradients (value, loc, weights) of the reference, optionally in ``dtype``."""
    value, shape, start, loc, weights = args
    if dtype is not None:
        value, loc, weights = value.to(dtype), loc.to(dtype), weights.to(dtype)
        grad_out = grad_out.to(dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, weights)]
    out = ms_deform_attn_reference(leaves[0], shape, start, leaves[1], leaves[2])
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    return out.detach(), grads


def assert_kernel_matches_reference(args, out_tol=1e-5, grad_tol=1e-4, config=None):
    grad_out = grad_out_for(args)
    want, want_grads = reference_grads(args, grad_out, torch.float64)
    out = K.ms_deform_attn_forward(*args, config=config)
    assert out.dtype == args[0].dtype and out.shape == want.shape and out.is_contiguous()
    torch.testing.assert_close(out.double(), want, rtol=out_tol, atol=out_tol)
    grads = K.ms_deform_attn_backward(grad_out, *args, config=config)
    for name, got, ref, inp in zip(('value', 'loc', 'weights'), grads, want_grads,
                                   (args[0], args[3], args[4])):
        assert got.dtype == inp.dtype and got.shape == inp.shape, name
        torch.testing.assert_close(got.double(), ref, rtol=grad_tol, atol=grad_tol, msg=name)


# --------------------------------------------------------------------------------------------
# The reference: mmcv's PyTorch function and mmcv's CUDA kernel, transcribed loop by loop
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_reference_equals_mmcv_pytorch_function(dtype):
    mmcv_msda = pytest.importorskip('mmcv.ops.multi_scale_deform_attn')
    args = make_inputs(**dict(SMALL, heads=2, points=4), dtype=dtype)
    value, shape, start, loc, weights = args
    grad_out = grad_out_for(args)
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, weights)]
    want = mmcv_msda.multi_scale_deformable_attn_pytorch(leaves[0], shape, leaves[1], leaves[2])
    want_grads = torch.autograd.grad(want, leaves, grad_out)
    got, got_grads = reference_grads(args, grad_out)
    assert torch.equal(got, want.detach())
    for g, w in zip(got_grads, want_grads):
        assert torch.equal(g, w)
    assert torch.equal(multi_scale_deformable_attn_pytorch(value, shape, loc, weights), got)


def mmcv_cuda_loops(value, shape, start, loc, weights, grad_out):
    """ms_deform_attn_cuda_kernel.cuh in numpy float64: forward and its three gradients.

    One (batch, query, head, level, point) at a time, all channels at once; pixel = loc * size -
    0.5; skipped unless -1 < h_im < H and -1 < w_im < W; corners off the map read zero.
    """
    value, loc, weights, grad_out = (t.detach().double().numpy()
                                     for t in (value, loc, weights, grad_out))
    shape, start = shape.numpy(), start.numpy()
    bs, _, heads, dims = value.shape
    _, queries, _, levels, points, _ = loc.shape
    out = np.zeros((bs, queries, heads, dims))
    g_value, g_loc, g_w = np.zeros_like(value), np.zeros_like(loc), np.zeros_like(weights)
    grad_out = grad_out.reshape(bs, queries, heads, dims)
    for b, q, h, lvl, p in product(range(bs), range(queries), range(heads), range(levels),
                                   range(points)):
        height, width = shape[lvl]
        x, y = loc[b, q, h, lvl, p]
        w_im, h_im = x * width - 0.5, y * height - 0.5
        if not (h_im > -1 and w_im > -1 and h_im < height and w_im < width):
            continue
        h_low, w_low = math.floor(h_im), math.floor(w_im)
        lh, lw = h_im - h_low, w_im - w_low
        hh, hw = 1 - lh, 1 - lw
        corners = []
        for yy, xx, bw in ((h_low, w_low, hh * hw), (h_low, w_low + 1, hh * lw),
                           (h_low + 1, w_low, lh * hw), (h_low + 1, w_low + 1, lh * lw)):
            inside = 0 <= yy < height and 0 <= xx < width
            row = start[lvl] + yy * width + xx
            corners.append((row if inside else None,
                            value[b, row, h] if inside else np.zeros(dims), bw))
        val = sum(bw * v for _, v, bw in corners)
        wgt = weights[b, q, h, lvl, p]
        out[b, q, h] += wgt * val
        top = grad_out[b, q, h] * wgt
        for row, _, bw in corners:
            if row is not None:
                g_value[b, row, h] += bw * top
        v1, v2, v3, v4 = (v for _, v, _ in corners)
        grad_h = -hw * v1 - lw * v2 + hw * v3 + lw * v4
        grad_w = -hh * v1 + hh * v2 - lh * v3 + lh * v4
        g_loc[b, q, h, lvl, p, 0] = width * (grad_w * top).sum()
        g_loc[b, q, h, lvl, p, 1] = height * (grad_h * top).sum()
        g_w[b, q, h, lvl, p] = (grad_out[b, q, h] * val).sum()
    return out.reshape(bs, queries, heads * dims), (g_value, g_loc, g_w)


def test_reference_and_kernel_reproduce_mmcv_cuda_kernel():
    args = make_inputs(bs=1, queries=5, heads=2, dims=4, points=2, shapes=((3, 4), (2, 3)),
                       dtype=torch.float64, lo=-0.5, hi=1.5)
    grad_out = grad_out_for(args, seed=3)
    want_out, want_grads = mmcv_cuda_loops(*args, grad_out)
    out, grads = reference_grads(args, grad_out)
    np.testing.assert_allclose(out.numpy(), want_out, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-10)
    out = K.ms_deform_attn_forward(*args)  # float64 in, float64 accumulation
    np.testing.assert_allclose(out.numpy(), want_out, rtol=1e-12, atol=1e-12)
    for got, want in zip(K.ms_deform_attn_backward(grad_out, *args), want_grads):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-10)


def test_reference_small_example_and_zero_padding():
    value = torch.arange(6.).reshape(1, 6, 1, 1)  # one 2x3 level: rows [0 1 2], [3 4 5]
    shape, start = torch.tensor([[2, 3]]), torch.tensor([0])
    w = torch.ones(1, 1, 1, 1, 1)

    def at(x, y):
        loc = torch.tensor([x, y], dtype=torch.float32).reshape(1, 1, 1, 1, 1, 2)
        return ms_deform_attn_reference(value, shape, start, loc, w).item()

    assert at(0.5 / 3, 0.25) == pytest.approx(0.0, abs=1e-6)  # centre of pixel (0, 0)
    assert at(2.5 / 3, 0.75) == pytest.approx(5.0, rel=1e-6)  # centre of pixel (1, 2)
    assert at(0.5, 0.5) == pytest.approx(2.5)  # x = 1.0 px, y = 0.5 px: (1 + 4) / 2
    # On the border x = 0: x = -0.5 px, half of pixel (., 0) and half of the zero padding.
    assert at(0.0, 0.75) == pytest.approx(1.5)
    assert at(1.0, 0.75) == pytest.approx(2.5)  # x = 2.5 px: half of 5
    assert at(-0.5, 0.5) == 0.0 and at(0.5, 1.6) == 0.0  # wholly off the map


def test_reference_rejects_a_level_past_num_value():
    value, shape, start, loc, weights = make_inputs(**SMALL)
    with pytest.raises(ValueError, match='runs past num_value'):
        ms_deform_attn_reference(value[:, :40], shape, start, loc, weights)


# --------------------------------------------------------------------------------------------
# Kernels (Triton interpreter on the CPU) against the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize('size', [
    SMALL,
    dict(SMALL, heads=1, points=1, dims=32, queries=13),
    dict(SMALL, bs=1, heads=8, points=4, dims=32, queries=9, shapes=((7, 5), (3, 3), (1, 2),
                                                                     (2, 1))),
    dict(SMALL, bs=3, heads=2, points=5, dims=12, queries=3, shapes=((1, 1), )),
])
@pytest.mark.parametrize('block_q', [None, 4])
def test_kernel_forward_backward_match_reference_fp32(size, block_q):
    """The interpreter's default tile holds every query here; 4 queries a program leave a
    partial last block."""
    config = None if block_q is None else dict(BLOCK_Q=block_q, num_warps=1)
    assert_kernel_matches_reference(make_inputs(**size), config=config)


def test_kernel_locations_off_the_map_and_non_finite():
    """Zero padding far outside [0, 1]; a NaN or infinite location adds nothing, gets zero
    gradients and leaves the other samples alone (mmcv's CUDA kernel skips it too)."""
    args = make_inputs(**SMALL, lo=-3.0, hi=4.0)
    assert_kernel_matches_reference(args)
    value, shape, start, loc, weights = make_inputs(**SMALL)
    bad = loc.clone()
    specials = [(float('nan'), 0.5), (0.5, float('inf')), (-float('inf'), 0.2), (1e30, 0.5)]
    for i, (x, y) in enumerate(specials):
        bad[0, i, 0, 0, 0] = torch.tensor([x, y])
    clean_w = weights.clone()
    for i in range(len(specials)):
        clean_w[0, i, 0, 0, 0] = 0  # the reference without the special samples
    want = ms_deform_attn_reference(value, shape, start, loc, clean_w)
    got = K.ms_deform_attn_forward(value, shape, start, bad, weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g_value, g_loc, g_w = K.ms_deform_attn_backward(torch.ones_like(got), value, shape, start,
                                                    bad, weights)
    assert all(torch.isfinite(g).all() for g in (g_value, g_loc, g_w))
    for i in range(len(specials)):
        assert (g_loc[0, i, 0, 0, 0] == 0).all() and g_w[0, i, 0, 0, 0] == 0
    far = make_inputs(**SMALL, lo=1.6, hi=3.0)  # every sample wholly off every level
    assert (K.ms_deform_attn_forward(*far) == 0).all()
    assert all((g == 0).all() for g in K.ms_deform_attn_backward(grad_out_for(far), *far))


@pytest.mark.parametrize('kind', ['fwd', 'bwd'])
def test_every_autotuning_config(kind):
    """Each configuration autotuning may pick on a GPU computes the same (interpreter)."""
    args = make_inputs(bs=1, queries=10, heads=2, dims=32, points=4, shapes=((5, 7), (2, 3)))
    grad_out = grad_out_for(args)
    want, want_grads = reference_grads(args, grad_out, torch.float64)
    configs = K.configs(kind, 4, 32)
    assert len(configs) >= 4 and len({c['BLOCK_Q'] for c in configs}) >= 3
    for config in configs:
        if kind == 'fwd':
            got = K.ms_deform_attn_forward(*args, config=config)
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=str(config))
        else:
            grads = K.ms_deform_attn_backward(grad_out, *args, config=config)
            for got, ref in zip(grads, want_grads):
                torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4,
                                           msg=str(config))


def test_kernel_level_past_num_value_reads_nothing():
    """Level tables that point past ``value`` (not checked on the host, which would sync) make
    that level read zeros instead of memory outside the tensor."""
    value, shape, start, loc, weights = make_inputs(**SMALL)
    bad_start = start.clone()
    bad_start[1] = value.shape[1] - 4  # the 3x3 level would run 5 rows past the end
    got = K.ms_deform_attn_forward(value, shape, bad_start, loc, weights)
    only_first = weights.clone()
    only_first[:, :, :, 1] = 0
    torch.testing.assert_close(got, ms_deform_attn_reference(value, shape, start, loc,
                                                             only_first), rtol=1e-5, atol=1e-5)


def test_kernel_and_op_empty_inputs():
    for size in (dict(SMALL, queries=0), dict(SMALL, bs=0), dict(SMALL, points=0)):
        args = make_inputs(**size)
        out = K.ms_deform_attn_forward(*args)
        assert out.shape == (size['bs'], size['queries'], size['heads'] * size['dims'])
        assert (out == 0).all()
        grads = K.ms_deform_attn_backward(torch.zeros_like(out), *args)
        assert [g.shape for g in grads] == [args[0].shape, args[3].shape, args[4].shape]
        assert all((g == 0).all() for g in grads)
        assert_op_empty_on_both_paths(msda.ms_deform_attn, args, (0, 3, 4),
                                      (size['bs'], size['queries'], size['heads'] * size['dims']))


def test_kernel_non_contiguous_inputs():
    value, shape, start, loc, weights = make_inputs(**SMALL)
    value_t = value.transpose(2, 3).contiguous().transpose(2, 3)  # channels-first storage
    loc_s = torch.stack([loc, loc.flip(-1)], dim=-1)[..., 0]  # strided view of the same values
    w_p = weights.permute(4, 0, 1, 2, 3).contiguous().permute(1, 2, 3, 4, 0)
    shape_t = shape.t().contiguous().t()
    for t in (value_t, loc_s, w_p, shape_t):
        assert not t.is_contiguous()
    want = ms_deform_attn_reference(value, shape, start, loc, weights)
    got = K.ms_deform_attn_forward(value_t, shape_t, start, loc_s, w_p)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with msda_op.kernel_on_cpu():
        leaves = [t.detach().requires_grad_() for t in (value_t, loc_s, w_p)]
        grad_out = grad_out_for((value, shape, start, loc, weights)).mT.contiguous().mT
        msda.ms_deform_attn(leaves[0], shape_t, start, leaves[1], leaves[2]).backward(grad_out)
    _, want_grads = reference_grads((value, shape, start, loc, weights), grad_out)
    for leaf, ref in zip(leaves, want_grads):
        torch.testing.assert_close(leaf.grad, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_kernel_low_precision_error_within_twice_reference(dtype):
    """flash-attention's rule: error vs float64 at most twice that of PyTorch in ``dtype``."""
    size = dict(SMALL, heads=2, dims=32, points=4, queries=9)
    args64 = make_inputs(**size, dtype=torch.float64, lo=0.05, hi=0.95)
    args = tuple(t.to(dtype) if t.is_floating_point() else t for t in args64)
    truth_args = tuple(t.double() if t.is_floating_point() else t for t in args)  # same values
    grad_out = grad_out_for(args, dtype=dtype)
    truth, truth_grads = reference_grads(truth_args, grad_out, torch.float64)
    ref, ref_grads = reference_grads(args, grad_out, dtype)
    out = K.ms_deform_attn_forward(*args)
    assert out.dtype == dtype
    assert max_err(out, truth) <= 2 * max_err(ref, truth) + 1e-6
    grads = K.ms_deform_attn_backward(grad_out, *args)
    for name, got, want, base in zip(('value', 'loc', 'weights'), grads, truth_grads, ref_grads):
        assert got.dtype == dtype, name
        assert max_err(got, want) <= 2 * max_err(base, want) + 1e-6, name


def test_kernel_mixed_dtypes_as_under_autocast():
    """A 16-bit value with float32 locations and weights: float32 math, 16-bit result."""
    value, shape, start, loc, weights = make_inputs(**SMALL)
    out = K.ms_deform_attn_forward(value.half(), shape, start, loc, weights)
    assert out.dtype == torch.float16
    want = ms_deform_attn_reference(value.half().double(), shape, start, loc.double(),
                                    weights.double())
    assert max_err(out, want) < 2e-3
    grads = K.ms_deform_attn_backward(torch.ones_like(out), value.half(), shape, start, loc,
                                      weights)
    assert [g.dtype for g in grads] == [torch.float16, torch.float32, torch.float32]


# --------------------------------------------------------------------------------------------
# The op: dispatch, mmcv's call, gradcheck, opcheck, torch.compile
# --------------------------------------------------------------------------------------------


def test_dispatch_reference_on_cpu_warns_once_and_env_forces_it(monkeypatch):
    assert_dispatch_warns_once_and_env_forces_reference(
        monkeypatch, msda.ms_deform_attn, msda, ms_deform_attn_reference, K,
        'ms_deform_attn_forward', make_inputs(**SMALL))


def test_mmcv_call_drop_in():
    """``MultiScaleDeformableAttnFunction.apply`` with mmcv's arguments, im2col_step included."""
    args = make_inputs(**SMALL)
    leaves = [t.detach().requires_grad_() for t in (args[0], args[3], args[4])]
    with msda_op.kernel_on_cpu():
        out = msda.MultiScaleDeformableAttnFunction.apply(leaves[0], args[1], args[2], leaves[1],
                                                          leaves[2], 64)
        out.backward(grad_out_for(args))
    want, want_grads = reference_grads(args, grad_out_for(args))
    torch.testing.assert_close(out.detach(), want, rtol=1e-5, atol=1e-5)
    for leaf, ref in zip(leaves, want_grads):
        torch.testing.assert_close(leaf.grad, ref, rtol=1e-4, atol=1e-4)


def test_op_rejects_inconsistent_inputs():
    value, shape, start, loc, weights = make_inputs(**SMALL)
    with pytest.raises(ValueError, match='spatial_shapes'):
        msda.ms_deform_attn(value, shape[:1], start, loc, weights)
    with pytest.raises(ValueError, match='attention_weights'):
        msda.ms_deform_attn(value, shape, start, loc, weights[..., :2])
    with pytest.raises(ValueError, match='heads of value'):
        msda.ms_deform_attn(value[:, :, :2], shape, start, loc, weights)
    with pytest.raises(ValueError, match='integer'):
        msda.ms_deform_attn(value, shape.float(), start, loc, weights)
    with pytest.raises(ValueError, match='float16'):
        msda.ms_deform_attn(value.int(), shape, start, loc, weights)


def test_gradcheck_float64_reference_path():
    args = make_inputs(bs=1, queries=3, heads=2, dims=3, points=2, shapes=((3, 4), (2, 2)),
                       dtype=torch.float64, lo=-0.1, hi=1.1)
    assert_gradcheck(msda.ms_deform_attn, args, 'reference')


def test_gradcheck_float64_kernel_in_interpreter():
    args = make_inputs(bs=1, queries=3, heads=2, dims=3, points=2, shapes=((3, 4), (2, 2)),
                       dtype=torch.float64, lo=-0.1, hi=1.1, seed=4)
    assert_gradcheck(msda.ms_deform_attn, args, 'kernel')


@pytest.mark.parametrize('path', ['reference', 'kernel'])
def test_opcheck(path):
    args = make_inputs(bs=1, queries=3, heads=2, dims=8, points=2, shapes=((3, 4), (2, 2)))
    with quiet_on_path(path):
        assert_opcheck(torch.ops.turbox_mm.ms_deform_attn.default, args)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    args = make_inputs(**SMALL)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in args]
        out = torch.ops.turbox_mm.ms_deform_attn(*fake)
        grads = torch.ops.turbox_mm.ms_deform_attn_backward(out, *fake)
    assert out.shape == (2, 11, 3 * 16) and out.dtype == torch.float32
    assert [g.shape for g in grads] == [args[0].shape, args[3].shape, args[4].shape]


def test_compile_fullgraph_no_graph_break():
    args = make_inputs(bs=1, queries=3, heads=2, dims=4, points=2, shapes=((3, 4), (2, 2)))
    value, shape, start, loc, weights = args
    proj = torch.nn.Linear(8, 8).double()

    def block(value, loc, weights):
        out = msda.ms_deform_attn(value * 2, shape, start, loc.clamp(-1, 2), weights.softmax(-1))
        return proj(out.double()).square().sum()

    assert_compile_matches_eager(block, (value, loc, weights), (0, 1, 2))


# --------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------


def test_benchmark_inputs_at_the_doc_sizes():
    size = dict(bench.CASES['MapTR v1 TSA'], bs=1)
    value, shape, start, loc, weights = bench.make_inputs(size)
    assert value.shape == (1, 20000, 8, 32) and shape.tolist() == [[200, 100]]
    assert loc.shape == (1, 20000, 8, 1, 4, 2) and weights.shape == (1, 20000, 8, 1, 4)
    # Query q sits at BEV cell q; its samples spread a few pixels around it.
    centre = loc[0, :, :, 0].mean(dim=(1, 2))
    q = torch.tensor([0, 137, 19999])
    want = torch.stack([(q % 100 + 0.5) / 100, (q // 100 + 0.5) / 200], -1)
    torch.testing.assert_close(centre[q], want, atol=4 * bench.OFFSET_PX / 100, rtol=0)
    torch.testing.assert_close(weights.sum(dim=(-1, -2)), torch.ones(1, 20000, 8))
    issue = bench.CASES['issue 18 encoder (4 levels)']
    assert (issue['bs'], issue['queries'], len(issue['shapes'])) == (2, 20000, 4)


def test_micro_benchmark_skips_cleanly_without_cuda():
    assert_benchmark_skips_without_cuda('ms_deform_attn', 'needs CUDA')


def test_benchmark_cli_ops_without_cuda(tmp_path, capsys):
    assert_benchmark_cli_without_cuda('ms_deform_attn', 'MapTR v1 TSA float32 fwd+bwd',
                                      'needs CUDA', tmp_path, capsys)


COMPILE_SCRIPT = r'''
import sys
from turbox_mm.ops.ms_deform_attn import triton_kernels as tk
from turbox_mm.testing.triton_aot import compile_variants

variants = []
for dtype in ('*fp32', '*fp16', '*bf16'):
    for ones in ((), ('HEADS', 'L', 'P')) if dtype == '*fp32' else ((), ):
        const = dict(ACC=tk.tl.float32, BLOCK_Q=16, BLOCK_P=4, BLOCK_D=32)
        common = dict(value_ptr=dtype, shape_ptr='*i32', start_ptr='*i64', loc_ptr=dtype,
                      w_ptr=dtype)
        variants.append((tk._msda_fwd_kernel, const, ones, dict(common, out_ptr=dtype)))
        variants.append((tk._msda_bwd_kernel, const, ones,
                         dict(common, gout_ptr=dtype, gvalue_ptr='*fp32', gloc_ptr=dtype,
                              gw_ptr=dtype)))
# every autotuning candidate as a launch at MapTR's sizes specialises it (8 heads of 32
# channels, 4 points; D = 32 a multiple of 16; module docstring of
# turbox_mm/testing/triton_aot.py): (ints at 1, ints that are multiples of 16) of
#   the 4-level encoder (20000 queries over 116x200 + 58x100 + 29x50 + 15x25 = 30825 values),
#   MapTR v1's temporal self-attention (20000 BEV queries over the 200x100 BEV, 1 level),
#   the decoder over the BEV (1000 or 7000 queries, 1 level; under torch.compile);
# float32, and the encoder with a float16 value too (autocast: float32 locations and weights)
CASES = (((), ('Q', 'D'), ('*fp32', '*fp16')),
         (('L', ), ('Q', 'S', 'D'), ('*fp32', )),
         (('L', ), ('S', 'D'), ('*fp32', )))
for ones, divisible, dtypes in CASES:
    for kind, kernel in (('fwd', tk._msda_fwd_kernel), ('bwd', tk._msda_bwd_kernel)):
        for config in tk.configs(kind, 4, 32):
            config = dict(config)
            warps = config.pop('num_warps')
            for dtype in dtypes:
                common = dict(value_ptr=dtype, shape_ptr='*i32', start_ptr='*i64',
                              loc_ptr='*fp32', w_ptr='*fp32')
                pointers = (dict(common, out_ptr=dtype) if kind == 'fwd' else
                            dict(common, gout_ptr=dtype, gvalue_ptr='*fp32', gloc_ptr='*fp32',
                                 gw_ptr='*fp32'))
                variants.append((kernel, dict(config, ACC=tk.tl.float32, BLOCK_P=4, BLOCK_D=32),
                                 ones, pointers, dict(divisible=divisible, num_warps=warps)))
failures = compile_variants(variants, floats=())
print('\n'.join(failures) or 'all compiled')
sys.exit(1 if failures else 0)
'''


@pytest.mark.slow
def test_kernels_compile_for_sm90_for_every_dtype_and_specialisation(tmp_path):
    """The interpreter runs Python, not Triton's compiler: compile both kernels for the H200's
    sm_90, for every input dtype, with heads, levels and points at 1, and every autotuning
    candidate as a launch at MapTR's sizes specialises it (ints at 1, multiples of 16)."""
    from conftest import compile_for_sm90_in_subprocess
    compile_for_sm90_in_subprocess(COMPILE_SCRIPT, tmp_path)


# --------------------------------------------------------------------------------------------
# CUDA: compiled kernels against mmcv's CUDA op at MapTR's sizes
# --------------------------------------------------------------------------------------------


def assert_grads_close(grads, wants, rtol):
    """Value and weight gradients within ``rtol`` of the largest value; the location gradient
    too, except at a few samples: it jumps where a sample crosses a pixel line, and float32
    pixel coordinates put a few samples on the other side in one op and not the other."""
    for name, got, want in zip(('value', 'loc', 'weights'), grads, wants):
        tol = rtol * want.abs().max().item()
        bad = ((got.double() - want.double()).abs() > tol).sum().item()
        allowed = 0 if name != 'loc' else 2 + want.numel() // 10000
        assert bad <= allowed, f'{name}: {bad} of {want.numel()} off by more than {tol:.3g}'


def run_with_grads(fn, args, grad_out):
    value, shape, start, loc, weights = args
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, weights)]
    out = fn(leaves[0], shape, start, leaves[1], leaves[2])
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.cuda
@pytest.mark.parametrize('case', ['MapTR v1 TSA', 'issue 18 encoder (4 levels)',
                                  'MapTR v2 decoder, 7000 queries'])
def test_cuda_matches_mmcv_cuda_op_fp32(case):
    size = dict(bench.CASES[case])
    size['bs'] = min(size['bs'], 2)
    args = bench.make_inputs(size, 'cuda', torch.float32)
    assert msda.fallback_reason(args[0]) is None
    grad_out = grad_out_for(args)
    out, grads = run_with_grads(msda.ms_deform_attn, args, grad_out)
    want, want_grads = run_with_grads(bench.mmcv_ms_deform_attn, args, grad_out)
    assert out.dtype == torch.float32
    assert max_err(out, want) <= 1e-5 * want.abs().max().item()
    assert_grads_close(grads, want_grads, 1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_cuda_low_precision_within_twice_reference(dtype):
    """Max error for the output and the value/weight gradients; mean error for the location
    gradient (discontinuous at pixel lines, see :func:`assert_grads_close`)."""
    size = dict(bench.CASES['issue 18 encoder (4 levels)'], bs=1, queries=4000)
    args = tuple(t.to(dtype) if t.is_floating_point() else t
                 for t in bench.make_inputs(size, 'cuda', torch.float32))
    grad_out = grad_out_for(args)
    truth, truth_grads = reference_grads(args, grad_out, torch.float64)  # same values, float64
    ref, ref_grads = reference_grads(args, grad_out)  # PyTorch in ``dtype``
    out, grads = run_with_grads(msda.ms_deform_attn, args, grad_out)
    assert out.dtype == dtype
    assert max_err(out, truth) <= 2 * max_err(ref, truth)
    for name, got, want, base in zip(('value', 'loc', 'weights'), grads, truth_grads, ref_grads):
        if name == 'loc':
            assert (got.double() - want).abs().mean() <= 2 * (base.double() - want).abs().mean()
        else:
            assert max_err(got, want) <= 2 * max_err(base, want), name


@pytest.mark.cuda
@pytest.mark.parametrize('kind', ['fwd', 'bwd'])
def test_cuda_every_autotuning_config(kind):
    size = dict(bench.CASES['issue 18 encoder (4 levels)'], bs=1, queries=3000)
    args = bench.make_inputs(size, 'cuda', torch.float32)
    grad_out = grad_out_for(args)
    want, want_grads = reference_grads(args, grad_out, torch.float64)
    for config in K.configs(kind, 4, 32):
        if kind == 'fwd':
            got = K.ms_deform_attn_forward(*args, config=config)
            assert max_err(got, want) <= 1e-5 * want.abs().max().item(), config
        else:
            assert_grads_close(K.ms_deform_attn_backward(grad_out, *args, config=config),
                               want_grads, 1e-4)


@pytest.mark.cuda
def test_cuda_odd_shapes_empty_and_non_contiguous():
    for size in (SMALL, dict(SMALL, heads=8, dims=32, points=4, queries=37),
                 dict(SMALL, queries=0)):
        assert_kernel_matches_reference(make_inputs(**size, device='cuda'))
    value, shape, start, loc, weights = make_inputs(**SMALL, device='cuda')
    value_t = value.transpose(2, 3).contiguous().transpose(2, 3)
    torch.testing.assert_close(msda.ms_deform_attn(value_t, shape.cpu(), start, loc, weights),
                               ms_deform_attn_reference(value, shape, start, loc, weights),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_autocast_opcheck_and_compile():
    size = dict(bench.CASES['MapTR decoder, 1000 queries'], bs=1)
    value, shape, start, loc, weights = bench.make_inputs(size, 'cuda', torch.float32)
    with torch.autocast('cuda', dtype=torch.float16):
        out = msda.ms_deform_attn(value.half(), shape, start, loc, weights)
    assert out.dtype == torch.float16
    want = ms_deform_attn_reference(value.half().double(), shape, start, loc.double(),
                                    weights.double())
    assert max_err(out, want) <= 2e-3 * want.abs().max().item() + 1e-3
    small = make_inputs(bs=1, queries=3, heads=2, dims=8, points=2, shapes=((3, 4), (2, 2)),
                        device='cuda')
    assert_opcheck(torch.ops.turbox_mm.ms_deform_attn.default, small)

    def block(value, loc, weights):
        return msda.ms_deform_attn(value, shape, start, loc, weights.softmax(-1)).sum()

    leaves = [t.detach().requires_grad_() for t in (value, loc, weights)]
    torch.compile(block, fullgraph=True)(*leaves).backward()
    eager = [t.detach().requires_grad_() for t in (value, loc, weights)]
    block(*eager).backward()
    # Value gradients accumulate with float32 atomics, whose order varies from run to run.
    for got, ref in zip(leaves, eager):
        torch.testing.assert_close(got.grad, ref.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.cuda
def test_cuda_micro_benchmark_quick():
    rows = bench.benchmark('cuda', quick=True)
    assert len(rows) == 2 and all(r['stock'] and r['turbox'] for r in rows)
