"""The synthetic town as a nuScenes map expansion: ``maps/expansion/<location>.json``.

nuscenes-devkit's ``NuScenesMap(dataroot, map_name)`` reads one JSON file per location, and
MapTR's ``VectorizedLocalMap`` (or :mod:`turbox_mm.datasets.map_gt`) cuts each sample's map
ground truth out of it around the lidar pose. The file holds the same street that
:mod:`.maps` draws into ``map_annos``, in the global frame of the scene's ego poses:

- ``road_divider``: the centre line (``d = 0``); ``lane_divider``: the lines at
  ``d = +-3.5`` and ``+-7.0`` (MapTR's class ``divider`` takes both layers);
- ``road_segment``: the carriageway with its parking strips (``|d| <= 9.5``, the kerbs);
  ``lane``: the four lanes (``|d| <= 7``), inside it (ending 1 m before it);
  ``drivable_area``: the road segment (MapTR's class ``boundary`` is the outline of road
  segments and lanes together);
- ``ped_crossing``: each crossing's polygon, kerb to kerb and 4 m wide;
- ``arcline_path_3``: for each lane, the centre line of its band (``d = +-1.75, +-5.25``) in
  its direction of travel (traffic keeps right: lanes with ``d < 0`` run towards ``+s``,
  those with ``d > 0`` towards ``-s``), from one end of the lane polygon to the other, as a
  chain of constant-curvature arcline paths (:func:`lane_arclines`) that the devkit's
  ``discretize_lanes`` turns into poses; ``connectivity``: each lane with no incoming and no
  outgoing lanes (one street, no junctions). MapTR v2's ``centerline`` class is made from
  these;
- the geometric tables ``node``, ``line`` and ``polygon`` they reference; every other layer
  of the devkit's schema is present and empty (no lane connectors, walkways or stop lines).

The devkit knows only nuScenes' four map names, and a location holds one world. Each scene
is its own street in its own coordinates, so scenes that share a location must not come
near each other: :func:`assign_locations` gives each scene a location where no other scene's
street reaches into its samples' map patches (within :data:`CONFLICT_DISTANCE`), and reports
the scenes for which no such location is left (the generator warns; ``map_annos`` stays
exact). A scene writes only the part of its street within :data:`MAP_REACH` of its keyframe
poses, which keeps files small and scenes apart.

Lines and outlines are drawn every metre along the street and simplified by
:data:`SIMPLIFY_TOLERANCE` (so a map polyline lies within 1 cm of the drawn street). Each of a
lane's arcline paths covers at most :data:`ARC_PIECE` of the street and they pass through the
lane's centre line at every joint, so the devkit's discretisation (0.5 m) stays within a few
millimetres of it (2.2 mm at most on 48 scenes).
"""
import json
import math
import os.path as osp
from dataclasses import dataclass, field

import numpy as np
from shapely.geometry import LineString, Polygon

from turbox_mm.datasets.map_gt.expansion_file import NUSCENES_LOCATIONS
from turbox_mm.utils.atomic_files import atomic_write_text
from .road import CARRIAGEWAY, KERB, LANE_WIDTH, Road
from .scene import TICKS_PER_KEYFRAME, Scene, make_token

#: The map-expansion JSON version written (the devkit refuses files older than 1.3).
MAP_EXPANSION_VERSION = '1.3'
#: Where the devkit looks for the files, relative to the data root.
MAP_EXPANSION_FOLDER = osp.join('maps', 'expansion')
#: Metres around the keyframe lidar positions of a scene whose street is written.
MAP_REACH = 60.0
#: Two scenes of one location conflict when a keyframe lidar position of one comes this
#: close to the other's written centre line: half the diagonal of MapTR's 30 m x 60 m patch
#: (33.5 m), plus the half width of the road segment (9.5 m), plus 2 m.
CONFLICT_DISTANCE = 0.5 * float(np.hypot(30.0, 60.0)) + KERB + 2.0
SIMPLIFY_TOLERANCE = 0.01
ROAD_DIVIDERS = (0.0,)
LANE_DIVIDERS = (-LANE_WIDTH, LANE_WIDTH, -CARRIAGEWAY, CARRIAGEWAY)
LANES = ((-CARRIAGEWAY, -LANE_WIDTH), (-LANE_WIDTH, 0.0), (0.0, LANE_WIDTH),
         (LANE_WIDTH, CARRIAGEWAY))
