"""The planning step (turbox_mm.datasets.nuscenes_planning_fields, `tools/create_data.py
planning`): SparseDrive's agent futures, ego future, command and ego_status for v2 infos.

On a tiny synthetic set (2 scenes of 14 keyframes, so that full 6 s futures exist) with a CAN
bus expansion written from each scene's own motion: infos stripped of the fields get the
generator's back (the agent futures where the generator and upstream agree, see
`test_agent_futures_follow_the_chain_across_gaps`), and every field equals upstream's
procedure run with nuscenes-devkit itself (PredictHelper, get_sample_data's lidar boxes,
NuScenesCanBus), also with a tilted lidar mount and keyframes 0.52 s apart. Then the scene
end, a chain that ends early, missing CAN data (an error, or zeros and a warning), skip vs
--force, partial groups, misaligned instances, the atomic rewrite and the command line.
"""
import copy
import json
import math
import os
import os.path as osp
import pickle
import shutil

import numpy as np
import pytest

from conftest import run_python
from turbox_mm.datasets import nuscenes_tables
from turbox_mm.datasets.nuscenes_planning_fields import (GROUPS, CanBusMessages,
                                                         MissingCanBusError,
                                                         PlanningFieldsError, PlanningTables,
                                                         _name_scenes, add_planning_fields,
                                                         agent_future,
                                                         command_line, ego_future,
                                                         format_results, locate_message)
from turbox_mm.datasets.nuscenes_tables import NuScenesTableError

VERSION = 'v1.0-trainval'
SAMPLE_KEYS = GROUPS['ego_status'] + GROUPS['ego_future']
INSTANCE_KEYS = GROUPS['agent_future']


def load(path):
    with open(path, 'rb') as f:
        return pickle.load(f)


def dump(path, infos):
    with open(path, 'wb') as f:
        pickle.dump(infos, f, protocol=4)


