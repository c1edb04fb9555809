"""The map-fields step (turbox_mm.datasets.nuscenes_map_fields, `tools/create_data.py
map-fields`): MapTR's scene_token, map_location and can_bus for v2 infos that carry none.

On tiny hand-written nuScenes tables and CAN bus pose files: the fields per sample, can_bus
against a hand computation of upstream's procedure (the motion numbers from the pose message
after the sample time), the scenes without CAN data (zeros), the missing expansion (a
warning, no can_bus), every bad input named, the atomic rewrite, the command line; and on a
tiny synthetic set, the generator's own fields (same names, same types, same values).
"""
import json
import os
import os.path as osp
import pickle
import re

import numpy as np
import pytest

from conftest import run_python
from turbox_mm.datasets import nuscenes_tables
from turbox_mm.datasets.nuscenes_map_fields import (CAN_BLACKLIST, FIELDS, CanBusPoses,
                                                    MapFieldsError, add_map_fields,
                                                    can_bus_from_poses, command_line,
                                                    format_results, load_scene_tables)
from turbox_mm.datasets.nuscenes_tables import MissingTableError, NuScenesTableError
from turbox_mm.datasets.synthetic import InfoFileError, check_infos

VERSION = 'v1.0-trainval'

# -- a tiny nuScenes ---------------------------------------------------------------------------

LOGS = [dict(token='log-b', location='boston-seaport', vehicle='n015'),
        dict(token='log-s', location='singapore-onenorth', vehicle='n008')]
SCENES = [dict(token='sc-1', name='scene-0001', log_token='log-b'),
          dict(token='sc-2', name='scene-0002', log_token='log-s'),
          dict(token='sc-161', name='scene-0161', log_token='log-b')]  # devkit's blacklist
#: sample token -> (scene token, timestamp in microseconds)
SAMPLES = {'s1a': ('sc-1', 50), 's1b': ('sc-1', 200), 's1c': ('sc-1', 350),
           's1d': ('sc-1', 450), 's2a': ('sc-2', 100), 's2b': ('sc-2', 600),
           's3a': ('sc-161', 200)}
TRAIN = ('s1a', 's1b', 's1c', 's1d')
VAL = ('s2a', 's3a')


def pose(utime, pos, orientation, accel, rotation_rate, vel):
    """A pose message with nuScenes' key order (the files list the keys alphabetically)."""
    return dict(accel=accel, orientation=orientation, pos=pos, rotation_rate=rotation_rate,
                utime=utime, vel=vel)


POSES = [pose(100, [1, 2, 3], [1, 0, 0, 0], [0.1, 0.2, 9.8], [0.01, 0.02, 0.03], [1, 0, 0]),
         pose(200, [4, 5, 6], [0.9, 0.1, 0.2, 0.3], [0.4, 0.5, 9.7], [0.04, 0.05, 0.06],
              [2, 0.1, 0]),
         pose(300, [7, 8, 9], [0.8, 0.2, 0.3, 0.4], [0.7, 0.8, 9.6], [0.07, 0.08, 0.09],
              [3, 0.2, 0]),
         pose(400, [10, 11, 12], [0.7, 0.3, 0.4, 0.5], [1.0, 1.1, 9.5], [0.10, 0.11, 0.12],
              [4, 0.3, 0])]

