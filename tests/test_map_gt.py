"""Map ground truth (turbox_mm.datasets.map_gt, turbox_mm.LoadMapGT) and the synthetic
generator's nuScenes map expansion.

- The generator writes ``maps/expansion/<location>.json`` for nuScenes' four locations; the
  devkit's ``NuScenesMap`` loads them, each scene's log names its location, the info files
  carry the ``metainfo.map_expansion`` flag, and the map reproduces the infos' ``map_annos``.
- The fast path equals the reference (upstream's shapely ``VectorizedLocalMap``) on a few
  hundred synthetic patches (keyframes, random poses, patches around every crossing). What
  "equal" means: the same labels in the same order per class; dividers in the same order with
  the same vertices (1e-6 m); crossings and boundaries as the same multiset of polylines,
  closed rings compared from any start vertex. Before comparing, repeated vertices (closer
  than 1e-9 m) and vertices collinear with their neighbours are removed: where polygon edges
  meet, GEOS's per-patch union keeps such noding vertices and the per-location union may not
  (the same geometry; docs/data.md).
- The fixed-length points, equivalent orders and boxes equal upstream's ``LiDARInstanceLines``.
- Bad input: a missing map file, an empty patch, degenerate records.
"""
import json
import os
import os.path as osp
import pickle
import shutil

import numpy as np
import pytest

from turbox_mm.datasets.map_gt import (FastVectorizedLocalMap, MapExpansionError,
                                       VectorizedLocalMapReference, bboxes_reference,
                                       check_map_expansion, fixed_num_points,
                                       fixed_num_points_reference, instance_bboxes,
                                       lidar2global_of, map_targets, shift_orders_v2,
                                       shift_orders_v2_reference)
from turbox_mm.datasets.synthetic.map_expansion import (NUSCENES_LOCATIONS, assign_locations,
                                                        expansion_json, scene_map,
                                                        write_map_expansion)
from turbox_mm.datasets.synthetic.scene import Scene

TOL = 1e-6


# --- data ----------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def generated(tmp_path_factory):
    """A tiny synthetic nuScenes from the generator (2 scenes x 3 keyframes, tiny sensors)."""
    from turbox_mm.datasets.synthetic import generate
    root = str(tmp_path_factory.mktemp('map_gt') / 'nuscenes')
    summary = generate(root, scenes=2, frames=3, image_size=(64, 36), points=300, sweeps=0,
                       workers=1, gt_database=False, progress=False)
    return root, summary


@pytest.fixture(scope='module')
def town(tmp_path_factory):
    """The map expansion of 8 scenes of 12 keyframes, and ~400 lidar poses: the keyframes,
    random poses near them (any heading), and random poses around each crossing (so patches
    cut crossings, and some see a street's end)."""
    root = str(tmp_path_factory.mktemp('town'))
    scenes = [Scene(7, i, 12, preroll_ticks=0, image_size=(64, 36)) for i in range(8)]
    maps = [scene_map(scene) for scene in scenes]
    locations, shared = assign_locations(maps)
    assert not shared
    write_map_expansion(root, maps, locations)
    rng = np.random.default_rng(0)

    def random_pose(xy, spread):
        pose = np.eye(4)
        yaw = rng.uniform(-np.pi, np.pi)
        pose[:2, :2] = [[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]]
        pose[:2, 3] = xy + rng.uniform(-spread, spread, 2)
        return pose

    poses = []
    for scene, scene_geometry, location in zip(scenes, maps, locations):
        for k in range(scene.frames):
            lidar2global = scene.ego2global(scene.tick_time(10 * k)) @ scene.lidar2ego
            poses.append((location, lidar2global))
            poses += [(location, random_pose(lidar2global[:2, 3], 10)) for _ in range(2)]
        for ring in scene_geometry.ped_crossings:
            poses += [(location, random_pose(ring.mean(0), 25)) for _ in range(20)]
    return root, poses


def load(path):
    with open(path, 'rb') as f:
        return pickle.load(f)


