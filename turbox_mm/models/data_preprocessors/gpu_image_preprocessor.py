"""A Det3DDataPreprocessor that does the image work of the loader workers on the device.

:class:`TurboxDet3DDataPreprocessor` extends mmdet3d's ``Det3DDataPreprocessor``; everything
it does not mention (points, voxelisation, padding metadata, boxes, batch augmentations) is
the stock code path. It adds three things:

1. **uint8 in, float on the device.** The pipeline stops before normalisation, so images cross
   PCIe as uint8 (4x fewer bytes than float32). The batch is stacked on the device and converted
   in one pass: channel conversion on uint8, then ``(x - mean) / std`` in float32, written
   straight into the (padded) output. These are the stock preprocessor's operations in the stock
   order, so the result is the same to the bit (and within 1e-6 of mmcv's ``imnormalize``, as a
   CPU ``NormalizeMultiviewImage`` computes it).
2. **Photometric distortion on the device** (``photometric=dict(...)``, training only): the
   operations of mmdet's ``PhotoMetricDistortion`` / Sparse4D's and BEVFormer's
   ``PhotoMetricDistortionMultiViewImage`` (brightness, contrast before or after the HSV step,
   saturation, hue, channel swap), applied to every image of the batch at once on BGR pixels
   in [0, 255] before normalisation. The HSV conversions follow OpenCV's float formulas. The
   random parameters are drawn per image from a CPU :class:`torch.Generator` (see
   :class:`PhotometricParams`); that stream differs from the numpy stream of the CPU transform,
   so the two agree in distribution, not draw by draw. With the same parameters the two agree
   to 1e-3 (``tests/test_gpu_preprocessor.py``).
3. **Deferred JPEG decoding.** When the batch carries the compressed bytes of each camera (see
   :mod:`turbox_mm.datasets.transforms.pack_jpeg_bytes`), the whole batch is decoded in one call
   with nvJPEG (``torchvision.io.decode_jpeg(list, device='cuda')`` or NVIDIA's
   ``nvidia.nvimgcodec``) and warped to the output size as the CPU ``MultiViewAffineAug``
   warps: where the warp shrinks by 2 or more (Sparse4D's about 2.2) the source is first
   block-averaged by 2 (4, 8; ``avg_pool2d``, rounded as the CPU's uint8 block average) and
   the warp re-targeted to it, against aliasing; then ``grid_sample`` (bilinear, zero border:
   OpenCV's ``warpAffine`` with ``INTER_LINEAR | WARP_INVERSE_MAP`` and ``BORDER_CONSTANT``
   0), rounded to uint8; samples outside the valid box (the crop, which the rotation turns:
   the black corners of the stock PIL rotate) are zeroed with the CPU transform's rounding;
   the channels are put in BGR order. That is what the CPU ``LoadMultiViewImagesTurbo`` +
   ``MultiViewAffineAug`` produce, up to interpolation rounding (measured on Sparse4D's
   augmentation: mean below 0.1 grey level, 99th percentile 1) and decoder differences (none
   for 4:4:4 JPEGs; chroma upsampling for 4:2:0). From there on it is the uint8 path above.
   Without CUDA, without a GPU decoder or when the GPU decoder fails, the batch is decoded
   with OpenCV and warped in the main process after one warning: slow, but the CPU
   transform's operations, so its pixels. ``decode_backend`` (or the environment variable
   ``TURBOX_DECODE_BACKEND``) picks a backend explicitly; an explicit GPU backend that cannot
   run raises instead of falling back.

Deferred data contract (per sample, as ``PackJpegBytes`` packs it; mmengine's
``pseudo_collate`` turns each key into a list over the batch, numpy arrays untouched, and
``cast_data`` leaves numpy arrays on the host, which is what nvJPEG wants)::

    inputs['img_bytes']          np.uint8  [total]   the N JPEG streams, concatenated
    inputs['img_bytes_offsets']  np.int64  [N + 1]   camera i is img_bytes[off[i]:off[i + 1]]
    inputs['img_warp']           np.float32 [N, 3, 3] (multi-view) or [3, 3] (single view):
                                 OUTPUT pixel (x, y, 1) -> SOURCE pixel, pixel centres at
                                 integer coordinates (cv2.warpAffine with WARP_INVERSE_MAP)
    inputs['img_warp_size']      np.int64  [2]       output (H, W)
    inputs['img_valid_box']      np.float32 [N, 4] or [4], optional: (x0, y0, x1, y1) in
                                 SOURCE pixels; a sample at (x_src, y_src) is kept iff
                                 x0 <= x_src < x1 and y0 <= y_src < y1, else 0 (absent: all
                                 kept; see MultiViewAffineAug's deferred mode)

The decoded batch replaces them as ``inputs['img']`` (uint8 [N, 3, H, W] or [3, H, W] per
sample, BGR), so padding metadata and everything after it is the stock code's.

CUDA streams: nvJPEG's hardware engine does not order its writes after work already queued on
the stream it is given (pytorch/vision#9606, meta-pytorch/torchcodec#1634), so a decoder handed
memory that queued kernels still read can overwrite it. Decoding therefore runs on a private
stream that is drained (a host wait for our own previous decode and warp only, never the
training stream) before each decode; the warped output is handed to the caller's stream with
``wait_stream`` and ``record_stream``.

Examples:
    >>> import torch
    >>> pre = TurboxDet3DDataPreprocessor(mean=[123.675, 116.28, 103.53],
    ...                                   std=[58.395, 57.12, 57.375], bgr_to_rgb=True)
    >>> imgs = torch.randint(0, 256, (6, 3, 32, 48), dtype=torch.uint8)
    >>> out = pre(dict(inputs=dict(img=[imgs, imgs.clone()])))
    >>> tuple(out['inputs']['imgs'].shape), out['inputs']['imgs'].dtype
    ((2, 6, 3, 32, 48), torch.float32)
"""
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from mmdet3d.models.data_preprocessors import Det3DDataPreprocessor
from mmdet3d.models.data_preprocessors.utils import multiview_img_stack_batch
from mmengine.model import stack_batch
from torch import Tensor

