"""The turbox map ground truth: upstream's ``VectorizedLocalMap`` without shapely per sample.

Per location, once (:class:`~.location_geometry.LocationGeometry`): the divider lines, and the
outlines of the united crossings and of the united road segments and lanes, packed in arrays
with a chunk index. Per sample, in numpy: pick the chunks near the patch, move their edges
into the patch frame, and cut (:mod:`.box_clip`):

- ``divider`` (0): each line cut by the patch; its pieces in order along it, lines in
  upstream's order (``road_divider`` records, then ``lane_divider`` records). Same instances,
  same order as :class:`~.reference.VectorizedLocalMapReference`.
- ``ped_crossing`` (1): the crossings' outlines cut by the patch and closed along its edge,
  i.e. the outlines of the cut crossings (upstream cuts each crossing, unites, and takes the
  rings whole: the patch grown by 0.2 m does not cut them). A patch wholly inside a crossing
  gets the patch's outline.
- ``boundary`` (2): the outline pieces inside the patch shrunk by 0.2 m: upstream's rings of
  the cut union lose exactly the patch's edges to that box, and what is left is the union's
  own outline inside it.
- ``centerline`` (3, MapTR v2): :mod:`.centerline` (lanes discretised once per location,
  joined per sample with dicts): same instances, same order as the reference.

Order: dividers as upstream. Crossings and boundaries come exteriors first, then holes, as
upstream, but the order of polygons within a class, and where a closed ring starts, follow
the per-location union rather than GEOS's per-sample union, which nothing pins down; the
point sets, directions (polygon on the right), and open/closed are the same. MapTR's targets
do not depend on either: instances are matched by the Hungarian assigner, and a closed ring's
equivalent orders are all its rotations.

Vertices: where polygons of a layer share or cross edges, GEOS's per-sample union keeps
the noding points (repeated or collinear vertices) that the per-location union may not have;
the geometry, and so the points sampled by length, are the same, but a closed ring's
equivalent orders (one per vertex) then differ by those rotations. A map edge lying exactly
on the patch's edge with its polygon outside (an exact coincidence of measure zero) stays
in the fast path's piece where shapely drops it. The tests compare instances after removing
repeated and collinear vertices (tests/test_map_gt.py).

Degenerate records and cuts are handled as in :mod:`.reference` (skipped records, dropped
touching points and zero-length pieces).
"""
from typing import Sequence

import numpy as np

from .box_clip import box_ring, clip_arcs, link_rings, point_in_rings
from .centerline import LaneCenterlines, centerline_instances
from .centerline_reference import CENTERLINE_LABEL
from .expansion_file import load_map_expansion
from .location_geometry import LocationGeometry
from .patch_pose import PatchPose, patch_pose
from .reference import CLASS2LABEL, KNOWN_MAP_CLASSES, MAP_CLASSES, PATCH_MARGIN


