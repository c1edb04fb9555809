"""turbox_mm.ops.bev_pool: kernels and reference against the lift-splat definition.

On the CPU the Triton kernels run in the interpreter (conftest sets ``TRITON_INTERPRET=1``) at
small sizes; the ``cuda`` tests run them compiled at BEVFusion's size.
"""
import pytest
import torch

from conftest import compile_for_sm90_in_subprocess
from turbox_mm.ops import bev_pool as bp
from turbox_mm.ops import dispatch

pytest.importorskip('turbox_mm.ops.bev_pool.triton_kernels')

LOWER, SIZE = [-3.0, -3.0, -2.0], [0.5, 0.75, 2.0]
GRID = [12, 8, 2]


def make_inputs(b=2, n=3, d=5, h=4, w=7, c=6, seed=0, dtype=torch.float32):
    """Depth logits, features and point coordinates around the grid (some out, some NaN, some
    just below the lower bound, several points per cell)."""
    gen = torch.Generator().manual_seed(seed)
    depth = torch.randn(b, n, d, h, w, generator=gen)
    feats = torch.randn(b, n, c, h, w, generator=gen)
    geom = (torch.rand(b, n, d, h, w, 3, generator=gen) * 2 - 1) * torch.tensor([4.0, 4.0, 3.0])
    geom.view(-1, 3)[::17] = torch.tensor([-3.2, -3.1, -1.9])  # v in (-1, 0): cell 0, kept
    geom.view(-1, 3)[5::23, 0] = float('nan')
    return depth.to(dtype), feats.to(dtype), geom


def loop_spec(depth, feats, geom, logits):
    """One point at a time, from the definition (float64 sums)."""
    b_, n_, d_, h_, w_ = depth.shape
    c_ = feats.shape[2]
    prob = depth.double().softmax(2) if logits else depth.double()
    out = torch.zeros(b_, GRID[0], GRID[1], GRID[2] * c_, dtype=torch.float64)
    low = torch.tensor(LOWER, dtype=torch.float32)
    size = torch.tensor(SIZE, dtype=torch.float32)
    for b in range(b_):
        for n in range(n_):
            for d in range(d_):
                for h in range(h_):
                    for w in range(w_):
                        v = (geom[b, n, d, h, w].float() - low) / size
                        if not all(-1 < float(v[i]) < GRID[i] for i in range(3)):
                            continue
                        x, y, z = (int(float(t)) for t in v)  # truncation, as .long()
                        out[b, x, y, z * c_:(z + 1) * c_] += prob[b, n, d, h, w] * \
                            feats[b, n, :, h, w].double()
    return out


def kernel(fn, *args, **kwargs):
    with dispatch.kernel_on_cpu():
        return fn(*args, **kwargs)


def run(impl, depth, feats, geom, logits):
    fn = bp.bev_pool_op
    args = (depth, feats, geom, LOWER, SIZE, GRID, logits)
    return kernel(fn, *args) if impl == 'kernel' else fn(*args)


def backward(impl, out, grad):
    """``out.backward(grad)``, through the kernels for ``impl == 'kernel'`` (the dispatch is
    read when the backward runs)."""
    if impl == 'kernel':
        kernel(out.backward, grad)
    else:
        out.backward(grad)


@pytest.mark.parametrize('logits', [False, True])
@pytest.mark.parametrize('impl', ['kernel', 'reference'])
def test_forward_equals_the_point_by_point_definition(impl, logits):
    depth, feats, geom = make_inputs()
    if not logits:
        depth = depth.softmax(2)
    got = run(impl, depth, feats, geom, logits)
    want = loop_spec(depth, feats, geom, logits)
    assert got.shape == (2, 12, 8, 12) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert int((want != 0).any(-1).sum()) > 50  # many cells hit, several points each


