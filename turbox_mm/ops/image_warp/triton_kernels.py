"""Triton kernel of the uint8 image warp (specification: :mod:`.reference`).

One program per (image, block of ``BLOCK`` output pixels); each pixel computes its source
point, its four bilinear taps of the block-averaged source and the valid-box test, for all
three channels, reading the uint8 source directly. The block average is not materialised:
each tap averages its ``factor x factor`` source pixels in registers (48 byte loads per
output pixel at factor 2, all from lines the neighbouring pixels also read). The one launch
replaces the reference's float conversion, ``avg_pool2d``, ``affine_grid``, ``grid_sample``,
rounding, channel flip and the float64 mask kernels.

Numerics against the reference: the sampling point is computed in float32 directly from the
pixel-space warp (the reference goes through normalised coordinates and ``affine_grid``), so
a sample whose value lies within float32 rounding of a half integer may round the other way:
at most 1 grey level, measured on a small fraction of the pixels (``tests/test_image_warp.py``).
The block average and the valid-box test are exact (float32 sums of integers; float64
fixed-point arithmetic as OpenCV's), so they match the reference bit for bit except where
the GPU fuses a multiply-add in the box test, which moves a result only within 1e-16 of a
rounding tie.
"""
import torch
import triton
import triton.language as tl

from .._triton_launch import cdiv
from .reference import NUM_PARAMS

BLOCK = 256


@triton.jit
def _rint(x):
    """Round half to even (``torch.round``), for float32 or float64."""
    r = tl.floor(x + 0.5)
    tie = (r - x) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _tap(plane, x, y, Hs, Ws, Hb, Wb, live, FACTOR: tl.constexpr, HALF_UP: tl.constexpr):
    """Pixel ``(x, y)`` of the block-averaged plane, 0 off it, as float32."""
    ok = live & (x >= 0) & (x < Wb) & (y >= 0) & (y < Hb)
    if FACTOR == 1:
        value = tl.load(plane + y * Ws + x, mask=ok, other=0).to(tl.float32)
    else:
        acc = tl.zeros(x.shape, dtype=tl.float32)
        for dy in tl.static_range(FACTOR):
            row = tl.minimum(y * FACTOR + dy, Hs - 1) * Ws
            for dx in tl.static_range(FACTOR):
                col = tl.minimum(x * FACTOR + dx, Ws - 1)
                acc += tl.load(plane + row + col, mask=ok, other=0).to(tl.float32)
        mean = acc * (1.0 / (FACTOR * FACTOR))
        if HALF_UP:
            value = tl.floor(mean + 0.5)
        else:
            value = _rint(mean)
    return value


@triton.jit
def _warp_u8_kernel(src_ptr, par_ptr, out_ptr, Hs, Ws, Hb, Wb, H, W, NBLOCKS, NP: tl.constexpr,
                    FACTOR: tl.constexpr, HALF_UP: tl.constexpr, REVERSE: tl.constexpr,
                    BLOCK: tl.constexpr):
    pid = tl.program_id(0)  # one axis: (image, block) pairs, no 65535 limit
    k = pid // NBLOCKS
    offs = (pid - k * NBLOCKS) * BLOCK + tl.arange(0, BLOCK)
    live = offs < H * W
    vi = offs // W
    ui = offs - vi * W
    p = par_ptr + k * NP
    # Sampling point in the block-averaged source (float32), kept in a range where every
    # tap of a point off the source stays off it and the int32 conversion is safe.
    u, v = ui.to(tl.float32), vi.to(tl.float32)
    x = tl.load(p + 0).to(tl.float32) * u + tl.load(p + 1).to(tl.float32) * v \
        + tl.load(p + 2).to(tl.float32)
    y = tl.load(p + 3).to(tl.float32) * u + tl.load(p + 4).to(tl.float32) * v \
        + tl.load(p + 5).to(tl.float32)
    x = tl.minimum(tl.maximum(x, -2.0), Wb + 1.0)
    y = tl.minimum(tl.maximum(y, -2.0), Hb + 1.0)
    x0f, y0f = tl.floor(x), tl.floor(y)
    x0, y0 = x0f.to(tl.int32), y0f.to(tl.int32)
    wx1, wy1 = x - x0f, y - y0f
    wx0, wy0 = (x0f + 1.0) - x, (y0f + 1.0) - y
    # The valid-box test in float64 fixed point (reference.valid_mask).
    ud, vd = ui.to(tl.float64), vi.to(tl.float64)
    bx = tl.floor((_rint((tl.load(p + 7) * vd + tl.load(p + 8)) * 1024.0) + 512.0
                   + _rint(tl.load(p + 6) * ud * 1024.0)) / 1024.0)
    by = tl.floor((_rint((tl.load(p + 10) * vd + tl.load(p + 11)) * 1024.0) + 512.0
                   + _rint(tl.load(p + 9) * ud * 1024.0)) / 1024.0)
    inside = (bx >= 0) & (bx < W) & (by >= 0) & (by < H)
    unmasked = tl.where(tl.load(p + 12) == 0, 1.0, 0.0)
    keep = (inside.to(tl.float32) + unmasked) > 0
    plane_size = Hs * Ws
    src_k = src_ptr + k.to(tl.int64) * 3 * plane_size
    out_k = out_ptr + k.to(tl.int64) * 3 * H * W
    for c in tl.static_range(3):
        if REVERSE:
            plane = src_k + (2 - c) * plane_size
        else:
            plane = src_k + c * plane_size
        val = wx0 * wy0 * _tap(plane, x0, y0, Hs, Ws, Hb, Wb, live, FACTOR, HALF_UP) \
            + wx1 * wy0 * _tap(plane, x0 + 1, y0, Hs, Ws, Hb, Wb, live, FACTOR, HALF_UP) \
            + wx0 * wy1 * _tap(plane, x0, y0 + 1, Hs, Ws, Hb, Wb, live, FACTOR, HALF_UP) \
            + wx1 * wy1 * _tap(plane, x0 + 1, y0 + 1, Hs, Ws, Hb, Wb, live, FACTOR, HALF_UP)
        val = tl.minimum(tl.maximum(tl.floor(val + 0.5), 0.0), 255.0)
        val = tl.where(keep, val, 0.0)
        tl.store(out_k + c * H * W + offs, val.to(tl.uint8), mask=live)


def warp_affine_u8(src: torch.Tensor, params: torch.Tensor, factor: int, out_h: int,
                   out_w: int, reverse_channels: bool) -> torch.Tensor:
    """Launch :func:`_warp_u8_kernel` (arguments as :func:`.reference.warp_affine_u8_reference`)."""
    src = src.contiguous()
    params = params.to(device=src.device, dtype=torch.float64).contiguous()
    num, _, hs, ws = src.shape
    out = torch.empty((num, 3, out_h, out_w), dtype=torch.uint8, device=src.device)
    if num == 0 or out_h * out_w == 0:
        return out
    blocks = cdiv(out_h * out_w, BLOCK)
    _warp_u8_kernel[(blocks * num, )](src, params, out, hs, ws, -(-hs // factor),
                                      -(-ws // factor), out_h, out_w, blocks, NP=NUM_PARAMS,
                                      FACTOR=factor, HALF_UP=factor == 2,
                                      REVERSE=bool(reverse_channels), BLOCK=BLOCK)
    return out