# --- comparison ------------------------------------------------------------------------------
def canonical(points, eps=1e-9):
    """Vertices without repeats and without vertices collinear with their neighbours."""
    points = np.asarray(points, np.float64)
    keep = np.ones(len(points), bool)
    keep[1:] = np.abs(np.diff(points, axis=0)).max(1) > eps
    points = points[keep]
    closed = len(points) > 2 and np.abs(points[0] - points[-1]).max() <= eps
    core = list(points[:-1] if closed else points)
    changed = True
    while changed and len(core) > 2:
        changed = False
        for i in range(len(core)) if closed else range(1, len(core) - 1):
            u, v = core[i] - core[i - 1], core[(i + 1) % len(core)] - core[i]
            if (abs(u[0] * v[1] - u[1] * v[0]) <= eps * np.linalg.norm(u) * np.linalg.norm(v)
                    and np.dot(u, v) > 0):
                del core[i]
                changed = True
                break
    core = np.array(core)
    return (np.concatenate([core, core[:1]]) if closed else core), closed


def point_to_polyline(points, polyline):
    """Distance of each point to a polyline (its nearest segment)."""
    a, b = polyline[:-1], polyline[1:]
    d = b - a
    t = np.clip(np.einsum('psk,sk->ps', points[:, None] - a[None], d)
                / np.maximum((d ** 2).sum(1), 1e-18), 0, 1)
    closest = a[None] + t[..., None] * d[None]
    return np.sqrt(((points[:, None] - closest) ** 2).sum(-1)).min(1)


def same_polyline(a, b, tol=TOL):
    (a, closed_a), (b, closed_b) = canonical(a), canonical(b)
    if closed_a != closed_b or a.shape != b.shape:
        return False
    if not closed_a:
        return np.abs(a - b).max() < tol
    return any(np.abs(np.roll(a[:-1], -k, axis=0) - b[:-1]).max() < tol
               for k in range(len(a) - 1))


def assert_same_instances(reference, fast):
    (lines_r, labels_r), (lines_f, labels_f) = reference, fast
    assert labels_r.tolist() == labels_f.tolist()
    for label in (0, 1, 2):
        mine = [p for p, lab in zip(lines_f, labels_f) if lab == label]
        theirs = [p for p, lab in zip(lines_r, labels_r) if lab == label]
        if label == 0:  # dividers: upstream's order
            assert all(same_polyline(a, b) for a, b in zip(theirs, mine))
            continue
        left = list(range(len(mine)))
        for polyline in theirs:
            match = next((k for k in left if same_polyline(polyline, mine[k])), None)
            assert match is not None, polyline
            left.remove(match)


# --- the generator's map expansion ---------------------------------------------------------
def test_generator_writes_a_map_expansion_the_devkit_loads(generated):
    from nuscenes import NuScenes
    from nuscenes.map_expansion.map_api import NuScenesMap

    root, summary = generated
    infos = load(osp.join(root, 'nuscenes_infos_train.pkl'))
    infos_val = load(osp.join(root, 'nuscenes_infos_val.pkl'))
    flag = infos['metainfo']['map_expansion']
    assert flag == dict(version='1.3', folder='maps/expansion', locations=list(NUSCENES_LOCATIONS))
    samples = infos['data_list'] + infos_val['data_list']
    used = {info['map_location'] for info in samples}
    assert used <= set(NUSCENES_LOCATIONS) and len(used) == 2  # one location per scene here
    assert summary['map_expansion']['shared'] == []
    nusc = NuScenes('v1.0-trainval', root, verbose=False)
    for info in samples:  # the log's location is the sample's map
        scene = nusc.get('scene', nusc.get('sample', info['token'])['scene_token'])
        assert nusc.get('log', scene['log_token'])['location'] == info['map_location']
    for location in NUSCENES_LOCATIONS:
        nusc_map = NuScenesMap(dataroot=root, map_name=location)
        count = 1 if location in used else 0
        assert len(nusc_map.road_segment) == count and len(nusc_map.road_divider) == count
        assert len(nusc_map.lane) == 4 * count and len(nusc_map.lane_divider) == 4 * count
        for record in nusc_map.lane_divider:
            assert len(nusc_map.extract_line(record['line_token']).coords) >= 2
        for record in nusc_map.road_segment + nusc_map.lane + nusc_map.ped_crossing:
            assert nusc_map.extract_polygon(record['polygon_token']).is_valid
    assert check_map_expansion(osp.join(root, 'nuscenes_infos_train.pkl'), root) == sorted(
        {info['map_location'] for info in infos['data_list']})


