"""Triton kernels of BEV pooling (spec: :mod:`.reference`).

The ``[B, N, D, H, W, C]`` product is never stored:

- :func:`_forward_kernel`: one program per block of ``HB`` image rows and ``P`` pixels of one
  camera, every channel. With ``depth_logits`` a first walk over the depth bins takes the
  softmax's maximum and sum; then for each bin the points' cells are computed from ``geom``
  (IEEE division, truncation, as the reference), and ``prob * feature`` of the block's rows
  is summed in registers row by row while consecutive rows fall into the same cell (the rows
  of an image column at one depth mostly do: they differ in height, which the BEV's single
  z cell does not tell apart), each run added to its cell's row with one relaxed atomic add
  into a float32 BEV: up to ``HB`` times fewer atomics than one per point (the order of the
  additions, and the last bits of a cell's sum, vary between runs). ``HB`` and ``P`` are
  autotuned on CUDA (``HB = 1``: one atomic per point).
- :func:`_backward_kernel`: one program per block of ``HB`` rows and ``P`` pixels, as the
  forward's; for each bin the output gradient rows of the points' cells are (a run of the
  block's rows in one cell loads its row once)
  gathered; the feature gradient sums ``prob * grad`` over the bins in registers, the depth
  gradient is ``grad . feature`` per point (with ``depth_logits``, then the softmax's
  backward ``p * (g - sum_d p g)``, in a second walk). No atomics: deterministic.

No host synchronisation anywhere.
"""
import functools
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._triton_launch import KernelPair, cdiv, next_power_of_2

#: Pixels a program, rows a forward program and warps without CUDA (Triton's interpreter).
INTERPRETER_CONFIG = dict(fwd=dict(P=16, HB=4, num_warps=4),
                          bwd=dict(P=8, HB=4, num_warps=4))


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
    ix = tl.where(kept, vx, 0.0).to(tl.int32)  # truncation toward zero, as torch's .long()
    iy = tl.where(kept, vy, 0.0).to(tl.int32)
    iz = tl.where(kept, vz, 0.0).to(tl.int32)
    cell = ((b * X + ix).to(tl.int64) * Y + iy) * Z + iz
    return cell, kept


@triton.jit
def _softmax_stats(depth_ptr, d_base, stride_dd, live, D):
    """Maximum and sum of exp over the depth bins of the pixels (online, one walk)."""
    m = tl.full(live.shape, float('-inf'), tl.float32)
    s = tl.zeros(live.shape, tl.float32)
    for d in range(0, D):
        x = tl.load(depth_ptr + d_base + d * stride_dd, mask=live, other=0.0).to(tl.float32)
        new = tl.maximum(m, x)
        s = s * tl.exp(m - new) + tl.exp(x - new)
        m = new
    return m, s


@triton.jit
def _bin(depth_ptr, geom_ptr, d, d_base, sd_d, g_row, live, b, m, s, H, W, X, Y, Z, lx, ly,
         lz, sx, sy, sz, LOGITS: tl.constexpr):
    """Depth bin ``d`` of the pixels: the points' probabilities (the softmax with ``LOGITS``,
    from its maximum ``m`` and sum ``s``), cells and whether they are kept."""
    prob = tl.load(depth_ptr + d_base + d * sd_d, mask=live, other=0.0).to(tl.float32)
    if LOGITS:
        prob = tl.exp(prob - m) / s
    cell, kept = _cells(geom_ptr, (g_row + d * H * W) * 3, live, b, lx, ly, lz, sx, sy, sz,
                        X, Y, Z)
    return prob, cell, kept