#: Upstream's procedure by hand: position and orientation from the last message at or before
#: the sample (the first if none is), accel, rotation_rate, vel from the first message after
#: it (the last if none is), then 0, 0.
EXPECTED = {
    # t = 50, before every message: message 0 for both
    's1a': [1, 2, 3, 1, 0, 0, 0, 0.1, 0.2, 9.8, 0.01, 0.02, 0.03, 1, 0, 0, 0, 0],
    # t = 200, exactly message 1's utime (not after it): position of 1, motion of 2
    's1b': [4, 5, 6, 0.9, 0.1, 0.2, 0.3, 0.7, 0.8, 9.6, 0.07, 0.08, 0.09, 3, 0.2, 0, 0, 0],
    # t = 350: position of 2, motion of 3
    's1c': [7, 8, 9, 0.8, 0.2, 0.3, 0.4, 1.0, 1.1, 9.5, 0.10, 0.11, 0.12, 4, 0.3, 0, 0, 0],
    # t = 450, after every message: message 3 for both
    's1d': [10, 11, 12, 0.7, 0.3, 0.4, 0.5, 1.0, 1.1, 9.5, 0.10, 0.11, 0.12, 4, 0.3, 0, 0, 0],
    's2a': [0] * 18,  # scene-0002 has no pose file
    's3a': [0] * 18,  # scene-0161 is on the devkit's blacklist (its pose file is ignored)
}
LOCATION = {'s1a': 'boston-seaport', 's1b': 'boston-seaport', 's1c': 'boston-seaport',
            's1d': 'boston-seaport', 's2a': 'singapore-onenorth', 's3a': 'boston-seaport'}


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


def write_tables(root, version=VERSION, samples=SAMPLES, scenes=SCENES, logs=LOGS):
    rows = [dict(token=token, timestamp=t, scene_token=scene, prev='', next='', data={})
            for token, (scene, t) in samples.items()]
    write_json(f'{root}/{version}/sample.json', rows)
    write_json(f'{root}/{version}/scene.json', scenes)
    write_json(f'{root}/{version}/log.json', logs)


def write_can_bus(folder):
    write_json(f'{folder}/scene-0001_pose.json', POSES)
    write_json(f'{folder}/scene-0161_pose.json', POSES)
    # other message types of the expansion, never read
    write_json(f'{folder}/scene-0001_ms_imu.json', [dict(utime=100, linear_accel=[0, 0, 9.8])])


def info_file(path, tokens, version=VERSION):
    """A v2 info file as mmdet3d's converter writes it (without the map fields)."""
    lidar_points = dict(lidar2ego=np.eye(4).tolist(), num_pts_feats=5)
    data_list = [dict(sample_idx=i, token=token, timestamp=SAMPLES[token][1] / 1e6,
                      ego2global=np.eye(4).tolist(), lidar_points=dict(lidar_points),
                      instances=[])
                 for i, token in enumerate(tokens)]
    dump(path, dict(metainfo=dict(dataset='nuscenes', version=version, info_version='1.1'),
                    data_list=data_list))
    return str(path)


@pytest.fixture
def nus(tmp_path):
    """A data root with the tables and the CAN bus expansion, and its train / val infos."""
    root = tmp_path / 'nuscenes'
    write_tables(root)
    write_can_bus(root / 'can_bus')
    return str(root), info_file(tmp_path / 'train.pkl', TRAIN), info_file(tmp_path / 'val.pkl',
                                                                          VAL)


@pytest.fixture
def bare(tmp_path):
    """A data root with the tables only."""
    root = tmp_path / 'nuscenes'
    write_tables(root)
    return str(root), info_file(tmp_path / 'train.pkl', TRAIN), info_file(tmp_path / 'val.pkl',
                                                                          VAL)


def by_token(path):
    return {info['token']: info for info in load(path)['data_list']}


# -- the fields --------------------------------------------------------------------------------

def test_scene_tokens_locations_and_can_bus(nus):
    root, train, val = nus
    results = add_map_fields([train, val], root, VERSION)
    for path, tokens in ((train, TRAIN), (val, VAL)):
        infos = by_token(path)
        assert list(infos) == list(tokens)
        for token, info in infos.items():
            assert info['scene_token'] == SAMPLES[token][0]
            assert info['map_location'] == LOCATION[token]
            assert isinstance(info['can_bus'], list) and len(info['can_bus']) == 18
            assert all(type(v) is float for v in info['can_bus'])
            assert info['can_bus'] == pytest.approx(EXPECTED[token], abs=0, rel=0), token
            assert info['lidar_points']['num_pts_feats'] == 5  # the rest untouched
    assert [r['written'] for r in results] == [True, True]
    assert [(r['added'], r['kept'], r['overwritten']) for r in results] == [(12, 0, 0),
                                                                            (6, 0, 0)]
    assert [(r['can_bus'], r['can_bus_zeros']) for r in results] == [(4, 0), (0, 2)]
    assert results[1]['no_can_data'] == {'scene-0002': 'no scene-0002_pose.json',
                                         'scene-0161': "on nuscenes-devkit's CAN bus blacklist"}
    text = format_results(results)
    assert f'{train}: 4 samples: 12 field values added' in text and '(written)' in text
    assert '2 samples zeros (as upstream) for 2 scenes without CAN data' in text
    assert f"can_bus from {osp.join(root, 'can_bus')}: 4 samples" in text


