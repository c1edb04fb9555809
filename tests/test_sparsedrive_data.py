"""SparseDrive's data side: VectorizeMap, the dataset's planning fields, the filters and the
adaptor, on hand-built polylines and a tiny synthetic nuScenes."""
import pickle
from unittest import mock

import mmengine
import numpy as np
import pytest
import torch
from mmdet3d.datasets.transforms import (LoadAnnotations3D, LoadMultiViewImageFromFiles,
                                         LoadPointsFromFile, Pack3DDetInputs)
from shapely.geometry import LineString, Polygon

from turbox_mm.datasets import sparsedrive_dataset as dataset_mod
from turbox_mm.datasets.sparse4d_dataset import SPARSE4D_CLASSES
from turbox_mm.datasets.sparsedrive_dataset import (SparseDriveNuScenesDataset, agent_futures,
                                                    ego_future)
from turbox_mm.datasets.transforms.bbox_rotation import BBoxRotation
from turbox_mm.datasets.transforms.circle_object_range_filter import (CircleObjectRangeFilter,
                                                                      filter_instances)
from turbox_mm.datasets.transforms.instance_name_filter import InstanceNameFilter
from turbox_mm.datasets.transforms.multi_scale_depth_map import MultiScaleDepthMapGenerator
from turbox_mm.datasets.transforms.normalize_multiview_image import NormalizeMultiviewImage
from turbox_mm.datasets.transforms.photometric_multiview import \
    PhotoMetricDistortionMultiViewImage
from turbox_mm.datasets.transforms.resize_crop_flip_image import ResizeCropFlipImage
from turbox_mm.datasets.transforms.sparse4d_adaptor import SPARSE4D_META_KEYS
from turbox_mm.datasets.transforms.sparsedrive_adaptor import (SPARSEDRIVE_META_KEYS,
                                                               NuScenesSparseDriveAdaptor)
from turbox_mm.datasets.transforms.vectorize_map import (VectorizeMap, permute_orders,
                                                         resample_polylines)
from turbox_mm.registry import DATASETS, TRANSFORMS

CAMS = ('CAM_FRONT', 'CAM_FRONT_RIGHT', 'CAM_FRONT_LEFT', 'CAM_BACK', 'CAM_BACK_LEFT',
        'CAM_BACK_RIGHT')
PREFIX = dict(pts='samples/LIDAR_TOP', **{c: f'samples/{c}' for c in CAMS})
MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
# SparseDrive's augmentation (no BEV rotation) at a fifth of nuScenes' image size.
AUG_CONF = dict(resize_lim=(0.40, 0.47), final_dim=(64, 176), bot_pct_lim=(0.0, 0.0),
                rot_lim=(-5.4, 5.4), H=180, W=320, rand_flip=True, rot3d_range=(0.0, 0.0))
FRAMES = 4


# -- references --------------------------------------------------------------------------------

def shapely_resample(points, num=20):
    """Upstream's sampling: shapely ``interpolate`` at ``linspace(0, length, num)``."""
    line = LineString(points)
    return np.array([line.interpolate(d).coords[0] for d in np.linspace(0, line.length, num)])


def loop_orders(points, padding=1e5):
    """Upstream's ``permute_line`` orders, one ``np.roll`` at a time."""
    num = len(points)
    if np.allclose(points[0], points[-1], atol=1e-3):
        ring = points[:-1]
        rows = ([np.roll(ring, k, axis=0) for k in range(num - 1)]
                + [np.roll(ring[::-1], k, axis=0) for k in range(num - 1)])
        return np.stack([np.concatenate([r, r[:1]]) for r in rows])
    pad = np.full((2 * (num - 1) - 2, num, 2), padding)
    return np.concatenate([np.stack([points, points[::-1]]), pad])


SQUARE = [[0., 0.], [4., 0.], [4., 4.], [0., 4.], [0., 0.]]  # closed, perimeter 16


# -- VectorizeMap ------------------------------------------------------------------------------

