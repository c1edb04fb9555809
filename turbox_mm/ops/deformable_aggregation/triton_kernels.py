"""Triton kernels of deformable aggregation: forward and backward.

The formula and upstream's conventions are in :mod:`.reference` (the specification). Here:

- One program per (anchor, block of groups). The program walks the anchor's (point, camera)
  pairs that fall inside the image, all levels of each, ``BLOCK_S`` samples (pair x level)
  at a time, and holds a ``[BLOCK_S, BLOCK_G, BLOCK_J]`` tile: samples by groups by channels
  of a group. Each bilinear corner is one masked gather of whole channel rows (the maps are
  channels-last, so a row is contiguous).
- Which pairs are inside is decided once per call on the host side of the launch
  (:func:`_inside_pairs`): per anchor, the indices of its inside pairs first and their count.
  Points land in one or two of the six cameras, so this skips ~4/5 of the pairs instead of
  masking them lane by lane.
- Accumulation is float32 (float64 when an input is float64, which lets ``gradcheck`` run on
  the kernels); 16-bit inputs are read as they are and converted in registers.
- Backward: the feature gradient is scattered with atomic adds into a float32 (float64)
  buffer, cast to the features' dtype afterwards; the weight gradient of each (sample, group)
  is a channel reduction inside one program, stored directly; the location gradient sums over
  levels and group blocks with atomic adds into a small float32 buffer.

Offsets into the features are int64 (``bs * num_feat * C`` passes 2**31 at large sizes).
On CUDA the tile sizes are autotuned per (C, groups, levels, cameras) and dtypes; under
``TRITON_INTERPRET=1`` (CPU tensors) a fixed configuration runs.
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
def _geometry(n, s, n_samples, b, pairs_ptr, loc_ptr, shape_ptr, start_ptr, F, L, PC, CAMS,
              ACC: tl.constexpr):
    """Per sample ``s`` (pair ``s // L`` of the anchor's inside pairs, level ``s % L``).

    Returns the sample mask, the flat (anchor, point, camera) pair index, the level, the top-
    left corner ``(x0, y0)``, the fractions ``(lx, ly)``, the map's ``(H, W)`` and the feature
    row of the map's first pixel. Pixel coordinates are ``loc * size - 0.5`` (upstream).
    """
    smask = s < n_samples
    k = s // L
    lvl = s - k * L
    pc = tl.load(pairs_ptr + n * PC + k, mask=smask, other=0).to(tl.int64)
    pair = n * PC + pc
    cam = pc % CAMS
    x = tl.load(loc_ptr + pair * 2, mask=smask, other=0.5).to(ACC)
    y = tl.load(loc_ptr + pair * 2 + 1, mask=smask, other=0.5).to(ACC)
    cl = cam * L + lvl
    height = tl.load(shape_ptr + cl * 2, mask=smask, other=1)
    width = tl.load(shape_ptr + cl * 2 + 1, mask=smask, other=1)
    start = tl.load(start_ptr + cl, mask=smask, other=0)
    xi = x * width.to(ACC) - 0.5
    yi = y * height.to(ACC) - 0.5
    x0f = tl.floor(xi)
    y0f = tl.floor(yi)
    lx = xi - x0f
    ly = yi - y0f
    base = b * F + start
    return (smask, pair, lvl, x0f.to(tl.int32), y0f.to(tl.int32), lx, ly, height, width, base)


@triton.jit
def _corner(base, yy, xx, height, width, smask, ch, chmask, C):
    """Offsets ``[S, BG, BJ]`` (int64) of the channels of pixel ``(yy, xx)`` and their mask."""
    ok = smask & (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
    row = base + yy * width + xx
    offs = row[:, None, None] * C + ch[None, :, :]
    mask = ok[:, None, None] & chmask[None, :, :]
    return offs, mask


@triton.jit(do_not_specialize=['A'])
def _da_fwd_kernel(feat_ptr, shape_ptr, start_ptr, loc_ptr, w_ptr, pairs_ptr, count_ptr, out_ptr,
                   A, F, C, G, CPG, CAMS, L, PC,
                   ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr,
                   BLOCK_J: tl.constexpr):
    """``out[n, c] = sum_s w[s, g(c)] * bilinear(feat, s)[c]`` over the anchor's inside samples.

    Grid: ``(bs * anchors, cdiv(G, BLOCK_G))``.
    """
    n = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    j = tl.arange(0, BLOCK_J)
    gmask = g < G
    ch = g[:, None] * CPG + j[None, :]
    chmask = gmask[:, None] & (j[None, :] < CPG)
    b = n // A
    n_samples = tl.load(count_ptr + n) * L

    acc = tl.zeros((BLOCK_S, BLOCK_G, BLOCK_J), dtype=ACC)
    for s0 in range(0, n_samples, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        smask, pair, lvl, x0, y0, lx, ly, height, width, base = _geometry(
            n, s, n_samples, b, pairs_ptr, loc_ptr, shape_ptr, start_ptr, F, L, PC, CAMS, ACC)
        hx = 1 - lx
        hy = 1 - ly
        woffs = (pair * L + lvl)[:, None] * G + g[None, :]
        wv = tl.load(w_ptr + woffs, mask=smask[:, None] & gmask[None, :], other=0).to(ACC)

        offs, mask = _corner(base, y0, x0, height, width, smask, ch, chmask, C)
        val = tl.load(feat_ptr + offs, mask=mask, other=0).to(ACC) * (hy * hx)[:, None, None]
        offs, mask = _corner(base, y0, x0 + 1, height, width, smask, ch, chmask, C)
        val += tl.load(feat_ptr + offs, mask=mask, other=0).to(ACC) * (hy * lx)[:, None, None]
        offs, mask = _corner(base, y0 + 1, x0, height, width, smask, ch, chmask, C)
        val += tl.load(feat_ptr + offs, mask=mask, other=0).to(ACC) * (ly * hx)[:, None, None]
        offs, mask = _corner(base, y0 + 1, x0 + 1, height, width, smask, ch, chmask, C)
        val += tl.load(feat_ptr + offs, mask=mask, other=0).to(ACC) * (ly * lx)[:, None, None]
        acc += wv[:, :, None] * val

    res = tl.sum(acc, axis=0)
    tl.store(out_ptr + n * C + ch, res.to(out_ptr.dtype.element_ty), mask=chmask)


@triton.jit(do_not_specialize=['A'])
def _da_bwd_kernel(feat_ptr, shape_ptr, start_ptr, loc_ptr, w_ptr, pairs_ptr, count_ptr, gout_ptr,
                   gfeat_ptr, gloc_ptr, gw_ptr,
                   A, F, C, G, CPG, CAMS, L, PC,
                   ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr,
                   BLOCK_J: tl.constexpr):
    """Gradients of :func:`_da_fwd_kernel` for upstream's three differentiable inputs.

    With ``top[s, c] = grad_out[n, c] * w[s, g(c)]`` and ``v00..v11`` the four corners:

    - ``grad_feat[corner, c] += bilinear_weight(corner) * top[s, c]`` (atomic; float32/64
      buffer ``gfeat_ptr``);
    - ``grad_w[s, g] = sum_{c in g} grad_out[n, c] * bilinear(feat, s)[c]`` (stored);
    - ``grad_loc[pair, 0] += W * sum_c top[s, c] * ((1-ly) (v01 - v00) + ly (v11 - v10))`` and
      ``grad_loc[pair, 1] += H * sum_c top[s, c] * ((1-lx) (v10 - v00) + lx (v11 - v01))``
      (atomic over levels and group blocks; float32/64 buffer ``gloc_ptr``).

    Grid: ``(bs * anchors, cdiv(G, BLOCK_G))``; ``gfeat_ptr`` and ``gloc_ptr`` start at zero,
    ``gw_ptr`` too (pairs outside every image are never written).
    """
    n = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    j = tl.arange(0, BLOCK_J)
    gmask = g < G
    ch = g[:, None] * CPG + j[None, :]
    chmask = gmask[:, None] & (j[None, :] < CPG)
    b = n // A
    n_samples = tl.load(count_ptr + n) * L
    go = tl.load(gout_ptr + n * C + ch, mask=chmask, other=0).to(ACC)

    for s0 in range(0, n_samples, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        smask, pair, lvl, x0, y0, lx, ly, height, width, base = _geometry(
            n, s, n_samples, b, pairs_ptr, loc_ptr, shape_ptr, start_ptr, F, L, PC, CAMS, ACC)
        hx = (1 - lx)[:, None, None]
        hy = (1 - ly)[:, None, None]
        lx = lx[:, None, None]
        ly = ly[:, None, None]
        woffs = (pair * L + lvl)[:, None] * G + g[None, :]
        wmask = smask[:, None] & gmask[None, :]
        wv = tl.load(w_ptr + woffs, mask=wmask, other=0).to(ACC)
        top = wv[:, :, None] * go[None, :, :]

        offs, mask = _corner(base, y0, x0, height, width, smask, ch, chmask, C)
        v00 = tl.load(feat_ptr + offs, mask=mask, other=0).to(ACC)
        tl.atomic_add(gfeat_ptr + offs, top * (hy * hx), mask=mask, sem='relaxed')
        offs, mask = _corner(base, y0, x0 + 1, height, width, smask, ch, chmask, C)
        v01 = tl.load(feat_ptr + offs, mask=mask, other=0).to(ACC)
        tl.atomic_add(gfeat_ptr + offs, top * (hy * lx), mask=mask, sem='relaxed')
        offs, mask = _corner(base, y0 + 1, x0, height, width, smask, ch, chmask, C)
        v10 = tl.load(feat_ptr + offs, mask=mask, other=0).to(ACC)
        tl.atomic_add(gfeat_ptr + offs, top * (ly * hx), mask=mask, sem='relaxed')
        offs, mask = _corner(base, y0 + 1, x0 + 1, height, width, smask, ch, chmask, C)
        v11 = tl.load(feat_ptr + offs, mask=mask, other=0).to(ACC)
        tl.atomic_add(gfeat_ptr + offs, top * (ly * lx), mask=mask, sem='relaxed')

        val = hy * hx * v00 + hy * lx * v01 + ly * hx * v10 + ly * lx * v11
        gw = tl.sum(val * go[None, :, :], axis=2)
        tl.store(gw_ptr + woffs, gw.to(gw_ptr.dtype.element_ty), mask=wmask)

        dvx = hy * (v01 - v00) + ly * (v11 - v10)
        dvy = hx * (v10 - v00) + lx * (v11 - v01)
        gx = tl.sum(tl.sum(top * dvx, axis=2), axis=1) * width.to(ACC)
        gy = tl.sum(tl.sum(top * dvy, axis=2), axis=1) * height.to(ACC)
        tl.atomic_add(gloc_ptr + pair * 2, gx, mask=smask, sem='relaxed')
        tl.atomic_add(gloc_ptr + pair * 2 + 1, gy, mask=smask, sem='relaxed')


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------


def _block_sizes(groups: int, per_group: int) -> Tuple[int, int]:
    """``(BLOCK_G, BLOCK_J)``: all groups in one program, channels of a group padded to 2**k."""
    return next_power_of_2(groups), next_power_of_2(per_group)


def _default_block_s(block_g: int, block_j: int) -> int:
    """Samples per step so that a tile holds about 2048 elements (between 1 and 16)."""
    return max(1, min(16, 2048 // (block_g * block_j)))


# Autotuning candidates as (samples per step at 256 channels a program, all or half the groups
# a program, warps). Chosen from register counts of sm_90 builds (no spills at C=256, groups=8;
# the backward holds four corner tiles and so takes fewer samples a step).
_FWD_CANDIDATES = ((4, 1, 4), (8, 1, 4), (8, 1, 8), (16, 1, 8), (4, 2, 4), (8, 2, 8))
_BWD_CANDIDATES = ((2, 1, 4), (4, 1, 4), (8, 1, 8), (4, 2, 4), (8, 2, 8), (2, 2, 2))


def _configs(kind: str, block_g: int, block_j: int):
    """Autotuning configurations of kernel ``kind`` for a padded group layout."""
    configs, seen = [], set()
    for samples, split, warps in (_FWD_CANDIDATES if kind == 'fwd' else _BWD_CANDIDATES):
        if split > 1 and (block_g < split or block_g * block_j < 128):
            continue  # too few channels to split between programs
        groups = block_g // split
        block_s = max(1, min(64, samples * 256 // (groups * block_j)))
        if (block_s, groups, warps) not in seen:
            seen.add((block_s, groups, warps))
            configs.append(triton.Config({'BLOCK_S': block_s, 'BLOCK_G': groups},
                                         num_warps=warps))
    return configs


_KERNELS = KernelPair(_da_fwd_kernel, _da_bwd_kernel, _configs, key=['C', 'G', 'L', 'CAMS'],
                      reset_to_zero=['gfeat_ptr', 'gloc_ptr'])


def configs(kind: str, channels: int, groups: int) -> List[dict]:
    """The launch configurations autotuning picks from, for kernel ``kind`` ('fwd' or 'bwd').

    Each is a dict of ``BLOCK_S``, ``BLOCK_G`` and ``num_warps``, which the launchers take as
    ``config=`` (tests run every one of them).
    """
    return _KERNELS.config_dicts(kind, *_block_sizes(groups, channels // groups))


def _launch(kind: str, device: torch.device, num_anchors: int, groups: int, per_group: int,
            args: tuple, scalars: dict, acc: tl.dtype, config: Optional[dict]) -> None:
    block_g, block_j = _block_sizes(groups, per_group)

    def grid(meta):
        return (num_anchors, cdiv(groups, meta['BLOCK_G']))

    _KERNELS.launch(kind, (block_g, block_j), device, grid, args,
                    dict(scalars, ACC=acc, BLOCK_J=block_j), config,
                    interpreter_config=dict(BLOCK_S=_default_block_s(block_g, block_j),
                                            BLOCK_G=block_g, num_warps=4))  # ~2048 a step


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _inside_pairs(loc: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per anchor: its (point, camera) pair indices, inside ones first, and how many are inside.

    Inside means ``0 < x < 1`` and ``0 < y < 1`` (upstream's test; NaN is outside).

    Args:
        loc (Tensor): ``[bs, anchors, pts, cams, 2]``.

    Returns:
        tuple[Tensor, Tensor]: int32 ``[bs * anchors, pts * cams]`` and int32
        ``[bs * anchors]``.
    """
    bs, anchors, pts, cams, _ = loc.shape
    inside = ((loc > 0) & (loc < 1)).all(dim=-1).reshape(bs * anchors, pts * cams)
    count = inside.sum(dim=1, dtype=torch.int32)
    pairs = torch.argsort(inside.to(torch.int8), dim=1, descending=True, stable=True)
    return pairs.to(torch.int32).contiguous(), count


def _common(mc_ms_feat, spatial_shape, scale_start_index, sampling_location, weights):
    device = mc_ms_feat.device
    feat = mc_ms_feat.contiguous()
    loc = sampling_location.contiguous()
    wts = weights.contiguous()
    shape = spatial_shape.to(device=device, dtype=torch.int32).contiguous()
    start = scale_start_index.to(device=device, dtype=torch.int64).contiguous()
    bs, num_feat, channels = feat.shape
    _, anchors, pts, cams, _ = loc.shape
    levels, groups = wts.shape[-2:]
    wide = torch.float64 in (feat.dtype, loc.dtype, wts.dtype)
    scalars = dict(A=anchors, F=num_feat, C=channels, G=groups, CPG=channels // groups,
                   CAMS=cams, L=levels, PC=pts * cams)
    return feat, shape, start, loc, wts, scalars, wide


def deformable_aggregation_forward(mc_ms_feat: torch.Tensor, spatial_shape: torch.Tensor,
                                   scale_start_index: torch.Tensor,
                                   sampling_location: torch.Tensor, weights: torch.Tensor,
                                   config: Optional[dict] = None) -> torch.Tensor:
    """Forward with the Triton kernel (arguments as in :mod:`.reference`; shapes not checked).

    ``config`` (one of :func:`configs`) replaces autotuning on CUDA and the fixed
    configuration of the interpreter.

    Returns:
        Tensor: ``[bs, anchors, C]`` contiguous, in ``mc_ms_feat``'s dtype.
    """
    feat, shape, start, loc, wts, scalars, wide = _common(mc_ms_feat, spatial_shape,
                                                          scale_start_index, sampling_location,
                                                          weights)
    bs, anchors = loc.shape[:2]
    out = torch.empty(bs, anchors, scalars['C'], dtype=feat.dtype, device=feat.device)
    if out.numel() == 0:
        return out
    if scalars['PC'] == 0 or scalars['L'] == 0:
        return out.zero_()
    pairs, count = _inside_pairs(loc)
    _launch('fwd', feat.device, bs * anchors, scalars['G'], scalars['CPG'],
            (feat, shape, start, loc, wts, pairs, count, out), scalars,
            tl.float64 if wide else tl.float32, config)
    return out


def deformable_aggregation_backward(
        grad_output: torch.Tensor, mc_ms_feat: torch.Tensor, spatial_shape: torch.Tensor,
        scale_start_index: torch.Tensor, sampling_location: torch.Tensor, weights: torch.Tensor,
        config: Optional[dict] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward with the Triton kernel (``config`` as in :func:`deformable_aggregation_forward`).

    Returns:
        tuple[Tensor, Tensor, Tensor]: gradients of ``mc_ms_feat``, ``sampling_location`` and
        ``weights``, contiguous, each in its input's dtype.
    """
    feat, shape, start, loc, wts, scalars, wide = _common(mc_ms_feat, spatial_shape,
                                                          scale_start_index, sampling_location,
                                                          weights)
    acc = torch.float64 if wide else torch.float32
    grad_feat = torch.zeros(feat.shape, dtype=acc, device=feat.device)
    grad_loc = torch.zeros(loc.shape, dtype=acc, device=feat.device)
    grad_w = torch.zeros(wts.shape, dtype=wts.dtype, device=feat.device)
    bs, anchors = loc.shape[:2]
    if bs * anchors * scalars['C'] * scalars['PC'] * scalars['L'] > 0:
        pairs, count = _inside_pairs(loc)
        gout = grad_output.contiguous()
        _launch('bwd', feat.device, bs * anchors, scalars['G'], scalars['CPG'],
                (feat, shape, start, loc, wts, pairs, count, gout, grad_feat, grad_loc, grad_w),
                scalars, tl.float64 if wide else tl.float32, config)
    return grad_feat.to(feat.dtype), grad_loc.to(loc.dtype), grad_w
