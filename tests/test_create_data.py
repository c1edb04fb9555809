"""The synthetic nuScenes dataset: layout, info format, loaders, geometry and determinism.

One tiny dataset (2 scenes x 3 keyframes, real 1600x900 images, 34k-point sweeps, 10 sweeps a
sample) is generated once per module and read the way training reads real nuScenes: through
mmdet3d's NuScenesDataset and loading transforms, the nuScenes devkit, NuScenesMetric, and
mmdet3d's own converter (whose infos, built from our tables, must equal ours).
"""
import hashlib
import os
import os.path as osp
import pickle

import numpy as np
import pytest
import torch

from conftest import run_python
from turbox_mm.datasets.synthetic import (ALL_FIELDS, MMDET3D_FIELDS, SWEEP_FIELDS,
                                          TEMPORAL_FIELDS, InfoFileError, check_infos, generate)

CAMERAS = ('CAM_FRONT', 'CAM_FRONT_RIGHT', 'CAM_FRONT_LEFT', 'CAM_BACK', 'CAM_BACK_LEFT',
           'CAM_BACK_RIGHT')
CLASSES = ('car', 'truck', 'trailer', 'bus', 'construction_vehicle', 'bicycle', 'motorcycle',
           'pedestrian', 'traffic_cone', 'barrier')


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('synth') / 'nuscenes')
    summary = generate(root, scenes=2, frames=3, seed=0, workers=2, sweeps=10, progress=False)
    return root, summary


def load(root, split='train'):
    with open(osp.join(root, f'nuscenes_infos_{split}.pkl'), 'rb') as f:
        return pickle.load(f)


def all_infos(root):
    return load(root, 'train')['data_list'] + load(root, 'val')['data_list']


def test_layout_and_file_contents(dataset):
    import cv2

    root, summary = dataset
    assert summary['samples'] == {'train': 3, 'val': 3}
    spread = []
    for cam in CAMERAS:
        files = sorted(os.listdir(osp.join(root, 'samples', cam)))
        assert len(files) == 6 and all(f.endswith('.jpg') and f'__{cam}__' in f for f in files)
        for name in files:
            image = cv2.imread(osp.join(root, 'samples', cam, name))
            assert image.shape == (900, 1600, 3)
            spread.append(image.std())
    assert min(spread) > 3 and np.mean(spread) > 25  # textured, not flat colours
    sizes = [os.path.getsize(osp.join(root, 'samples', 'CAM_FRONT', f))
             for f in os.listdir(osp.join(root, 'samples', 'CAM_FRONT'))]
    assert 100e3 < np.mean(sizes) < 600e3  # nuScenes JPEGs are a few hundred kB
    # 10 pre-roll sweeps, then 9 between keyframes: 10 + 9 + 9 per scene.
    assert len(os.listdir(osp.join(root, 'sweeps', 'LIDAR_TOP'))) == 2 * 28
    lidar = sorted(os.listdir(osp.join(root, 'samples', 'LIDAR_TOP')))
    assert len(lidar) == 6
    points = np.fromfile(osp.join(root, 'samples', 'LIDAR_TOP', lidar[0]), np.float32)
    points = points.reshape(-1, 5)
    assert 30000 < len(points) < 38000
    assert set(np.unique(points[:, 4])) <= set(range(32))  # ring index
    assert 0 <= points[:, 3].min() and points[:, 3].max() <= 255  # intensity
    assert np.linalg.norm(points[:, :2], axis=1).max() < 76
    for table in ('scene', 'sample', 'sample_data', 'sample_annotation', 'instance', 'ego_pose',
                  'calibrated_sensor', 'sensor', 'log', 'map', 'category', 'attribute',
                  'visibility'):
        assert osp.isfile(osp.join(root, 'v1.0-trainval', f'{table}.json'))


