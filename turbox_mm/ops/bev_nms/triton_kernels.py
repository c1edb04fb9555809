"""Triton kernels of BEV box overlaps and NMS (spec: :mod:`.reference`).

NMS in one score sort and four kernels, with one host sync (the number kept):

1. :func:`_params_kernel` gathers the boxes in score order into float32 parameter rows.
2. :func:`_mask_kernel`, one program per 64 x 64 block of pairs (upper blocks only), all pairs
   at once: for each box ``i`` a 64-bit word whose bit ``k`` says that ``i`` suppresses box
   ``64 * block + k`` (later boxes only), mmcv's layout. The polygon kinds first test every
   pair with the boxes' circumscribed circles (a pair whose circles do not meet has IoU 0) and
   leave the pairs that meet to
3. :func:`_refine_kernel`, one program per box, which runs the exact test of
   :mod:`.triton_geometry` on them, 16 at a time: at detection densities a box meets a few
   dozen others, not thousands.
4. :func:`_reduce_kernel`, one program: walks the 64-box blocks in score order, resolves a
   block against itself bit by bit, ORs the rows of its kept boxes into the later blocks'
   removal words (in registers), and writes the kept boxes' original indices in order. mmcv
   copies the whole mask to the host and walks it there for its rotated and iou3d NMS.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from .._triton_launch import cdiv, next_power_of_2
from .reference import IOU3D_EPS, IOU3D_MARGIN, score_order
from .triton_geometry import _pair_values

#: Boxes per mask word (mmcv's ``threadsPerBlock``); pairs per exact group (the kernels
#: spell both out as literals, with 32 candidate lanes).
WORD, GROUP = 64, 16
KIND_IDS = {'rotated': 0, 'iou3d': 1, 'aligned': 2, 'iou3d_normal': 3, 'circle': 4}
#: Columns of the per-box parameter rows (see :func:`box_params`).
PARAMS = 8


def box_params(boxes: Tensor, kind: str, order: Tensor) -> Tensor:
    """``[N, 8]`` float32 rows the kernels read, of ``boxes[order]``: the box fields, then
    what a pair test reuses (one kernel; any float dtype and strides).

    ``'rotated'``: x, y, w, h, cos/2, sin/2, circumradius; ``'iou3d'``: x, y, dx, dy, cos, sin,
    circumradius; ``'aligned'``: x1, y1, x2, y2; ``'iou3d_normal'``: x, y, dx, dy;
    ``'circle'``: x, y. Angles are rounded to float32, their cosine and sine taken in float64
    and rounded to float32 (:mod:`.reference` does the same).
    """
    num = order.numel()
    out = torch.empty(num, PARAMS, dtype=torch.float32, device=boxes.device)
    if num:
        grid = (cdiv(num, 256), )
        _params_kernel[grid](boxes, order, out, num, boxes.stride(0), boxes.stride(1),
                             KIND=KIND_IDS[kind], BLOCK=256)
    return out


@triton.jit(do_not_specialize=['n'])
def _params_kernel(box_ptr, order_ptr, out_ptr, n, stride_n, stride_c, KIND: tl.constexpr,
                   BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    src = tl.load(order_ptr + offs, mask=live, other=0)
    base = box_ptr + src.to(tl.int64) * stride_n
    f0 = tl.load(base, mask=live, other=0).to(tl.float32)
    f1 = tl.load(base + stride_c, mask=live, other=0).to(tl.float32)
    zero = tl.zeros((BLOCK, ), tl.float32)
    c2 = zero
    c3 = zero
    c4 = zero
    c5 = zero
    c6 = zero
    if KIND == 0 or KIND == 2:  # x, y, w, h / x1, y1, x2, y2
        c2 = tl.load(base + 2 * stride_c, mask=live, other=0).to(tl.float32)
        c3 = tl.load(base + 3 * stride_c, mask=live, other=0).to(tl.float32)
    if KIND == 1 or KIND == 3:  # x, y, dx, dy of 7-number boxes
        c2 = tl.load(base + 3 * stride_c, mask=live, other=0).to(tl.float32)
        c3 = tl.load(base + 4 * stride_c, mask=live, other=0).to(tl.float32)
    if KIND <= 1:
        col = 4 if KIND == 0 else 6
        angle = tl.load(base + col * stride_c, mask=live, other=0).to(tl.float32).to(tl.float64)
        scale = 0.5 if KIND == 0 else 1.0
        c4 = tl.cos(angle).to(tl.float32) * scale
        c5 = tl.sin(angle).to(tl.float32) * scale
        c6 = 0.5 * tl.sqrt(c2 * c2 + c3 * c3)
    row = out_ptr + offs.to(tl.int64) * 8
    tl.store(row, f0, mask=live)
    tl.store(row + 1, f1, mask=live)
    tl.store(row + 2, c2, mask=live)
    tl.store(row + 3, c3, mask=live)
    tl.store(row + 4, c4, mask=live)
    tl.store(row + 5, c5, mask=live)
    tl.store(row + 6, c6, mask=live)
    tl.store(row + 7, zero, mask=live)


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _words(bits, cols):
    """``[R, 64]`` bools to ``[R]`` int64 words: bit ``k`` of row ``r`` is ``bits[r, k]``."""
    one = tl.full(bits.shape, 1, tl.int64)
    return tl.reduce(tl.where(bits, one << cols.to(tl.int64), 0), 1, _or)


@triton.jit(do_not_specialize=['n', 'col_blocks'])
def _mask_kernel(prm_ptr, mask_ptr, near_ptr, n, col_blocks, threshold,
                 KIND: tl.constexpr, MARGIN: tl.constexpr, EPS: tl.constexpr):
    """One 64 x 64 block of pairs (upper blocks only), all pairs at once.

    Cheap kinds write the suppression words. Polygon kinds write the words of the pairs that
    need no polygon (their circumscribed circles do not meet: IoU 0, suppressed only below a
    threshold of 0) to ``mask`` and the words of the pairs that do to ``near``, for
    :func:`_refine_kernel`.
    """
    row_block = tl.program_id(1)
    col_block = tl.program_id(0)
    if col_block >= row_block:
        k = tl.arange(0, 64)
        rows = row_block * 64 + k
        cols = col_block * 64 + k
        live = (cols[None, :] > rows[:, None]) & (cols[None, :] < n) & (rows[:, None] < n)
        rmask = rows < n
        cmask = cols < n
        p0 = tl.load(prm_ptr + rows * 8, mask=rmask, other=0.0)[:, None]
        p1 = tl.load(prm_ptr + rows * 8 + 1, mask=rmask, other=0.0)[:, None]
        q0 = tl.load(prm_ptr + cols * 8, mask=cmask, other=0.0)[None, :]
        q1 = tl.load(prm_ptr + cols * 8 + 1, mask=cmask, other=0.0)[None, :]
        if KIND <= 1:
            reach = tl.load(prm_ptr + rows * 8 + 6, mask=rmask, other=0.0)[:, None] + \
                tl.load(prm_ptr + cols * 8 + 6, mask=cmask, other=0.0)[None, :] + 0.05
            dist = (p0 - q0) * (p0 - q0) + (p1 - q1) * (p1 - q1)
            # 5 cm: iou3d's margin. Below a threshold of 0 every pair is tested exactly (IoU
            # 0 > threshold suppresses), so the pairs left out here are never suppressed.
            near = live & ((dist <= reach * reach) | (threshold < 0))
            tl.store(mask_ptr + rows.to(tl.int64) * col_blocks + col_block,
                     tl.zeros((64, ), tl.int64), mask=rmask)
            tl.store(near_ptr + rows.to(tl.int64) * col_blocks + col_block,
                     _words(near, k[None, :]), mask=rmask)
        else:
            p2 = tl.load(prm_ptr + rows * 8 + 2, mask=rmask, other=0.0)[:, None]
            p3 = tl.load(prm_ptr + rows * 8 + 3, mask=rmask, other=0.0)[:, None]
            q2 = tl.load(prm_ptr + cols * 8 + 2, mask=cmask, other=0.0)[None, :]
            q3 = tl.load(prm_ptr + cols * 8 + 3, mask=cmask, other=0.0)[None, :]
            if KIND == 4:  # circle: squared distance <= threshold
                hit = (p0 - q0) * (p0 - q0) + (p1 - q1) * (p1 - q1) <= threshold
            elif KIND == 2:  # mmcv's nms, offset 0
                w = tl.maximum(tl.minimum(p2, q2) - tl.maximum(p0, q0), 0.0)
                h = tl.maximum(tl.minimum(p3, q3) - tl.maximum(p1, q1), 0.0)
                inter = w * h
                hit = inter > threshold * ((p2 - p0) * (p3 - p1) + (q2 - q0) * (q3 - q1) - inter)
            else:  # iou3d_normal
                w = tl.maximum(tl.minimum(p0 + p2 / 2, q0 + q2 / 2) -
                               tl.maximum(p0 - p2 / 2, q0 - q2 / 2), 0.0)
                h = tl.maximum(tl.minimum(p1 + p3 / 2, q1 + q3 / 2) -
                               tl.maximum(p1 - p3 / 2, q1 - q3 / 2), 0.0)
                inter = w * h
                hit = inter / tl.maximum(p2 * p3 + q2 * q3 - inter, EPS) > threshold
            tl.store(mask_ptr + rows.to(tl.int64) * col_blocks + col_block,
                     _words(live & hit, k[None, :]), mask=rmask)


@triton.jit(do_not_specialize=['n', 'col_blocks'])
def _refine_kernel(prm_ptr, mask_ptr, near_ptr, n, col_blocks, threshold,
                   KIND: tl.constexpr, MARGIN: tl.constexpr, EPS: tl.constexpr,
                   BLOCKS: tl.constexpr):
    """Polygon kinds, one box ``i`` per program: the exact test of the pairs that
    :func:`_mask_kernel` marked near, 16 at a time, OR-ed into ``i``'s suppression words."""
    i = tl.program_id(0)
    first = i // 64
    cb = tl.arange(0, BLOCKS)
    lane = tl.arange(0, 32)[None, :]
    k64 = tl.arange(0, 64)
    k16 = tl.arange(0, 16)
    for c0 in range(first, col_blocks, BLOCKS):
        blocks = c0 + cb
        words = tl.load(near_ptr + i.to(tl.int64) * col_blocks + blocks,
                        mask=blocks < col_blocks, other=0)
        busy = tl.sort(tl.where(words != 0, blocks, 2147483647))  # busy blocks first
        for b in range(0, tl.sum((words != 0).to(tl.int32))):
            block = tl.sum(tl.where(cb == b, busy, 0))
            word = tl.load(near_ptr + i.to(tl.int64) * col_blocks + block)
            bits = ((word >> k64.to(tl.int64)) & 1) != 0
            picked = tl.sort(tl.where(bits, k64, 64))  # set bits first
            found = tl.zeros((), tl.int64)
            for g in range(0, tl.cdiv(tl.sum(bits.to(tl.int32)), 16)):
                pos = tl.gather(picked, g * 16 + k16, 0)
                ok = pos < 64
                j = block * 64 + pos
                val = _pair_values(prm_ptr, prm_ptr, i + 0 * j[:, None], j[:, None],
                                   ok[:, None], lane, KIND, MARGIN, EPS)
                if KIND == 1:  # overlap -> IoU, mmcv's iou_bev
                    wi = tl.load(prm_ptr + i * 8 + 2) * tl.load(prm_ptr + i * 8 + 3)
                    wj = tl.load(prm_ptr + j * 8 + 2, mask=ok, other=0.0) * \
                        tl.load(prm_ptr + j * 8 + 3, mask=ok, other=0.0)
                    val = val / tl.maximum(wi + wj - val, EPS)
                hit = ok & (val > threshold)
                one = tl.full(pos.shape, 1, tl.int64)
                found = found | tl.reduce(tl.where(hit, one << pos.to(tl.int64), 0), 0, _or)
            old = tl.load(mask_ptr + i.to(tl.int64) * col_blocks + block)
            tl.store(mask_ptr + i.to(tl.int64) * col_blocks + block, old | found)


