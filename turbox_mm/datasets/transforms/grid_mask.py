"""``GridMask``: BEVFusion's grid masking of the camera images (a data transform)."""
import numpy as np
import torch
from mmcv.transforms import BaseTransform
from PIL import Image

from turbox_mm.registry import TRANSFORMS


@TRANSFORMS.register_module()
class GridMask(BaseTransform):
    """Zero a rotated grid of stripes in every camera image (the same mask for all), with
    probability ``prob``, as mmdet3d 1.4's ``projects/BEVFusion`` ``GridMask``.

    numpy's global generator draws, in this order: ``rand()`` (against ``prob``; drawn even
    when ``prob`` is 0, as in BEVFusion's config, where the transform changes nothing); then,
    when it applies: the period ``d = randint(2, min(h, w))``; with ``ratio == 1`` the stripe
    length ``randint(1, d)`` (else ``min(max(int(d * ratio + 0.5), 1), d - 1)``); the offsets
    ``randint(d)`` for rows and columns; the rotation ``randint(rotate)`` in degrees. The mask
    is drawn 1.5 times the image size, rotated with PIL, centre-cropped; ``mode=1`` inverts it;
    ``offset`` fills the masked pixels with uniform noise in ``[-1, 1]`` (per pixel; upstream's
    offset path broadcasts an ``[h, w]`` noise against the ``[h, w, 1]`` mask into ``[h, w,
    w]``; its configs leave ``offset`` off).

    Args:
        use_h, use_w (bool): Horizontal / vertical stripes.
        max_epoch (int): For :meth:`set_epoch` (``prob`` ramps up with the epoch unless
            ``fixed_prob``).
        rotate (int): Rotations are drawn in ``[0, rotate)`` degrees. Defaults to 1.
        offset (bool): Noise in the masked pixels. Defaults to False.
        ratio (float): Stripe length over period. Defaults to 0.5.
        mode (int): 1 inverts the mask. Defaults to 0.
        prob (float): Probability of masking. Defaults to 1.0.
        fixed_prob (bool): Keep ``prob`` across epochs. Defaults to False.
    """

    def __init__(self, use_h: bool, use_w: bool, max_epoch: int, rotate: int = 1,
                 offset: bool = False, ratio: float = 0.5, mode: int = 0, prob: float = 1.0,
                 fixed_prob: bool = False) -> None:
        self.use_h, self.use_w = use_h, use_w
        self.rotate, self.offset, self.ratio, self.mode = rotate, offset, ratio, mode
        self.st_prob = self.prob = prob
        self.epoch = None
        self.max_epoch = max_epoch
        self.fixed_prob = fixed_prob

    def set_epoch(self, epoch: int) -> None:
        """Scale ``prob`` by ``epoch / max_epoch`` unless ``fixed_prob``."""
        self.epoch = epoch
        if not self.fixed_prob:
            self.prob = self.st_prob * epoch / self.max_epoch

    def transform(self, results: dict) -> dict:
        if np.random.rand() > self.prob:
            return results
        imgs = results['img']
        h, w = imgs[0].shape[:2]
        hh, ww = int(1.5 * h), int(1.5 * w)
        d = np.random.randint(2, min(h, w))
        length = np.random.randint(1, d) if self.ratio == 1 else \
            min(max(int(d * self.ratio + 0.5), 1), d - 1)
        mask = np.ones((hh, ww), np.float32)
        st_h, st_w = np.random.randint(d), np.random.randint(d)
        if self.use_h:
            for i in range(hh // d):
                start = d * i + st_h
                mask[start:min(start + length, hh), :] = 0
        if self.use_w:
            for i in range(ww // d):
                start = d * i + st_w
                mask[:, start:min(start + length, ww)] = 0
        angle = np.random.randint(self.rotate)
        mask = np.asarray(Image.fromarray(np.uint8(mask)).rotate(angle))
        top, left = (hh - h) // 2, (ww - w) // 2
        mask = mask[top:top + h, left:left + w].astype(np.float32)[:, :, None]
        if self.mode == 1:
            mask = 1 - mask
        if self.offset:
            noise = torch.from_numpy(2 * (np.random.rand(h, w) - 0.5)).float()
            fill = (1 - mask) * noise.numpy()[:, :, None]
            results['img'] = [x * mask + fill for x in imgs]
        else:
            results['img'] = [x * mask for x in imgs]
        return results
