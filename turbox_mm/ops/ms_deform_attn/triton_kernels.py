"""Triton kernels of multi-scale deformable attention: forward and backward.

The formula and mmcv's conventions are in :mod:`.reference` (the specification). Here:

- One program per (batch element, head, block of ``BLOCK_Q`` queries). It walks the levels
  and holds a ``[BLOCK_Q, BLOCK_P, BLOCK_D]`` tile: queries by points by channels of the head.
  Each bilinear corner is one masked gather of whole channel rows: ``value`` is
  ``[bs, num_value, heads, D]``, so a (pixel, head) row is ``D`` contiguous elements (128 bytes
  at D = 32 in float32), read coalesced.
- A sample counts where ``-1 < x * W - 0.5 < W`` and ``-1 < y * H - 0.5 < H`` (mmcv's CUDA
  test, false for NaN); its corners off the map read zero.
- Accumulation is float32 (float64 when an input is float64, which lets ``gradcheck`` run on
  the kernels); 16-bit inputs are read as they are and converted in registers, and the inputs
  may have different dtypes (16-bit value with float32 locations and weights, as under
  autocast).
- Backward, one pass with the forward's geometry: the value gradient is scattered with atomic
  adds into a float32 (float64) buffer, cast to ``value``'s dtype afterwards; the weight and
  location gradients of a sample are channel reductions inside the one program that owns the
  sample, stored directly (no atomics, no per-point intermediates in memory).

Offsets into ``value`` are int64. On CUDA the tile sizes are autotuned per (D, heads, levels,
points) and dtypes; under ``TRITON_INTERPRET=1`` (CPU tensors) a fixed configuration runs.
"""
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .._triton_launch import KernelPair, cdiv, next_power_of_2

# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _program(HEADS, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, Q, P,
             D):
    """The program's batch element, head, query rows ``b * Q + q`` and lane masks."""
    pid = tl.program_id(0).to(tl.int64)
    nqb = tl.cdiv(Q, BLOCK_Q)
    qb = pid % nqb
    bh = pid // nqb
    h = bh % HEADS
    b = bh // HEADS
    q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p = tl.arange(0, BLOCK_P)
    d = tl.arange(0, BLOCK_D)
    qmask = q < Q
    qpmask = qmask[:, None] & (p < P)[None, :]
    dmask = d < D
    rows = b * Q + q  # [BLOCK_Q] int64
    return b, h, p, d, qmask, qpmask, dmask, rows


@triton.jit
def _level(lvl, b, h, p, d, rows, qpmask, dmask, loc_ptr, w_ptr, shape_ptr, start_ptr, S, HEADS,
           D, L, P, ACC: tl.constexpr):
    """Geometry of the tile's samples on level ``lvl``.

    Returns, each ``[BLOCK_Q, BLOCK_P]`` unless said otherwise:

    - ``sample``: the flat sample index ``(((b * Q + q) * heads + h) * L + lvl) * P + p``, the
      offset of its weight (twice it, that of its x);
    - ``wgt``: the attention weight, zero where the sample does not count;
    - ``lx``, ``ly``: the fractions of the pixel coordinates, zero where the sample does not
      count (so that no NaN of a location travels into the sums);
    - ``off``: ``[BLOCK_Q, BLOCK_P, BLOCK_D]`` int64 offsets of the top-left corner's channels
      of head ``h`` in ``value`` (the other corners are ``+ col``, ``+ row``, ``+ row + col``);
    - ``m00``, ``m01``, ``m10``, ``m11``: ``[BLOCK_Q, BLOCK_P, BLOCK_D]`` masks of the four
      corners (the sample counts and the corner is on the map);
    - ``row``, ``col``: the scalar offsets between corners; ``height``, ``width``.

    A level whose rows run past ``num_value`` (inconsistent tables, not checked on the host)
    reads nothing.
    """
    height = tl.load(shape_ptr + 2 * lvl)
    width = tl.load(shape_ptr + 2 * lvl + 1)
    start = tl.load(start_ptr + lvl)
    sample = ((rows * HEADS + h) * L + lvl)[:, None] * P + p[None, :]
    x = tl.load(loc_ptr + 2 * sample, mask=qpmask, other=0).to(ACC)
    y = tl.load(loc_ptr + 2 * sample + 1, mask=qpmask, other=0).to(ACC)
    wgt = tl.load(w_ptr + sample, mask=qpmask, other=0).to(ACC)
    xi = x * width.to(ACC) - 0.5
    yi = y * height.to(ACC) - 0.5
    # The level's rows lie within value[b]; tested on [BLOCK_Q, BLOCK_P] tensors, since
    # Triton's interpreter refuses a mask that mixes a tensor with a scalar comparison.
    first = sample * 0 + start
    fits = (first >= 0) & (first + height * width <= S)
    valid = qpmask & fits & (xi > -1) & (yi > -1) & (xi < width.to(ACC)) & (yi < height.to(ACC))
    xi = tl.where(valid, xi, 0.0)
    yi = tl.where(valid, yi, 0.0)
    x0f = tl.floor(xi)
    y0f = tl.floor(yi)
    lx = xi - x0f
    ly = yi - y0f
    wgt = tl.where(valid, wgt, 0.0)
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)
    # valid: -1 <= x0 <= W - 1 and -1 <= y0 <= H - 1.
    top = valid & (y0 >= 0)
    bottom = valid & (y0 < height - 1)
    left = x0 >= 0
    right = x0 < width - 1
    col = HEADS * D
    row = width * col
    pix = b * S + start + y0 * width + x0
    off = ((pix * HEADS + h) * D)[:, :, None] + d[None, None, :]
    dm = dmask[None, None, :]
    m00 = (top & left)[:, :, None] & dm
    m01 = (top & right)[:, :, None] & dm
    m10 = (bottom & left)[:, :, None] & dm
    m11 = (bottom & right)[:, :, None] & dm
    return sample, wgt, lx, ly, off, m00, m01, m10, m11, row, col, height, width