def test_motion_numbers_come_from_the_message_after_the_sample():
    """Upstream's slip, kept: at t = 200 (message 1's own time) the position is message 1's,
    the acceleration, rotation rate and velocity message 2's."""
    bus = can_bus_from_poses(POSES, 200)
    assert bus[:7] == [4, 5, 6, 0.9, 0.1, 0.2, 0.3]
    assert bus[7:10] == POSES[2]['accel'] != POSES[1]['accel']
    assert bus[10:13] == POSES[2]['rotation_rate'] and bus[13:16] == POSES[2]['vel']
    assert bus[16:] == [0.0, 0.0]
    # one microsecond earlier message 1 is after the sample: message 0's position, 1's motion
    bus = can_bus_from_poses(POSES, 199)
    assert bus[:3] == [1, 2, 3] and bus[7:10] == POSES[1]['accel']
    # a single message gives everything
    assert can_bus_from_poses(POSES[:1], 10**9) == pytest.approx(EXPECTED['s1a'])


def test_motion_keys_follow_the_file_order():
    """Upstream appends the motion keys in the order of the chosen message's keys."""
    shuffled = [dict(utime=m['utime'], vel=m['vel'], pos=m['pos'], accel=m['accel'],
                     orientation=m['orientation'], rotation_rate=m['rotation_rate'])
                for m in POSES]
    bus = can_bus_from_poses(shuffled, 350)
    assert bus[7:10] == [4, 0.3, 0] and bus[10:13] == [1.0, 1.1, 9.5]
    assert bus[13:16] == [0.10, 0.11, 0.12]


def test_reader_and_blacklist_match_the_devkit(nus):
    can_bus_api = pytest.importorskip('nuscenes.can_bus.can_bus_api')
    root, _, _ = nus
    devkit = can_bus_api.NuScenesCanBus(dataroot=root)
    assert set(devkit.can_blacklist) == CAN_BLACKLIST
    ours = CanBusPoses(osp.join(root, 'can_bus'))
    assert ours.messages('scene-0001') == (devkit.get_messages('scene-0001', 'pose'), None)
    with pytest.raises(Exception, match='does not have any CAN bus data'):
        devkit.get_messages('scene-0161', 'pose')  # upstream catches it: zeros
    assert ours.messages('scene-0161')[0] is None
    with pytest.raises(FileNotFoundError):
        devkit.get_messages('scene-0002', 'pose')  # upstream catches it too: zeros
    assert ours.messages('scene-0002') == (None, 'no scene-0002_pose.json')


def test_without_the_can_bus_expansion(bare, tmp_path):
    """One warning naming the folders looked at; scene_token and map_location are written,
    can_bus is not, and the MapTR adaptor uses zeros for the 9 motion numbers."""
    from turbox_mm.datasets.transforms.maptr_adaptor import NuScenesMapTRAdaptor
    root, train, val = bare
    with pytest.warns(UserWarning) as record:
        results = add_map_fields([train, val], root)
    messages = [str(w.message) for w in record if 'CAN bus' in str(w.message)]
    assert len(messages) == 1
    assert osp.join(root, 'can_bus') in messages[0] and str(tmp_path / 'can_bus') in messages[0]
    assert 'zeros for the acceleration, rotation rate and velocity' in messages[0]
    for path, tokens in ((train, TRAIN), (val, VAL)):
        infos = by_token(path)
        assert all('can_bus' not in info for info in infos.values())
        assert {t: i['map_location'] for t, i in infos.items()} == {t: LOCATION[t]
                                                                    for t in tokens}
    assert [r['can_bus_folder'] for r in results] == [None, None]
    assert 'can_bus not written: no CAN bus expansion at' in format_results(results)

    info = by_token(train)['s1a']
    pose_matrix = np.eye(4)
    pose_matrix[:3, 3] = [1, 2, 3]
    cam = dict(cam2img=np.eye(3).tolist(), lidar2cam=np.eye(4).tolist(),
               cam2ego=np.eye(4).tolist())
    out = NuScenesMapTRAdaptor()(dict(info, ego2global=pose_matrix.tolist(),
                                      images=dict(CAM_FRONT=cam)))
    assert out['can_bus'][:7].tolist() == [1, 2, 3, 1, 0, 0, 0]
    assert out['can_bus'][7:].tolist() == [0.0] * 11  # motion zeros, yaw 0


