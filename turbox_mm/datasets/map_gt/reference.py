"""The stock map ground truth: MapTR's ``VectorizedLocalMap`` and ``LiDARInstanceLines``.

Follows upstream hustvl/MapTR ``projects/mmdet3d_plugin/datasets/nuscenes_map_dataset.py``
(commit 04413da) step by step, through nuscenes-devkit's ``NuScenesMap`` /
``NuScenesMapExplorer`` and shapely, one sample at a time:

1. the patch: a 30 m (lidar x) by 60 m (lidar y) box around the lidar, turned by its yaw
   (:mod:`.patch_pose`);
2. ``divider`` (label 0): every ``road_divider`` then every ``lane_divider`` line, in the
   file's order, cut by the patch, turned and moved into the lidar frame; each piece of a cut
   line is one instance (no merging);
3. ``ped_crossing`` (1): the valid ``ped_crossing`` polygons, cut by the patch and moved into
   the lidar frame, then united; each ring (exteriors made clockwise, holes counter-clockwise)
   is cut by the patch enlarged by 0.2 m (so it stays whole) and its pieces line-merged;
4. ``boundary`` (2): the valid ``road_segment`` and ``lane`` polygons likewise, united; each
   ring cut by the patch *shrunk* by 0.2 m (so the patch's own edges drop out) and
   line-merged: the kerbs, as open polylines, or closed rings where a ring lies inside;
5. ``centerline`` (3, MapTR v2 only, :mod:`.centerline_reference`): the lanes and lane
   connectors discretised, cut, joined through their connectivity into every root-to-leaf
   path, simplified;
6. sampling (``LiDARInstanceLines``): ``fixed_num`` points evenly spaced by length along each
   instance, float32, clamped to the patch; the equivalent orders of pattern ``'v2'``
   (``shift_fixed_num_sampled_points_v2``): every rotation of a closed ring's own vertices
   (re-closed and resampled), or an open line forwards and backwards; more than
   ``fixed_num - 1`` orders are drawn without replacement, fewer are padded with
   ``padding_value``; a centerline (label 3) has its forward order only, closed or not.

Where shapely 2 differs from the shapely 1.x upstream used, the code does what upstream
meant: rings are reoriented by building a reversed ring (shapely 2 geometries are immutable),
and an empty union gives no instances.

Degenerate input (documented behaviour, the same in :mod:`.fast`):

- a line record with no nodes is skipped (upstream's ``line.is_empty`` check); one with a
  single node, or a polygon with fewer than three exterior nodes, is skipped as well (shapely
  cannot build it: upstream raises there);
- a cut that leaves points besides lines (a line touching the patch at a point) keeps the
  lines and drops the points; upstream raises ``NotImplementedError`` on anything but
  (Multi)LineStrings, which ``strict=True`` restores;
- a piece of zero length is dropped.
"""
import os.path as osp
from typing import Optional, Sequence

import numpy as np
from shapely import affinity, ops
from shapely.geometry import LinearRing, LineString, MultiLineString, MultiPolygon, box

from .centerline_reference import (CENTERLINE_LABEL, lane_pieces_reference,
                                   union_centerlines_reference)
from .expansion_file import (NUSCENES_LOCATIONS, MapExpansionError, map_expansion_path,
                             missing_map_message)
from .patch_pose import PatchPose, patch_pose

#: MapTR's default map classes (v1, and v2 without centerlines).
MAP_CLASSES = ('divider', 'ped_crossing', 'boundary')
#: Every map class the vectorisers know (v2's ``_w_centerline`` configs add the last).
KNOWN_MAP_CLASSES = MAP_CLASSES + ('centerline', )
#: Upstream's ``CLASS2LABEL``: both divider layers are class 0, crossings 1, boundaries 2,
#: centerlines (v2) 3, whatever the order of the config's ``map_classes``.
CLASS2LABEL = {'road_divider': 0, 'lane_divider': 0, 'ped_crossing': 1, 'contours': 2,
               'centerline': CENTERLINE_LABEL, 'others': -1}
#: The label of each map class (upstream's dataset labels instances by class name).
LABEL_OF_CLASS = {'divider': CLASS2LABEL['road_divider'], 'ped_crossing': CLASS2LABEL[
    'ped_crossing'], 'boundary': CLASS2LABEL['contours'], 'centerline': CENTERLINE_LABEL}