@triton.jit
def _forward_kernel(depth_ptr, feat_ptr, geom_ptr, out_ptr,
                    N, D, H, W, C, X, Y, Z, lx, ly, lz, sx, sy, sz,
                    sd_b, sd_n, sd_d, sd_h, sd_w, sf_b, sf_n, sf_c, sf_h, sf_w,
                    LOGITS: tl.constexpr, P: tl.constexpr, HB: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    row_blocks = tl.cdiv(H, HB)
    block = tl.program_id(0)
    h0 = (block % row_blocks) * HB
    bn = block // row_blocks
    n = bn % N
    b = bn // N
    rows = tl.arange(0, HB)
    h = h0 + rows
    w = tl.program_id(1) * P + tl.arange(0, P)
    live = (h < H)[:, None] & (w < W)[None, :]  # [HB, P]
    c = tl.arange(0, BLOCK_C)
    c_live = c < C
    d_base = b.to(tl.int64) * sd_b + n * sd_n + h[:, None] * sd_h + w[None, :] * sd_w
    g_row = ((bn.to(tl.int64) * D) * H + h[:, None]) * W + w[None, :]
    f_col = b.to(tl.int64) * sf_b + n * sf_n + w[:, None] * sf_w + c[None, :] * sf_c
    if LOGITS:
        m, s = _softmax_stats(depth_ptr, d_base, sd_d, live, D)
    else:
        m = 0.0
        s = 0.0
    for d in range(0, D):
        prob, cell, kept = _bin(depth_ptr, geom_ptr, d, d_base, sd_d, g_row, live, b, m, s,
                                H, W, X, Y, Z, lx, ly, lz, sx, sy, sz, LOGITS)
        # rows one after the other: a run of rows in one cell is summed, then added once
        acc = tl.zeros((P, BLOCK_C), tl.float32)
        acc_cell = tl.zeros((P, ), tl.int64)
        acc_live = tl.zeros((P, ), tl.int32) > 0
        for r in tl.static_range(HB):
            pick = (rows == r)[:, None]
            prob_r = tl.sum(tl.where(pick, prob, 0.0), 0)
            cell_r = tl.sum(tl.where(pick, cell, 0), 0)
            kept_r = tl.sum(tl.where(pick, kept.to(tl.int32), 0), 0) > 0
            feat = tl.load(feat_ptr + f_col + (h0 + r) * sf_h,
                           mask=kept_r[:, None] & c_live[None, :], other=0.0).to(tl.float32)
            part = prob_r[:, None] * feat
            same = kept_r & acc_live & (cell_r == acc_cell)
            flush = kept_r & acc_live & (cell_r != acc_cell)
            tl.atomic_add(out_ptr + acc_cell[:, None] * C + c[None, :], acc,
                          mask=flush[:, None] & c_live[None, :], sem='relaxed')
            acc = tl.where(same[:, None], acc + part, tl.where(kept_r[:, None], part, acc))
            acc_cell = tl.where(kept_r, cell_r, acc_cell)
            acc_live = acc_live | kept_r
        tl.atomic_add(out_ptr + acc_cell[:, None] * C + c[None, :], acc,
                      mask=acc_live[:, None] & c_live[None, :], sem='relaxed')


@triton.jit
def _backward_kernel(grad_ptr, depth_ptr, feat_ptr, geom_ptr, gdepth_ptr, gfeat_ptr,
                     N, D, H, W, C, X, Y, Z, lx, ly, lz, sx, sy, sz,
                     sd_b, sd_n, sd_d, sd_h, sd_w, sf_b, sf_n, sf_c, sf_h, sf_w,
                     LOGITS: tl.constexpr, P: tl.constexpr, HB: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    row_blocks = tl.cdiv(H, HB)
    block = tl.program_id(0)
    h0 = (block % row_blocks) * HB
    bn = block // row_blocks
    n = bn % N
    b = bn // N
    rows = tl.arange(0, HB)
    h = h0 + rows
    w = tl.program_id(1) * P + tl.arange(0, P)
    live = (h < H)[:, None] & (w < W)[None, :]  # [HB, P]
    c = tl.arange(0, BLOCK_C)
    c_live = c < C
    d_base = b.to(tl.int64) * sd_b + n * sd_n + h[:, None] * sd_h + w[None, :] * sd_w
    # the depth gradient is written contiguous [B, N, D, H, W], float32, as geom's points
    g_row = ((bn.to(tl.int64) * D) * H + h[:, None]) * W + w[None, :]
    f_col = b.to(tl.int64) * sf_b + n * sf_n + w[:, None] * sf_w + c[None, :] * sf_c
    if LOGITS:
        m, s = _softmax_stats(depth_ptr, d_base, sd_d, live, D)
    else:
        m = 0.0
        s = 0.0
    grad_feat = tl.zeros((HB, P, BLOCK_C), tl.float32)
    dot = tl.zeros((HB, P), tl.float32)  # sum_d p * g (softmax backward)
    for d in range(0, D):
        prob, cell, kept = _bin(depth_ptr, geom_ptr, d, d_base, sd_d, g_row, live, b, m, s,
                                H, W, X, Y, Z, lx, ly, lz, sx, sy, sz, LOGITS)
        # rows one after the other: a cell's gradient row is gathered once for a run of
        # rows in that cell
        g_cur = tl.zeros((P, BLOCK_C), tl.float32)
        g_cell = tl.full((P, ), -1, tl.int64)
        g_prob = tl.zeros((HB, P), tl.float32)
        for r in tl.static_range(HB):
            pick = (rows == r)[:, None]
            prob_r = tl.sum(tl.where(pick, prob, 0.0), 0)
            cell_r = tl.sum(tl.where(pick, cell, 0), 0)
            kept_r = tl.sum(tl.where(pick, kept.to(tl.int32), 0), 0) > 0
            need = kept_r & (cell_r != g_cell)
            g_new = tl.load(grad_ptr + cell_r[:, None] * C + c[None, :],
                            mask=need[:, None] & c_live[None, :], other=0.0).to(tl.float32)
            g_cur = tl.where(need[:, None], g_new, g_cur)
            g_cell = tl.where(need, cell_r, g_cell)
            g_r = tl.where(kept_r[:, None], g_cur, 0.0)
            feat = tl.load(feat_ptr + f_col + (h0 + r) * sf_h,
                           mask=kept_r[:, None] & c_live[None, :], other=0.0).to(tl.float32)
            g_prob = tl.where(pick, tl.sum(g_r * feat, 1)[None, :], g_prob)
            grad_feat = tl.where((rows == r)[:, None, None],
                                 grad_feat + (prob_r[:, None] * g_r)[None, :, :], grad_feat)
        tl.store(gdepth_ptr + g_row + d * H * W, g_prob, mask=live)
        if LOGITS:
            dot += prob * g_prob
    if LOGITS:  # d logit = p * (g - sum_d p g); each program rereads only what it wrote
        for d in range(0, D):
            x = tl.load(depth_ptr + d_base + d * sd_d, mask=live, other=0.0).to(tl.float32)
            prob = tl.exp(x - m) / s
            g_prob = tl.load(gdepth_ptr + g_row + d * H * W, mask=live, other=0.0)
            tl.store(gdepth_ptr + g_row + d * H * W, prob * (g_prob - dot), mask=live)
    # the feature gradient is written contiguous [B, N, C, H, W]
    gf_off = (((bn.to(tl.int64) * C + c[None, None, :]) * H + h[:, None, None]) * W
              + w[None, :, None])
    tl.store(gfeat_ptr + gf_off, grad_feat.to(gfeat_ptr.dtype.element_ty),
             mask=live[:, :, None] & c_live[None, None, :])


@functools.lru_cache(maxsize=64)
def _float32_values(values: Tuple[float, ...]) -> Tuple[float, ...]:
    """``values`` rounded to float32, as the reference (and upstream's float32 tensors) has
    them; cached, as a model passes the same bounds on every call."""
    return tuple(torch.tensor(values, dtype=torch.float32).tolist())


def _configs(kind: str, block_c: int) -> List['triton.Config']:
    """Autotuning candidates: pixels ``P`` (and rows ``HB`` of the forward) and warps, for
    ``block_c`` padded channels (a program's tiles stay within about 8k elements)."""
    configs = []
    if kind == 'fwd':
        for rows in (1, 4, 8, 16):
            for pixels in (16, 32):
                for warps in (4, 8):
                    if pixels * block_c <= 8192:
                        configs.append(triton.Config({'P': pixels, 'HB': rows},
                                                     num_warps=warps))
    else:
        for rows, pixels in ((1, 16), (1, 32), (2, 8), (2, 16), (4, 8)):
            for warps in (4, 8):
                if rows * pixels * block_c <= 4096:
                    configs.append(triton.Config({'P': pixels, 'HB': rows},
                                                 num_warps=warps))
    return configs


_KERNELS = KernelPair(_forward_kernel, _backward_kernel, _configs, key=['C', 'D', 'H', 'W'],
                      reset_to_zero=[], forward_reset_to_zero=['out_ptr'])


def config_dicts(kind: str, channels: int) -> List[dict]:
    """The autotuning candidates of ``kind`` ('fwd' or 'bwd') at ``channels``, as the
    launchers' ``config=`` takes them (tests run every one)."""
    return _KERNELS.config_dicts(kind, next_power_of_2(max(channels, 1)))


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
        block_c = next_power_of_2(c)
        _KERNELS.launch(
            'fwd', (block_c, ), depth.device,
            lambda meta: (b * n * cdiv(h, meta['HB']), cdiv(w, meta['P'])),
            (depth, feats, geom.contiguous(), out),
            dict(_scalars(depth, feats, lower, cell_size, grid), LOGITS=depth_logits,
                 BLOCK_C=block_c), config, INTERPRETER_CONFIG['fwd'])
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
    if depth.numel() and feats.shape[2]:
        block_c = next_power_of_2(feats.shape[2])
        _KERNELS.launch(
            'bwd', (block_c, ), depth.device,
            lambda meta: (b * n * cdiv(h, meta['HB']), cdiv(w, meta['P'])),
            (grad.contiguous(), depth, feats, geom.contiguous(), grad_depth, grad_feats),
            dict(_scalars(depth, feats, lower, cell_size, grid), LOGITS=depth_logits,
                 BLOCK_C=block_c), config, INTERPRETER_CONFIG['bwd'])
    elif depth.numel():
        grad_depth.zero_()
        grad_feats.zero_()
    return grad_depth.to(depth.dtype), grad_feats