def test_can_bus_next_to_the_root_or_given(bare, tmp_path):
    """Upstream's layout (data/can_bus beside data/nuscenes) is found; --can-bus-root takes
    the folder holding can_bus/ (upstream's --canbus) or can_bus/ itself."""
    root, train, _ = bare
    write_can_bus(tmp_path / 'can_bus')
    results = add_map_fields(train, root)
    assert results[0]['can_bus_folder'] == str(tmp_path / 'can_bus')
    assert by_token(train)['s1c']['can_bus'] == pytest.approx(EXPECTED['s1c'], abs=0)
    elsewhere = tmp_path / 'elsewhere'
    write_can_bus(elsewhere / 'can_bus')
    for given in (elsewhere, elsewhere / 'can_bus'):
        results = add_map_fields(train, root, can_bus_root=str(given))
        assert results[0]['can_bus_folder'] == str(elsewhere / 'can_bus')
        assert not results[0]['written']  # same values: kept
    with pytest.warns(UserWarning, match=str(tmp_path / 'nowhere' / 'can_bus')):
        add_map_fields(train, root, can_bus_root=str(tmp_path / 'nowhere'))


def test_twice_changes_nothing_and_other_values_need_force(nus):
    root, train, val = nus
    add_map_fields([train, val], root)
    before = [open(p, 'rb').read() for p in (train, val)]
    stamps = [os.stat(p).st_mtime_ns for p in (train, val)]
    results = add_map_fields([train, val], root)
    assert [r['written'] for r in results] == [False, False]
    assert [(r['added'], r['kept']) for r in results] == [(0, 12), (0, 6)]
    assert [open(p, 'rb').read() for p in (train, val)] == before
    assert [os.stat(p).st_mtime_ns for p in (train, val)] == stamps

    infos = load(train)
    infos['data_list'][2]['map_location'] = 'singapore-queenstown'
    dump(train, infos)
    with pytest.raises(MapFieldsError) as error:
        add_map_fields([train, val], root)
    message = str(error.value)
    assert train in message and 'data_list[2].map_location' in message and '--force' in message
    assert "'singapore-queenstown'" in message and "'boston-seaport'" in message
    results = add_map_fields([train, val], root, force=True)
    assert results[0]['overwritten'] == 1 and results[0]['written']
    assert by_token(train)['s1c']['map_location'] == 'boston-seaport'

    infos = load(train)
    infos['data_list'][1]['can_bus'] = np.zeros(18)  # an upstream-style array, other values
    dump(train, infos)
    with pytest.raises(MapFieldsError, match=r'data_list\[1\]\.can_bus is \[0\.0, '):
        add_map_fields(train, root)
    infos['data_list'][1]['can_bus'] = np.array(EXPECTED['s1b'])  # the same values: kept
    dump(train, infos)
    assert add_map_fields(train, root)[0]['kept'] == 12


# -- bad input ---------------------------------------------------------------------------------

def test_missing_table(nus):
    root, train, _ = nus
    os.remove(osp.join(root, VERSION, 'log.json'))
    with pytest.raises(MapFieldsError, match='log.json: missing') as error:
        add_map_fields(train, root)
    message = str(error.value)
    assert osp.join(root, VERSION, 'log.json') in message
    assert 'sample.json, scene.json, log.json' in message and f'{root} holds {VERSION}' in message
    assert 'can_bus' not in load(train)['data_list'][0]


