"""The stock ``centerline`` map class of MapTR v2, through nuscenes-devkit, shapely and networkx.

Follows upstream hustvl/MapTR ``tools/maptrv2/custom_nusc_map_converter.py`` (commit
69ab751: ``CNuScenesMapExplorer._get_centerline`` and ``VectorizedLocalMap.union_centerline``)
step by step, one sample at a time:

1. Lane pieces, for the layers ``lane_connector`` then ``lane``, records in file order: a
   record without a polygon, or whose polygon is invalid (or has fewer than three nodes,
   where upstream raises) or misses the patch, is skipped.
   Otherwise its arcline paths are discretised by the devkit every 0.5 m
   (``discretize_lanes``), the ``x, y`` rounded to 3 decimals, the line cut by the turned
   patch in the global frame and moved into the lidar frame; an empty cut is skipped. Each
   piece keeps its record's incoming and outgoing lane tokens (``connectivity``). Tokens
   are unique across both layers (a later record of a token replaces an earlier one).
2. A directed graph whose nodes are points rounded to 3 decimals: an edge between
   consecutive points of every piece (of every part of a cut line), an edge from the end of
   each predecessor piece (in the patch) to the start of the piece, and from its end to the
   start of each successor piece. A piece that ends where its successor starts gives a
   self-loop, which keeps that point from being a root or a leaf.
3. Instances: every simple path from each root (in-degree 0, in order of first appearance)
   to any leaf (out-degree 0), in networkx's ``all_simple_paths`` order, each simplified with
   ``simplify(0.2, preserve_topology=True)``. Overlapping paths (forks, merges) are all kept,
   as upstream keeps them; a cycle without a root gives nothing.

Label 3. Degenerate input (documented, the same in :mod:`.centerline`): a cut that leaves
points besides lines keeps the lines (upstream raises ``NotImplementedError`` on anything but
(Multi)LineStrings, which ``strict=True`` restores); a record whose token has no arcline path
raises :class:`LaneGeometryError` naming it (upstream fails with an unnamed ``IndexError``);
one without a ``connectivity`` entry raises it too (where the devkit's ``ValueError`` names
the token but not the map or the layer).
"""
from typing import Dict, List, Sequence

import numpy as np
from shapely.geometry import LineString

from .patch_pose import PatchPose

#: The label of a centerline (upstream's dataset reads ``instance_label == 3``).
CENTERLINE_LABEL = 3
#: The layers whose lanes make centerlines, in upstream's order.
CENTERLINE_LAYERS = ('lane_connector', 'lane')
#: Metres between the points the devkit discretises an arcline path into.
DISCRETIZE_RESOLUTION = 0.5
#: Decimals of the rounded points (graph nodes).
ROUND_DECIMALS = 3
#: Tolerance of the topology-preserving simplification of each path, metres.
SIMPLIFY_TOLERANCE = 0.2


class LaneGeometryError(ValueError):
    """A lane record the centerline class needs lacks its arcline path or connectivity; the
    message names the location, layer and token."""


