"""The GT database of the synthetic dataset: what mmdet3d's converter writes, and what
mmdet3d's ``ObjectSample`` reads in the nuScenes CenterPoint configs.

One tiny dataset (2 scenes x 3 keyframes, 320x180 images, 8000-point sweeps, 3 sweeps a
sample, all train; seed 0 puts every class in it) is written once by
``tools/create_data.py synthetic``, which writes the database by default.
"""
import copy
import importlib.util
import os
import os.path as osp
import pickle
import shutil

import numpy as np
import pytest

from conftest import make_tiny_synthetic
from turbox_mm.datasets.synthetic import generate
from turbox_mm.datasets.synthetic.gt_database import load_points

CLASSES = ('car', 'truck', 'trailer', 'bus', 'construction_vehicle', 'bicycle', 'motorcycle',
           'pedestrian', 'traffic_cone', 'barrier')
KEYS = ['name', 'path', 'image_idx', 'gt_idx', 'box3d_lidar', 'num_points_in_gt', 'difficulty',
        'group_id']
CENTERPOINT = ('centerpoint/centerpoint_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d.py',
               'centerpoint/centerpoint_pillar02_second_secfpn_8xb4-cyclic-20e_nus-3d.py')


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp('gt_database') / 'nuscenes'
    return str(make_tiny_synthetic(root, frames=3, sweeps=3, scenes=2, points=8000))


def _load(path):
    with open(path, 'rb') as f:
        return pickle.load(f)


def _entries(root):
    """Every dbinfo entry, in group_id order."""
    database = _load(osp.join(root, 'nuscenes_dbinfos_train.pkl'))
    return sorted((e for entries in database.values() for e in entries),
                  key=lambda e: e['group_id'])


def _mim(*parts):
    import mmdet3d
    return osp.join(osp.dirname(mmdet3d.__file__), '.mim', *parts)


def test_dbinfos_hold_one_entry_per_valid_box(tiny):
    database = _load(osp.join(tiny, 'nuscenes_dbinfos_train.pkl'))
    infos = _load(osp.join(tiny, 'nuscenes_infos_train.pkl'))['data_list']
    assert set(database) == set(CLASSES)
    for name in CLASSES:  # CenterPoint's sampler keeps objects of 5 points or more
        assert all(e['name'] == name for e in database[name])
        assert any(e['num_points_in_gt'] >= 5 for e in database[name]), name
    entries = _entries(tiny)
    assert [e['group_id'] for e in entries] == list(range(len(entries)))
    valid = [[inst for inst in info['instances'] if inst['bbox_3d_isvalid']] for info in infos]
    assert [(e['image_idx'], e['gt_idx']) for e in entries] == [
        (s, i) for s, boxes in enumerate(valid) for i in range(len(boxes))]
    assert len(entries) > 100
    for e in entries:
        assert list(e) == KEYS
        assert isinstance(e['image_idx'], int) and isinstance(e['gt_idx'], int)
        assert isinstance(e['num_points_in_gt'], int) and e['difficulty'] == 0
        assert e['path'] == f"nuscenes_gt_database/{e['image_idx']}_{e['name']}_{e['gt_idx']}.bin"
        inst = valid[e['image_idx']][e['gt_idx']]
        assert e['name'] == CLASSES[inst['bbox_label_3d']]
        box = e['box3d_lidar']
        assert isinstance(box, np.ndarray) and box.dtype == np.float32 and box.shape == (9,)
        x, y, z, l, w, h, yaw = inst['bbox_3d']
        # The bottom centre, as NuScenesDataset's LiDAR boxes; NaN velocities become 0.
        np.testing.assert_allclose(box[:7], [x, y, z - h / 2, l, w, h, yaw], atol=1e-5)
        np.testing.assert_allclose(box[7:], np.nan_to_num(inst['velocity']), atol=1e-6)