@triton.jit(do_not_specialize=['Q'])
def _msda_fwd_kernel(value_ptr, shape_ptr, start_ptr, loc_ptr, w_ptr, out_ptr,
                     Q, S, HEADS, D, L, P,
                     ACC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """``out[b, q, h * D + c] = sum_{l, p} w * bilinear(value[b, level l, h, c], x, y)``.

    Grid: ``(bs * heads * cdiv(Q, BLOCK_Q), )``, query blocks fastest (neighbouring programs
    sample neighbouring pixels of one head).
    """
    b, h, p, d, qmask, qpmask, dmask, rows = _program(HEADS, BLOCK_Q, BLOCK_P, BLOCK_D, Q, P, D)
    acc = tl.zeros((BLOCK_Q, BLOCK_P, BLOCK_D), dtype=ACC)
    for lvl in range(L):
        sample, wgt, lx, ly, off, m00, m01, m10, m11, row, col, height, width = _level(
            lvl, b, h, p, d, rows, qpmask, dmask, loc_ptr, w_ptr, shape_ptr, start_ptr, S, HEADS,
            D, L, P, ACC)
        v00 = tl.load(value_ptr + off, mask=m00, other=0).to(ACC)
        v01 = tl.load(value_ptr + off + col, mask=m01, other=0).to(ACC)
        v10 = tl.load(value_ptr + off + row, mask=m10, other=0).to(ACC)
        v11 = tl.load(value_ptr + off + row + col, mask=m11, other=0).to(ACC)
        # The attention weight folded into the bilinear weights: [BLOCK_Q, BLOCK_P] products.
        wy0 = wgt * (1 - ly)
        wy1 = wgt * ly
        acc += v00 * (wy0 * (1 - lx))[:, :, None] + v01 * (wy0 * lx)[:, :, None]
        acc += v10 * (wy1 * (1 - lx))[:, :, None] + v11 * (wy1 * lx)[:, :, None]
    res = tl.sum(acc, axis=1)
    out_offs = ((rows * HEADS + h) * D)[:, None] + d[None, :]
    tl.store(out_ptr + out_offs, res.to(out_ptr.dtype.element_ty),
             mask=qmask[:, None] & dmask[None, :])


@triton.jit(do_not_specialize=['Q'])
def _msda_bwd_kernel(value_ptr, shape_ptr, start_ptr, loc_ptr, w_ptr, gout_ptr, gvalue_ptr,
                     gloc_ptr, gw_ptr,
                     Q, S, HEADS, D, L, P,
                     ACC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """Gradients of :func:`_msda_fwd_kernel` for mmcv's three differentiable inputs.

    With ``top[c] = grad_out[b, q, h * D + c] * w`` and ``v00, v01, v10, v11`` the corners
    (row, column) of a sample:

    - ``grad_value[corner, c] += bilinear_weight(corner) * top[c]`` (atomic; float32/64
      buffer ``gvalue_ptr``, zero at launch);
    - ``grad_w = sum_c grad_out[c] * bilinear(value, x, y)[c]``;
    - ``grad_x = W * sum_c top[c] * ((1 - ly) (v01 - v00) + ly (v11 - v10))`` and
      ``grad_y = H * sum_c top[c] * ((1 - lx) (v10 - v00) + lx (v11 - v01))``.

    The last two are stored for every sample of the program's tile (zero where a sample does
    not count), so ``gloc_ptr`` and ``gw_ptr`` need no initialisation. Grid as the forward's.
    """
    b, h, p, d, qmask, qpmask, dmask, rows = _program(HEADS, BLOCK_Q, BLOCK_P, BLOCK_D, Q, P, D)
    out_offs = ((rows * HEADS + h) * D)[:, None] + d[None, :]
    go = tl.load(gout_ptr + out_offs, mask=qmask[:, None] & dmask[None, :], other=0).to(ACC)
    go = go[:, None, :]
    for lvl in range(L):
        sample, wgt, lx, ly, off, m00, m01, m10, m11, row, col, height, width = _level(
            lvl, b, h, p, d, rows, qpmask, dmask, loc_ptr, w_ptr, shape_ptr, start_ptr, S, HEADS,
            D, L, P, ACC)
        v00 = tl.load(value_ptr + off, mask=m00, other=0).to(ACC)
        v01 = tl.load(value_ptr + off + col, mask=m01, other=0).to(ACC)
        v10 = tl.load(value_ptr + off + row, mask=m10, other=0).to(ACC)
        v11 = tl.load(value_ptr + off + row + col, mask=m11, other=0).to(ACC)
        hx = (1 - lx)[:, :, None]
        hy = (1 - ly)[:, :, None]
        lx = lx[:, :, None]
        ly = ly[:, :, None]
        top = go * wgt[:, :, None]
        tl.atomic_add(gvalue_ptr + off, top * (hy * hx), mask=m00, sem='relaxed')
        tl.atomic_add(gvalue_ptr + off + col, top * (hy * lx), mask=m01, sem='relaxed')
        tl.atomic_add(gvalue_ptr + off + row, top * (ly * hx), mask=m10, sem='relaxed')
        tl.atomic_add(gvalue_ptr + off + row + col, top * (ly * lx), mask=m11, sem='relaxed')

        val = hy * (hx * v00 + lx * v01) + ly * (hx * v10 + lx * v11)
        gw = tl.sum(val * go, axis=2)
        dvx = hy * (v01 - v00) + ly * (v11 - v10)
        dvy = hx * (v10 - v00) + lx * (v11 - v01)
        gx = tl.sum(top * dvx, axis=2) * width.to(ACC)
        gy = tl.sum(top * dvy, axis=2) * height.to(ACC)
        tl.store(gw_ptr + sample, gw.to(gw_ptr.dtype.element_ty), mask=qpmask)
        tl.store(gloc_ptr + 2 * sample, gx.to(gloc_ptr.dtype.element_ty), mask=qpmask)
        tl.store(gloc_ptr + 2 * sample + 1, gy.to(gloc_ptr.dtype.element_ty), mask=qpmask)


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------

# Autotuning candidates as (tile elements BLOCK_Q * BLOCK_P * BLOCK_D, warps): 4 to 16 elements
# a thread. ptxas for sm_90 (fp32, 4 points, D = 32): the forward takes ~111 registers at 16
# elements a thread, ~212 at 32; the backward (four corner tiles and the gradient live at
# once) ~110 at 8 and ~206 at 16, no spills. Gathers want many warps in flight, so the
# candidates stay at or below 16 (forward) and 8 to 16 (backward) elements a thread.
_FWD_CANDIDATES = ((1024, 2), (1024, 4), (2048, 4), (2048, 8), (4096, 8))
_BWD_CANDIDATES = ((512, 2), (512, 4), (1024, 2), (1024, 4), (2048, 4), (2048, 8))


def _block_sizes(points: int, dims: int) -> Tuple[int, int]:
    """``(BLOCK_P, BLOCK_D)``: all points and all channels of a head, padded to 2**k."""
    return next_power_of_2(max(points, 1)), next_power_of_2(max(dims, 1))


def _block_q(elements: int, block_p: int, block_d: int) -> int:
    """Queries a program so that its tile holds about ``elements`` (between 1 and 128)."""
    return max(1, min(128, elements // (block_p * block_d)))


def _configs(kind: str, block_p: int, block_d: int) -> List['triton.Config']:
    """Autotuning configurations of kernel ``kind`` for a padded (points, channels) tile."""
    configs, seen = [], set()
    for elements, warps in (_FWD_CANDIDATES if kind == 'fwd' else _BWD_CANDIDATES):
        block_q = _block_q(elements, block_p, block_d)
        warps = max(1, min(warps, block_q * block_p * block_d // 128))  # no idle warps
        if (block_q, warps) not in seen:
            seen.add((block_q, warps))
            configs.append(triton.Config({'BLOCK_Q': block_q}, num_warps=warps))
    return configs


_KERNELS = KernelPair(_msda_fwd_kernel, _msda_bwd_kernel, _configs, key=['HEADS', 'D', 'L', 'P'],
                      reset_to_zero=['gvalue_ptr'])


def configs(kind: str, points: int, dims: int) -> List[dict]:
    """The launch configurations autotuning picks from, for kernel ``kind`` ('fwd' or 'bwd').

    Each is a dict of ``BLOCK_Q`` and ``num_warps``, which the launchers take as ``config=``
    (tests run every one of them).
    """
    return _KERNELS.config_dicts(kind, *_block_sizes(points, dims))


def _launch(kind: str, device: torch.device, bs: int, scalars: dict, args: tuple,
            acc: tl.dtype, config: Optional[dict]) -> None:
    block_p, block_d = _block_sizes(scalars['P'], scalars['D'])
    programs = bs * scalars['HEADS']

    def grid(meta):
        return (programs * cdiv(scalars['Q'], meta['BLOCK_Q']), )

    _KERNELS.launch(kind, (block_p, block_d), device, grid, args,
                    dict(scalars, ACC=acc, BLOCK_P=block_p, BLOCK_D=block_d), config,
                    interpreter_config=dict(BLOCK_Q=_block_q(2048, block_p, block_d),
                                            num_warps=4))  # one tile of about 2048 elements


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _common(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    device = value.device
    val = value.contiguous()
    loc = sampling_locations.contiguous()
    wts = attention_weights.contiguous()
    shape = spatial_shapes.to(device=device, dtype=torch.int32).contiguous()
    start = level_start_index.to(device=device, dtype=torch.int64).contiguous()
    bs, num_value, heads, dims = val.shape
    _, num_query, _, levels, points, _ = loc.shape
    wide = torch.float64 in (val.dtype, loc.dtype, wts.dtype)
    scalars = dict(Q=num_query, S=num_value, HEADS=heads, D=dims, L=levels, P=points)
    return val, shape, start, loc, wts, scalars, tl.float64 if wide else tl.float32


def ms_deform_attn_forward(value: torch.Tensor, spatial_shapes: torch.Tensor,
                           level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                           attention_weights: torch.Tensor,
                           config: Optional[dict] = None) -> torch.Tensor:
    """Forward with the Triton kernel (arguments as in :mod:`.reference`; shapes not checked).

    ``config`` (one of :func:`configs`) replaces autotuning on CUDA and the fixed
    configuration of the interpreter.

    Returns:
        Tensor: ``[bs, num_query, heads * D]`` contiguous, in ``value``'s dtype.
    """
    val, shape, start, loc, wts, scalars, acc = _common(value, spatial_shapes, level_start_index,
                                                        sampling_locations, attention_weights)
    bs, heads, dims = val.shape[0], scalars['HEADS'], scalars['D']
    out = torch.empty(bs, scalars['Q'], heads * dims, dtype=val.dtype, device=val.device)
    if out.numel() == 0:
        return out
    if scalars['L'] * scalars['P'] == 0 or scalars['S'] == 0:
        return out.zero_()
    _launch('fwd', val.device, bs, scalars, (val, shape, start, loc, wts, out), acc, config)
    return out


def ms_deform_attn_backward(grad_output: torch.Tensor, value: torch.Tensor,
                            spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                            sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                            config: Optional[dict] = None
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward with the Triton kernel (``config`` as in :func:`ms_deform_attn_forward`).

    Returns:
        tuple[Tensor, Tensor, Tensor]: gradients of ``value``, ``sampling_locations`` and
        ``attention_weights``, contiguous, each in its input's dtype.
    """
    val, shape, start, loc, wts, scalars, acc = _common(value, spatial_shapes, level_start_index,
                                                        sampling_locations, attention_weights)
    wide = acc == tl.float64
    grad_value = torch.zeros(val.shape, dtype=torch.float64 if wide else torch.float32,
                             device=val.device)
    bs, heads, dims = val.shape[0], scalars['HEADS'], scalars['D']
    if bs * scalars['Q'] * heads * dims * scalars['L'] * scalars['P'] * scalars['S'] == 0:
        return grad_value.to(val.dtype), torch.zeros_like(loc), torch.zeros_like(wts)
    grad_loc = torch.empty_like(loc)
    grad_w = torch.empty_like(wts)
    gout = grad_output.contiguous()
    _launch('bwd', val.device, bs, scalars,
            (val, shape, start, loc, wts, gout, grad_value, grad_loc, grad_w), acc, config)
    return grad_value.to(val.dtype), grad_loc, grad_w
