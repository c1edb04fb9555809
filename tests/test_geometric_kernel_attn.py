"""turbox_mm.ops.geometric_kernel_attn: reference vs upstream's kernel, kernels vs reference, the
op, the benchmark.

On the CPU the Triton kernels run in Triton's interpreter (conftest sets ``TRITON_INTERPRET=1``)
at small odd sizes; the ``cuda`` tests run them compiled at MapTR v1's size against the
reference on the GPU (upstream's CUDA extension is not installable).
"""
import warnings
from itertools import product

import numpy as np
import pytest
import torch

from op_checks import (assert_benchmark_cli_without_cuda, assert_benchmark_skips_without_cuda,
                       assert_compile_matches_eager,
                       assert_dispatch_warns_once_and_env_forces_reference, assert_gradcheck,
                       assert_op_empty_on_both_paths, assert_opcheck, grad_out_for, max_err,
                       quiet_on_path, with_grad)
from turbox_mm.benchmark.micro import geometric_kernel_attn as bench
from turbox_mm.ops import geometric_kernel_attn as gka
from turbox_mm.ops.geometric_kernel_attn import op as gka_op
from turbox_mm.ops.geometric_kernel_attn.reference import geometric_kernel_attn_reference

triton = pytest.importorskip('triton')
K = pytest.importorskip('turbox_mm.ops.geometric_kernel_attn.triton_kernels')

SMALL = dict(bs=2, queries=11, heads=3, dims=16, points=3, shapes=((7, 5), (3, 3)))


def make_inputs(bs=2, queries=11, heads=3, dims=16, points=3, shapes=((7, 5), (3, 3)),
                dtype=torch.float32, device='cpu', seed=0, margin=3, loc_dtype=torch.int64):
    """Random inputs; locations uniform over each level widened by ``margin`` pixels on every
    side (some samples clamped to the border)."""
    gen = torch.Generator().manual_seed(seed)
    shape = torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2)
    counts = shape[:, 0] * shape[:, 1]
    start = counts.cumsum(0) - counts
    levels = len(shapes)
    value = torch.randn(bs, int(counts.sum()), heads, dims, generator=gen, dtype=torch.float64)
    unit = torch.rand(bs, queries, heads, levels, points, 2, generator=gen, dtype=torch.float64)
    size = shape.flip(-1).to(torch.float64)[:, None, :]  # (W, H) per level
    loc = (unit * (size + 2 * margin) - margin).floor().to(loc_dtype)
    weights = torch.rand(bs, queries, heads, levels, points, generator=gen, dtype=torch.float64)
    return (value.to(device, dtype), shape.to(device), start.to(device), loc.to(device),
            weights.to(device, dtype))


def reference_grads(args, grad_out, dtype=None):
    """Forward and gradients (value, weights) of the reference, optionally in ``dtype``."""
    value, shape, start, loc, weights = args
    if dtype is not None:
        value, weights, grad_out = value.to(dtype), weights.to(dtype), grad_out.to(dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (value, weights)]
    out = geometric_kernel_attn_reference(leaves[0], shape, start, loc, leaves[1])
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    return out.detach(), grads


def assert_kernel_matches_reference(args, out_tol=1e-5, grad_tol=1e-4, config=None):
    grad_out = grad_out_for(args)
    want, want_grads = reference_grads(args, grad_out, torch.float64)
    out = K.geometric_kernel_attn_forward(*args, config=config)
    assert out.dtype == args[0].dtype and out.shape == want.shape and out.is_contiguous()
    torch.testing.assert_close(out.double(), want, rtol=out_tol, atol=out_tol)
    grads = K.geometric_kernel_attn_backward(grad_out, *args, config=config)
    for name, got, ref, inp in zip(('value', 'weights'), grads, want_grads, (args[0], args[4])):
        assert got.dtype == inp.dtype and got.shape == inp.shape, name
        torch.testing.assert_close(got.double(), ref, rtol=grad_tol, atol=grad_tol, msg=name)


# --------------------------------------------------------------------------------------------
# The reference: upstream's CUDA kernel transcribed loop by loop
# --------------------------------------------------------------------------------------------