def test_object_files_hold_the_points_in_their_box(tiny):
    infos = _load(osp.join(tiny, 'nuscenes_infos_train.pkl'))['data_list']
    total = 0
    for e in _entries(tiny):
        points = np.fromfile(osp.join(tiny, e['path']), np.float32).reshape(-1, 5)
        assert len(points) == e['num_points_in_gt']
        total += len(points)
        l, w, h, yaw = e['box3d_lidar'][3:7]
        local_x = np.cos(yaw) * points[:, 0] + np.sin(yaw) * points[:, 1]
        local_y = -np.sin(yaw) * points[:, 0] + np.cos(yaw) * points[:, 1]
        # Shifted to the box's bottom centre: inside the box around the origin.
        assert (np.abs(local_x) < l / 2).all() and (np.abs(local_y) < w / 2).all()
        assert ((points[:, 2] > 0) & (points[:, 2] < h)).all()
        # Fifth column: 0 on the keyframe, the time lag (s) on sweeps.
        lags = {0.0} | {np.float32(infos[e['image_idx']]['timestamp'] - s['timestamp'])
                        for s in infos[e['image_idx']]['lidar_sweeps']}
        assert set(points[:, 4].tolist()) <= lags
    # Every point of the sample that lies in the box is there (none is left out).
    cloud = load_points(tiny, infos[1])
    for e in (e for e in _entries(tiny) if e['image_idx'] == 1):
        points = np.fromfile(osp.join(tiny, e['path']), np.float32).reshape(-1, 5)
        points[:, :3] += e['box3d_lidar'][:3]
        offset = cloud[:, :3] - e['box3d_lidar'][:3]
        l, w, h, yaw = e['box3d_lidar'][3:7]
        inside = ((np.abs(np.cos(yaw) * offset[:, 0] + np.sin(yaw) * offset[:, 1]) < l / 2)
                  & (np.abs(-np.sin(yaw) * offset[:, 0] + np.cos(yaw) * offset[:, 1]) < w / 2)
                  & (offset[:, 2] > 0) & (offset[:, 2] < h))
        np.testing.assert_allclose(points, cloud[inside], atol=1e-5)
    assert total > 5000


def test_points_load_as_mmdet3d_loads_them(tiny):
    """load_points equals mmdet3d 1.4's LoadPointsFromFile + LoadPointsFromMultiSweeps as the
    converter configures them, with sweeps and without (the keyframe repeated)."""
    from mmdet3d.datasets.transforms import LoadPointsFromFile, LoadPointsFromMultiSweeps

    info = _load(osp.join(tiny, 'nuscenes_infos_train.pkl'))['data_list'][2]
    no_sweeps = {k: v for k, v in info.items() if k != 'lidar_sweeps'}
    for case in (info, no_sweeps):
        results = copy.deepcopy(case)
        results['lidar_points']['lidar_path'] = osp.join(tiny, 'samples', 'LIDAR_TOP',
                                                         case['lidar_points']['lidar_path'])
        for sweep in results.get('lidar_sweeps', []):
            sweep['lidar_points']['lidar_path'] = osp.join(tiny, sweep['lidar_points'][
                'lidar_path'])
        results = LoadPointsFromFile('LIDAR', load_dim=5, use_dim=5)(results)
        results = LoadPointsFromMultiSweeps(sweeps_num=10, use_dim=[0, 1, 2, 3, 4],
                                            pad_empty_sweeps=True, remove_close=True)(results)
        ours = load_points(tiny, case)
        np.testing.assert_array_equal(ours, results['points'].numpy())
    keyframe = np.fromfile(results['lidar_points']['lidar_path'], np.float32).reshape(-1, 5)
    assert len(ours) > 10 * len(keyframe)  # padded with 10 copies (less the close points)


def test_same_files_as_mmdet3d_converter(tiny, tmp_path):
    """mmdet3d 1.4's own create_groundtruth_database, run on a copy of the dataset, writes the
    same entries and the same object files, byte for byte."""
    path = _mim('tools', 'dataset_converters', 'create_gt_database.py')
    if not osp.isfile(path):
        pytest.skip('this mmdet3d install does not ship tools/ in .mim')
    from mmdet3d.utils import register_all_modules

    register_all_modules()
    spec = importlib.util.spec_from_file_location('mmdet3d_create_gt_database', path)
    converter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter)
    theirs = str(tmp_path / 'nuscenes')
    os.makedirs(theirs)
    for name in ('samples', 'sweeps', 'nuscenes_infos_train.pkl'):
        os.symlink(osp.join(tiny, name), osp.join(theirs, name))
    converter.create_groundtruth_database('NuScenesDataset', theirs, 'nuscenes',
                                          'nuscenes_infos_train.pkl')
    mine = _load(osp.join(tiny, 'nuscenes_dbinfos_train.pkl'))
    ref = _load(osp.join(theirs, 'nuscenes_dbinfos_train.pkl'))
    assert list(mine) == list(ref)
    for name in ref:
        assert len(mine[name]) == len(ref[name])
        for a, b in zip(mine[name], ref[name]):
            assert list(a) == list(b)
            for key in b:
                if key == 'box3d_lidar':
                    assert a[key].dtype == b[key].dtype
                    np.testing.assert_array_equal(a[key], b[key])
                else:
                    assert a[key] == b[key], key
            with open(osp.join(tiny, a['path']), 'rb') as f, \
                    open(osp.join(theirs, b['path']), 'rb') as g:
                assert f.read() == g.read(), a['path']


