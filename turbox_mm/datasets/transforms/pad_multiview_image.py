"""``PadMultiViewImage``: pad every camera image to a size or a multiple (BEVFormer /
MapTR)."""
from typing import Dict, Optional, Sequence

import mmcv
from mmcv.transforms import BaseTransform

from turbox_mm.registry import TRANSFORMS
from .normalize_multiview_image import image_list


@TRANSFORMS.register_module()
class PadMultiViewImage(BaseTransform):
    """Pad each image at the bottom and right, as upstream (hustvl/MapTR
    ``pipelines/transform_3d.py`` @ 50f2ecd): to ``size`` (``mmcv.impad``) or to the next
    multiple of ``size_divisor`` (``mmcv.impad_to_multiple``), with ``pad_val``.

    Upstream's bookkeeping: ``ori_shape`` becomes the unpadded shapes, ``img_shape`` and
    ``pad_shape`` the padded ones (lists of ``(h, w, c)``), so a model reading ``img_shape``
    (BEVFormer's ``point_sampling``) normalises pixels by the padded size.

    Args:
        size (Sequence[int], optional): ``(h, w)`` to pad to. Defaults to None.
        size_divisor (int, optional): Pad to a multiple of it. Defaults to None.
        pad_val (float): Fill value. Defaults to 0.

    Required keys: ``img``. Modified keys: ``img``, ``ori_shape``, ``img_shape``; added:
    ``pad_shape``, ``pad_fixed_size``, ``pad_size_divisor``.

    Examples:
        >>> import numpy as np
        >>> out = PadMultiViewImage(size_divisor=32)(dict(img=[np.ones((45, 80, 3))]))
        >>> out['img_shape'], out['ori_shape']
        ([(64, 96, 3)], [(45, 80, 3)])
    """

    def __init__(self, size: Optional[Sequence[int]] = None,
                 size_divisor: Optional[int] = None, pad_val: float = 0) -> None:
        if (size is None) == (size_divisor is None):
            raise ValueError('PadMultiViewImage: give exactly one of size and size_divisor')
        self.size = None if size is None else tuple(size)
        self.size_divisor = size_divisor
        self.pad_val = pad_val

    def transform(self, results: Dict) -> Dict:
        imgs = image_list(results, type(self).__name__)
        if self.size is not None:
            padded = [mmcv.impad(img, shape=self.size, pad_val=self.pad_val) for img in imgs]
        else:
            padded = [mmcv.impad_to_multiple(img, self.size_divisor, pad_val=self.pad_val)
                      for img in imgs]
        results['ori_shape'] = [img.shape for img in imgs]
        results['img'] = padded
        results['img_shape'] = [img.shape for img in padded]
        results['pad_shape'] = [img.shape for img in padded]
        results['pad_fixed_size'] = self.size
        results['pad_size_divisor'] = self.size_divisor
        return results

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(size={self.size}, size_divisor={self.size_divisor}, '
                f'pad_val={self.pad_val})')
