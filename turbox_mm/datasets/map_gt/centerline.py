"""The turbox ``centerline`` map class: :mod:`.centerline_reference` without shapely or
networkx per sample.

Per location, once (:class:`LaneCenterlines`): every lane and lane connector with a valid
polygon, its arcline paths discretised by the devkit's own ``discretize_lane`` (the same
numbers as ``NuScenesMap.discretize_lanes``), rounded to 3 decimals and packed in a
:class:`~.polyline_set.PolylineSet`; its polygon's rings; its connectivity. Per sample, in
numpy and plain Python:

1. the polygons that meet the patch (an edge meets the box, or the box's centre lies inside
   the polygon), and their lines cut by the box (:func:`~.box_clip.clip_arcs`) in the patch
   frame; a lane whose line crosses or touches itself (rare: found once per location) is cut
   with shapely as the reference cuts it, since GEOS splits a line where it crosses itself
   and the split point becomes a graph node;
2. the point graph of the reference, built in the same order with dicts (nodes in order of
   first appearance, successors in insertion order, repeated edges once, self-loops kept);
3. every simple path from each root to a leaf, depth first in successor order (networkx's
   ``all_simple_paths`` order), each simplified by :func:`~.line_simplify.simplify_line`.

The same instances in the same order as the reference. Where the two can differ (measure
zero): the reference cuts in the global frame and moves the pieces, this path moves the
points and cuts, so a point whose coordinate lands within rounding error of a 3-decimal tie
may round the other way.
"""
from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np
from shapely.geometry import LineString

from .box_clip import _dedupe, _slab, clip_arcs, point_in_rings
from .centerline_reference import (CENTERLINE_LAYERS, DISCRETIZE_RESOLUTION, ROUND_DECIMALS,
                                   SIMPLIFY_TOLERANCE, LaneGeometryError, lines_of)
from .line_simplify import simplify_line
from .location_geometry import record_polygon
from .patch_pose import PatchPose
from .polyline_set import PolylineSet


