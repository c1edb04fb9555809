"""Mean/std normalisation of every camera image (Sparse4D's, on the CPU)."""
from typing import Dict, Sequence

import mmcv
import numpy as np
from mmcv.transforms import BaseTransform

from turbox_mm.registry import TRANSFORMS


def image_list(results: Dict, name: str) -> list:
    """``results['img']`` as a list of images; a ``TypeError`` naming ``name`` otherwise."""
    imgs = results.get('img')
    if not isinstance(imgs, (list, tuple)):
        raise TypeError(f'{name}: results["img"] must be a list of (H, W, C) images, got '
                        f'{type(imgs).__name__}')
    return list(imgs)


@TRANSFORMS.register_module()
class NormalizeMultiviewImage(BaseTransform):
    """``mmcv.imnormalize`` on each image of ``results['img']``: ``(x - mean) / std``.

    With ``to_rgb`` the channels are first reversed (images load as BGR), so the output is
    normalised RGB. Images of any dtype are taken; they come out float32. Sets
    ``img_norm_cfg``. For uint8 pipelines normalise on the GPU instead
    (``TurboxDet3DDataPreprocessor``).

    Args:
        mean (sequence[float]): Per-channel mean, in the output channel order.
        std (sequence[float]): Per-channel std.
        to_rgb (bool): Convert BGR to RGB first. Defaults to True.

    Required keys: ``img`` (list of ``(H, W, C)``). Modified keys: ``img``,
    ``img_norm_cfg``.

    Examples:
        >>> t = NormalizeMultiviewImage(mean=[1., 2., 3.], std=[2., 2., 2.])
        >>> img = np.array([[[30., 20., 10.]]], np.float32)  # B, G, R
        >>> t(dict(img=[img]))['img'][0].tolist()
        [[[4.5, 9.0, 13.5]]]
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], to_rgb: bool = True) -> None:
        self.mean = np.array(mean, dtype=np.float32)
        self.std = np.array(std, dtype=np.float32)
        if self.mean.shape != self.std.shape or self.mean.ndim != 1:
            raise ValueError(f'NormalizeMultiviewImage: mean {self.mean.shape} and std '
                             f'{self.std.shape} must be 1-D of one length')
        if np.any(self.std == 0):
            raise ValueError(f'NormalizeMultiviewImage: std has a zero: {self.std.tolist()}')
        self.to_rgb = bool(to_rgb)

    def transform(self, results: Dict) -> Dict:
        """Normalise every image.

        Args:
            results (dict): The sample.

        Returns:
            dict: ``results``, modified in place.
        """
        imgs = image_list(results, type(self).__name__)
        results['img'] = [mmcv.imnormalize(img, self.mean, self.std, self.to_rgb)
                          for img in imgs]
        results['img_norm_cfg'] = dict(mean=self.mean, std=self.std, to_rgb=self.to_rgb)
        return results

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(mean={self.mean.tolist()}, std={self.std.tolist()}, '
                f'to_rgb={self.to_rgb})')
