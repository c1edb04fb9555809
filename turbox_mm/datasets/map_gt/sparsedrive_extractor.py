"""SparseDrive's per-sample map ground truth (``map_annos``) from the nuScenes map expansion.

SparseDrive's converter (swc-17/SparseDrive ``tools/data_converter/nuscenes_converter.py``)
stores, per keyframe, what ``NuscMapExtractor.get_map_geom``
(``projects/mmdet3d_plugin/datasets/map_utils/``, StreamMapNet's extractor, not MapTR's
``VectorizedLocalMap``) cuts around the lidar pose, as ``{label: [(k, 2) vertices, ...]}``.
:func:`sparsedrive_map_annos` does the same from the map-expansion JSON without
nuscenes-devkit's ``NuScenesMap``:

1. the patch: 30 m along the lidar's x axis by 60 m along its y axis (``roi_size``), turned
   by the lidar yaw (:mod:`.patch_pose`); each record of a layer is cut by it in the global
   frame, then turned and moved into the lidar frame (the devkit's ``_get_layer_line`` /
   ``_get_layer_polygon``, with shapely's ``affinity`` as the devkit calls it);
2. ``divider`` (label 1): every ``lane_divider`` record, then every ``road_divider`` one, in
   file order, each piece of a cut line one polyline;
3. ``ped_crossing`` (0): the valid crossing polygons cut into pieces; a piece swallows the
   later pieces whose bounding boxes overlap its own and whose minimum-rotated-rectangle long
   axes are parallel to its own (``1 - |cos| < 0.01``), compared with the piece it started
   from, not with the growing union; each result's exterior, made counter-clockwise, is cut
   by the patch, points dropped, line-merged, pieces still apart concatenated into one line
   (a crossing the patch cuts keeps the patch's edge as a side: a closed ring, unless a
   vertex on the edge lands a rounding error outside it);
4. ``boundary`` (2): the union of the valid ``road_segment`` and ``lane`` pieces; every
   exterior made clockwise (all exteriors first), then every hole counter-clockwise, each cut
   by the patch shrunk by 0.2 m and line-merged, each piece one polyline.

Output as upstream's ``geom2anno``: int keys inserted in the order 1 (divider), 0, 2 (the
dict equals ``{0: ..., 1: ..., 2: ...}``), float64 ``(k, 2)`` arrays (``np.array(coords)``);
every key is present, possibly with an empty list.

Where this differs from upstream (shapely 1.x, devkit 1.1.10):

- ``STRtree.query`` returns indices in shapely 2 (geometries in 1.x, matched back by
  ``id``); the candidates are taken in index order (1.x: tree order). The order changes only
  where a merged crossing's ring starts, not its shape.
- Upstream's ``minimum_rotated_rectangle`` is the minimum-area one; shapely 2.0 with GEOS <
  3.12 computes it with the same Python code, later versions with GEOS's minimum-area
  rectangle (the same long axis).
- Degenerate cuts upstream crashes on or passes on broken: points of a cut line (a line
  touching the patch in a point: upstream's ``split_collections`` asserts; two points give
  one-vertex "polylines") and the non-polygon parts of a cut polygon are dropped; a
  crossing outline with no line left gives no polyline (upstream raises in
  ``np.concatenate``). Line records of fewer than two nodes and polygons of fewer than three
  exterior nodes, or with a hole of one or two nodes, are skipped (shapely cannot build them);
  invalid polygons are skipped as the devkit does.
- Each layer's records are pre-selected with an STRtree on the patch's bounding box (the
  devkit cuts every record of the location); a record whose box misses the patch's has an
  empty cut, so the output is the same.
- The yaw is ``atan2(R[1, 0], R[0, 0])`` of ``lidar2global`` (upstream: through a
  pyquaternion quaternion and the devkit's ``quaternion_yaw``): equal up to rounding, which
  can move a vertex on the patch's edge to its other side (so can GEOS versions).

:func:`~.sparsedrive_annos_file.add_sparsedrive_map_annos` writes ``map_annos`` into v2
info files (what :class:`~turbox_mm.datasets.SparseDriveNuScenesDataset` reads).
"""
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from shapely import STRtree, affinity, ops
from shapely.geometry import LinearRing, LineString, Polygon, box

from .location_geometry import LocationGeometry
from .patch_pose import PatchPose, patch_pose

__all__ = ['SPARSEDRIVE_MAP_LABELS', 'ROI_SIZE', 'SparseDriveMapSource', 'sparsedrive_map_geoms',
           'sparsedrive_map_annos', 'check_sparsedrive_map_annos', 'check_roi']

