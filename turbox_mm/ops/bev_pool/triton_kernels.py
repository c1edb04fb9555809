"""Triton kernels of BEV pooling (spec: :mod:`.reference`).

The ``[B, N, D, H, W, C]`` product is never stored, and nothing is sorted. A program owns a
*tile* of one camera's image: ``HB`` rows by ``P`` pixels, ``T = HB * P`` points per depth
bin, kept as one flat vector (point ``i`` is row ``i // P``, pixel ``i % P`` of the tile). It
loads the tile's features once and walks the depth bins; at each bin it computes every
point's probability (with ``depth_logits``, the softmax as ``exp(logit - lse)`` from each
pixel's log-sum-exp over the bins, which torch computes first) and cell (IEEE division and
truncation, as the reference).

The kernels rest on the shape of camera rays in a BEV: at one depth, the points of an image
column differ mostly in height, which a BEV's few z cells hardly tell apart, so a tile's ``T``
points fall into a handful of cells (one, for a level camera with one z cell).

- :func:`_forward_kernel` (a block of ``BLOCK_C`` channels and of ``DB`` depth bins, on the
  third grid axis) visits the tile's distinct cells at each bin: it sums ``prob * feature``
  over the points in the cell in registers and adds that row to the cell with one relaxed
  atomic add into a float32 BEV. So the atomics number the distinct (tile, bin, cell)
  triples, not the points (the order of the additions, and the last bits of a cell's sum,
  vary between runs).
- :func:`_backward_kernel` (a block of ``BLOCK_C`` channels and of ``DB`` bins) gathers
  each point's output-gradient row (the points of a cell read the same row, which the cache
  serves; loading one row per distinct cell instead was slower on an H100). It makes the
  probability's gradient ``grad . feature`` of every point (written when one block holds
  every channel, else each block's share added atomically), sums the feature gradient
  ``prob * grad`` and, with ``depth_logits``, ``sum_d p g`` over its bins in registers and
  adds both to float32 buffers (atomic, once per pixel and channel for each block of bins).
  So the order of the additions, and the last bits, vary between runs unless one block holds
  every bin and channel. :func:`_softmax_backward_kernel` then makes the logits' gradient
  ``p * (g - sum_d p g)``. Channel blocks keep the register tiles small (a 32-row tile of
  every channel held 230-240 registers a thread on an H100, two programs an SM).

The tile, ``BLOCK_C`` and ``DB`` are autotuned on CUDA; the candidates always include one
that fits any channel count. No host synchronisation anywhere.
"""
import functools
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._triton_launch import KernelPair, cdiv, next_power_of_2, on_device


@triton.jit
def _cells(geom_ptr, g_off, live, b, lx, ly, lz, sx, sy, sz, X, Y, Z):
    """Flat cells of the points at ``g_off`` (x, y, z adjacent) and whether they are kept."""
    gx = tl.load(geom_ptr + g_off, mask=live, other=0.0).to(tl.float32)
    gy = tl.load(geom_ptr + g_off + 1, mask=live, other=0.0).to(tl.float32)
    gz = tl.load(geom_ptr + g_off + 2, mask=live, other=0.0).to(tl.float32)
    vx = tl.math.div_rn(gx - lx, sx)
    vy = tl.math.div_rn(gy - ly, sy)
    vz = tl.math.div_rn(gz - lz, sz)
    kept = live & (vx > -1.0) & (vx < X) & (vy > -1.0) & (vy < Y) & (vz > -1.0) & (vz < Z)
    # truncation toward zero, as torch's .long(); a point that is not kept is clamped into
    # the grid (its cell is never used unmasked) rather than selected away: a select on
    # ``kept`` here broke Triton's layout pass (3.6 and 3.7, sm_90) when features are
    # contiguous in w and C is a multiple of 16
    ix = tl.minimum(tl.maximum(vx, 0.0), X - 1.0).to(tl.int32)
    iy = tl.minimum(tl.maximum(vy, 0.0), Y - 1.0).to(tl.int32)
    iz = tl.minimum(tl.maximum(vz, 0.0), Z - 1.0).to(tl.int32)
    cell = ((b * X + ix).to(tl.int64) * Y + iy) * Z + iz
    return cell, kept