LANE_INSET = 1.0  # m between the ends of the lanes and of the road segment
#: The most arc length (m) of the street's centre line that one arcline path of a lane covers.
ARC_PIECE = 2.5
#: The ``radius`` written for straight arcline paths (as nuScenes does; it is not used).
STRAIGHT_RADIUS = 999.999
#: Curvatures (1/m) below this are written as straight arcline paths.
STRAIGHT_CURVATURE = 1e-6
CROSSING_HALF_WIDTH = 2.0  # m along the street, as maps.vector_map draws them
# Layers of the devkit's schema (nuscenes/map_expansion/map_api.py, NuScenesMap._load_layers).
_LIST_LAYERS = ('polygon', 'line', 'node', 'drivable_area', 'road_segment', 'road_block',
                'lane', 'ped_crossing', 'walkway', 'stop_line', 'carpark_area', 'road_divider',
                'lane_divider', 'traffic_light', 'lane_connector')
_DICT_LAYERS = ('arcline_path_3', 'connectivity')


@dataclass
class SceneMap:
    """The map elements of one scene, global frame (``(N, 2)`` float arrays).

    Attributes:
        index (int): The scene's index.
        seed (int): The dataset's seed (for tokens).
        road_dividers (list): Polylines of the ``road_divider`` layer.
        lane_dividers (list): Polylines of the ``lane_divider`` layer.
        road_segments (list): Exterior rings (not closed) of ``road_segment`` polygons.
        lanes (list): Exterior rings of ``lane`` polygons.
        ped_crossings (list): Exterior rings of ``ped_crossing`` polygons.
        lane_paths (list): For each of ``lanes``, the arcline paths of its centre line
            (:func:`lane_arclines`).
        keyframe_xy (np.ndarray): ``(K, 2)`` keyframe lidar positions.
        centre (np.ndarray): ``(M, 2)`` the written part of the centre line, 0.5 m apart.
    """
    index: int
    seed: int
    road_dividers: list = field(default_factory=list)
    lane_dividers: list = field(default_factory=list)
    road_segments: list = field(default_factory=list)
    lanes: list = field(default_factory=list)
    ped_crossings: list = field(default_factory=list)
    lane_paths: list = field(default_factory=list)
    keyframe_xy: np.ndarray = None
    centre: np.ndarray = None

    def bounds(self, margin: float = 0.0) -> np.ndarray:
        """``[xmin, ymin, xmax, ymax]`` of the written centre line and the keyframes."""
        xy = np.concatenate([self.centre, self.keyframe_xy])
        return np.concatenate([xy.min(0) - margin, xy.max(0) + margin])


def keyframe_lidar_xy(scene: Scene) -> np.ndarray:
    """``(frames, 2)`` global lidar positions at the keyframes (where samples cut patches)."""
    return np.array([(scene.ego2global(scene.tick_time(k * TICKS_PER_KEYFRAME))
                      @ scene.lidar2ego)[:2, 3] for k in range(scene.frames)])


