"""Cutting polylines and polygon outlines with an axis-aligned box, in numpy.

The fast map ground truth works in the patch frame, where the turned map patch is the box
``|x| <= half_x, |y| <= half_y``. Three operations cover what upstream does with shapely:

- :func:`clip_arcs`: the pieces of polylines inside a box (Liang-Barsky per edge, vectorised
  over edges), in order along each polyline, as shapely's ``line.intersection(box)`` gives
  them; for a ring whose first point lies inside, the piece through that point is joined up,
  as ``linemerge`` does after shapely cuts the ring there. A ring wholly inside comes back
  closed (its last point bit-identical to its first).
- :func:`link_rings`: the outlines of polygons cut by the box, from the pieces of their rings
  (outlines oriented with the polygon on their right: exteriors clockwise, holes
  counter-clockwise): from where a piece leaves the box, walk the box's edge clockwise to the
  next piece that enters, as a rectangle clipper does.
- :func:`box_ring`: the box's own outline, clockwise.

Pieces touching the box in a single point, and pieces of zero length, are dropped;
consecutive repeated points are removed.
"""
import numpy as np

from .polyline_set import PolylineSet


def _slab(a, d, lo, hi):
    """Liang-Barsky interval ``[t_lo, t_hi]`` of ``a + t d`` inside ``[lo, hi]`` (per edge)."""
    with np.errstate(divide='ignore', invalid='ignore'):
        t_a = (lo - a) / d
        t_b = (hi - a) / d
    inside = (a >= lo) & (a <= hi)
    flat = d == 0
    t_lo = np.where(flat, np.where(inside, -np.inf, np.inf), np.minimum(t_a, t_b))
    t_hi = np.where(flat, np.where(inside, np.inf, -np.inf), np.maximum(t_a, t_b))
    return t_lo, t_hi


def _dedupe(points: np.ndarray) -> np.ndarray:
    if len(points) < 2:
        return points
    keep = np.ones(len(points), bool)
    keep[1:] = np.any(points[1:] != points[:-1], axis=1)
    return points[keep]


def clip_arcs(pset: PolylineSet, edges: np.ndarray, to_local, half_x: float,
              half_y: float) -> list:
    """The pieces of a set's polylines inside the box ``|x| <= half_x, |y| <= half_y``.

    Args:
        pset (PolylineSet): The polylines (global frame).
        edges (np.ndarray): Sorted candidate edge ids (every edge that may meet the box).
        to_local (callable): Maps global ``(N, 2)`` points into the box's frame.
        half_x (float): Half width of the box.
        half_y (float): Half height of the box.

    Returns:
        list[tuple[int, np.ndarray, bool]]: ``(polyline index, points (k, 2), closed)`` per
        piece, polyline by polyline, pieces in order along each polyline (a ring's joined
        piece, when its first point is inside, comes first).
    """
    if len(edges) == 0:
        return []
    a = to_local(pset.points[edges])
    b = to_local(pset.points[edges + 1])
    d = b - a
    x_lo, x_hi = _slab(a[:, 0], d[:, 0], -half_x, half_x)
    y_lo, y_hi = _slab(a[:, 1], d[:, 1], -half_y, half_y)
    t0 = np.maximum(np.maximum(x_lo, y_lo), 0.0)
    t1 = np.minimum(np.minimum(x_hi, y_hi), 1.0)
    flat = (d[:, 0] == 0) & (d[:, 1] == 0)
    keep = (t0 < t1) | (flat & (t0 <= t1))
    if not keep.any():
        return []
    edges, a, b, d, t0, t1 = edges[keep], a[keep], b[keep], d[keep], t0[keep], t1[keep]
    start = np.where((t0 == 0)[:, None], a, a + t0[:, None] * d)
    end = np.where((t1 == 1)[:, None], b, a + t1[:, None] * d)
    joined = (edges[1:] == edges[:-1] + 1) & (t1[:-1] == 1) & (t0[1:] == 0)
    breaks = np.flatnonzero(~joined) + 1
    firsts = np.concatenate([[0], breaks])
    lasts = np.concatenate([breaks - 1, [len(edges) - 1]])
    lines = pset.polyline_of(edges[firsts])
    pieces = []  # (line, points, starts at the ring's first point, ends at its last)
    for first, last, line in zip(firsts, lasts, lines):
        points = np.concatenate([start[first:first + 1], end[first:last + 1]])
        ring = bool(pset.closed[line])
        head = ring and edges[first] == pset.offsets[line] and t0[first] == 0
        tail = ring and edges[last] == pset.offsets[line + 1] - 2 and t1[last] == 1
        pieces.append([int(line), points, head, tail])
    out = []
    by_line = {}
    for piece in pieces:
        by_line.setdefault(piece[0], []).append(piece)
    for line, items in by_line.items():
        head = next((p for p in items if p[2]), None)
        tail = next((p for p in items if p[3]), None)
        if head is not None and head is tail:
            out.append((line, _dedupe(head[1]), True))
            continue
        if head is not None and tail is not None:
            head[1] = np.concatenate([tail[1], head[1][1:]])
            items = [p for p in items if p is not tail]
        for piece in items:
            points = _dedupe(piece[1])
            if len(points) >= 2:
                out.append((line, points, False))
    return out