@pytest.mark.parametrize('logits', [False, True])
@pytest.mark.parametrize('impl', ['kernel', 'reference'])
def test_gradients_equal_autograd_of_the_definition(impl, logits):
    depth, feats, geom = make_inputs(seed=1)
    d64 = depth.double().requires_grad_(True)
    f64 = feats.double().requires_grad_(True)
    prob = d64.softmax(2) if logits else d64
    cells, kept = bp.cell_indices(geom, LOWER, SIZE, GRID)
    lifted = prob.unsqueeze(-1) * f64.permute(0, 1, 3, 4, 2).unsqueeze(2)
    want = torch.zeros(2 * 12 * 8 * 2, 6, dtype=torch.float64)
    want = want.index_add(0, cells[kept], lifted[kept])
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(2),
                       dtype=torch.float64)
    want.backward(grad)
    d32, f32 = depth.clone().requires_grad_(True), feats.clone().requires_grad_(True)
    out = run(impl, d32, f32, geom, logits)  # 5 bins: the interpreter's blocks of 2 split them
    backward(impl, out, grad.float().view(out.shape))
    torch.testing.assert_close(d32.grad.double(), d64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(f32.grad.double(), f64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_16_bit_inputs_sum_in_float32(dtype):
    depth, feats, geom = make_inputs(seed=3, dtype=dtype)
    got = run('kernel', depth, feats, geom, True)
    want = bp.bev_pool_reference(depth, feats, geom, LOWER, SIZE, GRID, True)
    assert got.dtype == dtype
    tol = 2**-8 if dtype == torch.float16 else 2**-6  # one final rounding to the 16-bit type
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_non_contiguous_inputs_as_a_depth_nets_output_slices():
    b, n, d, c, h, w = 2, 2, 5, 3, 4, 9
    gen = torch.Generator().manual_seed(4)
    net_out = torch.randn(b * n, d + c + 2, h, w, generator=gen)  # [depth | feats | unused]
    depth = net_out[:, :d].view(b, n, d, h, w)
    feats = net_out[:, d:d + c].view(b, n, c, h, w)
    assert not depth.is_contiguous() and not feats.is_contiguous()
    geom = make_inputs(b, n, d, h, w, c, seed=4)[2]
    for logits in (False, True):
        got = run('kernel', depth, feats, geom, logits)
        want = bp.bev_pool_reference(depth.contiguous(), feats.contiguous(), geom, LOWER, SIZE,
                                     GRID, logits)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('shape', [(1, 1, 1, 1, 1, 1), (1, 2, 3, 1, 17, 5), (0, 2, 3, 2, 2, 4),
                                   (1, 1, 4, 2, 3, 0)])
@pytest.mark.parametrize('impl', ['kernel', 'reference'])
def test_odd_and_empty_shapes(impl, shape):
    depth, feats, geom = make_inputs(*shape, seed=5)
    depth.requires_grad_(True)
    feats.requires_grad_(True)
    out = run(impl, depth, feats, geom, True)
    assert out.shape == (shape[0], 12, 8, 2 * shape[5])
    want = bp.bev_pool_reference(depth.detach(), feats.detach(), geom, LOWER, SIZE, GRID, True)
    torch.testing.assert_close(out.detach(), want, rtol=1e-5, atol=1e-6)
    backward(impl, out, torch.ones_like(out))
    assert depth.grad.shape == depth.shape and feats.grad.shape == feats.shape
    want_grads = bp.bev_pool_backward_reference(torch.ones_like(want), depth.detach(),
                                                feats.detach(), geom, LOWER, SIZE, GRID, True)
    torch.testing.assert_close(depth.grad, want_grads[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feats.grad, want_grads[1], rtol=1e-5, atol=1e-6)


def test_infinite_logits_poison_their_pixel_as_the_softmax_does():
    """A pixel with a +inf logit: torch's softmax makes all its bins NaN; -inf logits (all of
    a pixel's, or some) as torch too. The kernels give the same cells and gradients."""
    depth, feats, geom = make_inputs(b=1, n=1, d=4, h=2, w=3, c=2, seed=9)
    geom[0, 0, :, 0, 0] = torch.tensor([[-2.9, -2.9, 0.0], [-1.9, -2.9, 0.0],
                                        [-0.9, -2.9, 0.0], [0.1, -2.9, 0.0]])  # 4 cells
    depth[0, 0, 1, 0, 0] = float('inf')
    depth[0, 0, :, 0, 1] = float('-inf')
    depth[0, 0, 2, 1, 2] = float('-inf')
    want = bp.bev_pool_reference(depth, feats, geom, LOWER, SIZE, GRID, True)
    got = run('kernel', depth, feats, geom, True)
    assert int(want.isnan().any(-1).sum()) >= 4  # the +inf pixel's four cells
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)
    grad = torch.randn_like(want)
    want_grads = bp.bev_pool_backward_reference(grad, depth, feats, geom, LOWER, SIZE, GRID,
                                                True)
    got_grads = kernel(torch.ops.turbox_mm.bev_pool_backward, grad, depth, feats, geom, LOWER,
                       SIZE, GRID, True)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_public_function_returns_the_channels_last_bev():
    depth, feats, geom = make_inputs(seed=6)
    bev = bp.bev_pool(depth, feats, geom, LOWER, SIZE, GRID, depth_logits=True)
    assert bev.shape == (2, 12, 12, 8)  # [B, Z * C, X, Y]
    assert bev.is_contiguous(memory_format=torch.channels_last)
    storage = bp.bev_pool_reference(depth, feats, geom, LOWER, SIZE, GRID, True)
    assert torch.equal(bev, storage.permute(0, 3, 1, 2))


@pytest.mark.parametrize('change, match', [
    (dict(depth=torch.zeros(2, 3, 5, 4)), 'depth must be'),
    (dict(feats=torch.zeros(2, 3, 6, 4, 8)), 'feats must be'),
    (dict(geom=torch.zeros(2, 3, 5, 4, 7, 2)), 'geom must be'),
    (dict(feats=torch.zeros(2, 3, 6, 4, 7, dtype=torch.float64)), 'feats must be float16'),
    (dict(grid=[12, 8]), 'need 3 values'),
    (dict(cell_size=[0.5, 0.0, 2.0]), 'cell_size must be > 0'),
])
def test_bad_inputs_get_named_errors(change, match):
    depth, feats, geom = make_inputs()
    args = dict(depth=depth, feats=feats, geom=geom, lower=LOWER, cell_size=SIZE, grid=GRID)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        bp.bev_pool(**args)


def test_opcheck_and_compile():
    depth, feats, geom = make_inputs(b=1, n=2, d=3, h=2, w=5, c=4, seed=7)
    torch.library.opcheck(torch.ops.turbox_mm.bev_pool.default,
                          (depth.requires_grad_(True), feats.requires_grad_(True), geom,
                           LOWER, SIZE, GRID, True))

    def step(d, f):
        return bp.bev_pool(d, f, geom, LOWER, SIZE, GRID, depth_logits=True).square().sum()

    d1 = depth.detach().clone().requires_grad_(True)
    f1 = feats.detach().clone().requires_grad_(True)
    got = torch.compile(step, backend='aot_eager', fullgraph=True)(d1, f1)
    got.backward()
    d2 = depth.detach().clone().requires_grad_(True)
    f2 = feats.detach().clone().requires_grad_(True)
    want = step(d2, f2)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(d1.grad, d2.grad)
    torch.testing.assert_close(f1.grad, f2.grad)


@pytest.mark.parametrize('channels', [1, 6, 100, 1500])
@pytest.mark.parametrize('rows', [1, 5, 32, 64])
def test_there_are_candidates_for_any_channel_and_row_count(channels, rows):
    from turbox_mm.ops.bev_pool import triton_kernels as tk
    for kind in ('fwd', 'bwd'):
        configs = tk.config_dicts(kind, channels, rows)
        # the register tiles [HB * P, BLOCK_C], with no more rows than the image has (padded)
        assert configs and all(c['HB'] * c['P'] * c['BLOCK_C'] <= tk.TILE_LIMIT
                               for c in configs)
        assert all(c['HB'] <= max(rows, 1) * 2 - 1 for c in configs)
        assert len({tuple(sorted(c.items())) for c in configs}) == len(configs)
        # channel blocks on a grid axis: any block size covers any channel count
        assert all(c['BLOCK_C'] <= max(channels * 2 - 1, 1) for c in configs)
        if kind == 'bwd' and channels <= 100:  # and one program of every channel fits
            assert any(c['BLOCK_C'] >= channels for c in configs)


@pytest.mark.parametrize('kind', ['fwd', 'bwd'])
def test_every_autotuning_candidate_equals_the_reference(kind):
    """Each configuration the autotuner may pick on CUDA (tiles of rows and pixels, channel
    and bin blocks, warps), with image rows that share cells (as a camera column's rows at
    one depth do), cells shared by neighbouring pixels, a row count (12) and pixel count (9)
    that the tiles do not divide, and more bins (35) than the blocks of 16 or 32 bins."""
    from turbox_mm.ops.bev_pool import triton_kernels as tk
    depth, feats, geom = make_inputs(b=1, n=1, d=35, h=12, w=9, c=20)  # bins: > 16, > 32
    geom[:, :, :, 1:9] = geom[:, :, :, 1:2]  # rows 1-8 at each depth: one cell
    geom[:, :, :, :, 4:6] = geom[:, :, :, :, 3:4]  # and pixels 3-5
    args = (LOWER, SIZE, GRID, True)
    want = bp.bev_pool_reference(depth, feats, geom, *args)
    grad = torch.randn_like(want)
    want_grads = bp.bev_pool_backward_reference(grad, depth, feats, geom, *args)
    configs = tk.config_dicts(kind, feats.shape[2], depth.shape[3])
    assert len(configs) >= 6
    assert {c['HB'] for c in configs} == {16}  # 32-row tiles capped at the 12 rows (16)
    assert {c['P'] for c in configs} >= ({1, 2} if kind == 'fwd' else {1})
    assert {c['PIPE'] for c in configs} == {0, 1}
    assert {c['DB'] for c in configs} >= {16 if kind == 'bwd' else 32, 32, 1024}
    # blocks of 16 channels split the 20 (the backward adds their depth gradients atomically)
    assert {c['BLOCK_C'] for c in configs} == {16, 32}
    for config in configs:
        if kind == 'fwd':
            got = tk.bev_pool_forward(depth, feats, geom, *args, config=config)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=str(config))
        else:
            got = tk.bev_pool_backward(grad, depth, feats, geom, *args, config=config)
            for g, w in zip(got, want_grads):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=str(config))


