"""Sparse4D v3's data side: the dataset and its transforms, on a tiny synthetic nuScenes."""
import math
import pickle
import warnings

import mmcv
import mmengine
import numpy as np
import pytest
import torch
from mmdet.datasets.transforms import PhotoMetricDistortion
from mmdet3d.datasets.transforms import (LoadAnnotations3D, LoadMultiViewImageFromFiles,
                                         LoadPointsFromFile, Pack3DDetInputs)
from mmdet3d.structures import LiDARInstance3DBoxes

from turbox_mm.benchmark.micro.image_pipeline import DATA_AUG_CONF
from turbox_mm.datasets.sparse4d_dataset import (SPARSE4D_CLASSES, Sparse4DNuScenesDataset,
                                                 sequence_flag)
from turbox_mm.datasets.transforms import sparse4d_adaptor as adaptor_mod
from turbox_mm.datasets.transforms.bbox_rotation import BBoxRotation, rz
from turbox_mm.datasets.transforms.circle_object_range_filter import CircleObjectRangeFilter
from turbox_mm.datasets.transforms.instance_name_filter import InstanceNameFilter
from turbox_mm.datasets.transforms.load_multiview_images import LoadMultiViewImagesTurbo
from turbox_mm.datasets.transforms.multi_scale_depth_map import MultiScaleDepthMapGenerator
from turbox_mm.datasets.transforms.multiview_affine_aug import MultiViewAffineAug
from turbox_mm.datasets.transforms.normalize_multiview_image import NormalizeMultiviewImage
from turbox_mm.datasets.transforms.photometric_multiview import \
    PhotoMetricDistortionMultiViewImage
from turbox_mm.datasets.transforms.resize_crop_flip_image import ResizeCropFlipImage
from turbox_mm.datasets.transforms.sparse4d_adaptor import (SPARSE4D_META_KEYS,
                                                            NuScenesSparse4DAdaptor)
from turbox_mm.registry import DATASETS, TRANSFORMS

CAMS = ('CAM_FRONT', 'CAM_FRONT_RIGHT', 'CAM_FRONT_LEFT', 'CAM_BACK', 'CAM_BACK_LEFT',
        'CAM_BACK_RIGHT')
PREFIX = dict(pts='samples/LIDAR_TOP', **{c: f'samples/{c}' for c in CAMS})
MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
# Sparse4D v3's augmentation at a quarter of nuScenes' image size: 400x225 -> 64x176.
AUG_CONF = dict(resize_lim=(0.40, 0.47), final_dim=(64, 176), bot_pct_lim=(0.0, 0.0),
                rot_lim=(-5.4, 5.4), H=225, W=400, rand_flip=True,
                rot3d_range=(-0.3925, 0.3925))
FRAMES = 4


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    from turbox_mm.datasets.synthetic import generate
    root = str(tmp_path_factory.mktemp('s4d_synth'))
    generate(root, scenes=2, frames=FRAMES, image_size=(400, 225), points=2000, sweeps=0,
             val_scenes=0, workers=1, progress=False)
    return root


@pytest.fixture(scope='module')
def raw_infos(data_root):
    return mmengine.load(f'{data_root}/nuscenes_infos_train.pkl')


def make_dataset(root, pipeline=(), ann_file='nuscenes_infos_train.pkl', **kwargs):
    kwargs.setdefault('data_aug_conf', AUG_CONF)
    kwargs.setdefault('filter_empty_gt', False)
    return Sparse4DNuScenesDataset(data_root=root, ann_file=ann_file, data_prefix=PREFIX,
                                   pipeline=list(pipeline),
                                   modality=dict(use_camera=True, use_lidar=True), **kwargs)


def stock_pipeline():
    return [
        LoadMultiViewImageFromFiles(to_float32=True, num_views=6),
        LoadPointsFromFile(coord_type='LIDAR', load_dim=5, use_dim=5),
        LoadAnnotations3D(with_bbox_3d=True, with_label_3d=True),
        ResizeCropFlipImage(),
        MultiScaleDepthMapGenerator(downsample=(4, 8, 16), max_depth=60),
        BBoxRotation(),
        PhotoMetricDistortionMultiViewImage(),
        NormalizeMultiviewImage(MEAN, STD, to_rgb=True),
        CircleObjectRangeFilter(class_dist_thred=[55] * 10),
        InstanceNameFilter(SPARSE4D_CLASSES),
        NuScenesSparse4DAdaptor(),
        Pack3DDetInputs(keys=['img', 'gt_bboxes_3d', 'gt_labels_3d'],
                        meta_keys=SPARSE4D_META_KEYS),
    ]