def test_map_expansion_reproduces_map_annos(generated):
    """The map ground truth cut from maps/expansion matches the infos' map_annos (drawn from
    the same street, 1-2 cm simplification apart): dividers piece for piece, boundary and
    crossing points on the drawn kerbs and crossing outlines."""
    from turbox_mm.evaluation.map_chamfer import resample_by_length

    root, _ = generated
    vector_map = FastVectorizedLocalMap(root)

    def near(a, lines, tol=0.04):
        """Every point of ``a`` (resampled) lies within ``tol`` of one of ``lines``."""
        return any(point_to_polyline(resample_by_length(a, 50), b).max() < tol for b in lines)

    for info in load(osp.join(root, 'nuscenes_infos_train.pkl'))['data_list']:
        lines, labels = vector_map(info['map_location'], lidar2global_of(info))
        annos = {k: [np.array(p) for p in v] for k, v in info['map_annos'].items()}
        dividers = [p for p, lab in zip(lines, labels) if lab == 0]
        assert dividers and all(near(p, dividers) for p in annos['divider'])
        long = [p for p in dividers if np.linalg.norm(np.diff(p, axis=0), axis=1).sum() > 1]
        assert all(near(p, annos['divider']) for p in long)
        boundaries = [p for p, lab in zip(lines, labels) if lab == 2]
        assert boundaries and all(near(p, annos['boundary']) for p in boundaries)
        crossings = [p for p, lab in zip(lines, labels) if lab == 1]
        assert all(near(p, crossings) for p in annos['ped_crossing'])


def test_locations_keep_nearby_scenes_apart():
    scenes = [Scene(0, i, 6, preroll_ticks=0, image_size=(64, 36)) for i in range(10)]
    maps = [scene_map(scene) for scene in scenes]
    locations, shared = assign_locations(maps)
    assert not shared and set(locations) <= set(NUSCENES_LOCATIONS)
    # every scene first tries location index % 4: the two that start at 0 share it unless
    # they come close; each map file holds exactly its scenes' streets
    for location in NUSCENES_LOCATIONS:
        mine = [m for m, loc in zip(maps, locations) if loc == location]
        assert len(expansion_json(mine)['road_segment']) == len(mine)
    # copies of one street fill the four locations; the fifth copy has nowhere to go, and
    # the pair it makes is reported, not hidden
    copies = []
    for index in range(10, 14):
        copies.append(scene_map(scenes[0]))
        copies[-1].index = index
    locations, shared = assign_locations([maps[0]] + copies)
    assert len(set(locations[:4])) == 4
    assert shared and {pair[0] for pair in shared} == {13}


# --- fast == reference ---------------------------------------------------------------------
def test_fast_path_equals_reference(town):
    root, poses = town
    reference, fast = VectorizedLocalMapReference(root), FastVectorizedLocalMap(root)
    counts = np.zeros(3, int)
    for location, pose in poses:
        expected = reference(location, pose)
        assert_same_instances(expected, fast(location, pose))
        counts += np.bincount(expected[1], minlength=3)
    assert len(poses) > 350 and (counts > [1500, 150, 500]).all(), counts


def test_targets_equal_lidar_instance_lines(town):
    """fixed_num_points, shift_orders_v2 and instance_bboxes against upstream's
    LiDARInstanceLines (reference.py), on every instance of the town and on hand-made rings
    with more orders than kept (the same seeded draws)."""
    root, poses = town
    reference = VectorizedLocalMapReference(root)
    lines = [p for location, pose in poses[::3] for p in reference(location, pose)[0]]
    angles = np.linspace(0, 2 * np.pi, 31)
    circle = np.stack([np.cos(angles), np.sin(angles)], 1) * 8
    circle[-1] = circle[0]
    lines += [circle, circle[::-1].copy(), np.array([[0., 0.], [0., 0.], [20., 40.]]),
              np.array([[0., 0.], [1., 0.], [1., 1.], [0., 0.]])]
    np.testing.assert_allclose(fixed_num_points(lines), fixed_num_points_reference(lines),
                               atol=1e-5)
    np.testing.assert_allclose(instance_bboxes(lines), bboxes_reference(lines), atol=1e-5)
    orders = shift_orders_v2_reference(lines, rng=np.random.RandomState(3))
    np.testing.assert_allclose(shift_orders_v2(lines, rng=np.random.RandomState(3)), orders,
                               atol=1e-5)
    # the one-pass map_targets that LoadMapGT calls gives the same arrays
    targets = map_targets(lines, np.zeros(len(lines)), rng=np.random.RandomState(3))
    np.testing.assert_allclose(targets['gt_map_shifts'], orders, atol=1e-5)
    np.testing.assert_allclose(targets['gt_map_pts'], fixed_num_points_reference(lines),
                               atol=1e-5)
    np.testing.assert_allclose(targets['gt_map_bboxes'], bboxes_reference(lines), atol=1e-5)
    assert len([p for p in lines if np.array_equal(p[0], p[-1]) and len(p) > 20]) == 2


