"""Triton kernels of geometric kernel attention: forward and backward.

The formula and upstream's conventions are in :mod:`.reference` (the specification). Here:

- One program per (batch element, block of ``BLOCK_Q`` queries, head), heads fastest: the
  programs running side by side read the same queries' locations and weights (one
  ``[heads, levels, points]`` block a query) and write neighbouring slices of the same output
  rows.
- A query's samples of a head are the ``levels * points`` consecutive entries of
  ``sampling_loc`` and ``attn_weight``; the program walks them in chunks of ``BLOCK_K`` and
  holds a ``[BLOCK_Q, BLOCK_K, BLOCK_D]`` tile: queries by samples by channels. The level of
  sample ``k`` is ``k // points``, its ``(H, W)`` and first row read from the level tables. A
  sample is one gather of a whole channel row: ``value`` is ``[bs, num_value, heads, D]``, so
  a (pixel, head) row is ``D`` contiguous elements (256 bytes at D = 64 in float32).
- Locations are clamped to the level's border in int64 (int32 locations are widened); a
  level whose rows do not lie within ``value[b]`` (no pixels, or tables past ``num_value``,
  not checked on the host, which would sync) reads zero.
- Accumulation is float32 (float64 when an input is float64, which lets ``gradcheck`` run on
  the kernels); 16-bit inputs are read as they are and converted in registers, and ``value``
  and ``attn_weight`` may have different dtypes (a 16-bit value with float32 weights, as
  under autocast). The output has ``value``'s dtype.
- Backward, one pass with the forward's geometry: the value gradient ``w * grad_out`` is
  scattered with atomic adds into a float32 (float64) buffer, cast to ``value``'s dtype
  afterwards (queries with a zero output gradient skip theirs, see :func:`_gka_bwd_kernel`);
  the weight gradient ``sum_c grad_out[c] * value[pixel, c]`` is a channel
  reduction inside the one program that owns the sample, stored directly (no atomics, no
  per-point intermediates in memory). Locations get no gradient (integers).

Offsets into ``value`` are int64. On CUDA the tile sizes are autotuned per (heads, D,
levels * points) and dtypes; under ``TRITON_INTERPRET=1`` (CPU tensors) a fixed configuration
runs.
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
def _program(Q, HEADS, D, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """The program's batch element, head, query rows ``b * Q + q``, channels and masks."""
    pid = tl.program_id(0).to(tl.int64)
    h = pid % HEADS
    bq = pid // HEADS
    nqb = tl.cdiv(Q, BLOCK_Q)
    qb = bq % nqb
    b = bq // nqb
    q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    qmask = q < Q
    dmask = d < D
    rows = b * Q + q  # [BLOCK_Q] int64
    return b, h, d, qmask, dmask, rows