def upstream_cuda_loops(value, shape, start, loc, weights, grad_out):
    """geometric_kernel_attn_cuda_kernel.cuh (hustvl/MapTR @ 67cadd8) in numpy float64.

    One (batch, query, head, level, point) at a time, all channels at once: the location's
    column and row clipped to [0, W - 1] and [0, H - 1], the pixel's channels times the weight
    summed into the output; backward: the pixel's value gradient += grad_out * weight, the
    weight gradient = sum over channels of grad_out * the pixel's value.
    """
    value, weights, grad_out = (t.detach().double().numpy() for t in (value, weights, grad_out))
    loc, shape, start = loc.numpy(), shape.numpy(), start.numpy()
    bs, _, heads, dims = value.shape
    _, queries, _, levels, points, _ = loc.shape
    out = np.zeros((bs, queries, heads, dims))
    g_value, g_w = np.zeros_like(value), np.zeros_like(weights)
    grad_out = grad_out.reshape(bs, queries, heads, dims)
    for b, q, h, lvl, p in product(range(bs), range(queries), range(heads), range(levels),
                                   range(points)):
        height, width = shape[lvl]
        loc_w, loc_h = loc[b, q, h, lvl, p]
        row = start[lvl] + min(max(loc_h, 0), height - 1) * width + min(max(loc_w, 0), width - 1)
        wgt = weights[b, q, h, lvl, p]
        out[b, q, h] += value[b, row, h] * wgt
        g_value[b, row, h] += grad_out[b, q, h] * wgt
        g_w[b, q, h, lvl, p] = (grad_out[b, q, h] * value[b, row, h]).sum()
    return out.reshape(bs, queries, heads * dims), (g_value, g_w)


def test_reference_and_kernel_reproduce_upstream_cuda_kernel():
    args = make_inputs(bs=2, queries=5, heads=2, dims=4, points=4, shapes=((3, 4), (2, 3)),
                       dtype=torch.float64, margin=4)
    grad_out = grad_out_for(args, seed=3)
    want_out, want_grads = upstream_cuda_loops(*args, grad_out)
    out, grads = reference_grads(args, grad_out)
    np.testing.assert_allclose(out.numpy(), want_out, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    out = K.geometric_kernel_attn_forward(*args)  # float64 in, float64 accumulation
    np.testing.assert_allclose(out.numpy(), want_out, rtol=1e-12, atol=1e-12)
    for got, want in zip(K.geometric_kernel_attn_backward(grad_out, *args), want_grads):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


def test_reference_small_example_and_border_clamping():
    value = torch.arange(6.).reshape(1, 6, 1, 1)  # one 2x3 level: rows [0 1 2], [3 4 5]
    shape, start = torch.tensor([[2, 3]]), torch.tensor([0])
    w = torch.ones(1, 1, 1, 1, 1)

    def at(x, y):
        loc = torch.tensor([x, y]).reshape(1, 1, 1, 1, 1, 2)
        return geometric_kernel_attn_reference(value, shape, start, loc, w).item()

    assert [at(x, y) for y in (0, 1) for x in (0, 1, 2)] == [0, 1, 2, 3, 4, 5]  # (x, y) = col, row
    assert at(-1, 0) == 0 and at(-100, 1) == 3  # left of the map: column 0
    assert at(3, 0) == 2 and at(10**12, 1) == 5  # right: column 2
    assert at(1, -5) == 1 and at(1, 2) == 4  # above and below: rows 0 and 1
    assert at(-7, 9) == 3 and at(5, -5) == 2  # corners


def test_reference_level_tables():
    """Levels are read from level_start_index (not the running sums); a level past num_value
    raises; a level without pixels adds nothing."""
    value, shape, start, loc, weights = make_inputs(**SMALL)
    swapped = torch.cat([value[:, 35:], value[:, :35]], dim=1)  # the 3x3 level stored first
    got = geometric_kernel_attn_reference(swapped, shape, torch.tensor([9, 0]), loc, weights)
    torch.testing.assert_close(got, geometric_kernel_attn_reference(value, shape, start, loc,
                                                                    weights))
    with pytest.raises(ValueError, match='runs past num_value'):
        geometric_kernel_attn_reference(value[:, :40], shape, start, loc, weights)
    empty_level = torch.tensor([[7, 5], [0, 3]])
    only_first = weights.clone()
    only_first[:, :, :, 1] = 0
    want = geometric_kernel_attn_reference(value, shape, start, loc, only_first)
    torch.testing.assert_close(
        geometric_kernel_attn_reference(value, empty_level, start, loc, weights), want)
    torch.testing.assert_close(K.geometric_kernel_attn_forward(value, empty_level, start, loc,
                                                               weights), want)


# --------------------------------------------------------------------------------------------
# Kernels (Triton interpreter on the CPU) against the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize('size', [
    SMALL,
    dict(SMALL, heads=1, points=1, dims=32, queries=13, shapes=((4, 6), )),
    dict(SMALL, bs=1, heads=4, points=15, dims=64, queries=9, shapes=((15, 25), )),
    dict(SMALL, bs=1, heads=5, points=2, dims=12, queries=7, shapes=((7, 5), (3, 3), (1, 2),
                                                                     (2, 1))),
    dict(SMALL, bs=3, heads=2, points=5, dims=3, queries=3, shapes=((1, 1), )),
])
@pytest.mark.parametrize('block', [None, (4, 4)])
def test_kernel_forward_backward_match_reference_fp32(size, block):
    """The interpreter's default tile holds every sample of a query; 4 queries and 4 samples a
    program leave partial query and sample blocks and samples of two levels in one chunk."""
    config = None if block is None else dict(BLOCK_Q=block[0], BLOCK_K=block[1], num_warps=1)
    assert_kernel_matches_reference(make_inputs(**size), config=config)