def test_info_format(dataset):
    root, _ = dataset
    infos = check_infos(osp.join(root, 'nuscenes_infos_train.pkl'), ALL_FIELDS + SWEEP_FIELDS)
    meta = infos['metainfo']
    assert meta['categories'] == {name: i for i, name in enumerate(CLASSES)}
    assert (meta['dataset'], meta['version'], meta['info_version']) == (
        'nuscenes', 'v1.0-trainval', '1.1')
    data = infos['data_list']
    assert [d['sample_idx'] for d in data] == [0, 1, 2]
    assert [d['frame_idx'] for d in data] == [0, 1, 2]
    assert data[0]['prev'] == '' and data[0]['next'] == data[1]['token']
    assert data[2]['next'] == '' and data[2]['prev'] == data[1]['token']
    assert abs(data[1]['timestamp'] - data[0]['timestamp'] - 0.5) < 1e-6  # seconds, 2 Hz
    for info in data:
        assert list(info['images']) == list(CAMERAS)
        assert np.asarray(info['images']['CAM_FRONT']['cam2img']).shape == (3, 3)
        assert np.asarray(info['images']['CAM_FRONT']['lidar2cam']).shape == (4, 4)
        assert info['lidar_points']['num_pts_feats'] == 5
        sweeps = info['lidar_sweeps']
        assert len(sweeps) == 10
        assert all(s['timestamp'] < info['timestamp'] for s in sweeps)
        folders = [s['lidar_points']['lidar_path'].split('/')[0] for s in sweeps]
        # Newest first; the tenth sweep back is the previous keyframe, in samples/.
        assert folders == ['sweeps'] * 9 + ['samples' if info['frame_idx'] else 'sweeps']
        assert len(info['instances']) > 10
        for inst in info['instances']:
            assert len(inst['bbox_3d']) == 7 and len(inst['velocity']) == 2
            assert 0 <= inst['bbox_label_3d'] < 10
            assert np.asarray(inst['fut_traj']).shape == (12, 2) and len(inst['fut_mask']) == 12
        assert len(info['can_bus']) == 18 and len(info['ego_status']) == 10
        assert np.asarray(info['gt_ego_fut_trajs']).shape == (6, 2)
        assert sorted(info['gt_ego_fut_cmd']) == [0.0, 0.0, 1.0]
        assert set(info['map_annos']) == {'divider', 'ped_crossing', 'boundary'}
        assert len(info['map_annos']['divider']) >= 5 and len(info['map_annos']['boundary']) >= 2
        for polylines in info['map_annos'].values():
            for line in polylines:
                xy = np.asarray(line)
                assert xy.shape[1] == 2 and (np.abs(xy) <= [15.01, 30.01]).all()
    # The last sample of a scene has no ego future; its instances no agent future.
    assert data[2]['gt_ego_fut_masks'] == [0.0] * 6
    assert data[0]['gt_ego_fut_masks'] == [1.0, 1.0] + [0.0] * 4
    assert all(sum(i['fut_mask']) == 0 for i in data[2]['instances'])
    # Futures agree with the next sample: an agent's first offset leads to its next position.
    nxt = {i['instance_id']: i for i in data[1]['instances']}
    lidar1_in_0 = (np.linalg.inv(_lidar2global(data[0])) @ _lidar2global(data[1]))
    for inst in data[0]['instances']:
        if inst['fut_mask'][0] and inst['instance_id'] in nxt:
            expected = lidar1_in_0[:3, :3] @ nxt[inst['instance_id']]['bbox_3d'][:3] \
                + lidar1_in_0[:3, 3]
            moved = np.asarray(inst['bbox_3d'][:2]) + inst['fut_traj'][0]
            np.testing.assert_allclose(moved, expected[:2], atol=1e-6)


def _lidar2global(info):
    return np.asarray(info['ego2global']) @ np.asarray(info['lidar_points']['lidar2ego'])