def turbox_pipeline():
    return [
        LoadMultiViewImagesTurbo(num_views=6),
        LoadPointsFromFile(coord_type='LIDAR', load_dim=5, use_dim=5),
        LoadAnnotations3D(with_bbox_3d=True, with_label_3d=True),
        MultiViewAffineAug(),
        MultiScaleDepthMapGenerator(downsample=(4, 8, 16), max_depth=60),
        BBoxRotation(),
        CircleObjectRangeFilter(class_dist_thred=[55] * 10),
        InstanceNameFilter(SPARSE4D_CLASSES),
        NuScenesSparse4DAdaptor(),
        Pack3DDetInputs(keys=['img', 'gt_bboxes_3d', 'gt_labels_3d'],
                        meta_keys=SPARSE4D_META_KEYS),
    ]


@pytest.fixture(scope='module')
def plain_ds(data_root):
    """No pipeline: dataset[i] is the results dict the pipeline would get."""
    return make_dataset(data_root)


@pytest.fixture(scope='module')
def stock_ds(data_root):
    return make_dataset(data_root, stock_pipeline())


def wrap(angle):
    return (np.asarray(angle) + np.pi) % (2 * np.pi) - np.pi


def rz3(angle):
    return rz(angle)[:3, :3]


def gravity_centres_by_id(info):
    """Raw ``instance_id -> (gravity centre, yaw, velocity)`` of one info."""
    out = {}
    for inst in info['instances']:
        vel = np.nan_to_num(np.asarray(inst['velocity'], dtype=np.float64))
        box = np.asarray(inst['bbox_3d'], dtype=np.float64)
        out[inst['instance_id']] = (box[:3], box[6], vel, inst)
    return out


# -- dataset -----------------------------------------------------------------------------------

def test_registered():
    assert DATASETS.get('Sparse4DNuScenesDataset') is Sparse4DNuScenesDataset
    for name in ('BBoxRotation', 'PhotoMetricDistortionMultiViewImage',
                 'NormalizeMultiviewImage', 'CircleObjectRangeFilter', 'InstanceNameFilter',
                 'MultiScaleDepthMapGenerator', 'NuScenesSparse4DAdaptor'):
        assert TRANSFORMS.get(name).__name__ == name
    assert isinstance(TRANSFORMS.build(dict(type='turbox_mm.InstanceNameFilter', classes=['car'])),
                      InstanceNameFilter)


def test_flag_and_sequence_split(data_root, plain_ds):
    assert len(plain_ds) == 2 * FRAMES
    assert plain_ds.flag.dtype == np.int64
    assert plain_ds.flag.tolist() == [0] * FRAMES + [1] * FRAMES
    split2 = make_dataset(data_root, sequences_split_num=2)
    assert split2.flag.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert make_dataset(data_root, sequences_split_num='all').flag.tolist() == list(range(8))
    with pytest.raises(ValueError, match='sequences_split_num'):
        make_dataset(data_root, sequences_split_num=0)
    # A 40-frame scene splits 20/20, a 39-frame one 20/19; the group count doubles.
    meta = [('a', 0.5 * i, 'p') for i in range(40)] + [('b', 100 + 0.5 * i, 'p')
                                                       for i in range(39)]
    flag = sequence_flag(meta, 2)
    assert np.bincount(flag).tolist() == [20, 20, 20, 19]
    # Without scene tokens: prev == '' or a jump of more than 4 s starts a sequence.
    meta = [(None, 0.0, ''), (None, 0.5, 'x'), (None, 4.4, 'y'), (None, 8.5, 'z'),
            (None, 9.0, ''), (None, 9.5, 'w')]
    assert sequence_flag(meta).tolist() == [0, 0, 0, 1, 2, 2]


def test_samples_in_temporal_order(plain_ds, raw_infos):
    infos = [plain_ds.get_data_info(i) for i in range(len(plain_ds))]
    for a, b in zip(infos[:-1], infos[1:]):
        if a['scene_token'] == b['scene_token']:
            assert b['timestamp'] > a['timestamp'] and b['frame_idx'] == a['frame_idx'] + 1
    # sample_idx is the info-file row, as NuScenesMetric looks tokens up.
    rows = raw_infos['data_list']
    assert all(rows[info['sample_idx']]['token'] == info['token'] for info in infos)


def test_reordered_infos_keep_file_rows(data_root, raw_infos, tmp_path):
    shuffled = dict(raw_infos, data_list=raw_infos['data_list'][::-1])
    ann = tmp_path / 'reversed.pkl'
    with open(ann, 'wb') as f:
        pickle.dump(shuffled, f)
    ds = make_dataset(data_root, ann_file=str(ann))
    infos = [ds.get_data_info(i) for i in range(len(ds))]
    assert [i['frame_idx'] for i in infos] == list(range(FRAMES)) * 2
    assert ds.flag.tolist() == [0] * FRAMES + [1] * FRAMES
    assert all(shuffled['data_list'][i['sample_idx']]['token'] == i['token'] for i in infos)
    sub = ds.get_subset([0, 1, 5])
    assert sub.flag.tolist() == [0, 0, 1]