def lane_pieces_reference(explorer, pose: PatchPose, to_local, patch,
                          layers: Sequence[str] = CENTERLINE_LAYERS,
                          strict: bool = False, location: str = '?') -> Dict[str, dict]:
    """Step 1: the lane pieces in a patch, ``{token: {lines, incoming, outgoing}}``.

    Args:
        explorer: The devkit's ``NuScenesMapExplorer`` of the location.
        pose (PatchPose): The patch.
        to_local (callable): Global shapely geometry -> the lidar frame (upstream's
            ``to_patch_coord``).
        patch: The turned patch, a shapely polygon in the global frame.
        layers (Sequence[str]): Lane layers, in order.
        strict (bool): Raise on a cut that is not made of lines. Defaults to False.
        location (str): For messages.

    Returns:
        dict: Per token, in insertion order: ``lines`` (list of ``(k, 2)`` float64 arrays in
        the lidar frame, one per part of the cut), ``incoming`` and ``outgoing`` tokens.
    """
    api = explorer.map_api
    pieces = {}
    for layer in layers:
        if layer not in CENTERLINE_LAYERS:
            raise ValueError(f'{layer} is not a centerline layer; expected some of '
                             f'{CENTERLINE_LAYERS}')
        for record in getattr(api, layer):
            if record.get('polygon_token') is None:
                continue
            if len(api.get('polygon', record['polygon_token'])['exterior_node_tokens']) < 3:
                continue  # shapely cannot build it: upstream raises there
            polygon = api.extract_polygon(record['polygon_token'])
            if not polygon.is_valid or polygon.intersection(patch).is_empty:
                continue
            token = record['token']
            if not api.arcline_path_3.get(token):
                raise LaneGeometryError(
                    f'map {location}: {layer} {token} has no arcline_path_3 entry (the '
                    'centerline class discretises it)')
            points = np.array(api.discretize_lanes([token], DISCRETIZE_RESOLUTION)[token])
            line = LineString(points[:, :2].round(ROUND_DECIMALS))
            if line.is_empty:
                continue
            cut = line.intersection(patch)
            if cut.is_empty:
                continue
            lines = lines_of(to_local(cut), strict)
            if not lines:
                continue
            if token not in api.connectivity:
                raise LaneGeometryError(
                    f'map {location}: {layer} {token} has no connectivity entry (the '
                    'centerline class joins lanes through it)')
            pieces[token] = dict(lines=lines,
                                 incoming=list(api.connectivity[token]['incoming']),
                                 outgoing=list(api.connectivity[token]['outgoing']))
    return pieces


def lines_of(geometry, strict: bool) -> List[np.ndarray]:
    """The lines of a cut (points and empty parts dropped; ``strict``: anything but
    (Multi)LineStrings raises, as upstream)."""
    if geometry.geom_type == 'LineString':
        parts = [geometry]
    elif geometry.geom_type == 'MultiLineString':
        parts = list(geometry.geoms)
    elif strict:
        raise NotImplementedError(f'a centerline cut gave a {geometry.geom_type}')
    else:
        parts = [g for g in getattr(geometry, 'geoms', []) if g.geom_type == 'LineString']
    return [np.asarray(part.coords, dtype=np.float64) for part in parts if not part.is_empty]


def union_centerlines_reference(pieces: Dict[str, dict]) -> List[np.ndarray]:
    """Steps 2 and 3 with networkx and shapely: the centerline instances of a patch.

    Args:
        pieces (dict): :func:`lane_pieces_reference`'s output.

    Returns:
        list[np.ndarray]: ``(k, 2)`` float64 polylines in the lidar frame.
    """
    import networkx as nx

    def rounded(points):
        return points.round(ROUND_DECIMALS)

    graph = nx.DiGraph()
    for piece in pieces.values():
        for part in piece['lines']:
            points = rounded(part)
            for a, b in zip(points[:-1], points[1:]):
                graph.add_edge(tuple(a), tuple(b))
        start = tuple(rounded(piece['lines'][0])[0])
        end = tuple(rounded(piece['lines'][-1])[-1])
        for other in piece['incoming']:
            if other in pieces:
                graph.add_edge(tuple(rounded(pieces[other]['lines'][-1])[-1]), start)
        for other in piece['outgoing']:
            if other in pieces:
                graph.add_edge(end, tuple(rounded(pieces[other]['lines'][0])[0]))
    roots = [node for node, degree in graph.in_degree() if degree == 0]
    leaves = [node for node, degree in graph.out_degree() if degree == 0]
    out = []
    for root in roots:
        for path in nx.all_simple_paths(graph, root, leaves):
            line = LineString(path).simplify(SIMPLIFY_TOLERANCE, preserve_topology=True)
            out.append(np.asarray(line.coords, dtype=np.float64))
    return out


__all__ = ['CENTERLINE_LABEL', 'CENTERLINE_LAYERS', 'DISCRETIZE_RESOLUTION', 'ROUND_DECIMALS',
           'SIMPLIFY_TOLERANCE', 'LaneGeometryError', 'lane_pieces_reference', 'lines_of',
           'union_centerlines_reference']