def test_registered():
    assert DATASETS.get('SparseDriveNuScenesDataset') is SparseDriveNuScenesDataset
    assert TRANSFORMS.get('VectorizeMap') is VectorizeMap
    assert TRANSFORMS.get('NuScenesSparseDriveAdaptor') is NuScenesSparseDriveAdaptor
    built = TRANSFORMS.build(dict(type='turbox_mm.VectorizeMap', roi_size=(30, 60),
                                  sample_num=20))
    assert isinstance(built, VectorizeMap) and built.permute
    assert SPARSEDRIVE_META_KEYS[:len(SPARSE4D_META_KEYS)] == SPARSE4D_META_KEYS
    assert SPARSEDRIVE_META_KEYS[len(SPARSE4D_META_KEYS):] == (
        'gt_map_labels', 'gt_map_pts', 'gt_agent_fut_trajs', 'gt_agent_fut_masks',
        'gt_ego_fut_trajs', 'gt_ego_fut_masks', 'gt_ego_fut_cmd', 'ego_status')


def test_resample_matches_shapely():
    rng = np.random.default_rng(0)
    lines = []
    for k in (2, 3, 7, 40, 200):
        lines.append(np.cumsum(rng.normal(0, 3, (k, 2)), axis=0) - 10)
    dup = np.array([[0., 0.], [0., 0.], [1., 2.], [1., 2.], [1., 2.], [5., 2.], [5., 2.]])
    lines += [dup, np.array(SQUARE), np.array([[1e-4, 0.], [0., 0.]]),
              np.array([[14.9, -29.9], [-14.9, 29.9]])]
    for num in (20, 2, 7):
        got = resample_polylines(lines, num)
        assert got.shape == (len(lines), num, 2) and got.dtype == np.float64
        for g, line in enumerate(lines):
            np.testing.assert_allclose(got[g], shapely_resample(line, num), atol=1e-5,
                                       rtol=0)
    # ... one polyline at a time gives the same numbers as all at once.
    for g, line in enumerate(lines):
        np.testing.assert_allclose(resample_polylines([line], 20)[0],
                                   resample_polylines(lines, 20)[g], atol=1e-9)
    # A polyline of length 0 is its point, repeated.
    assert resample_polylines([np.array([[3., 1.], [3., 1.]])], 4).tolist() == [[[3., 1.]] * 4]
    assert resample_polylines([], 20).shape == (0, 20, 2)


def test_closed_orders():
    out = VectorizeMap()(dict(map_annos={0: [SQUARE]}))
    pts = out['gt_map_pts']
    assert pts.shape == (1, 38, 20, 2) and pts.dtype == np.float32
    assert out['gt_map_labels'].tolist() == [0] and out['gt_map_labels'].dtype == np.int64
    base = shapely_resample(SQUARE)
    np.testing.assert_allclose(pts[0], loop_orders(base), atol=1e-5)
    # By hand: 19 distinct points p_0 .. p_18, 16/19 m apart; order k starts at
    # p_((19 - k) % 19) and runs forwards; order 19 + k is the same roll of p_18, ..., p_0
    # (so order 19 starts at p_18, order 20 at p_0 backwards); every order is closed.
    np.testing.assert_allclose(pts[0, 0], base, atol=1e-5)
    for k in range(19):
        for j in (0, 1, 18):
            np.testing.assert_allclose(pts[0, k, j], base[(j - k) % 19], atol=1e-5)
            np.testing.assert_allclose(pts[0, 19 + k, j], base[18 - (j - k) % 19], atol=1e-5)
    np.testing.assert_array_equal(pts[:, :, 0], pts[:, :, -1])
    np.testing.assert_allclose(pts[0, 0, :2], [[0.0, 0.0], [16 / 19, 0.0]], atol=1e-5)
    np.testing.assert_allclose(pts[0, 19, :2], [[0.0, 16 / 19], [0.0, 32 / 19]], atol=1e-5)
    np.testing.assert_allclose(pts[0, 20, :2], [[0.0, 0.0], [0.0, 16 / 19]], atol=1e-5)
    # The 38 orders are 38 different sequences of the same 19 points.
    assert len({tuple(np.round(r, 4).ravel()) for r in pts[0]}) == 38
    # Closed within upstream's tolerance (1e-3): 5e-4 off closes, 5e-3 off does not.
    near = np.array(SQUARE)
    near[-1] = [5e-4, 0.0]
    assert (VectorizeMap()(dict(map_annos={0: [near]}))['gt_map_pts'][0, 2:] < 1e3).all()
    near[-1] = [5e-3, 0.0]
    assert (VectorizeMap()(dict(map_annos={0: [near]}))['gt_map_pts'][0, 2:] == 1e5).all()