from turbox_mm.datasets.transforms.load_multiview_images import block_average
from turbox_mm.datasets.transforms.multiview_affine_aug import block_factor, decoded_warp
from turbox_mm.registry import MODELS

__all__ = [
    'TurboxDet3DDataPreprocessor', 'PhotometricParams', 'bgr_to_hsv', 'hsv_to_bgr',
    'apply_photometric', 'warp_to_theta', 'block_average_tensor', 'valid_box_matrix',
    'valid_mask', 'DEFERRED_KEYS', 'OPTIONAL_DEFERRED_KEYS', 'DECODE_BACKENDS'
]

#: The keys of ``inputs`` that carry a deferred-decode batch.
DEFERRED_KEYS = ('img_bytes', 'img_bytes_offsets', 'img_warp', 'img_warp_size')
#: The keys of ``inputs`` that a deferred-decode batch may carry besides.
OPTIONAL_DEFERRED_KEYS = ('img_valid_box', )
#: Valid values of ``decode_backend``.
DECODE_BACKENDS = ('auto', 'torchvision', 'nvimgcodec', 'cv2')
#: Set to one of :data:`DECODE_BACKENDS` to override ``decode_backend`` (e.g. ``cv2`` to debug).
DECODE_BACKEND_ENV = 'TURBOX_DECODE_BACKEND'

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
    scale = 60.0 / (diff + _FLT_EPSILON)
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

    def to(self, device: Union[str, torch.device]) -> 'PhotometricParams':
        """The same parameters on ``device``, moved in one copy."""
        packed = torch.cat([getattr(self, k).float().reshape(-1, 1) for k in self._FLOAT_FIELDS]
                           + [self.perm.float()], dim=1).to(device, non_blocking=True)
        values = dict(zip(self._FLOAT_FIELDS, packed[:, :5].unbind(1)))
        return PhotometricParams(perm=packed[:, 5:].long(), saturation_clip=self.saturation_clip,
                                 **values)

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


# -- deferred decode: warps -------------------------------------------------------------------

def warp_to_theta(warp: np.ndarray, src_hw: Tuple[int, int],
                  out_hw: Tuple[int, int]) -> np.ndarray:
    """The ``affine_grid`` matrix (``align_corners=True``) of a pixel-space inverse warp.

    ``theta = to_src_norm @ warp @ from_out_norm``: normalised output coordinates to output
    pixels (``(u + 1) / 2 * (W - 1)``), the warp to source pixels, then to normalised source
    coordinates, so that ``grid_sample(..., align_corners=True)`` samples where
    ``cv2.warpAffine(..., flags=WARP_INVERSE_MAP)`` does.

    Args:
        warp (np.ndarray): ``[3, 3]`` or ``[K, 3, 3]``, output pixel -> source pixel.
        src_hw (tuple[int, int]): Source (H, W), both at least 2.
        out_hw (tuple[int, int]): Output (H, W).

    Returns:
        np.ndarray: ``[2, 3]`` or ``[K, 2, 3]`` float64.
    """
    hs, ws = src_hw
    ho, wo = out_hw
    if hs < 2 or ws < 2:
        raise ValueError(f'deferred decode: source images must be at least 2x2, got {src_hw}')
    to_src = np.array([[2.0 / (ws - 1), 0, -1], [0, 2.0 / (hs - 1), -1], [0, 0, 1]])
    from_out = np.array([[(wo - 1) / 2.0, 0, (wo - 1) / 2.0], [0, (ho - 1) / 2.0, (ho - 1) / 2.0],
                         [0, 0, 1]])
    return (to_src @ np.asarray(warp, dtype=np.float64) @ from_out)[..., :2, :]