def test_mmdet3d_nuscenes_dataset_loads_it(dataset):
    from mmdet3d.datasets import NuScenesDataset
    from mmdet3d.utils import register_all_modules

    register_all_modules()
    root, _ = dataset
    prefix = dict(pts='samples/LIDAR_TOP', sweeps='sweeps/LIDAR_TOP',
                  **{cam: f'samples/{cam}' for cam in CAMERAS})
    pipeline = [
        dict(type='LoadPointsFromFile', coord_type='LIDAR', load_dim=5, use_dim=5),
        dict(type='LoadPointsFromMultiSweeps', sweeps_num=10),
        dict(type='LoadMultiViewImageFromFiles', to_float32=True, num_views=6),
        dict(type='LoadAnnotations3D', with_bbox_3d=True, with_label_3d=True),
        dict(type='Pack3DDetInputs', keys=['points', 'img', 'gt_bboxes_3d', 'gt_labels_3d']),
    ]
    ds = NuScenesDataset(root, 'nuscenes_infos_train.pkl', pipeline=pipeline,
                         data_prefix=prefix, modality=dict(use_lidar=True, use_camera=True))
    assert len(ds) == 3
    sample = ds[1]
    points = sample['inputs']['points']
    assert points.shape[1] == 4 and 11 * 30000 < len(points) < 11 * 38000
    assert sample['inputs']['img'].shape == (6, 3, 900, 1600)
    gt = sample['data_samples'].gt_instances_3d
    assert gt.bboxes_3d.tensor.shape[1] == 9 and len(gt.labels_3d) > 10
    assert 0 <= int(gt.labels_3d.min()) and int(gt.labels_3d.max()) < 10


def test_lidar_points_lie_in_the_boxes(dataset):
    from mmcv.ops import points_in_boxes_cpu
    from mmdet3d.structures import LiDARInstance3DBoxes

    root, _ = dataset
    info = load(root)['data_list'][1]
    points = np.fromfile(osp.join(root, 'samples', 'LIDAR_TOP',
                                  info['lidar_points']['lidar_path']), np.float32)
    points = torch.from_numpy(points.reshape(-1, 5)[:, :3])
    boxes = LiDARInstance3DBoxes(np.array([i['bbox_3d'] for i in info['instances']]),
                                 origin=(0.5, 0.5, 0.5))
    inside = points_in_boxes_cpu(points[None], boxes.tensor[None].float())[0]  # (N, boxes)
    counts = inside.sum(0).numpy()
    expected = np.array([i['num_lidar_pts'] for i in info['instances']])
    assert expected.sum() > 2000  # objects are really hit
    np.testing.assert_allclose(counts, expected, atol=3, rtol=0.02)
    assert (expected > 0).mean() > 0.7


def test_boxes_project_into_the_cameras(dataset):
    from mmdet3d.structures import Box3DMode, CameraInstance3DBoxes, LiDARInstance3DBoxes

    root, _ = dataset
    info = load(root)['data_list'][0]
    seen = 0
    for inst in info['instances']:
        center = np.asarray(inst['bbox_3d'][:3])
        hits = []
        for cam, image in info['images'].items():
            cam_point = np.asarray(image['lidar2cam']) @ np.append(center, 1.0)
            if cam_point[2] <= 0.5:
                continue
            uv = np.asarray(image['cam2img']) @ cam_point[:3]
            uv = uv[:2] / uv[2]
            if 0 <= uv[0] < 1600 and 0 <= uv[1] < 900:
                hits.append((cam, uv))
        # Beyond the blind spots right beside and below the cameras, what the lidar sees a
        # camera sees.
        if inst['num_lidar_pts'] > 20 and np.linalg.norm(center[:2]) > 6:
            assert hits, f'box at {center} is in no camera'
        seen += bool(hits)
    assert seen > 0.8 * len(info['instances'])
    # cam_instances describe the same boxes: back in the lidar frame they match instances.
    for cam, found in info['cam_instances'].items():
        assert found, f'{cam} sees no box'
        cam2lidar = np.linalg.inv(np.asarray(info['images'][cam]['lidar2cam']))
        boxes = CameraInstance3DBoxes(np.array([f['bbox_3d'] for f in found]),
                                      origin=(0.5, 0.5, 0.5))
        back = boxes.convert_to(Box3DMode.LIDAR, cam2lidar, correct_yaw=True)
        lidar = LiDARInstance3DBoxes(np.array([i['bbox_3d'] for i in info['instances']]),
                                     origin=(0.5, 0.5, 0.5))
        # Camera boxes turn about the camera's y axis only, and the cameras are tilted by a
        # few tenths of a degree: centres agree to millimetres, not exactly.
        for box in back.tensor.numpy():
            center = box[:3] + [0, 0, box[5] / 2]  # back to the gravity centre
            match = np.linalg.norm(lidar.gravity_center.numpy() - center, axis=1).argmin()
            np.testing.assert_allclose(center, lidar.gravity_center.numpy()[match], atol=0.02)
            np.testing.assert_allclose(box[3:6], lidar.dims.numpy()[match], atol=1e-3)
            turn = (box[6] - lidar.yaw.numpy()[match] + np.pi) % (2 * np.pi) - np.pi
            assert abs(turn) < 0.01


