"""Lane centre lines of the synthetic generator's nuScenes map expansion
(turbox_mm.datasets.synthetic.map_expansion), which MapTR v2's ``centerline`` class is made of.

Every ``lane`` record of ``maps/expansion/<location>.json`` has an ``arcline_path_3`` entry
and a ``connectivity`` entry. Read back through the devkit's ``NuScenesMap``:

- ``discretize_lanes([token], 0.5)`` lies within 2 cm of the lane's centre line (the street's
  ``Road.polyline`` at ``d = +-1.75, +-5.25``, and inside the lane polygon), and the centre
  line within 2 cm of it; it runs in the lane's direction of travel (``d < 0`` towards
  ``+s``, ``d > 0`` towards ``-s``; poses' yaw within 1 degree of the street's heading) from
  1 m inside one end of the road segment to 1 m inside the other (1 cm);
- consecutive arcline paths chain: the devkit's pose at the end of one, the written
  ``end_pose`` and the next ``start_pose`` agree to 1e-6; the records are valid devkit records
  (shapes, finite radii, no ``Infinity`` in the file);
- ``get_incoming_lane_ids`` and ``get_outgoing_lane_ids`` are empty (one street, no
  junctions).

On a tiny dataset from the generator, and on the maps of 8 longer scenes whose streets bend
both ways (so straight, left and right paths are all checked).
"""
import json
import math
import os.path as osp

import numpy as np
import pytest
import shapely
from nuscenes.map_expansion.arcline_path_utils import pose_at_length
from nuscenes.map_expansion.map_api import NuScenesMap
from shapely.geometry import LineString, Polygon

from turbox_mm.datasets.synthetic.map_expansion import (NUSCENES_LOCATIONS, assign_locations,
                                                        lane_arclines, scene_map,
                                                        write_map_expansion)
from turbox_mm.datasets.synthetic.scene import Scene, make_token

#: Lateral offsets of the centre lines of a scene's lanes 0..3 (the middles of the bands
#: [-7, -3.5], [-3.5, 0], [0, 3.5], [3.5, 7]).
LANE_CENTRES = (-5.25, -1.75, 1.75, 5.25)
LANE_INSET = 1.0  # m between a lane's ends and its road segment's
LINE_TOL = 0.02  # m, discretised lane to centre line and back
END_TOL = 0.01  # m
CHAIN_TOL = 1e-6
YAW_TOL = math.radians(1.0)
SHAPES = {'LSR', 'LSL', 'RSR', 'RSL', 'LRL', 'RLR'}


# --- data ----------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def generated(tmp_path_factory):
    """A tiny synthetic nuScenes from the generator (2 scenes x 3 keyframes, tiny sensors), and
    the scenes rebuilt from its options (a scene is a pure function of them)."""
    from turbox_mm.datasets.synthetic import generate
    root = str(tmp_path_factory.mktemp('lanes') / 'nuscenes')
    summary = generate(root, scenes=2, frames=3, image_size=(64, 36), points=300, sweeps=0,
                       workers=1, gt_database=False, progress=False)
    scenes = [Scene(0, i, 3, preroll_ticks=0, image_size=(64, 36)) for i in range(2)]
    return root, scenes, list(summary['map_expansion']['locations'].values())


@pytest.fixture(scope='module')
def town(tmp_path_factory):
    """The map expansion of 8 scenes of 12 keyframes (longer, bending streets)."""
    root = str(tmp_path_factory.mktemp('lane_town'))
    scenes = [Scene(7, i, 12, preroll_ticks=0, image_size=(64, 36)) for i in range(8)]
    maps = [scene_map(scene) for scene in scenes]
    locations, _ = assign_locations(maps)
    write_map_expansion(root, maps, locations)
    return root, scenes, locations


# --- helpers -------------------------------------------------------------------------------
def point_to_polyline(points, polyline):
    """Distance of each point to a polyline."""
    keep = np.r_[True, np.abs(np.diff(polyline, axis=0)).max(1) > 0]  # no repeated vertices
    return shapely.distance(shapely.points(points), LineString(polyline[keep]))