def test_shift_orders_v2_by_hand():
    square = np.array([[0., 0.], [0., 2.], [2., 2.], [2., 0.], [0., 0.]])
    line = np.array([[0., 0.], [0., 3.]])
    orders = shift_orders_v2([square, line], fixed_num=5)
    assert orders.shape == (2, 4, 5, 2) and orders.dtype == np.float32
    # np.roll by 0, 1, 2, 3 starts the ring at vertices 0, 3, 2, 1; each order is closed
    assert orders[0, :, 0].tolist() == [[0, 0], [2, 0], [2, 2], [0, 2]]
    assert (orders[0, :, 0] == orders[0, :, -1]).all()
    assert orders[0, 1].tolist() == [[2, 0], [0, 0], [0, 2], [2, 2], [2, 0]]
    assert orders[1, 0, :, 1].tolist() == [0, 0.75, 1.5, 2.25, 3]
    assert orders[1, 1, :, 1].tolist() == [3, 2.25, 1.5, 0.75, 0]
    assert (orders[1, 2:] == -10000).all()
    # clamped to the patch, padding not
    far = shift_orders_v2([np.array([[0., 0.], [0., 45.]])], fixed_num=3)
    assert far[0, 0, -1].tolist() == [0, 30] and (far[0, 2:] == -10000).all()


# --- bad input -----------------------------------------------------------------------------
def test_missing_map_file_names_file_and_location(generated, tmp_path):
    from turbox_mm.datasets.transforms import LoadMapGT

    root, _ = generated
    copy = tmp_path / 'nuscenes'
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns('samples', 'sweeps'))
    info = load(osp.join(root, 'nuscenes_infos_train.pkl'))['data_list'][0]
    location = info['map_location']
    path = osp.join(str(copy), 'maps', 'expansion', f'{location}.json')
    os.remove(path)
    for impl in (FastVectorizedLocalMap, VectorizedLocalMapReference):
        with pytest.raises(MapExpansionError, match='does not exist') as error:
            impl(str(copy))(location, lidar2global_of(info))
        assert path in str(error.value) and repr(location) in str(error.value)
    with pytest.raises(MapExpansionError) as error:
        LoadMapGT(str(copy))(dict(info))
    assert info['token'] in str(error.value) and path in str(error.value)
    with pytest.raises(MapExpansionError, match='samples use it') as error:
        check_map_expansion(osp.join(str(copy), 'nuscenes_infos_train.pkl'), str(copy))
    # a dataset made before the generator wrote maps
    old = dict(info, map_location='synthetic-town')
    with pytest.raises(MapExpansionError, match='Regenerate it'):
        LoadMapGT(root)(old)
    with pytest.raises(KeyError, match='no map_location'):
        LoadMapGT(root)({k: v for k, v in info.items() if k != 'map_location'})
    with open(path, 'w') as f:
        f.write('{"node": [')
    with pytest.raises(MapExpansionError, match='cannot read'):
        FastVectorizedLocalMap(str(copy))(location, lidar2global_of(info))


