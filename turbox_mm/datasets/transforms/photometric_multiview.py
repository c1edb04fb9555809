"""Photometric distortion of every camera image, each with its own draws."""
from typing import Dict, Sequence

from mmcv.transforms import BaseTransform
from mmdet.datasets.transforms import PhotoMetricDistortion

from turbox_mm.registry import TRANSFORMS
from .normalize_multiview_image import image_list


@TRANSFORMS.register_module()
class PhotoMetricDistortionMultiViewImage(BaseTransform):
    """mmdet's ``PhotoMetricDistortion`` applied to each image of ``results['img']``.

    Sparse4D v3's multi-view distortion (from BEVFormer / DETR3D): per camera, independently,
    each with probability 0.5: brightness ``+U(-delta, delta)``, contrast ``*U(range)``
    before or after the HSV step, saturation ``*U(range)``, hue ``+U(-hue, hue)`` degrees,
    and a random channel permutation, on float BGR pixels in [0, 255] (``mmcv.bgr2hsv``).
    The draws come from numpy's global generator, as in mmdet and upstream (mmengine seeds it
    per worker).

    Each image goes through mmdet 3.3's transform, which differs from upstream's copy in two
    details: the order in which the random numbers are drawn (so a seed gives other
    parameters, the same distribution), and the saturation is clipped to [0, 1] when scaled
    up (upstream lets it exceed 1).

    Images of any dtype are taken (mmdet casts to float32); they come out float32
    ``(H, W, 3)``. For uint8 pipelines the GPU preprocessor's photometric distortion is the
    counterpart.

    Args:
        brightness_delta (int): Brightness delta. Defaults to 32.
        contrast_range (sequence[float]): Contrast factor range. Defaults to (0.5, 1.5).
        saturation_range (sequence[float]): Saturation factor range. Defaults to (0.5, 1.5).
        hue_delta (int): Hue delta (degrees). Defaults to 18.

    Required keys: ``img`` (list of ``(H, W, 3)`` BGR arrays). Modified keys: ``img``.

    Examples:
        >>> import numpy as np
        >>> out = PhotoMetricDistortionMultiViewImage()(
        ...     dict(img=[np.full((4, 6, 3), 100, np.float32)] * 2))
        >>> [(im.shape, im.dtype.name) for im in out['img']]
        [((4, 6, 3), 'float32'), ((4, 6, 3), 'float32')]
    """

    def __init__(self,
                 brightness_delta: int = 32,
                 contrast_range: Sequence[float] = (0.5, 1.5),
                 saturation_range: Sequence[float] = (0.5, 1.5),
                 hue_delta: int = 18) -> None:
        self.op = PhotoMetricDistortion(brightness_delta=brightness_delta,
                                        contrast_range=tuple(contrast_range),
                                        saturation_range=tuple(saturation_range),
                                        hue_delta=hue_delta)

    def transform(self, results: Dict) -> Dict:
        """Distort every image, each with fresh draws.

        Args:
            results (dict): The sample.

        Returns:
            dict: ``results``, modified in place.
        """
        imgs = image_list(results, type(self).__name__)
        for i, img in enumerate(imgs):
            if img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f'{type(self).__name__}: image {i} must be (H, W, 3) BGR, '
                                 f'got shape {img.shape}')
        results['img'] = [self.op.transform(dict(img=img))['img'] for img in imgs]
        return results

    def __repr__(self) -> str:
        op = self.op
        return (f'{type(self).__name__}(brightness_delta={op.brightness_delta}, '
                f'contrast_range={(op.contrast_lower, op.contrast_upper)}, '
                f'saturation_range={(op.saturation_lower, op.saturation_upper)}, '
                f'hue_delta={op.hue_delta})')
