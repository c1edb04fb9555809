"""MapTR v2's ``centerline`` map class: the fast path against the reference (upstream's
converter through nuscenes-devkit, shapely and networkx), on a hand-made map with forks,
merges, a roundabout, a closed loop and broken records; the forward-only point orders."""
import json
import math
import os.path as osp

import numpy as np
import pytest
from shapely.geometry import LineString

from turbox_mm.datasets.map_gt import (FastVectorizedLocalMap, VectorizedLocalMapReference,
                                       map_targets, shift_orders_v2,
                                       shift_orders_v2_reference)
from turbox_mm.datasets.map_gt.centerline import union_centerlines
from turbox_mm.datasets.map_gt.line_simplify import simplify_line
from turbox_mm.datasets.map_gt.centerline_reference import (LaneGeometryError,
                                                            union_centerlines_reference)
from turbox_mm.datasets.synthetic.map_expansion import expansion_json

LOCATION = 'boston-seaport'
STRAIGHT_RADIUS = 999.999


def _straight(x, y, yaw, length):
    end = [x + length * math.cos(yaw), y + length * math.sin(yaw), yaw]
    return dict(start_pose=[x, y, yaw], end_pose=end, shape='LSR', radius=STRAIGHT_RADIUS,
                segment_length=[0.0, length, 0.0])


def _arc(x, y, yaw, radius, angle):
    """A turn of ``angle`` radians (left if positive) of the given radius."""
    sign = 1.0 if angle > 0 else -1.0
    cx, cy = x - sign * radius * math.sin(yaw), y + sign * radius * math.cos(yaw)
    end_yaw = yaw + angle
    end = [cx + sign * radius * math.sin(end_yaw), cy - sign * radius * math.cos(end_yaw)]
    return dict(start_pose=[x, y, yaw], end_pose=end + [end_yaw],
                shape='LSL' if angle > 0 else 'RSR', radius=radius,
                segment_length=[radius * abs(angle), 0.0, 0.0])


class MapBuilder:
    """A map-expansion document with lanes and lane connectors (polygons: their centre line
    buffered by 1.5 m)."""

    def __init__(self):
        self.doc = expansion_json([])
        self.count = 0

    def _nodes(self, ring):
        tokens = []
        for x, y in ring:
            self.count += 1
            tokens.append(f'n{self.count}')
            self.doc['node'].append(dict(token=tokens[-1], x=float(x), y=float(y)))
        return tokens

    def polygon(self, ring):
        self.count += 1
        token = f'p{self.count}'
        self.doc['polygon'].append(dict(token=token, exterior_node_tokens=self._nodes(ring),
                                        holes=[]))
        return token

    def lane(self, token, paths, layer='lane', incoming=(), outgoing=(), polygon='buffer',
             connectivity=True):
        from nuscenes.map_expansion.arcline_path_utils import discretize_lane
        if polygon == 'buffer':
            line = LineString(np.array(discretize_lane(paths, 0.5))[:, :2])
            polygon = self.polygon(np.asarray(line.buffer(1.5).exterior.coords)[:-1])
        record = dict(token=token, polygon_token=polygon)
        if layer == 'lane':
            record.update(lane_type='CAR', from_edge_line_token='', to_edge_line_token='',
                          left_lane_divider_segments=[], right_lane_divider_segments=[])
        else:
            record.update(incoming_edge_line_token='', outgoing_edge_line_token='')
        self.doc[layer].append(record)
        if paths:
            self.doc['arcline_path_3'][token] = paths
        if connectivity:
            self.doc['connectivity'][token] = dict(incoming=list(incoming),
                                                   outgoing=list(outgoing))

    def write(self, root):
        xy = np.array([[n['x'], n['y']] for n in self.doc['node']])
        self.doc['canvas_edge'] = [float(np.ceil(xy[:, 0].max())) + 10,
                                   float(np.ceil(xy[:, 1].max())) + 10]
        for location in ('boston-seaport', 'singapore-onenorth', 'singapore-hollandvillage',
                         'singapore-queenstown'):
            doc = self.doc if location == LOCATION else expansion_json([])
            path = osp.join(root, 'maps', 'expansion', f'{location}.json')
            import os
            os.makedirs(osp.dirname(path), exist_ok=True)
            with open(path, 'w') as f:
                json.dump(doc, f)