def test_labels_follow_sparse4d_classes(plain_ds, raw_infos):
    assert tuple(plain_ds.metainfo['classes']) == SPARSE4D_CLASSES
    name_of = {v: k for k, v in raw_infos['metainfo']['categories'].items()}
    checked = 0
    for i in range(len(plain_ds)):
        info = plain_ds.get_data_info(i)
        kept = [inst for inst in raw_infos['data_list'][info['sample_idx']]['instances']
                if inst['num_lidar_pts'] > 0]
        ann = info['ann_info']
        assert len(ann['gt_labels_3d']) == len(kept)
        assert info['instance_id'].dtype == np.int64
        assert info['instance_id'].tolist() == [inst['instance_id'] for inst in kept]
        for label, inst in zip(ann['gt_labels_3d'], kept):
            assert SPARSE4D_CLASSES[label] == name_of[inst['bbox_label_3d']]
            checked += 1
    assert checked > 20


def test_get_data_info_geometry(plain_ds, raw_infos):
    info = plain_ds.get_data_info(2)
    raw = raw_infos['data_list'][info['sample_idx']]
    assert isinstance(info['timestamp'], float) and info['timestamp'] == raw['timestamp']
    assert len(info['lidar2img']) == len(info['cam_intrinsic']) == 6
    for k, cam in enumerate(CAMS):
        k4 = np.eye(4)
        k4[:3, :3] = raw['images'][cam]['cam2img']
        np.testing.assert_allclose(info['cam_intrinsic'][k], k4)
        np.testing.assert_allclose(info['lidar2img'][k],
                                   k4 @ np.asarray(raw['images'][cam]['lidar2cam']))
    expected = np.asarray(raw['ego2global']) @ np.asarray(raw['lidar_points']['lidar2ego'])
    assert info['lidar2global'].dtype == np.float64
    np.testing.assert_allclose(info['lidar2global'], expected)


def test_augmentation_draws(data_root, plain_ds):
    a = plain_ds[dict(idx=3, aug_seed=11, sequence=0, first=True)]['aug_config']
    b = plain_ds[dict(idx=5, aug_seed=11)]['aug_config']
    c = plain_ds[dict(idx=3, aug_seed=12)]['aug_config']
    assert a == b and a != c
    assert set(a) == {'resize', 'resize_dims', 'crop', 'flip', 'rotate', 'rotate_3d'}
    assert -0.3925 <= a['rotate_3d'] <= 0.3925 and a['rotate_3d'] != 0
    assert a['crop'][2] - a['crop'][0] == 176 and a['crop'][3] - a['crop'][1] == 64
    # Plain indices draw from numpy's global generator: reproducible under a seed.
    np.random.seed(3)
    d = plain_ds[4]['aug_config']
    np.random.seed(3)
    assert plain_ds[4]['aug_config'] == d
    np.random.seed(3)  # ... namely the seed a dict item would carry
    seed = int(np.random.randint(0, 2**63 - 1, dtype=np.int64))
    assert plain_ds[dict(idx=4, aug_seed=seed)]['aug_config'] == d
    # Test mode: the deterministic test augmentation, no BEV rotation.
    test_ds = make_dataset(data_root, test_mode=True)
    t = test_ds[dict(idx=1, aug_seed=5)]['aug_config']
    assert t == test_ds[2]['aug_config']
    assert t['rotate_3d'] == 0.0 and t['flip'] is False and t['rotate'] == 0
    assert t["resize"] == pytest.approx(0.44) and t['crop'] == (0, 35, 176, 99)
    # Full-size v3 numbers (section 3.3).
    test_ds.data_aug_conf = dict(DATA_AUG_CONF)
    full = test_ds.get_augmentation()
    assert full['resize'] == pytest.approx(0.44) and full['resize_dims'] == (704, 396)
    assert full['crop'] == (0, 140, 704, 396)


def test_none_retries_another_index(data_root):
    seen = []

    def reject_first(results):
        seen.append(results['sample_idx'])
        return None if results['sample_idx'] == 0 else results

    ds = make_dataset(data_root, [reject_first])
    out = ds[dict(idx=0, aug_seed=9)]
    assert out['sample_idx'] != 0 and seen[0] == 0
    assert out['aug_config'] == ds[dict(idx=1, aug_seed=9)]['aug_config']
    test_ds = make_dataset(data_root, [reject_first], test_mode=True)
    with pytest.raises(Exception, match='None'):
        test_ds[0]
    with pytest.raises(TypeError, match='index'):
        ds['3']


