"""Triton kernels of hard and dynamic voxelization (spec: :mod:`.reference`).

Hard voxelization in three kernels around one radix sort and one scan, every step parallel
over points (mmcv's deterministic CUDA mode instead compares each point with all earlier ones
and numbers the voxels in one GPU thread):

1. :func:`_keys_kernel`: each point's voxel, as a sortable key ``sample * volume + (z * gy + y)
   * gx + x``, or ``num_samples * volume`` when it is dropped (it then sorts last).
2. ``torch.sort(stable=True)`` groups the points of a voxel, in their original order.
3. :func:`_opens_kernel`: a point opens its voxel if its sorted neighbour before it has
   another key; the flag is written at the point's original position.
4. ``torch.cumsum`` of the flags numbers the voxels in order of their first point.
5. :func:`_scatter_kernel`, per sorted position: a binary search finds where its voxel's run
   starts (the point's rank in the voxel, and the voxel's first point) and ends (its point
   count); the point is written to ``voxels[row, rank]`` if it is among the first
   ``max_points`` of a voxel within the sample's ``max_voxels``; the voxel's first point
   writes the coordinates and the count.

Numerics: ``(p - min) / size`` with IEEE division (``div_rn``) in float32 (float64 for float64
points), floored, compared in floating point: the voxel of every point equals mmcv's.
"""
import math
from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._triton_launch import cdiv, next_power_of_2
from .reference import compute_dtype

BLOCK = 256


@triton.jit
def _cell(p, low, size):
    """``floor((p - low) / size)`` with IEEE division: float64 for float64 points, else
    float32."""
    # One return, after the branch: Triton compiles every statement after an early return too.
    if p.dtype == tl.float64:
        cell = tl.floor((p - low) / size)  # float64 division is IEEE-rounded
    else:
        cell = tl.floor(tl.math.div_rn(p.to(tl.float32) - low, size))
    return cell


@triton.jit
def _point_cells(pts_ptr, prm_ptr, offs, live, stride_n, stride_c, gx, gy, gz):
    """Voxel ``(x, y, z)`` cells of the points at ``offs`` (float) and whether they are inside."""
    base = pts_ptr + offs.to(tl.int64) * stride_n
    x = tl.load(base, mask=live, other=0)
    y = tl.load(base + stride_c, mask=live, other=0)
    z = tl.load(base + 2 * stride_c, mask=live, other=0)
    # prm: x_min, y_min, z_min, vx, vy, vz in the compute dtype
    cx = _cell(x, tl.load(prm_ptr + 0), tl.load(prm_ptr + 3))
    cy = _cell(y, tl.load(prm_ptr + 1), tl.load(prm_ptr + 4))
    cz = _cell(z, tl.load(prm_ptr + 2), tl.load(prm_ptr + 5))
    inside = (live & (cx >= 0) & (cx < gx) & (cy >= 0) & (cy < gy) & (cz >= 0) & (cz < gz))
    return cx, cy, cz, inside


@triton.jit(do_not_specialize=['N'])
def _coords_kernel(pts_ptr, prm_ptr, out_ptr, N, stride_n, stride_c, gx, gy, gz,
                   BLOCK: tl.constexpr):
    """Dynamic voxelization: ``out[i] = (z, y, x)`` of point ``i``, or ``(-1, -1, -1)``."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < N
    cx, cy, cz, inside = _point_cells(pts_ptr, prm_ptr, offs, live, stride_n, stride_c, gx,
                                      gy, gz)
    out = out_ptr + offs * 3
    tl.store(out, tl.where(inside, cz, -1.0).to(tl.int32), mask=live)
    tl.store(out + 1, tl.where(inside, cy, -1.0).to(tl.int32), mask=live)
    tl.store(out + 2, tl.where(inside, cx, -1.0).to(tl.int32), mask=live)


@triton.jit(do_not_specialize=['N'])
def _keys_kernel(pts_ptr, prm_ptr, bounds_ptr, key_ptr, N, S, SEARCH_STEPS, stride_n, stride_c,
                 gx, gy, gz, VOLUME, DROPPED, BLOCK: tl.constexpr):
    """``key[i]``: sample * volume + linear voxel index, or ``DROPPED`` (= S * volume).

    Products of grid sizes come from the host (``VOLUME``, ``DROPPED``), exact in int64: an
    int argument equal to 1 is a compile-time constant in Triton, with no ``.to``."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < N
    cx, cy, cz, inside = _point_cells(pts_ptr, prm_ptr, offs, live, stride_n, stride_c, gx,
                                      gy, gz)
    # The sample: the last s with bounds[s] <= i (bounds = [0, end_0, end_1, ...]).
    lo = tl.zeros([BLOCK], dtype=tl.int64)
    hi = tl.zeros([BLOCK], dtype=tl.int64) + (S - 1)
    for _ in range(SEARCH_STEPS):
        active = lo < hi
        mid = (lo + hi + 1) // 2
        go_up = tl.load(bounds_ptr + mid, mask=live & active, other=N + 1) <= offs
        lo = tl.where(active & go_up, mid, lo)
        hi = tl.where(active & ~go_up, mid - 1, hi)
    # Dropped points (NaN, inf, far away) are zeroed before the integer conversion.
    ix = tl.where(inside, cx, 0.0).to(tl.int64)
    iy = tl.where(inside, cy, 0.0).to(tl.int64)
    iz = tl.where(inside, cz, 0.0).to(tl.int64)
    key = tl.where(inside, lo * VOLUME + (iz * gy + iy) * gx + ix, DROPPED)
    tl.store(key_ptr + offs, key, mask=live)


