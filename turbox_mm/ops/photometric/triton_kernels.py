"""Triton kernel of the photometric distortion + normalisation (spec: :mod:`.reference`).

One program per (image, block of ``BLOCK`` pixels): the three channels of a pixel are read
once (uint8 or float32), the whole chain (brightness, contrast, BGR -> HSV, saturation, hue,
HSV -> BGR, contrast, channel order, channel reversal, normalisation) runs in registers and
the three float32 results are written once: one pass over the batch instead of the
reference's ~40 elementwise kernels, each reading and writing the whole batch.

Numerics: the formulas and their order are the reference's, in float32, with IEEE division
(``div_rn``), so without the distortion the output equals the stock ``(x - mean) / std`` to the
bit. With it, the GPU's contraction of multiply-adds into FMAs leaves float32 rounding
differences (``tests/test_photometric.py`` bounds them).
"""
import torch
import triton
import triton.language as tl

from .._triton_launch import cdiv
from .reference import NUM_PARAMS, _FLT_EPSILON

BLOCK = 512


@triton.jit
def _hsv_channel(sector, frac, s, v, SHIFT: tl.constexpr):
    """One BGR channel of OpenCV's float HSV -> BGR (reference.hsv_to_bgr)."""
    pos = sector + SHIFT
    pos = pos - 6.0 * tl.floor(tl.math.div_rn(pos, 6.0))
    weight = tl.where(pos < 2, 1.0, tl.where(pos == 2, 1.0 - frac, tl.where(pos == 5, frac, 0.0)))
    return v * (1.0 - s * weight)


@triton.jit
def _pick(c0, c1, c2, index):
    return tl.where(index == 0, c0, tl.where(index == 1, c1, c2))


@triton.jit
def _photometric_kernel(x_ptr, par_ptr, mean_ptr, std_ptr, out_ptr, HW, EPS, NBLOCKS,
                        NP: tl.constexpr, AUGMENT: tl.constexpr, CLIP: tl.constexpr,
                        REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)  # one axis: (image, block) pairs, no 65535 limit
    m = pid // NBLOCKS
    offs = (pid - m * NBLOCKS) * BLOCK + tl.arange(0, BLOCK)
    live = offs < HW
    base = m.to(tl.int64) * 3 * HW
    b = tl.load(x_ptr + base + offs, mask=live, other=0).to(tl.float32)
    g = tl.load(x_ptr + base + HW + offs, mask=live, other=0).to(tl.float32)
    r = tl.load(x_ptr + base + 2 * HW + offs, mask=live, other=0).to(tl.float32)
    if AUGMENT:
        p = par_ptr + m * NP
        delta, alpha_first = tl.load(p + 0), tl.load(p + 1)
        alpha_last, saturation, hue = tl.load(p + 2), tl.load(p + 3), tl.load(p + 4)
        b = (b + delta) * alpha_first
        g = (g + delta) * alpha_first
        r = (r + delta) * alpha_first
        # BGR -> HSV (reference.bgr_to_hsv)
        v = tl.maximum(tl.maximum(r, g), b)
        diff = v - tl.minimum(tl.minimum(r, g), b)
        s = tl.math.div_rn(diff, tl.abs(v) + EPS)
        scale = tl.math.div_rn(tl.full(diff.shape, 60.0, tl.float32), diff + EPS)
        h = tl.where(v == r, (g - b) * scale,
                     tl.where(v == g, (b - r) * scale + 120.0, (r - g) * scale + 240.0))
        h = tl.where(h < 0, h + 360.0, h)
        s = s * saturation
        if CLIP:
            s = tl.where(saturation > 1, tl.minimum(tl.maximum(s, 0.0), 1.0), s)
        h = h + hue
        h = tl.where(h > 360, h - 360.0, h)
        h = tl.where(h < 0, h + 360.0, h)
        # HSV -> BGR (reference.hsv_to_bgr)
        h6 = h * (6.0 / 360.0)
        h6 = h6 - 6.0 * tl.floor(tl.math.div_rn(h6, 6.0))
        sector = tl.floor(h6)
        frac = h6 - sector
        overflow = sector >= 6
        sector = tl.where(overflow, 0.0, sector)
        frac = tl.where(overflow, 0.0, frac)
        b = _hsv_channel(sector, frac, s, v, 0) * alpha_last
        g = _hsv_channel(sector, frac, s, v, 2) * alpha_last
        r = _hsv_channel(sector, frac, s, v, 4) * alpha_last
        p0, p1, p2 = tl.load(p + 5), tl.load(p + 6), tl.load(p + 7)
        b, g, r = _pick(b, g, r, p0), _pick(b, g, r, p1), _pick(b, g, r, p2)
    if REVERSE:
        b, r = r, b
    b = tl.math.div_rn(b - tl.load(mean_ptr + 0), tl.load(std_ptr + 0))
    g = tl.math.div_rn(g - tl.load(mean_ptr + 1), tl.load(std_ptr + 1))
    r = tl.math.div_rn(r - tl.load(mean_ptr + 2), tl.load(std_ptr + 2))
    tl.store(out_ptr + base + offs, b, mask=live)
    tl.store(out_ptr + base + HW + offs, g, mask=live)
    tl.store(out_ptr + base + 2 * HW + offs, r, mask=live)


def photometric_normalize(imgs: torch.Tensor, params: torch.Tensor, mean: torch.Tensor,
                          std: torch.Tensor, saturation_clip: bool, reverse_channels: bool,
                          augment: bool) -> torch.Tensor:
    """Launch :func:`_photometric_kernel` (arguments as the reference's)."""
    imgs = imgs.contiguous()
    device = imgs.device
    params = params.to(device=device, dtype=torch.float32).contiguous()
    mean = mean.to(device=device, dtype=torch.float32).reshape(3).contiguous()
    std = std.to(device=device, dtype=torch.float32).reshape(3).contiguous()
    num, _, h, w = imgs.shape
    out = torch.empty((num, 3, h, w), dtype=torch.float32, device=device)
    if num == 0 or h * w == 0:
        return out
    blocks = cdiv(h * w, BLOCK)
    _photometric_kernel[(blocks * num, )](imgs, params, mean, std, out, h * w, _FLT_EPSILON,
                                          blocks, NP=NUM_PARAMS,
                                          AUGMENT=bool(augment), CLIP=bool(saturation_clip),
                                          REVERSE=bool(reverse_channels), BLOCK=BLOCK)
    return out
