"""MapTR v2's data side: the depth ground truth (``PointToMultiViewDepth``), its padding
(``PadMultiViewImageDepth``), the auxiliary segmentation masks (``RasterizeMapGT``,
``turbox_mm.datasets.map_gt.seg_masks``) and their packing (``PackMapTRInputs``).

Upstream: hustvl/MapTR @ 69ab751, ``pipelines/loading.py`` (``CustomPointToMultiViewDepth``),
``pipelines/transform_3d.py`` (``PadMultiViewImageDepth``), ``nuscenes_offlinemap_dataset.py``
(``VectorizedLocalMap`` with ``aux_seg``). The references below are plain per-point /
per-line restatements of those steps.

- Depth: equal to a per-point reference (nearest point wins, ``round`` half to even, the
  bounds at ``W - 1 + 0.4`` / ``W - 0.5`` and ``d`` at 1 and 35); upstream's chain
  lidar -> lidar ego -> global -> camera ego -> camera, then intrinsics and the image scale,
  gives the pixels of our ``lidar2img`` after ``RandomScaleImageMultiViewImage`` when
  ``lidar2cam`` comes from mmdet3d 1.4's own converter functions.
- Masks: hand-checked cells and orientation (row = y, column = x, row 0 at y = -30), the
  truncation of upstream's int32 cast, behind-camera samples dropped, and equality with
  shapely-based references on a synthetic sample.
- A tiny synthetic dataset through the whole v2 training pipeline.
"""
import importlib.util
import os.path as osp

import cv2
import numpy as np
import pytest
import torch

from conftest import run_python
from turbox_mm.datasets.map_gt import bev_seg_mask, points_along, pv_seg_mask
from turbox_mm.datasets.transforms import (NuScenesMapTRAdaptor, PackMapTRInputs,
                                           PadMultiViewImageDepth, PointToMultiViewDepth,
                                           RandomScaleImageMultiViewImage, RasterizeMapGT)

GRID = dict(depth=[1.0, 35.0, 0.5])
# lidar (x right, y forward, z up) -> camera (x right, y down, z forward), looking along y
LOOK_FORWARD = np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])


# --- readable references -------------------------------------------------------------------
def reference_depth(points, lidar2img, height, width, depth_range=(1.0, 35.0)):
    """One point at a time: project with ``lidar2img``, round, keep the nearest per pixel."""
    out = np.zeros((len(lidar2img), height, width), np.float32)
    for cam, matrix in enumerate(lidar2img):
        nearest = {}
        for x, y, z in np.asarray(points, np.float64)[:, :3]:
            ud, vd, d, _ = np.asarray(matrix, np.float64) @ [x, y, z, 1.0]
            if d == 0:
                continue
            u, v = round(ud / d), round(vd / d)  # Python's round: half to even
            if 0 <= u < width and 0 <= v < height and depth_range[0] <= d < depth_range[1]:
                nearest[v, u] = min(d, nearest.get((v, u), np.inf))
        for (v, u), d in nearest.items():
            out[cam, v, u] = d
    return out


def reference_bev_mask(polylines, bev_size=(200, 100), patch_size=(60.0, 30.0), thickness=3):
    """Upstream's ``line_ego_to_mask`` steps with shapely: scale about the origin, shift by
    half the canvas, int32 cast, ``cv2.polylines``."""
    from shapely import affinity
    from shapely.geometry import LineString
    mask = np.zeros((1, ) + tuple(bev_size), np.uint8)
    for polyline in polylines:
        line = affinity.scale(LineString(polyline), bev_size[1] / patch_size[1],
                              bev_size[0] / patch_size[0], origin=(0, 0))
        line = affinity.affine_transform(line, [1.0, 0.0, 0.0, 1.0, bev_size[1] / 2,
                                                bev_size[0] / 2])
        coords = np.array(list(line.coords), dtype=np.int32)[:, :2]
        cv2.polylines(mask[0], np.int32([coords]), False, color=1, thickness=thickness)
    return mask


def reference_pv_mask(polylines, lidar2img, feat_shape, stride=32, z=-1.6):
    """Upstream's ``line_ego_to_pvmask`` steps: 200 shapely samples, ``perspective``."""
    from shapely.geometry import LineString
    mask = np.zeros((len(lidar2img), 1) + tuple(feat_shape), np.uint8)
    scale = np.eye(4)
    scale[0, 0] = scale[1, 1] = 1 / stride
    for cam, matrix in enumerate(lidar2img):
        lidar2feat = scale @ np.asarray(matrix, np.float64)
        for polyline in polylines:
            line = LineString(polyline)
            xy = np.array([list(line.interpolate(s).coords)[0]
                           for s in np.linspace(0, line.length, 200)])
            coords = np.concatenate([xy, np.full((200, 1), z), np.ones((200, 1))], 1).T
            pix = lidar2feat @ coords
            pix = pix[:, pix[2] > 0]
            pix = (pix[:2] / (pix[2] + 1e-7)).T
            cv2.polylines(mask[cam, 0], np.int32([pix]), False, color=1, thickness=1)
    return mask


