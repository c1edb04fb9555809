"""The specification of the photometric distortion + normalisation op in plain PyTorch.

``photometric_normalize(imgs, params, mean, std, saturation_clip, reverse_channels, augment)``
takes ``M`` BGR images ``[M, 3, H, W]`` (uint8 or float32, values in [0, 255]) and returns
float32 ``[M, 3, H, W]``:

1. if ``augment``, :func:`apply_photometric` with image ``m``'s parameters ``params[m]``
   (:meth:`PhotometricParams.packed`: brightness offset, contrast before and after the HSV
   step, saturation factor, hue offset, channel order), in the order and with the formulas
   of mmdet's ``PhotoMetricDistortion`` (OpenCV's float HSV conversions);
2. the channels reversed if ``reverse_channels`` (BGR -> RGB, ``bgr_to_rgb``);
3. ``(x - mean[c]) / std[c]`` per channel.

This is what mmdet3d's ``PhotoMetricDistortion3D`` / Sparse4D's
``PhotoMetricDistortionMultiViewImage`` followed by the data preprocessor's channel
conversion and normalisation do on the CPU. Not differentiable (a data transform).
"""
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

#: Columns of the packed parameters (:meth:`PhotometricParams.packed`).
NUM_PARAMS = 8

_FLT_EPSILON = float(np.finfo(np.float32).eps)


# -- photometric distortion -------------------------------------------------------------------

def bgr_to_hsv(img: Tensor) -> Tensor:
    """OpenCV's float ``COLOR_BGR2HSV`` on channel dim -3: H in degrees [0, 360), S, V.

    ``v = max(b, g, r)``, ``s = (v - min) / (|v| + eps)``, ``h = 60 (g - b) / (v - min + eps)``
    where ``v == r`` (``+120`` / ``+240`` with the other channels where ``v`` is green / blue),
    plus 360 where negative. Inputs outside [0, 255] (after brightness or contrast) follow the
    same formulas, as OpenCV does.

    Args:
        img (Tensor): Float BGR images ``[..., 3, H, W]``.

    Returns:
        Tensor: HSV images of the same shape.
    """
    b, g, r = img.unbind(-3)
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    s = diff / (v.abs() + _FLT_EPSILON)
    # A true division, as OpenCV's (torch turns ``scalar / tensor`` into a reciprocal and a
    # product, one rounding more).
    scale = torch.div(torch.full_like(diff, 60.0), diff + _FLT_EPSILON)
    h = torch.where(v == r, (g - b) * scale,
                    torch.where(v == g, (b - r) * scale + 120.0, (r - g) * scale + 240.0))
    h = torch.where(h < 0, h + 360.0, h)
    return torch.stack((h, s, v), dim=-3)


def hsv_to_bgr(hsv: Tensor) -> Tensor:
    """OpenCV's float ``COLOR_HSV2BGR`` on channel dim -3 (H in degrees, any real value).

    OpenCV splits the hue circle into six sectors and picks each of blue, green and red from
    ``(v, v (1 - s), v (1 - s f), v (1 - s (1 - f)))`` (``f`` the position inside the sector)
    through a table. Every entry is ``v (1 - s w)`` with ``w`` in ``(0, 1, f, 1 - f)``, and
    the table for green and red is the one for blue shifted by two and four sectors, so
    the weight is computed per channel from ``(sector + shift) mod 6``, elementwise, with
    OpenCV's arithmetic.

    Args:
        hsv (Tensor): Float HSV images ``[..., 3, H, W]``.

    Returns:
        Tensor: BGR images of the same shape.
    """
    h, s, v = (c.unsqueeze(-3) for c in hsv.unbind(-3))
    h6 = h * np.float32(6.0 / 360.0)
    h6 = h6 - 6.0 * torch.floor(h6 / 6.0)
    sector = torch.floor(h6)
    frac = h6 - sector
    # Rounding can land exactly on 6: OpenCV then uses sector 0 with no fraction.
    overflow = sector >= 6
    sector = torch.where(overflow, torch.zeros_like(sector), sector)
    frac = torch.where(overflow, torch.zeros_like(frac), frac)
    shift = torch.tensor([0.0, 2.0, 4.0], dtype=hsv.dtype, device=hsv.device).view(3, 1, 1)
    pos = torch.remainder(sector + shift, 6)  # [..., 3, H, W], exact small integers
    # Blue's entry by sector: v(1-s), v(1-s), v(1-s(1-f)), v, v, v(1-sf).
    weight = torch.where(pos < 2, torch.ones_like(pos),
                         torch.where(pos == 2, 1 - frac,
                                     torch.where(pos == 5, frac, torch.zeros_like(pos))))
    return v * (1 - s * weight)