#: Upstream's ``geom2anno`` labels (``MAP_CLASSES = ('ped_crossing', 'divider', 'boundary')``).
SPARSEDRIVE_MAP_LABELS = {'ped_crossing': 0, 'divider': 1, 'boundary': 2}
#: ``(x extent, y extent)`` of the patch in metres (SparseDrive's ``roi_size``).
ROI_SIZE = (30.0, 60.0)
#: Metres the patch shrinks by on each side before boundaries are cut.
BOUNDARY_MARGIN = 0.2
#: Crossing pieces merge when ``1 - |cos|`` of their long axes is below this (~8 degrees).
PARALLEL_TOLERANCE = 0.01
#: The layers read: divider lines (in output order), crossings, drivable area.
LINE_LAYERS = ('lane_divider', 'road_divider')
POLYGON_LAYERS = ('ped_crossing', 'road_segment', 'lane')


@dataclass
class SparseDriveMapSource:
    """One location's records as shapely geometries in the global frame, with a tree per layer.

    Attributes:
        geometries (dict[str, np.ndarray]): Per layer, an object array of ``LineString`` (line
            layers) or ``Polygon`` (polygon layers), in file order, unbuildable records left
            out (invalid polygons too).
        trees (dict[str, STRtree]): Per layer, a tree over ``geometries[layer]``.
    """
    geometries: Dict[str, np.ndarray]
    trees: Dict[str, STRtree]

    @classmethod
    def from_expansion(cls, doc: Mapping) -> 'SparseDriveMapSource':
        """Build from a map-expansion document (:func:`~.expansion_file.load_map_expansion`).

        Raises:
            KeyError: A record names a node, line or polygon the document lacks (named).
        """
        nodes = {n['token']: (n['x'], n['y']) for n in doc['node']}
        lines = {r['token']: r['node_tokens'] for r in doc['line']}
        polygons = {r['token']: r for r in doc['polygon']}

        def points(tokens, where):
            missing = [t for t in tokens if t not in nodes]
            if missing:
                raise KeyError(f'map expansion: {where} names node {missing[0]!r}, which the '
                               'node table lacks')
            return [nodes[t] for t in tokens]

        geometries = {}
        for layer in LINE_LAYERS:
            found = []
            for record in doc.get(layer, []):
                if record['line_token'] not in lines:
                    raise KeyError(f'map expansion: {layer} {record["token"]!r} names line '
                                   f'{record["line_token"]!r}, which the line table lacks')
                tokens = lines[record['line_token']]
                if len(tokens) >= 2:  # none: the devkit skips it; one: shapely cannot build it
                    found.append(LineString(points(tokens, f'line {record["line_token"]!r}')))
            geometries[layer] = np.array(found, dtype=object)
        for layer in POLYGON_LAYERS:
            found = []
            for record in doc.get(layer, []):
                token = record['polygon_token']
                if token not in polygons:
                    raise KeyError(f'map expansion: {layer} {record["token"]!r} names polygon '
                                   f'{token!r}, which the polygon table lacks')
                shape = polygons[token]
                holes = [h['node_tokens'] for h in shape['holes'] if len(h['node_tokens']) > 0]
                if len(shape['exterior_node_tokens']) < 3 or any(len(h) < 3 for h in holes):
                    continue  # shapely cannot build it
                polygon = Polygon(points(shape['exterior_node_tokens'], f'polygon {token!r}'),
                                  [points(h, f'a hole of polygon {token!r}') for h in holes])
                if polygon.is_valid:
                    found.append(polygon)
            geometries[layer] = np.array(found, dtype=object)
        return cls(geometries, {k: STRtree(v) for k, v in geometries.items()})

    def cut(self, layer: str, pose: PatchPose) -> list:
        """The records of ``layer`` the patch cuts, cut, in the lidar frame, in file order."""
        x, y, angle = pose.x, pose.y, pose.angle_degrees
        patch = affinity.rotate(box(x - pose.half_x, y - pose.half_y, x + pose.half_x,
                                    y + pose.half_y), angle, origin=(x, y), use_radians=False)
        out = []
        for index in np.sort(self.trees[layer].query(patch)):
            piece = self.geometries[layer][index].intersection(patch)
            if piece.is_empty:
                continue
            piece = affinity.rotate(piece, -angle, origin=(x, y), use_radians=False)
            out.append(affinity.affine_transform(piece, [1.0, 0.0, 0.0, 1.0, -x, -y]))
        return out


def _parts(geometry, kind: str, valid_only: bool = True) -> list:
    """The non-empty ``kind`` parts of a geometry, only the valid ones unless told (upstream's
    ``split_collections``, other parts dropped)."""
    parts = getattr(geometry, 'geoms', [geometry])
    return [g for g in parts if g.geom_type == kind and not g.is_empty
            and (g.is_valid or not valid_only)]