# -- the stock pipeline end to end ---------------------------------------------------------------

def test_stock_pipeline_contract(stock_ds, raw_infos):
    out = stock_ds[dict(idx=1, aug_seed=4)]
    aug = stock_ds.get_augmentation(np.random.default_rng(4))
    img = out['inputs']['img']
    assert img.shape == (6, 3, 64, 176) and img.dtype == torch.float32
    assert -3.0 < float(img.mean()) < 3.0  # normalised
    sample = out['data_samples']
    meta = sample.metainfo
    for key in SPARSE4D_META_KEYS:
        assert key in meta, key
    assert meta['projection_mat'].dtype == np.float32 and meta['projection_mat'].shape == (6, 4,
                                                                                           4)
    assert meta['image_wh'].dtype == np.float32
    assert meta['image_wh'].tolist() == [[176.0, 64.0]] * 6
    assert meta['T_global'].dtype == np.float64 and meta['T_global'].shape == (4, 4)
    np.testing.assert_allclose(meta['T_global_inv'] @ meta['T_global'], np.eye(4), atol=1e-9)
    assert isinstance(meta['timestamp'], float)
    assert meta['focal'].dtype == np.float32 and meta['focal'].shape == (6, )
    raw = raw_infos['data_list'][meta['sample_idx']]
    for k, cam in enumerate(CAMS):
        fx, fy = np.asarray(raw['images'][cam]['cam2img'])[[0, 1], [0, 1]]
        assert meta['focal'][k] == pytest.approx(aug['resize'] * math.sqrt(fx * fy), rel=1e-5)
    assert [d.shape for d in meta['gt_depth']] == [(6, 16, 44), (6, 8, 22), (6, 4, 11)]
    assert all(d.dtype == np.float32 for d in meta['gt_depth'])
    assert (meta['gt_depth'][0] > 0).sum() > 50
    assert meta['img_shape'] == [(64, 176)] * 6 and len(meta['lidar2img']) == 6
    assert meta['token'] == raw['token'] and meta['scene_token'] == raw['scene_token']
    assert meta['frame_idx'] == raw['frame_idx']
    assert meta['box_type_3d'] is LiDARInstance3DBoxes

    boxes = sample.gt_instances_3d.bboxes_3d
    labels = sample.gt_instances_3d.labels_3d
    ids = meta['instance_id']
    assert isinstance(boxes, LiDARInstance3DBoxes) and boxes.tensor.shape[1] == 9
    assert labels.dtype == torch.long and ids.dtype == np.int64
    assert len(boxes) == len(labels) == len(ids) > 5
    yaw = boxes.tensor[:, 6].numpy()
    assert (yaw >= -np.pi).all() and (yaw < np.pi).all()
    # Every kept box is its raw instance, rotated by rotate_3d (ids keep boxes aligned).
    angle = aug['rotate_3d']
    by_id = gravity_centres_by_id(raw)
    name_of = {v: k for k, v in raw_infos['metainfo']['categories'].items()}
    centres = boxes.gravity_center.numpy()
    for j, i in enumerate(ids.tolist()):
        centre, raw_yaw, vel, inst = by_id[i]
        np.testing.assert_allclose(centres[j], rz3(angle) @ centre, atol=2e-4)
        assert abs(wrap(yaw[j] - (raw_yaw + angle))) < 1e-5
        np.testing.assert_allclose(boxes.tensor[j, 7:9].numpy(), rz3(angle)[:2, :2] @ vel,
                                   atol=1e-5)
        assert SPARSE4D_CLASSES[int(labels[j])] == name_of[inst['bbox_label_3d']]
        assert np.hypot(*centres[j, :2]) <= 55 and inst['num_lidar_pts'] > 0
    # ... and the filters dropped exactly the raw boxes beyond 55 m or without points.
    expected = {inst['instance_id'] for inst in raw['instances']
                if inst['num_lidar_pts'] > 0 and np.hypot(*inst['bbox_3d'][:2]) <= 55}
    assert set(ids.tolist()) == expected