def test_open_orders():
    line = [[-3., -20.], [-3., 0.], [2., 10.]]
    pts = VectorizeMap()(dict(map_annos=dict(boundary=[line])))['gt_map_pts'][0]
    base = shapely_resample(line)
    np.testing.assert_allclose(pts[0], base, atol=1e-5)
    np.testing.assert_allclose(pts[1], base[::-1], atol=1e-5)
    assert (pts[2:] == 1e5).all()
    np.testing.assert_allclose(pts, loop_orders(base), atol=1e-5)
    # The vectorised orders against the loop on many random polylines, open and closed.
    rng = np.random.default_rng(1)
    batch = rng.normal(0, 5, (6, 9, 2))
    batch[::2, -1] = batch[::2, 0]
    got = permute_orders(batch)
    assert got.shape == (6, 16, 9, 2)
    for g in range(6):
        np.testing.assert_array_equal(got[g], loop_orders(batch[g]))


def test_class_remap_and_order():
    div, ped, bound = [[0., 0.], [0., 5.]], SQUARE, [[-5., -5.], [-5., 5.], [-4., 9.]]
    maptr = dict(divider=[div, div], ped_crossing=[ped], boundary=[bound])  # MapTR's order
    upstream = {2: [bound], 0: [ped], 1: [div, div]}
    a = VectorizeMap()(dict(map_annos=maptr))
    b = VectorizeMap()(dict(map_annos=upstream))
    assert a['gt_map_labels'].tolist() == b['gt_map_labels'].tolist() == [0, 1, 1, 2]
    np.testing.assert_array_equal(a['gt_map_pts'], b['gt_map_pts'])
    np.testing.assert_allclose(a['gt_map_pts'][3, 0], shapely_resample(bound), atol=1e-5)
    # Another class order relabels.
    c = VectorizeMap(map_classes=('divider', 'ped_crossing', 'boundary'))(
        dict(map_annos=maptr))
    assert c['gt_map_labels'].tolist() == [0, 0, 1, 2]
    # Shapely LineStrings (upstream's map_geoms) work; polygons are skipped, as upstream.
    d = VectorizeMap()(dict(map_annos={1: [LineString(div), Polygon(SQUARE)]}))
    assert d['gt_map_labels'].tolist() == [1]
    np.testing.assert_array_equal(d['gt_map_pts'][0], a['gt_map_pts'][1])
    # 3-D points keep x, y.
    e = VectorizeMap()(dict(map_annos={1: [[[0., 0., 7.], [0., 5., 7.]]]}))
    np.testing.assert_array_equal(e['gt_map_pts'][0], a['gt_map_pts'][1])


def test_empty_map():
    for annos in ({}, dict(divider=[], ped_crossing=[], boundary=[]), {0: [Polygon(SQUARE)]}):
        out = VectorizeMap()(dict(map_annos=annos))
        assert out['gt_map_pts'].shape == (0, 38, 20, 2)
        assert out['gt_map_pts'].dtype == np.float32
        assert out['gt_map_labels'].shape == (0, ) and out['gt_map_labels'].dtype == np.int64
    assert VectorizeMap(sample_num=5)(dict(map_annos={}))['gt_map_pts'].shape == (0, 8, 5, 2)