# --- a toy camera rig ----------------------------------------------------------------------
def rot_z(yaw):
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def toy_sample(width=320, height=180, yaws=(0, -55, 55, 180, -110, 110), focal=250.0):
    """Cameras around the lidar (yaw in degrees, 0 = forward), images of ``width x height``,
    as an mmdet3d v2 info after loading."""
    images = {}
    for i, yaw in enumerate(yaws):
        lidar2cam = np.eye(4)
        lidar2cam[:3, :3] = LOOK_FORWARD @ rot_z(np.radians(yaw)).T
        lidar2cam[:3, 3] = [0.05 * i, -0.3, 0.1]
        images[f'CAM_{i}'] = dict(
            cam2img=[[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]],
            lidar2cam=lidar2cam.tolist(), cam2ego=np.eye(4).tolist())
    return dict(token='toy-sample', images=images, ego2global=np.eye(4).tolist(),
                lidar_points=dict(lidar2ego=np.eye(4).tolist()),
                img=[np.zeros((height, width, 3), np.float32) for _ in yaws])


def scaled_toy_sample(**kwargs):
    results = NuScenesMapTRAdaptor()(toy_sample(**kwargs))
    return RandomScaleImageMultiViewImage([0.5])(results)


def random_points(rng, count=3000):
    points = rng.uniform([-40, -40, -3], [40, 40, 3], (count, 3))
    # the same rays again, farther, in the other order: several points per pixel
    farther = points[::-1] * rng.uniform(1.0001, 1.3, (count, 1))
    return np.concatenate([points, farther]).astype(np.float32)


# --- depth ---------------------------------------------------------------------------------
def test_depth_equals_per_point_reference_after_rescale():
    rng = np.random.default_rng(0)
    results = scaled_toy_sample()
    points = random_points(rng)
    results['points'] = points
    out = PointToMultiViewDepth(GRID)(results)
    depth = out['gt_depth']
    assert depth.shape == (6, 90, 160) and depth.dtype == np.float32
    expected = reference_depth(points, out['lidar2img'], 90, 160)
    np.testing.assert_array_equal(depth, expected)
    assert (depth > 0).sum() > 1000 and depth.max() < 35 and depth[depth > 0].min() >= 1


def test_depth_takes_mmdet3d_points():
    from mmdet3d.structures import LiDARPoints
    rng = np.random.default_rng(1)
    points = np.concatenate([random_points(rng, 500), np.zeros((1000, 2), np.float32)], 1)
    results = scaled_toy_sample()
    results['points'] = LiDARPoints(points, points_dim=5)
    depth = PointToMultiViewDepth(GRID)(results)['gt_depth']
    np.testing.assert_array_equal(depth, reference_depth(points, results['lidar2img'], 90, 160))


def one_camera(points, width=160, height=90, focal=64.0):
    """A camera at the lidar origin with the lidar frame as its own (z = depth), no
    principal-point offset: u = focal x / z, v = focal y / z (a power-of-two focal length
    keeps the half-pixel cases exact)."""
    results = dict(token='one-camera', points=np.asarray(points, np.float64),
                   img=[np.zeros((height, width, 3), np.float32)],
                   images=dict(CAM_FRONT=dict(lidar2cam=np.eye(4).tolist())),
                   camera_intrinsics=[np.diag([focal, focal, 1.0, 1.0])],
                   img_aug_matrix=[np.eye(4)])
    return PointToMultiViewDepth(GRID)(results)['gt_depth'][0]


def at_pixel(u, v, d, focal=64.0):
    return [u * d / focal, v * d / focal, d]