def _long_axis(polygon: Polygon) -> Tuple[np.ndarray, float]:
    """The longer of the first two sides of the minimum rotated rectangle, and its length."""
    corners = np.asarray(polygon.minimum_rotated_rectangle.exterior.coords)[:3]
    sides = corners[1:] - corners[:-1]
    lengths = np.linalg.norm(sides, axis=-1)
    k = int(lengths.argmax())
    return sides[k], float(lengths[k])


def merge_parallel_crossings(pieces: Sequence[Polygon]) -> List[Polygon]:
    """Upstream's ``_union_ped``: in order, each piece not yet taken absorbs the pieces not yet
    taken whose bounding boxes overlap its own and whose long axis is parallel to its own (not
    to the growing union's); the results split into polygons again.

    Args:
        pieces (Sequence[Polygon]): Crossing pieces in the lidar frame.

    Returns:
        list[Polygon]: The merged crossings.
    """
    if not pieces:
        return []
    tree = STRtree(list(pieces))
    axes = [_long_axis(p) for p in pieces]
    taken = np.zeros(len(pieces), bool)
    merged = []
    for i, piece in enumerate(pieces):
        if taken[i]:
            continue
        taken[i] = True
        (u, u_len), union = axes[i], piece
        for j in np.sort(tree.query(piece)):
            if taken[j]:
                continue
            v, v_len = axes[j]
            if 1 - abs(float(u.dot(v)) / (u_len * v_len)) < PARALLEL_TOLERANCE:
                union = union.union(pieces[j])
                taken[j] = True
        merged.append(union)
    return [p for union in merged for p in _parts(union, 'Polygon')]


def crossing_outline(polygon: Polygon, local_patch: Polygon) -> Optional[LineString]:
    """Upstream's ``get_ped_crossing_contour``: the exterior, counter-clockwise, cut by the
    patch, as one line (pieces line-merged, those still apart concatenated); None when
    nothing is left."""
    ring = polygon.exterior
    if not ring.is_ccw:
        ring = LinearRing(list(ring.coords)[::-1])
    cut = ring.intersection(local_patch)
    if cut.geom_type != 'LineString':
        pieces = [g for g in getattr(cut, 'geoms', []) if g.geom_type == 'LineString']
        if not pieces:
            return None
        cut = ops.linemerge(pieces)
        if cut.geom_type != 'LineString':
            cut = LineString(np.concatenate([np.asarray(g.coords) for g in cut.geoms]))
    return None if cut.is_empty else cut


def area_outlines(areas: Sequence[Polygon], roi_size=ROI_SIZE) -> List[LineString]:
    """Upstream's ``get_drivable_area_contour``: exteriors clockwise, then holes
    counter-clockwise, each cut by the patch shrunk by :data:`BOUNDARY_MARGIN` and
    line-merged."""
    half_x, half_y = roi_size[0] / 2 - BOUNDARY_MARGIN, roi_size[1] / 2 - BOUNDARY_MARGIN
    shrunk = box(-half_x, -half_y, half_x, half_y)
    rings = [(p.exterior, True) for p in areas]
    rings += [(ring, False) for p in areas for ring in p.interiors]
    out = []
    for ring, clockwise in rings:
        if ring.is_ccw == clockwise:
            ring = LinearRing(list(ring.coords)[::-1])
        cut = ring.intersection(shrunk)
        if cut.geom_type == 'GeometryCollection':  # points besides lines: upstream asserts
            cut = [g for g in cut.geoms if g.geom_type == 'LineString']
            cut = ops.linemerge(cut) if len(cut) > 1 else (cut[0] if cut else LineString())
        elif cut.geom_type == 'MultiLineString':
            cut = ops.linemerge(cut)
        out += _parts(cut, 'LineString')
    return out


def _source_of(source) -> SparseDriveMapSource:
    if isinstance(source, SparseDriveMapSource):
        return source
    if isinstance(source, LocationGeometry):
        raise TypeError('sparsedrive_map_annos needs the map records one by one (crossings are '
                        'merged per sample, only when parallel); a LocationGeometry holds '
                        'united outlines: pass the map-expansion document or a '
                        'SparseDriveMapSource')
    if isinstance(source, Mapping):
        return SparseDriveMapSource.from_expansion(source)
    raise TypeError(f'expected a map-expansion document (dict) or a SparseDriveMapSource, got '
                    f'{type(source).__name__}')


def check_roi(roi_size) -> Tuple[float, float]:
    roi = tuple(float(v) for v in roi_size)
    if len(roi) != 2 or min(roi) <= 2 * BOUNDARY_MARGIN:
        raise ValueError(f'roi_size must be (x extent, y extent) in metres, both > '
                         f'{2 * BOUNDARY_MARGIN}, got {list(roi_size)}')
    return roi


