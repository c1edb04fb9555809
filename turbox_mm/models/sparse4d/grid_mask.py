"""GridMask: blank a regular grid of squares in the training images (one mask per batch)."""
import math

import numpy as np
import torch
from torch import Tensor, nn

from turbox_mm.registry import MODELS


@MODELS.register_module()
class GridMask(nn.Module):
    """Multiply a batch of images by one random grid mask, in training only.

    With probability ``prob``: draw a period ``d`` in ``[2, H)`` and a band width
    ``l = min(max(int(d * ratio + 0.5), 1), d - 1)``; on a canvas 1.5 times the image, zero
    the row bands ``[d * i + st_h, + l)`` (``use_h``) and the column bands
    ``[d * i + st_w, + l)`` (``use_w``) with offsets ``st_h, st_w`` in ``[0, d)``; rotate the
    canvas by ``randint(rotate)`` degrees (nearest neighbour, zero fill); take its centre
    ``H x W``. ``mode=1`` inverts the mask, so the blanked cells are the squares between the
    bands, those crossed by neither a row band nor a column band. One mask serves the whole
    batch and every channel; with ``offset`` the blanked pixels get uniform noise in
    ``[-1, 1)`` instead of zero (docs/design/sparse4d.md, 2.1).

    Randomness comes from **numpy's global RNG**, drawn in upstream's order (the ``prob`` test,
    ``d``, ``st_h``, ``st_w``, the angle, the offset noise), so a run seeded by mmengine (which
    seeds numpy) draws upstream's masks. The mask is built with torch on the images' device;
    the rotation reproduces PIL's nearest-neighbour ``Image.rotate`` (pixel centres, floor).
    In eval mode the images come back unchanged and nothing is drawn.

    Args:
        use_h (bool): Row bands. Defaults to True.
        use_w (bool): Column bands. Defaults to True.
        rotate (int): Angles are drawn from ``[0, rotate)`` degrees; 1 means no rotation.
            Defaults to 1.
        offset (bool): Fill blanked pixels with noise. Defaults to False.
        ratio (float): Band width over period. Defaults to 0.5.
        mode (int): 0 blanks the bands, 1 the squares between them. Defaults to 1.
        prob (float): Probability of masking a batch. Defaults to 0.7.

    Examples:
        >>> gm = GridMask(prob=1.0).train()
        >>> out = gm(torch.ones(2, 3, 16, 24))
        >>> out.shape, bool((out == out[0, 0]).all())  # one mask for all images and channels
        (torch.Size([2, 3, 16, 24]), True)
    """

    def __init__(self,
                 use_h: bool = True,
                 use_w: bool = True,
                 rotate: int = 1,
                 offset: bool = False,
                 ratio: float = 0.5,
                 mode: int = 1,
                 prob: float = 0.7) -> None:
        super().__init__()
        if mode not in (0, 1):
            raise ValueError(f'GridMask: mode must be 0 or 1, got {mode}')
        if int(rotate) < 1:
            raise ValueError(f'GridMask: rotate must be at least 1, got {rotate}')
        self.use_h = use_h
        self.use_w = use_w
        self.rotate = int(rotate)
        self.offset = offset
        self.ratio = ratio
        self.mode = mode
        self.st_prob = prob
        self.prob = prob

    def set_prob(self, epoch: int, max_epoch: int) -> None:
        """Ramp the probability linearly with the epoch: ``prob = st_prob * epoch / max``."""
        self.prob = self.st_prob * epoch / max_epoch

    @staticmethod
    def _bands(coord: Tensor, start: int, period: int, width: int, count: int) -> Tensor:
        """Whether integer canvas coordinates fall in one of ``count`` bands."""
        k = coord - start
        return (k >= 0) & (torch.remainder(k, period) < width) & (torch.div(
            k, period, rounding_mode='floor') < count)

    def make_mask(self, height: int, width: int, device=None) -> Tensor:
        """Draw one ``[height, width]`` float32 mask (1 keeps a pixel, 0 blanks it).

        Args:
            height (int): Image height; at least 3.
            width (int): Image width.
            device (torch.device, optional): Where to build it. Defaults to None (CPU).

        Returns:
            Tensor: ``[height, width]`` of zeros and ones.
        """
        if height < 3:
            raise ValueError(f'GridMask: image height must be at least 3, got {height}')
        hh, ww = int(1.5 * height), int(1.5 * width)
        d = int(np.random.randint(2, height))
        band = min(max(int(d * self.ratio + 0.5), 1), d - 1)
        st_h = int(np.random.randint(d))
        st_w = int(np.random.randint(d))
        angle = int(np.random.randint(self.rotate))

        oy, ox = (hh - height) // 2, (ww - width) // 2
        ys = torch.arange(oy, oy + height, device=device)[:, None]
        xs = torch.arange(ox, ox + width, device=device)[None, :]
        if angle % 360:
            # PIL: source = R(-angle) (centre of the output pixel - canvas centre) + centre,
            # floored; sources off the canvas read 0.
            theta = -math.radians(angle)
            cos, sin = round(math.cos(theta), 15), round(math.sin(theta), 15)
            cx, cy = ww / 2.0, hh / 2.0
            px, py = xs.double() + 0.5 - cx, ys.double() + 0.5 - cy
            src_x = torch.floor(cos * px + sin * py + cx).long()
            src_y = torch.floor(-sin * px + cos * py + cy).long()
            inside = (src_x >= 0) & (src_x < ww) & (src_y >= 0) & (src_y < hh)
            ys, xs = src_y, src_x
        else:
            inside = torch.ones(height, width, dtype=torch.bool, device=device)
        blank = torch.zeros(height, width, dtype=torch.bool, device=device)
        if self.use_h:
            blank = blank | self._bands(ys, st_h, d, band, hh // d)
        if self.use_w:
            blank = blank | self._bands(xs, st_w, d, band, ww // d)
        mask = (~blank & inside).float()
        if self.mode == 1:
            mask = 1 - mask
        return mask

    def forward(self, x: Tensor) -> Tensor:
        """Mask the images.

        Args:
            x (Tensor): ``[N, C, H, W]`` images (any leading dims).

        Returns:
            Tensor: ``x`` itself in eval mode or when the batch is not drawn, else the masked
            images (same shape and dtype).
        """
        if not self.training:
            return x
        if x.dim() < 2:
            raise ValueError(f'GridMask: expected images [N, C, H, W], got {tuple(x.shape)}')
        if not np.random.rand() < self.prob:
            return x
        height, width = x.shape[-2:]
        mask = self.make_mask(height, width, x.device).to(x.dtype)
        if self.offset:
            noise = torch.from_numpy(2 * (np.random.rand(height, width) - 0.5)).to(x.device,
                                                                                   x.dtype)
            return x * mask + noise * (1 - mask)
        return x * mask