def test_depth_rounding_and_bounds():
    width, height = 160, 90
    depth = one_camera([
        at_pixel(width - 1 + 0.4, 10, 10.0),  # rounds to the last column: kept
        at_pixel(width - 0.5, 20, 10.0),  # 159.5 rounds (half to even) to 160: dropped
        at_pixel(-0.5, 30, 10.0),  # -0.5 rounds to -0: column 0, kept
        at_pixel(-0.6, 31, 10.0),  # -1: dropped
        at_pixel(5, height - 0.5, 10.0),  # 89.5 rounds to 90: dropped
        at_pixel(2.5, 40, 10.0),  # half to even: column 2
        at_pixel(3.5, 41, 10.0),  # column 4
        at_pixel(50, 50, 0.999),  # too near
        at_pixel(51, 50, 1.0),  # the nearest depth kept
        at_pixel(52, 50, 34.999),  # kept
        at_pixel(53, 50, 35.0),  # the far bound is open: dropped
        [0.0, 0.0, -5.0],  # behind the camera
        [0.0, 0.0, 0.0],  # at the camera: 0 / 0
    ])
    assert torch.round(torch.tensor([2.5, 3.5, -0.5])).tolist() == [2.0, 4.0, -0.0]  # upstream
    kept = {(int(v), int(u)): float(depth[v, u]) for v, u in zip(*np.nonzero(depth))}
    assert kept == pytest.approx({(10, width - 1): 10.0, (30, 0): 10.0, (40, 2): 10.0,
                                  (41, 4): 10.0, (50, 51): 1.0, (50, 52): 34.999})


def test_nearest_point_wins_in_either_order():
    near, far = at_pixel(20, 30, 5.0), at_pixel(20, 30, 7.0)
    for points in ([near, far], [far, near], [far, near, far]):
        depth = one_camera(points)
        assert depth[30, 20] == 5.0 and np.count_nonzero(depth) == 1
    # two pixels in a row do not mix
    depth = one_camera([at_pixel(20, 30, 7.0), at_pixel(21, 30, 5.0), at_pixel(20, 30, 9.0)])
    assert depth[30, 20] == 7.0 and depth[30, 21] == 5.0


def test_upstream_float32_sort_key_can_tie_where_we_keep_the_nearest():
    """Upstream sorts by ``rank + depth / 100`` in float32 (rank = u + v W): at 800 x 450 and
    v = 440 the float32 spacing is 1/32, so depths 10.0 and 10.5 in one pixel get the same
    key and either may win; here the nearer one always does (a documented deviation)."""
    rank = 700 + 440 * 800
    keys = torch.tensor([rank, rank], dtype=torch.float32) + torch.tensor([10.0, 10.5]) / 100
    assert keys[0] == keys[1]
    depth = one_camera([at_pixel(700, 440, 10.5), at_pixel(700, 440, 10.0)], width=800,
                       height=450)
    assert depth[440, 700] == 10.0


def test_depth_downsample():
    results = dict(token='t', points=np.array([at_pixel(41, 21, 6.0), at_pixel(40, 20, 8.0)]),
                   img=[np.zeros((90, 160, 3))],
                   images=dict(CAM_FRONT=dict(lidar2cam=np.eye(4).tolist())),
                   img_aug_matrix=[np.eye(4)])
    results['camera_intrinsics'] = [np.diag([64.0, 64.0, 1.0, 1.0])]
    coarse = PointToMultiViewDepth(GRID, downsample=4)(results)['gt_depth'][0]
    # 41 / 4 = 10.25 -> 10, 21 / 4 = 5.25 -> 5; 40 / 4 = 10, 20 / 4 = 5: one cell, nearest
    assert coarse.shape == (22, 40) and coarse[5, 10] == 6.0 and np.count_nonzero(coarse) == 1


# --- upstream's projection chain vs our lidar2img -------------------------------------------
def _quaternion(yaw, pitch=0.0):
    from pyquaternion import Quaternion
    turn, tilt = Quaternion(axis=[0, 0, 1], angle=yaw), Quaternion(axis=[0, 1, 0], angle=pitch)
    return list(turn * tilt)


def _pose(rotation, translation):
    from pyquaternion import Quaternion
    pose = np.eye(4)
    pose[:3, :3] = Quaternion(rotation).rotation_matrix
    pose[:3, 3] = translation
    return pose


class StubNuScenes:
    """The three tables ``obtain_sensor2top`` reads."""

    def __init__(self, tables):
        self.tables = tables

    def get(self, table, token):
        return self.tables[table][token]

    def get_sample_data_path(self, token):
        return f'samples/{token}.jpg'


