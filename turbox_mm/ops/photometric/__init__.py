"""Photometric distortion + channel conversion + normalisation of BGR camera images.

The device half of the image pipeline that ``TurboxDet3DDataPreprocessor`` takes over from
the loader workers (mmdet's ``PhotoMetricDistortion`` and ``Normalize`` on uint8 batches).

- :mod:`.reference`: the specification in plain PyTorch (:func:`apply_photometric` with
  OpenCV's float HSV formulas, :class:`PhotometricParams`) and the CPU path.
- :mod:`.triton_kernels`: one fused kernel, one read and one write of the batch.
- :mod:`.op`: ``torch.ops.turbox_mm.photometric_normalize`` with its fake implementation and
  the dispatch (CUDA tensors with Triton -> kernel; otherwise -> reference, with one warning).
"""
from torch import Tensor

from .op import fallback_reason, photometric_normalize_op
from .reference import (NUM_PARAMS, PhotometricParams, apply_photometric, bgr_to_hsv,
                        hsv_to_bgr, photometric_normalize_reference)

__all__ = [
    'photometric_normalize', 'photometric_normalize_reference', 'PhotometricParams',
    'apply_photometric', 'bgr_to_hsv', 'hsv_to_bgr', 'fallback_reason', 'NUM_PARAMS'
]


def photometric_normalize(imgs: Tensor, params: Tensor, mean: Tensor, std: Tensor,
                          saturation_clip: bool = False, reverse_channels: bool = False,
                          augment: bool = True) -> Tensor:
    """Distort (if ``augment``), reverse the channels (if asked) and normalise ``M`` images.

    Args:
        imgs (Tensor): ``[M, 3, H, W]`` uint8 or float32 BGR in [0, 255] (any strides).
        params (Tensor): ``[M, 8]`` float, one row per image (:meth:`PhotometricParams.packed`).
        mean (Tensor): ``[3]`` per-channel mean, in the output channel order.
        std (Tensor): ``[3]`` per-channel standard deviation.
        saturation_clip (bool): Clip saturation where the factor exceeds 1 (mmdet 3's
            transform). Defaults to False.
        reverse_channels (bool): BGR -> RGB after the distortion. Defaults to False.
        augment (bool): Apply the distortion; False only converts and normalises. Defaults
            to True.

    Returns:
        Tensor: ``[M, 3, H, W]`` float32.

    Examples:
        >>> import torch
        >>> imgs = torch.randint(0, 256, (2, 3, 8, 12), dtype=torch.uint8)
        >>> params = PhotometricParams.sample(2, torch.Generator().manual_seed(0)).packed()
        >>> mean, std = torch.tensor([123.7, 116.3, 103.5]), torch.tensor([58.4, 57.1, 57.4])
        >>> photometric_normalize(imgs, params, mean, std, reverse_channels=True).shape
        torch.Size([2, 3, 8, 12])
    """
    return photometric_normalize_op(imgs, params, mean.reshape(-1), std.reshape(-1),
                                    bool(saturation_clip), bool(reverse_channels), bool(augment))