@dataclass
class PhotometricParams:
    """Per-image parameters of one photometric distortion, the identity where an op is off.

    Every field holds one value (or row) per image. Built from the same draws as mmdet's
    ``PhotoMetricDistortion._random_flags`` with :meth:`from_draws`, or drawn with
    :meth:`sample`.

    Args:
        delta (Tensor): [M] brightness offset added to every channel; 0 where off.
        alpha_first (Tensor): [M] contrast factor before the HSV step (mode 1); 1 where off.
        alpha_last (Tensor): [M] contrast factor after the HSV step (mode 0); 1 where off.
        saturation (Tensor): [M] saturation factor; 1 where off.
        hue (Tensor): [M] hue offset in degrees; 0 where off.
        perm (Tensor): [M, 3] int64 channel order of the swap; ``[0, 1, 2]`` where off.
        saturation_clip (bool): Clip saturation to [0, 1] where the factor exceeds 1 (mmdet 3's
            ``PhotoMetricDistortion``); the multi-view transforms of Sparse4D and BEVFormer do
            not clip. Defaults to False.
    """

    delta: Tensor
    alpha_first: Tensor
    alpha_last: Tensor
    saturation: Tensor
    hue: Tensor
    perm: Tensor
    saturation_clip: bool = False

    _FLOAT_FIELDS = ('delta', 'alpha_first', 'alpha_last', 'saturation', 'hue')

    @classmethod
    def from_draws(cls, mode, brightness_flag, contrast_flag, saturation_flag, hue_flag,
                   swap_flag, delta_value, alpha_value, saturation_value, hue_value, swap_value,
                   saturation_clip: bool = False) -> 'PhotometricParams':
        """Parameters from per-image draws, in the order of mmdet's ``_random_flags``.

        Each argument is a sequence over images (or a scalar for one image): ``mode`` 1 puts
        contrast before the HSV step, 0 after it; the flags switch each op on; the values are
        the op's parameters; ``swap_value`` is a permutation of (0, 1, 2).

        Returns:
            PhotometricParams: On the CPU.
        """
        def vec(x, dtype=torch.float32):
            return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=dtype).reshape(-1)

        mode, contrast_flag = vec(mode) > 0, vec(contrast_flag) > 0
        alpha = vec(alpha_value)
        perm = torch.as_tensor(np.asarray(swap_value), dtype=torch.long).reshape(-1, 3)
        identity = torch.arange(3).expand_as(perm)
        ones = torch.ones_like(alpha)
        return cls(
            delta=torch.where(vec(brightness_flag) > 0, vec(delta_value), 0 * ones),
            alpha_first=torch.where(mode & contrast_flag, alpha, ones),
            alpha_last=torch.where(~mode & contrast_flag, alpha, ones),
            saturation=torch.where(vec(saturation_flag) > 0, vec(saturation_value), ones),
            hue=torch.where(vec(hue_flag) > 0, vec(hue_value), 0 * ones),
            perm=torch.where((vec(swap_flag) > 0)[:, None], perm, identity).contiguous(),
            saturation_clip=saturation_clip)

    @classmethod
    def sample(cls, num: int, generator: torch.Generator, brightness_delta: float = 32,
               contrast_range: Sequence[float] = (0.5, 1.5),
               saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: float = 18,
               prob: float = 0.5, saturation_clip: bool = False) -> 'PhotometricParams':
        """Draw the parameters of ``num`` images from ``generator`` (a CPU generator).

        As the CPU transform: contrast before or after the HSV step with probability 1/2, each
        op on with probability ``prob``, values uniform in their ranges, the swap a uniformly
        random permutation.

        Returns:
            PhotometricParams: On the CPU.
        """
        u = torch.rand(num, 10, generator=generator, dtype=torch.float64)
        flags = u[:, :5] < prob
        mode = u[:, 5] < 0.5

        def uniform(col, lo, hi):
            return lo + (hi - lo) * u[:, col]

        perm = torch.argsort(torch.rand(num, 3, generator=generator), dim=1)
        return cls.from_draws(
            mode=mode.numpy(), brightness_flag=flags[:, 0].numpy(),
            contrast_flag=flags[:, 1].numpy(), saturation_flag=flags[:, 2].numpy(),
            hue_flag=flags[:, 3].numpy(), swap_flag=flags[:, 4].numpy(),
            delta_value=uniform(6, -brightness_delta, brightness_delta).numpy(),
            alpha_value=uniform(7, *contrast_range).numpy(),
            saturation_value=uniform(8, *saturation_range).numpy(),
            hue_value=uniform(9, -hue_delta, hue_delta).numpy(), swap_value=perm.numpy(),
            saturation_clip=saturation_clip)

    def __len__(self) -> int:
        return self.delta.numel()

    def packed(self) -> Tensor:
        """``[M, 8]`` float32: the five float fields, then the channel order."""
        return torch.cat([getattr(self, k).float().reshape(-1, 1) for k in self._FLOAT_FIELDS]
                         + [self.perm.float()], dim=1)

    @classmethod
    def from_packed(cls, packed: Tensor, saturation_clip: bool = False) -> 'PhotometricParams':
        """The inverse of :meth:`packed` (on ``packed``'s device)."""
        if packed.dim() != 2 or packed.shape[1] != NUM_PARAMS:
            raise ValueError(f'photometric parameters must be [M, {NUM_PARAMS}], got '
                             f'{tuple(packed.shape)}')
        values = dict(zip(cls._FLOAT_FIELDS, packed[:, :5].float().unbind(1)))
        return cls(perm=packed[:, 5:].round().long(), saturation_clip=saturation_clip, **values)

    def to(self, device: Union[str, torch.device]) -> 'PhotometricParams':
        """The same parameters on ``device``, moved in one copy."""
        return self.from_packed(self.packed().to(device, non_blocking=True),
                                self.saturation_clip)

    def active(self) -> Dict[str, bool]:
        """Which ops any image uses (read on the host: call on the CPU copy)."""
        return dict(delta=bool((self.delta != 0).any()),
                    alpha_first=bool((self.alpha_first != 1).any()),
                    alpha_last=bool((self.alpha_last != 1).any()),
                    saturation=bool((self.saturation != 1).any()),
                    hue=bool((self.hue != 0).any()),
                    perm=bool((self.perm != torch.arange(3)).any()))