def test_lidar2img_equals_upstream_chain():
    """Upstream projects with lidar -> lidar ego -> global -> camera ego -> camera (both ego
    poses), then the intrinsics and the scale. mmdet3d 1.4's converter (``obtain_sensor2top``
    and ``update_infos_to_v2``'s inversion, run here on stub tables in which the camera's ego
    pose differs from the lidar's) stores that chain as ``lidar2cam``; after
    ``NuScenesMapTRAdaptor`` and ``RandomScaleImageMultiViewImage`` our ``lidar2img`` gives
    upstream's pixels, and ``PointToMultiViewDepth`` the per-point reference's maps."""
    import mmdet3d
    path = osp.join(osp.dirname(mmdet3d.__file__), '.mim', 'tools', 'dataset_converters',
                    'nuscenes_converter.py')
    if not osp.isfile(path):
        pytest.skip('this mmdet3d install does not ship tools/ in .mim')
    spec = importlib.util.spec_from_file_location('mmdet3d_nuscenes_converter', path)
    converter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter)
    from pyquaternion import Quaternion

    lidar2ego_q, lidar2ego_t = _quaternion(np.radians(-90.5), 0.01), [0.94, 0.0, 1.84]
    lidar_ego_q, lidar_ego_t = _quaternion(np.radians(30.0)), [411.3, 1180.9, 0.0]
    # the camera fires 20 ms later: the ego has moved 0.3 m and turned 0.6 degrees
    cam_ego_q, cam_ego_t = _quaternion(np.radians(30.6)), [411.56, 1181.05, 0.0]
    cam2ego_q = list(Quaternion(matrix=rot_z(np.radians(-90.0)) @ LOOK_FORWARD.T))
    cam2ego_t = [1.7, 0.01, 1.5]
    tables = dict(sample_data=dict(cam=dict(token='cam', calibrated_sensor_token='cs',
                                            ego_pose_token='pose', timestamp=20000)),
                  calibrated_sensor=dict(cs=dict(translation=cam2ego_t, rotation=cam2ego_q)),
                  ego_pose=dict(pose=dict(translation=cam_ego_t, rotation=cam_ego_q)))
    l2e_r = Quaternion(lidar2ego_q).rotation_matrix
    e2g_r = Quaternion(lidar_ego_q).rotation_matrix
    sweep = converter.obtain_sensor2top(StubNuScenes(tables), 'cam', np.array(lidar2ego_t),
                                        l2e_r, np.array(lidar_ego_t), e2g_r, 'CAM_FRONT')
    # update_infos_to_v2: lidar2cam is the inverse of sensor2lidar, stored in float32
    rot, trans = sweep['sensor2lidar_rotation'], sweep['sensor2lidar_translation']
    lidar2cam = np.eye(4)
    lidar2cam[:3, :3] = rot.T
    lidar2cam[:3, 3:4] = -rot.T @ trans.reshape(3, 1)
    intrinsic = [[1266.4, 0.0, 816.3], [0.0, 1266.4, 491.5], [0.0, 0.0, 1.0]]
    info = dict(token='chain', images=dict(CAM_FRONT=dict(
                    cam2img=intrinsic, cam2ego=_pose(cam2ego_q, cam2ego_t).tolist(),
                    lidar2cam=lidar2cam.astype(np.float32).tolist())),
                ego2global=_pose(lidar_ego_q, lidar_ego_t).tolist(),
                lidar_points=dict(lidar2ego=_pose(lidar2ego_q, lidar2ego_t).tolist()),
                img=[np.zeros((900, 1600, 3), np.float32)])
    ours = RandomScaleImageMultiViewImage([0.5])(NuScenesMapTRAdaptor()(info))

    # upstream's chain (loading.py @ 69ab751), in float64
    lidar2img_chain = np.linalg.inv(_pose(cam_ego_q, cam_ego_t) @ _pose(cam2ego_q, cam2ego_t)) \
        @ _pose(lidar_ego_q, lidar_ego_t) @ _pose(lidar2ego_q, lidar2ego_t)
    viewpad = np.eye(4)
    viewpad[:3, :3] = intrinsic
    cam2img_chain = viewpad @ lidar2img_chain
    rng = np.random.default_rng(2)
    points = rng.uniform([-30, -30, -2], [30, 30, 2], (4000, 3))
    homogeneous = np.concatenate([points, np.ones((len(points), 1))], 1)

    def pixels(matrix, aug=np.eye(4)):
        projected = homogeneous @ np.asarray(matrix).T
        uvd = np.concatenate([projected[:, :2] / projected[:, 2:3], projected[:, 2:3]], 1)
        return uvd @ aug[:3, :3].T + aug[:3, 3]

    front = pixels(cam2img_chain)[:, 2] > 1
    upstream = pixels(cam2img_chain, ours['img_aug_matrix'][0])[front]
    np.testing.assert_allclose(pixels(ours['lidar2img'][0])[front], upstream, atol=1e-3)
    # the camera's own ego pose matters: through the lidar's it is pixels off
    lidar_pose_only = viewpad @ np.linalg.inv(_pose(cam2ego_q, cam2ego_t)) \
        @ _pose(lidar2ego_q, lidar2ego_t)
    assert np.abs(pixels(lidar_pose_only, ours['img_aug_matrix'][0])[front]
                  - upstream).max() > 5

    ours['points'] = points.astype(np.float32)
    depth = PointToMultiViewDepth(GRID)(ours)['gt_depth']
    assert depth.shape == (1, 450, 800) and np.count_nonzero(depth) > 300
    np.testing.assert_array_equal(depth, reference_depth(ours['points'], ours['lidar2img'],
                                                         450, 800))


