"""Sparse depth targets from the lidar points, per camera and stride (Sparse4D v3)."""
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
import torch
from mmcv.transforms import BaseTransform

from turbox_mm.registry import TRANSFORMS

#: Points nearer than this (m, camera depth) are dropped; kept depths are clipped up to it.
MIN_DEPTH = 0.1


def image_sizes(results: Dict, num_views: int, owner: str) -> List[Tuple[int, int]]:
    """``(H, W)`` of each of ``num_views`` images from ``results['img_shape']``.

    ``img_shape`` is a list with one ``(H, W[, C])`` per camera (the augmentation
    transforms set it so), or one ``(H, W[, C])`` for all (mmdet3d's loader).

    Args:
        results (dict): The sample.
        num_views (int): Number of cameras.
        owner (str): The caller, for error messages.

    Returns:
        list[tuple[int, int]]: Per camera ``(H, W)``.
    """
    if 'img_shape' not in results:
        raise KeyError(f'{owner}: results has no img_shape')
    shape = results['img_shape']
    if len(shape) in (2, 3) and all(isinstance(v, (int, np.integer)) for v in shape):
        return [(int(shape[0]), int(shape[1]))] * num_views
    if len(shape) != num_views:
        raise ValueError(f'{owner}: img_shape lists {len(shape)} images for {num_views} '
                         'cameras (lidar2img)')
    return [(int(s[0]), int(s[1])) for s in shape]


@TRANSFORMS.register_module()
class MultiScaleDepthMapGenerator(BaseTransform):
    """Project the lidar points into every (augmented) image and grid their depths.

    Per camera, with ``lidar2img`` as the augmentation left it (run it before
    ``BBoxRotation``, which rotates ``lidar2img`` but not the points):

    - ``(u, v, d) = lidar2img @ [x, y, z, 1]``, divided by ``d``; the pixel is
      ``(round(u), round(v))``; points are kept where ``0 <= round(u) < W``,
      ``0 <= round(v) < H`` and ``d >= 0.1`` m; depths are then clipped to
      ``[0.1, max_depth]``;
    - for each stride ``s``, a map of ``(int(H / s), int(W / s))`` cells, -1 where no point
      falls, else the depth of the **nearest** point in the cell
      ``(floor(v / s), floor(u / s))``. Cells beyond the map (``W`` or ``H`` not a multiple
      of ``s``) are dropped; upstream's indexing would fail there.

    Upstream writes the points far-to-near and relies on the last write winning; here the
    nearest point is picked explicitly (the same maps, with no reliance on numpy's
    duplicate-index behaviour). Only ``img_shape`` is read from the images, so uint8 or
    float images, or none (deferred decoding), all work.

    Args:
        downsample (int | sequence[int]): Strides. Defaults to (4, 8, 16).
        max_depth (float): Depth clip (m). Defaults to 60.

    Required keys: ``points`` (mmdet3d points or an ``(n, >=3)`` array, lidar frame),
    ``lidar2img`` (list of 4x4), ``img_shape``. Added keys: ``gt_depth``, a list over the
    strides of float32 ``(N, int(H / s), int(W / s))`` arrays (all cameras of one size).

    Examples:
        >>> gen = MultiScaleDepthMapGenerator(downsample=[4])
        >>> k = np.array([[10., 0, 8, 0], [0, 10, 8, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
        >>> points = np.array([[0., 0, 5], [0.1, 0, 8], [0, 0, 0.05]])  # (u, v) ~ (8, 8)
        >>> out = gen(dict(points=points, lidar2img=[k], img_shape=[(16, 16)]))
        >>> depth = out['gt_depth'][0]
        >>> depth.shape, depth[0, 2].tolist(), int((depth > 0).sum())
        ((1, 4, 4), [-1.0, -1.0, 5.0, -1.0], 1)
    """

    def __init__(self, downsample: Union[int, Sequence[int]] = (4, 8, 16),
                 max_depth: float = 60.0) -> None:
        if isinstance(downsample, (int, np.integer)):
            downsample = [downsample]
        self.downsample = [int(s) for s in downsample]
        if not self.downsample or min(self.downsample) < 1:
            raise ValueError(f'MultiScaleDepthMapGenerator: strides must be >= 1, got '
                             f'{list(downsample)}')
        if max_depth < MIN_DEPTH:
            raise ValueError(f'MultiScaleDepthMapGenerator: max_depth {max_depth} < '
                             f'{MIN_DEPTH}')
        self.max_depth = float(max_depth)

    def transform(self, results: Dict) -> Dict:
        """Add ``results['gt_depth']``.

        Args:
            results (dict): The sample.

        Returns:
            dict: ``results``, modified in place.
        """
        name = type(self).__name__
        if 'points' not in results:
            raise KeyError(f'{name}: results has no points; load them with mmdet3d\'s '
                           'LoadPointsFromFile first')
        xyz = self._xyz(results['points'], name)
        if 'lidar2img' not in results:
            raise KeyError(f'{name}: results has no lidar2img')
        lidar2img = results['lidar2img']
        sizes = image_sizes(results, len(lidar2img), name)
        maps: List[List[np.ndarray]] = [[] for _ in self.downsample]
        for mat, (height, width) in zip(lidar2img, sizes):
            mat = np.asarray(mat, dtype=np.float64)
            cam = xyz @ mat[:3, :3].T + mat[:3, 3]
            depth = cam[:, 2]
            ahead = depth >= MIN_DEPTH
            cam, depth = cam[ahead], depth[ahead]
            u = np.round(cam[:, 0] / depth)
            v = np.round(cam[:, 1] / depth)
            inside = (u >= 0) & (u < width) & (v >= 0) & (v < height)
            u, v = u[inside].astype(np.int64), v[inside].astype(np.int64)
            depth = np.clip(depth[inside], MIN_DEPTH, self.max_depth)
            order = np.argsort(depth, kind='stable')  # nearest first
            u, v, depth = u[order], v[order], depth[order]
            for j, stride in enumerate(self.downsample):
                h, w = int(height / stride), int(width / stride)
                cu, cv = u // stride, v // stride
                fits = (cu < w) & (cv < h)
                cell = cv[fits] * w + cu[fits]
                # np.unique's return_index gives each cell's first, i.e. nearest, point.
                cells, first = np.unique(cell, return_index=True)
                depth_map = np.full(h * w, -1.0, dtype=np.float32)
                depth_map[cells] = depth[fits][first]
                maps[j].append(depth_map.reshape(h, w))
        for j, stride in enumerate(self.downsample):
            shapes = {m.shape for m in maps[j]}
            if len(shapes) > 1:
                raise ValueError(f'{name}: cameras give depth maps of different sizes '
                                 f'{sorted(shapes)} at stride {stride}')
        results['gt_depth'] = [
            np.stack(m) if m else np.zeros((0, 0, 0), np.float32) for m in maps]
        return results

    @staticmethod
    def _xyz(points, owner: str) -> np.ndarray:
        data = getattr(points, 'tensor', points)
        if isinstance(data, torch.Tensor):
            data = data.detach().cpu().numpy()
        data = np.asarray(data)
        if data.ndim != 2 or data.shape[1] < 3:
            raise ValueError(f'{owner}: points must be (n, >=3), got shape {data.shape}')
        return data[:, :3].astype(np.float64)

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(downsample={self.downsample}, '
                f'max_depth={self.max_depth})')