def apply_photometric(imgs: Tensor, params: PhotometricParams,
                      active: Optional[Dict[str, bool]] = None) -> Tensor:
    """Photometric distortion of a batch of BGR float images, one parameter set per image.

    The order is the CPU transform's: brightness; contrast if mode 1; BGR -> HSV; saturation
    (times factor, optionally clipped); hue (plus offset, wrapped into [0, 360]); HSV -> BGR;
    contrast if mode 0; channel swap. The HSV round trip runs for every image, as on the CPU.

    Args:
        imgs (Tensor): ``[M, 3, H, W]`` float32 BGR in [0, 255]. Modified in place.
        params (PhotometricParams): ``M`` parameter sets on ``imgs.device``.
        active (dict, optional): :meth:`PhotometricParams.active` of the parameters; ops that no
            image uses are skipped. Defaults to None (run every op).

    Returns:
        Tensor: The distorted images ``[M, 3, H, W]``.
    """
    if imgs.dim() != 4 or imgs.shape[1] != 3:
        raise ValueError(f'apply_photometric: expected [M, 3, H, W] images, got '
                         f'{tuple(imgs.shape)}')
    if len(params) != imgs.shape[0]:
        raise ValueError(f'apply_photometric: {len(params)} parameter sets for '
                         f'{imgs.shape[0]} images')
    on = active or {k: True for k in ('delta', 'alpha_first', 'alpha_last', 'saturation', 'hue',
                                      'perm')}

    def per_image(x):
        return x.view(-1, 1, 1, 1)

    if on['delta']:
        imgs.add_(per_image(params.delta))
    if on['alpha_first']:
        imgs.mul_(per_image(params.alpha_first))
    hsv = bgr_to_hsv(imgs)
    if on['saturation']:
        sat = hsv[:, 1:2]
        sat.mul_(per_image(params.saturation))
        if params.saturation_clip:
            sat.copy_(torch.where(per_image(params.saturation) > 1, sat.clamp(0, 1), sat))
    if on['hue']:
        hue = hsv[:, 0:1]
        hue.add_(per_image(params.hue))
        hue.copy_(torch.where(hue > 360, hue - 360, hue))
        hue.copy_(torch.where(hue < 0, hue + 360, hue))
    imgs = hsv_to_bgr(hsv)
    if on['alpha_last']:
        imgs.mul_(per_image(params.alpha_last))
    if on['perm']:
        index = params.perm[:, :, None, None].expand(-1, -1, *imgs.shape[-2:])
        imgs = torch.gather(imgs, 1, index)
    return imgs


def photometric_normalize_reference(imgs: Tensor, params: Tensor, mean: Tensor, std: Tensor,
                                    saturation_clip: bool = False,
                                    reverse_channels: bool = False,
                                    augment: bool = True) -> Tensor:
    """The op of the module docstring with :func:`apply_photometric` and tensor arithmetic.

    Args:
        imgs (Tensor): ``[M, 3, H, W]`` uint8 or float32 BGR in [0, 255].
        params (Tensor): ``[M, 8]`` float (:meth:`PhotometricParams.packed`); unused without
            ``augment``.
        mean (Tensor): ``[3]`` per-channel mean (of the output channel order).
        std (Tensor): ``[3]`` per-channel standard deviation.
        saturation_clip (bool): Clip saturation where its factor exceeds 1. Defaults to False.
        reverse_channels (bool): Reverse the channels after the distortion. Defaults to False.
        augment (bool): Apply the distortion. Defaults to True.

    Returns:
        Tensor: ``[M, 3, H, W]`` float32.
    """
    x = imgs.to(torch.float32, copy=True)
    if augment:
        x = apply_photometric(x, PhotometricParams.from_packed(params, saturation_clip))
    if reverse_channels:
        x = x[:, [2, 1, 0]]
    mean = mean.to(x.device, torch.float32).view(-1, 1, 1)
    std = std.to(x.device, torch.float32).view(-1, 1, 1)
    return (x - mean) / std