def test_projection_chain(stock_ds, raw_infos):
    """projection_mat @ rotated centre == the raw projection, augmented by hand."""
    seed = 21
    aug = stock_ds.get_augmentation(np.random.default_rng(seed))
    out = stock_ds[dict(idx=6, aug_seed=seed)]
    meta = out['data_samples'].metainfo
    raw = raw_infos['data_list'][meta['sample_idx']]
    left, top, right, bottom = aug['crop']
    cw, ch = right - left, bottom - top
    theta = math.radians(aug['rotate'])
    checked = 0
    for centre, _, _, _ in gravity_centres_by_id(raw).values():
        p_net = np.append(rz3(aug['rotate_3d']) @ centre, 1.0)
        for k, cam in enumerate(CAMS):
            cam_info = raw['images'][cam]
            p_cam = np.asarray(cam_info['lidar2cam']) @ np.append(centre, 1.0)
            if p_cam[2] < 1.0:
                continue
            uvw = np.asarray(cam_info['cam2img']) @ p_cam[:3]
            u, v = uvw[0] / uvw[2], uvw[1] / uvw[2]
            if not (0 <= u < 400 and 0 <= v < 225):
                continue
            # By hand: resize, crop, flip, rotate (PIL: counter-clockwise, about the centre).
            u, v = u * aug['resize'] - left, v * aug['resize'] - top
            if aug['flip']:
                u = cw - u
            du, dv = u - cw / 2, v - ch / 2
            u = cw / 2 + du * math.cos(theta) + dv * math.sin(theta)
            v = ch / 2 - du * math.sin(theta) + dv * math.cos(theta)
            q = meta['projection_mat'][k].astype(np.float64) @ p_net
            assert q[2] == pytest.approx(p_cam[2], rel=1e-5)
            np.testing.assert_allclose(q[:2] / q[2], [u, v], atol=2e-2)
            checked += 1
    assert checked > 10


def test_turbox_pipeline_same_geometry(data_root, stock_ds):
    turbox_ds = make_dataset(data_root, turbox_pipeline())
    for idx, seed in ((0, 1), (5, 2)):
        stock = stock_ds[dict(idx=idx, aug_seed=seed)]
        fast = turbox_ds[dict(idx=idx, aug_seed=seed)]
        assert fast['inputs']['img'].shape == (6, 3, 64, 176)
        assert fast['inputs']['img'].dtype == torch.uint8
        a, b = stock['data_samples'].metainfo, fast['data_samples'].metainfo
        np.testing.assert_allclose(b['projection_mat'], a['projection_mat'], rtol=1e-5,
                                   atol=1e-5)
        for key in ('image_wh', 'focal', 'T_global', 'T_global_inv', 'instance_id'):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-6, err_msg=key)
        for da, db in zip(a['gt_depth'], b['gt_depth']):
            np.testing.assert_array_equal(da, db)
        assert a['timestamp'] == b['timestamp'] and a['img_shape'] == b['img_shape']
        torch.testing.assert_close(fast['data_samples'].gt_instances_3d.bboxes_3d.tensor,
                                   stock['data_samples'].gt_instances_3d.bboxes_3d.tensor)


# -- BBoxRotation ---------------------------------------------------------------------------------

def random_boxes(n=7, seed=0):
    rng = np.random.default_rng(seed)
    data = np.concatenate([rng.uniform(-40, 40, (n, 3)), rng.uniform(0.5, 5, (n, 3)),
                           rng.uniform(-np.pi, np.pi, (n, 1)), rng.uniform(-9, 9, (n, 2))],
                          axis=1)
    return data


@pytest.mark.parametrize('kind', ['boxes', 'tensor', 'array'])
def test_bbox_rotation_against_rz(kind):
    data = random_boxes()
    angle = 0.37
    rng = np.random.default_rng(1)
    lidar2img = [rng.normal(size=(4, 4)) for _ in range(3)]
    lidar2global = np.eye(4)
    lidar2global[:3, :3] = rz3(1.1)
    lidar2global[:3, 3] = (1000.0, -2000.0, 3.0)
    if kind == 'boxes':
        boxes = LiDARInstance3DBoxes(torch.tensor(data, dtype=torch.float32), box_dim=9)
    elif kind == 'tensor':
        boxes = torch.tensor(data, dtype=torch.float64)
    else:
        boxes = data.copy()
    results = dict(aug_config=dict(rotate_3d=angle), gt_bboxes_3d=boxes,
                   lidar2img=[m.copy() for m in lidar2img], lidar2global=lidar2global.copy())
    out = BBoxRotation()(results)
    got = out['gt_bboxes_3d']
    got = np.asarray(getattr(got, 'tensor', got), dtype=np.float64)
    r = rz3(angle)
    tol = 1e-4 if kind == 'boxes' else 1e-10
    np.testing.assert_allclose(got[:, :3], data[:, :3] @ r.T, atol=tol)
    np.testing.assert_allclose(got[:, 3:6], data[:, 3:6], atol=tol)
    np.testing.assert_allclose(got[:, 6], data[:, 6] + angle, atol=tol)
    np.testing.assert_allclose(got[:, 7:9], data[:, 7:9] @ r[:2, :2].T, atol=tol)
    if kind == 'boxes':  # the gravity centre turns with the bottom centre
        grav = LiDARInstance3DBoxes(torch.tensor(data, dtype=torch.float32), box_dim=9)
        np.testing.assert_allclose(out['gt_bboxes_3d'].gravity_center.numpy(),
                                   grav.gravity_center.numpy() @ r.T, atol=1e-4)
    # A point p of the old frame is Rz p in the new one: same global place, same pixel.
    p = np.array([12.0, -3.0, 1.5, 1.0])
    p_rot = rz(angle) @ p
    np.testing.assert_allclose(out['lidar2global'] @ p_rot, lidar2global @ p, atol=1e-8)
    for old, new in zip(lidar2img, out['lidar2img']):
        np.testing.assert_allclose(new @ p_rot, old @ p, atol=1e-9)
        np.testing.assert_allclose(new, old @ np.linalg.inv(rz(angle)), atol=1e-12)