def test_tables_or_infos_of_another_version(nus, tmp_path):
    root, train, _ = nus
    os.rename(osp.join(root, VERSION), osp.join(root, 'v1.0-mini'))
    with pytest.raises(MapFieldsError) as error:
        add_map_fields(train, root)
    assert osp.join(root, VERSION, 'sample.json') in str(error.value)
    assert 'holds v1.0-mini' in str(error.value)
    with pytest.raises(MapFieldsError) as error:
        add_map_fields(train, root, 'v1.0-mini')
    assert train in str(error.value) and "metainfo.version is 'v1.0-trainval'" in str(
        error.value)
    with pytest.raises(MapFieldsError, match="version 'v1.0': not a nuScenes version"):
        load_scene_tables(root, 'v1.0')
    mini = info_file(tmp_path / 'mini.pkl', VAL, version='v1.0-mini')
    with pytest.raises(MapFieldsError, match='infos of several versions'):
        add_map_fields([train, mini], root)
    infos = load(train)
    del infos['metainfo']['version']
    dump(train, infos)
    with pytest.raises(MapFieldsError, match='metainfo.version is missing'):
        add_map_fields(train, root)
    assert add_map_fields(train, root, 'v1.0-mini')[0]['added'] == 12


def test_sample_not_in_the_tables(nus, tmp_path):
    root, train, _ = nus
    infos = load(train)
    infos['data_list'][3]['token'] = 'not-a-sample'
    dump(train, infos)
    with pytest.raises(MapFieldsError) as error:
        add_map_fields(train, root)
    message = str(error.value)
    assert train in message and "data_list[3].token 'not-a-sample'" in message
    assert osp.join(root, VERSION, 'sample.json') in message and '1 of 4 samples' in message


def test_broken_tables(nus):
    root, train, _ = nus
    scenes = [dict(s) for s in SCENES]
    scenes[1]['log_token'] = 'nope'
    write_tables(root, scenes=scenes)
    with pytest.raises(MapFieldsError, match=r"scene.json: row 1 \(token 'sc-2'\) has log_token "
                                             "'nope', which log.json does not hold"):
        add_map_fields(train, root)
    samples = dict(SAMPLES, s9=('sc-9', 0))
    write_tables(root, samples=samples)
    with pytest.raises(MapFieldsError, match="sample.json: row 7 .* scene_token 'sc-9', which "
                                             'scene.json does not hold'):
        add_map_fields(train, root)
    write_tables(root, logs=[dict(token='log-b'), LOGS[1]])
    with pytest.raises(MapFieldsError, match="log.json: row 0 has no 'location'"):
        add_map_fields(train, root)
    write_tables(root, scenes=[{k: v for k, v in s.items() if k != 'name'} for s in SCENES])
    with pytest.raises(MapFieldsError, match="scene.json: row 0 has no 'name'"):
        add_map_fields(train, root)  # read only for can_bus
    with open(osp.join(root, VERSION, 'sample.json'), 'w') as f:
        f.write('{"truncated": ')
    with pytest.raises(MapFieldsError, match='sample.json: not a JSON table'):
        add_map_fields(train, root)
    assert 'scene_token' not in load(train)['data_list'][0]


def test_broken_pose_files(nus):
    root, train, _ = nus
    path = osp.join(root, 'can_bus', 'scene-0001_pose.json')
    write_json(path, [dict(m) for m in POSES[:2]] + [{'pos': [0, 0, 0]}])
    with pytest.raises(MapFieldsError, match="scene-0001_pose.json: message 2 has no 'utime'"):
        add_map_fields(train, root)
    broken = [dict(m) for m in POSES]
    del broken[2]['vel']
    write_json(path, broken)
    with pytest.raises(MapFieldsError, match=r"message 2 has no list 'vel' \(message 1 has"):
        add_map_fields(train, root)
    write_json(path, {'utime': [100]})
    with pytest.raises(MapFieldsError, match='not a list of pose messages, got a dict'):
        add_map_fields(train, root)
    write_json(path, [dict(m, extra=[1.0]) for m in POSES])
    with pytest.raises(MapFieldsError, match='give 19 can_bus numbers, not 18'):
        add_map_fields(train, root)
    with open(path, 'w') as f:
        f.write('[{"utime": 1')
    with pytest.raises(MapFieldsError, match=re.escape(f'{path}: not a JSON CAN bus file')):
        add_map_fields(train, root)
    assert 'scene_token' not in load(train)['data_list'][0]


