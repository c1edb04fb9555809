"""``ImageAug3D``: BEVFusion's per-camera image augmentation with its 4 x 4 matrix."""
from typing import Sequence, Tuple

import numpy as np
import torch
from mmcv.transforms import BaseTransform
from PIL import Image

from turbox_mm.registry import TRANSFORMS


@TRANSFORMS.register_module()
class ImageAug3D(BaseTransform):
    """Resize, crop, flip and rotate each camera image with its own random draws, and record
    the pixel mapping in ``img_aug_matrix`` (one 4 x 4 per camera: ``[:2, :2]`` and
    ``[:2, 3]`` map an original pixel to the augmented one), as mmdet3d 1.4's
    ``projects/BEVFusion`` ``ImageAug3D``.

    Per camera, in training, numpy's global generator draws, in this order: the resize
    factor ``U(resize_lim)``; the bottom crop share ``U(bot_pct_lim)``; the crop's x offset
    ``U(0, max(0, newW - fW))``; with ``rand_flip`` a flip (``choice([0, 1])``); the rotation
    ``U(rot_lim)`` in degrees. At test time: the mean resize, the bottom rows, a centred crop, no
    flip, no rotation. The image goes through PIL as uint8 RGB: ``resize`` (PIL's default
    filter), ``crop`` (zero outside), a left-right flip, ``rotate`` about the crop's centre
    (nearest, zero fill); it comes back float32.

    Args:
        final_dim (Sequence[int]): ``(fH, fW)`` of the output (256, 704).
        resize_lim (Sequence[float]): Resize factor range.
        bot_pct_lim (Sequence[float]): Share of the bottom rows cropped away, range.
        rot_lim (Sequence[float]): Rotation range in degrees.
        rand_flip (bool): Flip left-right with probability 1/2 in training.
        is_train (bool): Random draws (training) or the fixed test-time augmentation.
    """

    def __init__(self, final_dim: Sequence[int], resize_lim: Sequence[float],
                 bot_pct_lim: Sequence[float], rot_lim: Sequence[float], rand_flip: bool,
                 is_train: bool) -> None:
        self.final_dim = tuple(int(v) for v in final_dim)
        self.resize_lim = tuple(resize_lim)
        self.bot_pct_lim = tuple(bot_pct_lim)
        self.rot_lim = tuple(rot_lim)
        self.rand_flip = rand_flip
        self.is_train = is_train

    def sample_augmentation(self, ori_shape: Sequence[int]):
        """``(resize, (newW, newH), crop box, flip, rotate in degrees)`` for one camera."""
        height, width = ori_shape[:2]
        out_h, out_w = self.final_dim
        if self.is_train:
            resize = np.random.uniform(*self.resize_lim)
            new_w, new_h = int(width * resize), int(height * resize)
            crop_h = int((1 - np.random.uniform(*self.bot_pct_lim)) * new_h) - out_h
            crop_w = int(np.random.uniform(0, max(0, new_w - out_w)))
            flip = bool(self.rand_flip and np.random.choice([0, 1]))
            rotate = np.random.uniform(*self.rot_lim)
        else:
            resize = np.mean(self.resize_lim)
            new_w, new_h = int(width * resize), int(height * resize)
            crop_h = int((1 - np.mean(self.bot_pct_lim)) * new_h) - out_h
            crop_w = int(max(0, new_w - out_w) / 2)
            flip, rotate = False, 0
        crop = (crop_w, crop_h, crop_w + out_w, crop_h + out_h)
        return resize, (new_w, new_h), crop, flip, rotate

    @staticmethod
    def pixel_mapping(resize: float, crop: Tuple[int, int, int, int], flip: bool,
                      rotate: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(A [2, 2], t [2])``, float32: augmented pixel = ``A @ original + t``."""
        matrix = torch.eye(2) * resize
        shift = -torch.tensor(crop[:2], dtype=torch.float32)
        width, height = crop[2] - crop[0], crop[3] - crop[1]
        if flip:
            mirror = torch.tensor([[-1.0, 0.0], [0.0, 1.0]])
            matrix = mirror @ matrix
            shift = mirror @ shift + torch.tensor([float(width), 0.0])
        theta = rotate / 180 * np.pi
        turn = torch.tensor([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]],
                            dtype=torch.float32)
        centre = torch.tensor([width, height], dtype=torch.float32) / 2
        return turn @ matrix, turn @ shift + (turn @ -centre + centre)

    def transform(self, results: dict) -> dict:
        images, matrices = [], []
        for img in results['img']:
            resize, size, crop, flip, rotate = self.sample_augmentation(results['ori_shape'])
            pil = Image.fromarray(img.astype('uint8'), mode='RGB').resize(size).crop(crop)
            if flip:
                pil = pil.transpose(method=Image.FLIP_LEFT_RIGHT)
            pil = pil.rotate(rotate)
            rotation, translation = self.pixel_mapping(resize, crop, flip, rotate)
            matrix = torch.eye(4)
            matrix[:2, :2] = rotation
            matrix[:2, 3] = translation
            images.append(np.array(pil).astype(np.float32))
            matrices.append(matrix.numpy())
        results['img'] = images
        results['img_aug_matrix'] = matrices
        return results
