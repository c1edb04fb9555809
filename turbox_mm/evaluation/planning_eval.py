"""Pure functions of SparseDrive's planning evaluation (upstream's ``planning_eval.py``,
swc-17/SparseDrive @ ffebeb4; ST-P3 / VAD's L2 and collision rates).

Per evaluated sample (``docs/design/sparsedrive.md`` section 8, "Planning"): the L2 distance
between the planned and the true ego position at each future step, and whether an ego box
placed at each position collides with one of that step's annotated boxes
(:func:`ego_collisions`). The ego box is 4.084 m long (along the heading) and 1.85 m wide;
its heading comes from central differences of the trajectory (:func:`ego_yaw`) and its
centre sits 0.5 m ahead of the trajectory point along that heading. Boxes are compared as
BEV rectangles with an exact separating-axis test (:func:`rectangles_intersect`), which
agrees with upstream's shapely ``Polygon.intersects`` (touching counts as a collision).
"""
from typing import Sequence

import numpy as np

#: Ego box length along the heading and width (m), upstream's ``PlanningMetric`` H and W.
EGO_LENGTH = 4.084
EGO_WIDTH = 1.85
#: Shift of the ego box centre ahead of the trajectory point along the heading (m).
EGO_FORWARD_OFFSET = 0.5
#: When the first and last points are closer than this (m) every heading is pi / 2.
STATIONARY_DISTANCE = 0.5
#: Evaluated steps (0.5 s ... 3 s at 2 Hz).
NUM_STEPS = 6
#: Reported horizons in seconds and their step counts (2 Hz).
HORIZONS = {'1s': 2, '2s': 4, '3s': 6}


def ego_yaw(traj: np.ndarray, stationary_distance: float = STATIONARY_DISTANCE) -> np.ndarray:
    """Heading of the ego at each trajectory point, in the trajectory's frame.

    With ``p_0`` the origin: step ``k < T`` gets ``atan2`` of ``p_{k+1} - p_{k-1}``, the last
    step of ``p_T - p_{T-1}``. When ``|p_T - p_1| < stationary_distance`` (first to last
    planned point, not from the origin) every step gets pi / 2 (straight ahead in the lidar
    frame).

    Args:
        traj (np.ndarray): ``[T, 2]`` cumulative positions, ``T >= 1``.
        stationary_distance (float): Defaults to 0.5.

    Returns:
        np.ndarray: float64 ``[T]`` radians.

    Examples:
        >>> ego_yaw(np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])).tolist()
        [0.0, 0.0, 0.0]
        >>> ego_yaw(np.zeros((6, 2)))[0] == np.pi / 2
        True
    """
    traj = np.asarray(traj, dtype=np.float64)
    if np.linalg.norm(traj[-1] - traj[0]) < stationary_distance:
        return np.full(len(traj), np.pi / 2)
    points = np.concatenate([np.zeros((1, 2)), traj])
    delta = np.concatenate([points[2:] - points[:-2], points[-1:] - points[-2:-1]])
    return np.arctan2(delta[:, 1], delta[:, 0])


def rectangle_corners(centres: np.ndarray, length: np.ndarray, width: np.ndarray,
                      yaw: np.ndarray) -> np.ndarray:
    """BEV corners of rectangles, length along the heading.

    Args:
        centres (np.ndarray): ``[N, 2]``.
        length (np.ndarray): ``[N]`` (or a scalar) extent along the heading.
        width (np.ndarray): ``[N]`` (or a scalar) extent across it.
        yaw (np.ndarray): ``[N]`` heading from the x axis.

    Returns:
        np.ndarray: float64 ``[N, 4, 2]``, in order around the rectangle.

    Examples:
        >>> rectangle_corners(np.zeros((1, 2)), 4.0, 2.0, np.zeros(1))[0].tolist()
        [[-2.0, -1.0], [-2.0, 1.0], [2.0, 1.0], [2.0, -1.0]]
    """
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    num = len(centres)
    half_l = np.broadcast_to(np.asarray(length, np.float64), (num, )) / 2
    half_w = np.broadcast_to(np.asarray(width, np.float64), (num, )) / 2
    yaw = np.broadcast_to(np.asarray(yaw, np.float64), (num, ))
    signs = np.array([[-1.0, -1.0], [-1.0, 1.0], [1.0, 1.0], [1.0, -1.0]])
    local = signs[None] * np.stack([half_l, half_w], axis=-1)[:, None]  # [N, 4, 2]
    cos, sin = np.cos(yaw)[:, None], np.sin(yaw)[:, None]
    x = local[..., 0] * cos - local[..., 1] * sin
    y = local[..., 0] * sin + local[..., 1] * cos
    return np.stack([x, y], axis=-1) + centres[:, None]