def test_not_v2_infos(nus, tmp_path):
    root, _, _ = nus
    path = tmp_path / 'v1.pkl'
    dump(path, dict(infos=[dict(token='s1a')], metadata=dict(version=VERSION)))
    with pytest.raises(InfoFileError, match='v1'):
        add_map_fields(str(path), root)


def test_the_write_is_atomic(nus, monkeypatch):
    """A write that fails half way (a full disk) leaves every info file as it was."""
    root, train, val = nus
    before = [open(p, 'rb').read() for p in (train, val)]

    def full_disk(obj, f, protocol=None):
        f.write(b'\x80\x04partial')
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(nuscenes_tables.pickle, 'dump', full_disk)
    with pytest.raises(OSError, match='No space left'):
        add_map_fields([train, val], root)
    assert [open(p, 'rb').read() for p in (train, val)] == before
    assert sorted(os.listdir(osp.dirname(train))) == ['nuscenes', 'train.pkl', 'val.pkl']


def test_the_table_errors_are_one_family():
    """The tracking evaluation's missing table stays a FileNotFoundError."""
    assert issubclass(MapFieldsError, NuScenesTableError)
    assert issubclass(MissingTableError, FileNotFoundError)
    assert issubclass(MissingTableError, NuScenesTableError)


# -- the command line --------------------------------------------------------------------------