class FastVectorizedLocalMap:
    """A sample's map instances from arrays prepared once per location.

    Takes the arguments of :class:`~.reference.VectorizedLocalMapReference` (but ``strict``)
    and returns the same ``(polylines, labels)``.

    Args:
        data_root (str): nuScenes root holding ``maps/expansion/<location>.json``.
        patch_size (tuple[float, float]): ``(patch_h, patch_w)``. Defaults to (60, 30).
        map_classes (Sequence[str]): Classes to extract, in output order.
        line_classes (Sequence[str]): Layers of ``divider``.
        ped_crossing_classes (Sequence[str]): Layers of ``ped_crossing``.
        contour_classes (Sequence[str]): The two layers whose outline is ``boundary``.
        centerline_classes (Sequence[str]): The lane layers of ``centerline``.

    Examples:
        >>> vector_map = FastVectorizedLocalMap('data/nuscenes')  # doctest: +SKIP
        >>> polylines, labels = vector_map('boston-seaport', lidar2global)  # doctest: +SKIP
    """

    def __init__(self, data_root: str, patch_size=(60.0, 30.0),
                 map_classes: Sequence[str] = MAP_CLASSES,
                 line_classes: Sequence[str] = ('road_divider', 'lane_divider'),
                 ped_crossing_classes: Sequence[str] = ('ped_crossing',),
                 contour_classes: Sequence[str] = ('road_segment', 'lane'),
                 centerline_classes: Sequence[str] = ('lane_connector', 'lane')):
        self.data_root = data_root
        self.patch_size = tuple(float(v) for v in patch_size)
        self.map_classes = tuple(map_classes)
        for name in self.map_classes:
            if name not in KNOWN_MAP_CLASSES:
                raise ValueError(f'unknown map class {name!r}; expected one of '
                                 f'{KNOWN_MAP_CLASSES}')
        self.line_classes = tuple(line_classes)
        self.ped_crossing_classes = tuple(ped_crossing_classes)
        self.contour_classes = tuple(contour_classes)
        self.centerline_classes = tuple(centerline_classes)
        self._geometry = {}
        self._lanes = {}

    def geometry(self, location: str) -> LocationGeometry:
        """A location's prepared map, built on first use.

        Raises:
            MapExpansionError: No readable file for the location (named).
        """
        if location not in self._geometry:
            doc = load_map_expansion(self.data_root, location)
            self._geometry[location] = LocationGeometry.from_expansion(
                doc, self.line_classes, self.ped_crossing_classes, self.contour_classes)
        return self._geometry[location]

    def lanes(self, location: str) -> LaneCenterlines:
        """A location's lanes for the centerline class, built on first use."""
        if location not in self._lanes:
            doc = load_map_expansion(self.data_root, location)
            self._lanes[location] = LaneCenterlines.from_expansion(
                doc, self.centerline_classes, location)
        return self._lanes[location]

    def __call__(self, location: str, lidar2global: np.ndarray) -> tuple:
        """A sample's instances.

        Args:
            location (str): The sample's ``map_location``.
            lidar2global (np.ndarray): 4x4 lidar pose.

        Returns:
            tuple[list[np.ndarray], np.ndarray]: Polylines ``(k_i, 2)`` float64 in the lidar
            frame (a closed ring repeats its first point), and their labels (int64).
        """
        return self.from_pose(location, patch_pose(lidar2global, self.patch_size))

    def from_pose(self, location: str, pose: PatchPose) -> tuple:
        geometry = self.geometry(location)
        lines, labels = [], []
        for name in self.map_classes:
            if name == 'divider':
                found = self._dividers(geometry, pose)
                lines += [p for _, p in found]
                labels += [int(geometry.divider_labels[i]) for i, _ in found]
            elif name == 'ped_crossing':
                found = self._crossings(geometry, pose)
                lines += found
                labels += [CLASS2LABEL['ped_crossing']] * len(found)
            elif name == 'boundary':
                found = self._boundaries(geometry, pose)
                lines += found
                labels += [CLASS2LABEL['contours']] * len(found)
            else:
                found = centerline_instances(self.lanes(location), pose)
                lines += found
                labels += [CENTERLINE_LABEL] * len(found)
        keep = [i for i, label in enumerate(labels) if label != -1]
        return [lines[i] for i in keep], np.asarray([labels[i] for i in keep], np.int64)

    @staticmethod
    def _dividers(geometry: LocationGeometry, pose: PatchPose) -> list:
        edges = geometry.dividers.candidate_edges(pose.global_bounds(1e-6))
        pieces = clip_arcs(geometry.dividers, edges, pose.to_local, pose.half_x, pose.half_y)
        return [(line, points) for line, points, _ in pieces]

    @staticmethod
    def _crossings(geometry: LocationGeometry, pose: PatchPose) -> list:
        rings = geometry.crossings
        edges = rings.candidate_edges(pose.global_bounds(1e-6))
        pieces = clip_arcs(rings, edges, pose.to_local, pose.half_x, pose.half_y)
        exterior_count = len(geometry.crossing_parts)
        whole = [(ring, points) for ring, points, closed in pieces if closed]
        opened = [(ring, points) for ring, points, closed in pieces if not closed]
        exteriors = link_rings(opened, pose.half_x, pose.half_y)
        exteriors += [(ring, p) for ring, p in whole if ring < exterior_count]
        holes = [(ring, p) for ring, p in whole if ring >= exterior_count]
        if not opened:
            area = 4 * pose.half_x * pose.half_y
            centre = np.array([[pose.x, pose.y]])
            for index, (part_area, part_rings) in enumerate(geometry.crossing_parts):
                if part_area >= area and point_in_rings(centre[0], part_rings):
                    exteriors.append((index, box_ring(pose.half_x, pose.half_y)))
        exteriors.sort(key=lambda item: item[0])
        return [p for _, p in exteriors] + [p for _, p in holes]

    @staticmethod
    def _boundaries(geometry: LocationGeometry, pose: PatchPose) -> list:
        half_x, half_y = pose.half_x - PATCH_MARGIN, pose.half_y - PATCH_MARGIN
        edges = geometry.boundaries.candidate_edges(pose.global_bounds(1e-6))
        pieces = clip_arcs(geometry.boundaries, edges, pose.to_local, half_x, half_y)
        return [points for _, points, _ in pieces]