@triton.jit
def _walk_block(mask_ptr, rem, b, n, col_blocks):
    """Boxes of block ``b`` kept, given the block's removal word: a bit-by-bit walk."""
    kept = tl.zeros((), tl.int64)
    for k in tl.static_range(64):
        i = b * 64 + k
        diag = tl.load(mask_ptr + i.to(tl.int64) * col_blocks + b, mask=i < n, other=0)
        take = (((rem >> k) & 1) == 0) & (i < n)
        rem = tl.where(take, rem | diag, rem)
        kept = tl.where(take, kept | (tl.full((), 1, tl.int64) << k), kept)
    return kept


@triton.jit
def _emit(kept, b, count, order_ptr, out_ptr, rows):
    """Append the original indices of block ``b``'s kept boxes to ``out`` at ``count``."""
    bits = ((kept >> rows.to(tl.int64)) & 1) != 0
    slot = count + tl.cumsum(bits.to(tl.int32), 0) - 1
    idx = tl.load(order_ptr + b * 64 + rows, mask=bits, other=0)
    tl.store(out_ptr + slot, idx, mask=bits)
    return count + tl.sum(bits.to(tl.int32), 0), bits


@triton.jit(do_not_specialize=['n', 'col_blocks'])
def _reduce_kernel(mask_ptr, order_ptr, out_ptr, count_ptr, n, col_blocks,
                   CB: tl.constexpr):
    """The walk with the removal words in registers (up to ``CB`` blocks): the kept boxes'
    original indices in ``out``, their number in ``count``."""
    rows = tl.arange(0, 64)
    cols = tl.arange(0, CB)
    removed = tl.zeros((CB, ), tl.int64)
    count = tl.zeros((), tl.int32)
    for b in range(0, col_blocks):
        kept = _walk_block(mask_ptr, tl.sum(tl.where(cols == b, removed, 0), 0), b, n,
                           col_blocks)
        count, bits = _emit(kept, b, count, order_ptr, out_ptr, rows)
        later = (cols > b) & (cols < col_blocks)
        tile = tl.load(mask_ptr + (b * 64 + rows).to(tl.int64)[:, None] * col_blocks +
                       cols[None, :], mask=bits[:, None] & later[None, :], other=0)
        removed = removed | tl.reduce(tile, 0, _or)
    tl.store(count_ptr, count)