def test_kernel_clamps_far_outside_and_int32_locations():
    args = make_inputs(**SMALL, margin=40)
    assert (args[3] < -30).any() and (args[3] > 30).any()
    assert_kernel_matches_reference(args)
    value, shape, start, loc, weights = args
    huge = loc * 10**11  # beyond int32: the clamp is done in int64
    assert_kernel_matches_reference((value, shape, start, huge, weights))
    int32 = make_inputs(**SMALL, loc_dtype=torch.int32)
    assert int32[3].dtype == torch.int32
    assert_kernel_matches_reference(int32)
    with gka_op.kernel_on_cpu():
        torch.testing.assert_close(gka.geometric_kernel_attn(*int32),
                                   geometric_kernel_attn_reference(*int32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kind', ['fwd', 'bwd'])
def test_every_autotuning_config(kind):
    """Each configuration autotuning may pick on a GPU computes the same (interpreter), at
    MapTR's samples and channels (one level of 15 points, 64 channels)."""
    args = make_inputs(bs=1, queries=9, heads=2, dims=64, points=15, shapes=((5, 7), ))
    grad_out = grad_out_for(args)
    want, want_grads = reference_grads(args, grad_out, torch.float64)
    configs = K.configs(kind, 1, 15, 64)
    assert len(configs) >= 4 and len({c['BLOCK_K'] for c in configs}) == 2
    for config in configs:
        if kind == 'fwd':
            got = K.geometric_kernel_attn_forward(*args, config=config)
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=str(config))
        else:
            grads = K.geometric_kernel_attn_backward(grad_out, *args, config=config)
            for got, ref in zip(grads, want_grads):
                torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4,
                                           msg=str(config))


def test_kernel_level_past_num_value_reads_nothing():
    """Level tables that point past ``value`` (not checked on the host, which would sync) make
    that level read zeros instead of memory outside the tensor; its weights get zero
    gradients."""
    value, shape, start, loc, weights = make_inputs(**SMALL)
    for first in (value.shape[1] - 4, -1):  # the 3x3 level would run past either end
        bad_start = start.clone()
        bad_start[1] = first
        got = K.geometric_kernel_attn_forward(value, shape, bad_start, loc, weights)
        only_first = weights.clone()
        only_first[:, :, :, 1] = 0
        torch.testing.assert_close(got, geometric_kernel_attn_reference(value, shape, start, loc,
                                                                        only_first))
        g_value, g_w = K.geometric_kernel_attn_backward(torch.ones_like(got), value, shape,
                                                        bad_start, loc, weights)
        assert (g_w[:, :, :, 1] == 0).all() and (g_w[:, :, :, 0] != 0).any()


def test_kernel_and_op_empty_inputs():
    for size in (dict(SMALL, queries=0), dict(SMALL, bs=0), dict(SMALL, points=0)):
        args = make_inputs(**size)
        out = K.geometric_kernel_attn_forward(*args)
        assert out.shape == (size['bs'], size['queries'], size['heads'] * size['dims'])
        assert (out == 0).all()
        grads = K.geometric_kernel_attn_backward(torch.zeros_like(out), *args)
        assert [g.shape for g in grads] == [args[0].shape, args[4].shape]
        assert all((g == 0).all() for g in grads)
        assert_op_empty_on_both_paths(gka.geometric_kernel_attn, args, (0, 4),
                                      (size['bs'], size['queries'], size['heads'] * size['dims']))