def scene_map(scene: Scene) -> SceneMap:
    """The part of a scene's street near its keyframes, as map-expansion geometry.

    Args:
        scene (Scene): The scene.

    Returns:
        SceneMap: Its elements.
    """
    road = scene.road
    keyframes = keyframe_lidar_xy(scene)
    # The arc-length range whose centre line passes within MAP_REACH of a keyframe; the road
    # may curve back, so the range spans every such point.
    distance = np.min(np.linalg.norm(road.xy[:, None] - keyframes[None], axis=-1), axis=1)
    near = road.s[distance <= MAP_REACH]
    s_lo, s_hi = max(road.s[0], near.min() - 10.0), min(road.s[-1], near.max() + 10.0)
    out = SceneMap(index=scene.index, seed=scene.seed, keyframe_xy=keyframes)
    out.centre = road.polyline(0.0, s_lo, s_hi, step=0.5)
    out.road_dividers = [_line(road, d, s_lo, s_hi) for d in ROAD_DIVIDERS]
    out.lane_dividers = [_line(road, d, s_lo, s_hi) for d in LANE_DIVIDERS]
    out.road_segments = [_band(road, -KERB, KERB, s_lo, s_hi)]
    # Lanes stop short of the segment's ends: no lane edge runs along a segment edge, where
    # shapely's unions of nearly coinciding edges leave slivers that depend on the frame.
    out.lanes = [_band(road, lo, hi, s_lo + LANE_INSET, s_hi - LANE_INSET) for lo, hi in LANES]
    out.lane_paths = [lane_arclines(road, (lo + hi) / 2, s_lo + LANE_INSET, s_hi - LANE_INSET)
                      for lo, hi in LANES]
    for centre in road.crossings:
        if s_lo <= centre - CROSSING_HALF_WIDTH and centre + CROSSING_HALF_WIDTH <= s_hi:
            ring = road.band(-KERB, KERB, centre - CROSSING_HALF_WIDTH,
                             centre + CROSSING_HALF_WIDTH, step=2 * CROSSING_HALF_WIDTH)
            out.ped_crossings.append(ring)
    return out


def lane_arclines(road: Road, d: float, s_start: float, s_end: float,
                  piece: float = ARC_PIECE) -> list:
    """A lane's centre line as nuScenes arcline paths, in the lane's direction of travel.

    The line at lateral offset ``d`` between two arc lengths is cut into equal pieces of at
    most ``piece`` metres (of the street's centre line). Each piece is one circular arc (or
    straight line) from the previous piece's end pose that ends on the lane's centre line
    at the piece's end: the arc through the start pose and that point. The paths chain
    exactly (each ``start_pose`` is the previous ``end_pose``, as the arc formulas give it),
    no position error builds up along the lane, and headings stay within a fraction of a
    degree of the street's. The lane runs towards ``+s`` for ``d < 0`` and towards ``-s``
    for ``d > 0`` (traffic keeps right), so it starts at ``s_start`` or ``s_end``.

    Each path is the devkit's record (``nuscenes/map_expansion/arcline_path_utils.py``):
    ``start_pose`` and ``end_pose`` ``[x, y, yaw]`` (yaw in ``[-pi, pi]``), ``shape``,
    ``radius`` and ``segment_length``. A left arc of radius ``R`` through angle ``theta`` is
    ``'LSL'`` with lengths ``[R * theta, 0, 0]``, a right one ``'RSR'``, and a straight piece
    (curvature below :data:`STRAIGHT_CURVATURE`) ``'LSR'`` with ``[0, L, 0]`` and radius
    :data:`STRAIGHT_RADIUS`.

    Args:
        road (Road): The street.
        d (float): Lateral offset of the lane's centre line.
        s_start (float): First arc length (clipped to the built range).
        s_end (float): Last arc length (clipped to the built range).
        piece (float): The most arc length of a path. Defaults to :data:`ARC_PIECE`.

    Returns:
        list[dict]: The arcline paths in travel order; empty when the range is.
    """
    s_start, s_end = max(s_start, float(road.s[0])), min(s_end, float(road.s[-1]))
    if s_end <= s_start:
        return []
    count = max(1, int(math.ceil((s_end - s_start) / piece)))
    s = np.linspace(s_start, s_end, count + 1)
    if d > 0:
        s = s[::-1]
    xy, heading = road.to_global(s, np.full_like(s, d))
    pose = (float(xy[0, 0]), float(xy[0, 1]),
            _wrap(float(heading[0]) + (math.pi if d > 0 else 0.0)))
    paths = []
    for target in xy[1:]:
        x, y, yaw = pose
        chord = math.hypot(target[0] - x, target[1] - y)
        # The arc from (x, y) tangent to yaw through the target turns by twice the angle
        # between the tangent and the chord: length chord * alpha / sin(alpha).
        alpha = _wrap(math.atan2(target[1] - y, target[0] - x) - yaw)
        length = chord * alpha / math.sin(alpha) if abs(alpha) > 1e-12 else chord
        curvature = 2 * alpha / length if length > 0 else 0.0
        if abs(curvature) < STRAIGHT_CURVATURE:
            curvature = 0.0
            path = dict(shape='LSR', radius=STRAIGHT_RADIUS, segment_length=[0.0, length, 0.0])
        else:
            path = dict(shape='LSL' if curvature > 0 else 'RSR', radius=1 / abs(curvature),
                        segment_length=[length, 0.0, 0.0])
        end = _arc_end(pose, curvature, length)
        paths.append(dict(start_pose=list(pose), end_pose=list(end), **path))
        pose = end
    return paths


