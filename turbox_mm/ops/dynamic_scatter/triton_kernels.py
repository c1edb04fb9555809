"""The GPU path of dynamic scatter (spec: :mod:`.reference`).

1. Each point's coordinate row is packed into one int64 key, ``62 // D`` bits per column in
   column order, so that sorting the keys sorts the rows lexicographically; a row with a
   negative entry gets the largest key and sorts last.
2. ``torch.sort(stable=True)`` groups each voxel's points, in their original order.
3. A voxel starts where the sorted key changes; a scan numbers the voxels. One host
   synchronisation reads the voxel count (to size the outputs) and the largest coordinate
   (a row that does not fit its bits makes the caller fall back to the reference).
4. :func:`_reduce_kernel`, one program per voxel and block of channels, walks the voxel's
   points in sorted order and reduces them in float32 (float64 for float64 features): a
   fixed order, so the result is deterministic (mmcv's op adds with atomics). For ``'max'`` a
   second walk finds the lowest point index that holds each maximum.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._triton_launch import cdiv, next_power_of_2

BLOCK_P = 32
KEY_BITS = 62
SENTINEL = 2**63 - 1
_MODES = {'max': 0, 'sum': 1, 'mean': 2}


@triton.jit
def _tile(feats_ptr, order_ptr, first, end, rows, cols, col_live, stride_n, stride_c, other,
          ACC: tl.constexpr):
    """The features of sorted positions ``first + rows`` (below ``end``), their original
    indices and the mask, as ``ACC``."""
    pos = first + rows
    live = pos < end
    idx = tl.load(order_ptr + pos, mask=live, other=0)
    mask = live[:, None] & col_live[None, :]
    ptrs = feats_ptr + idx[:, None] * stride_n + cols[None, :] * stride_c
    return tl.load(ptrs, mask=mask, other=other).to(ACC), idx, mask


@triton.jit(do_not_specialize=['num'])
def _reduce_kernel(feats_ptr, order_ptr, starts_ptr, out_ptr, arg_ptr, num, channels, stride_n,
                   stride_c, MODE: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    voxel = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_live = cols < channels
    start = tl.load(starts_ptr + voxel)
    end = tl.load(starts_ptr + voxel + 1)
    rows = tl.arange(0, BLOCK_P)
    if MODE == 0:
        acc = tl.full([BLOCK_C], float('-inf'), ACC)
    else:
        acc = tl.zeros([BLOCK_C], ACC)
    for first in range(start, end, BLOCK_P):
        if MODE == 0:
            x, idx, mask = _tile(feats_ptr, order_ptr, first, end, rows, cols, col_live,
                                 stride_n, stride_c, float('-inf'), ACC)
            acc = tl.maximum(acc, tl.max(x, 0))
        else:
            x, idx, mask = _tile(feats_ptr, order_ptr, first, end, rows, cols, col_live,
                                 stride_n, stride_c, 0.0, ACC)
            acc += tl.sum(x, 0)
    if MODE == 2:
        acc = acc / (end - start).to(ACC)
    out_ptrs = out_ptr + voxel.to(tl.int64) * channels + cols
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=col_live)
    if MODE == 0:
        # The lowest point index whose value equals the maximum (num where none does).
        arg = tl.full([BLOCK_C], num, tl.int64)
        for first in range(start, end, BLOCK_P):
            x, idx, mask = _tile(feats_ptr, order_ptr, first, end, rows, cols, col_live,
                                 stride_n, stride_c, float('-inf'), ACC)
            held = (x == acc[None, :]) & mask
            cand = tl.where(held, idx[:, None], num)
            arg = tl.minimum(arg, tl.min(cand, 0))
        tl.store(arg_ptr + voxel.to(tl.int64) * channels + cols, arg, mask=col_live)


def pack_keys(coors: Tensor) -> Tuple[Tensor, int]:
    """Sortable int64 keys of the rows of ``coors`` (``SENTINEL`` for a row with a negative
    entry) and the bound every entry must stay below for its key to be exact."""
    columns = coors.shape[1]
    bits = KEY_BITS // columns
    wide = coors.to(torch.int64)
    keys = wide[:, 0].clone()
    for col in range(1, columns):
        keys = (keys << bits) | wide[:, col]
    keys = torch.where((coors >= 0).all(1), keys, SENTINEL)
    return keys, 1 << bits


def dynamic_scatter(feats: Tensor, coors: Tensor,
                    reduce_type: str) -> Optional[Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
    """The kernel path of :func:`.reference.dynamic_scatter_reference`, or None when a
    coordinate is too large for the packed keys (the caller then runs the reference).

    One host synchronisation (the voxel count). ``feats`` and ``coors`` hold at least one row.
    """
    num, channels = feats.shape
    device = feats.device
    keys, bound = pack_keys(coors)
    sorted_keys, order = torch.sort(keys, stable=True)
    valid = sorted_keys != SENTINEL
    opens = valid.clone()
    opens[1:] &= sorted_keys[1:] != sorted_keys[:-1]
    seg = torch.cumsum(opens, 0) - 1
    voxels, kept, largest = torch.stack(
        [opens.sum(), valid.sum(), coors.max().to(torch.int64)]).tolist()  # the one sync
    if largest >= bound:
        return None
    # ``seg`` never decreases and a voxel's run opens at its first entry, so the runs start
    # where each voxel index first appears (a search, where a scatter of the other entries
    # into one spare slot made them all atomics on one address)
    starts = torch.full((voxels + 1,), kept, dtype=torch.int64, device=device)
    starts[:voxels] = torch.searchsorted(seg, torch.arange(voxels, device=device))
    point2voxel = torch.empty(num, dtype=torch.int64, device=device)
    point2voxel.scatter_(0, order, torch.where(valid, seg, -1))
    voxel_coors = coors[order[starts[:-1]]]
    counts = (starts[1:] - starts[:-1]).to(torch.int32)
    out = torch.empty(voxels, channels, dtype=feats.dtype, device=device)
    argmax = torch.empty(voxels if reduce_type == 'max' else 0, channels, dtype=torch.int64,
                         device=device)
    if voxels and channels:
        block_c = min(next_power_of_2(channels), 64)
        _reduce_kernel[(voxels, cdiv(channels, block_c))](
            feats, order, starts, out, argmax, num, channels, feats.stride(0), feats.stride(1),
            MODE=_MODES[reduce_type],
            ACC=tl.float64 if feats.dtype == torch.float64 else tl.float32, BLOCK_P=BLOCK_P,
            BLOCK_C=block_c)
    return out, voxel_coors, point2voxel, counts, argmax
