"""One location's map, prepared once for the fast map ground truth.

Read straight from the map-expansion JSON (the devkit's schema, without building the devkit's
objects), in the global frame:

- ``dividers``: the line records of the divider layers (``road_divider`` then
  ``lane_divider``), in file order, as open polylines;
- ``crossings``: the outline of the union of every valid ``ped_crossing`` polygon;
- ``boundaries``: the outline of the union of every valid ``road_segment`` and ``lane``
  polygon.

The unions are what upstream computes per sample after cutting (shapely's ``unary_union`` of
the cut polygons): cutting and uniting commute, so uniting once per location leaves only the
cut for each sample. Outlines are oriented with the polygon on their right (exteriors
clockwise, holes counter-clockwise), as upstream reorients them; exteriors come before holes.
Records too small for shapely (lines of fewer than two nodes, polygons of fewer than three)
are skipped, as in :mod:`.reference`.
"""
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from shapely import ops
from shapely.geometry import LinearRing, Polygon

from .polyline_set import PolylineSet


@dataclass
class LocationGeometry:
    """A location's map elements, packed for cutting.

    Attributes:
        dividers (PolylineSet): Divider lines.
        divider_labels (np.ndarray): Label of each divider line (upstream's ``CLASS2LABEL``
            of its layer).
        crossings (PolylineSet): Outline rings of the united crossings.
        boundaries (PolylineSet): Outline rings of the united road segments and lanes.
        crossing_parts (list): Per united crossing polygon, ``(area, rings)``, to tell whether
            a patch lies wholly inside one.
    """
    dividers: PolylineSet
    divider_labels: np.ndarray
    crossings: PolylineSet
    boundaries: PolylineSet
    crossing_parts: list = field(default_factory=list)

    @classmethod
    def from_expansion(cls, doc: dict, line_classes=('road_divider', 'lane_divider'),
                       ped_crossing_classes=('ped_crossing',),
                       contour_classes=('road_segment', 'lane'),
                       labels=None) -> 'LocationGeometry':
        """Build from a map-expansion document.

        Args:
            doc (dict): The JSON document (:func:`~.expansion_file.load_map_expansion`).
            line_classes (Sequence[str]): Divider layers, in output order.
            ped_crossing_classes (Sequence[str]): Crossing layers.
            contour_classes (Sequence[str]): The two layers whose union's outline is the
                boundary.
            labels (dict, optional): Label per divider layer. Defaults to upstream's
                ``CLASS2LABEL``.
        """
        from .reference import CLASS2LABEL
        labels = CLASS2LABEL if labels is None else labels
        nodes = {n['token']: (n['x'], n['y']) for n in doc['node']}
        lines = {r['token']: r['node_tokens'] for r in doc['line']}
        polygons = {r['token']: r for r in doc['polygon']}

        divider_lines, divider_labels = [], []
        for layer in line_classes:
            for record in doc.get(layer, []):
                tokens = lines[record['line_token']]
                if len(tokens) >= 2:
                    divider_lines.append(np.array([nodes[t] for t in tokens], np.float64))
                    divider_labels.append(labels.get(layer, -1))

        def shapes(layer):
            found = (record_polygon(polygons[record['polygon_token']], nodes)
                     for record in doc.get(layer, []))
            return [polygon for polygon in found if polygon is not None]

        crossing_union = ops.unary_union([p for layer in ped_crossing_classes
                                          for p in shapes(layer)])
        first, second = contour_classes
        boundary_union = ops.unary_union([ops.unary_union(shapes(first)),
                                          ops.unary_union(shapes(second))])
        crossings, parts = _outline(crossing_union)
        boundaries, _ = _outline(boundary_union)
        return cls(PolylineSet.build(divider_lines, [False] * len(divider_lines)),
                   np.asarray(divider_labels, np.int64), crossings, boundaries, parts)


def record_polygon(shape: dict, nodes: dict) -> Optional[Polygon]:
    """The shapely polygon of a ``polygon`` record (exterior and non-empty holes), as the
    devkit's ``extract_polygon`` builds it; None for one of fewer than three exterior nodes
    (shapely cannot build it) or an invalid one, which the vectorisers skip.

    Args:
        shape (dict): The ``polygon`` record.
        nodes (dict): ``{node token: (x, y)}``.
    """
    if len(shape['exterior_node_tokens']) < 3:
        return None
    holes = [[nodes[t] for t in hole['node_tokens']] for hole in shape['holes']
             if len(hole['node_tokens']) > 0]
    polygon = Polygon([nodes[t] for t in shape['exterior_node_tokens']], holes)
    return polygon if polygon.is_valid else None


def _outline(union) -> tuple:
    """The oriented rings of a union (exteriors clockwise first, then holes), packed, and
    ``(area, rings)`` per polygon."""
    polygons = [g for g in getattr(union, 'geoms', [union])
                if g.geom_type == 'Polygon' and not g.is_empty]
    exteriors = [_oriented(p.exterior, clockwise=True) for p in polygons]
    holes = [_oriented(r, clockwise=False) for p in polygons for r in p.interiors]
    parts = []
    for p in polygons:
        rings = [_oriented(p.exterior, True)] + [_oriented(r, False) for r in p.interiors]
        parts.append((float(p.area), rings))
    rings = exteriors + holes
    return PolylineSet.build(rings, [True] * len(rings)), parts


def _oriented(ring, clockwise: bool) -> np.ndarray:
    coords = np.asarray(ring.coords, np.float64)
    if LinearRing(coords).is_ccw == clockwise:
        coords = coords[::-1].copy()
    return coords
