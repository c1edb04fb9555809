"""Shapely's ``LineString.simplify(tolerance, preserve_topology=True)`` of an open polyline,
in numpy: GEOS's ``TopologyPreservingSimplifier`` (``TaggedLineStringSimplifier``) for one line.

Sections are simplified from the left (Douglas-Peucker): a section ``i..j`` becomes the
segment ``i-j`` when every point between lies within ``tolerance`` of that segment (GEOS's
``pointToSegment`` arithmetic) and the segment has no interior intersection with the input
segments outside the section that are still in place, nor with the segments flattened so far
(GEOS's ``LineIntersector`` on its robust orientation predicate: a floating-point filter,
then double-double arithmetic, ported here so that nearly collinear points fall the same
way); otherwise it is split at its furthest point (the first of equal ones).
"""
from typing import List

import numpy as np

__all__ = ['simplify_line', 'orientation_index']

#: GEOS's ``DP_SAFE_EPSILON``: the relative error bound of the orientation filter.
_SAFE_EPSILON = 1e-15
#: Dekker's splitter for double-double products (2^27 + 1).
_SPLIT = 134217729.0


def simplify_line(points: np.ndarray, tolerance: float) -> np.ndarray:
    """An open polyline simplified as shapely's ``simplify(tolerance, preserve_topology=True)``.

    GEOS's topology-preserving Douglas-Peucker, section by section from the left: a section
    ``i..j`` becomes the segment ``i-j`` when every point between lies within ``tolerance`` of
    that segment and the segment would not cross the line's interior elsewhere (the input
    segments outside the section that are still in place, and the segments flattened so far);
    otherwise it is split at its furthest point (the first of equal ones).

    Args:
        points (np.ndarray): ``(n, 2)`` vertices, no two consecutive equal.
        tolerance (float): Distance tolerance.

    Returns:
        np.ndarray: The kept vertices, ``(m, 2)``.

    Examples:
        >>> line = np.array([[0., 0.], [1., 0.1], [2., 0.], [3., 2.]])
        >>> simplify_line(line, 0.2).tolist()
        [[0.0, 0.0], [2.0, 0.0], [3.0, 2.0]]
    """
    n = len(points)
    if n < 3:
        return points.copy()
    in_place = np.ones(n - 1, bool)  # input segments not yet replaced by a flattened one
    flattened: List[tuple] = []
    keep = [0]
    stack = [(0, n - 1)]
    while stack:
        i, j = stack.pop()
        if j == i + 1:
            keep.append(j)
            continue
        distance = _segment_distances(points[i + 1:j], points[i], points[j])
        k = int(np.argmax(distance))
        if distance[k] <= tolerance and not _crosses(points, i, j, in_place, flattened):
            in_place[i:j] = False
            flattened.append((points[i], points[j]))
            keep.append(j)
            continue
        k += i + 1
        stack.append((k, j))
        stack.append((i, k))
    return points[keep]


