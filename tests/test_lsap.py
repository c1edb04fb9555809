"""turbox_mm::lsap: the reference and the Triton kernel (in Triton's interpreter here) against
scipy's ``linear_sum_assignment``, ties included; padded batches, both orientations, empty and
non-finite problems, dtypes, strides; the op's registration (fake, torch.compile) and the
sm_90 compile of the kernel; on a GPU, scipy's assignment of a training step's batch without a
host sync."""
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsap

from op_checks import quiet_on_path
from turbox_mm.ops.lsap import (MAX_SIZE, check_inputs, linear_sum_assignment, lsap_op,
                                lsap_reference)


def _scipy(cost: np.ndarray, rows, cols) -> np.ndarray:
    """``[P, R]`` column per row from scipy, -1 where none (float64 costs)."""
    out = np.full(cost.shape[:2], -1, dtype=np.int64)
    for p, (r, c) in enumerate(zip(rows, cols)):
        if r and c:
            a, b = scipy_lsap(cost[p, :r, :c])
            out[p, a] = b
    return out


def _problems(seed, problems, rows, cols, kind):
    """Costs of one kind: 'random' (no ties), 'integer' (many ties), 'copies' (every row the
    same: only the tie rule decides), 'mixed' (integer costs plus tiny noise in some rows)."""
    rng = np.random.default_rng(seed)
    if kind == 'random':
        return rng.random((problems, rows, cols))
    if kind == 'integer':
        return rng.integers(0, 3, (problems, rows, cols)).astype(np.float64)
    if kind == 'copies':
        return np.repeat(rng.integers(0, 4, (problems, 1, cols)).astype(np.float64), rows, 1)
    noise = (rng.random((problems, rows, 1)) < 0.5) * rng.random((problems, rows, cols)) * 1e-9
    return rng.integers(0, 4, (problems, rows, cols)).astype(np.float64) + noise


def _solve(path, cost, rows, cols):
    with quiet_on_path(path):
        return linear_sum_assignment(cost, torch.as_tensor(rows), torch.as_tensor(cols))


KINDS = ('random', 'integer', 'copies', 'mixed')


@pytest.mark.parametrize('kind', KINDS)
def test_reference_equals_scipy_ties_included(kind):
    rng = np.random.default_rng(7)
    for trial in range(60):
        rows, cols = (int(x) for x in rng.integers(1, 14, 2))
        cost = _problems(trial, 2, rows, cols, kind)
        sizes_r, sizes_c = rng.integers(0, rows + 1, 2), rng.integers(0, cols + 1, 2)
        got = lsap_reference(torch.from_numpy(cost), torch.from_numpy(sizes_r),
                             torch.from_numpy(sizes_c))
        np.testing.assert_array_equal(got.numpy(), _scipy(cost, sizes_r, sizes_c),
                                      err_msg=f'trial {trial}')


@pytest.mark.parametrize('kind', KINDS)
def test_kernel_equals_scipy_ties_included(kind):
    rng = np.random.default_rng(11)
    for trial in range(12):
        rows, cols = (int(x) for x in rng.integers(1, 12, 2))
        cost = _problems(100 + trial, 3, rows, cols, kind)
        sizes_r, sizes_c = rng.integers(0, rows + 1, 3), rng.integers(0, cols + 1, 3)
        got = _solve('kernel', torch.from_numpy(cost), sizes_r, sizes_c)
        assert got.dtype == torch.long and got.shape == (3, rows)
        np.testing.assert_array_equal(got.numpy(), _scipy(cost, sizes_r, sizes_c),
                                      err_msg=f'trial {trial}')