def town() -> MapBuilder:
    """Forks, a merge, a roundabout with one way in and out, a loop with no way in, a lane
    that meets its successor exactly (a self-loop node), and records the class skips."""
    m = MapBuilder()
    q = math.pi / 2
    x0, y0 = 200.0, 300.0
    m.lane('L1', [_straight(x0, y0, 0.0, 40.0)], outgoing=['C1', 'C2'])
    m.lane('C1', [_arc(x0 + 40, y0, 0.0, 10.0, q)], layer='lane_connector',
           incoming=['L1'], outgoing=['L2'])
    m.lane('C2', [_straight(x0 + 40, y0, 0.0, 20.0)], layer='lane_connector',
           incoming=['L1', 'C4'], outgoing=['L3'])
    m.lane('L2', [_straight(x0 + 50, y0 + 10, q, 30.0)], incoming=['C1'])
    m.lane('L3', [_straight(x0 + 60, y0, 0.0, 10.0), _arc(x0 + 70, y0, 0.0, 20.0, -0.3),
                  _straight(*_arc(x0 + 70, y0, 0.0, 20.0, -0.3)['end_pose'], 15.0)],
           incoming=['C2'])
    m.lane('L5', [_straight(x0 + 10, y0 - 25, 0.2, 25.0)], outgoing=['C4'])
    end = _straight(x0 + 10, y0 - 25, 0.2, 25.0)['end_pose']
    m.lane('C4', [_arc(*end, 12.0, 0.9)], layer='lane_connector', incoming=['L5'],
           outgoing=['C2'])
    # a roundabout of four quarter turns around (cx, cy), entered from L6, left by L7
    cx, cy, r = x0 + 20, y0 + 40, 8.0
    starts = [(cx + r * math.cos(a), cy + r * math.sin(a), a + q)
              for a in (-q, 0.0, q, 2 * q)]
    for k, (x, y, yaw) in enumerate(starts):
        outgoing = [f'R{(k + 1) % 4}'] + (['L7'] if k == 2 else [])
        incoming = [f'R{(k - 1) % 4}'] + (['L6'] if k == 0 else [])
        m.lane(f'R{k}', [_arc(x, y, yaw, r, q)], layer='lane_connector', incoming=incoming,
               outgoing=outgoing)
    m.lane('L6', [_straight(cx - 20, cy - r, 0.0, 20.0)], outgoing=['R0'])
    x, y, _ = starts[3]
    m.lane('L7', [_straight(x, y, math.pi, 20.0)], incoming=['R2'])
    # a closed loop nobody enters: no root, no instance
    for k in range(3):
        a = 2 * math.pi * k / 3
        x, y = x0 - 30 + 6 * math.cos(a), y0 + 10 + 6 * math.sin(a)
        m.lane(f'O{k}', [_arc(x, y, a + q, 6.0, 2 * math.pi / 3)], layer='lane_connector',
               incoming=[f'O{(k - 1) % 3}'], outgoing=[f'O{(k + 1) % 3}'])
    # skipped: no polygon, a self-crossing polygon, a polygon of two nodes
    m.lane('X1', [_straight(x0, y0 + 5, 0.0, 30.0)], layer='lane_connector', polygon=None)
    bowtie = m.polygon([(x0, y0 - 5), (x0 + 10, y0 - 2), (x0 + 10, y0 - 5), (x0, y0 - 2)])
    m.lane('X2', [_straight(x0, y0 - 3.5, 0.0, 10.0)], polygon=bowtie)
    m.lane('X3', [_straight(x0, y0 + 20, 0.0, 10.0)], polygon=m.polygon([(x0, y0 + 20),
                                                                         (x0 + 5, y0 + 20)]))
    return m


def _poses(count, seed=0, centre=(215.0, 305.0), spread=45.0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        yaw = rng.uniform(-math.pi, math.pi)
        pose = np.eye(4)
        pose[:2, :2] = [[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]]
        pose[:2, 3] = np.asarray(centre) + rng.uniform(-spread, spread, 2)
        out.append(pose)
    return out


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('centerline_town'))
    town().write(path)
    return path


@pytest.mark.parametrize('patch_size', [(60.0, 30.0), (100.0, 100.0), (24.0, 12.0)])
def test_fast_centerlines_equal_the_reference(root, patch_size):
    # boundary (of the lane polygons) before, to check the class's place in the output;
    # its own order may differ (tests/test_map_gt.py compares it), so centerlines only
    classes = ('boundary', 'centerline')
    reference = VectorizedLocalMapReference(root, patch_size, classes)
    fast = FastVectorizedLocalMap(root, patch_size, classes)
    seen = 0
    for pose in _poses(120, seed=int(patch_size[0])):
        want, want_labels = reference(LOCATION, pose)
        got, got_labels = fast(LOCATION, pose)
        np.testing.assert_array_equal(got_labels, want_labels)
        assert set(want_labels.tolist()) <= {2, 3}
        want = [line for line, label in zip(want, want_labels) if label == 3]
        got = [line for line, label in zip(got, got_labels) if label == 3]
        assert len(got) == len(want)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
        seen += len(want)
    assert seen > 50  # the poses do meet the lanes


