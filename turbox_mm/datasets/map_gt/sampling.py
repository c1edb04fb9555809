"""MapTR's fixed-length point sets of map instances, in numpy.

The same numbers as upstream's ``LiDARInstanceLines`` (see :mod:`.reference`, whose
``*_reference`` functions are the spec, built on shapely's ``interpolate``):

- :func:`fixed_num_points` (``fixed_num_sampled_points``): ``fixed_num`` points at
  ``linspace(0, length, fixed_num)`` along each polyline, float32, clamped to the patch;
- :func:`shift_orders_v2` (``shift_fixed_num_sampled_points_v2``): the equivalent orders. A
  closed ring (first point == last) with ``m`` distinct vertices has ``m`` orders: for each
  rotation of its vertices (``np.roll`` by ``0 .. m - 1``, re-closed) the ``fixed_num``
  points by length; sampling the rotation that starts at vertex ``k`` is sampling the ring
  at arc length ``(s_k + d) mod L``, so all rotations come from one interpolation. An open
  polyline has two: forwards and backwards. More than ``fixed_num - 1`` orders: that many
  drawn without replacement with ``rng.choice`` (upstream's unseeded ``np.random.choice``;
  pass a seeded generator for reproducible targets); fewer: padded with ``padding_value``
  after clamping. A centerline (label 3, MapTR v2) has its forward order only, closed or
  not (upstream tests the label first);
- :func:`instance_bboxes` (``bbox``): bounds, float32, clamped.
"""
from typing import Optional

import numpy as np

from .centerline_reference import CENTERLINE_LABEL


class _Polyline:
    """One polyline's arc-length parametrisation (repeated vertices dropped, as zero-length
    steps of shapely's ``interpolate``)."""

    def __init__(self, points):
        points = np.asarray(points, np.float64)
        steps = np.sqrt(np.sum(np.diff(points, axis=0) ** 2, axis=1))
        s = np.concatenate([[0.0], np.cumsum(steps)])
        self.closed = bool(np.array_equal(points[0], points[-1]))
        self.vertices = len(points) - 1 if self.closed else len(points)
        self.s_all = s
        self.length = s[-1]
        keep = np.concatenate([[True], steps > 0])
        self.s, self.points = s[keep], points[keep]

    def at(self, distances: np.ndarray) -> np.ndarray:
        """Points at arc lengths ``distances`` (any shape), clamped to the ends."""
        if self.length == 0:
            return np.broadcast_to(self.points[0], distances.shape + (2, )).copy()
        return np.stack([np.interp(distances, self.s, self.points[:, 0]),
                         np.interp(distances, self.s, self.points[:, 1])], axis=-1)

    def orders(self, fixed_num: int, forward_only: bool = False) -> tuple:
        """The evenly spaced points, and every equivalent order of them (pattern 'v2'; only
        the forward one with ``forward_only``)."""
        distances = np.linspace(0, self.length, fixed_num)
        if forward_only:
            forward = self.at(distances)
            return forward, forward[None]
        if not self.closed:
            forward = self.at(distances)
            return forward, np.stack([forward, forward[::-1]])
        m = self.vertices
        # np.roll(ring, shift) starts at vertex (m - shift) % m
        starts = self.s_all[(m - np.arange(m)) % m]
        shifted = (np.mod(starts[:, None] + distances[None, :], self.length)
                   if self.length > 0 else np.zeros((m, fixed_num)))
        return self.at(distances), self.at(shifted)


def _clamp(points: np.ndarray, half_x: float, half_y: float) -> np.ndarray:
    points = points.astype(np.float32)
    np.clip(points[..., 0], -half_x, half_x, out=points[..., 0])
    np.clip(points[..., 1], -half_y, half_y, out=points[..., 1])
    return points


def fixed_num_points(polylines: list, fixed_num: int = 20, patch_size=(60.0, 30.0)) -> np.ndarray:
    """``[N, fixed_num, 2]`` float32 points evenly spaced by length, clamped to the patch.

    Args:
        polylines (list[np.ndarray]): ``(k_i, 2)`` polylines, ``k_i >= 2``.
        fixed_num (int): Points per instance. Defaults to 20.
        patch_size (tuple[float, float]): ``(patch_h, patch_w)``. Defaults to (60, 30).

    Examples:
        >>> fixed_num_points([np.array([[0., 0.], [3., 0.]])], fixed_num=4)[0, :, 0]
        array([0., 1., 2., 3.], dtype=float32)
    """
    out = np.zeros((len(polylines), fixed_num, 2), np.float64)
    for i, points in enumerate(polylines):
        line = _Polyline(points)
        out[i] = line.at(np.linspace(0, line.length, fixed_num))
    return _clamp(out, patch_size[1] / 2, patch_size[0] / 2)


def _orders_into(out: np.ndarray, orders: np.ndarray, rng, half_x: float,
                 half_y: float) -> None:
    keep = out.shape[0]
    if len(orders) > keep:
        orders = orders[rng.choice(len(orders), keep, replace=False)]
    out[:len(orders)] = _clamp(orders, half_x, half_y)