PATCH_MARGIN = 0.2  # m: crossings are cut by the patch grown by it, boundaries shrunk by it


class VectorizedLocalMapReference:
    """Upstream's ``VectorizedLocalMap``: a sample's map instances, with shapely.

    Args:
        data_root (str): nuScenes root holding ``maps/expansion/<location>.json``.
        patch_size (tuple[float, float]): ``(patch_h, patch_w)``, y then x extent in metres.
            Defaults to (60, 30).
        map_classes (Sequence[str]): Classes to extract, in output order, some of
            :data:`KNOWN_MAP_CLASSES`. Defaults to ``('divider', 'ped_crossing',
            'boundary')``.
        line_classes (Sequence[str]): Layers of ``divider``. Defaults to
            ``('road_divider', 'lane_divider')``.
        ped_crossing_classes (Sequence[str]): Layers of ``ped_crossing``.
        contour_classes (Sequence[str]): The two polygon layers whose outline is
            ``boundary``. Defaults to ``('road_segment', 'lane')``.
        centerline_classes (Sequence[str]): The lane layers of ``centerline``. Defaults to
            ``('lane_connector', 'lane')``.
        strict (bool): Raise ``NotImplementedError`` on a cut that is not made of lines, as
            upstream does. Defaults to False (keep the lines, drop the points).

    Examples:
        >>> vector_map = VectorizedLocalMapReference('data/nuscenes')  # doctest: +SKIP
        >>> polylines, labels = vector_map('boston-seaport', lidar2global)  # doctest: +SKIP
    """

    def __init__(self, data_root: str, patch_size=(60.0, 30.0),
                 map_classes: Sequence[str] = MAP_CLASSES,
                 line_classes: Sequence[str] = ('road_divider', 'lane_divider'),
                 ped_crossing_classes: Sequence[str] = ('ped_crossing',),
                 contour_classes: Sequence[str] = ('road_segment', 'lane'),
                 centerline_classes: Sequence[str] = ('lane_connector', 'lane'),
                 strict: bool = False):
        self.data_root = data_root
        self.patch_size = tuple(float(v) for v in patch_size)
        self.map_classes = tuple(map_classes)
        self.line_classes = tuple(line_classes)
        self.ped_crossing_classes = tuple(ped_crossing_classes)
        self.contour_classes = tuple(contour_classes)
        self.centerline_classes = tuple(centerline_classes)
        self.strict = strict
        self._explorers = {}

    # --- the map files ------------------------------------------------------------------
    def explorer(self, location: str):
        """The devkit's ``NuScenesMapExplorer`` of a location, loaded once.

        Raises:
            MapExpansionError: No file for the location (named), or a name the devkit does not
                know.
        """
        if location not in self._explorers:
            from nuscenes.map_expansion.map_api import NuScenesMap, NuScenesMapExplorer
            if (location not in NUSCENES_LOCATIONS
                    or not osp.isfile(map_expansion_path(self.data_root, location))):
                raise MapExpansionError(missing_map_message(self.data_root, location))
            self._explorers[location] = NuScenesMapExplorer(
                NuScenesMap(dataroot=self.data_root, map_name=location))
        return self._explorers[location]

    # --- one sample ---------------------------------------------------------------------
    def __call__(self, location: str, lidar2global: np.ndarray) -> tuple:
        """A sample's instances.

        Args:
            location (str): The sample's ``map_location``.
            lidar2global (np.ndarray): 4x4 lidar pose.

        Returns:
            tuple[list[np.ndarray], np.ndarray]: Polylines ``(k_i, 2)`` float64 in the lidar
            frame (a closed ring repeats its first point), and their labels (int64).
        """
        pose = patch_pose(lidar2global, self.patch_size)
        lines, labels = [], []
        for line, label in self.instances(location, pose):
            lines.append(np.asarray(line.coords, dtype=np.float64))
            labels.append(label)
        return lines, np.asarray(labels, dtype=np.int64)

    def instances(self, location: str, pose: PatchPose) -> list:
        """``[(LineString, label)]`` of a patch, in upstream's order."""
        explorer = self.explorer(location)
        vectors = []
        for vec_class in self.map_classes:
            if vec_class == 'divider':
                for layer in self.line_classes:
                    for line in self._line_instances(self._divider_lines(explorer, pose,
                                                                         layer)):
                        vectors.append((line, CLASS2LABEL.get(layer, -1)))
            elif vec_class == 'ped_crossing':
                polygons = []
                for layer in self.ped_crossing_classes:
                    polygons += self._polygons(explorer, pose, layer)
                for line in self._ring_instances(ops.unary_union(polygons), pose,
                                                 +PATCH_MARGIN):
                    vectors.append((line, CLASS2LABEL['ped_crossing']))
            elif vec_class == 'boundary':
                roads, lanes = (self._polygons(explorer, pose, layer)
                                for layer in self.contour_classes)
                union = ops.unary_union([ops.unary_union(roads), ops.unary_union(lanes)])
                for line in self._ring_instances(union, pose, -PATCH_MARGIN):
                    vectors.append((line, CLASS2LABEL['contours']))
            elif vec_class == 'centerline':
                pieces = lane_pieces_reference(
                    explorer, pose, lambda g: self._to_local(g, pose),
                    self._patch(explorer, pose), self.centerline_classes, self.strict,
                    location)
                for points in union_centerlines_reference(pieces):
                    vectors.append((LineString(points), CENTERLINE_LABEL))
            else:
                raise ValueError(f'unknown map class {vec_class!r}; expected one of '
                                 f'{KNOWN_MAP_CLASSES}')
        return [(line, label) for line, label in vectors if label != -1]

    # --- per layer ----------------------------------------------------------------------
    @staticmethod
    def _to_local(geometry, pose: PatchPose):
        geometry = affinity.rotate(geometry, -pose.angle_degrees, origin=(pose.x, pose.y),
                                   use_radians=False)
        return affinity.affine_transform(geometry, [1.0, 0.0, 0.0, 1.0, -pose.x, -pose.y])

    @staticmethod
    def _patch(explorer, pose: PatchPose):
        return explorer.get_patch_coord((pose.x, pose.y, 2 * pose.half_y, 2 * pose.half_x),
                                        pose.angle_degrees)

    def _divider_lines(self, explorer, pose: PatchPose, layer: str) -> list:
        api = explorer.map_api
        if layer not in api.non_geometric_line_layers:
            raise ValueError(f'{layer} is not a line layer')
        patch = self._patch(explorer, pose)
        out = []
        for record in getattr(api, layer):
            if len(api.get('line', record['line_token'])['node_tokens']) < 2:
                continue  # no nodes: upstream skips it; one node: shapely cannot build it
            line = api.extract_line(record['line_token'])
            cut = line.intersection(patch)
            if not cut.is_empty:
                out.append(self._to_local(cut, pose))
        return out

    def _polygons(self, explorer, pose: PatchPose, layer: str) -> list:
        api = explorer.map_api
        if layer not in api.non_geometric_polygon_layers:
            raise ValueError(f'{layer} is not a polygon layer')
        patch = self._patch(explorer, pose)
        out = []
        for record in getattr(api, layer):
            if len(api.get('polygon', record['polygon_token'])['exterior_node_tokens']) < 3:
                continue  # shapely cannot build it: upstream raises there
            polygon = api.extract_polygon(record['polygon_token'])
            if not polygon.is_valid:
                continue
            cut = polygon.intersection(patch)
            if cut.is_empty:
                continue
            cut = self._to_local(cut, pose)
            parts = [g for g in getattr(cut, 'geoms', [cut])
                     if g.geom_type == 'Polygon' and not g.is_empty]
            if parts:
                out.append(MultiPolygon(parts))
        return out

    def _ring_instances(self, union, pose: PatchPose, margin: float) -> list:
        if union.is_empty:
            return []
        parts = [g for g in getattr(union, 'geoms', [union]) if g.geom_type == 'Polygon']
        local_patch = box(-pose.half_x - margin, -pose.half_y - margin, pose.half_x + margin,
                          pose.half_y + margin)
        exteriors = [poly.exterior for poly in parts]
        interiors = [ring for poly in parts for ring in poly.interiors]
        cuts = []
        for ring, clockwise in [(r, True) for r in exteriors] + [(r, False) for r in interiors]:
            if ring.is_ccw == clockwise:
                ring = LinearRing(list(ring.coords)[::-1])
            cut = ring.intersection(local_patch)
            if isinstance(cut, MultiLineString):
                cut = ops.linemerge(cut)
            cuts.append(cut)
        return self._line_instances(cuts)

    def _line_instances(self, geometries: list) -> list:
        """Upstream's ``_one_type_line_geom_to_instances``: the lines of each geometry."""
        out = []
        for geometry in geometries:
            if geometry.is_empty:
                continue
            if geometry.geom_type == 'LineString':
                lines = [geometry]
            elif geometry.geom_type == 'MultiLineString':
                lines = list(geometry.geoms)
            elif self.strict:
                raise NotImplementedError(f'a map cut gave a {geometry.geom_type}')
            else:
                lines = [g for g in getattr(geometry, 'geoms', [])
                         if g.geom_type == 'LineString']
                if len(lines) > 1:
                    merged = ops.linemerge(lines)
                    lines = list(getattr(merged, 'geoms', [merged]))
            out += [line for line in lines if line.length > 0]
        return out