def test_kernel_non_contiguous_inputs():
    value, shape, start, loc, weights = make_inputs(**SMALL)
    value_t = value.transpose(2, 3).contiguous().transpose(2, 3)  # channels-first storage
    loc_s = torch.stack([loc, loc.flip(-1)], dim=-1)[..., 0]  # strided view of the same values
    w_p = weights.permute(4, 0, 1, 2, 3).contiguous().permute(1, 2, 3, 4, 0)
    shape_t = shape.t().contiguous().t()
    for t in (value_t, loc_s, w_p, shape_t):
        assert not t.is_contiguous()
    want = geometric_kernel_attn_reference(value, shape, start, loc, weights)
    got = K.geometric_kernel_attn_forward(value_t, shape_t, start, loc_s, w_p)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with gka_op.kernel_on_cpu():
        leaves = [t.detach().requires_grad_() for t in (value_t, w_p)]
        grad_out = grad_out_for((value, shape, start, loc, weights)).mT.contiguous().mT
        gka.geometric_kernel_attn(leaves[0], shape_t, start, loc_s, leaves[1]).backward(grad_out)
    _, want_grads = reference_grads((value, shape, start, loc, weights), grad_out)
    for leaf, ref in zip(leaves, want_grads):
        torch.testing.assert_close(leaf.grad, ref, rtol=1e-4, atol=1e-4)


def test_kernel_zero_gradient_rows_scatter_nothing():
    """A (query, head) whose output gradient is zero skips its value-gradient atomics (MapTR's
    padded rebatch rows): the gradients are the reference's; a NaN weight there adds nothing
    (upstream: NaN); a NaN in the output gradient still reaches the value gradient."""
    value, shape, start, loc, weights = args = make_inputs(**SMALL)
    bs, queries, heads, dims = value.shape[0], loc.shape[1], value.shape[2], value.shape[3]
    grad_out = grad_out_for(args).view(bs, queries, heads, dims)
    grad_out[:, 6:] = 0  # padded rows
    grad_out[0, 2, 1] = 0  # one head of one query
    grad_out = grad_out.view(bs, queries, heads * dims)
    _, want_grads = reference_grads(args, grad_out, torch.float64)
    got = K.geometric_kernel_attn_backward(grad_out, *args)
    for name, g, ref in zip(('value', 'weights'), got, want_grads):
        torch.testing.assert_close(g.double(), ref, rtol=1e-4, atol=1e-4, msg=name)
    nan_w = weights.clone()
    nan_w[1, 8, 0, 0, 0] = float('nan')
    g_value, g_w = K.geometric_kernel_attn_backward(grad_out, value, shape, start, loc, nan_w)
    torch.testing.assert_close(g_value, got[0])
    torch.testing.assert_close(g_w, got[1])
    nan_out = grad_out.clone()
    nan_out[1, 8, 0] = float('nan')
    g_value, _ = K.geometric_kernel_attn_backward(nan_out, *args)
    assert g_value[1].isnan().any() and not g_value[0].isnan().any()


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_kernel_low_precision_error_within_twice_reference(dtype):
    """flash-attention's rule: error vs float64 at most twice that of PyTorch in ``dtype``."""
    size = dict(SMALL, heads=2, dims=32, points=15, queries=9, shapes=((5, 7), ))
    args64 = make_inputs(**size, dtype=torch.float64)
    args = tuple(t.to(dtype) if t.is_floating_point() else t for t in args64)
    truth_args = tuple(t.double() if t.is_floating_point() else t for t in args)  # same values
    grad_out = grad_out_for(args, dtype=dtype)
    truth, truth_grads = reference_grads(truth_args, grad_out, torch.float64)
    ref, ref_grads = reference_grads(args, grad_out, dtype)
    out = K.geometric_kernel_attn_forward(*args)
    assert out.dtype == dtype
    assert max_err(out, truth) <= 2 * max_err(ref, truth) + 1e-6
    grads = K.geometric_kernel_attn_backward(grad_out, *args)
    for name, got, want, base in zip(('value', 'weights'), grads, truth_grads, ref_grads):
        assert got.dtype == dtype, name
        assert max_err(got, want) <= 2 * max_err(base, want) + 1e-6, name


