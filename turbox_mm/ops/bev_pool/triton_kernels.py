"""Triton kernels of BEV pooling (spec: :mod:`.reference`).

The ``[B, N, D, H, W, C]`` product is never stored. Both kernels take a block of ``HB`` image
rows and ``P`` pixels of one camera, and walk the depth bins; for each bin they take the
block's rows one after the other: each point's probability (with ``depth_logits``, the
softmax as ``exp(logit - lse)`` from the pixels' log-sum-exp over the bins, which torch
computes first) and its cell from ``geom`` (IEEE division, truncation, as the reference).
The rows of an image column at one depth mostly fall into one cell (they differ in height,
which the BEV's single z cell does not tell apart), and the kernels use that:

- :func:`_forward_kernel` (a block of ``BLOCK_C`` channels, a third grid axis) sums
  ``prob * feature`` over a run of consecutive rows in one cell in registers and adds the run
  to the cell's row with one relaxed atomic add into a float32 BEV: up to ``HB`` times fewer
  atomics than one per point (the order of the additions, and the last bits of a cell's sum,
  vary between runs).
- :func:`_backward_kernel` (every channel: the depth gradient sums over them) gathers a
  cell's output-gradient row once for a run of rows in that cell; the feature gradient sums
  ``prob * grad`` over the bins in registers, the depth gradient is ``grad . feature`` per
  point (with ``depth_logits``, then the softmax's backward ``p * (g - sum_d p g)``, in a
  second walk). No atomics: deterministic.

With ``HB = 1`` a program's features stay in registers over the bins (the kernels before
the row blocks). ``HB``, ``P`` and the forward's ``BLOCK_C`` are autotuned on CUDA; the
candidates always include one that fits any channel count. No host synchronisation anywhere.
"""
import functools
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._triton_launch import KernelPair, cdiv, next_power_of_2


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
def _row(depth_ptr, lse_ptr, geom_ptr, feat_ptr, f_col, feat_once, c_live, d, b, bn, n, hr,
         w, w_live, D, H, W, X, Y, Z, lx, ly, lz, sx, sy, sz, sd_b, sd_n, sd_d, sd_h, sd_w,
         sf_h, LOGITS: tl.constexpr, HB: tl.constexpr):
    """Depth bin ``d`` of image row ``hr`` at pixels ``w``: the points' probabilities (the
    softmax from the row's log-sum-exp with ``LOGITS``), cells, whether they are kept, which
    pixels are live, and the row's features (float32 ``[P, len(c)]``, zero where not kept;
    :func:`_program_block`'s with ``HB == 1``)."""
    live = w_live & (w * 0 + hr < H)  # a vector: Triton 3.9's interpreter
    x = tl.load(depth_ptr + b.to(tl.int64) * sd_b + n * sd_n + d * sd_d + hr * sd_h
                + w * sd_w, mask=live, other=0.0).to(tl.float32)
    if LOGITS:
        lse = tl.load(lse_ptr + (bn.to(tl.int64) * H + hr) * W + w, mask=live, other=0.0)
        x = tl.exp(x - lse)
    cell, kept = _cells(geom_ptr, (((bn.to(tl.int64) * D + d) * H + hr) * W + w) * 3, live,
                        b, lx, ly, lz, sx, sy, sz, X, Y, Z)
    if HB == 1:
        feat = feat_once
    else:
        feat = tl.load(feat_ptr + f_col + hr * sf_h, mask=kept[:, None] & c_live[None, :],
                       other=0.0).to(tl.float32)
    return x, cell, kept, live, feat


@triton.jit
def _program_block(feat_ptr, N, H, W, C, sf_b, sf_n, sf_c, sf_h, sf_w, c, P: tl.constexpr,
                   HB: tl.constexpr):
    """This program's block: its first row ``h0`` (grid axis 0 runs over ``(b, n)`` and row
    blocks), ``(b, n)``, its pixels (axis 1), the feature offsets of channels ``c`` at those
    pixels (a row adds ``h * sf_h``), and with ``HB == 1`` the row's features (float32
    ``[P, len(c)]``, kept in registers over the bins; zeros otherwise, unused)."""
    row_blocks = tl.cdiv(H, HB)
    block = tl.program_id(0)
    h0 = (block % row_blocks) * HB
    bn = block // row_blocks
    n = bn % N
    b = bn // N
    w = tl.program_id(1) * P + tl.arange(0, P)
    w_live = w < W
    c_live = c < C
    f_col = b.to(tl.int64) * sf_b + n * sf_n + w[:, None] * sf_w + c[None, :] * sf_c
    if HB == 1:
        feat_once = tl.load(feat_ptr + f_col + h0 * sf_h,
                            mask=(w_live & (w * 0 + h0 < H))[:, None] & c_live[None, :],
                            other=0.0).to(tl.float32)
    else:
        feat_once = tl.zeros((P, c.shape[0]), tl.float32)
    return h0, bn, n, b, w, w_live, c_live, f_col, feat_once