def test_roi():
    far = [[20., 0.], [20., 10.]]  # beyond x = 15
    crossing = [[-20., 0.], [0., 0.], [0., 40.]]  # in from the left, out at the top
    annos = {1: [far, crossing]}
    # Upstream does not cut to the ROI (its converter does): everything is kept.
    out = VectorizeMap()(dict(map_annos=annos))
    assert out['gt_map_labels'].tolist() == [1, 1]
    np.testing.assert_allclose(out['gt_map_pts'][1, 0], shapely_resample(crossing), atol=1e-5)
    # clip_to_roi cuts: the far line goes, the other keeps its part in |x| <= 15, |y| <= 30.
    out = VectorizeMap(clip_to_roi=True)(dict(map_annos=annos))
    assert out['gt_map_labels'].tolist() == [1]
    inside = [[-15., 0.], [0., 0.], [0., 30.]]
    np.testing.assert_allclose(out['gt_map_pts'][0, 0], shapely_resample(inside), atol=1e-5)
    # A line leaving and re-entering becomes two polylines; one inside is left alone.
    zigzag = [[0., 20.], [0., 40.], [5., 40.], [5., 20.]]
    out = VectorizeMap(clip_to_roi=True)(dict(map_annos={2: [zigzag, SQUARE]}))
    assert out['gt_map_labels'].tolist() == [2, 2, 2]
    np.testing.assert_allclose(out['gt_map_pts'][0, 0, [0, -1]], [[0., 20.], [0., 30.]],
                               atol=1e-6)
    np.testing.assert_allclose(out['gt_map_pts'][1, 0, [0, -1]], [[5., 30.], [5., 20.]],
                               atol=1e-6)
    assert (out['gt_map_pts'][2, 2:] < 1e3).all()  # the square stays closed
    # normalize (upstream's option): (x + 15) / (30 + 1e-5), (y + 30) / (60 + 1e-5).
    out = VectorizeMap(normalize=True)(dict(map_annos={1: [[[-15., -30.], [15., 30.]]]}))
    np.testing.assert_allclose(out['gt_map_pts'][0, 0, [0, -1]],
                               [[0., 0.], [30 / (30 + 1e-5), 60 / (60 + 1e-5)]], atol=1e-7)
    assert (out['gt_map_pts'][0, 2:] == 1e5).all()


def test_eval_variant():
    rng = np.random.default_rng(2)
    wiggly = np.stack([np.linspace(-10, 10, 60), 0.05 * rng.normal(size=60)], axis=1)
    bend = [[0., 0.], [0., 5.], [3., 9.]]
    t = VectorizeMap(simplify=True)
    assert not t.permute
    out = t(dict(map_annos=dict(boundary=[wiggly], divider=[bend], ped_crossing=[])))
    assert 'gt_map_pts' not in out and set(out['vectors']) == {0, 1, 2}
    assert out['vectors'][0] == []
    np.testing.assert_array_equal(out['vectors'][1][0], bend)  # not resampled
    want = np.array(LineString(wiggly).simplify(0.2, preserve_topology=True).coords)
    np.testing.assert_array_equal(out['vectors'][2][0], want)
    assert len(want) < 10
    # No simplify, no permute: the resampled polylines, per class (upstream).
    out = VectorizeMap(permute=False)(dict(map_annos={1: [bend]}))
    np.testing.assert_allclose(out['vectors'][1][0], shapely_resample(bend), atol=1e-5)


def test_vectorize_errors():
    t = VectorizeMap()
    with pytest.raises(KeyError, match='lane_centerline'):
        t(dict(map_annos=dict(lane_centerline=[[[0., 0.], [1., 1.]]])))
    with pytest.raises(ValueError, match=r"\[1\].*1 point"):
        t(dict(map_annos=dict(divider=[[[0., 0.], [1., 1.]], [[0., 0.]]])))
    with pytest.raises(ValueError, match='shape'):
        t(dict(map_annos=dict(divider=[[[0., 0., 1., 1.], [1., 1., 1., 1.]]])))
    with pytest.raises(ValueError, match='shape'):
        t(dict(map_annos=dict(divider=[[0., 0., 1., 1.]])))
    with pytest.raises(ValueError, match='non-finite'):
        t(dict(map_annos=dict(divider=[[[0., 0.], [np.nan, 1.]]])))
    with pytest.raises(ValueError, match='outside'):
        t(dict(map_annos={3: [[[0., 0.], [1., 1.]]]}))
    with pytest.raises(KeyError, match='map_annos'):
        t(dict(map_geoms={}))
    with pytest.raises(TypeError, match='dict'):
        t(dict(map_annos=[[[0., 0.], [1., 1.]]]))
    with pytest.raises(ValueError, match='permute'):
        VectorizeMap(simplify=True, permute=True)
    with pytest.raises(ValueError, match='sample_num'):
        VectorizeMap(sample_num=1)


# -- the dataset -------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    from turbox_mm.datasets.synthetic import generate
    root = str(tmp_path_factory.mktemp('sd_synth'))
    generate(root, scenes=2, frames=FRAMES, image_size=(320, 180), points=800, sweeps=0,
             val_scenes=0, workers=1, gt_database=False, progress=False)
    return root


@pytest.fixture(scope='module')
def raw_infos(data_root):
    return mmengine.load(f'{data_root}/nuscenes_infos_train.pkl')