@triton.jit(do_not_specialize=['N'])
def _opens_kernel(skey_ptr, order_ptr, flag_ptr, N, DROPPED, BLOCK: tl.constexpr):
    """``flag[order[j]] = 1`` if sorted position ``j`` opens a voxel, else 0."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < N
    key = tl.load(skey_ptr + offs, mask=live, other=DROPPED)
    prev = tl.load(skey_ptr + offs - 1, mask=live & (offs > 0), other=-1)
    opens = (key != prev) & (key < DROPPED)
    point = tl.load(order_ptr + offs, mask=live, other=0)
    tl.store(flag_ptr + point, opens.to(tl.int32), mask=live)


@triton.jit(do_not_specialize=['N'])
def _scatter_kernel(pts_ptr, skey_ptr, order_ptr, firsts_ptr, before_ptr, offset_ptr,
                    vox_ptr, coor_ptr, num_ptr, N, C, DROPPED, SEARCH_STEPS, stride_n, stride_c,
                    gx, gy, VOLUME, PLANE, MAX_POINTS: tl.constexpr, MAX_VOXELS,
                    BLOCK: tl.constexpr,
                    CBLOCK: tl.constexpr):
    """Write each kept point to its voxel; the voxel's first point writes coordinates and count.

    ``firsts[i]``: voxels opened by points ``< i`` (exclusive scan, length N + 1);
    ``before[s]``: voxels opened before sample ``s``; ``offset[s]``: output row of sample
    ``s``'s first voxel.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < N
    key = tl.load(skey_ptr + offs, mask=live, other=DROPPED)
    valid = live & (key < DROPPED)
    # Run of equal keys around j: [start, end).
    lo = tl.zeros([BLOCK], dtype=tl.int64)
    hi = offs
    up_lo = offs + 1
    up_hi = tl.zeros([BLOCK], dtype=tl.int64) + N
    for _ in range(SEARCH_STEPS):
        active = valid & (lo < hi)
        mid = (lo + hi) // 2
        below = tl.load(skey_ptr + mid, mask=active, other=DROPPED) < key
        lo = tl.where(active & below, mid + 1, lo)
        hi = tl.where(active & ~below, mid, hi)
        up_active = valid & (up_lo < up_hi)
        up_mid = (up_lo + up_hi) // 2
        same = tl.load(skey_ptr + up_mid, mask=up_active, other=DROPPED) <= key
        up_lo = tl.where(up_active & same, up_mid + 1, up_lo)
        up_hi = tl.where(up_active & ~same, up_mid, up_hi)
    start, end = lo, up_lo
    rank = offs - start
    point = tl.load(order_ptr + offs, mask=valid, other=0)
    first = tl.load(order_ptr + start, mask=valid, other=0)
    sample = key // VOLUME
    voxel = (tl.load(firsts_ptr + first + 1, mask=valid, other=0)
             - tl.load(before_ptr + sample, mask=valid, other=0) - 1)
    keep = valid & (rank < MAX_POINTS) & (voxel < MAX_VOXELS)
    row = tl.load(offset_ptr + sample, mask=keep, other=0) + voxel

    chan = tl.arange(0, CBLOCK)
    for c0 in range(0, C, CBLOCK):
        cmask = keep[:, None] & ((c0 + chan) < C)[None, :]
        src = pts_ptr + point[:, None] * stride_n + (c0 + chan)[None, :].to(tl.int64) * stride_c
        values = tl.load(src, mask=cmask, other=0)
        dst = vox_ptr + (row * MAX_POINTS + rank)[:, None] * C + (c0 + chan)[None, :]
        tl.store(dst, values, mask=cmask)

    head = keep & (rank == 0)
    linear = key - sample * VOLUME
    x = linear % gx
    y = (linear // gx) % gy
    z = linear // PLANE
    coor = coor_ptr + row * 4
    tl.store(coor, sample.to(tl.int32), mask=head)
    tl.store(coor + 1, z.to(tl.int32), mask=head)
    tl.store(coor + 2, y.to(tl.int32), mask=head)
    tl.store(coor + 3, x.to(tl.int32), mask=head)
    tl.store(num_ptr + row, tl.minimum(end - start, MAX_POINTS).to(tl.int32), mask=head)


def _grid(num: int):
    return (cdiv(max(num, 1), BLOCK), )


def _params(points: Tensor, voxel_size: Sequence[float],
            point_cloud_range: Sequence[float]) -> Tensor:
    """``[x_min, y_min, z_min, vx, vy, vz]``: their float32 values, in the compute dtype."""
    values = torch.tensor(list(point_cloud_range[:3]) + list(voxel_size), dtype=torch.float32)
    return values.to(compute_dtype(points.dtype)).to(points.device, non_blocking=True)


def _steps(length: int) -> int:
    """Binary-search iterations that settle any range of ``length`` + 1 positions."""
    return max(1, math.ceil(math.log2(length + 2)))


def dynamic_voxelize(points: Tensor, voxel_size: Sequence[float],
                     point_cloud_range: Sequence[float], grid: List[int]) -> Tensor:
    """Each point's ``(z, y, x)`` voxel, ``(-1, -1, -1)`` when dropped: ``[N, 3]`` int32."""
    num = points.shape[0]
    out = torch.empty(num, 3, dtype=torch.int32, device=points.device)
    if num:
        _coords_kernel[_grid(num)](points, _params(points, voxel_size, point_cloud_range), out,
                                   num, points.stride(0), points.stride(1), *grid, BLOCK=BLOCK)
    return out


def hard_voxelize(points: Tensor, sample_sizes: Sequence[int], voxel_size: Sequence[float],
                  point_cloud_range: Sequence[float], grid: List[int], max_points: int,
                  max_voxels: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Hard voxelization of concatenated samples; see :func:`.reference.hard_voxelize_reference`.

    One host synchronisation: the number of voxels, to size the outputs.
    """
    num, channels = points.shape
    device = points.device
    samples = len(sample_sizes)
    volume = grid[0] * grid[1] * grid[2]
    dropped = samples * volume
    bounds_host = [0]
    for size in sample_sizes:
        bounds_host.append(bounds_host[-1] + int(size))
    bounds = torch.tensor(bounds_host, dtype=torch.int64).to(device, non_blocking=True)
    keys = torch.empty(num, dtype=torch.int64, device=device)
    stride_n, stride_c = points.stride(0), points.stride(1)
    _keys_kernel[_grid(num)](points, _params(points, voxel_size, point_cloud_range), bounds,
                             keys, num, samples, _steps(samples), stride_n, stride_c, *grid,
                             volume, dropped, BLOCK=BLOCK)
    sorted_keys, order = torch.sort(keys, stable=True)
    flags = torch.empty(num, dtype=torch.int32, device=device)
    _opens_kernel[_grid(num)](sorted_keys, order, flags, num, dropped, BLOCK=BLOCK)
    firsts = torch.zeros(num + 1, dtype=torch.int64, device=device)
    torch.cumsum(flags, 0, dtype=torch.int64, out=firsts[1:])
    before = firsts[bounds]  # voxels opened before each sample (and the total, last)
    opened = (before[1:] - before[:-1]).clamp_(max=max_voxels)
    ends = torch.cumsum(opened, 0)
    total = int(ends[-1])  # the one host synchronisation
    voxels = points.new_zeros(total, max_points, channels)
    coors = torch.empty(total, 4, dtype=torch.int32, device=device)
    num_points = torch.empty(total, dtype=torch.int32, device=device)
    if total:
        _scatter_kernel[_grid(num)](
            points, sorted_keys, order, firsts, before, ends - opened, voxels, coors,
            num_points, num, channels, dropped, _steps(num), stride_n, stride_c, grid[0],
            grid[1], volume, grid[0] * grid[1], MAX_POINTS=max_points, MAX_VOXELS=max_voxels,
            BLOCK=BLOCK, CBLOCK=min(next_power_of_2(max(channels, 1)), 16))
    return voxels, coors, num_points
