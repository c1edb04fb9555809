"""BEVFusion's camera loader (``BEVLoadMultiViewImageFromFiles``) on synthetic nuScenes samples:
the camera matrices against a hand computation, RGB float32 images, the packed meta keys the
detector reads, and a missing image named with its sample."""
import copy

import numpy as np
import pytest
from PIL import Image

from conftest import make_tiny_synthetic
from turbox_mm.datasets.transforms import BEVLoadMultiViewImageFromFiles
from turbox_mm.registry import TRANSFORMS

CAMERAS = ('CAM_FRONT', 'CAM_FRONT_RIGHT', 'CAM_FRONT_LEFT', 'CAM_BACK', 'CAM_BACK_LEFT',
           'CAM_BACK_RIGHT')
LOADER = dict(type='turbox_mm.BEVLoadMultiViewImageFromFiles', to_float32=True,
              color_type='color')


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    """One synthetic scene of 3 frames (320 x 180 images) as mmdet3d's NuScenesDataset with
    the camera prefixes of upstream's config, without a pipeline."""
    from mmdet3d.datasets import NuScenesDataset
    from mmengine.registry import init_default_scope
    import turbox_mm  # noqa: F401
    init_default_scope('mmdet3d')
    root = str(make_tiny_synthetic(tmp_path_factory.mktemp('bevfusion_cam') / 'nus')) + '/'
    prefix = dict(pts='samples/LIDAR_TOP', sweeps='sweeps/LIDAR_TOP',
                  **{cam: f'samples/{cam}' for cam in CAMERAS})
    return NuScenesDataset(data_root=root, ann_file='nuscenes_infos_train.pkl', pipeline=[],
                           data_prefix=prefix, modality=dict(use_lidar=True, use_camera=True),
                           test_mode=True, box_type_3d='LiDAR')


def sample(dataset, index):
    return copy.deepcopy(dataset.get_data_info(index))


def test_registered_with_upstreams_defaults():
    loader = TRANSFORMS.build(dict(type='turbox_mm.BEVLoadMultiViewImageFromFiles'))
    assert isinstance(loader, BEVLoadMultiViewImageFromFiles)
    assert (loader.num_views, loader.num_ref_frames, loader.to_float32, loader.color_type) == \
        (5, -1, False, 'unchanged')
    with pytest.raises(NotImplementedError, match='num_ref_frames=2'):
        BEVLoadMultiViewImageFromFiles(num_ref_frames=2)


def test_matrices_of_a_known_camera():
    """A camera 1.5 m above the lidar, yawed 30 degrees: the matrices worked out by hand."""
    yaw = np.radians(30.0)
    # camera axes (x right, y down, z forward) in the lidar frame, forward = (cos, sin, 0)
    forward = np.array([np.cos(yaw), np.sin(yaw), 0.0])
    right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
    down = np.array([0.0, 0.0, -1.0])
    cam2lidar = np.eye(4)
    cam2lidar[:3, :3] = np.stack([right, down, forward], 1)
    cam2lidar[:3, 3] = [0.5, 0.2, 1.5]
    lidar2cam = np.linalg.inv(cam2lidar)
    intrinsic = np.array([[250.0, 0.0, 160.0], [0.0, 250.0, 90.0], [0.0, 0.0, 1.0]])
    from turbox_mm.datasets.transforms.bev_load_multiview_images import camera_matrices
    cam2img, l2c, c2l, lidar2img = camera_matrices(
        dict(cam2img=intrinsic.tolist(), lidar2cam=lidar2cam.tolist()))
    assert cam2img.dtype == np.float32 and lidar2img.dtype == np.float32
    assert l2c.dtype == np.float64 and c2l.dtype == np.float64
    np.testing.assert_array_equal(l2c, lidar2cam)
    want_cam2img = np.eye(4)
    want_cam2img[:3, :3] = intrinsic
    np.testing.assert_array_equal(cam2img, want_cam2img)
    np.testing.assert_allclose(c2l, cam2lidar, atol=1e-6)
    # a point 10 m ahead of the camera, 1 m right, 2 m down lands at (u, v) = (185, 140)
    point = cam2lidar @ np.array([1.0, 2.0, 10.0, 1.0])
    projected = lidar2img.astype(np.float64) @ point
    np.testing.assert_allclose(projected[:2] / projected[2], [185.0, 140.0], atol=1e-3)
    np.testing.assert_allclose(projected[2], 10.0, atol=1e-4)


@pytest.mark.parametrize('index', [0, 1, 2])
def test_synthetic_samples_matrices_against_a_hand_computation(dataset, index):
    info = sample(dataset, index)
    out = TRANSFORMS.build(LOADER)(sample(dataset, index))
    assert list(info['images']) == list(CAMERAS)
    assert out['img_path'] == [info['images'][cam]['img_path'] for cam in CAMERAS]
    for key in ('cam2img', 'ori_cam2img', 'lidar2cam', 'cam2lidar', 'lidar2img'):
        assert out[key].shape == (6, 4, 4), key
    assert out['ori_cam2img'] is not out['cam2img']
    np.testing.assert_array_equal(out['ori_cam2img'], out['cam2img'])
    for k, cam in enumerate(CAMERAS):
        intrinsic = np.array(info['images'][cam]['cam2img'])
        lidar2cam = np.array(info['images'][cam]['lidar2cam'])
        cam2img = np.eye(4)
        cam2img[:3, :3] = intrinsic
        np.testing.assert_array_equal(out['lidar2cam'][k], lidar2cam)
        np.testing.assert_allclose(out['cam2img'][k], cam2img, rtol=1e-7)
        np.testing.assert_allclose(out['cam2lidar'][k], np.linalg.inv(lidar2cam), atol=1e-6)
        np.testing.assert_allclose(out['lidar2img'][k], cam2img @ lidar2cam, rtol=1e-5,
                                   atol=1e-4)
    # every camera sees its own image centre straight ahead: the projection of a point on the
    # optical axis lands on the principal point
    for k, cam in enumerate(CAMERAS):
        ahead = out['cam2lidar'][k] @ np.array([0.0, 0.0, 20.0, 1.0])
        uvw = out['lidar2img'][k].astype(np.float64) @ ahead
        principal = np.array(info['images'][cam]['cam2img'])[:2, 2]
        np.testing.assert_allclose(uvw[:2] / uvw[2], principal, atol=1e-2)