def test_kernels_visit_a_level_column_and_interleaved_cells_of_a_tile():
    """The forward sums a tile's points cell by cell (one atomic row per distinct cell of a
    bin), and the backward gathers the rows of shared cells: a level camera's column (every
    row at one depth in one cell) and two cells interleaved in one tile give the reference's
    values."""
    from turbox_mm.ops.bev_pool import triton_kernels as tk
    depth, feats, geom = make_inputs(b=1, n=1, d=3, h=8, w=2, c=4, seed=8)
    geom[..., :, :, :] = geom[:, :, :, :1]  # every row of a column: the first row's point
    geom[:, :, :, 1::2, 1] = geom[:, :, :, :1, 0]  # pixel 1's odd rows: pixel 0's cell
    want = bp.bev_pool_reference(depth, feats, geom, LOWER, SIZE, GRID, True)
    for pipe in (False, True):
        config = dict(P=2, HB=8, BLOCK_C=4, DB=1024, PIPE=pipe, num_warps=1)
        got = tk.bev_pool_forward(depth, feats, geom, LOWER, SIZE, GRID, True, config=config)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(want)
    want_grads = bp.bev_pool_backward_reference(grad, depth, feats, geom, LOWER, SIZE, GRID,
                                                True)
    for block_c, bins in ((4, 1024), (2, 1)):
        config = dict(P=2, HB=8, BLOCK_C=block_c, DB=bins, PIPE=True, num_warps=1)
        got = tk.bev_pool_backward(grad, depth, feats, geom, LOWER, SIZE, GRID, True,
                                   config=config)
        for g, w in zip(got, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=str(config))
    assert int((want != 0).any(-1).sum()) <= 6  # at most 2 cells per bin were hit


