"""SparseDrive's k-means anchors (turbox_mm/models/sparsedrive/anchors.py) and their command
line (tools/sparsedrive_anchors.py): upstream's recipes (tools/kmeans/*.py @ ffebeb4) on
hand-made infos, where every number can be checked by hand, and on the tiny synthetic
dataset (one 14-frame scene, so that agents have complete 12-step futures).
"""
import math
import os
import os.path as osp
import pickle

import numpy as np
import pytest

from tools import sparsedrive_anchors as cli
from turbox_mm.models.sparsedrive.anchors import (DET_CLASSES, TooFewSamplesError,
                                                  agent_trajectories, anchors_for,
                                                  det_anchors, det_centres, ego_trajectories,
                                                  load_infos, map_anchors, map_centres,
                                                  motion_anchors, plan_anchors,
                                                  to_agent_frame)

# mmdet3d's nuScenes label order, as our infos' metainfo['categories'] holds it.
MMDET3D_CATEGORIES = {name: i for i, name in enumerate(
    ('car', 'truck', 'trailer', 'bus', 'construction_vehicle', 'bicycle', 'motorcycle',
     'pedestrian', 'traffic_cone', 'barrier'))}


@pytest.fixture(scope='module')
def synthetic_infos(tmp_path_factory):
    """The synthetic generator's train infos (the generator behind ``tools/create_data.py
    synthetic`` and conftest's ``make_tiny_synthetic``, called in-process with tiny images
    to keep this file fast): one scene of 14 keyframes."""
    from turbox_mm.datasets.synthetic import generate
    root = str(tmp_path_factory.mktemp('sd_synth'))
    summary = generate(root, scenes=1, frames=14, image_size=(64, 36), points=200, sweeps=0,
                       val_scenes=0, workers=1, gt_database=False, progress=False)
    return summary['info_files']['train']


def _instance(x, y, label, yaw=0.0, traj=None, mask=None, valid=True):
    traj = np.zeros((12, 2)) if traj is None else np.asarray(traj, float)
    mask = np.ones(12) if mask is None else np.asarray(mask, float)
    return dict(bbox_3d=[x, y, 0.5, 4.0, 2.0, 1.5, yaw], bbox_label_3d=label,
                bbox_3d_isvalid=valid, fut_traj=traj.tolist(), fut_mask=mask.tolist())


def _infos(samples):
    return dict(metainfo=dict(categories=MMDET3D_CATEGORIES), data_list=samples)


def test_class_order_and_defaults_agree_with_their_twins():
    from turbox_mm.datasets.sparse4d_dataset import SPARSE4D_CLASSES
    from turbox_mm.models.sparsedrive.anchors import DEFAULT_NUM
    assert DET_CLASSES == SPARSE4D_CLASSES
    assert cli.DEFAULT_NUM == DEFAULT_NUM == dict(det=900, map=100, motion=6, plan=6)


# -- det ------------------------------------------------------------------------------------

def test_det_centres_use_every_box_within_55m_bev():
    samples = [dict(token='a', timestamp=2.0, instances=[
        _instance(54.9, 0.0, 0), _instance(55.0, 0.0, 0),      # strict: 55 m is out
        _instance(30.0, 40.0, 1),                               # 50 m in BEV
        _instance(0.0, 1.0, -1, valid=False)]),                 # other class, no points: in
        dict(token='b', timestamp=1.0, instances=[_instance(3.0, -4.0, 9)])]
    infos = load_infos(_infos(samples))
    assert [s['token'] for s in infos['data_list']] == ['b', 'a']  # timestamp order
    np.testing.assert_array_equal(det_centres(infos), [[3., -4., .5], [54.9, 0., .5],
                                                       [30., 40., .5], [0., 1., .5]])
    # z plays no part: a box 100 m up is kept.
    far_up = load_infos(_infos([dict(instances=[_instance(1.0, 1.0, 0)])]))
    far_up['data_list'][0]['instances'][0]['bbox_3d'][2] = 100.0
    assert len(det_centres(far_up)) == 1