@pytest.mark.parametrize('shape', [(1, 40, 7), (2, 6, 33), (1, 17, 17)])
def test_kernel_at_block_edges_and_larger_sizes(shape):
    """Sizes around the kernel's block (16 lanes at least, powers of two above)."""
    cost = _problems(3, *shape, 'mixed')
    got = _solve('kernel', torch.from_numpy(cost), [shape[1]] * shape[0], [shape[2]] * shape[0])
    np.testing.assert_array_equal(got.numpy(), _scipy(cost, [shape[1]] * shape[0],
                                                      [shape[2]] * shape[0]))


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float32])
def test_every_float_dtype_is_solved_in_float64(dtype):
    """The costs as given (rounded to the dtype), solved as scipy solves their float64 values."""
    cost = torch.from_numpy(_problems(5, 2, 6, 9, 'random')).to(dtype)
    want = _scipy(cost.double().numpy(), [6, 4], [9, 9])
    for path in ('kernel', 'reference'):
        np.testing.assert_array_equal(_solve(path, cost, [6, 4], [9, 9]).numpy(), want)


def test_non_contiguous_costs_and_sizes():
    """Any strides: a transposed view, a slice of a wider tensor, strided size vectors."""
    base = torch.from_numpy(_problems(9, 3, 11, 8, 'integer'))
    views = [base.transpose(1, 2), base[:, ::2, 1:], base[::2]]
    for view in views:
        assert not view.is_contiguous()
        sizes = torch.tensor([[view.shape[1], 0], [view.shape[1] - 1, 0],
                              [view.shape[1], 0]])[:view.shape[0], 0]
        cols = torch.full((view.shape[0] * 2, ), view.shape[2])[::2]
        want = _scipy(view.numpy(), sizes.numpy(), cols.numpy())
        for path in ('kernel', 'reference'):
            np.testing.assert_array_equal(_solve(path, view, sizes, cols).numpy(), want)


def test_empty_problems_and_sizes_outside_the_shape():
    cost = torch.from_numpy(_problems(4, 4, 5, 6, 'random'))
    # no rows, no columns, sizes above the shape (clamped), negative sizes (clamped to 0)
    rows, cols = torch.tensor([0, 5, 2**32 + 1, -3]), torch.tensor([6, 0, 2**31, 6])
    want = _scipy(cost.numpy(), [0, 5, 5, 0], [6, 0, 6, 6])
    assert (want[[0, 1, 3]] == -1).all()
    for path in ('kernel', 'reference'):
        np.testing.assert_array_equal(_solve(path, cost, rows, cols).numpy(), want)
        assert _solve(path, cost[:0], rows[:0], cols[:0]).shape == (0, 5)
        assert _solve(path, cost[:, :0], rows, cols).shape == (4, 0)
        out = _solve(path, cost[:, :, :0], rows, cols)
        assert out.shape == (4, 5) and (out == -1).all()


@pytest.mark.parametrize('bad', [float('nan'), float('inf'), float('-inf')])
def test_a_problem_with_a_non_finite_cost_is_not_solved(bad):
    """That problem gets -1 in every row on both paths; the others are solved; a non-finite
    value outside a problem's block (padding) is ignored."""
    cost = torch.from_numpy(_problems(6, 3, 4, 5, 'random'))
    cost[0, 2, 3] = bad
    cost[1, 3, 4] = bad  # padding of problem 1 (3 x 4)
    rows, cols = torch.tensor([4, 3, 4]), torch.tensor([5, 4, 5])
    for path in ('kernel', 'reference'):
        got = _solve(path, cost, rows, cols)
        assert (got[0] == -1).all()
        np.testing.assert_array_equal(got[1:].numpy(),
                                      _scipy(cost[1:].numpy(), [3, 4], [4, 5]))