# --- padding -------------------------------------------------------------------------------
def test_pad_depth_with_the_images():
    rng = np.random.default_rng(3)
    depth = rng.uniform(0, 30, (2, 45, 80)).astype(np.float32)
    results = dict(img=[np.ones((45, 80, 3), np.float32)] * 2, gt_depth=depth.copy())
    out = PadMultiViewImageDepth(size_divisor=32)(results)
    assert out['gt_depth'].shape == (2, 64, 96) and out['gt_depth'].dtype == np.float32
    np.testing.assert_array_equal(out['gt_depth'][:, :45, :80], depth)
    assert not out['gt_depth'][:, 45:].any() and not out['gt_depth'][:, :, 80:].any()
    assert out['img_shape'] == [(64, 96, 3)] * 2 and out['ori_shape'] == [(45, 80, 3)] * 2
    assert out['pad_size_divisor'] == 32
    out = PadMultiViewImageDepth(size=(50, 90))(dict(img=[np.ones((45, 80, 3))],
                                                     gt_depth=[depth[0]]))
    assert out['gt_depth'].shape == (1, 50, 90) and out['img_shape'] == [(50, 90, 3)]
    from turbox_mm.registry import TRANSFORMS
    assert isinstance(TRANSFORMS.build(dict(type='turbox_mm.PadMultiViewImageDepth',
                                            size_divisor=32)), PadMultiViewImageDepth)


def test_pad_depth_errors():
    with pytest.raises(KeyError, match='sample 7 .*PointToMultiViewDepth must come first'):
        PadMultiViewImageDepth(size_divisor=32)(dict(sample_idx=7, img=[np.ones((4, 4, 3))]))
    with pytest.raises(ValueError, match='2 depth maps for 1 images'):
        PadMultiViewImageDepth(size_divisor=32)(dict(img=[np.ones((4, 4, 3))],
                                                     gt_depth=np.zeros((2, 4, 4))))


# --- BEV mask ------------------------------------------------------------------------------
def test_bev_mask_by_hand():
    """A 20 x 10 grid over 60 m x 30 m (3 m cells): column = trunc(x / 3 + 5), row =
    trunc(y / 3 + 10)."""
    lines = [np.array([[-15.0, -28.5], [15.0, -28.5]]),  # row 0.5 -> 0, every column
             np.array([[4.5, 0.0], [4.5, 9.0]]),  # column 6.5 -> 6, rows 10 .. 13
             np.array([[-15.2, 21.0], [-15.2, 27.0]])]  # column -0.07 truncates to 0: 17..19
    mask = bev_seg_mask(lines, [0, 1, 2], bev_size=(20, 10), thickness=1)
    expected = np.zeros((1, 20, 10), np.uint8)
    expected[0, 0, :] = 1
    expected[0, 10:14, 6] = 1
    expected[0, 17:20, 0] = 1
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(mask, reference_bev_mask(lines, (20, 10), thickness=1))


def test_bev_mask_orientation_at_full_size():
    """A point at lidar (x, y) lands in row (y + 30) / 0.3 and column (x + 15) / 0.3."""
    line = np.array([[6.0, -24.0], [6.15, -24.0]])  # x = 6 -> column 70; y = -24 -> row 20
    mask = bev_seg_mask([line], [2], thickness=1)
    assert mask.shape == (1, 200, 100) and mask.dtype == np.uint8
    assert list(zip(*np.nonzero(mask[0]))) == [(20, 70)]
    thick = bev_seg_mask([line], [2])  # upstream's thickness 3 (5 cells across in cv2)
    rows, cols = np.nonzero(thick[0])
    assert rows.min() == 18 and rows.max() == 22 and cols.min() == 68 and cols.max() == 72


def test_bev_mask_classes():
    lines = [np.array([[0.0, 0.0], [3.0, 0.0]]), np.array([[0.0, 9.0], [3.0, 9.0]])]
    mask = bev_seg_mask(lines, [2, 0], bev_size=(20, 10), seg_classes=3, thickness=1)
    assert mask.shape == (3, 20, 10) and not mask[1].any()
    assert mask[2, 10].any() and not mask[2, 13].any() and mask[0, 13].any()
    with pytest.raises(ValueError, match='label 3 .*seg_classes=3'):
        bev_seg_mask(lines, [3, 0], seg_classes=3)


