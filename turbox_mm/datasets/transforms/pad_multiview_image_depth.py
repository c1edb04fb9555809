"""``PadMultiViewImageDepth``: pad the images and MapTR v2's depth ground truth together."""
from typing import Dict

import mmcv
import numpy as np

from turbox_mm.registry import TRANSFORMS
from .pad_multiview_image import PadMultiViewImage


@TRANSFORMS.register_module()
class PadMultiViewImageDepth(PadMultiViewImage):
    """:class:`PadMultiViewImage`, and each camera's ``gt_depth`` map padded the same way
    (hustvl/MapTR ``PadMultiViewImageDepth``, ``pipelines/transform_3d.py`` @ 69ab751): at
    the bottom and right, to ``size`` or to the next multiple of ``size_divisor``, with
    ``pad_val`` (upstream pads the depth with the images' value; 0, the default, reads as
    "no point").

    With ``downsample=1`` in :class:`PointToMultiViewDepth` the padded maps have the padded
    images' size. Each map is padded on its own, as upstream, so a coarser one
    (``downsample > 1``) is padded to a multiple of ``size_divisor`` at its own size.

    Args:
        size (Sequence[int], optional): ``(h, w)`` to pad to. Defaults to None.
        size_divisor (int, optional): Pad to a multiple of it. Defaults to None.
        pad_val (float): Fill value of the images and the depth. Defaults to 0.

    Required keys: ``img``, ``gt_depth`` (``[N, H, W]`` or a list of ``(H, W)``). Modified
    keys: those of :class:`PadMultiViewImage`, and ``gt_depth`` (np.ndarray ``[N, H', W']``
    float32).

    Examples:
        >>> pad = PadMultiViewImageDepth(size_divisor=32)
        >>> out = pad(dict(img=[np.zeros((45, 80, 3))], gt_depth=np.ones((1, 45, 80))))
        >>> out['gt_depth'].shape, out['img_shape'], float(out['gt_depth'][0, 50, 0])
        ((1, 64, 96), [(64, 96, 3)], 0.0)
    """

    def transform(self, results: Dict) -> Dict:
        """Pad the images and ``gt_depth``.

        Args:
            results (dict): The sample.

        Returns:
            dict: ``results``, padded.
        """
        name = type(self).__name__
        token = results.get('token', results.get('sample_idx'))
        if 'gt_depth' not in results:
            raise KeyError(f'{name}: sample {token} has no "gt_depth" (PointToMultiViewDepth '
                           'must come first)')
        depth = list(results['gt_depth'])
        results = super().transform(results)
        if len(depth) != len(results['img']):
            raise ValueError(f'{name}: sample {token}: {len(depth)} depth maps for '
                             f'{len(results["img"])} images')
        if self.size is not None:
            padded = [mmcv.impad(np.asarray(d), shape=self.size, pad_val=self.pad_val)
                      for d in depth]
        else:
            padded = [mmcv.impad_to_multiple(np.asarray(d), self.size_divisor,
                                             pad_val=self.pad_val) for d in depth]
        results['gt_depth'] = np.stack(padded).astype(np.float32, copy=False)
        return results