def test_defaults_and_bad_inputs_are_named_errors():
    cost = torch.tensor([[[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]]])
    with quiet_on_path('reference'):
        assert linear_sum_assignment(cost).tolist() == [[1, 0, 2]]
        assert linear_sum_assignment(cost.transpose(1, 2)).tolist() == [[1, 0, 2]]
    sizes = torch.tensor([3])
    with pytest.raises(ValueError, match=r'lsap: cost must be \[problems, rows, cols\]'):
        check_inputs(cost[0], sizes, sizes)
    with pytest.raises(ValueError, match='lsap: cost must be float16'):
        check_inputs(cost.long(), sizes, sizes)
    with pytest.raises(ValueError, match='lsap: num_rows must be an integer'):
        check_inputs(cost, sizes.float(), sizes)
    with pytest.raises(ValueError, match=r'num_rows and num_cols must be \[1\]'):
        check_inputs(cost, torch.tensor([3, 3]), sizes)
    with pytest.raises(ValueError, match=f'at most {MAX_SIZE} rows and columns'):
        check_inputs(torch.zeros(1, 1, MAX_SIZE + 1), sizes, sizes)


def test_registration_fake_and_compile():
    cost = torch.from_numpy(_problems(8, 2, 5, 7, 'integer'))
    rows, cols = torch.tensor([5, 3]), torch.tensor([7, 7])
    with quiet_on_path('reference'):
        result = torch.library.opcheck(lsap_op, (cost, rows, cols),
                                       test_utils=('test_schema', 'test_faketensor'))
        assert all(v == 'SUCCESS' for v in result.values()), result
        compiled = torch.compile(lambda c, r, k: linear_sum_assignment(c * 2, r, k) + 1,
                                 fullgraph=True, backend='aot_eager')
        np.testing.assert_array_equal(compiled(cost, rows, cols).numpy(),
                                      _scipy(cost.numpy(), [5, 3], [7, 7]) + 1)


def test_benchmark_is_listed_and_skips_on_the_cpu():
    if torch.cuda.is_available():
        pytest.skip('checks the CPU-only rows')
    from turbox_mm.benchmark.micro import available, get
    assert 'lsap' in available('op')
    for quick in (True, False):
        rows = get('lsap')('cpu', quick=quick)
        assert rows and all(r['stock'] is None and r['turbox'] is None for r in rows)
        assert all('needs CUDA' in r['note'] for r in rows)


def test_solve_on_device_gives_solve_batched_pairs():
    """The heads' entry point: the pairs of the one-transfer scipy path, cycled column counts,
    non-finite costs (replaced as scipy's path replaces them), matrices without columns."""
    from turbox_mm.models.sparse4d.matching import solve_batched, solve_on_device
    cost = torch.from_numpy(_problems(12, 6, 9, 5, 'mixed')).float()
    cost[1, 2, 0] = float('inf')
    cost[4, 0, 1] = float('nan')
    for counts in ([5, 0, 3], [2], [0], [7, 0, 4]):  # counts beyond the columns: clamped
        want, _ = solve_batched(cost, counts)
        with quiet_on_path('kernel'):
            got = solve_on_device(cost, counts)
        assert got.dtype == torch.long and torch.equal(got, want), counts
    for bad in ([3, -1], []):
        for solver in (solve_on_device, solve_batched):
            with pytest.raises(ValueError, match='num_cols must hold one or more counts'):
                solver(cost, bad)


def test_matches_on_device_only_where_the_kernel_runs(monkeypatch):
    """'device' takes the kernel's path only where it runs (CUDA tensors, Triton, no
    TURBOX_OPS_REFERENCE): on CPU tensors the host path's scipy is the faster one."""
    from turbox_mm.models.sparse4d.matching import matches_on_device
    from turbox_mm.ops import dispatch
    cost = torch.zeros(1, 2, 2)
    assert not matches_on_device(cost, 'host') and not matches_on_device(cost, 'device')
    with dispatch.kernel_on_cpu():
        assert matches_on_device(cost, 'device') and not matches_on_device(cost, 'host')
        monkeypatch.setenv(dispatch.ENV_FORCE_REFERENCE, '1')
        assert not matches_on_device(cost, 'device')
    with pytest.raises(ValueError, match="matcher must be 'host' or 'device', got 'gpu'"):
        matches_on_device(cost, 'gpu')


