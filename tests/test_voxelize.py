"""turbox_mm.ops.voxelize: kernels and reference against mmcv 2.1's voxelization.

mmcv's CPU op (the same walk as its deterministic CUDA mode) is the oracle: the same voxels in
the same order, the same points in each voxel in the same order, the same counts and
coordinates, bit for bit. On the CPU the Triton kernels run in the interpreter (conftest sets
``TRITON_INTERPRET=1``) at small sizes; the ``cuda`` tests run them compiled at nuScenes' size
against mmcv's CUDA op.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import compile_for_sm90_in_subprocess
from turbox_mm.ops import dispatch
from turbox_mm.ops import voxelize as vx

mmcv_ops = pytest.importorskip('mmcv.ops')
pytest.importorskip('turbox_mm.ops.voxelize.triton_kernels')

VOXEL = [0.5, 0.5, 0.25]
RANGE = [-5.0, -5.0, -0.5, 5.0, 5.0, 1.5]


def mmcv_voxelize(points, voxel_size=VOXEL, pcr=RANGE, max_points=4, max_voxels=20000):
    return mmcv_ops.voxelization(points, voxel_size, pcr, max_points, max_voxels, True)


def make_cloud(num=3000, channels=5, seed=0, bad=True, scale=6.0):
    """Points around the range (some out), with NaN, +-inf and duplicates of earlier points."""
    gen = torch.Generator().manual_seed(seed)
    pts = torch.rand(num, channels, generator=gen, dtype=torch.float64)
    pts[:, :3] = (pts[:, :3] * 2 - 1) * torch.tensor([scale, scale, 1.5], dtype=torch.float64)
    pts[:, 2] += 0.5
    pts = pts.float()
    if bad and num > 100:
        pts[::97, 0] = float('nan')
        pts[5::89, 1] = float('inf')
        pts[7::83, 2] = -float('inf')
        pts[50:60] = pts[10:20]  # exact duplicates land in the same voxels
        pts[61, :3] = torch.tensor(RANGE[:3])  # on the lower boundary: inside
        pts[62, :3] = torch.tensor(RANGE[3:])  # on the upper boundary: outside
    return pts


def kernel(fn, *args, **kwargs):
    with dispatch.kernel_on_cpu():
        return fn(*args, **kwargs)


def assert_same_voxels(got, want, sample=None):
    voxels, coors, num = got
    if sample is not None:
        assert torch.equal(coors[:, 0], torch.full_like(coors[:, 0], sample))
    coors = coors[:, 1:] if coors.shape[1] == 4 else coors
    assert voxels.dtype == want[0].dtype and coors.dtype == torch.int32 and num.dtype == torch.int32
    assert torch.equal(coors, want[1])
    assert torch.equal(num, want[2])
    assert torch.equal(voxels, want[0])


@pytest.mark.parametrize('max_points, max_voxels', [(4, 20000), (1, 20000), (35, 50), (3, 1)])
@pytest.mark.parametrize('impl', ['kernel', 'reference'])
def test_hard_voxelize_equals_mmcv(max_points, max_voxels, impl):
    pts = make_cloud(seed=max_points + max_voxels)
    want = mmcv_voxelize(pts, max_points=max_points, max_voxels=max_voxels)
    assert 0 < want[1].shape[0]
    if impl == 'kernel':
        got = kernel(vx.hard_voxelize, pts, VOXEL, RANGE, max_points, max_voxels)
    else:
        got = vx.hard_voxelize_reference(pts, [len(pts)], VOXEL, RANGE, max_points, max_voxels)
    assert_same_voxels(got, want, sample=0)
    # the limits really cut: some voxel is full, or the voxel budget is used up
    assert bool((want[2] == max_points).any()) or want[1].shape[0] == max_voxels


@pytest.mark.parametrize('dtype', [torch.float64, torch.float16])
def test_hard_voxelize_dtypes_equal_mmcv(dtype):
    pts = make_cloud(seed=3).to(dtype)
    want = mmcv_voxelize(pts)
    got = kernel(vx.hard_voxelize, pts, VOXEL, RANGE, 4, 20000)
    assert_same_voxels(got, want)


def test_bfloat16_points_are_voxelized_as_their_float32_values():
    pts = make_cloud(seed=4).to(torch.bfloat16)
    want = mmcv_voxelize(pts.float())
    got = kernel(vx.hard_voxelize, pts, VOXEL, RANGE, 4, 20000)
    assert got[0].dtype == torch.bfloat16
    assert_same_voxels((got[0].float(), got[1], got[2]), want)


def test_non_contiguous_points():
    wide = make_cloud(channels=8, seed=5)
    pts = wide[:, ::2]  # 4 channels, stride 2
    assert not pts.is_contiguous()
    want = mmcv_voxelize(pts.contiguous())
    assert_same_voxels(kernel(vx.hard_voxelize, pts, VOXEL, RANGE, 4, 20000), want)
    transposed = wide[:, :5].t().contiguous().t()  # column-major
    assert_same_voxels(kernel(vx.hard_voxelize, transposed, VOXEL, RANGE, 4, 20000),
                       mmcv_voxelize(wide[:, :5].contiguous()))


@pytest.mark.parametrize('impl', ['kernel', 'reference'])
def test_dynamic_voxelize_equals_mmcv(impl):
    pts = make_cloud(seed=6)
    want = mmcv_voxelize(pts, max_points=-1, max_voxels=-1)
    assert bool((want == -1).all(1).any())
    if impl == 'kernel':
        got = kernel(vx.dynamic_voxelize, pts, VOXEL, RANGE)
    else:
        got = vx.voxel_coords_reference(pts, VOXEL, RANGE)
    assert got.dtype == torch.int32 and torch.equal(got, want)
    assert torch.equal(kernel(vx.voxelization, pts, VOXEL, RANGE, -1, -1), want)


def test_batched_voxelization_equals_one_mmcv_call_per_sample():
    pts = make_cloud(num=4000, seed=7)
    sizes = [1500, 0, 2400, 100]
    per_sample = [mmcv_voxelize(p, max_points=3, max_voxels=120) for p in torch.split(pts, sizes)]
    want = (torch.cat([r[0] for r in per_sample]),
            torch.cat([F.pad(r[1], (1, 0), value=i) for i, r in enumerate(per_sample)]),
            torch.cat([r[2] for r in per_sample]))
    assert per_sample[2][1].shape[0] == 120  # the budget is per sample
    for got in (kernel(vx.hard_voxelize, pts, VOXEL, RANGE, 3, 120, sample_sizes=sizes),
                vx.hard_voxelize_reference(pts, sizes, VOXEL, RANGE, 3, 120)):
        assert torch.equal(got[1], want[1])
        assert torch.equal(got[2], want[2])
        assert torch.equal(got[0], want[0])


@pytest.mark.parametrize('impl', ['kernel', 'reference'])
def test_empty_and_fully_dropped_clouds_give_empty_results(impl):
    run = (lambda f, *a, **k: kernel(f, *a, **k)) if impl == 'kernel' else \
        (lambda f, *a, **k: f(*a, **k))
    for pts in (torch.zeros(0, 4), torch.full((50, 4), 100.0), torch.full((7, 4), float('nan'))):
        voxels, coors, num = run(vx.hard_voxelize, pts, VOXEL, RANGE, 5, 100)
        assert voxels.shape == (0, 5, 4) and coors.shape == (0, 4) and num.shape == (0, )
        coords = run(vx.dynamic_voxelize, pts, VOXEL, RANGE)
        assert coords.shape == (len(pts), 3) and bool((coords == -1).all())


def test_mmcv_compatible_single_sample_function():
    pts = make_cloud(seed=8)
    want = mmcv_voxelize(pts, max_points=6, max_voxels=300)
    for deterministic in (True, False):
        got = kernel(vx.voxelization, pts, VOXEL, RANGE, 6, 300, deterministic)
        assert got[1].shape[1] == 3 and got[1].is_contiguous()
        assert_same_voxels(got, want)


@pytest.mark.parametrize('voxel_size', [[10.0, 0.5, 0.25], [0.5, 10.0, 2.0], [10.0, 10.0, 2.0]])
def test_grids_of_one_cell_along_an_axis(voxel_size):
    pts = make_cloud(seed=9)
    want = mmcv_voxelize(pts, voxel_size=voxel_size, max_points=5, max_voxels=500)
    assert_same_voxels(kernel(vx.hard_voxelize, pts, voxel_size, RANGE, 5, 500), want)


def test_too_large_grids_get_named_errors():
    with pytest.raises(ValueError, match='too large'):
        vx.grid_shape([1e-7, 1, 1], [0, 0, 0, 1000, 1, 1])  # 1e10 cells along x
    with pytest.raises(ValueError, match='voxel key range'):
        vx.hard_voxelize(torch.zeros(2048, 4), [1e-6, 1e-6, 1e-4], [0, 0, 0, 1, 1, 1], 4, 10,
                         sample_sizes=[1] * 2048)


def test_grid_shape_rounds_in_float32_as_mmcv():
    assert vx.grid_shape([0.075, 0.075, 0.2], [-54, -54, -5, 54, 54, 3]) == [1440, 1440, 40]
    assert vx.grid_shape([0.2, 0.2, 8], [-51.2, -51.2, -5, 51.2, 51.2, 3]) == [512, 512, 1]
    # halves round away from zero, as C's round in mmcv's op (torch.round would give 10 and 2)
    assert vx.grid_shape([1, 1, 1], [0, 0, 0, 10.5, 2.5, 1]) == [11, 3, 1]
    pts = torch.tensor([[10.2, 2.2, 0.5, 1.0], [10.6, 0.5, 0.5, 1.0], [0.5, 2.7, 0.5, 1.0]])
    want = mmcv_voxelize(pts, [1, 1, 1], [0, 0, 0, 10.5, 2.5, 1])
    assert want[1].tolist() == [[0, 2, 10], [0, 0, 10], [0, 2, 0]]  # the half cells are in
    assert_same_voxels(kernel(vx.hard_voxelize, pts, [1, 1, 1], [0, 0, 0, 10.5, 2.5, 1], 4, 9),
                       want)


@pytest.mark.parametrize('kwargs, match', [
    (dict(voxel_size=[0.5, 0.5]), 'voxel_size'),
    (dict(voxel_size=[0.5, 0.0, 0.25]), 'voxel_size'),
    (dict(voxel_size=[0.5, float('nan'), 0.25]), 'voxel_size'),
    (dict(point_cloud_range=[5, 5, 1.5, -5, -5, -0.5]), 'point_cloud_range'),
    (dict(point_cloud_range=[-5, -5, -0.5, 5, 5]), 'point_cloud_range'),
    (dict(point_cloud_range=[-5, -5, -0.5, 5, float('inf'), 1.5]), 'point_cloud_range'),
    (dict(max_points=0), 'max_points'),
    (dict(sample_sizes=[10, 10]), 'sample_sizes'),
])
def test_bad_arguments_get_named_errors(kwargs, match):
    args = dict(voxel_size=VOXEL, point_cloud_range=RANGE, max_points=4, max_voxels=100)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        vx.hard_voxelize(make_cloud(num=50, bad=False), **args)


def test_bad_points_get_named_errors():
    with pytest.raises(ValueError, match=r'\[N, C\] with C >= 3.*\(10, 2\)'):
        vx.hard_voxelize(torch.zeros(10, 2), VOXEL, RANGE, 4, 100)
    with pytest.raises(ValueError, match='int64'):
        vx.dynamic_voxelize(torch.zeros(10, 4, dtype=torch.int64), VOXEL, RANGE)


def test_opcheck_and_compile():
    pts = make_cloud(num=300, bad=False)
    torch.library.opcheck(torch.ops.turbox_mm.dynamic_voxelize.default,
                          (pts, VOXEL, RANGE))
    torch.library.opcheck(torch.ops.turbox_mm.hard_voxelize.default,
                          (pts, [100, 200], VOXEL, RANGE, 4, 50),
                          test_utils=('test_schema', ))  # fake: compiled below

    def step(points):
        voxels, coors, num = vx.hard_voxelize(points, VOXEL, RANGE, 4, 50)
        return voxels.sum(1) / num[:, None], coors, vx.dynamic_voxelize(points, VOXEL, RANGE)

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        got = torch.compile(step, backend='aot_eager', fullgraph=True)(pts)
    want = step(pts)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- on the GPU: nuScenes' size, against mmcv's CUDA op -----------------------------------------

def nuscenes_sweeps(num=349_000, seed=0, device='cuda'):
    """A 10-sweep-sized cloud: x, y within +-70 m (a tail outside the range), z in [-4, 4]."""
    gen = torch.Generator().manual_seed(seed)
    radius = torch.rand(num, generator=gen).pow(2) * 70
    angle = torch.rand(num, generator=gen) * 6.283185
    pts = torch.stack([radius * angle.cos(), radius * angle.sin(),
                       torch.rand(num, generator=gen) * 8 - 4, torch.rand(num, generator=gen),
                       torch.rand(num, generator=gen) * 0.5], 1)
    return pts.to(device)


CENTERPOINT = dict(voxel_size=[0.075, 0.075, 0.2], pcr=[-54, -54, -5, 54, 54, 3], max_points=10,
                   max_voxels=120000)
POINTPILLARS = dict(voxel_size=[0.25, 0.25, 8], pcr=[-50, -50, -5, 50, 50, 3], max_points=64,
                    max_voxels=30000)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('case', [CENTERPOINT, POINTPILLARS], ids=['centerpoint', 'pointpillars'])
def test_cuda_kernel_equals_mmcv_cuda_and_cpu_at_nuscenes_size(case):
    pts = nuscenes_sweeps()
    pts[::1000, 0] = float('inf')
    args = (case['voxel_size'], case['pcr'], case['max_points'], case['max_voxels'])
    want = mmcv_ops.voxelization(pts, *args, True)
    got = vx.hard_voxelize(pts, *args)
    assert_same_voxels([t.cpu() for t in got], [t.cpu() for t in want])
    cpu = mmcv_ops.voxelization(pts.cpu(), *args, True)
    assert_same_voxels([t.cpu() for t in got], cpu)
    half = pts[:200_000].half()  # mmcv's CUDA op takes no float16: its CPU op on the values
    got = [t.cpu() for t in vx.hard_voxelize(half, *args)]
    assert got[0].dtype == torch.float16
    assert_same_voxels((got[0].float(), got[1], got[2]),
                       mmcv_ops.voxelization(half.float().cpu(), *args, True))
    sizes = [100_000, 0, 249_000]
    batched = vx.hard_voxelize(pts, *args, sample_sizes=sizes)
    # mmcv's CUDA op fails on an empty cloud (CUDA 'invalid argument'): the empty sample adds
    # no voxels, so the non-empty samples' results are the expectation.
    per = [mmcv_ops.voxelization(p, *args, True) for p in torch.split(pts, sizes) if len(p)]
    assert torch.equal(batched[0], torch.cat([r[0] for r in per]))
    assert torch.equal(batched[2], torch.cat([r[2] for r in per]))
    coords = vx.dynamic_voxelize(pts, case['voxel_size'], case['pcr'])
    assert torch.equal(coords.cpu(), mmcv_ops.voxelization(pts.cpu(), case['voxel_size'],
                                                           case['pcr'], -1, -1))
    # mmcv's CUDA op marks a dropped point with -1 in its first coordinate only (its CPU op, and
    # turbox, in all three); every consumer tests for a negative value, so both read alike.
    theirs = mmcv_ops.voxelization(pts, case['voxel_size'], case['pcr'], -1, -1)
    dropped = theirs[:, 0] < 0
    assert bool(dropped.any()) and torch.equal(coords[:, 0] < 0, dropped)
    assert torch.equal(coords[~dropped], theirs[~dropped])
    assert bool((coords[dropped] == -1).all())


def test_micro_benchmark_runs_quick_on_the_cpu():
    from turbox_mm.benchmark.micro import available, get
    assert 'voxelize' in available('op')
    rows = get('voxelize')('cpu', quick=True)
    assert [r['case'] for r in rows][:3] == ['centerpoint 0.075 hard det.',
                                             'centerpoint 0.075 dynamic',
                                             'centerpoint 0.075 hard det., batch of 4']
    assert all(r['stock']['median_ms'] > 0 and r['turbox']['median_ms'] > 0 for r in rows)


COMPILE_SCRIPT = r'''
import sys
from turbox_mm.ops.voxelize import triton_kernels as tk
from turbox_mm.testing.triton_aot import compile_variants

POINTERS = {'out_ptr': '*i32', 'key_ptr': '*i64', 'bounds_ptr': '*i64', 'skey_ptr': '*i64',
            'order_ptr': '*i64', 'firsts_ptr': '*i64', 'before_ptr': '*i64',
            'offset_ptr': '*i64', 'flag_ptr': '*i32', 'coor_ptr': '*i32', 'num_ptr': '*i32'}
CONSTEXPRS = {'BLOCK': 256, 'CBLOCK': 8, 'MAX_POINTS': 10}
SIZES = ('gx', 'gy', 'gz', 'S', 'MAX_VOXELS', 'VOLUME', 'PLANE', 'C')


def pointers(kernel, dtype):
    prm = dtype if kernel not in (tk._coords_kernel, tk._keys_kernel) else \
        ('*fp64' if dtype == '*fp64' else '*fp32')
    return dict(POINTERS, pts_ptr=dtype, vox_ptr=dtype, prm_ptr=prm)


variants = [(kernel, CONSTEXPRS, ones, pointers(kernel, dtype))
            for kernel in (tk._coords_kernel, tk._keys_kernel, tk._opens_kernel,
                           tk._scatter_kernel)
            for dtype in ('*fp32', '*fp16', '*bf16', '*fp64') for ones in ((), SIZES)]
# each kernel as a launch at the lidar models' sizes specialises it (module docstring of
# turbox_mm/testing/triton_aot.py): [N, 5] contiguous points (stride_c = 1), grids (x, y, z,
# max points) of CenterPoint pillar02 (512, 512, 1, 20), CenterPoint / BEVFusion voxel0075
# (1440, 1440, 40, 10) and PointPillars (400, 400, 1, 64), max_voxels 30000 to 160000: grid
# sides, volumes and max_voxels multiples of 16; in training 4 samples and a point count
# that may be a multiple of 16, in testing 1 sample; float32 points, and float16 once
GRIDS = ((512, 512, 1, 20), (1440, 1440, 40, 10), (400, 400, 1, 64))
for gx, gy, gz, max_points in GRIDS:
    for samples, n_divisible in ((4, True), (1, False)):
        ones = ('stride_c', ) + (('gz', ) if gz == 1 else ()) + (('S', ) if samples == 1 else ())
        divisible = ('gx', 'gy', 'VOLUME', 'PLANE', 'DROPPED', 'MAX_VOXELS') + \
            (('N', ) if n_divisible else ())
        for dtype in ('*fp32', '*fp16') if (gx, samples) == (1440, 4) else ('*fp32', ):
            variants += [(kernel, dict(CONSTEXPRS, CBLOCK=8, MAX_POINTS=max_points), ones,
                          pointers(kernel, dtype), dict(divisible=divisible))
                         for kernel in (tk._coords_kernel, tk._keys_kernel, tk._opens_kernel,
                                        tk._scatter_kernel)]
failures = compile_variants(variants, floats=())
print('\n'.join(failures) or 'all compiled')
sys.exit(1 if failures else 0)
'''


@pytest.mark.slow
def test_kernels_compile_for_sm90_for_every_dtype_and_specialisation(tmp_path):
    """The interpreter runs Python, not Triton's compiler: a kernel can pass every CPU test and
    still fail to compile for the GPU (a statement after an early return is compiled too; an
    int argument equal to 1 becomes a constant). Compile each kernel ahead of time for the
    H200's sm_90, for every point dtype, with the size arguments at 1, and as a launch at the
    lidar models' sizes specialises it (ints at 1, multiples of 16)."""
    compile_for_sm90_in_subprocess(COMPILE_SCRIPT, tmp_path)