def test_kernel_mixed_dtypes_as_under_autocast():
    """A 16-bit value with float32 weights: float32 math, 16-bit result."""
    value, shape, start, loc, weights = make_inputs(**SMALL)
    out = K.geometric_kernel_attn_forward(value.half(), shape, start, loc, weights)
    assert out.dtype == torch.float16
    want = geometric_kernel_attn_reference(value.half().double(), shape, start, loc,
                                           weights.double())
    assert max_err(out, want) <= 2 ** -11 * want.abs().max().item()  # float16's rounding
    grads = K.geometric_kernel_attn_backward(torch.ones_like(out), value.half(), shape, start,
                                             loc, weights)
    assert [g.dtype for g in grads] == [torch.float16, torch.float32]


# --------------------------------------------------------------------------------------------
# The op: dispatch, upstream's call, gradcheck, opcheck, torch.compile
# --------------------------------------------------------------------------------------------


def test_dispatch_reference_on_cpu_warns_once_and_env_forces_it(monkeypatch):
    assert_dispatch_warns_once_and_env_forces_reference(
        monkeypatch, gka.geometric_kernel_attn, gka, geometric_kernel_attn_reference, K,
        'geometric_kernel_attn_forward', make_inputs(**SMALL))


def test_upstream_call_drop_in():
    """``GeometricKernelAttentionFunc.apply`` with upstream's arguments, im2col_step included
    (bs 3 need not divide by it here), on both paths."""
    args = make_inputs(**dict(SMALL, bs=3))
    grad_out = grad_out_for(args)
    want, want_grads = reference_grads(args, grad_out)
    for ctx in (gka_op.kernel_on_cpu(), warnings.catch_warnings()):
        with ctx:
            warnings.simplefilter('ignore')
            leaves = [t.detach().requires_grad_() for t in (args[0], args[4])]
            out = gka.GeometricKernelAttentionFunc.apply(leaves[0], args[1], args[2], args[3],
                                                         leaves[1], 2)
            out.backward(grad_out)
        torch.testing.assert_close(out.detach(), want, rtol=1e-5, atol=1e-5)
        for leaf, ref in zip(leaves, want_grads):
            torch.testing.assert_close(leaf.grad, ref, rtol=1e-4, atol=1e-4)


def test_op_rejects_inconsistent_inputs():
    value, shape, start, loc, weights = make_inputs(**SMALL)
    with pytest.raises(ValueError, match='spatial_shapes'):
        gka.geometric_kernel_attn(value, shape[:1], start, loc, weights)
    with pytest.raises(ValueError, match='attn_weight'):
        gka.geometric_kernel_attn(value, shape, start, loc, weights[..., :2])
    with pytest.raises(ValueError, match='heads of value'):
        gka.geometric_kernel_attn(value[:, :, :2], shape, start, loc, weights)
    with pytest.raises(ValueError, match='integer'):
        gka.geometric_kernel_attn(value, shape.float(), start, loc, weights)
    with pytest.raises(ValueError, match='sampling_loc must be int64'):
        gka.geometric_kernel_attn(value, shape, start, loc.float(), weights)
    with pytest.raises(ValueError, match='float16'):
        gka.geometric_kernel_attn(value.int(), shape, start, loc, weights)


def test_no_gradient_for_locations():
    """The locations are integers: autograd has nothing to give them; value and weights get
    theirs."""
    value, shape, start, loc, weights = (t.requires_grad_() if t.is_floating_point() else t
                                         for t in make_inputs(**SMALL))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        out = gka.geometric_kernel_attn(value, shape, start, loc, weights)
    grads = torch.autograd.grad(out.sum(), (value, weights))
    assert all(g is not None for g in grads) and not loc.requires_grad


def test_gradcheck_float64_reference_path():
    args = with_grad(make_inputs(bs=1, queries=3, heads=2, dims=3, points=2,
                                 shapes=((3, 4), (2, 2)), dtype=torch.float64))
    assert_gradcheck(gka.geometric_kernel_attn, args, 'reference')
    assert torch.autograd.gradcheck(geometric_kernel_attn_reference, args)


def test_gradcheck_float64_kernel_in_interpreter():
    args = make_inputs(bs=1, queries=3, heads=2, dims=3, points=2, shapes=((3, 4), (2, 2)),
                       dtype=torch.float64, seed=4)
    assert_gradcheck(gka.geometric_kernel_attn, args, 'kernel')