def test_bbox_rotation_passthrough():
    results = dict(lidar2img=[np.eye(4)], gt_bboxes_3d=random_boxes())
    before = results['gt_bboxes_3d'].copy()
    for aug in (None, dict(resize=1.0)):
        out = BBoxRotation()(dict(results, aug_config=aug))
        np.testing.assert_array_equal(out['gt_bboxes_3d'], before)
    with pytest.raises(ValueError, match='gt_bboxes_3d'):
        BBoxRotation()(dict(aug_config=dict(rotate_3d=0.1), lidar2img=[np.eye(4)],
                            gt_bboxes_3d=np.zeros((2, 5))))


@pytest.mark.cuda
def test_bbox_rotation_cuda():
    data = random_boxes()
    boxes = LiDARInstance3DBoxes(torch.tensor(data, dtype=torch.float32, device='cuda'),
                                 box_dim=9)
    out = BBoxRotation()(dict(aug_config=dict(rotate_3d=-0.2), lidar2img=[np.eye(4)],
                              gt_bboxes_3d=boxes))['gt_bboxes_3d']
    assert out.tensor.device.type == 'cuda'
    np.testing.assert_allclose(out.tensor[:, :3].cpu().numpy(), data[:, :3] @ rz3(-0.2).T,
                               atol=1e-4)
    kept = CircleObjectRangeFilter([30.0] * 10)(
        dict(gt_bboxes_3d=out, gt_labels_3d=np.zeros(len(data), np.int64)))
    assert kept['gt_bboxes_3d'].tensor.device.type == 'cuda'


# -- depth maps -----------------------------------------------------------------------------------

def hand_camera():
    """fx = fy = 100, cx = 352, cy = 128: (x, y, d) lands at (352 + 100 x / d, 128 + 100 y / d)."""
    k = np.eye(4)
    k[:3, :3] = [[100.0, 0, 352.0], [0, 100.0, 128.0], [0, 0, 1.0]]
    return k


def depth_reference(points, lidar2img, hw, strides, max_depth):
    """Upstream's algorithm, written out plainly: far to near, the last write wins."""
    out = [[] for _ in strides]
    for mat in lidar2img:
        maps = [np.full((int(hw[0] / s), int(hw[1] / s)), -1.0, np.float32) for s in strides]
        cam = points[:, :3] @ mat[:3, :3].T + mat[:3, 3]
        recs = []
        for x, y, d in cam:
            if d < 0.1:
                continue
            u, v = np.round(x / d), np.round(y / d)
            if 0 <= u < hw[1] and 0 <= v < hw[0]:
                recs.append((d, int(u), int(v)))
        for d, u, v in sorted(recs, reverse=True):
            for m, s in zip(maps, strides):
                if v // s < m.shape[0] and u // s < m.shape[1]:
                    m[v // s, u // s] = min(d, max_depth)
        for j, m in enumerate(maps):
            out[j].append(m)
    return [np.stack(m) for m in out]


def test_depth_map_rules():
    k = hand_camera()
    points = np.array([
        [0.0, 0.0, 8.0],  # pixel (352, 128), stride-4 cell (32, 88): far
        [0.05, 0.0, 5.0],  # pixel (353, 128): same stride-4 cell, nearer -> wins
        [0.0, 0.0, 0.05],  # too near: dropped
        [0.0, 0.0, -5.0],  # behind: dropped
        [40.0, 0.0, 2.0],  # u = 2352: outside: dropped
        [-1.6, -0.6, 80.0],  # pixel (350, 127): clipped to 60
    ])
    for order in (slice(None), slice(None, None, -1)):
        out = MultiScaleDepthMapGenerator()(
            dict(points=points[order], lidar2img=[k, k], img_shape=[(256, 704)] * 2))
        depth = out['gt_depth']
        assert [d.shape for d in depth] == [(2, 64, 176), (2, 32, 88), (2, 16, 44)]
        assert all(d.dtype == np.float32 for d in depth)
        assert depth[0][0, 32, 88] == 5.0
        assert depth[0][0, 31, 87] == 60.0
        assert (depth[0] > 0).sum() == 4  # two cells x two cameras
        assert depth[1][0, 16, 44] == 5.0 and depth[2][0, 8, 22] == 5.0  # nearest again
        assert (depth[0][depth[0] != -1] >= 0.1).all()


def test_depth_map_matches_reference():
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.uniform(-30, 30, (3000, 2)), rng.uniform(-2, 70, (3000, 1))],
                            axis=1)
    points = np.concatenate([points, rng.normal(size=(3000, 2))], axis=1).astype(np.float32)
    k = np.eye(4)
    k[:3, :3] = [[40.0, 0, 95.0], [0, 40.0, 35.0], [0, 0, 1.0]]
    mats = [k, k @ rz(0.3)]
    mats[1][:3, 3] += (5.0, -3.0, 1.0)
    # 70 x 190 is not a multiple of 16: the cells past the map are dropped.
    out = MultiScaleDepthMapGenerator(downsample=[4, 16], max_depth=40)(
        dict(points=points, lidar2img=mats, img_shape=(70, 190, 3)))
    ref = depth_reference(points.astype(np.float64), mats, (70, 190), [4, 16], 40)
    for got, want in zip(out['gt_depth'], ref):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert (out['gt_depth'][0] > 0).sum() > 300 and (out['gt_depth'][0] == 40).sum() > 10
    with pytest.raises(KeyError, match='points'):
        MultiScaleDepthMapGenerator()(dict(lidar2img=mats, img_shape=(70, 190)))