def _segment_distances(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distances of points ``p`` to the segment ``a-b``, in GEOS's ``pointToSegment``
    arithmetic (so ties with the tolerance fall the same way)."""
    def to_point(q):
        return np.sqrt((p[:, 0] - q[0]) ** 2 + (p[:, 1] - q[1]) ** 2)

    if a[0] == b[0] and a[1] == b[1]:
        return to_point(a)
    dx, dy = b[0] - a[0], b[1] - a[1]
    length2 = dx * dx + dy * dy
    r = ((p[:, 0] - a[0]) * dx + (p[:, 1] - a[1]) * dy) / length2
    s = ((a[1] - p[:, 1]) * dx - (a[0] - p[:, 0]) * dy) / length2
    return np.where(r <= 0.0, to_point(a),
                    np.where(r >= 1.0, to_point(b), np.abs(s) * np.sqrt(length2)))


def _crosses(points: np.ndarray, i: int, j: int, in_place: np.ndarray,
             flattened: list) -> bool:
    """Whether the segment ``points[i]-points[j]`` meets, at a point that is not an end of
    both, an input segment outside ``i..j`` still in place or a flattened segment."""
    others = np.flatnonzero(in_place)
    others = others[(others < i) | (others >= j)]
    a = np.concatenate([points[others]] + [f[0][None] for f in flattened])
    b = np.concatenate([points[others + 1]] + [f[1][None] for f in flattened])
    if len(a) == 0:
        return False
    return bool(np.any(_interior_intersections(points[i], points[j], a, b)))


def _interior_intersections(p: np.ndarray, q: np.ndarray, a: np.ndarray,
                            b: np.ndarray) -> np.ndarray:
    """Per segment ``a-b``: GEOS's ``LineIntersector`` finds an intersection with ``p-q`` that
    is not an end point of both (``isInteriorIntersection``), case by case as
    ``computeIntersect`` and ``computeCollinearIntersection`` decide them."""
    pb, qb = np.broadcast_to(p, a.shape), np.broadcast_to(q, a.shape)
    pq1, pq2 = orientation_index(pb, qb, a), orientation_index(pb, qb, b)
    qp1, qp2 = orientation_index(a, b, pb), orientation_index(a, b, qb)
    apart = (((pq1 > 0) & (pq2 > 0)) | ((pq1 < 0) & (pq2 < 0)) | ((qp1 > 0) & (qp2 > 0))
             | ((qp1 < 0) & (qp2 < 0)))
    collinear = (pq1 == 0) & (pq2 == 0) & (qp1 == 0) & (qp2 == 0)

    def same(u, v):
        return np.all(u == v, axis=-1)

    shared = same(pb, a) | same(pb, b) | same(qb, a) | same(qb, b)
    touching = (pq1 == 0) | (pq2 == 0) | (qp1 == 0) | (qp2 == 0)
    # one point: proper (interior), or an end point on the other segment (interior unless
    # it is an end point of both)
    point = ~apart & ~collinear & (~touching | ~shared)

    def inside(s, t, r):  # r within the envelope of s-t
        return ((np.minimum(s[..., 0], t[..., 0]) <= r[..., 0])
                & (r[..., 0] <= np.maximum(s[..., 0], t[..., 0]))
                & (np.minimum(s[..., 1], t[..., 1]) <= r[..., 1])
                & (r[..., 1] <= np.maximum(s[..., 1], t[..., 1])))

    q1_in_p, q2_in_p = inside(pb, qb, a), inside(pb, qb, b)
    p1_in_q, p2_in_q = inside(a, b, pb), inside(a, b, qb)
    cases = [(q1_in_p & q2_in_p, a, b), (p1_in_q & p2_in_q, pb, qb), (q1_in_p & p1_in_q, a, pb),
             (q1_in_p & p2_in_q, a, qb), (q2_in_p & p1_in_q, b, pb), (q2_in_p & p2_in_q, b, qb)]
    overlap = np.zeros(len(a), bool)
    decided = ~collinear
    for hit, first, second in cases:
        take = hit & ~decided
        inner = np.zeros(len(a), bool)
        for x in (first, second):
            inner |= ~(same(x, pb) | same(x, qb)) | ~(same(x, a) | same(x, b))
        overlap |= take & inner
        decided |= take
    return point | overlap


def _dd_add(a: tuple, b: tuple) -> tuple:
    """Double-double ``a + b`` (GEOS's ``DD::selfAdd``)."""
    hi, lo = a
    yhi, ylo = b
    big = hi + yhi
    t = lo + ylo
    e = big - hi
    f = t - lo
    s = big - e
    tt = t - f
    s = (yhi - e) + (hi - s)
    tt = (ylo - f) + (lo - tt)
    e = s + t
    h = big + e
    small = e + (big - h)
    e = tt + small
    zhi = h + e
    return zhi, e + (h - zhi)


def _dd_mul(a: tuple, b: tuple) -> tuple:
    """Double-double ``a * b`` (GEOS's ``DD::selfMultiply``)."""
    hi, lo = a
    yhi, ylo = b
    c_big = _SPLIT * hi
    hx = c_big - hi
    c = _SPLIT * yhi
    hx = c_big - hx
    tx = hi - hx
    hy = c - yhi
    c_big = hi * yhi
    hy = c - hy
    ty = yhi - hy
    c = ((((hx * hy - c_big) + hx * ty) + tx * hy) + tx * ty) + (hi * ylo + lo * yhi)
    zhi = c_big + c
    return zhi, c + (c_big - zhi)


def _orientation_dd(p1x, p1y, p2x, p2y, qx, qy) -> int:
    """GEOS's double-double orientation of ``q`` against ``p1 -> p2``."""
    dx1 = _dd_add((p2x, 0.0), (-p1x, 0.0))
    dy1 = _dd_add((p2y, 0.0), (-p1y, 0.0))
    dx2 = _dd_add((qx, 0.0), (-p2x, 0.0))
    dy2 = _dd_add((qy, 0.0), (-p2y, 0.0))
    left, right = _dd_mul(dx1, dy2), _dd_mul(dy1, dx2)
    hi, lo = _dd_add(left, (-right[0], -right[1]))
    value = hi if hi != 0.0 else lo
    return int(value > 0) - int(value < 0)


def orientation_index(p1: np.ndarray, p2: np.ndarray, q: np.ndarray) -> np.ndarray:
    """GEOS's ``Orientation::index``: 1 where ``q`` lies left of ``p1 -> p2``, -1 right, 0 on
    the line; ``(..., 2)`` arrays. The filter of ``orientationIndexFilter`` decides where its
    error bound allows; the rest take GEOS's double-double determinant.

    Examples:
        >>> orientation_index(np.array([[0., 0.]]), np.array([[1., 0.]]),
        ...                   np.array([[0.5, 1.0]])).tolist()
        [1]
    """
    ax, ay = p1[..., 0], p1[..., 1]
    bx, by = p2[..., 0], p2[..., 1]
    cx, cy = q[..., 0], q[..., 1]
    left = (ax - cx) * (by - cy)
    right = (ay - cy) * (bx - cx)
    det = left - right
    out = np.sign(det).astype(np.int64)
    opposite = ((left > 0) & (right <= 0)) | ((left < 0) & (right >= 0)) | (left == 0)
    bound = _SAFE_EPSILON * np.abs(left + right)
    unsure = ~opposite & (np.abs(det) < bound)
    for k in zip(*np.nonzero(unsure)):
        out[k] = _orientation_dd(float(ax[k]), float(ay[k]), float(bx[k]), float(by[k]),
                                 float(cx[k]), float(cy[k]))
    return out