def make_dataset(root, pipeline=(), ann_file='nuscenes_infos_train.pkl', **kwargs):
    kwargs.setdefault('data_aug_conf', AUG_CONF)
    kwargs.setdefault('filter_empty_gt', False)
    kwargs.setdefault('serialize_data', False)  # its gc.collect() costs ~1 s per dataset
    return SparseDriveNuScenesDataset(data_root=root, ann_file=ann_file, data_prefix=PREFIX,
                                      pipeline=list(pipeline),
                                      modality=dict(use_camera=True, use_lidar=True), **kwargs)


@pytest.fixture(scope='module')
def plain_ds(data_root):
    return make_dataset(data_root, with_fut_boxes=True)


def raw_by_id(raw):
    return {inst['instance_id']: inst for inst in raw['instances']}


def test_dataset_fields(plain_ds, raw_infos):
    checked = 0
    for i in range(len(plain_ds)):
        info = plain_ds.get_data_info(i)
        raw = raw_infos['data_list'][info['sample_idx']]
        assert info['ego_status'].dtype == np.float32 and info['ego_status'].shape == (10, )
        np.testing.assert_allclose(info['ego_status'], raw['ego_status'], rtol=1e-6)
        for key, shape in (('gt_ego_fut_trajs', (6, 2)), ('gt_ego_fut_masks', (6, )),
                           ('gt_ego_fut_cmd', (3, ))):
            assert info[key].dtype == np.float32 and info[key].shape == shape, key
            np.testing.assert_allclose(info[key], raw[key], rtol=1e-6)
        assert info['gt_ego_fut_cmd'].sum() == 1 and set(info['gt_ego_fut_cmd']) <= {0, 1}
        assert info['map_annos'] == raw['map_annos']
        # Agent futures: one row per kept box, the row of the same instance.
        n = len(info['ann_info']['gt_labels_3d'])
        trajs, masks = info['gt_agent_fut_trajs'], info['gt_agent_fut_masks']
        assert trajs.shape == (n, 12, 2) and masks.shape == (n, 12) and n == len(
            info['instance_id'])
        assert trajs.dtype == masks.dtype == np.float32
        by_id = raw_by_id(raw)
        for row, iid in enumerate(info['instance_id'].tolist()):
            assert by_id[iid]['num_lidar_pts'] > 0
            np.testing.assert_allclose(trajs[row], by_id[iid]['fut_traj'], rtol=1e-6)
            np.testing.assert_array_equal(masks[row], by_id[iid]['fut_mask'])
            checked += 1
    assert checked > 20


def test_fut_boxes(data_root, plain_ds, raw_infos):
    """fut_boxes[0] holds, for an instance seen next frame, its centre at the current centre
    plus its first future offset (the generator's fut_traj, computed another way)."""
    matched = 0
    for i in range(len(plain_ds)):
        info = plain_ds.get_data_info(i)
        steps = int(info['gt_ego_fut_masks'].sum())
        boxes = info['fut_boxes']
        assert len(boxes) == steps  # the ego mask ends with the scene
        assert all(b.dtype == np.float32 and b.shape[1] == 7 for b in boxes)
        if steps == 0:
            continue
        nxt = raw_infos['data_list'][plain_ds.get_data_info(i + 1)['sample_idx']]
        assert len(boxes[0]) == sum(inst['num_lidar_pts'] > 0 for inst in nxt['instances'])
        for inst in raw_infos['data_list'][info['sample_idx']]['instances']:
            if not inst['fut_mask'][0]:
                continue
            want = np.asarray(inst['bbox_3d'][:2]) + inst['fut_traj'][0]
            dist = np.hypot(*(boxes[0][:, :2] - want).T)
            if len(dist) and dist.min() < 1e-3:
                matched += 1
    assert matched > 10
    assert 'fut_boxes' not in make_dataset(data_root).get_data_info(0)