# -- filters ------------------------------------------------------------------------------------

def filter_case():
    xy = np.array([[10, 0], [0, 50], [30, 40], [-60, 0], [3, 4], [1, 1]], dtype=np.float64)
    data = np.zeros((6, 9))
    data[:, :2] = xy
    labels = np.array([0, 5, 1, 2, -1, 10], dtype=np.int64)  # dist 10, 50, 50, 60, 5, 1.4
    ids = np.array([100, 101, 102, 103, 104, 105], dtype=np.int64)
    return data, labels, ids


@pytest.mark.parametrize('kind', ['array', 'boxes'])
def test_circle_filter_keeps_ids_aligned(kind):
    data, labels, ids = filter_case()
    boxes = data if kind == 'array' else LiDARInstance3DBoxes(torch.tensor(data), box_dim=9)
    out = CircleObjectRangeFilter()(dict(gt_bboxes_3d=boxes, gt_labels_3d=labels,
                                         instance_id=ids))
    # Defaults: class 0 and 1 reach 52.5 m, class 5 (barrier) 31.5 m; -1 and 10 dropped.
    assert out['instance_id'].tolist() == [100, 102]
    assert out['gt_labels_3d'].tolist() == [0, 1]
    kept = np.asarray(getattr(out['gt_bboxes_3d'], 'tensor', out['gt_bboxes_3d']))
    np.testing.assert_allclose(kept[:, :2], [[10, 0], [30, 40]])
    out = CircleObjectRangeFilter([55] * 10)(dict(gt_bboxes_3d=data, gt_labels_3d=labels,
                                                  instance_id=ids))
    assert out['instance_id'].tolist() == [100, 101, 102]
    with pytest.raises(ValueError, match='instance_id'):
        CircleObjectRangeFilter()(dict(gt_bboxes_3d=data, gt_labels_3d=labels,
                                       instance_id=ids[:3]))


def test_instance_name_filter_keeps_ids_aligned():
    data, labels, ids = filter_case()
    boxes = LiDARInstance3DBoxes(torch.tensor(data), box_dim=9)
    out = InstanceNameFilter(SPARSE4D_CLASSES)(dict(gt_bboxes_3d=boxes, gt_labels_3d=labels,
                                                    instance_id=ids))
    assert out['instance_id'].tolist() == [100, 101, 102, 103]
    assert out['gt_labels_3d'].tolist() == [0, 5, 1, 2]
    np.testing.assert_allclose(out['gt_bboxes_3d'].tensor[:, 0].numpy(), [10, 0, 30, -60])
    out = InstanceNameFilter(['car', 'truck'])(dict(gt_bboxes_3d=data, gt_labels_3d=labels))
    assert out['gt_labels_3d'].tolist() == [0, 1] and 'instance_id' not in out
    with pytest.raises(ValueError, match='classes'):
        InstanceNameFilter('car')


# -- adaptor, photometric, normalisation --------------------------------------------------------