@triton.jit
def _samples(k0, b, h, d, rows, qmask, dmask, loc_ptr, w_ptr, shape_ptr, start_ptr, S, HEADS, D,
             P, LP, ACC: tl.constexpr, BLOCK_K: tl.constexpr):
    """Geometry of the tile's samples ``k0 .. k0 + BLOCK_K - 1`` (level-major, as stored).

    Returns:

    - ``sample``: ``[BLOCK_Q, BLOCK_K]`` flat index ``((b * Q + q) * heads + h) * LP + k`` of
      each sample, the offset of its weight (twice it, that of its x);
    - ``smask``: ``[BLOCK_Q, BLOCK_K]``, the sample exists (query and sample in range);
    - ``wgt``: ``[BLOCK_Q, BLOCK_K]`` attention weights (zero outside ``smask``);
    - ``off``: ``[BLOCK_Q, BLOCK_K, BLOCK_D]`` int64 offsets of the channels of head ``h`` at
      the sample's clamped pixel in ``value``;
    - ``vmask``: ``[BLOCK_Q, BLOCK_K, BLOCK_D]``, the sample exists, its level lies within
      ``value[b]`` and the channel is in range.
    """
    k = k0 + tl.arange(0, BLOCK_K)
    sample = ((rows * HEADS + h) * LP)[:, None] + k[None, :]
    # Masks from same-shape tensors: Triton's interpreter refuses a mask that mixes a tensor
    # with a scalar comparison.
    kk = tl.zeros_like(sample) + k[None, :]  # k, as [BLOCK_Q, BLOCK_K]
    smask = qmask[:, None] & (kk < LP)
    lvl = tl.where(smask, kk // P, 0)
    height = tl.load(shape_ptr + 2 * lvl, mask=smask, other=0)
    width = tl.load(shape_ptr + 2 * lvl + 1, mask=smask, other=0)
    start = tl.load(start_ptr + lvl, mask=smask, other=0)
    x = tl.load(loc_ptr + 2 * sample, mask=smask, other=0).to(tl.int64)
    y = tl.load(loc_ptr + 2 * sample + 1, mask=smask, other=0).to(tl.int64)
    wgt = tl.load(w_ptr + sample, mask=smask, other=0).to(ACC)
    fits = smask & (height > 0) & (width > 0) & (start >= 0) & (start + height * width <= S)
    x = tl.minimum(tl.maximum(x, 0), width - 1)
    y = tl.minimum(tl.maximum(y, 0), height - 1)
    pix = tl.where(fits, b * S + start + y * width + x, 0)
    off = ((pix * HEADS + h) * D)[:, :, None] + d[None, None, :]
    vmask = fits[:, :, None] & dmask[None, None, :]
    return sample, smask, wgt, off, vmask


@triton.jit(do_not_specialize=['Q'])
def _gka_fwd_kernel(value_ptr, shape_ptr, start_ptr, loc_ptr, w_ptr, out_ptr,
                    Q, S, HEADS, D, P, LP,
                    ACC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """``out[b, q, h * D + c] = sum_{l, p} w[b, q, h, l, p] * value[b, pixel(l, x, y), h, c]``.

    ``pixel`` clamps ``(x, y)`` to level ``l``'s border. Grid: ``(bs * cdiv(Q, BLOCK_Q) *
    heads, )``, heads fastest.
    """
    b, h, d, qmask, dmask, rows = _program(Q, HEADS, D, BLOCK_Q, BLOCK_D)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=ACC)
    for k0 in range(0, LP, BLOCK_K):
        sample, smask, wgt, off, vmask = _samples(k0, b, h, d, rows, qmask, dmask, loc_ptr,
                                                  w_ptr, shape_ptr, start_ptr, S, HEADS, D, P,
                                                  LP, ACC, BLOCK_K)
        val = tl.load(value_ptr + off, mask=vmask, other=0).to(ACC)
        acc += tl.sum(val * wgt[:, :, None], axis=1)
    out_offs = ((rows * HEADS + h) * D)[:, None] + d[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty),
             mask=qmask[:, None] & dmask[None, :])


