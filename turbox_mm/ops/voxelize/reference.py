"""Hard and dynamic voxelization in plain PyTorch: the specification and the CPU path.

The semantics are mmcv 2.1's (``mmcv.ops.Voxelization``, CPU and deterministic CUDA modes),
which mmdet3d's ``VoxelizationByGridShape`` calls:

* **Grid.** ``grid[d] = round((range_max[d] - range_min[d]) / voxel_size[d])`` in float32, for
  ``d`` = x, y, z. A point's voxel is ``c[d] = floor((p[d] - range_min[d]) / voxel_size[d])``,
  evaluated in float32 for 16- and 32-bit points and in float64 for float64 points (with the
  float32 values of the range and size, as mmcv passes them).
* **Dropped points.** A point is out when any ``c[d] < 0`` or ``c[d] >= grid[d]``; NaN and
  infinite coordinates are out too (mmcv's CPU op drops them through its integer conversion;
  see :func:`voxel_coords_reference`).
* **Coordinates** are written ``(z, y, x)``, int32; a dropped point's row is ``(-1, -1, -1)``
  (dynamic voxelization).
* **Hard voxelization** walks the points in order. The first point of a new voxel opens it,
  unless ``max_voxels`` voxels are open already (then every point of that voxel is dropped).
  A voxel keeps its first ``max_points`` points, in order. Voxels are numbered in the order
  their first point appears, so the result is deterministic.

Several samples go through in one call (``sample_sizes``): each sample is voxelized on its own
(its own ``max_voxels`` budget) and the results are concatenated in sample order, which is what
mmdet3d's ``Det3DDataPreprocessor.voxelize`` builds with one call per sample.

The implementation below is vectorised (a stable sort by voxel, a cumulative count of first
points), the same algorithm as the kernels, but with torch ops only.
"""
import math
from typing import List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

#: Largest voxel key (samples x grid volume): int64 with room to spare.
MAX_KEY = 2**62
#: Point dtypes the op accepts; 16-bit points are voxelized in float32.
POINT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the voxel indices are computed in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def grid_shape(voxel_size: Sequence[float], point_cloud_range: Sequence[float]) -> List[int]:
    """``[gx, gy, gz]``, rounded in float32 as mmcv's op does; raises ``ValueError`` naming the
    argument when the range or size cannot make a grid.

    Args:
        voxel_size (Sequence[float]): ``[vx, vy, vz]``, each > 0.
        point_cloud_range (Sequence[float]): ``[x_min, y_min, z_min, x_max, y_max, z_max]``.

    Returns:
        list[int]: Voxels along x, y and z.

    Examples:
        >>> grid_shape([0.075, 0.075, 0.2], [-54, -54, -5, 54, 54, 3])
        [1440, 1440, 40]
    """
    size = [float(v) for v in voxel_size]
    rng = [float(v) for v in point_cloud_range]
    if len(size) != 3 or not all(math.isfinite(v) and v > 0 for v in size):
        raise ValueError(f'voxelize: voxel_size must be 3 finite values > 0, got '
                         f'{list(voxel_size)}')
    if len(rng) != 6 or not all(math.isfinite(v) for v in rng):
        raise ValueError('voxelize: point_cloud_range must be 6 finite values [x_min, y_min, '
                         f'z_min, x_max, y_max, z_max], got {list(point_cloud_range)}')
    # float32 arithmetic as mmcv's C++, with C's round (halves away from zero); numpy, not
    # torch, so that the check also runs under fake tensors (torch.compile, opcheck).
    cells = ((np.float32(rng[i + 3]) - np.float32(rng[i])) / np.float32(size[i]) for i in range(3))
    grid = [int(math.floor(c + 0.5)) if c >= 0 else -int(math.floor(-c + 0.5)) for c in
            (float(c) for c in cells)]
    if min(grid) < 1:
        raise ValueError(f'voxelize: point_cloud_range {list(point_cloud_range)} with voxel_size '
                         f'{list(voxel_size)} gives a grid of {grid} voxels (x, y, z); each must '
                         'be at least 1 (is the range written [min..., max...]?)')
    if max(grid) >= 2**31 or grid[0] * grid[1] * grid[2] > MAX_KEY:
        raise ValueError(f'voxelize: a grid of {grid} voxels (x, y, z) is too large: at most '
                         f'2**31 - 1 a side and {MAX_KEY} in all')
    return grid