def test_det_anchors_slots_and_centres():
    rng = np.random.default_rng(0)
    blobs = np.array([[10., 0., 0.], [-20., 5., 1.], [0., 30., -1.]])
    centres = np.concatenate([b + rng.normal(0, 0.1, (20, 3)) for b in blobs])
    anchors = det_anchors(centres, num=3)
    assert anchors.shape == (3, 11) and anchors.dtype == np.float32
    # Upstream's constants: log sizes 1, sin 1, cos 0, no velocity.
    np.testing.assert_array_equal(anchors[:, 3:], [[1, 1, 1, 1, 0, 0, 0, 0]] * 3)
    # Three well separated blobs: the centres are the blob means.
    order = np.argsort(anchors[:, 0])
    want = np.stack([centres[20 * i:20 * (i + 1)].mean(0) for i in (1, 2, 0)])
    np.testing.assert_allclose(anchors[order, :3], want, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(anchors, det_anchors(centres, num=3))  # seeded
    with pytest.raises(TooFewSamplesError, match='60 box centres, fewer than the 900'):
        det_anchors(centres)


# -- map ------------------------------------------------------------------------------------

def test_map_centres_are_mean_vertices_in_sparsedrives_class_order():
    named = dict(token='t', map_annos={
        'divider': [[[0., 0.], [2., 0.], [4., 6.]]],
        'ped_crossing': [[[1., 1.], [3., 1.], [3., 3.], [1., 3.], [1., 1.]]],  # closed ring
        'boundary': [[[-5., -5.], [-5., 5.]]]})
    got = map_centres(load_infos(_infos([named])))
    # ped_crossing first (the repeated closing vertex counts, as upstream's mean does).
    np.testing.assert_allclose(got, [[1.8, 1.8], [2., 2.], [-5., 0.]])
    by_int = dict(token='t', map_annos={2: [[[-5., -5.], [-5., 5.]]], 0: [[[0., 0.]]],
                                        1: []})
    np.testing.assert_allclose(map_centres(load_infos(_infos([by_int]))),
                               [[0., 0.], [-5., 0.]])
    with pytest.raises(ValueError, match=r"map_annos\['divider'\] polyline must be"):
        map_centres(load_infos(_infos([dict(token='t', map_annos={'divider': [[]]})])))
    with pytest.raises(KeyError, match="no 'map_annos'"):
        map_centres(load_infos(_infos([dict(token='t')])))


def test_map_anchors_are_vertical_20_point_segments():
    centres = np.array([[0., 0.], [10., -20.], [-12., 25.]])
    anchors = map_anchors(centres, num=3)  # as many clusters as points: the points
    assert anchors.shape == (3, 20, 2) and anchors.dtype == np.float32
    order = np.argsort(anchors[:, 0, 0])
    for anchor, (cx, cy) in zip(anchors[order], centres[np.argsort(centres[:, 0])]):
        np.testing.assert_allclose(anchor[:, 0], cx)
        np.testing.assert_allclose(anchor[:, 1], cy + np.linspace(-4, 4, 20), atol=1e-5)
        np.testing.assert_allclose(np.diff(anchor[:, 1]), 8 / 19, rtol=1e-5)


# -- motion ---------------------------------------------------------------------------------

def test_to_agent_frame_by_hand():
    # Heading +y (yaw 90 deg), moving 1 m per step along +y: straight ahead in its frame.
    steps = np.tile([[0., 1.]], (12, 1))[None]
    np.testing.assert_allclose(to_agent_frame(steps, np.array([math.pi / 2])),
                               np.stack([np.arange(1, 13), np.zeros(12)], -1)[None],
                               atol=1e-12)
    # Heading 45 deg, steps (1, 1): sqrt(2) per step ahead; then a step (1, -1), at right
    # angles to its right: position (3, 1) is 2 sqrt(2) ahead and sqrt(2) to the right.
    out = to_agent_frame(np.array([[[1., 1.], [1., 1.], [1., -1.]]]), np.array([math.pi / 4]))
    r2 = math.sqrt(2)
    np.testing.assert_allclose(out[0], [[r2, 0.], [2 * r2, 0.], [2 * r2, -r2]], atol=1e-12)
    # Random: rotating back by +yaw gives the cumulative sums.
    rng = np.random.default_rng(0)
    offsets, yaw = rng.normal(size=(5, 12, 2)), rng.uniform(-3, 3, 5)
    agent = to_agent_frame(offsets, yaw)
    c, s = np.cos(yaw)[:, None], np.sin(yaw)[:, None]
    back = np.stack([agent[..., 0] * c - agent[..., 1] * s,
                     agent[..., 0] * s + agent[..., 1] * c], -1)
    np.testing.assert_allclose(back, np.cumsum(offsets, axis=1), atol=1e-12)


def test_agent_trajectories_filter_and_map_labels_by_name():
    turn = np.zeros((12, 2))
    turn[:, 1] = 1.0  # +y steps
    partial = np.ones(12)
    partial[-1] = 0
    samples = [dict(token='s', instances=[
        _instance(5., 5., MMDET3D_CATEGORIES['car'], yaw=math.pi / 2, traj=turn),
        _instance(5., 5., MMDET3D_CATEGORIES['construction_vehicle'], traj=turn),
        _instance(5., 5., MMDET3D_CATEGORIES['barrier'], traj=turn, mask=partial),  # out
        _instance(60., 0., MMDET3D_CATEGORIES['car'], traj=turn),                    # out
        _instance(1., 1., -1, traj=turn)])]                                         # out
    groups = agent_trajectories(load_infos(_infos(samples)))
    assert [len(g) for g in groups] == [1, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    # Sparse4D's index 2 is construction_vehicle (mmdet3d's label 4).
    np.testing.assert_allclose(groups[0][0], np.stack([np.arange(1, 13), np.zeros(12)], -1),
                               atol=1e-12)
    np.testing.assert_allclose(groups[2][0], np.stack([np.zeros(12), np.arange(1, 13)], -1),
                               atol=1e-12)
    no_future = _infos([dict(token='s', instances=[dict(bbox_3d=[0.] * 7, bbox_label_3d=0)])])
    with pytest.raises(KeyError, match="sample s: an instance has no 'fut_traj'"):
        agent_trajectories(load_infos(no_future))
    with pytest.raises(KeyError, match="'categories'"):
        agent_trajectories(load_infos(dict(data_list=samples)))


def _groups(counts, steps=12, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(n, steps, 2)) * 5 for n in counts]


def test_motion_anchors_policies():
    groups = _groups([6, 7, 3, 0, 6, 6, 6, 6, 6, 6])
    with pytest.raises(TooFewSamplesError,
                       match='construction_vehicle: 3, bus: 0 \\(total 52\\)'):
        motion_anchors(groups)
    pooled = motion_anchors(groups, short='pool')
    assert pooled.shape == (10, 6, 12, 2) and pooled.dtype == np.float32
    # Exactly 6 trajectories: the anchors are those trajectories (in some order).
    np.testing.assert_allclose(np.sort(pooled[0].reshape(6, -1), axis=0),
                               np.sort(groups[0].reshape(6, -1), axis=0), atol=1e-5)
    # Short classes get the clusters of every class's trajectories together.
    everything = np.concatenate([g.reshape(len(g), 24) for g in groups])
    from turbox_mm.models.sparsedrive.anchors import kmeans
    want = kmeans(everything, 6).reshape(6, 12, 2)
    np.testing.assert_allclose(pooled[2], want, atol=1e-5)
    np.testing.assert_array_equal(pooled[2], pooled[3])
    # Upstream's skip: the short classes vanish and later classes move up.
    skipped = motion_anchors(groups, short='skip')
    assert skipped.shape == (8, 6, 12, 2)
    np.testing.assert_array_equal(skipped[2], pooled[4])
    with pytest.raises(ValueError, match='short must be one of'):
        motion_anchors(groups, short='fill')


# -- plan -----------------------------------------------------------------------------------

def _ego(offsets, mask, command):
    return dict(token='e', gt_ego_fut_trajs=np.asarray(offsets).tolist(),
                gt_ego_fut_masks=list(mask), gt_ego_fut_cmd=list(command))


def test_ego_trajectories_cumsum_and_group_by_command():
    right = np.tile([[0.5, 1.0]], (6, 1))
    samples = [_ego(right, [1] * 6, [1., 0., 0.]),
               _ego(right * 2, [1] * 6, [0., 0., 1.]),
               _ego(right, [1] * 5 + [0], [0., 1., 0.])]  # incomplete: left out
    groups = ego_trajectories(load_infos(_infos(samples)))
    assert [len(g) for g in groups] == [1, 0, 1]
    np.testing.assert_allclose(groups[0][0], np.stack([0.5 * np.arange(1, 7),
                                                       np.arange(1, 7)], -1))
    np.testing.assert_allclose(groups[2][0], 2 * groups[0][0])
    with pytest.raises(ValueError, match=r'must be \[6, 2\] / \[6\] / \[3\]'):
        ego_trajectories(load_infos(_infos([_ego(right, [1] * 6, [0., 1.])])))
    bad = _ego(right, [1] * 6, [1., 0., 0.])
    del bad['gt_ego_fut_cmd']
    with pytest.raises(KeyError, match="no 'gt_ego_fut_cmd'"):
        ego_trajectories(load_infos(_infos([bad])))


def test_plan_anchors_policies():
    groups = _groups([6, 2, 9], steps=6)
    with pytest.raises(TooFewSamplesError, match='left: 2'):
        plan_anchors(groups)
    anchors = plan_anchors(groups, short='pool')
    assert anchors.shape == (3, 6, 6, 2) and anchors.dtype == np.float32
    np.testing.assert_allclose(np.sort(anchors[0].reshape(6, -1), axis=0),
                               np.sort(groups[0].reshape(6, -1), axis=0), atol=1e-5)
    with pytest.raises(ValueError, match='short must be one of'):
        plan_anchors(groups, short='skip')  # would shift commands; upstream crashes instead


# -- the synthetic infos ----------------------------------------------------------------------

def test_synthetic_motion_futures_point_along_the_heading(synthetic_infos):
    """The synthetic cars drive along their heading, so in the agent frame their futures run
    along +x: the rotation by minus the yaw is the right way round."""
    groups = agent_trajectories(load_infos(synthetic_infos))
    cars = groups[0]
    assert len(cars) > 0
    end = cars[:, -1]
    moving = np.linalg.norm(end, axis=1) > 5.0
    assert moving.any()
    assert (end[moving, 0] > 0).all()
    assert (np.abs(end[moving, 1]) < 0.2 * end[moving, 0]).all()
    ego = ego_trajectories(load_infos(synthetic_infos))
    straight = ego[2]
    assert len(straight) > 0 and (straight[:, -1, 1] > 0).all()  # lidar y is forward


@pytest.mark.parametrize('task, num, shape', [('det', 8, (8, 11)), ('map', 8, (8, 20, 2)),
                                              ('motion', 2, (10, 2, 12, 2)),
                                              ('plan', 2, (3, 2, 6, 2))])
def test_cli_writes_each_task(synthetic_infos, tmp_path, capsys, task, num, shape):
    out = tmp_path / 'sub' / f'{task}_anchors'  # no suffix: .npy is added, folder created
    argv = [task, synthetic_infos, '--out', str(out), '--num', str(num), '--n-init', '2']
    if task in ('motion', 'plan'):
        argv += ['--short', 'pool']
    assert cli.main(argv) == 0
    written = f'{out}.npy'
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == osp.abspath(written)
    assert f'anchors {list(shape)} float32' in lines[-2]
    anchors = np.load(written)
    assert anchors.shape == shape and anchors.dtype == np.float32
    want, _ = anchors_for(task, synthetic_infos, num, seed=0, n_init=2, short='pool')
    np.testing.assert_array_equal(anchors, want)
    assert os.listdir(tmp_path / 'sub') == [f'{task}_anchors.npy']  # no temporary left
    if task == 'det':
        np.testing.assert_array_equal(anchors[:, 3:], [[1, 1, 1, 1, 0, 0, 0, 0]] * num)
    if task == 'map':
        np.testing.assert_allclose(anchors[:, :, 0], anchors[:, :1, 0].repeat(20, 1))


def test_cli_default_path_and_errors_leave_the_old_file(synthetic_infos, tmp_path, capsys,
                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(['det', synthetic_infos, '--num', '4', '--n-init', '1']) == 0
    default = tmp_path / 'data' / 'kmeans' / 'kmeans_det_4.npy'
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(default)
    before = default.read_bytes()
    # Too few samples: a named error, exit without a traceback, the old file untouched.
    with pytest.raises(SystemExit, match='motion: fewer samples than the 6 clusters in truck: 2, '):
        cli.main(['motion', synthetic_infos, '--out', str(default)])
    # A failure while writing: the rename never happens.

    def broken_save(f, array):
        f.write(b'partial')
        raise OSError('disk full')

    monkeypatch.setattr(cli.np, 'save', broken_save)
    with pytest.raises(OSError, match='disk full'):
        cli.main(['det', synthetic_infos, '--out', str(default), '--num', '4', '--n-init', '1'])
    assert default.read_bytes() == before
    assert os.listdir(default.parent) == ['kmeans_det_4.npy']
    with pytest.raises(SystemExit, match='info file not found'):
        cli.main(['det', str(tmp_path / 'nope.pkl')])


def test_load_infos_needs_data_list(tmp_path):
    path = tmp_path / 'v1.pkl'
    path.write_bytes(pickle.dumps(dict(infos=[])))
    with pytest.raises(KeyError, match='v1.pkl: no data_list'):
        load_infos(str(path))
    with pytest.raises(ValueError, match='task must be one of'):
        anchors_for('lane', _infos([]))
