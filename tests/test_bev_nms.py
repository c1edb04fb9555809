"""turbox_mm.ops.bev_nms: kernels and reference against mmcv 2.1's and mmdet3d 1.4's NMS.

On the CPU, mmcv's ``box_iou_rotated`` / ``nms_rotated`` / ``nms`` and mmdet3d's numba
``circle_nms`` are the oracles of the reference; the Triton kernels run in the interpreter
(slow: a few dozen boxes) against the reference. The ``cuda`` tests run the compiled kernels at
the issue's 4000 boxes against mmcv's CUDA ops, iou3d's included (CUDA-only in mmcv).
"""
import numpy as np
import pytest
import torch

from conftest import compile_for_sm90_in_subprocess
from turbox_mm.ops import bev_nms as tb
from turbox_mm.ops import dispatch
from turbox_mm.ops.bev_nms import reference as ref

mmcv_ops = pytest.importorskip('mmcv.ops')
pytest.importorskip('turbox_mm.ops.bev_nms.triton_kernels')


def detections(num, seed=0, spread=12.0, copies=4):
    """``[num, 7]`` boxes (x, y, z, dx, dy, dz, heading) in clusters of jittered copies (some
    exact duplicates, one tiny box), and ``[num]`` scores."""
    gen = torch.Generator().manual_seed(seed)
    objects = max(-(-num // copies), 1)
    centre = (torch.rand(objects, 3, generator=gen) * 2 - 1) * torch.tensor([spread, spread, 1])
    size = torch.rand(objects, 3, generator=gen) * torch.tensor([4.0, 1.5, 1.0]) + 0.5
    heading = (torch.rand(objects, 1, generator=gen) * 2 - 1) * 3.2
    boxes = torch.cat([centre, size, heading], 1).repeat_interleave(copies, 0)[:num]
    boxes = boxes + torch.randn(boxes.shape, generator=gen) * torch.tensor(
        [0.3, 0.3, 0.1, 0.2, 0.1, 0.1, 0.3])
    boxes[:, 3:6] = boxes[:, 3:6].abs() + 0.1
    if num > 8:
        boxes[num // 2] = boxes[1]  # an exact duplicate
        boxes[num // 3, 3:5] = 1e-8  # area below mmcv's 1e-14: IoU 0
    return boxes, torch.rand(num, generator=gen)


def xywhr(boxes):
    return boxes[:, [0, 1, 3, 4, 6]].contiguous()


def xyxyr(boxes):
    half = boxes[:, 3:5] / 2
    return torch.cat([boxes[:, :2] - half, boxes[:, :2] + half, boxes[:, 6:7]], 1)


@pytest.fixture(autouse=True)
def mmcv_nms_in_mmdet3d():
    """Other tests build runners with ops.fast, which rebinds mmdet3d's NMS process-wide:
    these tests compare against mmdet3d's own."""
    from turbox_mm.engine.runner import fast_nms
    fast_nms.uninstall()


def kernel(fn, *args, **kwargs):
    with dispatch.kernel_on_cpu():
        return fn(*args, **kwargs)


# -- the reference against mmcv's and mmdet3d's CPU ops ---------------------------------------

@pytest.mark.parametrize('seed', [0, 1, 2])
def test_reference_rotated_iou_and_nms_equal_mmcv(seed):
    boxes, scores = detections(300, seed)
    got = ref.iou_matrix_reference(xywhr(boxes), xywhr(boxes), 'rotated')
    want = mmcv_ops.box_iou_rotated(xywhr(boxes), xywhr(boxes))
    # equal boxes (the diagonal, the exact duplicate): 1 here; mmcv's value there depends on
    # its rounding (a CI machine's dropped a corner: 0.34), see the reference's docstring
    same = (xywhr(boxes)[:, None] == xywhr(boxes)[None]).all(-1)
    tiny = (boxes[:, 3] * boxes[:, 4] < 1e-14)
    assert same.sum() == 300 + 2
    assert torch.equal(got[same], torch.where(tiny[same.nonzero()[:, 0]], 0.0, 1.0))
    torch.testing.assert_close(got[~same], want[~same], rtol=0, atol=2e-6)
    for thr in (0.1, 0.2, 0.5):  # not 0: mmcv's CPU op suppresses IoU >= thr, CUDA's > thr
        assert torch.equal(ref.nms_reference(xywhr(boxes), scores, thr, 'rotated'),
                           mmcv_ops.nms_rotated(xywhr(boxes), scores, thr)[1])


def test_mmdet3d_style_functions_equal_mmdet3d_on_the_cpu():
    from mmdet3d.models.layers import box3d_nms
    boxes, scores = detections(200, seed=3)
    bev = xyxyr(boxes)
    for pre, post in ((None, None), (120, 30), (1000, 83)):
        assert torch.equal(tb.nms_bev(bev, scores, 0.2, pre, post),
                           box3d_nms.nms_bev(bev, scores, 0.2, pre, post))
    for thr in (0.1, 0.3):
        assert torch.equal(tb.nms_normal_bev(bev, scores, thr),
                           box3d_nms.nms_normal_bev(bev, scores, thr))
    dets = torch.cat([boxes[:, :2], scores[:, None]], 1)
    for thr, post in ((1.0, 83), (4.0, 83), (4.0, 5), (0.0, 83)):
        want = box3d_nms.circle_nms(dets.numpy(), thr, post_max_size=post)
        assert tb.circle_nms(dets.numpy(), thr, post) == list(want)
        assert tb.circle_nms(dets, thr, post).tolist() == list(want)


def test_reference_iou3d_overlaps_are_polygon_areas():
    """mmcv's iou3d op is CUDA-only (the cuda test compares with it); here: overlaps of
    known geometry and agreement with the exact rotated overlap away from the 1 cm margin."""
    unit = torch.tensor([[0., 0., 0., 2., 2., 1., 0.]])
    shifted = torch.tensor([[1., 1., 0., 2., 2., 1., 0.], [0., 0., 0., 2., 2., 1., 0.7854],
                            [5., 5., 0., 1., 1., 1., 0.3]])
    got = ref.iou_matrix_reference(unit, shifted, 'iou3d')
    # 1 x 1 corner overlap; a square turned by 45 degrees: the octagon 8 (sqrt 2 - 1) = 3.3137
    torch.testing.assert_close(got, torch.tensor([[1.0, 3.3137, 0.0]]), rtol=0, atol=2e-3)
    boxes, _ = detections(60, seed=4)
    rot = ref.iou_matrix_reference(xywhr(boxes), xywhr(boxes), 'rotated')
    iou3d = ref.pair_iou(boxes[:, None].expand(60, 60, 7), boxes[None].expand(60, 60, 7),
                         'iou3d')
    torch.testing.assert_close(iou3d, rot, rtol=0, atol=0.02)  # the margin's few percent


# -- the kernels (interpreter) against the reference -----------------------------------------

POLYGON_KINDS = ('rotated', 'iou3d')


def layout(boxes, kind):
    if kind == 'rotated':
        return xywhr(boxes)
    if kind == 'aligned':
        return xyxyr(boxes)[:, :4].contiguous()
    if kind == 'circle':
        return boxes[:, :2].contiguous()
    return boxes


@pytest.mark.parametrize('kind, thr', [('rotated', 0.2), ('iou3d', 0.1), ('aligned', 0.3),
                                       ('iou3d_normal', 0.2), ('circle', 1.5)])
def test_kernel_nms_equals_reference(kind, thr):
    boxes, scores = detections(40, seed=5)
    b = layout(boxes, kind)
    want = ref.nms_reference(b, scores, thr, kind)
    got = kernel(tb.bev_nms, b, scores, thr, kind)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    assert 0 < want.numel() < 40  # the threshold suppresses some, not all


@pytest.mark.parametrize('kind', ['aligned', 'circle'])
def test_kernel_nms_across_mask_words(kind):
    """More than two 64-box words: the reduction carries removals from block to block."""
    boxes, scores = detections(150, seed=6, spread=6.0)
    b = layout(boxes, kind)
    thr = 0.2 if kind == 'aligned' else 1.0
    assert torch.equal(kernel(tb.bev_nms, b, scores, thr, kind),
                       ref.nms_reference(b, scores, thr, kind))


def test_circle_nms_breaks_ties_as_mmdet3d():
    """mmdet3d walks ``scores.argsort()[::-1]``: among equal scores the higher index first."""
    from mmdet3d.models.layers import box3d_nms
    dets = torch.tensor([[0., 0., .5], [.5, 0., .5], [5., 5., .9], [5.2, 5., .9]])
    want = list(box3d_nms.circle_nms(dets.numpy(), 1.0, post_max_size=83))
    assert want == [3, 1]
    assert tb.circle_nms(dets, 1.0).tolist() == want
    assert kernel(tb.circle_nms, dets, 1.0).tolist() == want


@pytest.mark.parametrize('kind', ['aligned', 'rotated'])
def test_walk_with_removal_words_in_memory(monkeypatch, kind):
    """Above 8192 boxes the walk keeps its removal words in memory, not registers: forced here
    at 150 boxes."""
    from turbox_mm.ops.bev_nms import triton_kernels as tk
    monkeypatch.setattr(tk, 'REGISTER_BLOCKS', 1)
    boxes, scores = detections(150 if kind == 'aligned' else 70, seed=12, spread=6.0)
    b = layout(boxes, kind)
    assert torch.equal(kernel(tb.bev_nms, b, scores, 0.2, kind),
                       ref.nms_reference(b, scores, 0.2, kind))


def test_fast_nms_leaves_cpu_calls_to_mmcv(monkeypatch):
    """CPU tensors keep mmcv's CPU ops (faster than the reference's Python walk)."""
    from mmdet3d.models.layers import box3d_nms

    from turbox_mm.engine.runner import fast_nms
    boxes, scores = detections(40, seed=13)
    want = box3d_nms.nms_bev(xyxyr(boxes), scores, 0.2), \
        box3d_nms.nms_normal_bev(xyxyr(boxes), scores, 0.2)
    monkeypatch.setattr(tb, 'bev_nms', lambda *a: pytest.fail('CPU boxes reached the op'))
    try:
        assert fast_nms.install()
        got = box3d_nms.nms_bev(xyxyr(boxes), scores, 0.2), \
            box3d_nms.nms_normal_bev(xyxyr(boxes), scores, 0.2)
    finally:
        fast_nms.uninstall()
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_kernel_rotated_nms_across_a_word_boundary():
    boxes, scores = detections(72, seed=7, spread=20.0)
    b = xywhr(boxes)
    assert torch.equal(kernel(tb.bev_nms, b, scores, 0.1, 'rotated'),
                       mmcv_ops.nms_rotated(b, scores, 0.1)[1])


@pytest.mark.parametrize('kind', POLYGON_KINDS)
def test_kernel_overlaps_equal_reference(kind):
    boxes, _ = detections(24, seed=8, spread=4.0)
    b = layout(boxes, kind)
    got = kernel(tb.bev_iou_op, b[:9], b, kind)
    want = ref.iou_matrix_reference(b[:9], b, kind)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    if kind == 'rotated':  # equal boxes: exactly 1 (see the reference), elsewhere mmcv's
        same = (b[:9, None] == b[None]).all(-1)
        tiny = (b[:9, 2] * b[:9, 3] < 1e-14)[:, None].expand_as(same)
        assert same.sum() == 10 and torch.equal(got[same], (~tiny[same]).float())
        torch.testing.assert_close(got[~same], mmcv_ops.box_iou_rotated(b[:9], b)[~same],
                                   rtol=0, atol=2e-6)


def test_kernel_threshold_edges_and_dtypes():
    boxes, scores = detections(20, seed=9)
    b = xywhr(boxes)
    # below zero every later box goes (IoU 0 > thr), far boxes included
    assert kernel(tb.bev_nms, b, scores, -0.5, 'rotated').tolist() == [int(scores.argmax())]
    want = ref.nms_reference(b, scores, 0.2, 'rotated')
    wide = torch.zeros(20, 9)
    wide[:, ::2][:, :5] = b  # non-contiguous rows and columns
    assert torch.equal(kernel(tb.bev_nms, wide[:, ::2][:, :5], scores, 0.2, 'rotated'), want)
    assert torch.equal(kernel(tb.bev_nms, b.double(), scores.double(), 0.2, 'rotated'), want)
    half = b.half()
    assert torch.equal(kernel(tb.bev_nms, half, scores, 0.2, 'rotated'),
                       ref.nms_reference(half, scores, 0.2, 'rotated'))


@pytest.mark.parametrize('impl', ['kernel', 'reference'])
def test_empty_and_single_box(impl):
    run = kernel if impl == 'kernel' else (lambda fn, *a: fn(*a))
    for kind in ref.KINDS:
        width = ref.KINDS[kind]
        assert run(tb.bev_nms, torch.zeros(0, width), torch.zeros(0), 0.2, kind).shape == (0, )
        assert run(tb.bev_nms, torch.ones(1, width), torch.ones(1), 0.2, kind).tolist() == [0]
    assert run(tb.box_iou_rotated, torch.zeros(0, 5), torch.ones(3, 5)).shape == (0, 3)
    assert tb.nms_bev(torch.zeros(0, 5), torch.zeros(0), 0.2, 10, 5).shape == (0, )


def test_bad_input_gets_named_errors():
    with pytest.raises(ValueError, match=r"kind must be one of .*'nope'"):
        tb.bev_nms(torch.zeros(3, 5), torch.zeros(3), 0.2, 'nope')
    with pytest.raises(ValueError, match=r"\[N, >= 7\] for kind 'iou3d', got shape \(3, 5\)"):
        tb.nms3d(torch.zeros(3, 5), torch.zeros(3), 0.2)
    with pytest.raises(ValueError, match=r'scores must be \[N\] for the 3 boxes.*\(4,\)'):
        tb.bev_nms(torch.zeros(3, 5), torch.zeros(4), 0.2, 'rotated')
    with pytest.raises(ValueError, match='floating point'):
        tb.bev_nms(torch.zeros(3, 5, dtype=torch.int64), torch.zeros(3), 0.2, 'rotated')
    with pytest.raises(ValueError, match='NaN'):
        tb.bev_nms(torch.zeros(3, 5), torch.zeros(3), float('nan'), 'rotated')
    with pytest.raises(ValueError, match=r'nms_bev: boxes must be \[N, 5\]'):
        tb.nms_bev(torch.zeros(3, 7), torch.zeros(3), 0.2)
    with pytest.raises(ValueError, match=r"bev_iou: kind must be one of .*'circle'"):
        tb.bev_iou_op(torch.zeros(3, 2), torch.zeros(3, 2), 'circle')
    with pytest.raises(ValueError, match=r'circle_nms: dets must be \[N, 3\]'):
        tb.circle_nms(np.zeros((3, 2)), 1.0)


def test_opcheck_and_compile():
    boxes, scores = detections(30, seed=10)
    b = xywhr(boxes)
    torch.library.opcheck(torch.ops.turbox_mm.bev_iou.default, (b[:5], b, 'rotated'))
    torch.library.opcheck(torch.ops.turbox_mm.bev_nms.default, (b, scores, 0.2, 'rotated'),
                          test_utils=('test_schema', ))  # fake: compiled below

    def post(b, s):
        keep = tb.bev_nms(b, s, 0.2, 'rotated')
        return b[keep], s[keep]

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        got = torch.compile(post, backend='aot_eager', fullgraph=True)(b, scores)
    for a, w in zip(got, post(b, scores)):
        torch.testing.assert_close(a, w, rtol=0, atol=0)


def test_micro_benchmark_runs_quick_on_the_cpu():
    from turbox_mm.benchmark import micro
    assert 'bev_nms' in micro.available('op')
    rows = micro.get('bev_nms')('cpu', quick=True)
    cases = [r['case'] for r in rows]
    assert cases[:2] == ['rotated (mmdet3d nms_bev)', 'centerpoint task: nms_bev 1000 -> 83']
    assert all('kept indices equal' in r['note'] for r in rows[:-1]), rows
    assert all(r['stock']['median_ms'] > 0 and r['turbox']['median_ms'] > 0 for r in rows)


# -- on the GPU: the 4000 boxes, against mmcv's CUDA ops --------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('seed', [0, 1])
def test_cuda_nms_equals_mmcv_cuda_at_4000_boxes(seed):
    from mmdet3d.models.layers import box3d_nms
    from turbox_mm.benchmark.micro.bev_nms import detections as bench_detections
    dets = bench_detections(4000, seed).cuda()
    boxes, scores = dets[:, :7].contiguous(), dets[:, 7].contiguous()
    bev = xyxyr(boxes)
    assert torch.equal(tb.nms_bev(bev, scores, 0.2), box3d_nms.nms_bev(bev, scores, 0.2))
    assert torch.equal(tb.nms_bev(bev, scores, 0.2, 1000, 83),
                       box3d_nms.nms_bev(bev, scores, 0.2, 1000, 83))
    assert torch.equal(tb.nms_normal_bev(bev, scores, 0.2),
                       box3d_nms.nms_normal_bev(bev, scores, 0.2))
    for thr in (0.1, 0.2, 0.5):
        assert torch.equal(tb.nms3d(boxes, scores, thr), mmcv_ops.nms3d(boxes, scores, thr))
        assert torch.equal(tb.nms3d_normal(boxes, scores, thr),
                           mmcv_ops.nms3d_normal(boxes, scores, thr))
    centres = torch.cat([boxes[:, :2], scores[:, None]], 1)
    assert tb.circle_nms(centres, 4.0, 83).tolist() == list(
        box3d_nms.circle_nms(centres.cpu().numpy(), 4.0, post_max_size=83))
    a = xywhr(boxes[:1000])
    same = (a[:, None] == a[None]).all(-1)  # equal boxes: exactly 1 (see the reference)
    assert same.sum() >= 1000 and bool((tb.box_iou_rotated(a, a)[same] == 1).all())
    torch.testing.assert_close(tb.box_iou_rotated(a, a)[~same],
                               mmcv_ops.box_iou_rotated(a, a)[~same], rtol=0, atol=2e-6)
    torch.testing.assert_close(tb.boxes_overlap_bev(boxes[:500], boxes),
                               mmcv_ops.boxes_overlap_bev(boxes[:500], boxes), rtol=0, atol=1e-4)
    torch.testing.assert_close(tb.boxes_iou3d(boxes[:500], boxes),
                               mmcv_ops.boxes_iou3d(boxes[:500], boxes), rtol=0, atol=1e-5)
    # the reference (the CPU path) agrees with the kernels
    assert torch.equal(ref.nms_reference(xywhr(boxes[:1000]).cpu(), scores[:1000].cpu(), 0.2,
                                         'rotated'),
                       tb.bev_nms(xywhr(boxes[:1000]), scores[:1000], 0.2, 'rotated').cpu())


COMPILE_SCRIPT = r'''
import sys
from turbox_mm.ops.bev_nms import triton_kernels as tk
from turbox_mm.testing.triton_aot import compile_variants

POINTERS = {'prm_ptr': '*fp32', 'pa_ptr': '*fp32', 'pb_ptr': '*fp32', 'out_ptr': '*fp32',
            'mask_ptr': '*i64', 'near_ptr': '*i64', 'removed_ptr': '*i64', 'order_ptr': '*i64',
            'count_ptr': '*i32', 'box_ptr': '*fp32'}
SIZES = ('n', 'col_blocks')
INDICES = {'out_ptr': '*i64'}
variants = [(tk._mask_kernel, dict(KIND=k, MARGIN=0.01, EPS=1e-8), o, POINTERS)
            for k in range(5) for o in ((), SIZES)]
variants += [(tk._refine_kernel, dict(KIND=k, MARGIN=0.01, EPS=1e-8, BLOCKS=b), o, POINTERS)
             for k in range(2) for b in (2, 64, 256) for o in ((), SIZES)]
variants += [(tk._iou_kernel, dict(KIND=k, MARGIN=0.01, EPS=1e-8), o, POINTERS)
             for k in range(2) for o in ((), ('m', 'n'))]
variants += [(tk._reduce_kernel, dict(CB=c), o, dict(POINTERS, **INDICES))
             for c in (2, 64, 128) for o in ((), SIZES)]
variants += [(tk._reduce_large_kernel, dict(CHUNK=64), o, dict(POINTERS, **INDICES))
             for o in ((), SIZES)]
variants += [(tk._params_kernel, dict(KIND=k, BLOCK=256), o, dict(POINTERS, box_ptr=d))
             for k in range(5) for d in ('*fp32', '*fp16', '*bf16', '*fp64')
             for o in ((), ('n', 'stride_n', 'stride_c')) if d == '*fp32' or not o]
# every kernel as a launch at CenterPoint's and PointPillars' test-time NMS specialises it
# (module docstring of turbox_mm/testing/triton_aot.py): mmdet3d's nms_bev ('rotated', kind
# 0) and nms_normal_bev ('aligned', kind 2) of up to pre_max_size = 1000 boxes, [n, 5] rows
# (stride_c = 1). n depends on the scene: the cap (16 blocks, a multiple of 16), multiples of
# 16 with 15, 8 and 1 blocks, and a single box; float32 boxes, and float16 once
for n in (1000, 960, 512, 48, 1):
    blocks = -(-n // 64)
    ones = tuple(name for name, v in (('n', n), ('col_blocks', blocks)) if v == 1)
    options = dict(divisible=tuple(name for name, v in (('n', n), ('col_blocks', blocks))
                                   if v % 16 == 0))
    padded = max(1 << (blocks - 1).bit_length(), 2)
    for kind in (0, 2):
        const = dict(KIND=kind, MARGIN=0.01, EPS=1e-8)
        for dtype in ('*fp32', '*fp16') if (n, kind) == (1000, 0) else ('*fp32', ):
            variants.append((tk._params_kernel, dict(KIND=kind, BLOCK=256),
                             ones + ('stride_c', ), dict(POINTERS, box_ptr=dtype), options))
        variants.append((tk._mask_kernel, const, ones, POINTERS, options))
        if kind == 0:
            variants.append((tk._refine_kernel, dict(const, BLOCKS=padded), ones, POINTERS,
                             options))
    variants.append((tk._reduce_kernel, dict(CB=padded), ones, dict(POINTERS, **INDICES),
                     options))
failures = compile_variants(variants)
print('\n'.join(failures) or 'all compiled')
sys.exit(1 if failures else 0)
'''


@pytest.mark.slow
def test_kernels_compile_for_sm90_for_every_kind_and_specialisation(tmp_path):
    """The interpreter runs Python, not Triton's compiler: compile every kernel ahead of time
    for the H200's sm_90, for every kind, with the size arguments at 1, and as a launch at
    CenterPoint's and PointPillars' NMS sizes specialises it (ints at 1, multiples of 16)."""
    compile_for_sm90_in_subprocess(COMPILE_SCRIPT, tmp_path)


# -- ops.fast: mmdet3d's NMS calls rebound -----------------------------------------------------

def test_fast_ops_rebinds_mmdet3d_nms_and_uninstall_restores_it():
    import mmcv.ops
    from mmdet3d.models.layers import box3d_nms
    from mmengine.config import Config

    from turbox_mm.engine.runner import fast_nms
    from turbox_mm.engine.runner.fast_ops import apply_fast_ops
    fast_nms.uninstall()
    boxes, scores = detections(60, seed=11)
    bev = xyxyr(boxes)
    want = box3d_nms.nms_bev(bev, scores, 0.2, 50, 20), box3d_nms.nms_normal_bev(bev, scores, 0.2)
    try:
        cfg = Config(dict(model=dict(type='VoxelNet')))
        changes = apply_fast_ops(cfg, dict(fast=True))
        assert f'{fast_nms._BOX3D_NMS}.nms_rotated = turbox_mm.ops.bev_nms (process-wide)' in \
            changes
        assert box3d_nms.nms_rotated is not mmcv.ops.nms_rotated
        assert apply_fast_ops(cfg, dict(fast=True)) == []  # installed once
        calls = []
        real = tb.bev_nms
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fast_nms, '_on_gpu', lambda boxes: True)  # CUDA's route, on the CPU
            mp.setattr(tb, 'bev_nms', lambda *a: calls.append(a[3]) or real(*a))
            got = (box3d_nms.nms_bev(bev, scores, 0.2, 50, 20),
                   box3d_nms.nms_normal_bev(bev, scores, 0.2))
        assert calls == ['rotated', 'aligned']  # mmdet3d's wrappers ran turbox_mm's op
        for g, w in zip(got, want):
            assert torch.equal(g, w)
        # calls the kernels do not cover go to mmcv's own function
        labels = torch.zeros(60, dtype=torch.long)
        assert torch.equal(box3d_nms.nms_rotated(xywhr(boxes), scores, 0.2, labels)[1],
                           mmcv.ops.nms_rotated(xywhr(boxes), scores, 0.2, labels)[1])
    finally:
        fast_nms.uninstall()
    assert box3d_nms.nms_rotated is mmcv.ops.nms_rotated and box3d_nms.nms is mmcv.ops.nms
    assert apply_fast_ops(Config(dict(model=dict(type='VoxelNet'))), dict(fast=False)) == []
    assert fast_nms.installed() == []
