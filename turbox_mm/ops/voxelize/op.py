"""``torch.ops.turbox_mm.hard_voxelize`` and ``dynamic_voxelize``: the ops, fakes and dispatch.

Two ``torch.library.custom_op`` ops with fake (shape-only) implementations, so that
``torch.compile`` traces through them (hard voxelization's voxel count is data-dependent: its
fake returns an unbacked size):

- ``turbox_mm::dynamic_voxelize(points, voxel_size, point_cloud_range) -> coors [N, 3]``;
- ``turbox_mm::hard_voxelize(points, sample_sizes, voxel_size, point_cloud_range, max_points,
  max_voxels) -> (voxels [M, max_points, C], coors [M, 4], num_points [M])``.

CUDA tensors with Triton run the kernels of :mod:`.triton_kernels`; anything else (CPU
tensors, no Triton, ``TURBOX_OPS_REFERENCE=1``) runs :mod:`.reference` and warns once
(:mod:`turbox_mm.ops.dispatch`). No autograd: voxelization has no gradient (mmcv's has none).
"""
from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from .. import dispatch
from .reference import (MAX_KEY, POINT_DTYPES, grid_shape, hard_voxelize_reference,
                        voxel_coords_reference)

try:
    from . import triton_kernels
except ImportError:  # no Triton: the reference serves every device
    triton_kernels = None


#: Both ops' dispatch: one warning between them.
_dispatch = dispatch.OpDispatch('voxelize', triton_kernels, 'sort-based torch ops')
#: Why the ops would run the reference for a tensor rather than the kernel; None if not.
fallback_reason = _dispatch.fallback_reason


def check_points(points: Tensor, name: str = 'points') -> None:
    """Raise ``ValueError`` naming the shape or dtype unless ``points`` is ``[N, C >= 3]`` float."""
    if points.dim() != 2 or points.shape[1] < 3:
        raise ValueError(f'voxelize: {name} must be [N, C] with C >= 3 (x, y, z first), got shape '
                         f'{tuple(points.shape)}')
    if points.dtype not in POINT_DTYPES:
        raise ValueError(f'voxelize: {name} must be float16, bfloat16, float32 or float64, got '
                         f'{points.dtype}')


def check_limits(points: Tensor, sample_sizes: Sequence[int], max_points: int, max_voxels: int,
                 grid: Sequence[int]) -> None:
    """Raise ``ValueError`` unless the sample sizes cover ``points`` and the limits are > 0."""
    if len(sample_sizes) == 0 or any(s < 0 for s in sample_sizes) or \
            sum(sample_sizes) != points.shape[0]:
        raise ValueError(f'voxelize: sample_sizes {list(sample_sizes)} must be one or more sizes '
                         f'>= 0 that add up to the {points.shape[0]} points')
    volume = 1
    for size in grid:
        volume *= size
    if len(sample_sizes) * volume >= MAX_KEY:
        raise ValueError(f'voxelize: {len(sample_sizes)} samples of a {grid} grid exceed the '
                         f'voxel key range ({MAX_KEY})')
    if max_points < 1 or max_voxels < 1:
        raise ValueError(f'voxelize: hard voxelization needs max_points >= 1 and max_voxels >= 1, '
                         f'got {max_points} and {max_voxels} (-1 means dynamic voxelization: '
                         'call dynamic_voxelize)')


@torch.library.custom_op('turbox_mm::dynamic_voxelize', mutates_args=())
def dynamic_voxelize_op(points: Tensor, voxel_size: List[float],
                        point_cloud_range: List[float]) -> Tensor:
    """Each point's voxel ``(z, y, x)`` or ``(-1, -1, -1)``: ``[N, 3]`` int32."""
    check_points(points)
    grid = grid_shape(voxel_size, point_cloud_range)
    if _dispatch.use_kernel(points):
        return triton_kernels.dynamic_voxelize(points, voxel_size, point_cloud_range, grid)
    return voxel_coords_reference(points, voxel_size, point_cloud_range)


@dynamic_voxelize_op.register_fake
def _(points, voxel_size, point_cloud_range):
    check_points(points)
    grid_shape(voxel_size, point_cloud_range)
    return points.new_empty(points.shape[0], 3, dtype=torch.int32)


@torch.library.custom_op('turbox_mm::hard_voxelize', mutates_args=())
def hard_voxelize_op(points: Tensor, sample_sizes: List[int], voxel_size: List[float],
                     point_cloud_range: List[float], max_points: int,
                     max_voxels: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Hard voxelization of concatenated samples (see :mod:`.reference`)."""
    check_points(points)
    grid = grid_shape(voxel_size, point_cloud_range)
    check_limits(points, sample_sizes, max_points, max_voxels, grid)
    if points.shape[0] == 0:  # nothing to sort, nothing to synchronise on
        return (points.new_zeros(0, max_points, points.shape[1]),
                points.new_zeros(0, 4, dtype=torch.int32), points.new_zeros(0, dtype=torch.int32))
    if _dispatch.use_kernel(points):
        return triton_kernels.hard_voxelize(points, sample_sizes, voxel_size, point_cloud_range,
                                            grid, max_points, max_voxels)
    return hard_voxelize_reference(points, sample_sizes, voxel_size, point_cloud_range,
                                   max_points, max_voxels)


@hard_voxelize_op.register_fake
def _(points, sample_sizes, voxel_size, point_cloud_range, max_points, max_voxels):
    check_points(points)
    check_limits(points, sample_sizes, max_points, max_voxels,
                 grid_shape(voxel_size, point_cloud_range))
    total = torch.library.get_ctx().new_dynamic_size()
    return (points.new_empty(total, max_points, points.shape[1]),
            points.new_empty(total, 4, dtype=torch.int32),
            points.new_empty(total, dtype=torch.int32))