def rectangles_intersect(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Whether convex quadrilaterals overlap or touch (separating-axis test), all pairs.

    Two convex polygons are disjoint exactly when the normal of one of their edges
    separates their projections strictly; so shared boundary points count as an
    intersection, as shapely's ``intersects``.

    Args:
        first (np.ndarray): ``[N, 4, 2]`` corners in order around each polygon.
        second (np.ndarray): ``[M, 4, 2]``.

    Returns:
        np.ndarray: bool ``[N, M]``.

    Examples:
        >>> unit = rectangle_corners(np.zeros((1, 2)), 1.0, 1.0, np.zeros(1))
        >>> rectangles_intersect(unit, unit + [[1.0, 0.0]]).tolist()  # sharing an edge
        [[True]]
        >>> rectangles_intersect(unit, unit + [[1.5, 0.0]]).tolist()
        [[False]]
    """
    first = np.asarray(first, dtype=np.float64)
    second = np.asarray(second, dtype=np.float64)

    def normals(poly):  # [K, 4, 2] edge normals (unnormalised)
        edge = np.roll(poly, -1, axis=1) - poly
        return np.stack([-edge[..., 1], edge[..., 0]], axis=-1)

    def separated(axes, own, other):
        # axes [N, 4, 2] of `own` [N, 4, 2]; other [M, 4, 2] -> [N, M] any separating axis
        own_proj = np.einsum('nap,nkp->nak', axes, own)  # [N, axis, corner]
        other_proj = np.einsum('nap,mkp->nmak', axes, other)
        lo, hi = own_proj.min(-1)[:, None], own_proj.max(-1)[:, None]
        return ((other_proj.max(-1) < lo) | (other_proj.min(-1) > hi)).any(-1)

    if len(first) == 0 or len(second) == 0:
        return np.zeros((len(first), len(second)), dtype=bool)
    apart = separated(normals(first), first, second)
    apart |= separated(normals(second), second, first).T
    return ~apart


def ego_collisions(traj: np.ndarray, fut_boxes: Sequence[np.ndarray],
                   length: float = EGO_LENGTH, width: float = EGO_WIDTH,
                   forward_offset: float = EGO_FORWARD_OFFSET) -> np.ndarray:
    """Whether the ego box at each trajectory point collides with that step's boxes.

    Args:
        traj (np.ndarray): ``[T, 2]`` cumulative positions (lidar frame).
        fut_boxes (Sequence[np.ndarray]): ``T`` arrays ``[m_t, >= 7]`` ``(x, y, z, l, w, h,
            yaw, ...)`` in the same frame (length along ``yaw``); ``m_t`` may be 0.
        length (float): Ego length. Defaults to 4.084.
        width (float): Ego width. Defaults to 1.85.
        forward_offset (float): Ego centre ahead of the point along the heading. Defaults
            to 0.5.

    Returns:
        np.ndarray: bool ``[T]``.

    Examples:
        >>> traj = np.stack([np.zeros(6), np.arange(1.0, 7.0)], axis=1)  # straight ahead
        >>> car = np.array([[0.0, 6.0, 0.0, 4.0, 2.0, 1.5, 0.0]])
        >>> ego_collisions(traj, [np.zeros((0, 7))] * 2 + [car] + [np.zeros((0, 7))] * 3)
        array([False, False,  True, False, False, False])
    """
    traj = np.asarray(traj, dtype=np.float64)
    yaw = ego_yaw(traj)
    centres = traj + forward_offset * np.stack([np.cos(yaw), np.sin(yaw)], axis=-1)
    ego = rectangle_corners(centres, length, width, yaw)
    out = np.zeros(len(traj), dtype=bool)
    for step in range(len(traj)):
        boxes = np.asarray(fut_boxes[step], dtype=np.float64).reshape(-1, 7)
        if len(boxes):
            corners = rectangle_corners(boxes[:, :2], boxes[:, 3], boxes[:, 4], boxes[:, 6])
            out[step] = rectangles_intersect(ego[step:step + 1], corners).any()
    return out


def horizon_means(per_step: np.ndarray) -> np.ndarray:
    """Value at horizon ``t`` = mean of the per-step values from the first step to ``t``
    (ST-P3 / VAD's convention, upstream's table).

    Args:
        per_step (np.ndarray): ``[T]``.

    Returns:
        np.ndarray: float64 ``[T]``.

    Examples:
        >>> horizon_means(np.array([1.0, 2.0, 3.0, 4.0])).tolist()
        [1.0, 1.5, 2.0, 2.5]
    """
    per_step = np.asarray(per_step, dtype=np.float64)
    return np.cumsum(per_step) / np.arange(1, len(per_step) + 1)


__all__ = ['EGO_FORWARD_OFFSET', 'EGO_LENGTH', 'EGO_WIDTH', 'HORIZONS', 'NUM_STEPS',
           'STATIONARY_DISTANCE', 'ego_collisions', 'ego_yaw', 'horizon_means',
           'rectangle_corners', 'rectangles_intersect']