@triton.jit(do_not_specialize=['Q'])
def _gka_bwd_kernel(value_ptr, shape_ptr, start_ptr, loc_ptr, w_ptr, gout_ptr, gvalue_ptr,
                    gw_ptr,
                    Q, S, HEADS, D, P, LP,
                    ACC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """Gradients of :func:`_gka_fwd_kernel` for ``value`` and ``attn_weight``.

    With ``g[c] = grad_out[b, q, h * D + c]``:

    - ``grad_value[b, pixel, h, c] += w * g[c]`` (atomic; float32/64 buffer ``gvalue_ptr``,
      zero at launch);
    - ``grad_w = sum_c g[c] * value[b, pixel, h, c]``, stored for every sample of the
      program's tile (zero where its level lies outside ``value``), so ``gw_ptr`` needs no
      initialisation.

    A query whose output gradient is zero in every channel of the head scatters nothing (no
    atomics; the sum is the same). MapTR's spatial cross-attention drops the outputs of the
    rows that pad each camera's queries to ``max_len`` (half of the rows with the benchmark's
    camera rig), so their gradient is zero; all of them read the few pixels around (0, 0), and their
    atomics would queue on those addresses. (Unlike upstream, a NaN or infinite weight of such
    a query then adds nothing instead of NaN.) Grid as the forward's.
    """
    b, h, d, qmask, dmask, rows = _program(Q, HEADS, D, BLOCK_Q, BLOCK_D)
    out_offs = ((rows * HEADS + h) * D)[:, None] + d[None, :]
    go = tl.load(gout_ptr + out_offs, mask=qmask[:, None] & dmask[None, :], other=0).to(ACC)
    live = tl.sum((go != 0).to(tl.int32), axis=1) > 0  # [BLOCK_Q]; NaN counts as non-zero
    go = go[:, None, :]
    for k0 in range(0, LP, BLOCK_K):
        sample, smask, wgt, off, vmask = _samples(k0, b, h, d, rows, qmask, dmask, loc_ptr,
                                                  w_ptr, shape_ptr, start_ptr, S, HEADS, D, P,
                                                  LP, ACC, BLOCK_K)
        val = tl.load(value_ptr + off, mask=vmask, other=0).to(ACC)
        tl.atomic_add(gvalue_ptr + off, go * wgt[:, :, None], mask=vmask & live[:, None, None],
                      sem='relaxed')
        gw = tl.sum(val * go, axis=2)
        tl.store(gw_ptr + sample, gw.to(gw_ptr.dtype.element_ty), mask=smask)


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------

# Autotuning candidates as (tile elements BLOCK_Q * BLOCK_K * BLOCK_D, samples a chunk, warps),
# 8 to 16 tile elements a thread; the chunk is 'all' (every sample of a query at once, up to
# 16) or 4 (fewer live registers, more loop trips). ptxas for sm_90 at MapTR's size (float32,
# 15 points, D = 64, D, S and the pointers specialised as divisible by 16, as the JIT does):
# the forward takes 63 to 121 registers, the backward 40 to 72, no spills; the channel loads
# and the value-gradient atomics are 4 wide (ld.global.v4, atom.add.v4.f32). Not yet timed on
# a GPU: autotuning picks among them per (heads, D, levels * points).
_FWD_CANDIDATES = ((1024, 'all', 2), (2048, 'all', 4), (4096, 'all', 8), (1024, 4, 4),
                   (2048, 4, 4), (4096, 4, 8))
_BWD_CANDIDATES = ((1024, 'all', 4), (2048, 'all', 4), (2048, 'all', 8), (1024, 4, 4),
                   (2048, 4, 8))
_MAX_BLOCK_K = 16


def _block_d(dims: int) -> int:
    """``BLOCK_D``: every channel of a head, padded to 2**k."""
    return next_power_of_2(max(dims, 1))


def _block_k(samples: int, chunk) -> int:
    """``BLOCK_K`` for ``levels * points = samples`` and a candidate's chunk ('all' or n)."""
    full = min(next_power_of_2(max(samples, 1)), _MAX_BLOCK_K)
    return full if chunk == 'all' else min(chunk, full)


def _block_q(elements: int, block_k: int, block_d: int) -> int:
    """Queries a program so that its tile holds about ``elements`` (between 1 and 128)."""
    return max(1, min(128, elements // (block_k * block_d)))


def _configs(kind: str, samples: int, block_d: int) -> List['triton.Config']:
    """Autotuning configurations of kernel ``kind`` for ``samples`` samples a query and head."""
    configs, seen = [], set()
    for elements, chunk, warps in (_FWD_CANDIDATES if kind == 'fwd' else _BWD_CANDIDATES):
        block_k = _block_k(samples, chunk)
        block_q = _block_q(elements, block_k, block_d)
        warps = max(1, min(warps, block_q * block_k * block_d // 128))  # no idle warps
        if (block_q, block_k, warps) not in seen:
            seen.add((block_q, block_k, warps))
            configs.append(triton.Config({'BLOCK_Q': block_q, 'BLOCK_K': block_k},
                                         num_warps=warps))
    return configs


_KERNELS = KernelPair(_gka_fwd_kernel, _gka_bwd_kernel, _configs, key=['HEADS', 'D', 'LP'],
                      reset_to_zero=['gvalue_ptr'])


def configs(kind: str, levels: int, points: int, dims: int) -> List[dict]:
    """The launch configurations autotuning picks from, for kernel ``kind`` ('fwd' or 'bwd').

    Each is a dict of ``BLOCK_Q``, ``BLOCK_K`` and ``num_warps``, which the launchers take as
    ``config=`` (tests run every one of them).
    """
    return _KERNELS.config_dicts(kind, levels * points, _block_d(dims))


def _launch(kind: str, device: torch.device, bs: int, scalars: dict, args: tuple,
            acc: tl.dtype, config: Optional[dict]) -> None:
    block_d = _block_d(scalars['D'])
    heads = scalars['HEADS']

    def grid(meta):
        return (bs * cdiv(scalars['Q'], meta['BLOCK_Q']) * heads, )

    block_k = _block_k(scalars['LP'], 'all')  # the interpreter: every sample at once
    _KERNELS.launch(kind, (scalars['LP'], block_d), device, grid, args,
                    dict(scalars, ACC=acc, BLOCK_D=block_d), config,
                    interpreter_config=dict(BLOCK_Q=_block_q(2048, block_k, block_d),
                                            BLOCK_K=block_k, num_warps=4))


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _common(value, spatial_shapes, level_start_index, sampling_loc, attn_weight):
    device = value.device
    val = value.contiguous()
    loc = sampling_loc.contiguous()
    wts = attn_weight.contiguous()
    shape = spatial_shapes.to(device=device, dtype=torch.int64).contiguous()
    start = level_start_index.to(device=device, dtype=torch.int64).contiguous()
    bs, num_value, heads, dims = val.shape
    _, num_query, _, levels, points, _ = loc.shape
    wide = torch.float64 in (val.dtype, wts.dtype)
    scalars = dict(Q=num_query, S=num_value, HEADS=heads, D=dims, P=points, LP=levels * points)
    return val, shape, start, loc, wts, scalars, tl.float64 if wide else tl.float32


def geometric_kernel_attn_forward(value: torch.Tensor, spatial_shapes: torch.Tensor,
                                  level_start_index: torch.Tensor, sampling_loc: torch.Tensor,
                                  attn_weight: torch.Tensor,
                                  config: Optional[dict] = None) -> torch.Tensor:
    """Forward with the Triton kernel (arguments as in :mod:`.reference`; shapes not checked).

    ``config`` (one of :func:`configs`) replaces autotuning on CUDA and the fixed
    configuration of the interpreter.

    Returns:
        Tensor: ``[bs, num_query, heads * D]`` contiguous, in ``value``'s dtype.
    """
    val, shape, start, loc, wts, scalars, acc = _common(value, spatial_shapes, level_start_index,
                                                        sampling_loc, attn_weight)
    bs, heads, dims = val.shape[0], scalars['HEADS'], scalars['D']
    out = torch.empty(bs, scalars['Q'], heads * dims, dtype=val.dtype, device=val.device)
    if out.numel() == 0:
        return out
    if scalars['LP'] == 0 or scalars['S'] == 0:
        return out.zero_()
    _launch('fwd', val.device, bs, scalars, (val, shape, start, loc, wts, out), acc, config)
    return out


def geometric_kernel_attn_backward(grad_output: torch.Tensor, value: torch.Tensor,
                                   spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                                   sampling_loc: torch.Tensor, attn_weight: torch.Tensor,
                                   config: Optional[dict] = None
                                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backward with the Triton kernel (``config`` as in :func:`geometric_kernel_attn_forward`).

    Returns:
        tuple[Tensor, Tensor]: gradients of ``value`` and ``attn_weight``, contiguous, each in
        its input's dtype.
    """
    val, shape, start, loc, wts, scalars, acc = _common(value, spatial_shapes, level_start_index,
                                                        sampling_loc, attn_weight)
    wide = acc == tl.float64
    grad_value = torch.zeros(val.shape, dtype=torch.float64 if wide else torch.float32,
                             device=val.device)
    bs, heads, dims = val.shape[0], scalars['HEADS'], scalars['D']
    if bs * scalars['Q'] * heads * dims * scalars['LP'] * scalars['S'] == 0:
        return grad_value.to(val.dtype), torch.zeros_like(wts)
    grad_w = torch.empty_like(wts)
    gout = grad_output.contiguous()
    _launch('bwd', val.device, bs, scalars,
            (val, shape, start, loc, wts, gout, grad_value, grad_w), acc, config)
    return grad_value.to(val.dtype), grad_w
