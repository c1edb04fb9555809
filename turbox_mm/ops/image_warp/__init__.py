"""Image warp: block average + bilinear affine warp + valid box of uint8 camera images.

The device half of :class:`~turbox_mm.datasets.transforms.MultiViewAffineAug`'s deferred mode:
``TurboxDet3DDataPreprocessor`` decodes JPEGs with nvJPEG and warps them with this op.

- :mod:`.reference`: the specification in plain PyTorch (``avg_pool2d``, ``affine_grid``,
  ``grid_sample``, OpenCV's fixed-point nearest-neighbour box test) and the CPU path.
- :mod:`.triton_kernels`: one fused kernel.
- :mod:`.op`: ``torch.ops.turbox_mm.warp_affine_u8`` with its fake implementation and the
  dispatch (CUDA tensors with Triton -> kernel; otherwise -> reference, with one warning).
"""
from typing import Tuple

from torch import Tensor

from .op import fallback_reason, warp_affine_u8_op
from .reference import (NUM_PARAMS, block_average_tensor, pack_params, valid_mask,
                        warp_affine_u8_reference, warp_to_theta)

__all__ = [
    'warp_affine_u8', 'warp_affine_u8_reference', 'pack_params', 'block_average_tensor',
    'valid_mask', 'warp_to_theta', 'fallback_reason', 'NUM_PARAMS'
]


def warp_affine_u8(src: Tensor, params: Tensor, factor: int, out_hw: Tuple[int, int],
                   reverse_channels: bool = False) -> Tensor:
    """Warp ``K`` uint8 images to ``out_hw``; the formula is in :mod:`.reference`.

    Args:
        src (Tensor): ``[K, 3, Hs, Ws]`` uint8 (any strides).
        params (Tensor): ``[K, 13]`` float (:func:`pack_params`): the warp from output pixels
            to pixels of the source block-averaged by ``factor``, the valid-box matrix and
            its flag.
        factor (int): Block size 1, 2, 4 or 8.
        out_hw (tuple[int, int]): Output (H, W).
        reverse_channels (bool): Reverse the channel order (RGB -> BGR). Defaults to False.

    Returns:
        Tensor: ``[K, 3, H, W]`` uint8.

    Examples:
        >>> import numpy as np, torch
        >>> src = torch.randint(0, 256, (2, 3, 40, 60), dtype=torch.uint8)
        >>> shrink = np.array([[2.0, 0, 0.5], [0, 2.0, 0.5]])  # a 2x downscale
        >>> params = torch.from_numpy(pack_params([shrink] * 2, [None] * 2))
        >>> warp_affine_u8(src, params, 1, (20, 30)).shape
        torch.Size([2, 3, 20, 30])
    """
    return warp_affine_u8_op(src, params, int(factor), int(out_hw[0]), int(out_hw[1]),
                             bool(reverse_channels))