def test_empty_patch_gives_empty_arrays(generated):
    from turbox_mm.datasets.transforms import LoadMapGT

    root, _ = generated
    info = load(osp.join(root, 'nuscenes_infos_train.pkl'))['data_list'][0]
    far = dict(info, ego2global=(np.array(info['ego2global'])
                                 + np.pad([[5000.0], [5000.0], [0.0]], ((0, 1), (3, 0)))).tolist())
    for impl in ('fast', 'reference'):
        out = LoadMapGT(root, impl=impl)(dict(far))
        assert out['gt_map_labels'].shape == (0,) and out['gt_map_labels'].dtype == np.int64
        assert out['gt_map_pts'].shape == (0, 20, 2) and out['gt_map_pts'].dtype == np.float32
        assert out['gt_map_shifts'].shape == (0, 19, 20, 2)
        assert out['gt_map_bboxes'].shape == (0, 4) and out['gt_map_polylines'] == []
        assert LoadMapGT(root, impl=impl, drop_empty=True)(dict(far)) is None
        assert LoadMapGT(root, impl=impl, drop_empty=True)(dict(info)) is not None


def _write_map(root, location, lines=(), polygons=(), crossings=(), lanes=()):
    """A map-expansion file with the given lane dividers, road segments, crossings and lanes
    (polygons as an exterior, or as ``(exterior, [holes])``)."""
    doc = expansion_json([])

    def nodes(points, name):
        tokens = [f'{name}n{i}' for i in range(len(points))]
        doc['node'] += [dict(token=t, x=float(x), y=float(y))
                        for t, (x, y) in zip(tokens, points)]
        return tokens

    for k, points in enumerate(lines):
        doc['line'].append(dict(token=f'l{k}', node_tokens=nodes(points, f'l{k}')))
        doc['lane_divider'].append(dict(token=f'd{k}', line_token=f'l{k}',
                                        lane_divider_segments=[]))
    for layer, shapes in (('road_segment', polygons), ('ped_crossing', crossings),
                          ('lane', lanes)):
        for k, shape in enumerate(shapes):
            exterior, holes = shape if isinstance(shape, tuple) else (shape, [])
            name = f'{layer}{k}'
            doc['polygon'].append(dict(
                token=name, exterior_node_tokens=nodes(exterior, name),
                holes=[dict(node_tokens=nodes(hole, f'{name}h{j}'))
                       for j, hole in enumerate(holes)]))
            doc[layer].append(dict(token=f'{name}r', polygon_token=name,
                                   left_lane_divider_segments=[],
                                   right_lane_divider_segments=[]))
    path = osp.join(root, 'maps', 'expansion', f'{location}.json')
    os.makedirs(osp.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(doc, f)


def _rect(x0, y0, x1, y1, at=(0.0, 0.0)):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]) + at


def test_fast_path_equals_reference_on_hand_made_shapes(tmp_path):
    """Shapes the synthetic street lacks: holes (inside the patch, and cut by its edge), a
    lane sticking out of its road segment, overlapping crossings (a non-convex union), a
    U-shaped crossing that the patch cuts into two, a crossing with a hole, and a patch
    wholly inside a crossing (whose outline is the patch's own), at several headings. (A map
    edge lying exactly on the patch's edge, a case of measure zero, is avoided: shapely drops
    it where the polygon lies outside, the fast path keeps it.)"""
    root = str(tmp_path)
    c = np.array([500.0, 500.0])
    holes = [_rect(1, 3, 5, 7, c), _rect(6.5, -23, 9.5, -17, c), _rect(-2, 27, 2, 31, c)]
    road = (_rect(-12, -100, 12, 100, c), holes)
    lane = _rect(-16, -5, -10, 5, c)
    u_shape = np.array([[-10, -35], [-2, -35], [-2, -25], [-4, -25], [-4, -32], [-8, -32],
                        [-8, -25], [-10, -25]]) + c  # its legs reach into the patch
    crossings = [_rect(-11.5, 10, 11.5, 14, c), _rect(8, 10, 11.5, 40, c), u_shape,
                 (_rect(-11, -8, -3, 0, c), [_rect(-9, -6, -5, -2, c)]),
                 _rect(-100, -100, 100, 100, (3000.0, 3000.0))]
    _write_map(root, 'boston-seaport', polygons=[road], crossings=crossings, lanes=[lane])
    reference, fast = VectorizedLocalMapReference(root), FastVectorizedLocalMap(root)
    seen = np.zeros(3, int)
    for yaw in (0.0, 0.3, 1.2, -2.0, np.pi / 2, np.pi):
        for centre in (c, c + [1.37, -2.21], c + [-3.13, 4.07], (3000.0, 3000.0)):
            pose = np.eye(4)
            pose[:2, :2] = [[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]]
            pose[:2, 3] = centre
            expected = reference('boston-seaport', pose)
            assert_same_instances(expected, fast('boston-seaport', pose))
            seen += np.bincount(expected[1], minlength=3)
            if tuple(centre) == (3000.0, 3000.0):  # the patch's outline, clockwise
                lines, labels = fast('boston-seaport', pose)
                assert labels.tolist() == [1] and same_polyline(
                    lines[0], np.array([[-15, 30], [15, 30], [15, -30], [-15, -30], [-15, 30]]))
    assert (seen[1:] > [60, 60]).all(), seen