@dataclass
class LaneCenterlines:
    """A location's lanes, packed for cutting centerlines.

    Attributes:
        tokens (list[str]): Token of each lane (layers in order, records in file order).
        layers (list[str]): Layer of each lane.
        lines (PolylineSet): Each lane's discretised centre line, rounded (global frame);
            a lane without arcline paths has a placeholder and ``missing_path`` set.
        missing_path (np.ndarray): ``(L,)`` bool: no ``arcline_path_3`` entry (an error if
            the lane meets a patch, as in the reference).
        simple (np.ndarray): ``(L,)`` bool: the lane's line neither crosses nor touches
            itself (else it is cut with shapely, module docstring).
        rings (list[list[np.ndarray]]): Each lane's polygon rings (exterior first), closed.
        bounds (np.ndarray): ``(L, 4)`` bounds of each polygon.
        connectivity (list): Per lane ``(incoming, outgoing)`` token lists, or None where
            the file has no entry.
        location (str): For messages.
    """
    tokens: List[str]
    layers: List[str]
    lines: PolylineSet
    missing_path: np.ndarray
    simple: np.ndarray
    rings: list
    bounds: np.ndarray
    connectivity: list
    location: str = '?'

    @classmethod
    def from_expansion(cls, doc: dict, layers: Sequence[str] = CENTERLINE_LAYERS,
                       location: str = '?') -> 'LaneCenterlines':
        """Build from a map-expansion document (:func:`~.expansion_file.load_map_expansion`).

        Args:
            doc (dict): The JSON document.
            layers (Sequence[str]): Lane layers, in order. Defaults to
                ``('lane_connector', 'lane')``.
            location (str): For messages.
        """
        from nuscenes.map_expansion.arcline_path_utils import discretize_lane
        nodes = {n['token']: (n['x'], n['y']) for n in doc['node']}
        polygons = {r['token']: r for r in doc['polygon']}
        paths, links = doc.get('arcline_path_3', {}), doc.get('connectivity', {})
        tokens, kinds, lines, missing, rings, bounds, connectivity = [], [], [], [], [], [], []
        for layer in layers:
            if layer not in CENTERLINE_LAYERS:
                raise ValueError(f'{layer} is not a centerline layer; expected some of '
                                 f'{CENTERLINE_LAYERS}')
            for record in doc.get(layer, []):
                if record.get('polygon_token') is None:
                    continue
                polygon = record_polygon(polygons[record['polygon_token']], nodes)
                if polygon is None:
                    continue
                token = record['token']
                points = (np.array(discretize_lane(paths[token], DISCRETIZE_RESOLUTION))
                          if paths.get(token) else None)
                missing.append(points is None)
                if points is None:
                    points = np.zeros((2, 2))
                lines.append(_dedupe(points[:, :2].round(ROUND_DECIMALS)))
                ring_list = [np.asarray(polygon.exterior.coords, np.float64)]
                ring_list += [np.asarray(r.coords, np.float64) for r in polygon.interiors]
                rings.append(ring_list)
                bounds.append(polygon.bounds)
                link = links.get(token)
                connectivity.append(None if link is None else (list(link['incoming']),
                                                               list(link['outgoing'])))
                tokens.append(token)
                kinds.append(layer)
        lines = [line if len(line) >= 2 else np.repeat(line[:1], 2, axis=0) for line in lines]
        simple = [bool(LineString(line).is_simple) for line in lines]
        return cls(tokens, kinds, PolylineSet.build(lines, [False] * len(lines), chunk=64),
                   np.asarray(missing, bool), np.asarray(simple, bool), rings,
                   np.asarray(bounds, np.float64).reshape(-1, 4), connectivity, location)

    def pieces(self, pose: PatchPose) -> Dict[str, dict]:
        """The lane pieces in a patch: :func:`~.centerline_reference.lane_pieces_reference`'s
        output (patch frame), from the arrays."""
        box = pose.global_bounds(1e-6)
        b = self.bounds
        near = np.flatnonzero((b[:, 0] <= box[2]) & (b[:, 2] >= box[0])
                              & (b[:, 1] <= box[3]) & (b[:, 3] >= box[1]))
        if len(near) == 0:
            return {}
        lanes = [int(i) for i in near if self._meets(i, pose)]
        if not lanes:
            return {}
        with_path = [i for i in lanes if not self.missing_path[i]]
        cut = self._shapely_cuts([i for i in with_path if not self.simple[i]], pose)
        simple = [i for i in with_path if self.simple[i]]
        if simple:
            starts = self.lines.offsets[simple]
            stops = self.lines.offsets[np.asarray(simple) + 1]
            edges = np.concatenate([np.arange(s, e - 1) for s, e in zip(starts, stops)])
            for lane, points, _ in clip_arcs(self.lines, edges, pose.to_local, pose.half_x,
                                             pose.half_y):
                cut.setdefault(lane, []).append(points)
        out = {}
        for i in lanes:  # lanes in order, as the reference visits its records
            if self.missing_path[i]:
                raise LaneGeometryError(
                    f'map {self.location}: {self.layers[i]} {self.tokens[i]} has no '
                    'arcline_path_3 entry (the centerline class discretises it)')
            if i not in cut:
                continue
            if self.connectivity[i] is None:
                raise LaneGeometryError(
                    f'map {self.location}: {self.layers[i]} {self.tokens[i]} has no '
                    'connectivity entry (the centerline class joins lanes through it)')
            incoming, outgoing = self.connectivity[i]
            out[self.tokens[i]] = dict(lines=cut[i], incoming=incoming, outgoing=outgoing)
        return out

    def _shapely_cuts(self, lanes: List[int], pose: PatchPose) -> Dict[int, list]:
        """The pieces of lanes whose lines cross themselves, cut as the reference cuts them
        (GEOS splits a line where it crosses itself)."""
        if not lanes:
            return {}
        from nuscenes.map_expansion.map_api import NuScenesMapExplorer

        from .reference import VectorizedLocalMapReference
        patch = NuScenesMapExplorer.get_patch_coord(
            (pose.x, pose.y, 2 * pose.half_y, 2 * pose.half_x), pose.angle_degrees)
        out = {}
        for i in lanes:
            points = self.lines.points[self.lines.offsets[i]:self.lines.offsets[i + 1]]
            piece = LineString(points).intersection(patch)
            if not piece.is_empty:
                lines = lines_of(VectorizedLocalMapReference._to_local(piece, pose), False)
                if lines:
                    out[i] = lines
        return out

    def _meets(self, lane: int, pose: PatchPose) -> bool:
        """Whether the lane's polygon meets the patch."""
        rings = self.rings[lane]
        for ring in rings:
            local = pose.to_local(ring)
            a, d = local[:-1], local[1:] - local[:-1]
            x_lo, x_hi = _slab(a[:, 0], d[:, 0], -pose.half_x, pose.half_x)
            y_lo, y_hi = _slab(a[:, 1], d[:, 1], -pose.half_y, pose.half_y)
            if np.any(np.maximum(np.maximum(x_lo, y_lo), 0.0)
                      <= np.minimum(np.minimum(x_hi, y_hi), 1.0)):
                return True
        return point_in_rings(np.array([pose.x, pose.y]), rings)