def voxel_coords_reference(points: Tensor, voxel_size: Sequence[float],
                           point_cloud_range: Sequence[float]) -> Tensor:
    """Dynamic voxelization: each point's voxel ``(z, y, x)``, or ``(-1, -1, -1)`` if dropped.

    Equal to mmcv's ``dynamic_voxelize_forward``. Comparisons are made in floating point
    before any integer conversion, so NaN and infinite coordinates are dropped on every
    device (mmcv's CPU op drops them too; its CUDA op converts NaN to voxel 0).

    Args:
        points (Tensor): ``[N, C]`` with ``C >= 3``, x, y, z first.
        voxel_size (Sequence[float]): ``[vx, vy, vz]``.
        point_cloud_range (Sequence[float]): ``[x_min, y_min, z_min, x_max, y_max, z_max]``.

    Returns:
        Tensor: ``[N, 3]`` int32.
    """
    grid = grid_shape(voxel_size, point_cloud_range)
    dtype = compute_dtype(points.dtype)
    # The float32 values of the range and size, as mmcv receives them, then widened if needed.
    lo = torch.tensor(point_cloud_range[:3], dtype=torch.float32).to(points.device, dtype)
    size = torch.tensor(voxel_size, dtype=torch.float32).to(points.device, dtype)
    cells = torch.floor((points[:, :3].to(dtype) - lo) / size)
    inside = ((cells >= 0) & (cells < cells.new_tensor(grid))).all(dim=1)
    coords = torch.where(inside[:, None], cells, torch.full_like(cells, -1)).to(torch.int32)
    return coords.flip(1).contiguous()


def sample_index(sample_sizes: Sequence[int], device: torch.device) -> Tensor:
    """``[N]`` int64: the sample each point of the concatenated cloud belongs to."""
    sizes = torch.tensor(list(sample_sizes), dtype=torch.int64, device=device)
    return torch.repeat_interleave(torch.arange(len(sample_sizes), device=device), sizes)


def hard_voxelize_reference(points: Tensor, sample_sizes: Sequence[int],
                            voxel_size: Sequence[float], point_cloud_range: Sequence[float],
                            max_points: int, max_voxels: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Hard voxelization of one or more concatenated samples (module docstring).

    Args:
        points (Tensor): ``[N, C]``, the samples' points one after the other.
        sample_sizes (Sequence[int]): Points per sample, summing to ``N``.
        voxel_size (Sequence[float]): ``[vx, vy, vz]``.
        point_cloud_range (Sequence[float]): ``[x_min, y_min, z_min, x_max, y_max, z_max]``.
        max_points (int): Points kept per voxel (> 0).
        max_voxels (int): Voxels kept per sample (> 0).

    Returns:
        tuple[Tensor, Tensor, Tensor]: ``voxels [M, max_points, C]`` (points' dtype, zero
        where a voxel has fewer points), ``coors [M, 4]`` int32 ``(sample, z, y, x)`` and
        ``num_points [M]`` int32; sample 0's voxels first.
    """
    num, channels = points.shape
    device = points.device
    gx, gy, gz = grid_shape(voxel_size, point_cloud_range)
    volume = gx * gy * gz
    num_samples = len(sample_sizes)
    coords = voxel_coords_reference(points, voxel_size, point_cloud_range).long()
    valid = coords[:, 0] >= 0
    sample = sample_index(sample_sizes, device)
    linear = (coords[:, 0] * gy + coords[:, 1]) * gx + coords[:, 2]
    key = torch.where(valid, sample * volume + linear, torch.full_like(linear,
                                                                       num_samples * volume))

    # Points of one voxel become neighbours, in their original order (stable sort).
    sorted_key, order = torch.sort(key, stable=True)
    position = torch.arange(num, device=device)
    opens = torch.ones(num, dtype=torch.bool, device=device)
    opens[1:] = sorted_key[1:] != sorted_key[:-1]
    segment_start = torch.cummax(torch.where(opens, position, 0), dim=0).values
    rank = torch.empty_like(position)
    rank[order] = position - segment_start  # the point's place in its voxel
    first = torch.empty_like(position)
    first[order] = order[segment_start]  # the voxel's first point

    # A voxel's number in its sample = first points of the sample before its own first point.
    is_first = valid & (rank == 0)
    firsts = torch.zeros(num + 1, dtype=torch.int64, device=device)
    firsts[1:] = torch.cumsum(is_first, 0)
    bounds = torch.zeros(num_samples + 1, dtype=torch.int64, device=device)
    bounds[1:] = torch.cumsum(torch.tensor(list(sample_sizes), device=device), 0)
    before = firsts[bounds[:-1]]
    opened = (firsts[bounds[1:]] - before).clamp(max=max_voxels)
    offset = torch.cumsum(opened, 0) - opened
    voxel = firsts[first + 1] - 1 - before[sample]
    keep = valid & (rank < max_points) & (voxel < max_voxels)
    row = offset[sample] + voxel

    total = int(opened.sum())
    voxels = points.new_zeros(total, max_points, channels)
    voxels[row[keep], rank[keep]] = points[keep]
    heads = keep & (rank == 0)
    coors = torch.zeros(total, 4, dtype=torch.int32, device=device)
    coors[row[heads]] = torch.cat([sample[heads, None], coords[heads]], 1).int()
    num_points = torch.bincount(row[keep], minlength=total).int()
    return voxels, coors, num_points
