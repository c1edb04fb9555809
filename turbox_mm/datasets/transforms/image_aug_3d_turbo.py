"""``ImageAug3DTurbo``: BEVFusion's per-camera image augmentation as one affine warp per image
(the turbox twin of ``ImageAug3D``)."""
from typing import Dict, Sequence, Tuple

import cv2
import numpy as np
import torch

from turbox_mm.registry import TRANSFORMS
from .image_aug_3d import ImageAug3D
from .multiview_affine_aug import (INTERPOLATIONS, crop_box, rotation_mask, source_warp,
                                   warp_image)


@TRANSFORMS.register_module()
class ImageAug3DTurbo(ImageAug3D):
    """:class:`~turbox_mm.datasets.transforms.ImageAug3D`'s augmentation with one
    ``cv2.warpAffine`` per camera on uint8 images.

    **Same draws, same geometry.** The parameters come from ``ImageAug3D``'s own
    :meth:`~ImageAug3D.sample_augmentation` (numpy's global generator, the same draws in the
    same order: camera by camera, resize, bottom crop share, crop x offset, flip, rotation;
    none at test time) and ``img_aug_matrix`` from its :meth:`~ImageAug3D.pixel_mapping`: for
    one seed it is the stock list of float32 4 x 4 matrices, to the bit. ``lidar2img`` and the
    other matrices are not touched (the stock transform leaves them), nor is ``img_shape``.

    **Pixels.** The stock transform makes a float32 -> uint8 copy, a PIL bicubic resize
    (antialiased: its kernel widens with the shrink), an integer crop (zero outside), a flip
    and a PIL nearest-neighbour rotation about the crop's centre (zero fill), then a float32
    copy. Here the composition of the four is one inverse-mapped warp
    (:func:`~turbox_mm.datasets.transforms.multiview_affine_aug.source_warp`, PIL's pixel-centre
    convention) from the decoded uint8 image straight to ``final_dim``, **bilinear** by default;
    where it shrinks by 2 or more, the source is first reduced by 2 (4, 8): by the loader's
    DCT-scaled decoding when it did that (``img_decode_scale``), else by block averaging. The
    corners that the stock rotation leaves empty are zeroed
    (:func:`~turbox_mm.datasets.transforms.multiview_affine_aug.rotation_mask`). So the pixels
    differ from the stock ones by interpolation: bilinear after a box filter against PIL's
    bicubic, and an interpolated rotation against PIL's nearest one (up to half a pixel of
    shift on sharp edges). Measured against the stock chain on camera-like 1600 x 900 JPEGs
    (``image_pipeline.textured_image``: hard-edged boxes and sensor noise; "smooth": the same
    blurred with sigma 3 px), 6 cameras x 4 seeds, to 256 x 704; grey levels 0-255, all
    channels (``tests/test_bevfusion_fast_pipeline.py`` holds the tolerances):

    =======================================================  ====  =========  ==========
    images, augmentation                                     mean  > 8 lvls   > 32 lvls
    =======================================================  ====  =========  ==========
    smooth, resize 0.38-0.55 and flips, no rotation          0.27  0          0
    smooth, test time (resize 0.48, 1/2-scale DCT decode)    0.27  0          0
    smooth, training (rotation +-5.4 degrees)                0.92  1.3%       0.05%
    textured, no rotation / test time                        1.0   0.7-0.9%   0
    textured, training                                       1.87  2.1%       0.33%
    =======================================================  ====  =========  ==========

    The largest differences lie on the rotated edge of the crop (PIL keeps or drops whole
    pixels there) and on hard edges. ``interpolation='bicubic'`` is no closer (mean 0.95 and
    2.03 in training).

    Images come out uint8 (``to_float32`` for float-only transforms downstream); normalisation
    belongs to the data preprocessor, as in the stock BEVFusion configs.

    **Deferred mode** (``results['img'] is None`` and ``img_bytes`` present: the loader's
    ``decode_on='gpu'``): no pixel is touched; as :class:`MultiViewAffineAug`'s deferred mode,
    per camera ``img_warp`` (float32 ``[N, 3, 3]``, output pixel -> full-resolution source
    pixel), ``img_valid_box`` (float32 ``[N, 4]``) and ``img_warp_size`` (``final_dim``) are
    written for ``turbox_mm.PackJpegBytes`` and the data preprocessor's nvJPEG decode and warp.

    The geometry is that of the full-resolution (padded) image, ``results['ori_shape']``, as
    the stock transform draws it; images decoded at ``1 / d`` carry
    ``results['img_decode_scale'] = d`` (1 after the warp).

    Args:
        final_dim, resize_lim, bot_pct_lim, rot_lim, rand_flip, is_train: ``ImageAug3D``'s.
        interpolation (str): ``'bilinear'``, ``'bicubic'`` or ``'nearest'``.
            Defaults to ``'bilinear'``.
        to_float32 (bool): Return float32 images. Defaults to False.

    Examples:
        >>> import numpy as np
        >>> aug = ImageAug3DTurbo(final_dim=(32, 88), resize_lim=(0.38, 0.55),
        ...                       bot_pct_lim=(0.0, 0.0), rot_lim=(-5.4, 5.4), rand_flip=True,
        ...                       is_train=True)
        >>> np.random.seed(0)
        >>> out = aug(dict(img=[np.zeros((90, 160, 3), np.uint8)] * 2, ori_shape=(90, 160)))
        >>> out['img'][0].shape, out['img'][0].dtype, len(out['img_aug_matrix'])
        ((32, 88, 3), dtype('uint8'), 2)
    """

    def __init__(self, final_dim: Sequence[int], resize_lim: Sequence[float],
                 bot_pct_lim: Sequence[float], rot_lim: Sequence[float], rand_flip: bool,
                 is_train: bool, interpolation: str = 'bilinear',
                 to_float32: bool = False) -> None:
        super().__init__(final_dim, resize_lim, bot_pct_lim, rot_lim, rand_flip, is_train)
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f'{type(self).__name__}: interpolation must be one of '
                             f'{sorted(INTERPOLATIONS)}, got {interpolation!r}')
        self.interpolation = interpolation
        self.to_float32 = to_float32

    def transform(self, results: Dict) -> Dict:
        """Draw, warp (or only compute the warps) and record ``img_aug_matrix``.

        Args:
            results (dict): ``img`` (or ``img_bytes`` with ``img=None``), ``ori_shape`` and,
                for decoded-at-scale images, ``img_decode_scale``.

        Returns:
            dict: ``results``, modified in place.
        """
        deferred = results.get('img') is None and 'img_bytes' in results
        sources = results['img_bytes'] if deferred else results['img']
        height, width = (int(v) for v in results['ori_shape'][:2])
        factor = int(results.get('img_decode_scale', 1))
        images, matrices, warps, boxes = [], [], [], []
        for index in range(len(sources)):
            resize, _, crop, flip, rotate = self.sample_augmentation(results['ori_shape'])
            rotation, translation = self.pixel_mapping(resize, crop, flip, rotate)
            matrix = torch.eye(4)
            matrix[:2, :2] = rotation
            matrix[:2, 3] = translation
            matrices.append(matrix.numpy())
            config = dict(resize=resize, crop=crop, flip=flip, rotate=rotate)
            warp, out_size = source_warp(config, height, width)
            # float32 is what travels to the GPU; the CPU warp uses the same numbers.
            warp = warp.astype(np.float32)
            if deferred:
                warps.append(warp)
                boxes.append(crop_box(config, height, width))
            else:
                images.append(self._warp(sources[index], warp, factor, out_size, config))
        results['img_aug_matrix'] = matrices
        if deferred:
            results['img_warp'] = (np.stack(warps) if warps else
                                   np.zeros((0, 3, 3), np.float32))
            results['img_valid_box'] = (np.stack(boxes).astype(np.float32) if boxes else
                                        np.zeros((0, 4), np.float32))
            results['img_warp_size'] = self.final_dim
            return results
        if self.to_float32:
            images = [img.astype(np.float32) for img in images]
        results['img'] = images
        results['img_decode_scale'] = 1
        return results

    def _warp(self, img: np.ndarray, warp: np.ndarray, factor: int,
              out_size: Tuple[int, int], config: Dict) -> np.ndarray:
        """One camera: reduce against aliasing, warp, zero what the stock rotation empties."""
        out = warp_image(img, warp, factor, out_size, self.interpolation)
        mask = rotation_mask(config, out_size)
        if mask is None:
            return out
        if out.ndim == 2:
            cv2.multiply(out, mask, dst=out)
        elif out.shape[2] <= 4:  # cv2.merge: a tenth of np.repeat's time
            cv2.multiply(out, cv2.merge([mask] * out.shape[2]), dst=out)
        else:
            np.multiply(out, mask[..., None], out=out)
        return out

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(final_dim={self.final_dim}, '
                f'resize_lim={self.resize_lim}, bot_pct_lim={self.bot_pct_lim}, '
                f'rot_lim={self.rot_lim}, rand_flip={self.rand_flip}, '
                f'is_train={self.is_train}, interpolation={self.interpolation!r})')