def write_json(path, rows):
    os.makedirs(osp.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(rows, f)


def read_json(root, name):
    with open(f'{root}/{VERSION}/{name}.json') as f:
        return json.load(f)


def write_can_bus(root, folder):
    """The CAN bus a car driving each synthetic scene would log: pose at 50 Hz and steering
    at 100 Hz from a second before the first keyframe to a second after the last, with the
    generator's motion (its ego_status: accel with gravity, yaw rate, velocity, steering-wheel
    angle from curvature)."""
    from turbox_mm.datasets.synthetic.infos import STEERING_RATIO, WHEELBASE
    from turbox_mm.datasets.synthetic.scene import Scene
    options = load(f'{root}/nuscenes_infos_train.pkl')['metainfo']['synthetic']
    logs = {row['token']: row['logfile'] for row in read_json(root, 'log')}
    for row in read_json(root, 'scene'):
        scene = Scene(options['seed'], int(logs[row['log_token']][-4:]), options['frames'],
                      preroll_ticks=options['sweeps'], image_size=tuple(options['image_size']))
        end = (options['frames'] - 1) * 500_000 + 1_000_000
        poses, steering = [], []
        for offset in range(-1_000_000, end, 10_000):
            motion = scene.ego_motion(offset * 1e-6)
            utime = scene.start_us + offset
            if offset % 20_000 == 0:
                poses.append(dict(accel=motion['acceleration'].tolist(), orientation=[1, 0, 0, 0],
                                  pos=[0, 0, 0], rotation_rate=[0.0, 0.0, motion['yaw_rate']],
                                  utime=utime, vel=motion['velocity'].tolist()))
            angle = float(np.arctan(WHEELBASE * motion['curvature']) * STEERING_RATIO)
            steering.append(dict(utime=utime, value=angle))
        write_json(f'{folder}/can_bus/{row["name"]}_pose.json', poses)
        write_json(f'{folder}/can_bus/{row["name"]}_steeranglefeedback.json', steering)


def same(a, b) -> bool:
    """Deep equality with NaN equal to NaN (single annotations have NaN velocities)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return (isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(same(x, y) for x, y in zip(a, b)))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and a == b


def strip(infos):
    """The infos without the planning fields (what mmdet3d's converter writes)."""
    infos = copy.deepcopy(infos)
    for info in infos['data_list']:
        for key in SAMPLE_KEYS:
            del info[key]
        for instance in info['instances']:
            for key in INSTANCE_KEYS:
                del instance[key]
    return infos


@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
    """Two scenes (train, val) of 14 keyframes, with the CAN bus expansion under the root."""
    from turbox_mm.datasets.synthetic import generate
    root = str(tmp_path_factory.mktemp('synth') / 'nuscenes')
    generate(root, scenes=2, frames=14, seed=0, workers=1, image_size=(160, 90), points=500,
             sweeps=0, val_scenes=1, gt_database=False, progress=False)
    write_can_bus(root, root)
    return root


@pytest.fixture
def stripped(synthetic, tmp_path):
    """Stripped copies of the train and val infos, and the generator's originals."""
    paths, originals = [], []
    for split in ('train', 'val'):
        ours = load(f'{synthetic}/nuscenes_infos_{split}.pkl')
        path = str(tmp_path / f'{split}.pkl')
        dump(path, strip(ours))
        paths.append(path)
        originals.append(ours)
    return synthetic, paths, originals


def has_gap(info, k, samples, annotations):
    """Whether the chain of instance k, within 12 steps, skips a sample (the object is not
    annotated in some keyframe and is again later)."""
    row = annotations[info['token']][k]
    for _ in range(12):
        if not row['next']:
            return False
        following = annotations['by_token'][row['next']]
        if following['sample_token'] != samples[row['sample_token']]['next']:
            return True
        row = following
    return False


def annotation_index(root):
    rows = read_json(root, 'sample_annotation')
    index = {'by_token': {row['token']: row for row in rows}}
    for row in rows:
        index.setdefault(row['sample_token'], []).append(row)
    return {row['token']: row for row in read_json(root, 'sample')}, index


# -- the generator's fields --------------------------------------------------------------------

def test_same_fields_as_the_synthetic_generator(stripped):
    root, paths, originals = stripped
    results = add_planning_fields(paths, root, VERSION)
    samples, annotations = annotation_index(root)
    gaps = same = 0
    for path, ours in zip(paths, originals):
        mine = load(path)
        assert mine['metainfo'] == ours['metainfo']
        for a, b in zip(mine['data_list'], ours['data_list']):
            assert set(a) == set(b)
            for key in SAMPLE_KEYS:
                assert type(a[key]) is list and np.shape(a[key]) == np.shape(b[key]), key
                assert {type(v) for v in np.ravel(a[key]).tolist()} == {float}
            np.testing.assert_allclose(a['gt_ego_fut_trajs'], b['gt_ego_fut_trajs'], atol=1e-9)
            assert a['gt_ego_fut_masks'] == b['gt_ego_fut_masks']
            assert a['gt_ego_fut_cmd'] == b['gt_ego_fut_cmd']
            np.testing.assert_allclose(a['ego_status'], b['ego_status'], atol=1e-6, rtol=0)
            for k, (x, y) in enumerate(zip(a['instances'], b['instances'])):
                assert set(x) == set(y)
                assert np.shape(x['fut_traj']) == (12, 2) and len(x['fut_mask']) == 12
                if has_gap(a, k, samples, annotations):
                    gaps += 1
                    continue
                same += 1
                np.testing.assert_allclose(x['fut_traj'], y['fut_traj'], atol=1e-9)
                assert x['fut_mask'] == y['fut_mask']
    assert gaps > 0 and same > 100  # both kinds are there
    assert [r['written'] for r in results] == [True, True]
    assert [(r['zeros'], r['overwritten'], r['kept']) for r in results] == [(0, 0, 0)] * 2
    assert sum(r['ego_status'] for r in results) == 28


def test_agent_futures_follow_the_chain_across_gaps(stripped):
    """Generator and upstream differ for an object missing in a keyframe: the generator
    stops there, upstream's PredictHelper follows the annotation chain (the next annotation,
    a second or more later, fills the next step). stop_at_gap=True is the generator's rule."""
    root, paths, originals = stripped
    add_planning_fields(paths, root, VERSION)
    samples, annotations = annotation_index(root)
    differ = 0
    for path, ours in zip(paths, originals):
        for a, b in zip(load(path)['data_list'], ours['data_list']):
            for k, (x, y) in enumerate(zip(a['instances'], b['instances'])):
                if has_gap(a, k, samples, annotations):
                    assert sum(x['fut_mask']) >= sum(y['fut_mask'])
                    differ += x['fut_mask'] != y['fut_mask']
    assert differ > 0
    dump(paths[0], strip(originals[0]))
    add_planning_fields(paths[0], root, VERSION, stop_at_gap=True)
    for a, b in zip(load(paths[0])['data_list'], originals[0]['data_list']):
        for x, y in zip(a['instances'], b['instances']):
            np.testing.assert_allclose(x['fut_traj'], y['fut_traj'], atol=1e-9)
            assert x['fut_mask'] == y['fut_mask']


# -- upstream's procedure, with nuscenes-devkit --------------------------------------------

def devkit_fields(root, can_root):
    """Every field by upstream's procedure (SparseDrive's `_fill_trainval_infos` and
    `get_ego_status`), each step a nuscenes-devkit call: per sample token."""
    from nuscenes.can_bus.can_bus_api import NuScenesCanBus
    from nuscenes.nuscenes import NuScenes
    from nuscenes.prediction import PredictHelper, convert_local_coords_to_global
    from nuscenes.utils.geometry_utils import transform_matrix
    from pyquaternion import Quaternion
    nusc = NuScenes(VERSION, root, verbose=False)
    helper, can = PredictHelper(nusc), NuScenesCanBus(dataroot=can_root)

    def lidar_pose(sample):
        data = nusc.get('sample_data', sample['data']['LIDAR_TOP'])
        pose = nusc.get('ego_pose', data['ego_pose_token'])
        mount = nusc.get('calibrated_sensor', data['calibrated_sensor_token'])
        return (transform_matrix(pose['translation'], Quaternion(pose['rotation']))
                @ transform_matrix(mount['translation'], Quaternion(mount['rotation'])))

    def nearest(messages, utime):
        return messages[locate_message([m['utime'] for m in messages], utime)]

    out = {}
    for sample in nusc.sample:
        _, boxes, _ = nusc.get_sample_data(sample['data']['LIDAR_TOP'])
        agents = []
        for token, box in zip(sample['anns'], boxes):
            instance = nusc.get('sample_annotation', token)['instance_token']
            local = helper.get_future_for_agent(instance, sample['token'], seconds=6,
                                                in_agent_frame=True)
            traj, mask = np.zeros((12, 2)), np.zeros(12)
            if len(local):
                lidar = convert_local_coords_to_global(
                    local, box.center, Quaternion(matrix=box.rotation_matrix))
                traj[:len(lidar)] = np.diff(lidar, axis=0, prepend=box.center[None, :2])
                mask[:len(lidar)] = 1
            agents.append((traj, mask))
        origins, masks, current = [], [], sample
        for step in range(7):
            origins.append(lidar_pose(current)[:3, 3])
            masks.append(1.0)
            if not current['next']:
                origins += [origins[-1]] * (6 - step)
                masks += [0.0] * (6 - step)
                break
            current = nusc.get('sample', current['next'])
        local = (np.linalg.inv(lidar_pose(sample)) @ np.c_[origins, np.ones(7)].T).T[:, :3]
        x = local[-1, 0]
        command = [1.0, 0, 0] if x >= 2 else [0, 1.0, 0] if x <= -2 else [0, 0, 1.0]
        name = nusc.get('scene', sample['scene_token'])['name']
        pose = nearest(can.get_messages(name, 'pose'), sample['timestamp'])
        steer = nearest(can.get_messages(name, 'steeranglefeedback'), sample['timestamp'])
        status = [*pose['accel'], *pose['rotation_rate'], *pose['vel'], steer['value']]
        out[sample['token']] = dict(agents=agents, trajs=np.diff(local[:, :2], axis=0),
                                    masks=masks[1:], command=command, status=status)
    return out


def check_against_devkit(paths, expected):
    for path in paths:
        for info in load(path)['data_list']:
            ref = expected[info['token']]
            np.testing.assert_allclose(info['gt_ego_fut_trajs'], ref['trajs'], atol=1e-9)
            assert info['gt_ego_fut_masks'] == ref['masks']
            assert info['gt_ego_fut_cmd'] == ref['command']
            assert info['ego_status'] == pytest.approx(ref['status'], abs=0, rel=0)
            assert len(info['instances']) == len(ref['agents'])
            for instance, (traj, mask) in zip(info['instances'], ref['agents']):
                np.testing.assert_allclose(instance['fut_traj'], traj, atol=1e-9)
                assert instance['fut_mask'] == mask.tolist()


def test_same_fields_as_upstream_with_the_devkit(stripped):
    root, paths, _ = stripped
    add_planning_fields(paths, root, VERSION)
    check_against_devkit(paths, devkit_fields(root, root))


def test_tilted_lidar_and_uneven_keyframes(stripped, tmp_path):
    """A lidar mount with roll and pitch (as nuScenes' own): the agent offsets are turned by
    the yaw difference only, as upstream's devkit round trip does, which is not the exact 3-D
    move. Keyframes 0.52 s apart: the 12th is 6.24 s ahead, past the devkit's 6.15 s, so
    futures hold 11 steps."""
    from turbox_mm.datasets.synthetic.geometry import (matrix_from_quaternion,
                                                       quaternion_from_matrix, rot_xyz)
    root, paths, originals = stripped
    tilted = str(tmp_path / 'tilted')
    shutil.copytree(f'{root}/{VERSION}', f'{tilted}/{VERSION}')
    shutil.copytree(f'{root}/can_bus', f'{tilted}/can_bus')
    shutil.copytree(f'{root}/maps', f'{tilted}/maps')  # the devkit opens the map masks
    sensors = {row['token'] for row in read_json(tilted, 'sensor')
               if row['channel'] == 'LIDAR_TOP'}
    rows = read_json(tilted, 'calibrated_sensor')
    for row in rows:
        if row['sensor_token'] in sensors:
            rotation = matrix_from_quaternion(row['rotation'])
            row['rotation'] = quaternion_from_matrix(
                rotation @ rot_xyz(math.radians(0.7), math.radians(-1.1), 0.0))
    write_json(f'{tilted}/{VERSION}/calibrated_sensor.json', rows)
    rows = read_json(tilted, 'sample')
    starts = {}
    for row in rows:  # in scene order; stretch each scene's clock by 4 %
        start = starts.setdefault(row['scene_token'], row['timestamp'])
        row['timestamp'] = start + round((row['timestamp'] - start) * 1.04)
    write_json(f'{tilted}/{VERSION}/sample.json', rows)
    for path, ours in zip(paths, originals):
        infos = strip(ours)
        for info in infos['data_list']:
            for instance in info['instances']:
                del instance['bbox_3d']  # the boxes of the level mount no longer fit
        dump(path, infos)
    add_planning_fields(paths, tilted, VERSION)
    check_against_devkit(paths, devkit_fields(tilted, tilted))
    infos = load(paths[0])['data_list']
    assert max(sum(i['fut_mask']) for info in infos for i in info['instances']) == 11
    # the exact 3-D move of the first sample's futures differs by millimetres
    samples, annotations = annotation_index(tilted)
    global2lidar = np.linalg.inv(lidar2global(tilted, infos[0]['token']))
    worst = 0.0
    for k, instance in enumerate(infos[0]['instances']):
        row, exact = annotations[infos[0]['token']][k], []
        for _ in range(int(sum(instance['fut_mask']))):
            following = annotations['by_token'][row['next']]
            exact.append((global2lidar @ [*following['translation'], 1])[:2]
                         - (global2lidar @ [*row['translation'], 1])[:2])
            row = following
        steps = len(exact)
        if steps:
            worst = max(worst, np.abs(np.array(instance['fut_traj'][:steps]) - exact).max())
    assert 1e-4 < worst < 0.05


def lidar2global(root, token):
    from turbox_mm.datasets.nuscenes_planning_fields import load_planning_tables
    return load_planning_tables(root, VERSION).samples[token]['lidar2global']


# -- by hand ---------------------------------------------------------------------------------

def hand_tables(origins, yaw=0.0, times=None):
    """Samples s0, s1, ... of one scene, 0.5 s apart (or at ``times``), the lidar at
    ``origins`` (global xy), turned by ``yaw``."""
    from turbox_mm.datasets.synthetic.geometry import make_transform, rot_z
    times = times or [500_000 * i for i in range(len(origins))]
    samples = {f's{i}': dict(timestamp=t, scene='scene-0001', annotations=[],
                             next=f's{i + 1}' if i + 1 < len(origins) else '',
                             lidar2global=make_transform(rot_z(yaw), [*xy, 1.8]))
               for i, (xy, t) in enumerate(zip(origins, times))}
    return PlanningTables('<hand>', VERSION, samples, {})


@pytest.mark.parametrize('end, command', [(2.0, [1.0, 0.0, 0.0]), (1.999, [0.0, 0.0, 1.0]),
                                          (-2.0, [0.0, 1.0, 0.0]), (-1.999, [0.0, 0.0, 1.0])])
def test_ego_future_and_command_by_hand(end, command):
    """The scene ends after 3 steps: masks 1, 1, 1, 0, 0, 0, the last pose repeated, and the
    command from the last valid pose (lidar x = right)."""
    tables = hand_tables([(100.0, 50.0), (100.0, 60.0), (100.0 + end / 2, 70.0),
                          (100.0 + end, 80.0)])
    trajs, masks, cmd = ego_future('s0', tables)
    assert masks == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0] and cmd == command
    np.testing.assert_allclose(trajs, [[0, 10], [end / 2, 10], [end / 2, 10], [0, 0], [0, 0],
                                       [0, 0]], atol=1e-12)
    # the lidar turned by 90 degrees: global +y is its +x (right)
    tables = hand_tables([(0.0, 0.0)] + [(0.0, 3.0 * i) for i in range(1, 8)], math.pi / 2)
    trajs, masks, cmd = ego_future('s0', tables)
    assert masks == [1.0] * 6 and cmd == [1.0, 0.0, 0.0]
    np.testing.assert_allclose(trajs, [[3, 0]] * 6, atol=1e-12)


def test_agent_future_by_hand():
    """An object at global (10, 0) heading along global x, seen by a lidar turned by 90
    degrees: its steps along global x are lidar -y. 14 annotations: 12 steps kept; a chain
    whose keyframes are 0.6 s apart stops at the 10th (6.0 s), the 11th being 6.6 s ahead."""
    tables = hand_tables([(0.0, 0.0)] * 14)
    rows = [dict(token=f'a{i}', sample_token=f's{i}', translation=[10.0 + i, 0.0, 1.0],
                 rotation=[1.0, 0.0, 0.0, 0.0], next=f'a{i + 1}' if i < 13 else '')
            for i in range(14)]
    tables.annotations.update({row['token']: row for row in rows})
    global2lidar = np.linalg.inv(hand_tables([(0.0, 0.0)], math.pi / 2).samples['s0'][
        'lidar2global'])
    traj, mask = agent_future(rows[0], tables, global2lidar)
    assert mask == [1.0] * 12
    np.testing.assert_allclose(traj, [[0, -1]] * 12, atol=1e-12)
    traj, mask = agent_future(rows[9], tables, global2lidar)  # the chain ends: 4 steps
    assert mask == [1.0] * 4 + [0.0] * 8
    np.testing.assert_allclose(traj, [[0, -1]] * 4 + [[0, 0]] * 8, atol=1e-12)
    tables.samples.update(hand_tables([(0.0, 0.0)] * 14, times=[
        600_000 * i for i in range(14)]).samples)
    traj, mask = agent_future(rows[0], tables, global2lidar)
    assert mask == [1.0] * 10 + [0.0] * 2
    # a skipped keyframe: the next annotation fills the next step (upstream), or stops it
    rows[2]['next'] = 'a4'
    traj, mask = agent_future(rows[1], tables, global2lidar)
    assert mask == [1.0] * 9 + [0.0] * 3  # a2, a4, ..., a11 (6.0 s after a1)
    np.testing.assert_allclose(traj[:3], [[0, -1], [0, -2], [0, -1]], atol=1e-12)
    traj, mask = agent_future(rows[1], tables, global2lidar, stop_at_gap=True)
    assert mask == [1.0] + [0.0] * 11


# -- edges -------------------------------------------------------------------------------------

def test_scene_end_and_a_chain_that_ends_early(stripped):
    root, paths, _ = stripped
    add_planning_fields(paths, root, VERSION)
    infos = load(paths[0])['data_list']
    last, third_last = infos[-1], infos[-3]
    assert last['gt_ego_fut_masks'] == [0.0] * 6
    assert last['gt_ego_fut_trajs'] == [[0.0, 0.0]] * 6  # the last pose repeated
    assert last['gt_ego_fut_cmd'] == [0.0, 0.0, 1.0]
    assert third_last['gt_ego_fut_masks'] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert np.abs(third_last['gt_ego_fut_trajs'][:2]).max() > 0
    assert third_last['gt_ego_fut_trajs'][2:] == [[0.0, 0.0]] * 4
    for instance in last['instances']:
        assert instance['fut_mask'] == [0.0] * 12
    # a chain that ends within 6 s: the valid prefix, then zeros; the offsets add up to
    # the last annotation's position (the synthetic world is level: the exact 3-D move)
    samples, annotations = annotation_index(root)
    global2lidar = np.linalg.inv(lidar2global(root, infos[0]['token']))
    found = 0
    for k, instance in enumerate(infos[0]['instances']):
        steps = int(sum(instance['fut_mask']))
        row = annotations[infos[0]['token']][k]
        if not 0 < steps < 12 or has_gap(infos[0], k, samples, annotations):
            continue
        found += 1
        assert instance['fut_mask'] == [1.0] * steps + [0.0] * (12 - steps)
        assert instance['fut_traj'][steps:] == [[0.0, 0.0]] * (12 - steps)
        chain = [row]
        while chain[-1]['next']:
            chain.append(annotations['by_token'][chain[-1]['next']])
        assert len(chain) == steps + 1  # the chain ends: no annotation after the last step
        end = (global2lidar @ [*chain[-1]['translation'], 1])[:2]
        start = (global2lidar @ [*row['translation'], 1])[:2]
        np.testing.assert_allclose(np.sum(instance['fut_traj'], axis=0), end - start,
                                   atol=1e-9)
    assert found > 0


def test_missing_can_bus_is_an_error_or_zeros(stripped, tmp_path):
    root, paths, _ = stripped
    before = [open(p, 'rb').read() for p in paths]
    can_root = tmp_path / 'can'
    shutil.copytree(f'{root}/can_bus', can_root / 'can_bus')
    val_scene = read_json(root, 'scene')[1]['name']
    os.remove(can_root / 'can_bus' / f'{val_scene}_steeranglefeedback.json')
    with pytest.raises(MissingCanBusError, match=f'{val_scene} \\(no {val_scene}_steer') as error:
        add_planning_fields(paths, root, VERSION, can_bus_root=str(can_root))
    assert '1 scenes (14 samples need ego_status)' in str(error.value)
    assert '--allow-missing-can-bus' in str(error.value)
    assert [open(p, 'rb').read() for p in paths] == before  # nothing written
    with pytest.warns(UserWarning, match=f'ego_status is zeros .* 14 samples of 1 scenes .*'
                                         f'{val_scene}'):
        results = add_planning_fields(paths, root, VERSION, can_bus_root=str(can_root),
                                      allow_missing_can_bus=True)
    assert [(r['ego_status'], r['zeros']) for r in results] == [(14, 0), (0, 14)]
    assert results[1]['no_can_data'] == {val_scene: f'no {val_scene}_steeranglefeedback.json'}
    assert all(info['ego_status'] == [0.0] * 10 for info in load(paths[1])['data_list'])
    assert all(any(info['ego_status']) for info in load(paths[0])['data_list'])
    assert 'zeros (--allow-missing-can-bus) for 14 samples' in format_results(results)
    # no expansion at all
    dump(paths[0], strip(load(paths[0])))
    with pytest.raises(MissingCanBusError, match='no CAN bus expansion at'):
        add_planning_fields(paths[0], root, VERSION, can_bus_root=str(tmp_path / 'none'))


def test_can_bus_reader(tmp_path):
    pose = dict(accel=[0.1, 0.2, 9.8], rotation_rate=[0, 0, 0.3], vel=[5, 0.5, 0])
    write_json(f'{tmp_path}/can_bus/scene-0001_pose.json',
               [dict(pose, utime=100), dict(pose, utime=200, vel=[6, 0, 0])])
    write_json(f'{tmp_path}/can_bus/scene-0001_steeranglefeedback.json',
               [dict(utime=90, value=-0.5), dict(utime=160, value=0.25)])
    for name in ('scene-0161', 'scene-0002'):  # blacklisted (its file ignored); empty
        write_json(f'{tmp_path}/can_bus/{name}_pose.json', [])
    can = CanBusMessages(f'{tmp_path}/can_bus', [f'{tmp_path}/can_bus'], PlanningFieldsError)
    # t = 150: a tie between the pose messages goes to the later one; steering at 160
    assert can.ego_status('scene-0001', 150) == [0.1, 0.2, 9.8, 0, 0, 0.3, 6, 0, 0, 0.25]
    assert can.ego_status('scene-0001', 120)[6:] == [5, 0.5, 0, -0.5]
    assert can.ego_status('scene-0161', 150) is None
    assert can.ego_status('scene-0002', 150) is None
    assert can.ego_status('scene-0003', 150) is None
    assert can.ego_status('synthetic-0001', 150) is None
    assert can.missing == {'scene-0161': "on nuscenes-devkit's CAN bus blacklist",
                           'scene-0002': 'scene-0002_pose.json holds no message',
                           'scene-0003': 'no scene-0003_pose.json',
                           'synthetic-0001': 'not a nuScenes scene name (scene-NNNN)'}
    assert (locate_message([10, 20, 30], 15), locate_message([10, 20, 30], 14),
            locate_message([10, 20, 30], 0), locate_message([10, 20, 30], 40)) == (1, 0, 0, 2)
    for name, rows, match in (
            ('scene-0004', [dict(pose, utime=1), dict(pose, utime=0)], 'before the previous'),
            ('scene-0005', [dict(pose)], 'no numeric utime'),
            ('scene-0006', [dict(pose, utime=1, vel=[1, 2])], 'vel .* not a list of 3'),
            ('scene-0007', {'utime': 1}, 'not a list of messages')):
        write_json(f'{tmp_path}/can_bus/{name}_pose.json', rows)
        with pytest.raises(PlanningFieldsError, match=match):
            can.ego_status(name, 1)
    many = {f'scene-{i:04d}': 'no CAN bus expansion at x' for i in range(8)}
    assert _name_scenes({**many, 'scene-0161': 'blacklisted'}) == (
        'scene-0000, scene-0001, scene-0002, scene-0003, scene-0004 and 3 more (no CAN bus '
        'expansion at x); scene-0161 (blacklisted)')
    with open(f'{tmp_path}/can_bus/scene-0008_pose.json', 'w') as f:
        f.write('{')
    with pytest.raises(PlanningFieldsError, match='scene-0008_pose.json: not a JSON'):
        can.ego_status('scene-0008', 1)


def test_kept_unless_force(stripped):
    root, paths, _ = stripped
    add_planning_fields(paths, root, VERSION)
    computed = load(paths[0])
    again = add_planning_fields(paths, root, VERSION)
    assert [r['written'] for r in again] == [False, False]
    assert again[0]['added'] == again[0]['overwritten'] == 0 and again[0]['kept'] > 0
    # values already there are kept, even different ones (no CAN data read for them)
    infos = copy.deepcopy(computed)
    infos['data_list'][0]['ego_status'] = [7.0] * 10
    infos['data_list'][0]['instances'][0]['fut_traj'] = [[1.0, 1.0]] * 12
    dump(paths[0], infos)
    result = add_planning_fields(paths[0], root, VERSION, can_bus_root='/nonexistent')
    assert result[0]['written'] is False and result[0]['ego_status'] == 0
    assert same(load(paths[0]), infos)
    result = add_planning_fields(paths[0], root, VERSION, force=True)
    assert result[0]['overwritten'] == 2 and result[0]['written']
    assert same(load(paths[0]), computed)
    # part of a group: an error without force
    infos = copy.deepcopy(computed)
    del infos['data_list'][3]['gt_ego_fut_cmd']
    del infos['data_list'][4]['instances'][1]['fut_mask']
    dump(paths[0], infos)
    with pytest.raises(PlanningFieldsError, match=r'data_list\[3\] has gt_ego_fut_trajs, '
                                                  r'gt_ego_fut_masks but not gt_ego_fut_cmd'):
        add_planning_fields(paths[0], root, VERSION)
    del infos['data_list'][3]['gt_ego_fut_trajs']  # the whole group gone: written again
    del infos['data_list'][3]['gt_ego_fut_masks']
    dump(paths[0], infos)
    with pytest.raises(PlanningFieldsError, match=r'data_list\[4\]\.instances\[1\] has '
                                                  'fut_traj but not fut_mask.*--force'):
        add_planning_fields(paths[0], root, VERSION)
    add_planning_fields(paths[0], root, VERSION, force=True)
    assert same(load(paths[0]), computed)


def test_instances_must_be_the_annotations(stripped):
    root, paths, originals = stripped
    infos = strip(originals[0])
    instances = infos['data_list'][2]['instances']
    instances[0], instances[1] = instances[1], instances[0]
    dump(paths[0], infos)
    with pytest.raises(PlanningFieldsError, match=r'data_list\[2\]\.instances\[0\]\.bbox_3d '
                                                  'is centred at'):
        add_planning_fields(paths[0], root, VERSION)
    del instances[0]
    dump(paths[0], infos)
    with pytest.raises(PlanningFieldsError, match=r'data_list\[2\]\.instances has \d+ entries '
                                                  r'but .* has \d+ annotations'):
        add_planning_fields(paths[0], root, VERSION)
    infos['data_list'][2]['token'] = 'elsewhere'
    dump(paths[0], infos)
    with pytest.raises(PlanningFieldsError, match="token 'elsewhere' is not a sample"):
        add_planning_fields(paths[0], root, VERSION)
    with pytest.raises(PlanningFieldsError, match='metainfo.version is'):
        add_planning_fields(paths[1], root, 'v1.0-mini')
    with pytest.raises(NuScenesTableError, match='sensor.json: missing'):
        add_planning_fields(paths[1], f'{root}/nowhere', VERSION)


def test_the_write_is_atomic(stripped, monkeypatch):
    """A write that fails half way (a full disk) leaves every info file as it was."""
    root, paths, _ = stripped
    before = [open(p, 'rb').read() for p in paths]

    def full_disk(obj, f, protocol=None):
        f.write(b'\x80\x04partial')
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(nuscenes_tables.pickle, 'dump', full_disk)
    with pytest.raises(OSError, match='No space left'):
        add_planning_fields(paths, root, VERSION)
    assert [open(p, 'rb').read() for p in paths] == before
    assert sorted(os.listdir(osp.dirname(paths[0]))) == ['train.pkl', 'val.pkl']


# -- the command line --------------------------------------------------------------------------

def test_command_line(stripped, tmp_path):
    """Two runs (each a fresh process): missing CAN data fails, naming the scene; with
    --allow-missing-can-bus the fields are written, zeros for that scene."""
    root, paths, originals = stripped
    val_scene = read_json(root, 'scene')[1]['name']
    can_root = tmp_path / 'can'
    os.makedirs(can_root / 'can_bus')
    for name in os.listdir(f'{root}/can_bus'):
        if not name.startswith(val_scene):
            shutil.copy(f'{root}/can_bus/{name}', can_root / 'can_bus')
    args = ['tools/create_data.py', 'planning', *paths, '--root-path', root, '--can-bus',
            str(can_root), '--no-progress']
    proc = run_python(args)
    assert proc.returncode == 2, proc.stdout
    assert f'{val_scene} (no {val_scene}_pose.json)' in proc.stderr
    assert '--allow-missing-can-bus' in proc.stderr
    proc = run_python(args + ['--allow-missing-can-bus', '--version', VERSION, '--force'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'{paths[0]}: 14 samples' in proc.stdout and '(written)' in proc.stdout
    assert 'zeros (--allow-missing-can-bus) for 14 samples' in proc.stdout
    assert val_scene in proc.stdout
    for path, ours in zip(paths, originals):
        for a, b in zip(load(path)['data_list'], ours['data_list']):
            assert a['gt_ego_fut_cmd'] == b['gt_ego_fut_cmd']
            assert (a['ego_status'] == [0.0] * 10) == (path == paths[1])
    assert command_line([paths[0]], root) == (f'python tools/create_data.py planning '
                                              f'{paths[0]} --root-path {root}')