def union_centerlines(pieces: Dict[str, dict]) -> List[np.ndarray]:
    """:func:`~.centerline_reference.union_centerlines_reference` with dicts: the point
    graph, its root-to-leaf simple paths, each simplified.

    Args:
        pieces (dict): ``{token: {lines, incoming, outgoing}}`` in the patch frame.

    Returns:
        list[np.ndarray]: ``(k, 2)`` float64 polylines, in the reference's order.
    """
    successors: Dict[tuple, dict] = {}  # node -> {successor: None}, both in insertion order
    in_degree: Dict[tuple, int] = {}

    def add_edge(a: tuple, b: tuple) -> None:
        for node in (a, b):
            if node not in successors:
                successors[node] = {}
                in_degree[node] = 0
        if b not in successors[a]:
            successors[a][b] = None
            in_degree[b] += 1

    ends, rounded = {}, {}
    for token, piece in pieces.items():
        rounded[token] = [part.round(ROUND_DECIMALS) for part in piece['lines']]
        ends[token] = (tuple(rounded[token][0][0].tolist()),
                       tuple(rounded[token][-1][-1].tolist()))
    for token, piece in pieces.items():
        for part in rounded[token]:
            nodes = [tuple(p) for p in part.tolist()]
            for a, b in zip(nodes[:-1], nodes[1:]):
                add_edge(a, b)
        start, end = ends[token]
        for other in piece['incoming']:
            if other in pieces:
                add_edge(ends[other][1], start)
        for other in piece['outgoing']:
            if other in pieces:
                add_edge(end, ends[other][0])
    leaves = {node for node, succ in successors.items() if not succ}
    out = []
    for root in [node for node, degree in in_degree.items() if degree == 0]:
        for path in _simple_paths(successors, root, leaves):
            out.append(simplify_line(np.array(path, np.float64), SIMPLIFY_TOLERANCE))
    return out


def _simple_paths(successors: dict, root: tuple, leaves: set):
    """Every simple path from ``root`` to a leaf, depth first in successor order."""
    path, on_path = [root], {root}
    stack = [iter(successors[root])]
    while stack:
        node = next((n for n in stack[-1] if n not in on_path), None)
        if node is None:
            stack.pop()
            on_path.discard(path.pop())
            continue
        if node in leaves:
            yield path + [node]
            continue
        path.append(node)
        on_path.add(node)
        stack.append(iter(successors[node]))


def centerline_instances(lanes: LaneCenterlines, pose: PatchPose) -> List[np.ndarray]:
    """A sample's centerline polylines (patch frame), as the reference gives them."""
    return union_centerlines(lanes.pieces(pose))


__all__ = ['LaneCenterlines', 'union_centerlines', 'centerline_instances']