@pytest.mark.parametrize('path', ['reference', 'kernel'])
def test_opcheck(path):
    args = make_inputs(bs=1, queries=3, heads=2, dims=8, points=2, shapes=((3, 4), (2, 2)))
    with quiet_on_path(path):
        assert_opcheck(torch.ops.turbox_mm.geometric_kernel_attn.default, args)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    args = make_inputs(**SMALL)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in args]
        out = torch.ops.turbox_mm.geometric_kernel_attn(*fake)
        grads = torch.ops.turbox_mm.geometric_kernel_attn_backward(out, *fake)
    assert out.shape == (2, 11, 3 * 16) and out.dtype == torch.float32
    assert [g.shape for g in grads] == [args[0].shape, args[4].shape]


def test_compile_fullgraph_no_graph_break():
    args = make_inputs(bs=1, queries=3, heads=2, dims=4, points=2, shapes=((3, 4), (2, 2)))
    value, shape, start, loc, weights = args
    proj = torch.nn.Linear(8, 8).double()

    def block(value, ref, weights):
        # As GeometryKernelAttention: integer locations rounded from reference points.
        loc = (ref * 4).round().long()
        out = gka.geometric_kernel_attn(value * 2, shape, start, loc, weights.softmax(-1))
        return proj(out.double()).square().sum()

    ref = loc.double() / 4 + 0.1
    assert_compile_matches_eager(block, (value, ref, weights), (0, 2))


# --------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------


def test_benchmark_inputs_at_maptr_v1_sizes():
    size = bench.CASES['MapTR v1 SCA, camera rig']
    value, shape, start, loc, weights = bench.make_inputs(size)
    queries = loc.shape[1]
    assert value.shape == (24, 375, 4, 64) and shape.tolist() == [[15, 25]]
    assert start.tolist() == [0] and loc.dtype == torch.int64
    assert loc.shape == (24, queries, 4, 1, 15, 2) and weights.shape == (24, queries, 4, 1, 15)
    assert 1000 < queries < 20000  # max_len: the camera with the most BEV queries in view
    torch.testing.assert_close(weights.sum(dim=(-1, -2)), torch.ones(24, queries, 4))
    # The kernel window: 5 columns x 3 rows around the rounded reference, dx major.
    near = (loc[0, :, :, 0, 7].abs() < 30).all(-1).nonzero()[0]  # an anchor near the image
    window = loc[0, near[0], near[1], 0] - loc[0, near[0], near[1], 0, 7]
    assert window[:, 0].tolist() == [-2] * 3 + [-1] * 3 + [0] * 3 + [1] * 3 + [2] * 3
    assert window[:, 1].tolist() == [-1, 0, 1] * 5
    # Padded rows of the shorter cameras sample around (0, 0); the batch shares one rig.
    ref, facts = bench.reference_points(size)
    cam = int(np.argmin(facts['in_view']))
    assert (loc[cam, -1, :, 0, 7] == 0).all() and (loc[cam, facts['in_view'][cam] - 1] != 0).any()
    assert torch.equal(loc[:6], loc[6:12])
    grad = bench.output_grad(size, queries)  # zero where SCA drops the padded rows' outputs
    for row in (cam, cam + 6):
        assert (grad[row, facts['in_view'][cam]:] == 0).all()
        assert (grad[row, :facts['in_view'][cam]] != 0).all()
    everyone = bench.make_inputs(bench.CASES['MapTR v1 SCA, 20000 queries'])
    assert everyone[3].shape == (24, 20000, 4, 1, 15, 2)


def test_micro_benchmark_skips_cleanly_without_cuda():
    assert_benchmark_skips_without_cuda('geometric_kernel_attn', 'need CUDA')


def test_benchmark_cli_ops_without_cuda(tmp_path, capsys):
    assert_benchmark_cli_without_cuda('geometric_kernel_attn',
                                      'MapTR v1 SCA, camera rig float32 fwd+bwd', 'need CUDA',
                                      tmp_path, capsys)