def test_the_whole_town_in_one_patch(root):
    """Every path: L1 and L5 each fork into L2 and L3 (C2 starts where C1 does, so the point
    graph joins L5's way in to both), the roundabout's one way through (L6, three quarter
    turns, L7), nothing of the loop without an entry."""
    pose = np.eye(4)
    pose[:2, 3] = (215.0, 305.0)
    reference = VectorizedLocalMapReference(root, (200.0, 200.0), ('centerline', ))
    lines, labels = reference(LOCATION, pose)
    got, got_labels = FastVectorizedLocalMap(root, (200.0, 200.0), ('centerline', ))(
        LOCATION, pose)
    assert set(labels.tolist()) == {3} and len(lines) == len(got) == 5
    for a, b in zip(got, lines):
        np.testing.assert_array_equal(a, b)
    ends = [(tuple(np.round(line[0] + (215.0, 305.0), 1)),
             tuple(np.round(line[-1] + (215.0, 305.0), 1))) for line in lines]
    l2_end, l3_end = (250.0, 340.0), (290.2, 294.7)
    assert ends == [((200.0, 300.0), l2_end), ((200.0, 300.0), l3_end),
                    ((210.0, 275.0), l2_end), ((210.0, 275.0), l3_end),
                    ((200.0, 332.0), (192.0, 340.0))]
    # the roundabout's path passes its far side (y = 348) before leaving by L7
    assert np.isclose(lines[4][:, 1].max() + 305.0, 348.0, atol=0.05)


def test_a_lane_that_crosses_itself(tmp_path):
    """GEOS splits a line where it crosses itself and the split point joins the graph, so
    the path takes the shortcut and drops the loop; the fast path cuts such lanes (found once
    per location) as the reference does. A 270 degree loop whose crossing falls between
    discretised points (20.3 m before it)."""
    m = MapBuilder()
    turn = _arc(120.3, 100.0, 0.0, 5.0, 1.5 * math.pi)
    m.lane('S1', [_straight(100.0, 100.0, 0.0, 20.3), turn, _straight(*turn['end_pose'], 20.0)])
    m.write(str(tmp_path))
    fast = FastVectorizedLocalMap(str(tmp_path), (60.0, 30.0), ('centerline', ))
    assert not fast.lanes(LOCATION).simple.any()
    reference = VectorizedLocalMapReference(str(tmp_path), (60.0, 30.0), ('centerline', ))
    along = np.eye(4)
    along[:2, 3] = (112.0, 100.0)
    for pose in _poses(30, seed=5, centre=(115.0, 95.0), spread=12.0) + [along]:
        want, _ = reference(LOCATION, pose)
        got, labels = fast(LOCATION, pose)
        assert len(got) == len(want) and set(labels.tolist()) <= {3}
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    # facing along the lane: the loop is cut off at the crossing, 30.3 m of path are left
    length = np.sum(np.hypot(*np.diff(want[0], axis=0).T))
    assert len(want) == 1 and len(want[0]) == 3 and length == pytest.approx(30.3, abs=0.01)


def test_union_matches_networkx_on_hand_made_graphs():
    """Forks, merges, self-loops (a piece ending where its successor starts), pieces cut
    in two, and a cycle, straight from pieces (patch frame)."""
    rng = np.random.default_rng(3)

    def line(*points):
        return np.asarray(points, np.float64)

    for _ in range(50):
        jitter = rng.normal(0, 0.3, 2)
        pieces = {
            'a': dict(lines=[line((0, 0), (5, 0.01), (10, 0)) + jitter], incoming=[],
                      outgoing=['b', 'c', 'gone']),
            'b': dict(lines=[line((10, 0), (15, 2), (20, 5)) + jitter], incoming=['a'],
                      outgoing=['d']),
            'c': dict(lines=[line((10.2, 0), (20, -1)) + jitter,
                             line((22, -1), (30, -1.0001), (35, -1)) + jitter],
                      incoming=['a'], outgoing=[]),
            'd': dict(lines=[line((20, 5), (25, 5), (30, 5)) + jitter],
                      incoming=['b', 'e'], outgoing=[]),
            'e': dict(lines=[line((25, 20), (22, 10), (20.5, 6)) + jitter], incoming=[],
                      outgoing=['d']),
            'f': dict(lines=[line((50, 50), (55, 50), (55, 55))], incoming=['g'],
                      outgoing=['g']),
            'g': dict(lines=[line((55, 55), (50, 55), (50, 50))], incoming=['f'],
                      outgoing=['f']),
        }
        want = union_centerlines_reference(pieces)
        got = union_centerlines(pieces)
        assert len(got) == len(want) == 4
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