@triton.jit
def _tile(N, H, W, P: tl.constexpr, HB: tl.constexpr):
    """This program's tile: ``(b * N + n)``, ``n``, ``b`` and its points' rows ``h``, pixels
    ``w`` and liveness (grid axis 0 runs over ``(b, n)`` and row blocks, axis 1 over pixel
    blocks)."""
    row_blocks = tl.cdiv(H, HB)
    block = tl.program_id(0)
    bn = block // row_blocks
    i = tl.arange(0, HB * P)
    h = (block % row_blocks) * HB + i // P
    w = tl.program_id(1) * P + i % P
    return bn, bn % N, bn // N, h, w, (h < H) & (w < W)


@triton.jit
def _points(depth_ptr, lse, geom_ptr, d, b, bn, n, h, w, live, D, H, W, X, Y, Z,
            lx, ly, lz, sx, sy, sz, sd_b, sd_n, sd_d, sd_h, sd_w, LOGITS: tl.constexpr):
    """Depth bin ``d`` of the tile's points: probabilities (float32), cells, kept."""
    x = tl.load(depth_ptr + b.to(tl.int64) * sd_b + n * sd_n + d * sd_d + h * sd_h + w * sd_w,
                mask=live, other=0.0).to(tl.float32)
    if LOGITS:
        x = tl.exp(x - lse)
    cell, kept = _cells(geom_ptr, (((bn.to(tl.int64) * D + d) * H + h) * W + w) * 3, live, b,
                        lx, ly, lz, sx, sy, sz, X, Y, Z)
    return x, cell, kept


@triton.jit
def _points_before(depth_ptr, lse, geom_ptr, d, end, b, bn, n, h, w, live, D, H, W, X, Y, Z,
                   lx, ly, lz, sx, sy, sz, sd_b, sd_n, sd_d, sd_h, sd_w, LOGITS: tl.constexpr):
    """:func:`_points` of bin ``d``, none live unless ``d < end`` (the look-ahead of
    ``PIPE``)."""
    ahead = live & (h * 0 + d < end)  # a vector: Triton 3.9's interpreter
    return _points(depth_ptr, lse, geom_ptr, d, b, bn, n, h, w, ahead, D, H, W, X, Y, Z,
                   lx, ly, lz, sx, sy, sz, sd_b, sd_n, sd_d, sd_h, sd_w, LOGITS)


@triton.jit
def _tile_inputs(lse_ptr, feat_ptr, bn, n, b, h, w, live, c, c_live, H, W,
                 sf_b, sf_n, sf_c, sf_h, sf_w, LOGITS: tl.constexpr):
    """The tile's features (float32 ``[T, len(c)]``) and log-sum-exps (``[T]``; zeros without
    ``LOGITS``)."""
    feat = tl.load(feat_ptr + b.to(tl.int64) * sf_b + n * sf_n + h[:, None] * sf_h
                   + w[:, None] * sf_w + c[None, :] * sf_c,
                   mask=live[:, None] & c_live[None, :], other=0.0).to(tl.float32)
    if LOGITS:
        lse = tl.load(lse_ptr + (bn.to(tl.int64) * H + h) * W + w, mask=live, other=0.0)
    else:
        lse = tl.zeros(h.shape, tl.float32)
    return feat, lse


