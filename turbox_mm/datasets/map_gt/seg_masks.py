"""MapTR v2's auxiliary segmentation targets: the map ground truth drawn as lines in the BEV
grid and in every camera's feature map.

Upstream (hustvl/MapTR ``nuscenes_offlinemap_dataset.py`` @ 69ab751, ``VectorizedLocalMap``
with ``aux_seg``) draws each instance's own polyline (its vertices, not the fixed-number
samples) with ``cv2.polylines`` (open, colour 1, 8-connected), after converting the pixel
coordinates to int32 by truncation towards zero (numpy's float -> int cast):

- :func:`bev_seg_mask` (``line_ego_to_mask``): ``x * (W / patch_w) + W / 2`` and
  ``y * (H / patch_h) + H / 2``, so row = y cell with row 0 at ``y = -patch_h / 2`` and
  column = x cell; thickness 3;
- :func:`pv_seg_mask` (``line_ego_to_pvmask``): 200 points evenly spaced by length along the
  line, at a fixed height ``z`` (-1.6 m), through ``diag(1/d, 1/d, 1, 1) @ lidar2img`` (``d``
  = ``feat_down_sample``; upstream hard-codes ``d = 32`` here while sizing the mask by
  ``feat_down_sample``: the same for its configs, where both are 32), points with depth <= 0
  dropped, the rest divided by ``depth + 1e-7``
  and joined as one polyline; thickness ``pv_thickness`` (1).

With one class (``seg_classes=1``) every instance goes to channel 0; otherwise to the channel
of its label.
"""
from typing import Sequence, Tuple

import cv2
import numpy as np

#: Upstream's ``line_ego_to_pvmask`` defaults: samples per line and their height (m).
PV_NUM_POINTS = 200
PV_Z = -1.6


def _channel(label: int, seg_classes: int) -> int:
    if seg_classes == 1:
        return 0
    if not 0 <= label < seg_classes:
        raise ValueError(f'map label {label} has no channel among seg_classes={seg_classes} '
                         '(with several classes, the mask has one channel per label)')
    return int(label)


def _draw(mask: np.ndarray, pixels: np.ndarray, thickness: int) -> None:
    """Draw an open polyline of float pixel coordinates ``(k, 2)`` as ``(x, y)``, cast to
    int32 by truncation as upstream's ``np.int32`` / ``np.array(..., dtype=np.int32)``."""
    with np.errstate(invalid='ignore'):  # far points overflow int32 as in upstream's cast
        points = np.ascontiguousarray(pixels, dtype=np.float64).astype(np.int32)
    cv2.polylines(mask, [points.reshape(-1, 1, 2)], False, color=1, thickness=thickness)


def bev_seg_mask(polylines: Sequence[np.ndarray], labels: Sequence[int],
                 bev_size: Tuple[int, int] = (200, 100),
                 patch_size: Tuple[float, float] = (60.0, 30.0), seg_classes: int = 1,
                 thickness: int = 3) -> np.ndarray:
    """The BEV mask: every map instance drawn in the ``bev_h x bev_w`` grid of the patch.

    Args:
        polylines (Sequence[np.ndarray]): ``(k_i, 2)`` vertices in the lidar frame (metres),
            ``LoadMapGT``'s ``gt_map_polylines``.
        labels (Sequence[int]): The instances' labels.
        bev_size (tuple[int, int]): ``(bev_h, bev_w)``. Defaults to (200, 100).
        patch_size (tuple[float, float]): ``(patch_h, patch_w)``: extent along y, then x.
            Defaults to (60, 30).
        seg_classes (int): 1 (every class in one channel) or the number of channels, one per
            label. Defaults to 1.
        thickness (int): Line thickness in cells. Defaults to 3.

    Returns:
        np.ndarray: ``[seg_classes, bev_h, bev_w]`` uint8, 1 on the lines.

    Examples:
        >>> line = np.array([[-15.0, -30.0], [15.0, -30.0]])  # along x at y = -30
        >>> mask = bev_seg_mask([line], [0], bev_size=(20, 10), thickness=1)
        >>> mask.shape, mask[0, 0].tolist()
        ((1, 20, 10), [1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    """
    bev_h, bev_w = int(bev_size[0]), int(bev_size[1])
    scale_x = bev_w / patch_size[1]
    scale_y = bev_h / patch_size[0]
    mask = np.zeros((seg_classes, bev_h, bev_w), np.uint8)
    for polyline, label in zip(polylines, labels):
        points = np.asarray(polyline, np.float64)[:, :2]
        pixels = np.stack([points[:, 0] * scale_x + bev_w / 2,
                           points[:, 1] * scale_y + bev_h / 2], axis=-1)
        _draw(mask[_channel(int(label), seg_classes)], pixels, thickness)
    return mask


