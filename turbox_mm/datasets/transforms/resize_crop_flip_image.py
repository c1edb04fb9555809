"""Sparse4D v3's multi-view resize, crop, flip and rotate: the stock reference (PIL)."""
from typing import Dict, Tuple

import numpy as np
from mmcv.transforms import BaseTransform
from PIL import Image

from turbox_mm.registry import TRANSFORMS


@TRANSFORMS.register_module()
class ResizeCropFlipImage(BaseTransform):
    """Resize, crop, flip and rotate every camera image as Sparse4D v3 does, with PIL.

    The stock twin of :class:`~turbox_mm.datasets.transforms.MultiViewAffineAug`, ported to
    mmcv's :class:`BaseTransform` with upstream's semantics kept (HorizonRobotics/Sparse4D,
    ``projects/mmdet3d_plugin/datasets/pipelines/augment.py``). It is the reference the turbox
    transform is tested and benchmarked against.

    The parameters come from ``results['aug_config']``, drawn by the dataset
    (``get_augmentation`` from ``data_aug_conf``) and shared by all cameras of a sample:

    - ``resize`` (float): scale factor; the image becomes ``(int(W * resize), int(H * resize))``
      (width, height) with PIL's default filter (bicubic, antialiased). Defaults to 1.
    - ``crop`` (tuple[int]): ``(left, top, right, bottom)`` in the resized image; outside the
      image is filled with 0. Defaults to the whole resized image.
    - ``flip`` (bool): mirror left-right after cropping. Defaults to False.
    - ``rotate`` (float): degrees, counter-clockwise as seen on the image, about the crop's
      centre, nearest-neighbour, size kept, corners filled with 0 (PIL's ``rotate``).
      Defaults to 0.

    ``H, W`` are each image's own shape. Without ``aug_config`` (None or absent) the results
    pass through unchanged, as upstream.

    Each image is cast to uint8 first (upstream's ``np.uint8(img)``: float images from a
    loader with ``to_float32=True`` hold whole numbers, so nothing is lost) and comes out as
    float32 ``(crop_h, crop_w, C)``.

    The 4x4 matrix ``mat`` maps a point of the source image to the augmented one
    (homogeneous pixel coordinates, ``[u, v, 1]`` in its upper-left 3x3):
    ``rot @ flip @ [[resize, 0, -left], [0, resize, -top], [0, 0, 1]]``. Note that it scales
    by ``resize`` while the image is scaled by ``int(W * resize) / W`` and
    ``int(H * resize) / H``; upstream's approximation, kept.

    Required keys: ``img`` (list of arrays), ``aug_config``, ``lidar2img`` (list of 4x4).

    Modified keys: ``img``, ``img_shape`` (list of ``(h, w)``), ``lidar2img``
    (``mat @ lidar2img``) and, when present, ``cam_intrinsic`` (its upper-left 3x3 becomes
    ``mat[:3, :3] @ K``).

    Examples:
        >>> import numpy as np
        >>> t = ResizeCropFlipImage()
        >>> results = dict(img=[np.zeros((90, 160, 3), np.uint8)], lidar2img=[np.eye(4)],
        ...                aug_config=dict(resize=0.5, crop=(4, 13, 74, 45), flip=True,
        ...                                rotate=2.0))
        >>> out = t(results)
        >>> out['img'][0].shape, out['img'][0].dtype, out['img_shape']
        ((32, 70, 3), dtype('float32'), [(32, 70)])
    """

    def transform(self, results: Dict) -> Dict:
        """Augment every image of ``results['img']`` and update the projections.

        Args:
            results (dict): The sample; see the class docstring for the keys.

        Returns:
            dict: ``results``, modified in place.
        """
        aug_config = results.get('aug_config')
        if aug_config is None:
            return results
        imgs = results['img']
        new_imgs = []
        for i in range(len(imgs)):
            img, mat = self._img_transform(np.uint8(imgs[i]), aug_config)
            new_imgs.append(img)
            results['lidar2img'][i] = mat @ results['lidar2img'][i]
            if 'cam_intrinsic' in results:
                results['cam_intrinsic'][i][:3, :3] = (
                    mat[:3, :3] @ results['cam_intrinsic'][i][:3, :3])
        results['img'] = new_imgs
        results['img_shape'] = [x.shape[:2] for x in new_imgs]
        return results

    @staticmethod
    def _img_transform(img: np.ndarray, aug_config: Dict) -> Tuple[np.ndarray, np.ndarray]:
        """Augment one uint8 image; return it as float32 and the 4x4 matrix applied."""
        H, W = img.shape[:2]
        resize = aug_config.get('resize', 1)
        resize_dims = (int(W * resize), int(H * resize))
        crop = aug_config.get('crop', [0, 0, *resize_dims])
        flip = aug_config.get('flip', False)
        rotate = aug_config.get('rotate', 0)

        pil = Image.fromarray(img)
        pil = pil.resize(resize_dims).crop(crop)
        if flip:
            pil = pil.transpose(method=Image.FLIP_LEFT_RIGHT)
        pil = pil.rotate(rotate)
        out = np.array(pil).astype(np.float32)

        # The matrix is built step by step, as upstream builds it.
        transform = np.eye(3)
        transform[:2, :2] *= resize
        transform[:2, 2] -= np.array(crop[:2])
        if flip:
            flip_matrix = np.array([[-1, 0, crop[2] - crop[0]], [0, 1, 0], [0, 0, 1]])
            transform = flip_matrix @ transform
        angle = rotate / 180 * np.pi
        rot = np.array([[np.cos(angle), np.sin(angle), 0],
                        [-np.sin(angle), np.cos(angle), 0],
                        [0, 0, 1]])
        rot_center = np.array([crop[2] - crop[0], crop[3] - crop[1]]) / 2
        rot[:2, 2] = -rot[:2, :2] @ rot_center + rot_center
        transform = rot @ transform
        mat = np.eye(4)
        mat[:3, :3] = transform
        return out, mat