@triton.jit(do_not_specialize=['n', 'col_blocks'])
def _reduce_large_kernel(mask_ptr, removed_ptr, order_ptr, out_ptr, count_ptr, n, col_blocks,
                         CHUNK: tl.constexpr):
    """:func:`_reduce_kernel` for any number of blocks: removal words in global memory."""
    rows = tl.arange(0, 64)
    chunk = tl.arange(0, CHUNK)
    count = tl.zeros((), tl.int32)
    for b in range(0, col_blocks):
        kept = _walk_block(mask_ptr, tl.load(removed_ptr + b), b, n, col_blocks)
        count, bits = _emit(kept, b, count, order_ptr, out_ptr, rows)
        for c0 in range(b + 1, col_blocks, CHUNK):
            cols = c0 + chunk
            tile = tl.load(mask_ptr + (b * 64 + rows).to(tl.int64)[:, None] * col_blocks +
                           cols[None, :], mask=bits[:, None] & (cols < col_blocks)[None, :],
                           other=0)
            old = tl.load(removed_ptr + cols, mask=cols < col_blocks, other=0)
            tl.store(removed_ptr + cols, old | tl.reduce(tile, 0, _or), mask=cols < col_blocks)
        tl.debug_barrier()  # the next block's word is read by another thread
    tl.store(count_ptr, count)