COMPILE_SCRIPT = r'''
import sys
from turbox_mm.ops.geometric_kernel_attn import triton_kernels as tk
from turbox_mm.testing.triton_aot import compile_variants

variants = []
for dtype in ('*fp32', '*fp16', '*bf16'):
    for loc in ('*i64', '*i32') if dtype == '*fp32' else ('*i64', ):
        for ones in ((), ('Q', 'S', 'HEADS', 'D', 'P', 'LP')) if dtype == '*fp32' else ((), ):
            const = dict(ACC=tk.tl.float32, BLOCK_Q=4, BLOCK_K=16, BLOCK_D=64)
            common = dict(value_ptr=dtype, shape_ptr='*i64', start_ptr='*i64', loc_ptr=loc,
                          w_ptr=dtype)
            variants.append((tk._gka_fwd_kernel, const, ones, dict(common, out_ptr=dtype)))
            variants.append((tk._gka_bwd_kernel, const, ones,
                             dict(common, gout_ptr=dtype, gvalue_ptr='*fp32', gw_ptr=dtype)))
# every autotuning candidate as a launch at MapTR v1's size specialises it (module docstring of
# turbox_mm/testing/triton_aot.py): GeometryKernelAttention of maptr_tiny_r50_24e, 4 heads of
# 64 channels (D a multiple of 16), one 15x25 level (375 values), a 3x5 kernel (15 points); the
# queries are the 20000 BEV cells (turbox's sync-free cross-attention: a multiple of 16) or a
# set max_len (any count); int32 locations (the cross-attention's) and int64 (the attention's
# default); float32 (the cross-attention runs with autocast off), and a float16 value with
# float32 weights (the op under autocast)
CASES = (('*fp32', '*fp32', '*i32', ('Q', 'D')),
         ('*fp32', '*fp32', '*i64', ('D', )),
         ('*fp16', '*fp32', '*i32', ('D', )))
for dtype, wdtype, loc, divisible in CASES:
    for kind, kernel in (('fwd', tk._gka_fwd_kernel), ('bwd', tk._gka_bwd_kernel)):
        for config in tk.configs(kind, 1, 15, 64):
            config = dict(config)
            warps = config.pop('num_warps')
            common = dict(value_ptr=dtype, shape_ptr='*i64', start_ptr='*i64', loc_ptr=loc,
                          w_ptr=wdtype)
            pointers = (dict(common, out_ptr=dtype) if kind == 'fwd' else
                        dict(common, gout_ptr=dtype, gvalue_ptr='*fp32', gw_ptr=wdtype))
            variants.append((kernel, dict(config, ACC=tk.tl.float32, BLOCK_D=64), (), pointers,
                             dict(divisible=divisible, num_warps=warps)))
failures = compile_variants(variants, floats=())
print('\n'.join(failures) or 'all compiled')
sys.exit(1 if failures else 0)
'''


@pytest.mark.slow
def test_kernels_compile_for_sm90_for_every_dtype_and_specialisation(tmp_path):
    """The interpreter runs Python, not Triton's compiler: compile both kernels for the H200's
    sm_90, for every input dtype, int32 and int64 locations, with every size argument at 1
    (Triton makes an int argument equal to 1 a constant), and every autotuning candidate as a
    launch at MapTR v1's size specialises it (multiples of 16 marked)."""
    from conftest import compile_for_sm90_in_subprocess
    compile_for_sm90_in_subprocess(COMPILE_SCRIPT, tmp_path)


# --------------------------------------------------------------------------------------------
# CUDA: compiled kernels against the reference at MapTR v1's size
# --------------------------------------------------------------------------------------------


def run_with_grads(fn, args, grad_out):
    value, shape, start, loc, weights = args
    leaves = [t.detach().clone().requires_grad_() for t in (value, weights)]
    out = fn(leaves[0], shape, start, loc, leaves[1])
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.cuda
@pytest.mark.parametrize('case', ['MapTR v1 SCA, camera rig', 'MapTR v1 SCA, 20000 queries'])
def test_cuda_matches_reference_at_maptr_v1_size_fp32(case):
    """value [24, 375, 4, 64], one 15x25 level, 15 points; forward and backward against the
    reference on the GPU, both float32 (the value gradient sums hundreds of samples a pixel,
    in another order); the output gradient is zero on the padded rows, as in the model."""
    args = bench.make_inputs(bench.CASES[case], 'cuda', torch.float32)
    assert gka.fallback_reason(args[0]) is None
    grad_out = bench.output_grad(bench.CASES[case], args[3].shape[1], 'cuda')
    out, grads = run_with_grads(gka.geometric_kernel_attn, args, grad_out)
    want, want_grads = run_with_grads(geometric_kernel_attn_reference, args, grad_out)
    assert out.dtype == torch.float32
    assert max_err(out, want) <= 1e-5 * want.abs().max().item()
    for name, got, ref in zip(('value', 'weights'), grads, want_grads):
        assert max_err(got, ref) <= 1e-4 * ref.abs().max().item(), name


