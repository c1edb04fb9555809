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
  after clamping;
- :func:`instance_bboxes` (``bbox``): bounds, float32, clamped.
"""
from typing import Optional

import numpy as np


def _arc_lengths(points: np.ndarray) -> np.ndarray:
    steps = np.sqrt(np.sum(np.diff(points, axis=0) ** 2, axis=1))
    return np.concatenate([[0.0], np.cumsum(steps)])


def _interpolate(points: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Points at arc lengths ``at`` along a polyline (shapely's ``interpolate``: clamped to
    the ends; a repeated vertex is a zero-length step)."""
    s = _arc_lengths(points)
    if s[-1] == 0:
        return np.repeat(points[:1], len(at), axis=0)
    keep = np.concatenate([[True], np.diff(s) > 0])
    s, points = s[keep], points[keep]
    return np.stack([np.interp(at, s, points[:, 0]), np.interp(at, s, points[:, 1])], axis=-1)


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
        points = np.asarray(points, np.float64)
        out[i] = _interpolate(points, np.linspace(0, _arc_lengths(points)[-1], fixed_num))
    return _clamp(out, patch_size[1] / 2, patch_size[0] / 2)


def shift_orders_v2(polylines: list, fixed_num: int = 20, patch_size=(60.0, 30.0),
                    padding_value: float = -10000, rng=None) -> np.ndarray:
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

    Returns:
        np.ndarray: ``[N, fixed_num - 1, fixed_num, 2]`` float32.

    Examples:
        >>> square = np.array([[0., 0.], [0., 2.], [2., 2.], [2., 0.], [0., 0.]])
        >>> orders = shift_orders_v2([square], fixed_num=5)
        >>> orders[0, :4, 0].tolist()  # starts at vertices 0, 3, 2, 1
        [[0.0, 0.0], [2.0, 0.0], [2.0, 2.0], [0.0, 2.0]]
        >>> float(orders[0, 4, 0, 0])
        -10000.0
    """
    rng = np.random if rng is None else rng
    keep = fixed_num - 1
    out = np.full((len(polylines), keep, fixed_num, 2), padding_value, np.float32)
    half_x, half_y = patch_size[1] / 2, patch_size[0] / 2
    for i, points in enumerate(polylines):
        points = np.asarray(points, np.float64)
        s = _arc_lengths(points)
        length = s[-1]
        distances = np.linspace(0, length, fixed_num)
        if np.array_equal(points[0], points[-1]):
            m = len(points) - 1
            # np.roll(ring, shift) starts at vertex (m - shift) % m
            starts = s[(m - np.arange(m)) % m]
            at = np.mod(starts[:, None] + distances[None, :], length) if length > 0 else (
                np.zeros((m, fixed_num)))
            orders = _interpolate(points, at.reshape(-1)).reshape(m, fixed_num, 2)
        else:
            forward = _interpolate(points, distances)
            orders = np.stack([forward, forward[::-1]])
        if len(orders) > keep:
            orders = orders[rng.choice(len(orders), keep, replace=False)]
        out[i, :len(orders)] = _clamp(orders, half_x, half_y)
    return out


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
    patch holds no map element).

    Returns:
        dict: ``gt_map_labels`` ``[N]`` int64, ``gt_map_pts`` ``[N, fixed_num, 2]``,
        ``gt_map_bboxes`` ``[N, 4]``, ``gt_map_shifts`` ``[N, fixed_num - 1, fixed_num, 2]``
        (if ``with_shifts``) float32, ``gt_map_polylines`` (the float64 polylines).
    """
    out = dict(gt_map_labels=np.asarray(labels, np.int64).reshape(-1),
               gt_map_pts=fixed_num_points(polylines, fixed_num, patch_size),
               gt_map_bboxes=instance_bboxes(polylines, patch_size),
               gt_map_polylines=[np.asarray(p, np.float64) for p in polylines])
    if with_shifts:
        out['gt_map_shifts'] = shift_orders_v2(polylines, fixed_num, patch_size, padding_value,
                                               rng)
    return out