@triton.jit
def _forward_kernel(depth_ptr, lse_ptr, feat_ptr, geom_ptr, out_ptr,
                    N, D, H, W, C, X, Y, Z, lx, ly, lz, sx, sy, sz,
                    sd_b, sd_n, sd_d, sd_h, sd_w, sf_b, sf_n, sf_c, sf_h, sf_w,
                    LOGITS: tl.constexpr, P: tl.constexpr, HB: tl.constexpr,
                    BLOCK_C: tl.constexpr, DB: tl.constexpr, PIPE: tl.constexpr):
    c_blocks = tl.cdiv(C, BLOCK_C)
    c = (tl.program_id(2) % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    d0 = (tl.program_id(2) // c_blocks) * DB
    end = tl.minimum(d0 + DB, D)
    c_live = c < C
    bn, n, b, h, w, live = _tile(N, H, W, P, HB)
    feat, lse = _tile_inputs(lse_ptr, feat_ptr, bn, n, b, h, w, live, c, c_live, H, W,
                             sf_b, sf_n, sf_c, sf_h, sf_w, LOGITS)
    no_cell = 1 << 62
    if PIPE:  # the next bin's points load while this bin's are summed
        prob_n, cell_n, kept_n = _points_before(depth_ptr, lse, geom_ptr, d0, end, b, bn, n, h,
                                                w, live, D, H, W, X, Y, Z, lx, ly, lz, sx, sy,
                                                sz, sd_b, sd_n, sd_d, sd_h, sd_w, LOGITS)
    for d in range(d0, end):
        if PIPE:
            prob, cell, kept = prob_n, cell_n, kept_n
            prob_n, cell_n, kept_n = _points_before(depth_ptr, lse, geom_ptr, d + 1, end, b,
                                                    bn, n, h, w, live, D, H, W, X, Y, Z, lx, ly,
                                                    lz, sx, sy, sz, sd_b, sd_n, sd_d, sd_h,
                                                    sd_w, LOGITS)
        else:
            prob, cell, kept = _points(depth_ptr, lse, geom_ptr, d, b, bn, n, h, w, live, D,
                                       H, W, X, Y, Z, lx, ly, lz, sx, sy, sz, sd_b, sd_n,
                                       sd_d, sd_h, sd_w, LOGITS)
        part = prob[:, None] * feat
        # one atomic row per distinct cell: the smallest cell left, then the next
        left = kept
        while tl.max(left.to(tl.int32), 0) > 0:
            target = tl.min(tl.where(left, cell, no_cell), 0)
            mine = left & (cell == target)
            row = tl.sum(tl.where(mine[:, None], part, 0.0), 0)
            tl.atomic_add(out_ptr + target * C + c, row, mask=c_live, sem='relaxed')
            left = left & (cell != target)


@triton.jit
def _backward_kernel(grad_ptr, depth_ptr, lse_ptr, feat_ptr, geom_ptr, gdepth_ptr, gfeat_ptr,
                     dot_ptr, N, D, H, W, C, X, Y, Z, lx, ly, lz, sx, sy, sz,
                     sd_b, sd_n, sd_d, sd_h, sd_w, sf_b, sf_n, sf_c, sf_h, sf_w,
                     LOGITS: tl.constexpr, P: tl.constexpr, HB: tl.constexpr,
                     BLOCK_C: tl.constexpr, DB: tl.constexpr, PIPE: tl.constexpr):
    c_blocks = tl.cdiv(C, BLOCK_C)
    c = (tl.program_id(2) % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_live = c < C
    bn, n, b, h, w, live = _tile(N, H, W, P, HB)
    d0 = (tl.program_id(2) // c_blocks) * DB
    end = tl.minimum(d0 + DB, D)
    feat, lse = _tile_inputs(lse_ptr, feat_ptr, bn, n, b, h, w, live, c, c_live, H, W,
                             sf_b, sf_n, sf_c, sf_h, sf_w, LOGITS)
    # the depth gradient: contiguous [B, N, D, H, W], float32, as geom's points (written by
    # the one block of every channel, else each channel block's share added)
    g_point = ((bn.to(tl.int64) * D) * H + h) * W + w
    grad_feat = tl.zeros(feat.shape, tl.float32)
    dot = tl.zeros(h.shape, tl.float32)  # sum_d p * g (the softmax's backward)
    if PIPE:  # the next bin's points load while this bin's gradient rows are gathered
        prob_n, cell_n, kept_n = _points_before(depth_ptr, lse, geom_ptr, d0, end, b, bn, n, h,
                                                w, live, D, H, W, X, Y, Z, lx, ly, lz, sx, sy,
                                                sz, sd_b, sd_n, sd_d, sd_h, sd_w, LOGITS)
    for d in range(d0, end):
        if PIPE:
            prob, cell, kept = prob_n, cell_n, kept_n
        else:
            prob, cell, kept = _points(depth_ptr, lse, geom_ptr, d, b, bn, n, h, w, live, D,
                                       H, W, X, Y, Z, lx, ly, lz, sx, sy, sz, sd_b, sd_n,
                                       sd_d, sd_h, sd_w, LOGITS)
        # every point's row (the points of a cell read the same one, which the cache serves)
        grad = tl.load(grad_ptr + cell[:, None] * C + c[None, :],
                       mask=kept[:, None] & c_live[None, :], other=0.0).to(tl.float32)
        if PIPE:
            prob_n, cell_n, kept_n = _points_before(depth_ptr, lse, geom_ptr, d + 1, end, b,
                                                    bn, n, h, w, live, D, H, W, X, Y, Z, lx, ly,
                                                    lz, sx, sy, sz, sd_b, sd_n, sd_d, sd_h,
                                                    sd_w, LOGITS)
        g_prob = tl.sum(grad * feat, 1)  # this block of channels' share
        if c_blocks == 1:
            tl.store(gdepth_ptr + g_point + d * H * W, g_prob, mask=live)
        else:
            tl.atomic_add(gdepth_ptr + g_point + d * H * W, g_prob, mask=live, sem='relaxed')
        grad_feat += prob[:, None] * grad
        if LOGITS:
            dot += prob * g_prob
    # this block of bins' share: the feature gradient, float32 [B, N, C, H, W], and the dot
    tl.atomic_add(gfeat_ptr + ((bn.to(tl.int64) * C + c[None, :]) * H + h[:, None]) * W
                  + w[:, None], grad_feat, mask=live[:, None] & c_live[None, :], sem='relaxed')
    if LOGITS:
        tl.atomic_add(dot_ptr + (bn.to(tl.int64) * H + h) * W + w, dot, mask=live,
                      sem='relaxed')


@triton.jit
def _softmax_backward_kernel(depth_ptr, lse_ptr, dot_ptr, gdepth_ptr, N, D, H, W,
                             sd_b, sd_n, sd_d, sd_h, sd_w, BLOCK: tl.constexpr):
    """The logits' gradient in place of the probabilities' (contiguous ``[B, N, D, H, W]``):
    ``p * (g - sum_d p g)``, ``p = exp(logit - lse)``. Grid: ``(B * N * D, pixel blocks)``,
    so that the index arithmetic per element is 32-bit."""
    bnd = tl.program_id(0)
    bn = bnd // D
    hw = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = hw < H * W
    pixel = bn.to(tl.int64) * H * W + hw
    point = bnd.to(tl.int64) * H * W + hw
    x = tl.load(depth_ptr + (bn // N).to(tl.int64) * sd_b + (bn % N) * sd_n + (bnd % D) * sd_d
                + (hw // W) * sd_h + (hw % W) * sd_w, mask=live, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + pixel, mask=live, other=0.0)
    dot = tl.load(dot_ptr + pixel, mask=live, other=0.0)
    g = tl.load(gdepth_ptr + point, mask=live, other=0.0)
    tl.store(gdepth_ptr + point, tl.exp(x - lse) * (g - dot), mask=live)


@functools.lru_cache(maxsize=64)
def _float32_values(values: Tuple[float, ...]) -> Tuple[float, ...]:
    """``values`` rounded to float32, as the reference (and upstream's float32 tensors) has
    them; cached, as a model passes the same bounds on every call."""
    return tuple(torch.tensor(values, dtype=torch.float32).tolist())


#: Forward candidates ``(P, HB, BLOCK_C, DB, num_warps, PIPE)``: tiles of a 32- or 16-row
#: image column (BEVFusion's and MapTR v2's feature maps have 32 and 16 rows) or of 16 rows
#: by 2 pixels, channel blocks (capped at the channels), all bins in one program or blocks of
#: them (more programs in flight), and with ``PIPE`` the next bin's loads issued before this
#: bin's sums. The ones an H100 ran slowest at BEVFusion's size (2026-12-06: wider channel
#: blocks, 8 x 4 tiles, more warps; docs/benchmarks.md) are gone.
_FWD_CANDIDATES = ((1, 32, 32, 1024, 1, False), (1, 32, 32, 32, 1, False),
                   (1, 32, 16, 32, 1, False), (1, 16, 32, 32, 1, False),
                   (2, 16, 32, 32, 2, False), (1, 32, 32, 1024, 1, True),
                   (1, 32, 32, 32, 1, True), (1, 16, 32, 32, 1, True), (1, 16, 16, 32, 1, True))
#: Backward candidates ``(P, HB, BLOCK_C, DB, num_warps, PIPE)`` (``BLOCK_C`` 0: every
#: channel in one program, capped otherwise), kept where the ``[HB * P, BLOCK_C]`` register
#: tiles stay within :data:`TILE_LIMIT` values; blocks of bins put more programs in flight,
#: and ``PIPE`` loads the next bin's points while this bin's gradient rows are gathered (a
#: program waits on its loads bin after bin). Blocks of channels add each block's share of
#: the depth gradient atomically, for small register tiles: on an H100 at BEVFusion's size
#: (2026-12-07, docs/benchmarks.md) a 32-row column of 32 channels over all bins with one
#: warp took 1.22 ms, the best program of every channel 2.74 ms (230-240 registers a
#: thread). The slowest of that probe are gone (autotuning time is first-step time), and so
#: is a variant that loaded one gradient row per distinct cell of a tile and bin (1.80 ms
#: there: the cache serves the per-point gathers well).
_BWD_CANDIDATES = ((1, 32, 32, 1024, 1, True), (1, 32, 16, 1024, 1, True),
                   (1, 32, 32, 1024, 2, True), (1, 32, 64, 1024, 2, True),
                   (1, 32, 32, 32, 1, True), (1, 32, 0, 1024, 4, True),
                   (1, 16, 0, 32, 4, False), (1, 16, 0, 16, 2, True))
#: The largest register tile ``HB * P * BLOCK_C`` of a candidate.
TILE_LIMIT = 4096
#: Pixels a program of :func:`_softmax_backward_kernel`.
SOFTMAX_BLOCK = 1024


def _configs(kind: str, block_c: int, block_h: int) -> List['triton.Config']:
    """Autotuning candidates for ``block_c`` channels and ``block_h`` rows (both padded to
    a power of two): the candidates' rows are capped at ``block_h``.

    Both: tiles, a channel block ``BLOCK_C`` (capped at ``block_c``; a backward candidate's
    0 is every channel), ``DB`` depth bins a program and ``PIPE``; the backward's are kept
    where the register tile fits :data:`TILE_LIMIT` (its channel blocks always do).
    """
    if kind == 'fwd':
        candidates = [(p, min(rows, block_h), min(c, block_c), db, w, pipe)
                      for p, rows, c, db, w, pipe in _FWD_CANDIDATES]
    else:
        candidates = [(p, min(rows, block_h), min(c or block_c, block_c), db, w, pipe)
                      for p, rows, c, db, w, pipe in _BWD_CANDIDATES]
        candidates = [c for c in candidates if c[0] * c[1] * c[2] <= TILE_LIMIT]
    configs, seen = [], set()
    for candidate in candidates:
        if candidate not in seen:
            seen.add(candidate)
            pixels, rows, channels, bins, warps, pipe = candidate
            configs.append(triton.Config({'P': pixels, 'HB': rows, 'BLOCK_C': channels,
                                          'DB': bins, 'PIPE': pipe}, num_warps=warps))
    return configs


_KERNELS = KernelPair(_forward_kernel, _backward_kernel, _configs,
                      key=['C', 'D', 'H', 'W', 'LOGITS'],  # softmax fused or not: other work
                      reset_to_zero=['gdepth_ptr', 'gfeat_ptr', 'dot_ptr'],
                      forward_reset_to_zero=['out_ptr'])


def _layout(channels: int, rows: int) -> Tuple[int, int]:
    """The padded ``(channels, rows)`` the candidates are made for."""
    return next_power_of_2(max(channels, 1)), next_power_of_2(max(rows, 1))


def config_dicts(kind: str, channels: int, rows: int = 32) -> List[dict]:
    """The autotuning candidates of ``kind`` ('fwd' or 'bwd') at ``channels`` and ``rows``
    image rows, as the launchers' ``config=`` takes them (tests run every one)."""
    return _KERNELS.config_dicts(kind, *_layout(channels, rows))


def _interpreter_config(kind: str, channels: int) -> dict:
    """The configuration without CUDA (Triton's interpreter): tiles of 2 rows by 4 pixels,
    bins in pairs with the next one's loads ahead, channels in blocks of up to 32 (forward)
    or 8 (backward: so the tests' few channels make several blocks, whose depth gradients
    add, as on CUDA)."""
    block_c = next_power_of_2(max(channels, 1))
    if kind == 'fwd':
        return dict(P=4, HB=2, BLOCK_C=min(block_c, 32), DB=2, PIPE=True, num_warps=4)
    return dict(P=4, HB=2, BLOCK_C=min(block_c, 8), DB=2, PIPE=True, num_warps=4)


def _scalars(depth: Tensor, feats: Tensor, lower, cell_size, grid) -> dict:
    """The kernels' shape, grid and stride arguments by name (cached: a model passes the same
    layout on every call, and the launch is on the host's critical path)."""
    return _scalars_of(tuple(depth.shape), depth.stride(), feats.shape[2], feats.stride(),
                       tuple(lower), tuple(cell_size), tuple(grid))


@functools.lru_cache(maxsize=64)
def _scalars_of(shape, sd, channels, sf, lower, cell_size, grid) -> dict:
    _, n, d, h, w = shape
    low = _float32_values(lower)
    size = _float32_values(cell_size)
    x_cells, y_cells, z_cells = (int(g) for g in grid)
    return dict(N=n, D=d, H=h, W=w, C=channels, X=x_cells, Y=y_cells, Z=z_cells,
                lx=low[0], ly=low[1], lz=low[2], sx=size[0], sy=size[1], sz=size[2],
                sd_b=sd[0], sd_n=sd[1], sd_d=sd[2], sd_h=sd[3], sd_w=sd[4],
                sf_b=sf[0], sf_n=sf[1], sf_c=sf[2], sf_h=sf[3], sf_w=sf[4])


def _log_sum_exp(depth: Tensor, depth_logits: bool) -> Tensor:
    """The softmax's ``log(sum_d exp)`` of every pixel, ``[B, N, H, W]`` float32 (the
    kernels' probabilities are ``exp(logit - lse)``); ``depth`` itself stands in (unread)
    without ``depth_logits``.

    A pixel with a ``+inf`` logit gets NaN, so that every bin's probability is NaN, as torch's
    softmax makes them (``exp(logit - inf)`` would be NaN for that bin and 0 for the others).
    """
    if not depth_logits:
        return depth
    lse = torch.logsumexp(depth.float(), dim=2)
    return torch.where(lse == float('inf'), float('nan'), lse).contiguous()


def bev_pool_forward(depth: Tensor, feats: Tensor, geom: Tensor, lower: Sequence[float],
                     cell_size: Sequence[float], grid: Sequence[int],
                     depth_logits: bool, config: Optional[dict] = None) -> Tensor:
    """The kernel path of :func:`.reference.bev_pool_reference`; ``config`` (one of
    :func:`config_dicts`) replaces autotuning."""
    b, n, d, h, w = depth.shape
    c = feats.shape[2]
    x_cells, y_cells, z_cells = (int(g) for g in grid)
    out = torch.zeros(b * x_cells * y_cells * z_cells, c, dtype=torch.float32,
                      device=depth.device)
    if depth.numel() and c:
        _KERNELS.launch(
            'fwd', _layout(c, h), depth.device,
            lambda meta: (b * n * cdiv(h, meta['HB']), cdiv(w, meta['P']),
                          cdiv(c, meta['BLOCK_C']) * cdiv(d, meta['DB'])),
            (depth, _log_sum_exp(depth, depth_logits), feats, geom.contiguous(), out),
            dict(_scalars(depth, feats, lower, cell_size, grid), LOGITS=depth_logits),
            config, _interpreter_config('fwd', c))
    return out.view(b, x_cells, y_cells, z_cells * c).to(feats.dtype)


def bev_pool_backward(grad: Tensor, depth: Tensor, feats: Tensor, geom: Tensor,
                      lower: Sequence[float], cell_size: Sequence[float], grid: Sequence[int],
                      depth_logits: bool, config: Optional[dict] = None
                      ) -> Tuple[Tensor, Tensor]:
    """Gradients of ``depth`` (of the logits with ``depth_logits``) and ``feats``; ``config``
    as :func:`bev_pool_forward`'s.

    The backward kernel adds each block of channels' share of the probabilities' gradient
    (or writes it, if one block holds every channel), each block of bins' share of the
    feature gradient and each block of channels and bins' share of ``sum_d p g`` into float32
    buffers (zeroed first: about 4 bytes a point even where the picked configuration writes
    the depth gradient); with ``depth_logits``
    :func:`_softmax_backward_kernel` then turns the first into the logits' gradient.
    """
    b, n, d, h, w = depth.shape
    c = feats.shape[2]
    run = bool(depth.numel() and c)
    # the depth and feature gradients accumulate (a block of channels or bins adds its share)
    grad_depth = torch.zeros(depth.shape, dtype=torch.float32, device=depth.device)
    grad_feats = torch.zeros(feats.shape, dtype=torch.float32, device=feats.device)
    if run:
        lse = _log_sum_exp(depth, depth_logits)
        dot = (torch.zeros((b, n, h, w), dtype=torch.float32, device=depth.device)
               if depth_logits else grad_depth)  # unread without the softmax
        scalars = _scalars(depth, feats, lower, cell_size, grid)
        _KERNELS.launch(
            'bwd', _layout(c, h), depth.device,
            lambda meta: (b * n * cdiv(h, meta['HB']), cdiv(w, meta['P']),
                          cdiv(c, meta['BLOCK_C']) * cdiv(d, meta['DB'])),
            (grad.contiguous(), depth, lse, feats, geom.contiguous(), grad_depth, grad_feats,
             dot), dict(scalars, LOGITS=depth_logits), config, _interpreter_config('bwd', c))
        if depth_logits:
            grid = (b * n * d, cdiv(h * w, SOFTMAX_BLOCK))
            on_device(depth.device, lambda: _softmax_backward_kernel[grid](
                depth, lse, dot, grad_depth, n, d, h, w, *depth.stride(), BLOCK=SOFTMAX_BLOCK))
    return grad_depth.to(depth.dtype), grad_feats.to(feats.dtype)