def block_average_tensor(src: Tensor, factor: int) -> Tensor:
    """:func:`~turbox_mm.datasets.transforms.load_multiview_images.block_average` on a batch.

    The last row and column of blocks are completed by repeating the edge, then each
    ``factor x factor`` block is averaged (``avg_pool2d``; exact in float32, the sums being
    small integers and the divisor a power of two) and rounded to an integer as OpenCV's
    ``INTER_AREA`` rounds uint8: half up for 2x2 blocks (its vectorised path), half to even
    for larger ones. So the result equals the CPU transform's uint8 block average, as floats.

    Args:
        src (Tensor): ``[K, C, H, W]`` float32 holding uint8 values.
        factor (int): Block size (2, 4 or 8).

    Returns:
        Tensor: ``[K, C, ceil(H / factor), ceil(W / factor)]`` float32.
    """
    h, w = src.shape[-2:]
    pad_h, pad_w = -h % factor, -w % factor
    if pad_h or pad_w:
        src = F.pad(src, (0, pad_w, 0, pad_h), mode='replicate')
    out = F.avg_pool2d(src, factor, factor)
    return out.add_(0.5).floor_() if factor == 2 else out.round_()


def valid_box_matrix(warp: np.ndarray, box: Sequence[float],
                     out_hw: Tuple[int, int]) -> Optional[np.ndarray]:
    """Output pixel -> index in the valid box resampled to the output grid; None if all valid.

    The deferred contract keeps a sample at source position ``(x, y) = warp @ [u, v, 1]``
    iff ``x0 <= x < x1 and y0 <= y < y1`` (``box``). With ``s = W / (x1 - x0)``, the box
    index ``q = s (x - x0) - 1/2`` (likewise in y) rounds to ``0 .. W - 1`` exactly there,
    so the test is the one that the CPU transform makes by warping a ones image with
    nearest-neighbour sampling (:func:`~turbox_mm.datasets.transforms.multiview_affine_aug.
    rotation_mask`): for the warps of ``MultiViewAffineAug`` (box = the crop, output size =
    the crop size), ``q`` is the index in the flipped crop that it rounds, and the returned
    matrix is its matrix up to the float32 rounding of the packed warp. Counting from the
    right where the warp mirrors (``det < 0``) reproduces the flipped crop.

    Args:
        warp (np.ndarray): ``[3, 3]`` output pixel -> full-resolution source pixel.
        box (sequence[float]): ``(x0, y0, x1, y1)`` in source pixels.
        out_hw (tuple[int, int]): Output (H, W).

    Returns:
        np.ndarray or None: ``[2, 3]`` float64, or None when every sample is kept: the four
        output corners lie inside the box by more than 0.01 pixel (far beyond OpenCV's
        rounding to 1/1024 pixel).
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    h, w = out_hw
    sx, sy = w / (x1 - x0), h / (y1 - y0)
    warp = np.asarray(warp, dtype=np.float64)
    if warp[0, 0] * warp[1, 1] - warp[0, 1] * warp[1, 0] < 0:
        to_box = np.array([[-sx, 0.0, sx * x0 + w - 0.5], [0.0, sy, -sy * y0 - 0.5]])
    else:
        to_box = np.array([[sx, 0.0, -sx * x0 - 0.5], [0.0, sy, -sy * y0 - 0.5]])
    matrix = to_box @ warp
    corners = matrix @ np.array([[0, w - 1, 0, w - 1], [0, 0, h - 1, h - 1], [1, 1, 1, 1]])
    margin = 0.01
    if ((corners >= -0.5 + margin) & (corners <= np.array([[w], [h]]) - 0.5 - margin)).all():
        return None
    return matrix


def valid_mask(matrices: np.ndarray, out_hw: Tuple[int, int],
               device: Union[str, torch.device]) -> Tensor:
    """Nearest-neighbour "inside" test of :func:`valid_box_matrix`, as OpenCV computes it.

    ``cv2.warpAffine(ones, matrix, INTER_NEAREST | WARP_INVERSE_MAP)`` rounds in fixed point
    with 10 fractional bits: ``X = (round(m00 u 1024) + round((m01 v + m02) 1024) + 512)
    >> 10`` (``round`` half to even), likewise ``Y``, and reads 1 iff ``0 <= X < W`` and
    ``0 <= Y < H``. The same integers are computed here in float64 (exactly), so the mask
    is OpenCV's for the same matrix to the pixel, at the box edge too. Against the CPU
    transform's mask (computed from the float64 augmentation parameters) only the float32
    rounding of the packed warp and box remains: a pixel whose centre lies within about
    1e-4 pixel of the edge may round the other way, measured once in 400 Sparse4D images
    (a plain float comparison with the box: 199 pixels).

    Args:
        matrices (np.ndarray): ``[K, 2, 3]`` from :func:`valid_box_matrix`.
        out_hw (tuple[int, int]): Output (H, W), also the box grid's size.
        device (str or torch.device): Where to compute.

    Returns:
        Tensor: ``[K, H, W]`` bool, True where the sample is kept.
    """
    h, w = out_hw
    m = torch.as_tensor(np.asarray(matrices, dtype=np.float64), device=device)
    scale = 1024.0
    cols = torch.arange(w, dtype=torch.float64, device=device)
    rows = torch.arange(h, dtype=torch.float64, device=device)

    def index(k):  # k = 0 for X, 1 for Y: [K, H, W] integer-valued float64
        per_col = torch.round(m[:, k, 0, None] * cols * scale)
        per_row = torch.round((m[:, k, 1, None] * rows + m[:, k, 2, None]) * scale) + 512
        return torch.floor((per_row[:, :, None] + per_col[:, None, :]) / scale)

    x, y = index(0), index(1)
    return (x >= 0) & (x < w) & (y >= 0) & (y < h)


def _valid_mask_cv2(matrix: np.ndarray, out_hw: Tuple[int, int]) -> np.ndarray:
    """:func:`valid_mask` of one image with OpenCV itself (the CPU transform's call)."""
    import cv2
    h, w = out_hw
    return cv2.warpAffine(np.ones((h, w), np.uint8), matrix, (w, h),
                          flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _warp_on_device(decoded: List[Tensor], warps: List[np.ndarray],
                    out_sizes: List[Tuple[int, int]], rgb: bool,
                    boxes: Optional[List[Optional[np.ndarray]]] = None,
                    chunk: int = 6) -> List[Tensor]:
    """Bilinear warp of decoded uint8 CHW images, batched by (source size, block, output size).

    As the CPU ``MultiViewAffineAug``: where the warp shrinks by 2 or more the source is
    block-averaged first (:func:`block_average_tensor`, block size from
    :func:`~turbox_mm.datasets.transforms.multiview_affine_aug.block_factor`) and sampled
    with the warp re-targeted to it (``decoded_warp``); samples outside each image's valid
    box (``boxes[i]``, None for none) are zeroed (:func:`valid_mask`). ``grid_sample`` reads
    float, so each source image is converted first; at most ``chunk`` images at a time (6 x
    1600x900 float32 is 104 MB) bound that temporary memory.

    Returns one uint8 BGR ``[3, H, W]`` tensor per image, rounded half up as OpenCV rounds.
    """
    device = decoded[0].device
    boxes = boxes if boxes is not None else [None] * len(decoded)
    factors = [block_factor(warp) for warp in warps]
    groups: Dict[Tuple, List[List[int]]] = {}
    for i, (img, size) in enumerate(zip(decoded, out_sizes)):
        key = (tuple(img.shape[-2:]), factors[i], tuple(size))
        members = groups.setdefault(key, [[]])
        if len(members[-1]) == chunk:
            members.append([])
        members[-1].append(i)
    results: List[Optional[Tensor]] = [None] * len(decoded)
    for (src_hw, factor, out_hw), index in ((k, i) for k, chunks in groups.items()
                                            for i in chunks):
        src = torch.empty((len(index), 3, *src_hw), dtype=torch.float32, device=device)
        for k, i in enumerate(index):
            src[k].copy_(decoded[i])
        if factor > 1:
            src = block_average_tensor(src, factor)
        theta = np.stack([warp_to_theta(decoded_warp(warps[i], factor), src.shape[-2:], out_hw)
                          for i in index])
        theta = torch.from_numpy(theta).float().to(device, non_blocking=True)
        grid = F.affine_grid(theta, [len(index), 3, *out_hw], align_corners=True)
        out = F.grid_sample(src, grid, mode='bilinear', padding_mode='zeros',
                            align_corners=True)
        out = out.add_(0.5).floor_().clamp_(0, 255).to(torch.uint8)
        if rgb:
            out = out.flip(1)
        matrices = {k: valid_box_matrix(warps[i], boxes[i], out_hw)
                    for k, i in enumerate(index) if boxes[i] is not None}
        matrices = {k: m for k, m in matrices.items() if m is not None}
        if matrices:
            keep = torch.ones((len(index), *out_hw), dtype=torch.bool, device=device)
            keep[list(matrices)] = valid_mask(np.stack(list(matrices.values())), out_hw, device)
            out.mul_(keep[:, None])
        for k, i in enumerate(index):
            results[i] = out[k]
    return results


def _decode_warp_cv2(streams: List[np.ndarray], warps: List[np.ndarray],
                     out_sizes: List[Tuple[int, int]],
                     boxes: Optional[List[Optional[np.ndarray]]] = None) -> List[Tensor]:
    """OpenCV decode (BGR, EXIF orientation ignored) and warp, one image at a time.

    The CPU ``MultiViewAffineAug``'s operations: block average where the warp shrinks by 2
    or more, ``cv2.warpAffine`` with the re-targeted warp, and the valid box's mask made by
    warping a ones image (:func:`valid_box_matrix`), so that the result equals that
    transform's on the same decoded pixels.
    """
    import cv2
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    boxes = boxes if boxes is not None else [None] * len(streams)
    results = []
    for i, (stream, warp, (h, w), box) in enumerate(zip(streams, warps, out_sizes, boxes)):
        img = cv2.imdecode(stream, flags)
        if img is None:
            raise ValueError(f'deferred decode: image {i} of the batch is not a decodable '
                             f'JPEG ({stream.size} bytes)')
        factor = block_factor(warp)
        if factor > 1:
            img = block_average(img, factor)
        out = cv2.warpAffine(img, decoded_warp(warp, factor)[:2], (int(w), int(h)),
                             flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        matrix = None if box is None else valid_box_matrix(warp, box, (int(h), int(w)))
        if matrix is not None:
            out *= _valid_mask_cv2(matrix, (int(h), int(w)))[..., None]
        results.append(torch.from_numpy(out).permute(2, 0, 1))
    return results


def _torchvision_decoder():
    """``torchvision.io.decode_jpeg`` if it decodes batches on CUDA (torchvision >= 0.19)."""
    try:
        import torchvision
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception:  # ImportError, or a torchvision built for another torch
        return None
    version = tuple(int(p) for p in torchvision.__version__.split('+')[0].split('.')[:2]
                    if p.isdigit())
    if version < (0, 19):
        return None
    return lambda tensors, device: decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)


def _nvimgcodec_module():
    try:
        from nvidia import nvimgcodec
    except Exception:
        return None
    return nvimgcodec


# -- the preprocessor -------------------------------------------------------------------------

@MODELS.register_module()
class TurboxDet3DDataPreprocessor(Det3DDataPreprocessor):
    """``Det3DDataPreprocessor`` with uint8 inputs, device-side photometric distortion and
    deferred (nvJPEG) decoding. See the module docstring for the data contract.

    Args:
        photometric (dict, optional): Photometric distortion applied in training, with keys
            ``brightness_delta`` (32), ``contrast_range`` ((0.5, 1.5)), ``saturation_range``
            ((0.5, 1.5)), ``hue_delta`` (18), ``prob`` (0.5: each op's probability),
            ``saturation_clip`` (False; True for mmdet 3's clipping) and ``seed`` (None: drawn
            once from torch's global generator, which the runner seeds). Each rank adds
            ``1_000_003 * rank`` to the seed. Defaults to None (off).
        decode_backend (str): ``'auto'`` (nvJPEG through torchvision, else nvimgcodec, else
            OpenCV with one warning), ``'torchvision'``, ``'nvimgcodec'`` or ``'cv2'``.
            Defaults to 'auto'.
        **kwargs: ``Det3DDataPreprocessor``'s arguments (``mean``, ``std``, ``bgr_to_rgb``,
            ``pad_size_divisor``, ``voxel``, ...).

    Attributes:
        decode_counts (Counter): Images decoded so far, by backend.
        last_decode_backend (str or None): The backend of the latest deferred batch.
    """

    _PHOTOMETRIC_DEFAULTS = dict(brightness_delta=32, contrast_range=(0.5, 1.5),
                                 saturation_range=(0.5, 1.5), hue_delta=18, prob=0.5,
                                 saturation_clip=False, seed=None)

    def __init__(self, photometric: Optional[dict] = None, decode_backend: str = 'auto',
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.photometric = self._check_photometric(photometric)
        if decode_backend not in DECODE_BACKENDS:
            raise ValueError(f'decode_backend must be one of {DECODE_BACKENDS}, got '
                             f'{decode_backend!r}')
        self.decode_backend = decode_backend
        self.decode_counts: Counter = Counter()
        self.last_decode_backend: Optional[str] = None
        self._generator: Optional[torch.Generator] = None
        self._augment = False
        self._backend: Optional[str] = None
        self._warned = False
        self._decode_stream = None
        self._nvimgcodec_decoder = None
        self._keepalive = None

    # Handles of the device and of native libraries: rebuilt on first use, never copied (the
    # EMA hook deep-copies the model, data preprocessor included).
    _RUNTIME_STATE = ('_decode_stream', '_nvimgcodec_decoder', '_keepalive')

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update({k: None for k in self._RUNTIME_STATE})
        return state

    # -- configuration ------------------------------------------------------------------------

    @classmethod
    def _check_photometric(cls, cfg: Optional[dict]) -> Optional[dict]:
        if cfg is None:
            return None
        unknown = sorted(set(cfg) - set(cls._PHOTOMETRIC_DEFAULTS))
        if unknown:
            raise ValueError(f'photometric: unknown keys {unknown}; valid keys: '
                             f'{sorted(cls._PHOTOMETRIC_DEFAULTS)}')
        full = {**cls._PHOTOMETRIC_DEFAULTS, **cfg}
        if not 0 <= full['prob'] <= 1:
            raise ValueError(f"photometric: prob must be in [0, 1], got {full['prob']}")
        for key in ('contrast_range', 'saturation_range'):
            lo, hi = full[key]
            if lo > hi:
                raise ValueError(f'photometric: {key} must be (low, high), got {full[key]}')
        return full

    def photometric_generator(self) -> torch.Generator:
        """The CPU generator of the photometric draws, seeded on first use."""
        if self._generator is None:
            seed = self.photometric['seed']
            if seed is None:
                seed = int(torch.randint(0, 2**31 - 1, (1, )).item())
            from mmengine.dist import get_rank
            self._generator = torch.Generator().manual_seed(int(seed) + 1_000_003 * get_rank())
        return self._generator

    # -- entry points -------------------------------------------------------------------------

    def simple_process(self, data: dict, training: bool = False) -> dict:
        """Decode a deferred batch if there is one, then the stock processing (which calls
        :meth:`collate_data`), with photometric distortion when ``training``."""
        inputs = data.get('inputs') if isinstance(data, dict) else None
        if isinstance(inputs, dict) and any(k in inputs for k in DEFERRED_KEYS):
            data = self._decode_deferred(data)
        self._augment = bool(training and self.photometric is not None)
        try:
            return super().simple_process(data, training)
        finally:
            self._augment = False

    def collate_data(self, data: dict) -> dict:
        """Copy to the device, then stack, convert, distort, normalise and pad the images in
        one batch (per sample where sizes differ, padded by the stock stacking functions)."""
        data = self.cast_data(data)
        imgs = data['inputs'].get('img')
        if imgs is None:
            return super().collate_data(data)
        if isinstance(imgs, Tensor):
            if imgs.dim() != 4:
                raise ValueError('TurboxDet3DDataPreprocessor: a collated image batch must be '
                                 f'[B, C, H, W], got {tuple(imgs.shape)}')
            self._check_channels(imgs.shape)
            batch_imgs = self._process(imgs)
        elif isinstance(imgs, (list, tuple)) and imgs and all(
                isinstance(i, Tensor) for i in imgs):
            batch_imgs = self._process_list(list(imgs))
        else:
            raise TypeError('TurboxDet3DDataPreprocessor: inputs["img"] must be a tensor or a '
                            f'non-empty list of tensors, got {type(imgs).__name__}')
        data['inputs']['imgs'] = batch_imgs
        data.setdefault('data_samples', None)
        return data

    # -- images -------------------------------------------------------------------------------

    def _check_channels(self, shape) -> None:
        channels = shape[-3]
        if channels == 3:
            return
        needs_three = (self._channel_conversion or self.photometric is not None
                       or (self._enable_normalize and self.mean.shape[0] == 3))
        if needs_three:
            raise ValueError('TurboxDet3DDataPreprocessor: images must have 3 channels at dim '
                             f'-3 (for bgr_to_rgb, 3-value mean/std or photometric), got shape '
                             f'{tuple(shape)}')

    def _process_list(self, imgs: List[Tensor]) -> Tensor:
        dims = {i.dim() for i in imgs}
        if len(dims) != 1 or dims.pop() not in (3, 4):
            raise ValueError('TurboxDet3DDataPreprocessor: every sample must be [C, H, W] '
                             '(single view) or [N, C, H, W] (multi-view), got shapes '
                             f'{[tuple(i.shape) for i in imgs]}')
        multiview = imgs[0].dim() == 4
        if multiview and len({i.shape[0] for i in imgs}) != 1:
            raise ValueError('TurboxDet3DDataPreprocessor: samples have different numbers of '
                             f'views: {[i.shape[0] for i in imgs]}')
        if len({i.shape[-3] for i in imgs}) != 1:
            raise ValueError('TurboxDet3DDataPreprocessor: samples have different numbers of '
                             f'channels: {[tuple(i.shape) for i in imgs]}')
        for img in imgs:
            self._check_channels(img.shape)
        if len({tuple(i.shape) for i in imgs}) == 1:
            return self._process(torch.stack(imgs))
        # Mixed image sizes: process per sample, pad and stack as the stock code does.
        processed = [self._process(img[None])[0] for img in imgs]
        if multiview:
            return multiview_img_stack_batch(processed, self.pad_size_divisor, self.pad_value)
        return stack_batch(processed, self.pad_size_divisor, self.pad_value)

    def _process(self, batch: Tensor) -> Tensor:
        """``[B, (N,) C, H, W]`` of any dtype -> float32, distorted, converted, normalised, padded
        to ``pad_size_divisor``."""
        if self._augment:
            flat = batch.reshape(-1, *batch.shape[-3:])
            x = flat.to(torch.float32, copy=True)
            params = PhotometricParams.sample(
                x.shape[0], self.photometric_generator(),
                **{k: v for k, v in self.photometric.items() if k != 'seed'})
            x = apply_photometric(x, params.to(x.device), params.active())
            batch = x.reshape(batch.shape)
        elif batch.dtype not in (torch.uint8, torch.float32):
            batch = batch.float()
        if self._channel_conversion:
            batch = batch[..., [2, 1, 0], :, :]
        h, w = batch.shape[-2:]
        div = self.pad_size_divisor
        ph, pw = -(-h // div) * div, -(-w // div) * div
        shape = (*batch.shape[:-2], ph, pw)
        if (ph, pw) == (h, w):
            out = torch.empty(shape, dtype=torch.float32, device=batch.device)
            view = out
        else:
            out = torch.full(shape, float(self.pad_value), dtype=torch.float32,
                             device=batch.device)
            view = out[..., :h, :w]
        if self._enable_normalize:
            torch.sub(batch, self.mean, out=view)
            view.div_(self.std)
        else:
            view.copy_(batch)
        return out

    # -- deferred decode ----------------------------------------------------------------------

    def _decode_deferred(self, data: dict) -> dict:
        inputs = dict(data['inputs'])
        missing = [k for k in DEFERRED_KEYS if k not in inputs]
        if missing:
            present = [k for k in DEFERRED_KEYS if k in inputs]
            raise KeyError(f'deferred decode: inputs has {present} but lacks {missing}; pack '
                           'the batch with turbox_mm.PackJpegBytes')
        if 'img' in inputs:
            raise ValueError('deferred decode: a batch carries both decoded images ("img") and '
                             'JPEG bytes ("img_bytes"); the pipeline must produce one of them')
        columns = [inputs.pop(k) for k in DEFERRED_KEYS]
        box_column = inputs.pop(OPTIONAL_DEFERRED_KEYS[0], None)
        if box_column is not None:
            columns.append(box_column)
        if not all(isinstance(c, (list, tuple)) for c in columns) or \
                len({len(c) for c in columns}) != 1:
            raise ValueError('deferred decode: img_bytes, img_bytes_offsets, img_warp, '
                             'img_warp_size (and img_valid_box) must be lists of one entry per '
                             "sample (as pseudo_collate makes them), got "
                             f'{[type(c).__name__ for c in columns]}')
        if box_column is None:
            box_column = [None] * len(columns[0])
        streams, warps, sizes, boxes, counts, single = [], [], [], [], [], []
        for b, (buf, offsets, warp, size, box) in enumerate(zip(*columns[:4], box_column)):
            buf, offsets = _host_array(buf, np.uint8), _host_array(offsets, np.int64)
            warp, size = _host_array(warp, np.float64), _host_array(size, np.int64)
            single.append(warp.ndim == 2)
            warp = warp.reshape(-1, 3, 3) if warp.ndim in (2, 3) else warp
            n = offsets.size - 1
            if buf.ndim != 1 or offsets.ndim != 1 or n < 1 or warp.shape != (n, 3, 3) or \
                    size.shape != (2, ) or (size < 1).any():
                raise ValueError(f'deferred decode: sample {b} has img_bytes {buf.shape}, '
                                 f'offsets {offsets.shape}, img_warp {warp.shape} and '
                                 f'img_warp_size {size.tolist()}; expected [total], [N + 1], '
                                 '[N, 3, 3] (or [3, 3]) and (H, W)')
            if offsets[0] != 0 or offsets[-1] != buf.size or (np.diff(offsets) <= 0).any():
                raise ValueError(f'deferred decode: sample {b} has offsets {offsets.tolist()} '
                                 f'that do not split its {buf.size} bytes')
            if not np.allclose(warp[:, 2], [0, 0, 1], atol=1e-6):
                raise ValueError(f'deferred decode: sample {b} has a non-affine img_warp (last '
                                 f'row {warp[:, 2].tolist()})')
            if box is not None:
                box = _host_array(box, np.float64)
                box = box.reshape(-1, 4) if box.ndim in (1, 2) else box
                if box.shape != (n, 4) or not np.isfinite(box).all() or \
                        (box[:, 2] <= box[:, 0]).any() or (box[:, 3] <= box[:, 1]).any():
                    raise ValueError(f'deferred decode: sample {b} has img_valid_box '
                                     f'{box.tolist()}; expected {n} boxes (x0, y0, x1, y1) '
                                     'with x0 < x1 and y0 < y1')
            streams += [buf[offsets[i]:offsets[i + 1]] for i in range(n)]
            warps += list(warp)
            boxes += [None] * n if box is None else list(box)
            sizes += [tuple(int(s) for s in size)] * n
            counts.append(n)
        if len(set(single)) != 1:
            raise ValueError('deferred decode: the batch mixes single-view ([3, 3] img_warp) and '
                             'multi-view ([N, 3, 3]) samples')
        decoded = self._decode(streams, warps, sizes, boxes)
        per_sample, start = [], 0
        for n in counts:
            views = decoded[start:start + n]
            start += n
            if single[0]:
                per_sample.append(views[0])
            elif len({tuple(v.shape) for v in views}) != 1:
                raise ValueError('deferred decode: the views of one sample have different '
                                 f'output sizes {[tuple(v.shape) for v in views]}')
            else:
                per_sample.append(torch.stack(views))
        inputs['img'] = per_sample
        return {**data, 'inputs': inputs}

    def _resolve_backend(self) -> str:
        if self._backend is not None:
            return self._backend
        choice = os.environ.get(DECODE_BACKEND_ENV) or self.decode_backend
        if choice not in DECODE_BACKENDS:
            raise ValueError(f'{DECODE_BACKEND_ENV}={choice!r}: must be one of '
                             f'{DECODE_BACKENDS}')
        on_cuda = self.device.type == 'cuda' and torch.cuda.is_available()
        available = dict(torchvision=on_cuda and _torchvision_decoder() is not None,
                         nvimgcodec=on_cuda and _nvimgcodec_module() is not None)
        if choice in available and not available[choice]:
            raise RuntimeError(
                f'deferred decode: decode_backend={choice!r} needs a CUDA device and '
                f"{'torchvision >= 0.19' if choice == 'torchvision' else 'nvidia-nvimgcodec'}; "
                f'the preprocessor is on {self.device}. Use decode_backend="auto" to fall back '
                'to OpenCV.')
        if choice == 'auto':
            choice = next((k for k, ok in available.items() if ok), None)
            if choice is None:
                self._warn('no GPU JPEG decoder (needs CUDA and torchvision >= 0.19 or '
                           f'nvidia-nvimgcodec; device is {self.device})')
                choice = 'cv2'
        self._backend = choice
        return choice

    def _warn(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f'TurboxDet3DDataPreprocessor: {why}; decoding JPEG batches with '
                          'OpenCV in the main process instead (correct but slow).',
                          stacklevel=3)

    def _decode(self, streams: List[np.ndarray], warps: List[np.ndarray],
                sizes: List[Tuple[int, int]],
                boxes: Optional[List[Optional[np.ndarray]]] = None) -> List[Tensor]:
        """Decode and warp the images of a batch (``boxes``: valid boxes, None for none)."""
        backend = self._resolve_backend()
        if backend != 'cv2':
            try:
                out = self._decode_gpu(backend, streams, warps, sizes, boxes)
            except Exception as error:
                if (os.environ.get(DECODE_BACKEND_ENV) or self.decode_backend) != 'auto':
                    raise
                self._warn(f'the {backend} GPU decoder failed ({type(error).__name__}: {error})')
                self._backend = backend = 'cv2'
            else:
                self.decode_counts[backend] += len(streams)
                self.last_decode_backend = backend
                return out
        out = [img.to(self.device) for img in _decode_warp_cv2(streams, warps, sizes, boxes)]
        self.decode_counts['cv2'] += len(streams)
        self.last_decode_backend = 'cv2'
        return out

    def _decode_gpu(self, backend: str, streams: List[np.ndarray], warps: List[np.ndarray],
                    sizes: List[Tuple[int, int]],
                    boxes: Optional[List[Optional[np.ndarray]]] = None) -> List[Tensor]:
        """Decode and warp on the private decode stream; hand the output to the caller's."""
        device = self.device
        if device.type != 'cuda':  # only with a stand-in decoder (the CPU tests)
            return self._decode_and_warp(backend, streams, warps, sizes, boxes,
                                         cuda_stream=0)
        if self._decode_stream is None:
            self._decode_stream = torch.cuda.Stream(device=device)
        stream = self._decode_stream
        current = torch.cuda.current_stream(device)
        # Our own previous decode and warp only: nvJPEG's engine ignores stream order.
        stream.synchronize()
        self._keepalive = None
        with torch.cuda.stream(stream):
            out = self._decode_and_warp(backend, streams, warps, sizes, boxes,
                                        stream.cuda_stream)
        current.wait_stream(stream)
        for img in out:
            img.record_stream(current)
        return out

    def _decode_and_warp(self, backend: str, streams: List[np.ndarray],
                         warps: List[np.ndarray], sizes: List[Tuple[int, int]],
                         boxes: Optional[List[Optional[np.ndarray]]],
                         cuda_stream: int) -> List[Tensor]:
        device = self.device
        if backend == 'torchvision':
            decode = _torchvision_decoder()
            decoded = decode([torch.from_numpy(s) for s in streams], device)
        else:
            if self._nvimgcodec_decoder is None:
                index = device.index if device.index is not None else (
                    torch.cuda.current_device() if device.type == 'cuda' else 0)
                self._nvimgcodec_decoder = _nvimgcodec_module().Decoder(device_id=index)
            images = self._nvimgcodec_decoder.decode(streams, cuda_stream=cuda_stream)
            bad = [i for i, img in enumerate(images) if img is None]
            if bad or len(images) != len(streams):
                raise RuntimeError(f'nvimgcodec could not decode images {bad} of '
                                   f'{len(streams)}')
            decoded = [torch.from_dlpack(img).permute(2, 0, 1) for img in images]
            # nvimgcodec owns that memory: keep it until the decode stream has read it.
            self._keepalive = images
        bad = [tuple(d.shape) for d in decoded if d.dim() != 3 or d.shape[0] != 3]
        if bad:
            raise RuntimeError(f'the {backend} decoder returned non-RGB images of shapes {bad}')
        return _warp_on_device(decoded, warps, sizes, rgb=True, boxes=boxes)


def _host_array(value, dtype) -> np.ndarray:
    """A numpy array on the host from a numpy array, tensor, sequence or bytes-like value."""
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    elif isinstance(value, (bytes, bytearray, memoryview)):
        value = np.frombuffer(value, dtype=np.uint8)
    array = np.asarray(value)
    if array.dtype != dtype:
        array = array.astype(dtype)
    if dtype == np.uint8 and not array.flags.writeable:
        array = array.copy()  # torch.from_numpy warns on read-only buffers
    return array