# --- LiDARInstanceLines -----------------------------------------------------------------
def _clamped(points: np.ndarray, half_x: float, half_y: float) -> np.ndarray:
    points = points.astype(np.float32)
    points[..., 0] = np.clip(points[..., 0], -half_x, half_x)
    points[..., 1] = np.clip(points[..., 1], -half_y, half_y)
    return points


def fixed_num_points_reference(polylines: list, fixed_num: int = 20,
                               patch_size=(60.0, 30.0)) -> np.ndarray:
    """``LiDARInstanceLines.fixed_num_sampled_points``: ``[N, fixed_num, 2]`` float32, evenly
    spaced by length with shapely's ``interpolate``, clamped to the patch."""
    out = np.zeros((len(polylines), fixed_num, 2), np.float32)
    for i, coords in enumerate(polylines):
        line = LineString(coords)
        distances = np.linspace(0, line.length, fixed_num)
        out[i] = _clamped(np.array([line.interpolate(d).coords[0] for d in distances]),
                          patch_size[1] / 2, patch_size[0] / 2)
    return out


def shift_orders_v2_reference(polylines: list, fixed_num: int = 20, patch_size=(60.0, 30.0),
                              padding_value: float = -10000,
                              rng: Optional[np.random.RandomState] = None,
                              labels: Optional[Sequence[int]] = None) -> np.ndarray:
    """``LiDARInstanceLines.shift_fixed_num_sampled_points_v2``, one instance at a time.

    ``labels`` (MapTR v2's dataset passes them): a centerline (label 3) keeps its forward
    order only, closed or not, as upstream checks the label before the ring test.

    Returns:
        np.ndarray: ``[N, fixed_num - 1, fixed_num, 2]`` float32.
    """
    rng = np.random if rng is None else rng
    out = np.zeros((len(polylines), fixed_num - 1, fixed_num, 2), np.float32)
    for i, coords in enumerate(polylines):
        line = LineString(coords)
        distances = np.linspace(0, line.length, fixed_num)
        coords = np.asarray(line.coords)
        orders = []
        if labels is not None and int(labels[i]) == CENTERLINE_LABEL:
            orders.append([line.interpolate(d).coords[0] for d in distances])
        elif np.equal(coords[0], coords[-1]).all():
            ring = coords[:-1]
            for shift in range(len(ring)):
                rolled = np.roll(ring, shift, axis=0)
                turned = LineString(np.concatenate([rolled, rolled[:1]]))
                orders.append([turned.interpolate(d).coords[0] for d in distances])
        else:
            forward = np.array([line.interpolate(d).coords[0] for d in distances])
            orders += [forward, forward[::-1]]
        orders = np.asarray(orders, dtype=np.float64)
        if len(orders) > fixed_num - 1:
            orders = orders[rng.choice(len(orders), fixed_num - 1, replace=False)]
        orders = _clamped(orders, patch_size[1] / 2, patch_size[0] / 2)
        out[i, :len(orders)] = orders
        out[i, len(orders):] = padding_value
    return out


def bboxes_reference(polylines: list, patch_size=(60.0, 30.0)) -> np.ndarray:
    """``LiDARInstanceLines.bbox``: ``[N, 4]`` float32 ``(xmin, ymin, xmax, ymax)``, clamped."""
    out = np.zeros((len(polylines), 4), np.float32)
    for i, coords in enumerate(polylines):
        out[i] = LineString(coords).bounds
    half_x, half_y = patch_size[1] / 2, patch_size[0] / 2
    out[:, 0::2] = np.clip(out[:, 0::2], -half_x, half_x)
    out[:, 1::2] = np.clip(out[:, 1::2], -half_y, half_y)
    return out