def box_ring(half_x: float, half_y: float) -> np.ndarray:
    """The box's outline, clockwise from its top-left corner, closed."""
    return np.array([[-half_x, half_y], [half_x, half_y], [half_x, -half_y], [-half_x, -half_y],
                     [-half_x, half_y]])


def _perimeter(points: np.ndarray, half_x: float, half_y: float) -> np.ndarray:
    """Clockwise position along the box's outline (0 at the top-left corner) of points on it."""
    x, y = points[:, 0], points[:, 1]
    gaps = np.stack([np.abs(y - half_y), np.abs(x - half_x), np.abs(y + half_y),
                     np.abs(x + half_x)], axis=1)
    side = np.argmin(gaps, axis=1)
    along = np.select([side == 0, side == 1, side == 2],
                      [x + half_x, 2 * half_x + half_y - y, 2 * half_x + 2 * half_y + half_x - x],
                      4 * half_x + 2 * half_y + y + half_y)
    return along


def link_rings(arcs: list, half_x: float, half_y: float) -> list:
    """Close the open pieces of polygon outlines into the outlines of the cut polygons.

    Args:
        arcs (list[tuple[int, np.ndarray]]): ``(ring index, points)`` of open pieces, each
            entering and leaving through the box's edge, oriented with the polygon on the
            right.
        half_x (float): Half width of the box.
        half_y (float): Half height of the box.

    Returns:
        list[tuple[int, np.ndarray]]: ``(ring index of the first piece, closed clockwise
        outline)`` per cut polygon, in the order of their first pieces.
    """
    if not arcs:
        return []
    total = 4 * (half_x + half_y)
    corners = box_ring(half_x, half_y)[:4]
    corner_at = np.array([0.0, 2 * half_x, 2 * half_x + 2 * half_y, 4 * half_x + 2 * half_y])
    entry = _perimeter(np.array([p[0] for _, p in arcs]), half_x, half_y)
    exit_ = _perimeter(np.array([p[-1] for _, p in arcs]), half_x, half_y)
    used = np.zeros(len(arcs), bool)
    rings = []
    for first in range(len(arcs)):
        if used[first]:
            continue
        used[first] = True
        parts = [arcs[first][1]]
        current = first
        for _ in range(len(arcs) + 1):
            here = exit_[current]
            ahead = np.mod(entry - here, total)
            ahead[used & (np.arange(len(arcs)) != first)] = np.inf
            nxt = int(np.argmin(ahead))
            walk = np.mod(corner_at - here, total)
            passed = np.flatnonzero((walk > 0) & (walk < ahead[nxt]))
            parts.append(corners[passed[np.argsort(walk[passed])]])
            if nxt == first:
                break
            used[nxt] = True
            parts.append(arcs[nxt][1])
            current = nxt
        ring = _dedupe(np.concatenate(parts + [arcs[first][1][:1]]))
        if len(ring) >= 4:
            rings.append((arcs[first][0], ring))
    return rings


def point_in_rings(point: np.ndarray, rings: list) -> bool:
    """Even-odd test of a point against closed rings (a polygon's exterior and holes)."""
    x, y = float(point[0]), float(point[1])
    inside = False
    for ring in rings:
        x0, y0, x1, y1 = ring[:-1, 0], ring[:-1, 1], ring[1:, 0], ring[1:, 1]
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide='ignore', invalid='ignore'):
            at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= bool(np.count_nonzero(crosses & (x < at)) % 2)
    return inside