def sparsedrive_map_geoms(source, lidar2global, roi_size=ROI_SIZE) -> Dict[str, list]:
    """Upstream's ``NuscMapExtractor.get_map_geom`` at a lidar pose, as shapely lines.

    Args:
        source (dict | SparseDriveMapSource): The location's map-expansion document, or it
            prepared (faster for many samples).
        lidar2global (np.ndarray): 4x4 lidar pose.
        roi_size (tuple[float, float]): ``(x extent, y extent)``. Defaults to (30, 60).

    Returns:
        dict[str, list[LineString]]: ``divider``, ``ped_crossing``, ``boundary``, lidar frame.
    """
    matrix, roi = np.asarray(lidar2global, dtype=np.float64), check_roi(roi_size)
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        raise ValueError(f'lidar2global must be a finite 4x4 matrix, got shape {matrix.shape}')
    source = _source_of(source)
    pose = patch_pose(matrix, (roi[1], roi[0]))
    dividers = [line for layer in LINE_LAYERS for cut in source.cut(layer, pose)
                for line in _parts(cut, 'LineString')]
    pieces = [p for cut in source.cut('ped_crossing', pose) for p in _parts(cut, 'Polygon')]
    local_patch = box(-roi[0] / 2, -roi[1] / 2, roi[0] / 2, roi[1] / 2)
    crossings = [crossing_outline(p, local_patch) for p in merge_parallel_crossings(pieces)]

    def united(layer):  # upstream unites the cuts as they come, unchecked
        return ops.unary_union([p for cut in source.cut(layer, pose)
                                for p in _parts(cut, 'Polygon', valid_only=False)])

    areas = _parts(ops.unary_union([united('road_segment'), united('lane')]), 'Polygon')
    return dict(divider=dividers, ped_crossing=[c for c in crossings if c is not None],
                boundary=area_outlines(areas, roi))


def sparsedrive_map_annos(source, lidar2global, roi_size=ROI_SIZE) -> Dict[int, list]:
    """A sample's ``map_annos`` as SparseDrive's converter writes it.

    Args:
        source (dict | SparseDriveMapSource): The location's map-expansion document, or it
            prepared with :meth:`SparseDriveMapSource.from_expansion` (once per location).
        lidar2global (np.ndarray): 4x4 lidar pose (``ego2global @ lidar2ego``).
        roi_size (tuple[float, float]): ``(x extent, y extent)`` in metres. Defaults to
            (30, 60).

    Returns:
        dict[int, list[np.ndarray]]: ``{1: dividers, 0: crossings, 2: boundaries}`` (inserted
        in that order, as upstream), float64 ``(k, 2)`` vertices in the lidar frame.

    Raises:
        ValueError: ``lidar2global`` is not a finite 4x4 matrix, or a bad ``roi_size``.
        TypeError: ``source`` is neither a document nor a :class:`SparseDriveMapSource`.

    Examples:
        >>> from turbox_mm.datasets.synthetic.map_expansion import expansion_json
        >>> annos = sparsedrive_map_annos(expansion_json([]), np.eye(4))
        >>> annos == {0: [], 1: [], 2: []}
        True
    """
    geoms = sparsedrive_map_geoms(source, lidar2global, roi_size)
    return {SPARSEDRIVE_MAP_LABELS[name]: [np.array(line.coords)[:, :2] for line in geoms[name]]
            for name in ('divider', 'ped_crossing', 'boundary')}


def check_sparsedrive_map_annos(annos, where: str) -> int:
    """Check that ``annos`` has the extractor's format; return its number of polylines.

    Raises:
        ValueError: Not a dict of int labels 0..2 to lists of ``(k >= 2, 2)`` arrays; the
            message names ``where`` and the key.
    """
    if not isinstance(annos, Mapping):
        raise ValueError(f'{where}: map_annos is a {type(annos).__name__}, not a dict')
    count = 0
    for key, lines in annos.items():
        if not isinstance(key, (int, np.integer)) or isinstance(key, bool) or not 0 <= key <= 2:
            raise ValueError(f'{where}: map_annos key {key!r} is not one of SparseDrive\'s '
                             f'labels 0, 1, 2 ({SPARSEDRIVE_MAP_LABELS}); map_annos of another '
                             'source (e.g. the synthetic generator\'s, keyed by class name)')
        for i, line in enumerate(lines):
            shape = np.shape(line)
            if len(shape) != 2 or shape[1] != 2 or shape[0] < 2:
                raise ValueError(f'{where}: map_annos[{key}][{i}] has shape {shape}, not '
                                 '(k >= 2, 2)')
        count += len(lines)
    return count