@triton.jit(do_not_specialize=['m', 'n'])
def _iou_kernel(pa_ptr, pb_ptr, out_ptr, m, n, KIND: tl.constexpr, MARGIN: tl.constexpr,
                EPS: tl.constexpr):
    i = tl.program_id(0)  # rows on axis 0: CUDA caps the other axes at 65,535
    j = tl.program_id(1) * 16 + tl.arange(0, 16)
    live = j < n  # the grid has exactly m rows (and Triton 3.9's interpreter refuses a mask
    # that mixes this vector with a scalar comparison)
    lane = tl.arange(0, 32)[None, :]
    val = _pair_values(pa_ptr, pb_ptr, i + 0 * j[:, None], j[:, None], live[:, None], lane,
                       KIND, MARGIN, EPS)
    tl.store(out_ptr + i.to(tl.int64) * n + j, val, mask=live)


#: Most 64-box blocks whose removal words :func:`_reduce_kernel` keeps in registers.
REGISTER_BLOCKS = 128


def nms_keep(boxes: Tensor, scores: Tensor, threshold: float, kind: str) -> Tensor:
    """Kept indices, highest score first; one host sync (the count)."""
    order = score_order(scores, kind)
    num = order.numel()
    if num == 0:
        return order
    kind_id = KIND_IDS[kind]
    prm = box_params(boxes, kind, order)
    col_blocks = cdiv(num, WORD)
    mask = torch.empty(num, col_blocks, dtype=torch.int64, device=boxes.device)
    polygon = kind_id <= 1
    near = torch.empty_like(mask) if polygon else mask
    grid = (col_blocks, col_blocks)
    _mask_kernel[grid](prm, mask, near, num, col_blocks, float(threshold), KIND=kind_id,
                       MARGIN=IOU3D_MARGIN, EPS=IOU3D_EPS, num_warps=4)
    if polygon:
        _refine_kernel[(num, )](prm, mask, near, num, col_blocks, float(threshold),
                                KIND=kind_id, MARGIN=IOU3D_MARGIN, EPS=IOU3D_EPS,
                                BLOCKS=min(max(next_power_of_2(col_blocks), 2), 256),
                                num_warps=4)
    out = torch.empty(num, dtype=torch.int64, device=boxes.device)
    count = torch.empty(1, dtype=torch.int32, device=boxes.device)
    blocks = max(next_power_of_2(col_blocks), 2)
    if blocks <= REGISTER_BLOCKS:
        _reduce_kernel[(1, )](mask, order, out, count, num, col_blocks, CB=blocks,
                              num_warps=4 if blocks <= 64 else 8)
    else:
        removed = torch.zeros(col_blocks, dtype=torch.int64, device=boxes.device)
        _reduce_large_kernel[(1, )](mask, removed, order, out, count, num, col_blocks,
                                    CHUNK=64, num_warps=4)
    return out[:int(count.item())]


def iou_matrix(boxes_a: Tensor, boxes_b: Tensor, kind: str) -> Tensor:
    """``[M, N]`` float32: IoU (``'rotated'``) or BEV overlap area (``'iou3d'``)."""
    m, n = boxes_a.shape[0], boxes_b.shape[0]
    out = torch.empty(m, n, dtype=torch.float32, device=boxes_a.device)
    if m == 0 or n == 0:
        return out
    pa = box_params(boxes_a, kind, torch.arange(m, device=boxes_a.device))
    pb = box_params(boxes_b, kind, torch.arange(n, device=boxes_b.device))
    grid = (m, cdiv(n, GROUP))
    _iou_kernel[grid](pa, pb, out, m, n, KIND=KIND_IDS[kind], MARGIN=IOU3D_MARGIN,
                      EPS=IOU3D_EPS, num_warps=4)
    return out