def test_futures_follow_the_filters(plain_ds, raw_infos):
    kept_total = dropped_total = 0
    for i in range(len(plain_ds)):
        results = LoadAnnotations3D(with_bbox_3d=True, with_label_3d=True)(
            plain_ds.get_data_info(i))
        before = len(results['gt_labels_3d'])
        results = CircleObjectRangeFilter([20.0] * 10)(results)
        results = InstanceNameFilter(SPARSE4D_CLASSES[:6])(results)
        n = len(results['gt_labels_3d'])
        dropped_total += before - n
        assert results['gt_agent_fut_trajs'].shape == (n, 12, 2)
        assert results['gt_agent_fut_masks'].shape == (n, 12)
        by_id = raw_by_id(raw_infos['data_list'][results['sample_idx']])
        centres = results['gt_bboxes_3d'].gravity_center.numpy()
        for row, iid in enumerate(results['instance_id'].tolist()):
            np.testing.assert_allclose(centres[row], by_id[iid]['bbox_3d'][:3], atol=1e-4)
            np.testing.assert_allclose(results['gt_agent_fut_trajs'][row],
                                       by_id[iid]['fut_traj'], rtol=1e-6)
            assert np.hypot(*centres[row, :2]) <= 20 and results['gt_labels_3d'][row] < 6
        kept_total += n
    assert kept_total > 5 and dropped_total > 5


def test_filter_instances_futures():
    results = dict(gt_bboxes_3d=np.zeros((3, 9)), gt_labels_3d=np.array([0, -1, 2]),
                   gt_agent_fut_trajs=np.arange(72.).reshape(3, 12, 2),
                   gt_agent_fut_masks=np.eye(3, 12))
    out = filter_instances(results, np.array([True, False, True]), 'demo')
    np.testing.assert_array_equal(out['gt_agent_fut_trajs'][:, 0, 0], [0., 48.])
    np.testing.assert_array_equal(out['gt_agent_fut_masks'][:, :3], [[1, 0, 0], [0, 0, 1]])
    with pytest.raises(ValueError, match='gt_agent_fut_masks'):
        filter_instances(dict(results, gt_agent_fut_masks=np.zeros((3, 12))),
                         np.ones(2, bool), 'demo')
    bad = dict(gt_bboxes_3d=np.zeros((2, 9)), gt_labels_3d=np.zeros(2),
               gt_agent_fut_trajs=np.zeros((3, 12, 2)))
    with pytest.raises(ValueError, match='gt_agent_fut_trajs has 3'):
        filter_instances(bad, np.ones(2, bool), 'demo')


def write_infos(raw_infos, tmp_path, edit):
    """The first two infos, edited, in a new info file."""
    infos = pickle.loads(pickle.dumps(dict(raw_infos, data_list=raw_infos['data_list'][:2])))
    for info in infos['data_list']:
        edit(info)
    path = tmp_path / 'edited.pkl'
    with open(path, 'wb') as f:
        pickle.dump(infos, f)
    return str(path)


def test_dataset_errors(data_root, raw_infos, tmp_path, monkeypatch):
    no_status = write_infos(raw_infos, tmp_path, lambda info: info.pop('ego_status'))
    ds = make_dataset(data_root, ann_file=no_status)
    with pytest.raises(KeyError, match='ego_status'):
        ds.get_data_info(0)
    # Upstream's zero fill, opted in, warns once.
    monkeypatch.setitem(dataset_mod._warned, 'ego_status', False)
    ds = make_dataset(data_root, ann_file=no_status, allow_missing_ego_status=True)
    with mock.patch.object(dataset_mod, 'print_log') as log:
        assert ds.get_data_info(0)['ego_status'].tolist() == [0.0] * 10
        ds.get_data_info(1)
    assert log.call_count == 1 and 'ego_status' in log.call_args[0][0]

    short = write_infos(raw_infos, tmp_path, lambda info: info.update(ego_status=[0.0] * 9))
    with pytest.raises(ValueError, match='ego_status must have 10'):
        make_dataset(data_root, ann_file=short, allow_missing_ego_status=True).get_data_info(0)
    for bad in ([1, 1, 0], [0, 0, 2], [0, 0, 0], [0, 0, 0, 1], [0.5, 0, 0.5]):
        path = write_infos(raw_infos, tmp_path, lambda info: info.update(gt_ego_fut_cmd=bad))
        with pytest.raises(ValueError, match='one-hot'):
            make_dataset(data_root, ann_file=path).get_data_info(0)
    no_map = write_infos(raw_infos, tmp_path, lambda info: info.pop('map_annos'))
    with pytest.raises(KeyError, match='map_annos'):
        make_dataset(data_root, ann_file=no_map).get_data_info(0)

    def drop_futures(info):
        for inst in info['instances']:
            inst.pop('fut_traj')
    no_fut = write_infos(raw_infos, tmp_path, drop_futures)
    with pytest.raises(KeyError, match='fut_traj'):
        make_dataset(data_root, ann_file=no_fut).get_data_info(0)