# --- PV mask -------------------------------------------------------------------------------
def front_camera(width=800, focal=400.0, cx=400.0, cy=240.0):
    """lidar2img of a camera at the lidar origin looking along lidar y."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.array([[focal, 0, cx], [0, focal, cy], [0, 0, 1]]) @ LOOK_FORWARD
    return matrix


def test_pv_mask_line_in_front_lands_on_its_projection():
    """A line 10 m ahead at z = -1.6 from x = -2 to 2: v = 400 * 1.6 / 10 + 240 = 304 ->
    row 9.5 -> 9; u = 40 x + 400 from 320 to 480, i.e. 10 to 15 in the 15 x 25 map, which
    upstream's division by ``depth + 1e-7`` puts just below: truncated to columns 9 .. 14."""
    line = np.array([[-2.0, 10.0], [2.0, 10.0]])
    mask = pv_seg_mask([line], [0], [front_camera()], (15, 25))
    expected = np.zeros((1, 1, 15, 25), np.uint8)
    expected[0, 0, 9, 9:15] = 1
    np.testing.assert_array_equal(mask, expected)


def test_pv_mask_drops_points_behind_the_camera():
    behind = np.array([[-2.0, -10.0], [2.0, -10.0]])
    mask = pv_seg_mask([behind], [0], [front_camera()], (15, 25))
    assert not mask.any()
    # without the depth test the mirrored projection would land inside the map
    coords = np.array([[-2.0, -10.0, -1.6, 1.0], [2.0, -10.0, -1.6, 1.0]]).T
    naive = np.diag([1 / 32, 1 / 32, 1, 1]) @ front_camera() @ coords
    naive = naive[:2] / naive[2]
    assert ((naive >= 0) & (naive < [[25], [15]])).all()
    # a line from 5 m behind to 20 m ahead at x = 1: only the part ahead is drawn, at
    # u / 32 = 12.5 + 12.5 / y >= 13.125 (the part behind would fall in columns 10 .. 12)
    across = np.array([[1.0, -5.0], [1.0, 20.0]])
    mask = pv_seg_mask([across], [0], [front_camera()], (15, 25))
    expected = reference_pv_mask([across], [front_camera()], (15, 25))
    np.testing.assert_array_equal(mask, expected)
    assert mask.any() and not mask[0, 0, :, :13].any()


def test_pv_mask_equals_reference_on_random_lines():
    rng = np.random.default_rng(4)
    results = scaled_toy_sample(width=800, height=480)
    lines = [np.cumsum(rng.normal(0, 4, (rng.integers(2, 6), 2)), 0) for _ in range(12)]
    lines.append(np.array([[-3.0, -3.0], [3.0, -3.0], [3.0, 3.0], [-3.0, 3.0], [-3.0, -3.0]]))
    mask = pv_seg_mask(lines, [0] * len(lines), results['lidar2img'], (7, 12),
                       feat_down_sample=32)
    np.testing.assert_array_equal(mask, reference_pv_mask(lines, results['lidar2img'], (7, 12)))
    assert mask.any()


def test_points_along_matches_shapely():
    from shapely.geometry import LineString
    line = np.array([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0], [3.0, -1.0], [3.0, -1.0]])
    shapely_line = LineString(line)
    expected = [list(shapely_line.interpolate(s).coords)[0]
                for s in np.linspace(0, shapely_line.length, 7)]
    np.testing.assert_allclose(points_along(line, 7), expected, atol=1e-12)


# --- RasterizeMapGT --------------------------------------------------------------------------
def rasterize_input(**overrides):
    results = scaled_toy_sample(width=640, height=360)
    results = PadMultiViewImageDepth(size_divisor=32)(dict(results, gt_depth=np.zeros(
        (6, 180, 320), np.float32)))
    results.update(gt_map_polylines=[np.array([[-2.0, 10.0], [2.0, 10.0]])],
                   gt_map_labels=np.array([0]))
    results.update(overrides)
    return results