def _wrap(angle: float) -> float:
    """``angle`` in ``[-pi, pi]``."""
    return math.remainder(angle, 2 * math.pi)


def _arc_end(pose: tuple, curvature: float, length: float) -> tuple:
    """The pose ``length`` metres along the arc of ``curvature`` from ``pose``."""
    x, y, yaw = pose
    turn = curvature * length
    chord = length * float(np.sinc(turn / (2 * math.pi)))  # 2 sin(turn / 2) / curvature
    return (x + chord * math.cos(yaw + turn / 2), y + chord * math.sin(yaw + turn / 2),
            _wrap(yaw + turn))


def _line(road: Road, d: float, s_lo: float, s_hi: float) -> np.ndarray:
    line = LineString(road.polyline(d, s_lo, s_hi)).simplify(SIMPLIFY_TOLERANCE)
    return np.asarray(line.coords)


def _band(road: Road, d_inner: float, d_outer: float, s_lo: float, s_hi: float) -> np.ndarray:
    polygon = Polygon(road.band(d_inner, d_outer, s_lo, s_hi)).simplify(
        SIMPLIFY_TOLERANCE, preserve_topology=True)
    return np.asarray(polygon.exterior.coords)[:-1]


def _conflicts(a: SceneMap, b: SceneMap) -> int:
    """Keyframes of either scene whose patch the other's street may reach."""
    def near(keyframes, centre):
        if len(keyframes) == 0 or len(centre) == 0:
            return 0
        gap = np.min(np.linalg.norm(keyframes[:, None] - centre[None], axis=-1), axis=1)
        return int(np.count_nonzero(gap < CONFLICT_DISTANCE))

    box_a, box_b = a.bounds(CONFLICT_DISTANCE), b.bounds(CONFLICT_DISTANCE)
    if (box_a[:2] > box_b[2:]).any() or (box_b[:2] > box_a[2:]).any():
        return 0
    return near(a.keyframe_xy, b.centre) + near(b.keyframe_xy, a.centre)


def assign_locations(maps: list) -> tuple:
    """Give each scene one of nuScenes' four locations, keeping scenes of one location apart.

    Scene ``i`` tries the locations in turn from ``NUSCENES_LOCATIONS[i % 4]`` (its default,
    :class:`~.scene.Scene`'s ``location``) and takes the
    first where no earlier scene conflicts with it (see :data:`CONFLICT_DISTANCE`); when every
    location has a conflict it takes the one with the fewest conflicting keyframes.

    Args:
        maps (list[SceneMap]): The scenes' maps, in dataset order.

    Returns:
        tuple[list[str], list[tuple]]: The location of each scene, and the conflicts left as
        ``(scene, other scene, location, keyframes)``.
    """
    members = {location: [] for location in NUSCENES_LOCATIONS}
    chosen, left = [], []
    for scene in maps:
        order = [NUSCENES_LOCATIONS[(scene.index + k) % len(NUSCENES_LOCATIONS)]
                 for k in range(len(NUSCENES_LOCATIONS))]
        best = None
        for location in order:
            clashes = [(other.index, n) for other in members[location]
                       for n in [_conflicts(scene, other)] if n]
            cost = sum(n for _, n in clashes)
            if best is None or cost < best[0]:
                best = (cost, location, clashes)
            if cost == 0:
                break
        _, location, clashes = best
        left += [(scene.index, other, location, n) for other, n in clashes]
        members[location].append(scene)
        chosen.append(location)
    return chosen, left


