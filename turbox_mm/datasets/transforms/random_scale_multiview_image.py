"""``RandomScaleImageMultiViewImage``: BEVFormer's / MapTR's multi-view rescale, with the
camera matrices."""
from typing import Dict, Sequence

import mmcv
import numpy as np
from mmcv.transforms import BaseTransform

from turbox_mm.registry import TRANSFORMS
from .normalize_multiview_image import image_list


def rescale_geometry(results: Dict, scale: float) -> None:
    """The bookkeeping of a rescale of ``results['img']`` (already resized) by ``scale``:
    ``lidar2img`` and ``img_aug_matrix`` (when present) left-multiplied by ``diag(s, s, 1,
    1)``, ``img_shape`` and ``ori_shape`` the images' shapes, ``scale_factor``."""
    matrix = np.eye(4)
    matrix[0, 0] = matrix[1, 1] = scale
    results['lidar2img'] = [matrix @ m for m in results['lidar2img']]
    if 'img_aug_matrix' in results:
        results['img_aug_matrix'] = [matrix @ m for m in results['img_aug_matrix']]
    results['img_shape'] = [img.shape for img in results['img']]
    results['ori_shape'] = [img.shape for img in results['img']]
    results['scale_factor'] = scale


@TRANSFORMS.register_module()
class RandomScaleImageMultiViewImage(BaseTransform):
    """Resize every camera image by one scale drawn from ``scales`` (MapTR's v1 pipeline
    uses ``[0.5]``), as upstream (hustvl/MapTR ``pipelines/transform_3d.py`` @ 50f2ecd).

    Each image becomes ``(int(W * s), int(H * s))`` (``mmcv.imresize``, bilinear);
    ``lidar2img`` and, when present, ``img_aug_matrix`` are left-multiplied by
    ``diag(s, s, 1, 1)``; ``img_shape`` and ``ori_shape`` become the list of the resized
    images' ``(h, w, c)`` shapes. The scale is the first of numpy's permutation of the
    indices (numpy's global generator, upstream's draw).

    Args:
        scales (Sequence[float]): The candidate scales. Defaults to (0.5,).

    Required keys: ``img`` (list of ``(H, W, C)``), ``lidar2img`` (list or ``[N, 4, 4]``).
    Modified keys: ``img``, ``lidar2img``, ``img_aug_matrix``, ``img_shape``,
    ``ori_shape``; added: ``scale_factor`` (the scale).

    Examples:
        >>> t = RandomScaleImageMultiViewImage([0.5])
        >>> out = t(dict(img=[np.zeros((90, 160, 3), np.float32)], lidar2img=[np.eye(4)]))
        >>> out['img_shape'], out['lidar2img'][0][0, 0]
        ([(45, 80, 3)], 0.5)
    """

    def __init__(self, scales: Sequence[float] = (0.5, )) -> None:
        self.scales = [float(s) for s in scales]
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f'RandomScaleImageMultiViewImage: scales must be positive, got '
                             f'{scales}')

    def transform(self, results: Dict) -> Dict:
        imgs = image_list(results, type(self).__name__)
        scale = self.scales[np.random.permutation(len(self.scales))[0]]
        results['img'] = [
            mmcv.imresize(img, (int(img.shape[1] * scale), int(img.shape[0] * scale)),
                          return_scale=False) for img in imgs]
        rescale_geometry(results, scale)
        return results

    def __repr__(self) -> str:
        return f'{type(self).__name__}(scales={self.scales})'