def test_images_show_the_boxes(dataset):
    """Where a close, fully visible box projects, the image differs from the empty street."""
    from turbox_mm.datasets.synthetic.generator import Options, _sensors

    options = Options(scenes=2, frames=3, seed=0, sweeps=10)
    scene, _, renderer = _sensors(options, 0)
    root, _ = dataset
    info = load(root)['data_list'][0]
    camera = scene.cameras[0]
    t = scene.us_to_time(round(info['images']['CAM_FRONT']['timestamp'] * 1e6))
    boxes = scene.all_boxes(t)
    rng = np.random.default_rng(0)
    full = renderer.render(camera, scene.ego2global(t), boxes, rng).astype(int)
    static = {k: v[boxes['agent'] < 0] for k, v in boxes.items()}
    empty = renderer.render(camera, scene.ego2global(t), static,
                            np.random.default_rng(0)).astype(int)
    changed = []
    for found in info['cam_instances']['CAM_FRONT']:
        u, v = (int(round(c)) for c in found['center_2d'])
        if found['depth'] < 40 and 0 <= u < 1600 and 0 <= v < 900:
            changed.append(np.abs(full[v, u] - empty[v, u]).sum() > 30)
    assert changed and np.mean(changed) > 0.6


def test_devkit_reads_the_tables(dataset):
    from nuscenes import NuScenes
    from nuscenes.utils.splits import train, val

    root, _ = dataset
    nusc = NuScenes('v1.0-trainval', root, verbose=False)
    assert len(nusc.scene) == 2 and len(nusc.sample) == 6
    assert nusc.scene[0]['name'] in train and nusc.scene[1]['name'] in val
    info = load(root)['data_list'][1]
    sample = nusc.get('sample', info['token'])
    assert sorted(sample['data']) == sorted(('LIDAR_TOP',) + CAMERAS)
    path, boxes, _ = nusc.get_sample_data(sample['data']['LIDAR_TOP'])
    assert osp.basename(path) == info['lidar_points']['lidar_path'] and osp.isfile(path)
    assert len(boxes) == len(info['instances'])
    rotation = np.linalg.inv(_lidar2global(info))[:3, :3]
    for box, inst, token in zip(boxes, info['instances'], sample['anns']):
        l, w, h = inst['bbox_3d'][3:6]
        np.testing.assert_allclose(box.center, inst['bbox_3d'][:3], atol=1e-6)
        np.testing.assert_allclose(box.wlh, [w, l, h], atol=1e-6)
        assert abs(box.orientation.yaw_pitch_roll[0] - inst['bbox_3d'][6]) < 1e-6
        velocity = rotation @ nusc.box_velocity(token)
        np.testing.assert_allclose(velocity[:2], inst['velocity'], atol=1e-6)
        assert nusc.get('sample_annotation', token)['num_lidar_pts'] == inst['num_lidar_pts']
    for image in info['images'].values():
        assert nusc.get('sample_data', image['sample_data_token'])['is_key_frame']


def test_nuscenes_metric_scores_ground_truth_perfectly(dataset, tmp_path):
    from mmdet3d.evaluation.metrics import NuScenesMetric
    from mmdet3d.structures import LiDARInstance3DBoxes

    root, _ = dataset
    ann_file = osp.join(root, 'nuscenes_infos_val.pkl')
    metric = NuScenesMetric(data_root=root, ann_file=ann_file, metric='bbox',
                            jsonfile_prefix=str(tmp_path / 'results'))
    metric.dataset_meta = dict(classes=CLASSES, version='v1.0-trainval')
    samples, present = [], set()
    for info in load(root, 'val')['data_list']:
        inst = [i for i in info['instances'] if i['num_lidar_pts'] > 0]
        present |= {CLASSES[i['bbox_label_3d']] for i in inst}
        boxes = np.array([i['bbox_3d'] + list(np.nan_to_num(i['velocity'])) for i in inst])
        samples.append(dict(
            pred_instances_3d=dict(
                bboxes_3d=LiDARInstance3DBoxes(boxes.reshape(-1, 9), box_dim=9,
                                               origin=(0.5, 0.5, 0.5)),
                scores_3d=torch.ones(len(inst)),
                labels_3d=torch.tensor([i['bbox_label_3d'] for i in inst])),
            pred_instances=dict(), sample_idx=info['sample_idx']))
    metric.process({}, samples)
    result = metric.compute_metrics(metric.results)
    prefix = 'pred_instances_3d_NuScenes'
    for name in present:
        assert result[f'{prefix}/{name}_AP_dist_0.5'] == 1.0, name
        assert result[f'{prefix}/{name}_trans_err'] < 1e-3, name