def test_solve_on_device_checks_its_first_call_against_scipy(monkeypatch):
    """A kernel that disagreed with scipy raises at the first call on a device, naming the
    matrix, rather than training on wrong matches; later calls are not checked (no sync)."""
    from turbox_mm.models.sparse4d import matching
    from turbox_mm.ops import lsap
    monkeypatch.setattr(matching, '_CHECKED_DEVICES', set())
    cost = torch.from_numpy(_problems(13, 3, 5, 4, 'random'))
    right = lsap.linear_sum_assignment

    def wrong(c, r, k):
        out = right(c, r, k)
        out[1] = out[1].roll(1)  # matrix 1's columns shuffled among its rows
        return out

    monkeypatch.setattr(lsap, 'linear_sum_assignment', wrong)
    with quiet_on_path('kernel'):
        with pytest.raises(RuntimeError, match=r'differ first in matrix 1 of 3'):
            matching.solve_on_device(cost, [4])
        monkeypatch.setattr(lsap, 'linear_sum_assignment', right)
        matching.solve_on_device(cost, [4])  # checked once, passes, recorded
        assert matching._CHECKED_DEVICES == {'cpu'}
        monkeypatch.setattr(lsap, 'linear_sum_assignment', wrong)
        matching.solve_on_device(cost, [4])  # not checked again


# -- sm_90 compile of the kernel at the launch's specialisation ---------------------------------

COMPILE_SCRIPT = r'''
import sys
from turbox_mm.ops.lsap import triton_kernels as tk
from turbox_mm.testing.triton_aot import compile_variants

variants = []
for dtype in ('*fp32', '*fp64', '*fp16'):
    for block, warps in ((16, 4), (1024, 4), (2048, 8)):
        pointers = dict(cost_ptr=dtype, rows_ptr='*i64', cols_ptr='*i64', out_ptr='*i64')
        for ones, divisible in (((), ()), (('s_c', ), ('R', 's_p', 's_r', 'so_p'))):
            variants.append((tk._lsap_kernel, dict(BLOCK=block), ones, pointers,
                             dict(divisible=divisible, num_warps=warps)))
failures = compile_variants(variants, floats=())
print('\n'.join(failures) or 'all compiled')
sys.exit(1 if failures else 0)
'''


@pytest.mark.slow
def test_kernel_compiles_for_sm90(tmp_path):
    """The kernel compiles for the H200's sm_90 for the cost dtypes and block sizes a launch
    uses (contiguous strides at 1, sizes multiples of 16)."""
    from conftest import compile_for_sm90_in_subprocess
    compile_for_sm90_in_subprocess(COMPILE_SCRIPT, tmp_path)


# -- on a GPU ------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('kind', ['random', 'mixed', 'copies'])
def test_cuda_kernel_equals_scipy_at_training_sizes_without_syncs(kind):
    """Sparse4D's step (6 layers x 6 samples of 900 queries and up to 60 boxes, more queries
    than boxes: the transposed working matrix) and MapTR v2's one-to-many groups (fewer
    queries than some samples' columns): scipy's pairs, no host sync."""
    from turbox_mm.benchmark.syncs import SyncCounter
    for problems, rows, cols in ((36, 900, 60), (8, 40, 120)):
        cost = _problems(21, problems, rows, cols, kind).astype(np.float32)
        sizes_r = np.full(problems, rows)
        sizes_c = np.random.default_rng(2).integers(0, cols + 1, problems)
        device = torch.from_numpy(cost).cuda()
        r, c = torch.from_numpy(sizes_r).cuda(), torch.from_numpy(sizes_c).cuda()
        linear_sum_assignment(device, r, c)  # compile
        torch.cuda.synchronize()
        with SyncCounter() as syncs:
            got = linear_sum_assignment(device, r, c)
        assert syncs.total == 0, syncs.top()
        want = _scipy(cost.astype(np.float64), sizes_r, sizes_c)
        np.testing.assert_array_equal(got.cpu().numpy(), want)