def test_field_checks():
    good = dict(gt_ego_fut_trajs=np.zeros((6, 2)), gt_ego_fut_masks=np.ones(6),
                gt_ego_fut_cmd=[1, 0, 0])
    assert ego_future(good, 6, 's')[2].tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match=r'\(6, 2\)'):
        ego_future(dict(good, gt_ego_fut_trajs=np.zeros((5, 2))), 6, 's')
    with pytest.raises(KeyError, match='gt_ego_fut_cmd'):
        ego_future(dict(good, gt_ego_fut_cmd=None), 6, 's')
    ann = dict(gt_labels_3d=np.zeros(2), fut_traj=np.zeros((2, 12, 2)), fut_mask=np.ones((2, 12)))
    assert [a.shape for a in agent_futures(ann, 12, 's')] == [(2, 12, 2), (2, 12)]
    with pytest.raises(ValueError, match='fut_traj'):
        agent_futures(dict(ann, fut_traj=np.zeros((2, 6, 2))), 12, 's')
    with pytest.raises(ValueError, match='fut_mask'):
        agent_futures(dict(ann, fut_mask=np.ones((3, 12))), 12, 's')


def test_test_mode_fields(data_root):
    ds = make_dataset(data_root, test_mode=True, load_eval_anns=True, with_fut_boxes=True)
    info = ds.get_data_info(0)
    assert 'gt_agent_fut_trajs' not in info and info['gt_ego_fut_cmd'].shape == (3, )
    ev = info['eval_ann_info']
    assert ev['gt_agent_fut_trajs'].shape == (len(ev['gt_labels_3d']), 12, 2)
    assert ev['gt_ego_fut_cmd'] is info['gt_ego_fut_cmd'] and len(ev['fut_boxes']) == 3


# -- the adaptor and the whole pipeline --------------------------------------------------------

def adaptor_input(**extra):
    results = dict(lidar2img=[np.eye(4)], img_shape=[(64, 176)], lidar2global=np.eye(4),
                   cam_intrinsic=[np.eye(4)], gt_labels_3d=np.array([0, 3]),
                   gt_bboxes_3d=np.zeros((2, 9), np.float32),
                   gt_agent_fut_trajs=torch.zeros(2, 12, 2, dtype=torch.float64),
                   gt_agent_fut_masks=np.ones((2, 12)), gt_map_labels=[1],
                   gt_map_pts=np.zeros((1, 38, 20, 2)), gt_ego_fut_trajs=np.zeros((6, 2)),
                   gt_ego_fut_masks=[1] * 6, gt_ego_fut_cmd=[0, 1, 0], ego_status=[0] * 10,
                   instance_id=np.array([4, 5]))
    results.update(extra)
    return results


def test_adaptor():
    out = NuScenesSparseDriveAdaptor()(adaptor_input())
    dtypes = dict(gt_map_labels=np.int64)
    for key in SPARSEDRIVE_META_KEYS[len(SPARSE4D_META_KEYS):]:
        assert isinstance(out[key], np.ndarray), key
        assert out[key].dtype == dtypes.get(key, np.float32), key
    assert out['projection_mat'].shape == (1, 4, 4)  # the Sparse4D part ran
    with pytest.raises(ValueError, match='2 boxes'):
        NuScenesSparseDriveAdaptor()(adaptor_input(gt_agent_fut_trajs=np.zeros((3, 12, 2)),
                                                   gt_agent_fut_masks=np.zeros((3, 12))))
    results = adaptor_input()
    results.pop('gt_agent_fut_masks')
    with pytest.raises(KeyError, match='gt_agent_fut'):
        NuScenesSparseDriveAdaptor()(results)
    results = adaptor_input()
    results.pop('gt_map_pts')
    with pytest.raises(KeyError, match='gt_map_pts'):
        NuScenesSparseDriveAdaptor()(results)
    with pytest.raises(ValueError, match='gt_map_pts'):
        NuScenesSparseDriveAdaptor()(adaptor_input(gt_map_pts=np.zeros((2, 38, 20, 2))))
    with pytest.raises(ValueError, match='ego_status'):
        NuScenesSparseDriveAdaptor()(adaptor_input(ego_status=[0] * 9))
    with pytest.raises(ValueError, match='gt_ego_fut_masks'):
        NuScenesSparseDriveAdaptor()(adaptor_input(gt_ego_fut_masks=[1] * 5))
    rotated = adaptor_input(aug_config=dict(rotate_3d=0.1))
    with pytest.raises(ValueError, match='rotate_3d'):
        NuScenesSparseDriveAdaptor()(rotated)
    NuScenesSparseDriveAdaptor(allow_rotate_3d=True)(adaptor_input(
        aug_config=dict(rotate_3d=0.1)))
    # Test time: no ground truth, only the ego inputs.
    out = NuScenesSparseDriveAdaptor()(dict(
        lidar2img=[np.eye(4)], img_shape=[(64, 176)], lidar2global=np.eye(4),
        cam_intrinsic=[np.eye(4)], ego_status=[0] * 10, gt_ego_fut_cmd=[0, 0, 1]))
    assert 'gt_agent_fut_trajs' not in out and out['ego_status'].shape == (10, )