def test_degenerate_records(tmp_path):
    """Records shapely cannot build, and cuts that leave points, are dropped (upstream skips
    node-less lines; it raises on the others, as strict=True does for the point)."""
    root = str(tmp_path)
    centre = np.array([100.0, 200.0])
    lines = [
        [],  # no nodes: upstream skips it
        [centre],  # one node: shapely cannot build it (upstream raises)
        [centre + [1, 1], centre + [1, 1]],  # zero length
        [centre + [0, 30], centre + [0, 40]],  # touches the patch's edge in one point
        [centre + [-5, -10], centre + [5, 10]],  # a good one
    ]
    polygons = [[centre + [20, 0], centre + [21, 0]],  # two nodes
                [centre + [-2, -2], centre + [2, 2], centre + [2, -2], centre + [-2, 2]]]  # bow-tie
    _write_map(root, 'singapore-onenorth', lines, polygons)
    pose = np.eye(4)
    pose[:2, 3] = centre
    expected = [np.array([[-5.0, -10.0], [5.0, 10.0]])]
    for impl in (VectorizedLocalMapReference(root), FastVectorizedLocalMap(root)):
        polylines, labels = impl('singapore-onenorth', pose)
        assert labels.tolist() == [0]
        np.testing.assert_allclose(polylines[0], expected[0], atol=TOL)
    with pytest.raises(NotImplementedError, match='Point'):
        VectorizedLocalMapReference(root, strict=True)('singapore-onenorth', pose)
    # a polyline of fewer than two points never reaches the targets
    targets = map_targets(polylines, labels)
    assert targets['gt_map_pts'].shape == (1, 20, 2)


def test_load_map_gt_in_a_nuscenes_dataset(generated):
    """LoadMapGT in mmdet3d's NuScenesDataset: training keys, and eval_ann_info in test mode;
    the reference pipeline gives the same instances."""
    from mmdet3d.datasets import NuScenesDataset
    from mmengine.registry import init_default_scope

    from turbox_mm.registry import TRANSFORMS
    init_default_scope('mmdet3d')
    root, _ = generated
    results = {}
    for impl in ('fast', 'reference'):
        pipeline = [dict(type='turbox_mm.LoadMapGT', data_root=root, impl=impl, seed=0)]
        dataset = NuScenesDataset(root, 'nuscenes_infos_train.pkl', pipeline=pipeline,
                                  modality=dict(use_lidar=True, use_camera=True),
                                  test_mode=True)
        results[impl] = [dataset[i] for i in range(len(dataset))]
    assert isinstance(TRANSFORMS.build(dict(type='turbox_mm.LoadMapGT', data_root=root)),
                      TRANSFORMS.get('turbox_mm.LoadMapGT'))
    for fast, reference in zip(results['fast'], results['reference']):
        n = len(fast['gt_map_labels'])
        assert n > 5 and fast['gt_map_pts'].shape == (n, 20, 2)
        assert fast['gt_map_shifts'].shape == (n, 19, 20, 2)
        assert fast['eval_ann_info']['gt_map_labels'] is fast['gt_map_labels']
        assert len(fast['eval_ann_info']['gt_map_polylines']) == n
        assert_same_instances((reference['gt_map_polylines'], reference['gt_map_labels']),
                              (fast['gt_map_polylines'], fast['gt_map_labels']))
        dividers = fast['gt_map_labels'] == 0  # dividers also give the same points
        np.testing.assert_allclose(fast['gt_map_pts'][dividers],
                                   reference['gt_map_pts'][dividers], atol=1e-5)