def expansion_json(maps: list) -> dict:
    """The map-expansion document of one location holding the given scenes' maps.

    Args:
        maps (list[SceneMap]): The location's scenes (may be empty).

    Returns:
        dict: Every layer the devkit loads, ``version`` and ``canvas_edge``.
    """
    doc = {name: [] for name in _LIST_LAYERS}
    doc.update({name: {} for name in _DICT_LAYERS})
    doc['version'] = MAP_EXPANSION_VERSION
    extent = [1.0, 1.0]

    for scene in maps:
        def token(*parts, _scene=scene):
            return make_token(_scene.seed, 'map', _scene.index, *parts)

        def nodes(points, *parts):
            tokens = []
            for k, (x, y) in enumerate(np.asarray(points, dtype=np.float64)):
                tokens.append(token(*parts, 'node', k))
                doc['node'].append(dict(token=tokens[-1], x=float(x), y=float(y)))
                extent[0], extent[1] = max(extent[0], float(x)), max(extent[1], float(y))
            return tokens

        def line(points, *parts):
            doc['line'].append(dict(token=token(*parts, 'line'),
                                    node_tokens=nodes(points, *parts)))
            return doc['line'][-1]['token']

        def polygon(ring, *parts):
            doc['polygon'].append(dict(token=token(*parts, 'polygon'),
                                       exterior_node_tokens=nodes(ring, *parts), holes=[]))
            return doc['polygon'][-1]['token']

        segments = []
        for k, ring in enumerate(scene.road_segments):
            area = token('drivable_area', k)
            segments.append(token('road_segment', k))
            shape = polygon(ring, 'road_segment', k)
            doc['drivable_area'].append(dict(token=area, polygon_tokens=[shape]))
            doc['road_segment'].append(dict(token=segments[-1], polygon_token=shape,
                                            is_intersection=False, drivable_area_token=area))
        for k, (ring, paths) in enumerate(zip(scene.lanes, scene.lane_paths, strict=True)):
            doc['lane'].append(dict(
                token=token('lane', k), polygon_token=polygon(ring, 'lane', k), lane_type='CAR',
                from_edge_line_token='', to_edge_line_token='', left_lane_divider_segments=[],
                right_lane_divider_segments=[]))
            doc['arcline_path_3'][doc['lane'][-1]['token']] = paths
            doc['connectivity'][doc['lane'][-1]['token']] = dict(incoming=[], outgoing=[])
        for k, ring in enumerate(scene.ped_crossings):
            doc['ped_crossing'].append(dict(
                token=token('ped_crossing', k), polygon_token=polygon(ring, 'ped_crossing', k),
                road_segment_token=segments[0] if segments else ''))
        for k, points in enumerate(scene.road_dividers):
            doc['road_divider'].append(dict(
                token=token('road_divider', k), line_token=line(points, 'road_divider', k),
                road_segment_token=segments[0] if segments else ''))
        for k, points in enumerate(scene.lane_dividers):
            doc['lane_divider'].append(dict(
                token=token('lane_divider', k), line_token=line(points, 'lane_divider', k),
                lane_divider_segments=[]))
    doc['canvas_edge'] = [float(np.ceil(extent[0])), float(np.ceil(extent[1]))]
    return doc


def write_map_expansion(out_dir: str, maps: list, locations: list) -> dict:
    """Write ``maps/expansion/<location>.json`` for each of nuScenes' four locations.

    Every location gets a file (MapTR's ``VectorizedLocalMap`` opens all four at start),
    empty where no scene is.

    Args:
        out_dir (str): The data root.
        maps (list[SceneMap]): Every scene's map.
        locations (list[str]): Each scene's location (:func:`assign_locations`).

    Returns:
        dict: ``{location: bytes written}``.
    """
    written = {}
    for location in NUSCENES_LOCATIONS:
        mine = [m for m, loc in zip(maps, locations) if loc == location]
        text = json.dumps(expansion_json(mine), separators=(',', ':'))
        atomic_write_text(osp.join(out_dir, MAP_EXPANSION_FOLDER, f'{location}.json'), text)
        written[location] = len(text)
    return written


__all__ = ['NUSCENES_LOCATIONS', 'MAP_EXPANSION_VERSION', 'MAP_EXPANSION_FOLDER', 'SceneMap',
           'scene_map', 'assign_locations', 'expansion_json', 'write_map_expansion',
           'keyframe_lidar_xy']