@triton.jit
def _forward_kernel(depth_ptr, lse_ptr, feat_ptr, geom_ptr, out_ptr,
                    N, D, H, W, C, X, Y, Z, lx, ly, lz, sx, sy, sz,
                    sd_b, sd_n, sd_d, sd_h, sd_w, sf_b, sf_n, sf_c, sf_h, sf_w,
                    LOGITS: tl.constexpr, P: tl.constexpr, HB: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    h0, bn, n, b, w, w_live, c_live, f_col, feat_once = _program_block(
        feat_ptr, N, H, W, C, sf_b, sf_n, sf_c, sf_h, sf_w, c, P, HB)
    for d in range(0, D):
        # rows one after the other: a run of rows in one cell is summed, then added once
        acc = tl.zeros((P, BLOCK_C), tl.float32)
        acc_cell = tl.zeros((P, ), tl.int64)
        acc_live = tl.zeros((P, ), tl.int32) > 0
        for r in tl.static_range(HB):
            hr = h0 + r
            prob, cell, kept, live, feat = _row(
                depth_ptr, lse_ptr, geom_ptr, feat_ptr, f_col, feat_once, c_live, d, b, bn, n,
                hr, w, w_live, D, H, W, X, Y, Z, lx, ly, lz, sx, sy, sz, sd_b, sd_n, sd_d, sd_h,
                sd_w, sf_h, LOGITS, HB)
            part = prob[:, None] * feat
            same = kept & acc_live & (cell == acc_cell)
            flush = kept & acc_live & (cell != acc_cell)
            tl.atomic_add(out_ptr + acc_cell[:, None] * C + c[None, :], acc,
                          mask=flush[:, None] & c_live[None, :], sem='relaxed')
            acc = tl.where(same[:, None], acc + part, tl.where(kept[:, None], part, acc))
            acc_cell = tl.where(kept, cell, acc_cell)
            acc_live = acc_live | kept
        tl.atomic_add(out_ptr + acc_cell[:, None] * C + c[None, :], acc,
                      mask=acc_live[:, None] & c_live[None, :], sem='relaxed')


@triton.jit
def _backward_kernel(grad_ptr, depth_ptr, lse_ptr, feat_ptr, geom_ptr, gdepth_ptr, gfeat_ptr,
                     N, D, H, W, C, X, Y, Z, lx, ly, lz, sx, sy, sz,
                     sd_b, sd_n, sd_d, sd_h, sd_w, sf_b, sf_n, sf_c, sf_h, sf_w,
                     LOGITS: tl.constexpr, P: tl.constexpr, HB: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    c = tl.arange(0, BLOCK_C)
    h0, bn, n, b, w, w_live, c_live, f_col, feat_once = _program_block(
        feat_ptr, N, H, W, C, sf_b, sf_n, sf_c, sf_h, sf_w, c, P, HB)
    rows = tl.arange(0, HB)
    h = h0 + rows
    live2 = (h < H)[:, None] & w_live[None, :]  # [HB, P]
    # the depth gradient is written contiguous [B, N, D, H, W], float32, as geom's points
    g_row2 = ((bn.to(tl.int64) * D) * H + h[:, None]) * W + w[None, :]
    grad_feat = tl.zeros((HB, P, BLOCK_C), tl.float32)
    dot = tl.zeros((HB, P), tl.float32)  # sum_d p * g (softmax backward)
    for d in range(0, D):
        # rows one after the other: a cell's gradient row is gathered once for a run of the
        # block's rows in that cell
        g_cur = tl.zeros((P, BLOCK_C), tl.float32)
        g_cell = tl.full((P, ), -1, tl.int64)
        for r in tl.static_range(HB):
            hr = h0 + r
            prob, cell, kept, live, feat = _row(
                depth_ptr, lse_ptr, geom_ptr, feat_ptr, f_col, feat_once, c_live, d, b, bn, n,
                hr, w, w_live, D, H, W, X, Y, Z, lx, ly, lz, sx, sy, sz, sd_b, sd_n, sd_d, sd_h,
                sd_w, sf_h, LOGITS, HB)
            need = kept & (cell != g_cell)
            g_new = tl.load(grad_ptr + cell[:, None] * C + c[None, :],
                            mask=need[:, None] & c_live[None, :], other=0.0).to(tl.float32)
            g_cur = tl.where(need[:, None], g_new, g_cur)
            g_cell = tl.where(need, cell, g_cell)
            grad = tl.where(kept[:, None], g_cur, 0.0)
            g_prob = tl.sum(grad * feat, 1)
            tl.store(gdepth_ptr + ((bn.to(tl.int64) * D + d) * H + hr) * W + w, g_prob,
                     mask=live)
            if HB == 1:
                grad_feat += (prob[:, None] * grad)[None, :, :]
                if LOGITS:
                    dot += (prob * g_prob)[None, :]
            else:
                this = (rows == r)
                grad_feat = tl.where(this[:, None, None],
                                     grad_feat + (prob[:, None] * grad)[None, :, :], grad_feat)
                if LOGITS:
                    dot = tl.where(this[:, None], dot + (prob * g_prob)[None, :], dot)
    if LOGITS:  # d logit = p * (g - sum_d p g); each program rereads only what it wrote
        lse = tl.load(lse_ptr + (bn.to(tl.int64) * H + h[:, None]) * W + w[None, :],
                      mask=live2, other=0.0)
        d_base = (b.to(tl.int64) * sd_b + n * sd_n + h[:, None] * sd_h + w[None, :] * sd_w)
        for d in range(0, D):
            x = tl.load(depth_ptr + d_base + d * sd_d, mask=live2, other=0.0).to(tl.float32)
            g_prob = tl.load(gdepth_ptr + g_row2 + d * H * W, mask=live2, other=0.0)
            tl.store(gdepth_ptr + g_row2 + d * H * W, tl.exp(x - lse) * (g_prob - dot),
                     mask=live2)
    # the feature gradient is written contiguous [B, N, C, H, W]
    gf_off = (((bn.to(tl.int64) * C + c[None, None, :]) * H + h[:, None, None]) * W
              + w[None, :, None])
    tl.store(gfeat_ptr + gf_off, grad_feat.to(gfeat_ptr.dtype.element_ty),
             mask=live2[:, :, None] & c_live[None, None, :])


@functools.lru_cache(maxsize=64)
def _float32_values(values: Tuple[float, ...]) -> Tuple[float, ...]:
    """``values`` rounded to float32, as the reference (and upstream's float32 tensors) has
    them; cached, as a model passes the same bounds on every call."""
    return tuple(torch.tensor(values, dtype=torch.float32).tolist())


#: Forward candidates ``(P, HB, BLOCK_C, num_warps)``, BLOCK_C capped at the channels: those
#: that compile for sm_90 without register spills at BEVFusion's 80 channels (Triton 3.7,
#: ``cuobjdump -res-usage``; the old one-row kernel used 125 registers).
_FWD_CANDIDATES = ((16, 1, 32, 4), (32, 1, 32, 4), (16, 1, 64, 4), (16, 1, 128, 4),
                   (16, 2, 32, 4), (16, 4, 32, 8), (16, 8, 32, 8), (32, 4, 32, 8),
                   (16, 2, 64, 8), (16, 4, 64, 8), (16, 2, 128, 8))
#: Backward candidates ``(P, HB, num_warps)`` (BLOCK_C: every channel), likewise.
_BWD_CANDIDATES = ((16, 1, 8), (8, 2, 8), (16, 1, 4), (8, 2, 4))


def _configs(kind: str, block_c: int) -> List['triton.Config']:
    """Autotuning candidates for ``block_c`` (the channels, padded to a power of two).

    Forward: rows ``HB``, pixels ``P`` and a channel block ``BLOCK_C`` (a third grid axis);
    backward (the depth gradient sums over every channel, so one block holds them all): rows
    and pixels, for up to 128 channels; wider ones get one row of fewer pixels, so that any
    channel count has a candidate.
    """
    configs, seen = [], set()
    if kind == 'fwd':
        candidates = [(p, rows, min(c, block_c), w) for p, rows, c, w in _FWD_CANDIDATES]
    elif block_c <= 128:
        candidates = [(p, rows, block_c, w) for p, rows, w in _BWD_CANDIDATES]
    else:
        candidates = [(max(1, 2048 // block_c), 1, block_c, 8)]
    for pixels, rows, channels, warps in candidates:
        if (pixels, rows, channels, warps) not in seen:
            seen.add((pixels, rows, channels, warps))
            configs.append(triton.Config({'P': pixels, 'HB': rows, 'BLOCK_C': channels},
                                         num_warps=warps))
    return configs


_KERNELS = KernelPair(_forward_kernel, _backward_kernel, _configs,
                      key=['C', 'D', 'H', 'W', 'LOGITS'],  # softmax fused or not: other work
                      reset_to_zero=[], forward_reset_to_zero=['out_ptr'])


def config_dicts(kind: str, channels: int) -> List[dict]:
    """The autotuning candidates of ``kind`` ('fwd' or 'bwd') at ``channels``, as the
    launchers' ``config=`` takes them (tests run every one)."""
    return _KERNELS.config_dicts(kind, next_power_of_2(max(channels, 1)))


def _interpreter_config(kind: str, channels: int) -> dict:
    """The configuration without CUDA (Triton's interpreter): several rows a program, and
    the forward's channels in blocks of up to 32."""
    block_c = next_power_of_2(max(channels, 1))
    if kind == 'fwd':
        return dict(P=16, HB=4, BLOCK_C=min(block_c, 32), num_warps=4)
    return dict(P=8, HB=4, BLOCK_C=block_c, num_warps=4)


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
    without ``depth_logits``."""
    return torch.logsumexp(depth.float(), dim=2).contiguous() if depth_logits else depth


def bev_pool_forward(depth: Tensor, feats: Tensor, geom: Tensor, lower: Sequence[float],
                     cell_size: Sequence[float], grid: Sequence[int],
                     depth_logits: bool, config: Optional[dict] = None) -> Tensor:
    """The kernel path of :func:`.reference.bev_pool_reference`; ``config`` (one of
    :func:`config_dicts`) replaces autotuning."""
    b, n, _, h, w = depth.shape
    c = feats.shape[2]
    x_cells, y_cells, z_cells = (int(g) for g in grid)
    out = torch.zeros(b * x_cells * y_cells * z_cells, c, dtype=torch.float32,
                      device=depth.device)
    if depth.numel() and c:
        _KERNELS.launch(
            'fwd', (next_power_of_2(c), ), depth.device,
            lambda meta: (b * n * cdiv(h, meta['HB']), cdiv(w, meta['P']),
                          cdiv(c, meta['BLOCK_C'])),
            (depth, _log_sum_exp(depth, depth_logits), feats, geom.contiguous(), out),
            dict(_scalars(depth, feats, lower, cell_size, grid), LOGITS=depth_logits),
            config, _interpreter_config('fwd', c))
    return out.view(b, x_cells, y_cells, z_cells * c).to(feats.dtype)


def bev_pool_backward(grad: Tensor, depth: Tensor, feats: Tensor, geom: Tensor,
                      lower: Sequence[float], cell_size: Sequence[float], grid: Sequence[int],
                      depth_logits: bool, config: Optional[dict] = None
                      ) -> Tuple[Tensor, Tensor]:
    """Gradients of ``depth`` (of the logits with ``depth_logits``) and ``feats``; ``config``
    as :func:`bev_pool_forward`'s."""
    grad_depth = torch.empty(depth.shape, dtype=torch.float32, device=depth.device)
    grad_feats = torch.empty(feats.shape, dtype=feats.dtype, device=feats.device)
    b, n, _, h, w = depth.shape
    c = feats.shape[2]
    if depth.numel() and c:
        _KERNELS.launch(
            'bwd', (next_power_of_2(c), ), depth.device,
            lambda meta: (b * n * cdiv(h, meta['HB']), cdiv(w, meta['P'])),
            (grad.contiguous(), depth, _log_sum_exp(depth, depth_logits), feats,
             geom.contiguous(), grad_depth, grad_feats),
            dict(_scalars(depth, feats, lower, cell_size, grid), LOGITS=depth_logits),
            config, _interpreter_config('bwd', c))
    elif depth.numel():
        grad_depth.zero_()
        grad_feats.zero_()
    return grad_depth.to(depth.dtype), grad_feats
