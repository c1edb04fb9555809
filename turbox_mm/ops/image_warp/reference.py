"""The specification of the uint8 image warp in plain PyTorch (and its CPU path).

``warp_affine_u8(src, params, factor, out_hw, reverse_channels)`` produces, for each image
``k`` of ``src`` (``[K, 3, Hs, Ws]`` uint8) and each output pixel ``(u, v)``:

1. the block-averaged source ``B = block_average(src[k], factor)`` (:func:`block_average_tensor`:
   edge-replicated ``factor x factor`` means rounded as OpenCV's ``INTER_AREA`` rounds uint8;
   ``B = src[k]`` for ``factor == 1``);
2. ``(x, y) = W_k @ (u, v, 1)`` with ``W_k = params[k, 0:6]`` as a ``2 x 3`` matrix (output pixel
   -> pixel of ``B``, pixel centres at integers);
3. the bilinear sample of ``B`` at ``(x, y)`` with taps off ``B`` reading 0 (``grid_sample``
   with ``align_corners=True`` and zero padding; OpenCV's ``warpAffine`` with
   ``INTER_LINEAR | WARP_INVERSE_MAP`` and ``BORDER_CONSTANT`` 0), rounded half up and
   clamped to ``[0, 255]``;
4. zero where ``params[k, 12] != 0`` and the nearest-neighbour test of :func:`valid_mask`
   with ``M_k = params[k, 6:12]`` (output pixel -> index in the output-sized valid box) says
   the pixel lies outside;
5. the channels in reverse order if ``reverse_channels`` (RGB -> BGR).

The result is ``[K, 3, H, W]`` uint8. Not differentiable (integer images in and out).
"""
from typing import Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: Columns of ``params``: the sampling warp (6), the valid-box matrix (6), the mask flag (1).
NUM_PARAMS = 13
#: Images warped at a time by the reference (6 x 1600x900 float32 is 104 MB).
REFERENCE_CHUNK = 6


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
    """:func:`~turbox_mm.datasets.transforms.jpeg_utils.block_average` on a batch.

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


def valid_mask(matrices: Union[np.ndarray, Tensor], out_hw: Tuple[int, int],
               device: Union[str, torch.device]) -> Tensor:
    """Nearest-neighbour "inside" test of a valid box, as OpenCV computes it.

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
        matrices (np.ndarray or Tensor): ``[K, 2, 3]`` output pixel -> index in the box
            resampled to the output grid (see ``valid_box_matrix`` of the data preprocessor).
        out_hw (tuple[int, int]): Output (H, W), also the box grid's size.
        device (str or torch.device): Where to compute.

    Returns:
        Tensor: ``[K, H, W]`` bool, True where the sample is kept.
    """
    h, w = out_hw
    if isinstance(matrices, Tensor):
        m = matrices.to(device=device, dtype=torch.float64)
    else:
        m = torch.as_tensor(np.asarray(matrices, dtype=np.float64), device=device)
    m = m.reshape(-1, 2, 3)
    scale = 1024.0
    cols = torch.arange(w, dtype=torch.float64, device=device)
    rows = torch.arange(h, dtype=torch.float64, device=device)

    def index(k):  # k = 0 for X, 1 for Y: [K, H, W] integer-valued float64
        per_col = torch.round(m[:, k, 0, None] * cols * scale)
        per_row = torch.round((m[:, k, 1, None] * rows + m[:, k, 2, None]) * scale) + 512
        return torch.floor((per_row[:, :, None] + per_col[:, None, :]) / scale)

    x, y = index(0), index(1)
    return (x >= 0) & (x < w) & (y >= 0) & (y < h)


def pack_params(warps: Union[np.ndarray, Sequence[np.ndarray]],
                masks: Sequence[Union[np.ndarray, None]]) -> np.ndarray:
    """``params`` of :func:`warp_affine_u8_reference` from per-image matrices.

    Args:
        warps: ``K`` matrices ``[2, 3]`` (or ``[3, 3]``), output pixel -> pixel of the
            block-averaged source.
        masks: ``K`` valid-box matrices ``[2, 3]``, or None where every pixel is kept.

    Returns:
        np.ndarray: ``[K, 13]`` float64.
    """
    params = np.zeros((len(masks), NUM_PARAMS), dtype=np.float64)
    for k, (warp, mask) in enumerate(zip(warps, masks)):
        params[k, 0:6] = np.asarray(warp, dtype=np.float64)[:2].reshape(6)
        if mask is not None:
            params[k, 6:12] = np.asarray(mask, dtype=np.float64)[:2].reshape(6)
            params[k, 12] = 1.0
    return params


def warp_affine_u8_reference(src: Tensor, params: Tensor, factor: int, out_hw: Tuple[int, int],
                             reverse_channels: bool = False) -> Tensor:
    """The warp of the module docstring with ``avg_pool2d``, ``affine_grid`` and ``grid_sample``.

    Args:
        src (Tensor): ``[K, 3, Hs, Ws]`` uint8.
        params (Tensor): ``[K, 13]`` float64 (:func:`pack_params`).
        factor (int): Block size 1, 2, 4 or 8.
        out_hw (tuple[int, int]): Output (H, W).
        reverse_channels (bool): Reverse the channel order. Defaults to False.

    Returns:
        Tensor: ``[K, 3, H, W]`` uint8 on ``src.device``.
    """
    num, device = src.shape[0], src.device
    h, w = out_hw
    out = torch.empty((num, 3, h, w), dtype=torch.uint8, device=device)
    if num == 0 or h == 0 or w == 0:
        return out
    table = params.detach().to('cpu', torch.float64).numpy()
    for start in range(0, num, REFERENCE_CHUNK):
        stop = min(start + REFERENCE_CHUNK, num)
        x = src[start:stop].to(torch.float32)
        if factor > 1:
            x = block_average_tensor(x, factor)
        warp = np.zeros((stop - start, 3, 3))
        warp[:, :2] = table[start:stop, 0:6].reshape(-1, 2, 3)
        warp[:, 2, 2] = 1.0
        theta = torch.from_numpy(warp_to_theta(warp, x.shape[-2:], out_hw)).float().to(device)
        grid = F.affine_grid(theta, [stop - start, 3, h, w], align_corners=True)
        y = F.grid_sample(x, grid, mode='bilinear', padding_mode='zeros', align_corners=True)
        y = y.add_(0.5).floor_().clamp_(0, 255).to(torch.uint8)
        if reverse_channels:
            y = y.flip(1)
        flagged = np.flatnonzero(table[start:stop, 12] != 0)
        if flagged.size:
            keep = torch.ones((stop - start, h, w), dtype=torch.bool, device=device)
            keep[torch.as_tensor(flagged, device=device)] = valid_mask(
                table[start + flagged, 6:12].reshape(-1, 2, 3), out_hw, device)
            y.mul_(keep[:, None])
        out[start:stop] = y
    return out