def centre_s(road, points):
    """Arc length ``s`` of points on the street's centre line (``d = 0``)."""
    a, b = road.xy[:-1], road.xy[1:]
    d = b - a
    t = np.clip(np.einsum('psk,sk->ps', points[:, None] - a[None], d)
                / (d ** 2).sum(1), 0, 1)
    gap = np.linalg.norm(points[:, None] - (a[None] + t[..., None] * d[None]), axis=-1)
    i = gap.argmin(1)
    assert gap[np.arange(len(points)), i].max() < 1e-6  # the points are on the centre line
    return road.s[i] + t[np.arange(len(points)), i] * (road.s[i + 1] - road.s[i])


def wrap(angle):
    return np.remainder(np.asarray(angle) + np.pi, 2 * np.pi) - np.pi


def check_location_files(root, scenes, locations):
    """Check every scene's lanes in its location's file; return the largest deviation (m) of a
    discretised lane from its centre line and the arcline paths seen."""
    maps = {loc: NuScenesMap(dataroot=root, map_name=loc) for loc in NUSCENES_LOCATIONS}
    for loc in NUSCENES_LOCATIONS:
        with open(osp.join(root, 'maps', 'expansion', f'{loc}.json')) as f:
            text = f.read()
        assert 'Infinity' not in text and 'NaN' not in text
        json.loads(text, parse_constant=lambda name: pytest.fail(f'{name} in {loc}.json'))
        nusc_map = maps[loc]
        tokens = [lane['token'] for lane in nusc_map.lane]
        assert sorted(nusc_map.arcline_path_3) == sorted(tokens)
        assert sorted(nusc_map.connectivity) == sorted(tokens)
        assert all(nusc_map.arcline_path_3[t] for t in tokens)

    worst, paths_seen = 0.0, []
    for scene, loc in zip(scenes, locations):
        nusc_map, road = maps[loc], scene.road
        divider_token = make_token(scene.seed, 'map', scene.index, 'road_divider', 0)
        divider = nusc_map.get('road_divider', divider_token)
        ends = np.asarray(nusc_map.extract_line(divider['line_token']).coords)[[0, -1]]
        s_lo, s_hi = sorted(centre_s(road, ends))  # the road segment's ends
        assert s_hi - s_lo > 20
        for k, d in enumerate(LANE_CENTRES):
            token = make_token(scene.seed, 'map', scene.index, 'lane', k)
            lane = nusc_map.get('lane', token)
            assert nusc_map.get_incoming_lane_ids(token) == []
            assert nusc_map.get_outgoing_lane_ids(token) == []
            assert nusc_map.connectivity[token] == dict(incoming=[], outgoing=[])
            paths = nusc_map.get_arcline_path(token)
            paths_seen += paths
            check_chain(paths)

            poses = np.array(nusc_map.discretize_lanes([token], 0.5)[token])
            xy = poses[:, :2]
            # The centre line, from 1 m inside one end of the road segment to the other.
            s_start, s_end = s_lo + LANE_INSET, s_hi - LANE_INSET
            centre = road.polyline(d, s_start, s_end, step=0.1)
            deviation = max(point_to_polyline(xy, centre).max(),
                            point_to_polyline(centre, xy).max())
            assert deviation < LINE_TOL, (scene.index, k, deviation)
            worst = max(worst, deviation)
            # Inside the lane polygon, which the line's middle is.
            polygon = nusc_map.extract_polygon(lane['polygon_token'])
            assert isinstance(polygon, Polygon)
            assert shapely.contains_xy(polygon.buffer(LINE_TOL), xy[:, 0], xy[:, 1]).all()
            # From the start of the lane in its direction of travel to its end.
            first, last = (centre[0], centre[-1]) if d < 0 else (centre[-1], centre[0])
            assert np.linalg.norm(xy[0] - first) < END_TOL
            assert np.linalg.norm(xy[-1] - last) < END_TOL
            length = np.linalg.norm(np.diff(centre, axis=0), axis=1).sum()
            assert abs(sum(sum(p['segment_length']) for p in paths) - length) < LINE_TOL
            # Every step runs in the direction of travel, and yaws follow the street's
            # heading (reversed for d > 0) where each pose is.
            heading = np.interp(project_s(road, d, xy, s_start, s_end), road.s, road.heading)
            travel = heading if d < 0 else heading + np.pi
            along = np.einsum('nk,nk->n', np.diff(xy, axis=0),
                              np.stack([np.cos(travel), np.sin(travel)], 1)[1:])
            assert (along > -1e-9).all() and along.sum() > 0.99 * length
            assert np.abs(wrap(poses[:, 2] - travel)).max() < YAW_TOL
    return worst, paths_seen