def test_same_seed_same_bytes_any_workers(tmp_path):
    options = dict(scenes=1, frames=2, seed=3, image_size=(320, 180), points=2000, sweeps=2,
                   progress=False)
    generate(str(tmp_path / 'a'), workers=1, **options)
    generate(str(tmp_path / 'b'), workers=2, **options)
    generate(str(tmp_path / 'c'), workers=1, **dict(options, seed=4))

    def digests(root):
        out = {}
        for folder, _, files in os.walk(root):
            for name in files:
                path = osp.join(folder, name)
                with open(path, 'rb') as f:
                    out[osp.relpath(path, root)] = hashlib.sha1(f.read()).hexdigest()
        return out

    a, b, c = digests(tmp_path / 'a'), digests(tmp_path / 'b'), digests(tmp_path / 'c')
    assert len(a) > 20 and a == b
    assert a['nuscenes_infos_train.pkl'] != c['nuscenes_infos_train.pkl']


def test_ray_caster_numba_matches_numpy(monkeypatch):
    from turbox_mm.datasets.synthetic import lidar

    rng = np.random.default_rng(0)
    directions = rng.normal(size=(500, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    centers = rng.uniform(-20, 20, (30, 3)) * [1, 1, 0.1] + [0, 0, 1]
    halves = rng.uniform(0.2, 3, (30, 3))
    yaws = rng.uniform(-np.pi, np.pi, 30)
    origin = np.array([0.0, 0.0, 1.8])
    fast = lidar.cast_rays(origin, directions, centers, halves, yaws)
    monkeypatch.setenv('TURBOX_SYNTH_NO_NUMBA', '1')
    slow = lidar.cast_rays(origin, directions, centers, halves, yaws)
    np.testing.assert_array_equal(fast[1], slow[1])
    np.testing.assert_allclose(fast[0], slow[0])
    assert (fast[1] >= 0).sum() > 20 and (fast[1] == lidar.GROUND).sum() > 100


def test_check_infos_names_what_is_missing(tmp_path, dataset):
    root, _ = dataset
    infos = load(root)
    assert check_infos(infos, MMDET3D_FIELDS) is infos
    for info in infos['data_list'][1:]:
        del info['can_bus']
    del infos['data_list'][0]['images']['CAM_BACK']['cam2img']
    path = tmp_path / 'old_infos.pkl'
    with open(path, 'wb') as f:
        pickle.dump(infos, f)
    with pytest.raises(InfoFileError) as error:
        check_infos(str(path), MMDET3D_FIELDS + TEMPORAL_FIELDS)
    message = str(error.value)
    assert message.startswith('old_infos.pkl: 3 of 3 samples lack required fields')
    assert 'can_bus: missing in 2 samples, e.g. 1 (token ' in message
    assert 'images.*.cam2img: missing in 1 samples, e.g. 0 (token ' in message
    with open(path, 'wb') as f:
        pickle.dump(dict(infos=[], metadata=dict(version='v1.0-trainval')), f)
    with pytest.raises(InfoFileError, match='v1 info file.*update_infos_to_v2'):
        check_infos(str(path))
    with pytest.raises(InfoFileError, match='not found'):
        check_infos(str(tmp_path / 'nope.pkl'))


def test_check_command_refuses_a_truncated_info_file(tmp_path, dataset):
    import shutil
    root, _ = dataset
    good = osp.join(root, 'nuscenes_infos_train.pkl')
    bad = tmp_path / 'nuscenes_infos_train.pkl'
    data = open(good, 'rb').read()
    bad.write_bytes(data[:len(data) // 3])
    proc = run_python(['tools/create_data.py', 'check', good, str(bad)])
    assert proc.returncode == 2
    assert 'not a readable pickle' in proc.stderr and f'{bad} cannot be reused' in proc.stderr
    shutil.copy(good, bad)
    assert run_python(['tools/create_data.py', 'check', str(bad)]).returncode == 0
    assert not [n for n in os.listdir(root) if '.tmp' in n]  # atomic writes left nothing


def test_command_line_and_mmdet3d_converter_agree(tmp_path):
    """tools/create_data.py: the synthetic subcommand, then mmdet3d's own converter (through
    the nuscenes subcommand) rebuilds the same infos from our tables."""
    root = tmp_path / 'data' / 'nuscenes'
    proc = run_python(['tools/create_data.py', 'synthetic', '--out', str(root), '--scenes', '2',
                       '--frames', '2', '--version', 'v1.0-mini', '--points', '3000',
                       '--sweeps', '2', '--workers', '1', '--no-progress'])
    assert proc.returncode == 0, proc.stderr
    assert 'lidar sweeps' in proc.stdout and 'total' in proc.stdout
    ours = {split: load(str(root), split) for split in ('train', 'val')}
    proc = run_python(['tools/create_data.py', 'nuscenes', '--root-path', str(root),
                       '--version', 'v1.0-mini'])
    assert proc.returncode == 0 and 'create_data.py nuscenes' in proc.stdout
    proc = run_python(['tools/create_data.py', 'nuscenes', '--root-path', str(root),
                       '--version', 'v1.0-mini', '--max-sweeps', '2', '--run'], timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for split in ('train', 'val'):
        theirs = load(str(root), split)
        assert theirs['metainfo']['info_version'] == '1.1'
        for mine, ref in zip(ours[split]['data_list'], theirs['data_list'], strict=True):
            _assert_same_info(mine, ref)


def _assert_same_info(mine, ref):
    """Our info equals the converter's, up to its float32 casts and its cwd-relative paths."""
    assert mine['token'] == ref['token'] and mine['timestamp'] == ref['timestamp']
    np.testing.assert_allclose(mine['ego2global'], ref['ego2global'], atol=1e-4)
    assert mine['lidar_points']['lidar_path'] == ref['lidar_points']['lidar_path']
    np.testing.assert_allclose(mine['lidar_points']['lidar2ego'],
                               ref['lidar_points']['lidar2ego'], atol=1e-6)
    assert list(mine['images']) == list(ref['images'])
    for cam, image in mine['images'].items():
        for key in ('img_path', 'sample_data_token', 'timestamp'):
            assert image[key] == ref['images'][cam][key]
        for key in ('cam2img', 'cam2ego', 'lidar2cam'):
            np.testing.assert_allclose(image[key], ref['images'][cam][key], atol=1e-5)
    assert len(mine['lidar_sweeps']) == len(ref['lidar_sweeps'])
    for sweep, other in zip(mine['lidar_sweeps'], ref['lidar_sweeps']):
        assert sweep['sample_data_token'] == other['sample_data_token']
        assert osp.basename(sweep['lidar_points']['lidar_path']) == osp.basename(
            other['lidar_points']['lidar_path'])
        np.testing.assert_allclose(sweep['lidar_points']['lidar2sensor'],
                                   other['lidar_points']['lidar2sensor'], atol=1e-5)
    assert len(mine['instances']) == len(ref['instances'])
    for inst, other in zip(mine['instances'], ref['instances']):
        for key in ('bbox_label', 'bbox_label_3d', 'num_lidar_pts', 'bbox_3d_isvalid'):
            assert inst[key] == other[key]
        np.testing.assert_allclose(inst['bbox_3d'], other['bbox_3d'], atol=1e-6)
        np.testing.assert_allclose(inst['velocity'], other['velocity'], atol=1e-6)
    for cam, found in mine['cam_instances'].items():
        assert len(found) == len(ref['cam_instances'][cam])
        for box, other in zip(found, ref['cam_instances'][cam]):
            assert box['attr_label'] == other['attr_label']
            np.testing.assert_allclose(box['bbox'], other['bbox'], atol=1e-3)
            np.testing.assert_allclose(box['bbox_3d'], other['bbox_3d'], atol=1e-5)