@pytest.mark.parametrize('config', CENTERPOINT)
def test_centerpoint_config_pastes_objects(tiny, tmp_path, monkeypatch, config):
    """mmdet3d's CenterPoint config, unmodified, with the dataset at its data/nuscenes/: the
    training dataset builds, ObjectSample pastes database objects, the pipeline packs."""
    from mmdet3d.registry import DATASETS
    from mmdet3d.structures.ops import box_np_ops
    from mmdet3d.utils import register_all_modules
    from mmengine.config import Config

    register_all_modules()
    cfg = Config.fromfile(_mim('configs', config))
    assert cfg.db_sampler.info_path == 'data/nuscenes/nuscenes_dbinfos_train.pkl'
    os.makedirs(tmp_path / 'data')
    os.symlink(tiny, tmp_path / 'data' / 'nuscenes')
    monkeypatch.chdir(tmp_path)
    np.random.seed(0)  # the sampler shuffles when it is built
    dataset = DATASETS.build(copy.deepcopy(cfg.train_dataloader.dataset))  # CBGSDataset
    inner = dataset.dataset
    transforms = inner.pipeline.transforms
    sample = [type(t).__name__ for t in transforms].index('ObjectSample')
    database = {}  # box -> entries (a vehicle keeping its place in the lidar frame has several)
    for e in _entries(tiny):
        database.setdefault(tuple(e['box3d_lidar'].tolist()), []).append(e)
    pasted = 0
    for index in range(len(inner)):
        results = inner.get_data_info(index)
        for transform in transforms[:sample]:
            results = transform(results)
        before = len(results['gt_labels_3d'])
        results = transforms[sample](results)
        boxes = results['gt_bboxes_3d'].numpy()[before:]
        labels = results['gt_labels_3d'][before:]
        inside = box_np_ops.points_in_rbbox(results['points'].numpy(), boxes).sum(0)
        keys = [tuple(box.tolist()) for box in boxes]
        for key, label, count in zip(keys, labels, inside):
            entries = database[key]  # boxes of the database, moved nowhere
            assert {e['name'] for e in entries} == {cfg.class_names[label]}
            if keys.count(key) == 1:  # mmdet3d's collision test lets equal boxes overlap
                # Its points, and only those: the scene's points in the box were removed.
                assert count in {e['num_points_in_gt'] for e in entries} and count >= 5
        pasted += len(boxes)
    assert pasted >= 5
    packed = dataset[0]
    assert packed['inputs']['points'].shape[1] == 5
    assert len(packed['data_samples'].gt_instances_3d) > 0


def test_gt_database_can_be_turned_off(tmp_path):
    options = dict(scenes=1, frames=1, seed=0, workers=1, image_size=(64, 36), points=500,
                   sweeps=0, val_scenes=0, progress=False)
    summary = generate(str(tmp_path / 'off'), gt_database=False, **options)
    assert summary['gt_database'] is None and summary['bytes']['gt_database'] == 0
    assert not osp.exists(tmp_path / 'off' / 'nuscenes_dbinfos_train.pkl')
    assert not osp.exists(tmp_path / 'off' / 'nuscenes_gt_database')
    summary = generate(str(tmp_path / 'on'), **options)
    assert osp.isfile(summary['gt_database']['dbinfos'])
    assert summary['gt_database']['files'] == len(os.listdir(tmp_path / 'on' /
                                                             'nuscenes_gt_database'))
    shutil.rmtree(tmp_path / 'on')