@pytest.mark.cuda
def test_cuda_matches_float64_reference():
    size = dict(bench.CASES['MapTR v1 SCA, camera rig'], bs=1)
    args = bench.make_inputs(size, 'cuda', torch.float32)
    grad_out = grad_out_for(args)
    want, want_grads = reference_grads(args, grad_out, torch.float64)
    out = K.geometric_kernel_attn_forward(*args)
    assert max_err(out, want) <= 1e-6 * want.abs().max().item() + 1e-6
    for name, got, ref in zip(('value', 'weights'), K.geometric_kernel_attn_backward(
            grad_out, *args), want_grads):
        assert max_err(got, ref) <= 1e-5 * ref.abs().max().item(), name


@pytest.mark.cuda
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_cuda_low_precision_within_twice_reference(dtype):
    size = dict(bench.CASES['MapTR v1 SCA, camera rig'], bs=1)
    args = tuple(t.to(dtype) if t.is_floating_point() else t
                 for t in bench.make_inputs(size, 'cuda', torch.float32))
    grad_out = grad_out_for(args)
    truth, truth_grads = reference_grads(args, grad_out, torch.float64)  # same values, float64
    ref, ref_grads = reference_grads(args, grad_out)  # PyTorch in ``dtype``
    out, grads = run_with_grads(gka.geometric_kernel_attn, args, grad_out)
    assert out.dtype == dtype
    assert max_err(out, truth) <= 2 * max_err(ref, truth)
    for name, got, want, base in zip(('value', 'weights'), grads, truth_grads, ref_grads):
        assert max_err(got, want) <= 2 * max_err(base, want), name


@pytest.mark.cuda
@pytest.mark.parametrize('kind', ['fwd', 'bwd'])
def test_cuda_every_autotuning_config(kind):
    size = dict(bench.CASES['MapTR v1 SCA, camera rig'], bs=1)
    args = bench.make_inputs(size, 'cuda', torch.float32)
    grad_out = grad_out_for(args)
    want, want_grads = reference_grads(args, grad_out, torch.float64)
    for config in K.configs(kind, 1, 15, 64):
        if kind == 'fwd':
            got = K.geometric_kernel_attn_forward(*args, config=config)
            assert max_err(got, want) <= 1e-5 * want.abs().max().item(), config
        else:
            grads = K.geometric_kernel_attn_backward(grad_out, *args, config=config)
            for got, ref in zip(grads, want_grads):
                assert max_err(got, ref) <= 1e-4 * ref.abs().max().item(), config


@pytest.mark.cuda
def test_cuda_odd_shapes_empty_and_non_contiguous():
    for size in (SMALL, dict(SMALL, heads=5, dims=24, points=7, queries=37),
                 dict(SMALL, queries=0)):
        assert_kernel_matches_reference(make_inputs(**size, device='cuda'))
    value, shape, start, loc, weights = make_inputs(**SMALL, device='cuda')
    value_t = value.transpose(2, 3).contiguous().transpose(2, 3)
    torch.testing.assert_close(
        gka.geometric_kernel_attn(value_t, shape.cpu(), start, loc, weights),
        geometric_kernel_attn_reference(value, shape, start, loc, weights), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_autocast_opcheck_and_compile():
    size = dict(bench.CASES['MapTR v1 SCA, camera rig'], bs=1)
    value, shape, start, loc, weights = bench.make_inputs(size, 'cuda', torch.float32)
    with torch.autocast('cuda', dtype=torch.float16):
        out = gka.geometric_kernel_attn(value.half(), shape, start, loc, weights)
    assert out.dtype == torch.float16
    want = geometric_kernel_attn_reference(value.half().double(), shape, start, loc,
                                           weights.double())
    assert max_err(out, want) <= 2e-3 * want.abs().max().item() + 1e-3
    small = make_inputs(bs=1, queries=3, heads=2, dims=8, points=2, shapes=((3, 4), (2, 2)),
                        device='cuda')
    assert_opcheck(torch.ops.turbox_mm.geometric_kernel_attn.default, small)

    def block(value, weights):
        return gka.geometric_kernel_attn(value, shape, start, loc, weights.softmax(-1)).sum()

    leaves = [t.detach().requires_grad_() for t in (value, weights)]
    torch.compile(block, fullgraph=True)(*leaves).backward()
    eager = [t.detach().requires_grad_() for t in (value, weights)]
    block(*eager).backward()
    # Value gradients accumulate with float32 atomics, whose order varies from run to run.
    for got, ref in zip(leaves, eager):
        torch.testing.assert_close(got.grad, ref.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.cuda
def test_cuda_micro_benchmark_quick():
    rows = bench.benchmark('cuda', quick=True)
    assert len(rows) == 2 and all(r['stock'] and r['turbox'] for r in rows)