def shift_orders_v2(polylines: list, fixed_num: int = 20, patch_size=(60.0, 30.0),
                    padding_value: float = -10000, rng=None,
                    labels: Optional[np.ndarray] = None) -> np.ndarray:
    """The equivalent point orders of each instance (MapTR's shift pattern ``'v2'``).

    Args:
        polylines (list[np.ndarray]): ``(k_i, 2)`` polylines; a closed ring repeats its
            first point at the end.
        fixed_num (int): Points per order. Defaults to 20.
        patch_size (tuple[float, float]): ``(patch_h, patch_w)``. Defaults to (60, 30).
        padding_value (float): Value of the padding orders. Defaults to -10000.
        rng (np.random.Generator | np.random.RandomState, optional): Draws the orders kept
            of a ring with more than ``fixed_num - 1`` vertices. Defaults to numpy's global
            generator, as upstream.
        labels (np.ndarray, optional): ``[N]`` labels; a centerline (3) gets its forward
            order only. Defaults to None (no centerlines).

    Returns:
        np.ndarray: ``[N, fixed_num - 1, fixed_num, 2]`` float32.

    Examples:
        >>> square = np.array([[0., 0.], [0., 2.], [2., 2.], [2., 0.], [0., 0.]])
        >>> orders = shift_orders_v2([square], fixed_num=6)  # 5 slots, 4 orders
        >>> orders[0, :4, 0].tolist()  # starts at vertices 0, 3, 2, 1
        [[0.0, 0.0], [2.0, 0.0], [2.0, 2.0], [0.0, 2.0]]
        >>> float(orders[0, 4, 0, 0])
        -10000.0
    """
    rng = np.random if rng is None else rng
    out = np.full((len(polylines), fixed_num - 1, fixed_num, 2), padding_value, np.float32)
    forward_only = _centerlines(labels, len(polylines))
    for i, points in enumerate(polylines):
        _orders_into(out[i], _Polyline(points).orders(fixed_num, forward_only[i])[1], rng,
                     patch_size[1] / 2, patch_size[0] / 2)
    return out


def _centerlines(labels: Optional[np.ndarray], count: int) -> np.ndarray:
    """Which instances are centerlines (their equivalent orders: forward only)."""
    if labels is None:
        return np.zeros(count, bool)
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != count:
        raise ValueError(f'{count} polylines but {len(labels)} labels')
    return labels == CENTERLINE_LABEL


def instance_bboxes(polylines: list, patch_size=(60.0, 30.0)) -> np.ndarray:
    """``[N, 4]`` float32 ``(xmin, ymin, xmax, ymax)`` of each polyline, clamped."""
    out = np.zeros((len(polylines), 4), np.float32)
    for i, points in enumerate(polylines):
        points = np.asarray(points, np.float64)
        out[i] = np.concatenate([points.min(0), points.max(0)])
    half_x, half_y = patch_size[1] / 2, patch_size[0] / 2
    out[:, 0::2] = np.clip(out[:, 0::2], -half_x, half_x)
    out[:, 1::2] = np.clip(out[:, 1::2], -half_y, half_y)
    return out


def map_targets(polylines: list, labels: np.ndarray, fixed_num: int = 20,
                patch_size=(60.0, 30.0), padding_value: float = -10000,
                with_shifts: bool = True, rng: Optional[object] = None) -> dict:
    """Everything a MapTR head reads of one sample's map, as arrays (empty ones when the
    patch holds no map element); one pass over each polyline.

    Returns:
        dict: ``gt_map_labels`` ``[N]`` int64, ``gt_map_pts`` ``[N, fixed_num, 2]``,
        ``gt_map_bboxes`` ``[N, 4]``, ``gt_map_shifts`` ``[N, fixed_num - 1, fixed_num, 2]``
        (if ``with_shifts``) float32, ``gt_map_polylines`` (the float64 polylines).
    """
    rng = np.random if rng is None else rng
    half_x, half_y = patch_size[1] / 2, patch_size[0] / 2
    polylines = [np.asarray(p, np.float64) for p in polylines]
    pts = np.zeros((len(polylines), fixed_num, 2), np.float64)
    shifts = np.full((len(polylines), fixed_num - 1, fixed_num, 2), padding_value, np.float32)
    forward_only = _centerlines(labels, len(polylines))
    for i, points in enumerate(polylines):
        line = _Polyline(points)
        if with_shifts:
            pts[i], orders = line.orders(fixed_num, forward_only[i])
            _orders_into(shifts[i], orders, rng, half_x, half_y)
        else:
            pts[i] = line.at(np.linspace(0, line.length, fixed_num))
    out = dict(gt_map_labels=np.asarray(labels, np.int64).reshape(-1),
               gt_map_pts=_clamp(pts, half_x, half_y),
               gt_map_bboxes=instance_bboxes(polylines, patch_size),
               gt_map_polylines=polylines)
    if with_shifts:
        out['gt_map_shifts'] = shifts
    return out