def test_images_are_float32_rgb_as_pillow_decodes_them(dataset):
    out = TRANSFORMS.build(LOADER)(sample(dataset, 0))
    assert len(out['img']) == 6
    for img, path in zip(out['img'], out['img_path']):
        assert img.dtype == np.float32 and img.shape == (180, 320, 3)
        want = np.asarray(Image.open(path).convert('RGB'), dtype=np.float32)
        np.testing.assert_array_equal(img, want)
    assert out['img_shape'] == out['ori_shape'] == out['pad_shape'] == (180, 320)
    assert out['scale_factor'] == 1.0 and out['num_views'] == 5
    assert out['img_norm_cfg']['mean'].shape == (3, )


def test_channel_order_is_rgb(tmp_path):
    paths = []
    for k, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        paths.append(str(tmp_path / f'{k}.png'))
        Image.new('RGB', (20, 10), colour).save(paths[-1])
    images = {f'CAM_{k}': dict(img_path=p, cam2img=np.eye(3), lidar2cam=np.eye(4))
              for k, p in enumerate(paths)}
    out = TRANSFORMS.build(LOADER)(dict(images=images, sample_idx=0))
    assert out['img'][0][0, 0].tolist() == [255.0, 0.0, 0.0]
    assert out['img'][1][0, 0].tolist() == [0.0, 0.0, 255.0]
    uint8 = BEVLoadMultiViewImageFromFiles(color_type='color')(dict(images=images))
    assert uint8['img'][0].dtype == np.uint8


def test_different_sizes_are_padded_to_the_largest(tmp_path):
    sizes = [(20, 10), (16, 14)]  # (width, height)
    images = {}
    for k, size in enumerate(sizes):
        path = str(tmp_path / f'{k}.png')
        Image.new('RGB', size, (10, 20, 30)).save(path)
        images[f'CAM_{k}'] = dict(img_path=path, cam2img=np.eye(3), lidar2cam=np.eye(4))
    out = TRANSFORMS.build(LOADER)(dict(images=images))
    assert [img.shape for img in out['img']] == [(14, 20, 3)] * 2
    assert out['img'][0][10:].sum() == 0 and out['img'][1][:, 16:].sum() == 0
    assert out['img_shape'] == (14, 20)


def test_a_missing_image_names_the_file_and_the_sample(dataset, tmp_path):
    results = sample(dataset, 1)
    gone = str(tmp_path / 'CAM_BACK' / 'gone.jpg')
    results['images']['CAM_BACK']['img_path'] = gone
    with pytest.raises(FileNotFoundError) as error:
        TRANSFORMS.build(LOADER)(results)
    message = str(error.value)
    assert gone in message and 'CAM_BACK' in message
    assert f'sample_idx {results["sample_idx"]}' in message and results['token'] in message


def test_a_corrupt_image_names_the_file(dataset, tmp_path):
    results = sample(dataset, 0)
    bad = tmp_path / 'bad.jpg'
    bad.write_bytes(b'not a jpeg at all')
    results['images']['CAM_FRONT']['img_path'] = str(bad)
    with pytest.raises(OSError, match='cannot decode image .*bad.jpg .*CAM_FRONT'):
        TRANSFORMS.build(LOADER)(results)


def test_packed_metas_carry_what_the_detector_reads(dataset):
    """Through ImageAug3D (test mode) and Pack3DDetInputs: the matrices BEVFusion's
    extract_feat stacks, per camera 4 x 4, and the images [6, 3, H, W]."""
    from turbox_mm.models.bevfusion.bevfusion import CAMERA_MATRICES
    pipeline = [TRANSFORMS.build(t) for t in (
        LOADER,
        dict(type='turbox_mm.ImageAug3D', final_dim=[64, 192], resize_lim=[0.65, 0.65],
             bot_pct_lim=[0.0, 0.0], rot_lim=[0.0, 0.0], rand_flip=False, is_train=False),
        dict(type='mmdet3d.Pack3DDetInputs', keys=['img'],
             meta_keys=['cam2img', 'ori_cam2img', 'lidar2cam', 'lidar2img', 'cam2lidar',
                        'img_aug_matrix', 'sample_idx', 'img_path']))]
    results = sample(dataset, 2)
    for transform in pipeline:
        results = transform(results)
    assert tuple(results['inputs']['img'].shape) == (6, 3, 64, 192)
    metas = results['data_samples'].metainfo
    for key, _, default in CAMERA_MATRICES:
        if default is None or key in metas:
            assert np.asarray(metas[key]).shape == (6, 4, 4), key
    assert len(metas['img_path']) == 6