def test_rasterize_map_gt_adds_both_masks():
    results = rasterize_input()
    out = RasterizeMapGT()(results)
    assert out['gt_map_bev_seg'].shape == (1, 200, 100)
    assert out['gt_map_bev_seg'].dtype == np.uint8 and out['gt_map_bev_seg'].any()
    pv = out['gt_map_pv_seg']
    assert pv.shape == (6, 1, 192 // 32, 320 // 32) and pv.dtype == np.uint8
    assert pv[0].any()  # the front camera sees the line
    np.testing.assert_array_equal(pv, reference_pv_mask(results['gt_map_polylines'],
                                                        results['lidar2img'], (6, 10)))
    assert set(RasterizeMapGT(pv_seg=False)(rasterize_input())) >= {'gt_map_bev_seg'}
    assert 'gt_map_pv_seg' not in RasterizeMapGT(pv_seg=False)(rasterize_input())
    assert 'gt_map_bev_seg' not in RasterizeMapGT(use_aux_seg=False)(rasterize_input())
    aux_seg_cfg = dict(use_aux_seg=True, bev_seg=True, pv_seg=True, seg_classes=1,
                       feat_down_sample=32, pv_thickness=1)  # upstream's config dict
    from turbox_mm.registry import TRANSFORMS
    t = TRANSFORMS.build(dict(type='turbox_mm.RasterizeMapGT', bev_size=(200, 100),
                              patch_size=(60.0, 30.0), **aux_seg_cfg))
    assert isinstance(t, RasterizeMapGT)


def test_rasterize_map_gt_errors():
    results = rasterize_input()
    del results['gt_map_polylines']
    with pytest.raises(KeyError, match="toy-sample .*gt_map_polylines.*LoadMapGT must come"):
        RasterizeMapGT()(results)
    results = rasterize_input()
    del results['lidar2img']
    with pytest.raises(KeyError, match='NuScenesMapTRAdaptor and RandomScale'):
        RasterizeMapGT()(results)
    unpadded = scaled_toy_sample()
    unpadded.update(gt_map_polylines=[np.zeros((2, 2))], gt_map_labels=np.array([0]))
    assert 'gt_map_bev_seg' in RasterizeMapGT(pv_seg=False)(dict(unpadded))
    with pytest.raises(KeyError, match='PadMultiViewImage or PadMultiViewImageDepth must'):
        RasterizeMapGT()(unpadded)
    rescaled_after_pad = RandomScaleImageMultiViewImage([0.5])(rasterize_input())
    with pytest.raises(ValueError, match='padding must come after RandomScale'):
        RasterizeMapGT()(rescaled_after_pad)
    with pytest.raises(ValueError, match='5 lidar2img for 6 cameras'):
        RasterizeMapGT()(rasterize_input(lidar2img=rasterize_input()['lidar2img'][:5]))


# --- depth errors --------------------------------------------------------------------------
def test_depth_errors_name_the_sample_and_key():
    results = scaled_toy_sample()
    with pytest.raises(KeyError, match='toy-sample .*"points".*LoadPointsFromFile'):
        PointToMultiViewDepth(GRID)(results)
    results['points'] = np.zeros((3, 5), np.float32)
    results['img_aug_matrix'] = results['img_aug_matrix'][:5]
    with pytest.raises(ValueError, match=r"toy-sample: camera counts differ: .*'img': 6.*"
                                         r"'img_aug_matrix': 5"):
        PointToMultiViewDepth(GRID)(results)
    results = scaled_toy_sample()
    results['points'] = np.zeros((3, 5), np.float32)
    results['lidar2img'] = results['lidar2img'][:5]
    with pytest.raises(ValueError, match="'img': 6, .*'lidar2img': 5"):
        PointToMultiViewDepth(GRID)(results)
    results = scaled_toy_sample()
    results['points'] = np.zeros((3, 5), np.float32)
    results['img'] = results['img'][:4]
    with pytest.raises(ValueError, match="'img': 4, 'images': 6"):
        PointToMultiViewDepth(GRID)(results)
    del results['camera_intrinsics']
    with pytest.raises(KeyError, match='"camera_intrinsics" .*NuScenesMapTRAdaptor'):
        PointToMultiViewDepth(GRID)(results)
    with pytest.raises(ValueError, match='depth=\\[min, max, step\\]'):
        PointToMultiViewDepth(dict(x=[-30, 30, 0.15]))


# --- packing -------------------------------------------------------------------------------
def test_pack_dense_targets():
    pack = PackMapTRInputs(keys=['img', 'gt_map_labels', 'gt_depth', 'gt_map_bev_seg',
                                 'gt_map_pv_seg'])
    results = dict(img=[np.zeros((96, 160, 3), np.float32)] * 6,
                   gt_map_labels=np.array([0, 1]),
                   gt_depth=np.full((6, 96, 160), 2.5, np.float32),
                   gt_map_bev_seg=np.ones((1, 200, 100), np.uint8),
                   gt_map_pv_seg=np.ones((6, 1, 3, 5), np.uint8))
    sample = pack(results)['data_samples']
    assert sample.gt_depth.dtype == torch.float32
    assert tuple(sample.gt_depth.shape) == (6, 96, 160)
    assert sample.gt_map_bev_seg.dtype == torch.uint8
    assert tuple(sample.gt_map_bev_seg.shape) == (1, 200, 100)
    assert sample.gt_map_pv_seg.dtype == torch.uint8
    assert tuple(sample.gt_map_pv_seg.shape) == (6, 1, 3, 5)
    assert sample.gt_instances_3d.labels.tolist() == [0, 1]
    assert 'gt_depth' not in sample.gt_instances_3d
    # test time: listed keys that the sample lacks are skipped
    sample = pack(dict(img=[np.zeros((96, 160, 3), np.float32)] * 6))['data_samples']
    assert 'gt_depth' not in sample and 'gt_map_pv_seg' not in sample
    with pytest.raises(ValueError, match='gt_map_pv_seg must have 4 dimensions'):
        pack(dict(gt_map_pv_seg=np.ones((6, 3, 5), np.uint8)))
    assert 'gt_depth' in repr(pack)


# --- the v2 training pipeline on a tiny synthetic dataset ----------------------------------
@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('maptr_v2') / 'nuscenes') + '/'
    proc = run_python(['tools/create_data.py', 'synthetic', '--out', root, '--scenes', '1',
                       '--frames', '2', '--image-size', '320x180', '--points', '3000',
                       '--sweeps', '0', '--val-scenes', '0', '--workers', '1',
                       '--no-gt-database', '--no-progress'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def test_v2_training_pipeline_on_synthetic_data(data_root):
    from mmdet3d.datasets import NuScenesDataset
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet3d')
    cameras = ['CAM_FRONT', 'CAM_FRONT_RIGHT', 'CAM_FRONT_LEFT', 'CAM_BACK', 'CAM_BACK_LEFT',
               'CAM_BACK_RIGHT']
    pipeline = [
        dict(type='turbox_mm.NuScenesMapTRAdaptor'),
        dict(type='LoadMultiViewImageFromFiles', to_float32=True, num_views=6),
        dict(type='turbox_mm.RandomScaleImageMultiViewImage', scales=[0.5]),
        dict(type='LoadPointsFromFile', coord_type='LIDAR', load_dim=5, use_dim=5),
        dict(type='turbox_mm.PointToMultiViewDepth', downsample=1, grid_config=GRID),
        dict(type='turbox_mm.PadMultiViewImageDepth', size_divisor=32),
        dict(type='turbox_mm.LoadMapGT', data_root=data_root, impl='fast', seed=0),
        dict(type='turbox_mm.RasterizeMapGT', bev_size=(200, 100), patch_size=(60.0, 30.0),
             use_aux_seg=True, bev_seg=True, pv_seg=True, seg_classes=1,
             feat_down_sample=32, pv_thickness=1),
        dict(type='turbox_mm.PackMapTRInputs',
             keys=['img', 'gt_depth', 'gt_map_labels', 'gt_map_shifts', 'gt_map_bboxes',
                   'gt_map_pts', 'gt_map_bev_seg', 'gt_map_pv_seg']),
    ]
    dataset = NuScenesDataset(
        data_root, 'nuscenes_infos_train.pkl', pipeline=pipeline,
        data_prefix=dict(pts='samples/LIDAR_TOP', **{c: f'samples/{c}' for c in cameras}),
        modality=dict(use_lidar=True, use_camera=True), test_mode=False,
        filter_empty_gt=False)
    np.random.seed(0)
    item = dataset[0]
    assert tuple(item['inputs']['img'].shape) == (6, 3, 96, 160)
    sample = item['data_samples']
    depth = sample.gt_depth
    assert depth.dtype == torch.float32 and tuple(depth.shape) == (6, 96, 160)
    assert (depth > 0).sum() > 100 and not depth[:, 90:].any()
    assert depth.max() < 35 and depth[depth > 0].min() >= 1
    # the maps are the per-point reference's, from the keyframe points and the final lidar2img
    info = dataset.get_data_info(0)
    points = np.fromfile(info['lidar_points']['lidar_path'], np.float32).reshape(-1, 5)
    lidar2img = sample.metainfo['lidar2img']
    np.testing.assert_array_equal(depth[:, :90].numpy(),
                                  reference_depth(points, lidar2img, 90, 160))
    # the masks are upstream's drawing of LoadMapGT's polylines
    polylines = PipelineMapGT(data_root)(info)
    bev = sample.gt_map_bev_seg
    assert bev.dtype == torch.uint8 and tuple(bev.shape) == (1, 200, 100)
    assert 500 < int(bev.sum()) < 20000
    np.testing.assert_array_equal(bev.numpy(), reference_bev_mask(polylines))
    pv = sample.gt_map_pv_seg
    assert pv.dtype == torch.uint8 and tuple(pv.shape) == (6, 1, 3, 5) and pv.any()
    np.testing.assert_array_equal(pv.numpy(), reference_pv_mask(polylines, lidar2img, (3, 5)))
    assert len(sample.gt_instances_3d.labels) == len(polylines)


class PipelineMapGT:
    """The sample's map polylines, as LoadMapGT cuts them."""

    def __init__(self, data_root):
        from turbox_mm.datasets.transforms import LoadMapGT
        self.load = LoadMapGT(data_root, impl='fast', seed=0)

    def __call__(self, info):
        return self.load(dict(info))['gt_map_polylines']