def test_command_line(nus, tmp_path):
    root, train, val = nus
    proc = run_python(['tools/create_data.py', 'map-fields', train, val, '--root-path', root,
                       '--version', VERSION])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'{train}: 4 samples: 12 field values added' in proc.stdout
    assert 'zeros (as upstream)' in proc.stdout
    assert by_token(train)['s1b']['can_bus'] == pytest.approx(EXPECTED['s1b'], abs=0)
    assert by_token(val)['s2a']['map_location'] == 'singapore-onenorth'
    assert command_line([train], root) == (f'python tools/create_data.py map-fields {train} '
                                           f'--root-path {root}')

    infos = load(train)
    infos['data_list'][0]['scene_token'] = 'other'
    dump(train, infos)
    proc = run_python(['tools/create_data.py', 'map-fields', train, '--root-path', root])
    assert proc.returncode == 2 and 'data_list[0].scene_token' in proc.stderr
    assert '--force' in proc.stderr
    proc = run_python(['tools/create_data.py', 'map-fields', train, '--root-path', root,
                       '--force'])
    assert proc.returncode == 0 and '1 overwritten' in proc.stdout, proc.stderr[-3000:]

    bare = tmp_path / 'bare'
    write_tables(bare)
    proc = run_python(['tools/create_data.py', 'map-fields', val, '--root-path', str(bare)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'can_bus not written: no CAN bus expansion at' in proc.stdout
    proc = run_python(['tools/create_data.py', 'map-fields', val, '--root-path',
                       str(tmp_path / 'nothing')])
    assert proc.returncode == 2 and 'sample.json: missing' in proc.stderr


def test_nuscenes_command_prints_the_step(tmp_path):
    root = tmp_path / 'data' / 'nuscenes'
    os.makedirs(root)
    proc = run_python(['tools/create_data.py', 'nuscenes', '--root-path', str(root),
                       '--instance-ids', '--map-fields'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    steps = [line for line in lines if ' instance-ids ' in line or ' map-fields ' in line]
    assert len(steps) == 2 and ' instance-ids ' in steps[0]
    assert f'{root}/nuscenes_infos_train.pkl {root}/nuscenes_infos_val.pkl' in steps[1]
    assert f'--root-path {root}' in steps[1]


# -- the synthetic generator's fields ----------------------------------------------------------

@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
    from turbox_mm.datasets.synthetic import generate
    root = str(tmp_path_factory.mktemp('synth') / 'nuscenes')
    generate(root, scenes=1, frames=3, seed=0, workers=1, image_size=(160, 90), points=500,
             sweeps=0, val_scenes=0, gt_database=False, progress=False)
    return root


def test_same_fields_as_the_synthetic_generator(synthetic, tmp_path):
    """Infos without the three fields get the generator's scene_token and map_location back,
    and all three with the generator's types (can_bus: a list of 18 floats)."""
    ours = load(f'{synthetic}/nuscenes_infos_train.pkl')
    stripped = load(f'{synthetic}/nuscenes_infos_train.pkl')
    for info in stripped['data_list']:
        for key in FIELDS:
            del info[key]
    path = str(tmp_path / 'stripped.pkl')
    dump(path, stripped)
    with open(f'{synthetic}/{VERSION}/sample.json') as f:
        times = sorted(row['timestamp'] for row in json.load(f))
    with open(f'{synthetic}/{VERSION}/scene.json') as f:
        (scene, ) = [row['name'] for row in json.load(f)]
    can_bus_root = tmp_path / 'expansion'
    write_json(f'{can_bus_root}/can_bus/{scene}_pose.json',
               [pose(t - 10, [1, 2, 3], [1, 0, 0, 0], [0.1, 0.2, 9.8], [0, 0, 0.1], [5, 0, 0])
                for t in times])
    results = add_map_fields(path, synthetic, can_bus_root=str(can_bus_root))
    assert results[0]['can_bus'] == len(times) == len(ours['data_list'])
    for mine, theirs in zip(load(path)['data_list'], ours['data_list']):
        assert mine['scene_token'] == theirs['scene_token']
        assert mine['map_location'] == theirs['map_location']
        for key in FIELDS:
            assert type(mine[key]) is type(theirs[key]), key
        assert len(mine['can_bus']) == len(theirs['can_bus']) == 18
        assert {type(v) for v in mine['can_bus']} == {type(v) for v in theirs['can_bus']} == {
            float}
    check_infos(path, ('scene_token', 'map_location', 'can_bus'))


@pytest.mark.slow
def test_after_mmdet3d_converter(tmp_path):
    """Real-data path: mmdet3d 1.4's converter rebuilds the infos from the tables (none of
    the three fields); `nuscenes --run --instance-ids --map-fields` adds them: the
    generator's scene_token and map_location, in every split (no CAN bus expansion here)."""
    root = tmp_path / 'data' / 'nuscenes'
    proc = run_python(['tools/create_data.py', 'synthetic', '--out', str(root), '--scenes', '2',
                       '--frames', '2', '--version', 'v1.0-mini', '--points', '3000',
                       '--sweeps', '1', '--image-size', '320x180', '--workers', '1',
                       '--no-progress', '--no-gt-database'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = {split: load(f'{root}/nuscenes_infos_{split}.pkl') for split in ('train', 'val')}
    proc = run_python(['tools/create_data.py', 'nuscenes', '--root-path', str(root),
                       '--version', 'v1.0-mini', '--max-sweeps', '1', '--run', '--instance-ids',
                       '--map-fields'], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'instances: ' in proc.stdout and 'field values added' in proc.stdout
    assert 'can_bus not written: no CAN bus expansion at' in proc.stdout
    for split, mine in ours.items():
        theirs = load(f'{root}/nuscenes_infos_{split}.pkl')
        assert 'fut_traj' not in theirs['data_list'][0]['instances'][0]  # mmdet3d's, not ours
        assert [i['token'] for i in theirs['data_list']] == [i['token'] for i in
                                                             mine['data_list']]
        for a, b in zip(theirs['data_list'], mine['data_list']):
            assert (a['scene_token'], a['map_location']) == (b['scene_token'],
                                                             b['map_location'])
            assert 'can_bus' not in a
            assert [i['instance_id'] for i in a['instances']] == [
                i['instance_id'] for i in b['instances']]