def train_pipeline():
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
        TRANSFORMS.build(dict(type='turbox_mm.VectorizeMap', roi_size=(30, 60),
                              simplify=False, normalize=False, sample_num=20, permute=True)),
        TRANSFORMS.build(dict(type='turbox_mm.NuScenesSparseDriveAdaptor')),
        Pack3DDetInputs(keys=['img', 'gt_bboxes_3d', 'gt_labels_3d'],
                        meta_keys=SPARSEDRIVE_META_KEYS),
    ]


def test_full_pipeline(data_root, raw_infos):
    ds = make_dataset(data_root, train_pipeline())
    out = ds[dict(idx=1, aug_seed=3)]
    assert out['inputs']['img'].shape == (6, 3, 64, 176)
    sample = out['data_samples']
    meta = sample.metainfo
    for key in SPARSEDRIVE_META_KEYS:
        assert key in meta, key
    raw = raw_infos['data_list'][meta['sample_idx']]
    labels = sample.gt_instances_3d.labels_3d
    n = len(labels)
    assert n > 3 and meta['instance_id'].shape == (n, )
    assert meta['gt_agent_fut_trajs'].shape == (n, 12, 2)
    assert meta['gt_agent_fut_masks'].shape == (n, 12)
    by_id = raw_by_id(raw)
    for row, iid in enumerate(meta['instance_id'].tolist()):
        np.testing.assert_allclose(meta['gt_agent_fut_trajs'][row], by_id[iid]['fut_traj'],
                                   rtol=1e-6)
    expected = VectorizeMap()(dict(map_annos=raw['map_annos']))
    np.testing.assert_array_equal(meta['gt_map_labels'], expected['gt_map_labels'])
    np.testing.assert_array_equal(meta['gt_map_pts'], expected['gt_map_pts'])
    assert meta['gt_map_pts'].dtype == np.float32 and len(meta['gt_map_labels']) > 0
    assert set(meta['gt_map_labels'].tolist()) <= {0, 1, 2}
    assert 1 in meta['gt_map_labels'] and 2 in meta['gt_map_labels']  # dividers, boundaries
    for key, shape in (('gt_ego_fut_trajs', (6, 2)), ('gt_ego_fut_masks', (6, )),
                       ('gt_ego_fut_cmd', (3, )), ('ego_status', (10, ))):
        assert meta[key].shape == shape and meta[key].dtype == np.float32, key
        np.testing.assert_allclose(meta[key], raw[key], rtol=1e-6)
    # Batching as the detector will: stack the ego keys, keep the others per sample.
    other = ds[dict(idx=5, aug_seed=4)]['data_samples'].metainfo
    stacked = np.stack([meta['gt_ego_fut_cmd'], other['gt_ego_fut_cmd']])
    assert stacked.shape == (2, 3)
    # A BEV rotation is refused: map points and trajectories would not follow it.
    rotating = make_dataset(data_root, train_pipeline(),
                            data_aug_conf=dict(AUG_CONF, rot3d_range=(-0.3, 0.3)))
    with pytest.raises(ValueError, match='rotate_3d'):
        rotating[dict(idx=1, aug_seed=3)]