def test_simplify_equals_shapely_on_degenerate_walks():
    """Walks along slanted lattice lines that turn back on themselves (collinear overlaps,
    touching end points, nearly collinear points in binary): GEOS's orientation filter and
    double-double fallback decide them, and so does the port."""
    rng = np.random.default_rng(1)
    compared = 0
    for trial in range(4000):
        n = int(rng.integers(3, 9))
        step = (0.1, 0.3, 0.7, 0.001, 0.05)[trial % 5]
        t = rng.integers(-6, 7, n)
        points = np.outer(t, rng.integers(-3, 4, 2)) * step
        points = points + rng.integers(-1, 2, (n, 2)) * step * (rng.random((n, 1)) < 0.3)
        points = points.round(3)
        if len({tuple(p) for p in points.tolist()}) != n:
            continue  # a path's nodes are distinct
        tolerance = float(rng.choice([0.2, 0.5, 1.0]))
        want = np.asarray(LineString(points).simplify(tolerance, preserve_topology=True).coords)
        np.testing.assert_array_equal(simplify_line(points, tolerance), want)
        compared += 1
    assert compared > 1000
    # found by review: a float determinant calls the back-tracking points collinear
    walk = np.array([[1.8, 0.6], [-1.8, -0.6], [-2.7, -0.9], [4.5, 1.5], [0.9, 0.3]])
    assert simplify_line(walk, 0.2).tolist() == [[1.8, 0.6], [-2.7, -0.9], [4.5, 1.5],
                                                 [0.9, 0.3]]


def test_simplify_equals_shapely():
    rng = np.random.default_rng(0)
    for trial in range(600):
        n = int(rng.integers(3, 50))
        if trial % 2:
            heading = np.cumsum(rng.normal(0, 0.08, n))
            points = np.stack([np.cumsum(np.cos(heading)), np.cumsum(np.sin(heading))], 1)
        else:  # self-crossing scribbles: the topology checks decide
            points = rng.normal(0, 1, (n, 2))
        points = points.round(3)
        points = points[np.r_[True, np.any(points[1:] != points[:-1], axis=1)]]
        if len(points) < 2:
            continue
        tolerance = (0.2, 0.6)[trial % 2]
        want = np.asarray(LineString(points).simplify(tolerance, preserve_topology=True).coords)
        np.testing.assert_array_equal(simplify_line(points, tolerance), want)


def test_missing_arcline_path_or_connectivity_is_named(tmp_path):
    for broken, match in (('path', r'lane L9 has no arcline_path_3 entry'),
                          ('connectivity', r'lane L9 has no connectivity entry')):
        m = MapBuilder()
        paths = [_straight(100.0, 100.0, 0.0, 20.0)]
        m.lane('L9', paths, connectivity=broken != 'connectivity')
        if broken == 'path':
            m.doc['arcline_path_3'].pop('L9')
        root = str(tmp_path / broken)
        m.write(root)
        pose = np.eye(4)
        pose[:2, 3] = (105.0, 100.0)
        for cls in (VectorizedLocalMapReference, FastVectorizedLocalMap):
            with pytest.raises(LaneGeometryError, match=match):
                cls(root, (60.0, 30.0), ('centerline', ))(LOCATION, pose)
        pose[:2, 3] = (500.0, 500.0)  # far away: the broken lane is not needed
        for cls in (VectorizedLocalMapReference, FastVectorizedLocalMap):
            lines, labels = cls(root, (60.0, 30.0), ('centerline', ))(LOCATION, pose)
            assert lines == [] and len(labels) == 0


def test_centerlines_keep_their_forward_order_only():
    open_line = np.array([[0.0, 0.0], [4.0, 0.0], [4.0, 3.0]])
    ring = np.array([[0.0, 0.0], [2.0, 0.0], [2.0, 2.0], [0.0, 2.0], [0.0, 0.0]])
    polylines, labels = [open_line, ring, open_line, ring], np.array([3, 3, 0, 2])
    rng = np.random.RandomState(0)
    want = shift_orders_v2_reference(polylines, fixed_num=6, labels=labels, rng=rng)
    got = shift_orders_v2(polylines, fixed_num=6, labels=labels)
    np.testing.assert_array_equal(got, want)
    targets = map_targets(polylines, labels, fixed_num=6)
    np.testing.assert_array_equal(targets['gt_map_shifts'], want)
    for i in (0, 1):  # one order, the points themselves, the rest padding
        np.testing.assert_array_equal(want[i, 0], targets['gt_map_pts'][i])
        assert (want[i, 1:] == -10000).all()
    assert (want[2, 1] == want[2, 0][::-1]).all() and (want[2, 2:] == -10000).all()
    assert (want[3, :4] != -10000).all()  # a ring that is not a centerline: its rotations
    with pytest.raises(ValueError, match='4 polylines but 3 labels'):
        shift_orders_v2(polylines, labels=labels[:3])