def project_s(road, d, points, s_start, s_end, step=0.1):
    """Arc length ``s`` of the nearest point of the line at offset ``d`` (sampled every
    ``step`` between two arc lengths)."""
    s = np.arange(s_start, s_end + step, step)
    line = road.to_global(s, np.full_like(s, d))[0]
    along = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(line, axis=0), axis=1))]
    return np.interp(shapely.line_locate_point(LineString(line), shapely.points(points)),
                     along, s)


def check_chain(paths):
    """Valid devkit records whose ends, as the devkit computes them, start the next path."""
    for path in paths:
        assert path['shape'] in SHAPES
        assert math.isfinite(path['radius']) and path['radius'] > 0
        assert len(path['segment_length']) == 3 and min(path['segment_length']) >= 0
        assert sum(path['segment_length']) > 0
        end = pose_at_length(path, sum(path['segment_length']))
        assert np.abs(np.subtract(end[:2], path['end_pose'][:2])).max() < CHAIN_TOL
        assert abs(wrap(end[2] - path['end_pose'][2])) < CHAIN_TOL
    for a, b in zip(paths, paths[1:]):
        assert np.abs(np.subtract(a['end_pose'][:2], b['start_pose'][:2])).max() < CHAIN_TOL
        assert abs(wrap(a['end_pose'][2] - b['start_pose'][2])) < CHAIN_TOL


# --- tests ---------------------------------------------------------------------------------
def test_generator_writes_lane_centrelines(generated):
    root, scenes, locations = generated
    worst, paths = check_location_files(root, scenes, locations)
    assert worst < LINE_TOL and paths
    # The lane records themselves are as before: polygons only, no edges or divider segments.
    with open(osp.join(root, 'maps', 'expansion', f'{locations[0]}.json')) as f:
        lanes = json.load(f)['lane']
    assert len(lanes) == 4
    for lane in lanes:
        assert set(lane) == {'token', 'polygon_token', 'lane_type', 'from_edge_line_token',
                             'to_edge_line_token', 'left_lane_divider_segments',
                             'right_lane_divider_segments'}


def test_lane_centrelines_follow_bending_streets(town):
    root, scenes, locations = town
    worst, paths = check_location_files(root, scenes, locations)
    assert worst < LINE_TOL
    shapes = {p['shape'] for p in paths}
    assert shapes == {'LSR', 'LSL', 'RSR'}  # straight, left and right pieces
    curved = [p for p in paths if p['shape'] != 'LSR']
    assert min(p['radius'] for p in curved) < 50  # real bends, not just noise
    for p in paths:
        lengths = p['segment_length']
        assert (lengths[0] == lengths[2] == 0) if p['shape'] == 'LSR' else (
            lengths[1] == lengths[2] == 0)
    # Pieces of at most 2.5 m of the street's centre line: longer outside a bend (radius >= 30).
    assert max(sum(p['segment_length']) for p in paths) <= 2.5 * (1 + 5.25 / 30) + 0.01


def test_lane_arclines_directions_and_empty_range():
    road = Scene(7, 0, 3, preroll_ticks=0, image_size=(64, 36)).road
    s0, s1 = road.s[0] + 10, road.s[0] + 40
    assert lane_arclines(road, -1.75, s1, s0) == []
    forward, backward = lane_arclines(road, -1.75, s0, s1), lane_arclines(road, 1.75, s0, s1)
    start, heading = road.to_global(np.array([s0, s1]), np.array([-1.75, 1.75]))
    assert np.abs(np.subtract(forward[0]['start_pose'][:2], start[0])).max() < 1e-9
    assert abs(wrap(forward[0]['start_pose'][2] - heading[0])) < 1e-9
    assert np.abs(np.subtract(backward[0]['start_pose'][:2], start[1])).max() < 1e-9
    assert abs(wrap(backward[0]['start_pose'][2] - heading[1] - np.pi)) < 1e-9
    check_chain(forward)
    check_chain(backward)
