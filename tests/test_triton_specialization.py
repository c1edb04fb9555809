"""A size that changes from batch to batch must not compile a Triton kernel again.

Triton compiles a kernel once per *specialisation* of its int arguments: by default an int
equal to 1 becomes a constant and one divisible by 16 is marked so. An argument that follows
the data (Sparse4D's anchor count with its denoising queries, the number of ground truths in
a matching, the number of points of a sweep) would therefore compile the kernel again the
first time a batch brings a multiple of 16, or a 1: some hundred milliseconds in the middle of
training, inside a timed window (seen: one SparseDrive stage-2 iteration of 569 ms among
280 ms ones). The kernels mark those arguments ``do_not_specialize``; these tests launch each
op at sizes of every class and count the compiled variants (GPU only: the interpreter compiles
nothing).
"""
from typing import Callable, List

import pytest
import torch

from turbox_mm.ops.deformable_aggregation import deformable_aggregation, feature_maps_format
from turbox_mm.ops.deformable_aggregation import triton_kernels as da_kernels
from turbox_mm.ops.dynamic_scatter import dynamic_scatter
from turbox_mm.ops.dynamic_scatter import triton_kernels as ds_kernels
from turbox_mm.ops.lsap import linear_sum_assignment
from turbox_mm.ops.lsap import triton_kernels as lsap_kernels
from turbox_mm.ops.sigmoid_focal import sigmoid_focal
from turbox_mm.ops.sigmoid_focal import triton_kernels as focal_kernels
from turbox_mm.ops.voxelize import hard_voxelize
from turbox_mm.ops.voxelize import triton_kernels as vx_kernels

# Sizes of every class Triton tells apart: neither 1 nor a multiple of 16, a multiple of 16,
# another of each, and 1 where the op takes it.
SIZES = (37, 48, 53, 64)


def compiled_variants(kernels) -> int:
    """How many binaries the jitted ``kernels`` hold, on every device."""
    return sum(len(cache[0]) for k in kernels for cache in k.device_caches.values())


def assert_compiled_once(run: Callable[[int], None], kernels: List, sizes=SIZES) -> None:
    """After the first size, no other size adds a compiled variant."""
    run(sizes[0])  # compiles (and autotunes) what the op needs
    torch.cuda.synchronize()
    before = compiled_variants(kernels)
    assert before > 0, 'the op launched none of the kernels named'
    for size in sizes[1:]:
        run(size)
    torch.cuda.synchronize()
    assert compiled_variants(kernels) == before, (
        f'sizes {sizes[1:]} compiled {compiled_variants(kernels) - before} more variant(s)')


@pytest.mark.cuda
def test_deformable_aggregation_anchor_count():
    gen = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, 6, 256, h, w, generator=gen) for h, w in ((16, 44), (8, 22))]
    feat, shape, start = (t.cuda() for t in feature_maps_format(maps))
    feat.requires_grad_()

    def run(anchors):
        loc = torch.rand(2, anchors, 13, 6, 2, device='cuda', requires_grad=True)
        weights = torch.rand(2, anchors, 13, 6, 2, 8, device='cuda', requires_grad=True)
        deformable_aggregation(feat, shape, start, loc, weights).sum().backward()

    assert_compiled_once(run, [da_kernels._da_fwd_kernel, da_kernels._da_bwd_kernel],
                         sizes=(901, 912, 1, 925, 928))


@pytest.mark.cuda
def test_sigmoid_focal_rows():
    def run(rows):
        logits = torch.randn(rows, 10, device='cuda', requires_grad=True)
        target = torch.randint(0, 11, (rows, ), device='cuda')
        sigmoid_focal(logits, target, 2.0, 0.25).sum().backward()

    assert_compiled_once(run, [focal_kernels._focal_kernel], sizes=(37, 48, 1, 53, 64))


@pytest.mark.cuda
def test_lsap_ground_truth_count():
    def run(gts):
        cost = torch.rand(3, 100, gts, device='cuda', dtype=torch.float64)
        linear_sum_assignment(cost)

    assert_compiled_once(run, [lsap_kernels._lsap_kernel], sizes=(37, 48, 1, 53, 64))


@pytest.mark.cuda
def test_voxelize_point_count():
    def run(points):
        gen = torch.Generator().manual_seed(points)
        cloud = (torch.rand(points, 5, generator=gen) * 8 - 4).cuda()
        hard_voxelize(cloud, [0.5, 0.5, 0.25], [-5.0, -5.0, -0.5, 5.0, 5.0, 1.5], 4, 500)

    kernels = [vx_kernels._coords_kernel, vx_kernels._keys_kernel, vx_kernels._opens_kernel,
               vx_kernels._scatter_kernel]
    assert_compiled_once(run, kernels, sizes=(3001, 3008, 1, 3013, 3024))


@pytest.mark.cuda
def test_dynamic_scatter_point_count():
    def run(points):
        gen = torch.Generator().manual_seed(points)
        feats = torch.randn(points, 5, generator=gen).cuda().requires_grad_()
        coors = torch.randint(0, 4, (points, 3), generator=gen, dtype=torch.int32).cuda()
        out, _ = dynamic_scatter(feats, coors, 'max')
        out.sum().backward()

    assert_compiled_once(run, [ds_kernels._reduce_kernel], sizes=(601, 608, 1, 613, 624))