def points_along(polyline: np.ndarray, num: int) -> np.ndarray:
    """``num`` points evenly spaced by arc length from the first vertex to the last (shapely's
    ``interpolate`` at ``linspace(0, length, num)``).

    Args:
        polyline (np.ndarray): ``(k, 2)`` vertices, ``k >= 1``.
        num (int): Points wanted.

    Returns:
        np.ndarray: ``(num, 2)`` float64.

    Examples:
        >>> points_along(np.array([[0., 0.], [2., 0.], [2., 2.]]), 5).tolist()
        [[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [2.0, 1.0], [2.0, 2.0]]
    """
    points = np.asarray(polyline, np.float64)[:, :2]
    steps = np.sqrt(np.sum(np.diff(points, axis=0) ** 2, axis=1))
    keep = np.concatenate([[True], steps > 0])  # zero-length steps: shapely skips them
    arc = np.concatenate([[0.0], np.cumsum(steps)])[keep]
    points = points[keep]
    distances = np.linspace(0.0, arc[-1], num)
    if len(points) == 1:
        return np.repeat(points, num, axis=0)
    return np.stack([np.interp(distances, arc, points[:, 0]),
                     np.interp(distances, arc, points[:, 1])], axis=-1)


def pv_seg_mask(polylines: Sequence[np.ndarray], labels: Sequence[int], lidar2img,
                feat_shape: Tuple[int, int], feat_down_sample: int = 32,
                seg_classes: int = 1, thickness: int = 1, z: float = PV_Z,
                num_points: int = PV_NUM_POINTS) -> np.ndarray:
    """The perspective-view masks: every map instance drawn in each camera's feature map.

    Args:
        polylines (Sequence[np.ndarray]): ``(k_i, 2)`` vertices in the lidar frame (metres).
        labels (Sequence[int]): The instances' labels.
        lidar2img (array-like): ``[N, 4, 4]`` lidar -> image pixels of the (scaled) images.
        feat_shape (tuple[int, int]): ``(fH, fW)``, the feature map (upstream: the padded
            image size // ``feat_down_sample``).
        feat_down_sample (int): Stride of the feature map; pixels are scaled by its inverse.
            Defaults to 32.
        seg_classes (int): 1 or one channel per label. Defaults to 1.
        thickness (int): Line thickness in feature cells. Defaults to 1.
        z (float): Height of the lines in the lidar frame (m). Defaults to -1.6.
        num_points (int): Samples per line. Defaults to 200.

    Returns:
        np.ndarray: ``[N, seg_classes, fH, fW]`` uint8.

    Examples:
        >>> lidar2img = np.array([[[32., 0., 0., 0.], [0., 0., -32., 0.],  # camera looks
        ...                        [0., 1., 0., 0.], [0., 0., 0., 1.]]])    # along lidar y
        >>> line = np.array([[-2.0, 10.0], [2.0, 10.0]])  # 10 m ahead, z = -1.6: row 0.16
        >>> mask = pv_seg_mask([line], [0], lidar2img, feat_shape=(2, 4))
        >>> mask[0, 0].tolist()  # columns -0.2 .. 0.2 truncate to 0
        [[1, 0, 0, 0], [0, 0, 0, 0]]
    """
    lidar2img = np.asarray(lidar2img, np.float64).reshape(-1, 4, 4)
    feat_h, feat_w = int(feat_shape[0]), int(feat_shape[1])
    mask = np.zeros((len(lidar2img), seg_classes, feat_h, feat_w), np.uint8)
    if len(polylines) == 0:
        return mask
    scale = np.diag([1.0 / feat_down_sample, 1.0 / feat_down_sample, 1.0, 1.0])
    lidar2feat = scale @ lidar2img  # [N, 4, 4]
    # [L, 4, num_points]: (x, y, z, 1) columns, as upstream's lidar_coords
    samples = np.stack([points_along(p, num_points) for p in polylines])
    coords = np.concatenate([samples, np.full(samples.shape[:2] + (1, ), float(z)),
                             np.ones(samples.shape[:2] + (1, ))], axis=-1).transpose(0, 2, 1)
    projected = lidar2feat[:, None] @ coords[None]  # [N, L, 4, num_points]
    channels = [_channel(int(label), seg_classes) for label in labels]
    for cam in range(len(lidar2feat)):
        for line, channel in enumerate(channels):
            pix = projected[cam, line]
            valid = pix[2] > 0
            pixels = (pix[:2, valid] / (pix[2, valid] + 1e-7)).T
            _draw(mask[cam, channel], pixels, thickness)
    return mask
