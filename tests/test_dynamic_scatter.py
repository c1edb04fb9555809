"""turbox_mm.ops.dynamic_scatter: kernel, reference and module against mmcv 2.1's semantics.

mmcv has no CPU scatter op, so on the CPU the reference is checked against a per-voxel loop
written from mmcv's definition, and the Triton kernel (interpreter) against the reference. The
``cuda`` test compares the compiled kernel with mmcv's CUDA op at nuScenes' size, forward and
backward.
"""
import warnings

import pytest
import torch

from conftest import compile_for_sm90_in_subprocess
from turbox_mm.ops import dispatch
from turbox_mm.ops import dynamic_scatter as ds

pytest.importorskip('turbox_mm.ops.dynamic_scatter.triton_kernels')


def make_points(num=600, channels=5, columns=4, seed=0, grid=(2, 3, 4, 5), dropped=0.1):
    """Features and coordinates with many points per voxel, ties, and dropped rows."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(num, channels, generator=gen)
    feats[::7] = feats[3]  # exact ties for the max
    coors = torch.stack([torch.randint(0, g, (num, ), generator=gen) for g in grid[:columns]], 1)
    drop = torch.rand(num, generator=gen) < dropped
    column = torch.randint(0, columns, (num, ), generator=gen)
    coors[drop, column[drop]] = -1  # one negative entry drops the row
    return feats, coors.to(torch.int32)


def loop_spec(feats, coors, reduce_type):
    """mmcv's definition, one voxel at a time: sorted distinct rows without negatives; the
    reduction; the gradient routing (lowest index holding the max)."""
    rows = sorted({tuple(r) for r in coors.tolist() if min(r) >= 0})
    out, grad_index = [], []
    for row in rows:
        members = [i for i, r in enumerate(coors.tolist()) if tuple(r) == row]
        values = feats[members].double()
        if reduce_type == 'max':
            best = values.max(0).values
            out.append(best)
            grad_index.append([members[int((values[:, c] == best[c]).nonzero()[0])]
                               for c in range(feats.shape[1])])
        elif reduce_type == 'sum':
            out.append(values.sum(0))
        else:
            out.append(values.mean(0))
    out = torch.stack(out) if out else feats.new_zeros(0, feats.shape[1]).double()
    return out, torch.tensor(rows, dtype=coors.dtype).reshape(-1, coors.shape[1]), grad_index


def kernel(fn, *args):
    with dispatch.kernel_on_cpu():
        return fn(*args)


def run(impl, feats, coors, reduce_type):
    fn = ds.dynamic_scatter_op
    return kernel(fn, feats, coors, reduce_type) if impl == 'kernel' else \
        fn(feats, coors, reduce_type)


@pytest.mark.parametrize('columns', [3, 4])
@pytest.mark.parametrize('reduce_type', ['max', 'sum', 'mean'])
@pytest.mark.parametrize('impl', ['kernel', 'reference'])
def test_forward_and_backward_equal_the_per_voxel_definition(impl, reduce_type, columns):
    feats, coors = make_points(columns=columns, seed=columns)
    want, want_coors, grad_index = loop_spec(feats, coors, reduce_type)
    feats.requires_grad_(True)
    out, voxel_coors, point2voxel, counts, _ = run(impl, feats, coors, reduce_type)
    assert torch.equal(voxel_coors, want_coors) and voxel_coors.dtype == torch.int32
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    assert int(counts.sum()) == int((coors >= 0).all(1).sum())
    assert torch.equal(voxel_coors[point2voxel[point2voxel >= 0]], coors[(coors >= 0).all(1)])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad)
    expected = torch.zeros_like(feats)
    for v, row in enumerate(want_coors.tolist()):
        if reduce_type == 'max':
            for c, i in enumerate(grad_index[v]):
                expected[i, c] = grad[v, c]
        else:
            members = (coors == torch.tensor(row, dtype=coors.dtype)).all(1)
            expected[members] = grad[v] / (members.sum() if reduce_type == 'mean' else 1)
    torch.testing.assert_close(feats.grad, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize('reduce_type', ['max', 'mean'])
def test_kernel_dtypes_equal_the_reference(dtype, reduce_type):
    feats, coors = make_points(seed=5)
    feats = feats.to(dtype)
    got = kernel(ds.dynamic_scatter_op, feats, coors, reduce_type)
    want = ds.dynamic_scatter_reference(feats, coors, reduce_type)
    assert got[0].dtype == dtype
    # Both reduce in float32 and round once; their summation orders differ: one 16-bit ulp.
    rtol = {torch.float64: 1e-12, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol)
    if reduce_type == 'max':  # a maximum is one of the values: exact in every dtype
        assert torch.equal(got[0], want[0]) and torch.equal(got[4], want[4])


def test_non_contiguous_inputs_and_int64_coordinates():
    feats, coors = make_points(seed=2, channels=6)
    wide = torch.cat([feats, feats], 1)[:, ::2]  # strided columns
    assert not wide.is_contiguous()
    coors64 = coors.long().t().contiguous().t()  # int64, column-major
    for reduce_type in ('max', 'mean'):
        got = kernel(ds.dynamic_scatter_op, wide, coors64, reduce_type)
        want = ds.dynamic_scatter_reference(wide.contiguous(), coors, reduce_type)
        assert got[1].dtype == torch.int64
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7)
        assert torch.equal(got[1], want[1].long())


@pytest.mark.parametrize('impl', ['kernel', 'reference'])
def test_empty_and_fully_dropped_inputs_give_empty_results(impl):
    for feats, coors in [(torch.zeros(0, 4), torch.zeros(0, 3, dtype=torch.int32)),
                         (torch.ones(5, 4), -torch.ones(5, 3, dtype=torch.int32))]:
        feats.requires_grad_(True)
        out, voxel_coors, point2voxel, counts, argmax = run(impl, feats, coors, 'max')
        assert out.shape == (0, 4) and voxel_coors.shape == (0, 3) and counts.shape == (0, )
        assert bool((point2voxel == -1).all()) and point2voxel.shape == (feats.shape[0], )
        out.sum().backward()
        assert torch.equal(feats.grad, torch.zeros_like(feats))


def test_large_coordinates_fall_back_to_the_reference_with_a_warning():
    feats, coors = make_points(num=50, seed=3)
    coors[4, 3] = 40000  # over the 15 bits a column gets with four columns
    with pytest.warns(UserWarning, match='too large for the kernel'):
        got = kernel(ds.dynamic_scatter_op, feats, coors, 'max')
    want = ds.dynamic_scatter_reference(feats, coors, 'max')
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize('feats, coors, reduce_type, match', [
    (torch.zeros(3, 2), torch.zeros(3, 3, dtype=torch.int32), 'min', 'reduce_type'),
    (torch.zeros(3), torch.zeros(3, 3, dtype=torch.int32), 'max', 'feats must be'),
    (torch.zeros(3, 2, dtype=torch.int32), torch.zeros(3, 3, dtype=torch.int32), 'max',
     'feats must be'),
    (torch.zeros(3, 2), torch.zeros(3, 3), 'max', 'coors must be'),
    (torch.zeros(3, 2), torch.zeros(4, 3, dtype=torch.int32), 'max', 'one row per point'),
])
def test_bad_inputs_get_named_errors(feats, coors, reduce_type, match):
    with pytest.raises(ValueError, match=match):
        ds.dynamic_scatter(feats, coors, reduce_type)


def test_module_scatters_a_batch_in_one_call_as_mmcvs_per_sample_loop():
    from turbox_mm.models.layers import TurboxDynamicScatter
    feats, coors = make_points(seed=7)
    coors[:, 0] = torch.sort(coors[:, 0].clamp(min=0)).values  # batch index, samples in order
    for average in (True, False):
        layer = TurboxDynamicScatter([0.2, 0.2, 4], [-50, -50, -5, 50, 50, 3], average)
        got = layer(feats, coors)
        parts, part_coors = [], []
        for sample in range(int(coors[-1, 0]) + 1):  # mmcv's loop, on the op's 3-column path
            rows = coors[:, 0] == sample
            out, vc = ds.dynamic_scatter(feats[rows], coors[rows, 1:],
                                         'mean' if average else 'max')
            parts.append(out)
            part_coors.append(torch.cat([torch.full_like(vc[:, :1], sample), vc], 1))
        assert torch.equal(got[1], torch.cat(part_coors))
        torch.testing.assert_close(got[0], torch.cat(parts), rtol=1e-6, atol=1e-7)


def test_opcheck_and_compile():
    feats, coors = make_points(num=200, seed=4)
    for reduce_type in ('max', 'mean'):
        torch.library.opcheck(torch.ops.turbox_mm.dynamic_scatter.default,
                              (feats.clone().requires_grad_(True), coors, reduce_type),
                              test_utils=('test_schema', 'test_autograd_registration'))

    def step(x):
        out, voxel_coors = ds.dynamic_scatter(x, coors, 'mean')
        return out.sum(1) * voxel_coors[:, 1]

    x = feats.clone().requires_grad_(True)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        got = torch.compile(step, backend='aot_eager', fullgraph=True)(x)
    got.sum().backward()
    y = feats.clone().requires_grad_(True)
    want = step(y)
    want.sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(x.grad, y.grad)


def test_fast_ops_rebinds_mmdet3d_dynamic_scatter_and_uninstall_restores_it():
    pytest.importorskip('mmdet3d')
    import mmcv.ops
    from mmdet3d.models.voxel_encoders import pillar_encoder, voxel_encoder
    from mmdet3d.registry import MODELS

    from turbox_mm.engine.runner import fast_scatter
    from turbox_mm.models.layers import TurboxDynamicScatter
    fast_scatter.uninstall()
    try:
        changes = fast_scatter.install()
        assert len(changes) == 2 and fast_scatter.install() == []
        assert voxel_encoder.DynamicScatter is TurboxDynamicScatter
        assert pillar_encoder.DynamicScatter is TurboxDynamicScatter
        # the scope named: a runner built earlier in this process may have left another
        # default scope current
        vfe = MODELS.build(dict(type='DynamicVFE', _scope_='mmdet3d', in_channels=4,
                                feat_channels=[16, 16], with_cluster_center=True,
                                with_voxel_center=True,
                                voxel_size=[0.5, 0.5, 4], point_cloud_range=[-5, -5, -3, 5, 5, 1],
                                norm_cfg=dict(type='BN1d', eps=1e-3, momentum=0.01)))
        assert isinstance(vfe.vfe_scatter, TurboxDynamicScatter)
        # mmcv has no CPU scatter op: with turbox's, the encoder runs on the CPU too
        gen = torch.Generator().manual_seed(0)
        points = torch.rand(300, 4, generator=gen) * torch.tensor([10, 10, 4, 1]) - \
            torch.tensor([5, 5, 3, 0])
        coors = torch.cat([torch.zeros(300, 1, dtype=torch.int32),
                           ((points[:, [2, 1, 0]] - torch.tensor([-3, -5, -5])) /
                            torch.tensor([4, 0.5, 0.5])).floor().int()], 1)
        feats, voxel_coors = vfe(points, coors)
        assert feats.shape == (voxel_coors.shape[0], 16) and voxel_coors.shape[0] > 10
    finally:
        fast_scatter.uninstall()
    assert voxel_encoder.DynamicScatter is mmcv.ops.DynamicScatter
    assert fast_scatter.installed() == []


def test_micro_benchmark_runs_quick_on_the_cpu():
    from turbox_mm.benchmark.micro import available, get
    assert 'dynamic_scatter' in available('op')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        rows = get('dynamic_scatter')('cpu', quick=True)
    assert rows and all(r['turbox']['median_ms'] > 0 for r in rows)


# -- on the GPU: nuScenes' size, against mmcv's CUDA op -----------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('channels', [5, 64])
def test_cuda_kernel_equals_mmcv_cuda_at_nuscenes_size(channels):
    mmcv_ops = pytest.importorskip('mmcv.ops')
    from turbox_mm.benchmark.micro.voxelize import sweep_cloud
    from turbox_mm.models.layers import TurboxDynamicScatter
    from turbox_mm.ops.voxelize import dynamic_voxelize
    voxel, pcr = [0.2, 0.2, 8], [-51.2, -51.2, -5, 51.2, 51.2, 3]
    clouds = [sweep_cloud(349_000 - 1000 * s, seed=s).cuda() for s in range(2)]
    coors = torch.cat([torch.nn.functional.pad(dynamic_voxelize(c, voxel, pcr), (1, 0), value=s)
                       for s, c in enumerate(clouds)])
    gen = torch.Generator(device='cuda').manual_seed(0)
    feats = torch.randn(coors.shape[0], channels, device='cuda', generator=gen)
    feats[1::3] = feats[::3][:feats[1::3].shape[0]]  # ties
    for average in (False, True):
        theirs = mmcv_ops.DynamicScatter(voxel, pcr, average)
        ours = TurboxDynamicScatter(voxel, pcr, average)
        a, b = feats.clone().requires_grad_(True), feats.clone().requires_grad_(True)
        want, want_coors = theirs(a, coors)
        got, got_coors = ours(b, coors)
        assert torch.equal(got_coors, want_coors)
        if average:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(got, want)
        grad = torch.randn(want.shape, device='cuda', generator=gen)
        want.backward(grad)
        got.backward(grad)
        if average:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(b.grad, a.grad)


COMPILE_SCRIPT = r'''
import sys
import triton.language as tl
from turbox_mm.ops.dynamic_scatter import triton_kernels as tk
from turbox_mm.testing.triton_aot import compile_variants

variants = []
for dtype, acc in (('*fp32', tl.float32), ('*fp16', tl.float32), ('*bf16', tl.float32),
                   ('*fp64', tl.float64)):
    for mode in (0, 1, 2):
        for ones in ((), ('num', 'channels', 'stride_c')):
            variants.append((tk._reduce_kernel,
                             dict(MODE=mode, ACC=acc, BLOCK_P=32, BLOCK_C=8), ones,
                             dict(feats_ptr=dtype, out_ptr=dtype, order_ptr='*i64',
                                  starts_ptr='*i64', arg_ptr='*i64')))
# the kernel as a launch at mmdet3d's dynamic encoders' sizes specialises it (module docstring of
# turbox_mm/testing/triton_aot.py): contiguous [N, C] features (stride_c = 1) of
# DynamicPillarFeatureNet / DynamicVFE, 64 channels (C and stride_n multiples of 16; max) and
# the 5 raw channels (cluster centres; mean); N (about 4 x 349k points) a multiple of 16 or
# not; float32, and float16 at 64 channels (features under autocast)
for channels, block_c in ((64, 64), (5, 8)):
    for mode in (0, 2):
        for n_divisible in (True, False):
            divisible = (('channels', 'stride_n') if channels % 16 == 0 else ()) + \
                (('num', ) if n_divisible else ())
            for dtype in ('*fp32', '*fp16') if channels == 64 and n_divisible else ('*fp32', ):
                variants.append((tk._reduce_kernel,
                                 dict(MODE=mode, ACC=tl.float32, BLOCK_P=tk.BLOCK_P,
                                      BLOCK_C=block_c), ('stride_c', ),
                                 dict(feats_ptr=dtype, out_ptr=dtype, order_ptr='*i64',
                                      starts_ptr='*i64', arg_ptr='*i64'),
                                 dict(divisible=divisible)))
failures = compile_variants(variants, floats=())
print('\n'.join(failures) or 'all compiled')
sys.exit(1 if failures else 0)
'''


@pytest.mark.slow
def test_kernels_compile_for_sm90_for_every_dtype_and_specialisation(tmp_path):
    """The interpreter runs Python, not Triton's compiler: compile the kernel for the H200's
    sm_90 for every feature dtype and mode, with the size arguments at 1, and as a launch at
    mmdet3d's dynamic encoders' sizes specialises it (ints at 1, multiples of 16)."""
    compile_for_sm90_in_subprocess(COMPILE_SCRIPT, tmp_path)


@pytest.mark.parametrize('impl', ['kernel', 'reference'])
def test_max_skips_nan_features_as_mmcv(impl):
    """mmcv's max is fmaxf: NaN values are skipped; an all-NaN channel gives -inf and no
    point receives its gradient. (The interpreter's maxnum propagates NaN, so the kernel's
    case is checked on the GPU.)"""
    if impl == 'kernel' and not torch.cuda.is_available():
        pytest.skip("Triton's interpreter propagates NaN in tl.maximum; checked on CUDA")
    nan = float('nan')
    feats = torch.tensor([[1.0, nan, nan], [nan, nan, 5.0]])
    coors = torch.zeros(2, 3, dtype=torch.int32)
    if impl == 'kernel':
        feats, coors = feats.cuda(), coors.cuda()
    out, _, _, _, argmax = run(impl, feats, coors, 'max')
    assert out.cpu().tolist() == [[1.0, float('-inf'), 5.0]]
    assert argmax.cpu().tolist() == [[0, 2, 1]]