@pytest.mark.parametrize('logits', [False, True])
@pytest.mark.parametrize('channels,block_c,bins', [(80, 32, 16), (20, 16, 16), (80, 64, 1024)])
def test_backward_sums_blocks_of_channels_and_of_bins(channels, block_c, bins, logits):
    """The backward split over channel blocks (each adds its share of the depth gradient and
    of ``sum_d p g``) and bin blocks at once, with a partly masked last channel block (80 =
    2 x 32 + 16, 20 = 16 + 4): the reference's gradients, with and without the softmax."""
    from turbox_mm.ops.bev_pool import triton_kernels as tk
    depth, feats, geom = make_inputs(b=1, n=2, d=35, h=3, w=2, c=channels, seed=3)
    args = (LOWER, SIZE, GRID, logits)
    if not logits:
        depth = depth.softmax(2)
    grad = torch.randn_like(bp.bev_pool_reference(depth, feats, geom, *args))
    want = bp.bev_pool_backward_reference(grad, depth, feats, geom, *args)
    config = dict(P=2, HB=2, BLOCK_C=block_c, DB=bins, PIPE=bins > 16, num_warps=1)
    got = tk.bev_pool_backward(grad, depth, feats, geom, *args, config=config)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# -- on the GPU: BEVFusion's size --------------------------------------------------------------