def adaptor_input(**extra):
    k = np.diag([-100.0, 50.0, 1.0, 1.0])  # a flipped camera
    results = dict(lidar2img=[np.eye(4), 2 * np.eye(4)], img_shape=(64, 176),
                   lidar2global=np.diag([1.0, 1.0, 1.0, 1.0]), cam_intrinsic=[k, k],
                   timestamp=np.float64(12.5))
    results.update(extra)
    return results


def test_adaptor_outputs(monkeypatch):
    monkeypatch.setitem(adaptor_mod._warned, 'instance_id', False)
    yaw = np.array([np.pi, -np.pi, 3 * np.pi / 2, 0.2, -7.0])
    data = np.zeros((5, 9), np.float32)
    data[:, 6] = yaw
    data[:, 3:6] = 1.0
    boxes = LiDARInstance3DBoxes(torch.tensor(data), box_dim=9)
    out = NuScenesSparse4DAdaptor()(adaptor_input(gt_bboxes_3d=boxes,
                                                  gt_labels_3d=np.arange(5, dtype=np.int32),
                                                  instance_id=[3, 4, 5, 6, 7]))
    assert out['image_wh'].tolist() == [[176.0, 64.0]] * 2
    assert out['projection_mat'].dtype == np.float32 and out['projection_mat'].shape == (2, 4,
                                                                                         4)
    assert out['focal'].tolist() == pytest.approx([math.sqrt(5000.0)] * 2)
    assert out['timestamp'] == 12.5 and type(out['timestamp']) is float
    assert out['instance_id'].dtype == np.int64 and out['gt_labels_3d'].dtype == np.int64
    got = out['gt_bboxes_3d'].tensor[:, 6].numpy()
    assert got.dtype == np.float32
    assert np.abs(wrap(got - yaw.astype(np.float32))).max() < 1e-6
    np.testing.assert_allclose(got[2:], [-np.pi / 2, 0.2, -7.0 + 2 * np.pi], atol=1e-6)
    assert (got >= np.float32(-np.pi)).all() and (got < np.float32(np.pi)).all()
    arr = NuScenesSparse4DAdaptor()(adaptor_input(gt_bboxes_3d=data.copy()))['gt_bboxes_3d']
    np.testing.assert_array_equal(arr[:, 6], got)
    with pytest.raises(ValueError, match='instance ids'):
        NuScenesSparse4DAdaptor()(adaptor_input(gt_labels_3d=np.zeros(2, np.int64),
                                                instance_id=np.zeros(3, np.int64)))
    with pytest.warns(UserWarning, match='instance_id'):
        out = NuScenesSparse4DAdaptor()(adaptor_input(gt_labels_3d=np.zeros(2, np.int64)))
    assert out['instance_id'].tolist() == [-1, -1]
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # once only
        NuScenesSparse4DAdaptor()(adaptor_input(gt_labels_3d=np.zeros(2, np.int64)))
    with pytest.raises(KeyError, match='lidar2global'):
        NuScenesSparse4DAdaptor()(dict(lidar2img=[np.eye(4)], cam_intrinsic=[np.eye(4)],
                                       img_shape=(4, 4)))


def test_photometric_per_camera_draws():
    rng = np.random.default_rng(0)
    imgs = [rng.uniform(0, 255, (8, 10, 3)).astype(np.float32) for _ in range(3)]
    imgs.append(imgs[0].copy())
    np.random.seed(5)
    out = PhotoMetricDistortionMultiViewImage()(dict(img=[im.copy() for im in imgs]))['img']
    np.random.seed(5)
    op = PhotoMetricDistortion()
    for got, img in zip(out, imgs):  # mmdet's transform, one image after the other
        np.testing.assert_allclose(got, op.transform(dict(img=img.copy()))['img'])
        assert got.dtype == np.float32
    assert not np.allclose(out[0], out[3])  # same image, independent draws
    with pytest.raises(TypeError, match='list'):
        PhotoMetricDistortionMultiViewImage()(dict(img=imgs[0]))


def test_normalize_multiview():
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (5, 7, 3)).astype(np.uint8),
            rng.uniform(0, 255, (5, 7, 3)).astype(np.float32)]
    out = NormalizeMultiviewImage(MEAN, STD)(dict(img=[im.copy() for im in imgs]))
    for got, img in zip(out['img'], imgs):
        want = (img[..., ::-1].astype(np.float64) - MEAN) / STD
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(
            got, mmcv.imnormalize(img, np.float32(MEAN), np.float32(STD), to_rgb=True))
    assert out['img_norm_cfg']['to_rgb'] is True
    bgr = NormalizeMultiviewImage(MEAN, STD, to_rgb=False)(dict(img=[imgs[1].copy()]))
    np.testing.assert_allclose(bgr['img'][0], (imgs[1] - np.array(MEAN)) / STD, rtol=1e-5,
                               atol=1e-5)