from turbox_mm.benchmark.micro.bev_pool import BEV_GRID as BEV_ARGS  # noqa: E402
from turbox_mm.benchmark.micro.bev_pool import ROLL_DEG  # noqa: E402
from turbox_mm.benchmark.micro.bev_pool import camera_rays  # noqa: E402


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('roll', [0.0, ROLL_DEG])
def test_cuda_kernel_equals_the_reference_at_bevfusion_size(roll):
    """Level cameras (one cell per image column and bin) and rolled images (several)."""
    depth, feats, geom = camera_rays(b=2, device='cuda', roll_deg=roll)
    d1, f1 = depth.clone().requires_grad_(True), feats.clone().requires_grad_(True)
    got = bp.bev_pool_op(d1, f1, geom, *BEV_ARGS, True)
    with torch.no_grad():
        want = bp.bev_pool_reference(depth, feats, geom, *BEV_ARGS, True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(got)
    got.backward(grad)
    gd, gf = bp.bev_pool_backward_reference(grad, depth, feats, geom, *BEV_ARGS, True)
    torch.testing.assert_close(d1.grad, gd, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(f1.grad, gf, rtol=1e-4, atol=1e-4)


def test_micro_benchmark_runs_quick_on_the_cpu():
    from turbox_mm.benchmark.micro import available, get
    assert 'bev_pool' in available('op')
    rows = get('bev_pool')('cpu', quick=True)
    assert [r['case'] for r in rows] == ['forward (softmax + pool)', 'forward + backward',
                                         'forward + backward, images rolled 5.4 degrees']
    assert all(r['stock']['median_ms'] > 0 and r['turbox']['median_ms'] > 0 for r in rows)


COMPILE_SCRIPT = r'''
import sys
from turbox_mm.ops.bev_pool import triton_kernels as tk
from turbox_mm.testing.triton_aot import compile_variants

SIZES = ('N', 'D', 'H', 'W', 'C', 'X', 'Y', 'Z', 'sd_w', 'sf_w')
FLOATS = ('lx', 'ly', 'lz', 'sx', 'sy', 'sz')
variants = []
for dtype in ('*fp32', '*fp16', '*bf16'):
    for logits in (False, True):
        for ones in ((), SIZES):
            for pixels, rows in ((1, 32), (4, 8)):
                variants.append((tk._forward_kernel,
                                 dict(LOGITS=logits, P=pixels, HB=rows, BLOCK_C=32, DB=32,
                                      PIPE=rows == 32), ones,
                                 dict(depth_ptr=dtype, lse_ptr='*fp32', feat_ptr=dtype,
                                      geom_ptr='*fp32', out_ptr='*fp32')))
                variants.append((tk._backward_kernel,
                                 dict(LOGITS=logits, P=pixels, HB=rows, BLOCK_C=128, DB=32,
                                      PIPE=rows == 32), ones,
                                 dict(grad_ptr=dtype, depth_ptr=dtype, lse_ptr='*fp32',
                                      feat_ptr=dtype, geom_ptr='*fp32', gdepth_ptr='*fp32',
                                      gfeat_ptr='*fp32', dot_ptr='*fp32')))
            variants.append((tk._softmax_backward_kernel, dict(BLOCK=tk.SOFTMAX_BLOCK), ones,
                             dict(depth_ptr=dtype, lse_ptr='*fp32', dot_ptr='*fp32',
                                  gdepth_ptr='*fp32')))
# every autotuning candidate as a launch at BEVFusion's size specialises it: Z = 1, depth and
# features contiguous in w, and H (32), C (80) and the larger strides multiples of 16 (MapTR
# v2's 64 channels too); a layout-pass failure of Triton showed only so (module docstring of
# turbox_mm/testing/triton_aot.py)
RUNTIME_ONES = ('Z', 'sd_w', 'sf_w')
DIVISIBLE = ('H', 'C', 'sd_b', 'sd_n', 'sd_d', 'sf_b', 'sf_n', 'sf_c')
for channels in (80, 64):
    for logits in (False, True):
        for kind, kernel in (('fwd', tk._forward_kernel), ('bwd', tk._backward_kernel)):
            for config in tk.config_dicts(kind, channels):
                config = dict(config)
                warps = config.pop('num_warps')
                pointers = (dict(depth_ptr='*fp32', lse_ptr='*fp32', feat_ptr='*fp32',
                                 geom_ptr='*fp32', out_ptr='*fp32') if kind == 'fwd' else
                            dict(grad_ptr='*fp32', depth_ptr='*fp32', lse_ptr='*fp32',
                                 feat_ptr='*fp32', geom_ptr='*fp32', gdepth_ptr='*fp32',
                                 gfeat_ptr='*fp32', dot_ptr='*fp32'))
                variants.append((kernel, dict(config, LOGITS=logits), RUNTIME_ONES, pointers,
                                 dict(divisible=DIVISIBLE, num_warps=warps)))
failures = compile_variants(variants, floats=FLOATS)
print('\n'.join(failures) or 'all compiled')
sys.exit(1 if failures else 0)
'''


@pytest.mark.slow
def test_kernels_compile_for_sm90_for_every_dtype_and_specialisation(tmp_path):
    """The interpreter runs Python, not Triton's compiler: compile both kernels for the H200's
    sm_90, for every input dtype, with and without the softmax, size arguments at 1, and every
    autotuning candidate as a launch at BEVFusion's and MapTR v2's sizes specialises it."""
    compile_for_sm90_in_subprocess(COMPILE_SCRIPT, tmp_path)
