"""BEVFusion's lidar augmentations: the recorded lidar_aug_matrix maps the original points
to the augmented ones; the random draws follow upstream's order."""
import numpy as np
import pytest
import torch
from mmdet3d.structures import LiDARInstance3DBoxes, LiDARPoints

from turbox_mm.registry import TRANSFORMS


def scene(seed=0):
    gen = torch.Generator().manual_seed(seed)
    points = torch.randn(50, 5, generator=gen) * 10
    boxes = torch.cat([torch.randn(3, 3, generator=gen) * 10, torch.rand(3, 3, generator=gen) + 1,
                       torch.rand(3, 1, generator=gen), torch.randn(3, 2, generator=gen)], 1)
    return dict(points=LiDARPoints(points.clone(), points_dim=5),
                gt_bboxes_3d=LiDARInstance3DBoxes(boxes.clone(), box_dim=9)), points, boxes


def moved(matrix, xyz):
    return (torch.as_tensor(matrix[:3, :3], dtype=torch.float32) @ xyz.T).T + \
        torch.as_tensor(matrix[:3, 3], dtype=torch.float32)


@pytest.mark.parametrize('seed', range(4))
def test_flip_records_what_it_did(seed):
    np.random.seed(seed)
    draws = np.random.choice([0, 1]), np.random.choice([0, 1])
    np.random.seed(seed)
    results, points, boxes = scene(seed)
    out = TRANSFORMS.build(dict(type='turbox_mm.BEVFusionRandomFlip3D'))(results)
    want = points[:, :3].clone()
    if draws[0]:
        want[:, 1] = -want[:, 1]
    if draws[1]:
        want[:, 0] = -want[:, 0]
    torch.testing.assert_close(out['points'].tensor[:, :3], want)
    torch.testing.assert_close(moved(out['lidar_aug_matrix'], points[:, :3]), want)
    yaw = boxes[:, 6].clone()
    if draws[0]:
        yaw = -yaw
    if draws[1]:
        yaw = np.pi - yaw
    torch.testing.assert_close(out['gt_bboxes_3d'].tensor[:, 6], yaw)


def test_rotate_translate_scale_in_that_order_and_recorded():
    np.random.seed(0)
    results, points, _ = scene(1)
    t = TRANSFORMS.build(dict(type='turbox_mm.BEVFusionGlobalRotScaleTrans',
                              rot_range=[-0.78539816, 0.78539816], scale_ratio_range=[0.9, 1.1],
                              translation_std=[0.5, 0.5, 0.5]))
    out = t(results)
    rot_t = torch.as_tensor(out['pcd_rotation'], dtype=torch.float32)  # points @ rot_t
    s = float(out['pcd_scale_factor'])
    trans = torch.as_tensor(out['pcd_trans'], dtype=torch.float32)
    want = ((points[:, :3] @ rot_t) + trans) * s
    torch.testing.assert_close(out['points'].tensor[:, :3], want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(moved(out['lidar_aug_matrix'], points[:, :3]), want, rtol=1e-5,
                               atol=1e-4)
    assert out['transformation_3d_flow'][-3:] == ['R', 'T', 'S'] and s != 1.0


def _camera_results(num=2, shape=(90, 160)):
    gen = np.random.default_rng(0)
    imgs = [gen.integers(0, 255, (*shape, 3)).astype(np.float32) for _ in range(num)]
    return dict(img=imgs, ori_shape=shape)


def test_image_aug_matrix_maps_original_pixels_to_augmented_ones():
    aug = TRANSFORMS.build(dict(type='turbox_mm.ImageAug3D', final_dim=[48, 96],
                                resize_lim=[0.55, 0.7], bot_pct_lim=[0.0, 0.1],
                                rot_lim=[-5.4, 5.4], rand_flip=True, is_train=True))
    img = np.zeros((90, 160, 3), np.float32)
    u, v = 100, 60
    img[v - 1:v + 2, u - 1:u + 2] = 255  # a bright 3 x 3 dot
    for seed in range(6):
        np.random.seed(seed)
        out = aug(dict(img=[img.copy()], ori_shape=(90, 160)))
        matrix = out['img_aug_matrix'][0]
        assert matrix.shape == (4, 4) and matrix.dtype == np.float32
        x, y = matrix[:2, :2] @ np.array([u, v], np.float32) + matrix[:2, 3]
        bright = np.argwhere(out['img'][0].sum(-1) > 200)
        if 1 <= x < 95 and 1 <= y < 47:
            assert len(bright), seed
            cy, cx = bright.mean(0)
            assert abs(cx - x) < 1.5 and abs(cy - y) < 1.5, (seed, (x, y), (cx, cy))


def test_image_aug_draws_five_numbers_a_camera_in_upstreams_order():
    cfg = dict(type='turbox_mm.ImageAug3D', final_dim=[48, 96], resize_lim=[0.55, 0.7],
               bot_pct_lim=[0.0, 0.1], rot_lim=[-5.4, 5.4], rand_flip=True, is_train=True)
    np.random.seed(3)
    TRANSFORMS.build(cfg)(_camera_results(num=2))
    after = np.random.rand()
    np.random.seed(3)
    for _ in range(2):  # per camera: resize, bottom share, crop x, flip, rotation
        np.random.uniform(0, 1), np.random.uniform(0, 1), np.random.uniform(0, 1)
        np.random.choice([0, 1]), np.random.uniform(0, 1)
    assert np.random.rand() == after


def test_image_aug_at_test_time_is_fixed():
    aug = TRANSFORMS.build(dict(type='turbox_mm.ImageAug3D', final_dim=[256, 704],
                                resize_lim=[0.48, 0.48], bot_pct_lim=[0.0, 0.0],
                                rot_lim=[0.0, 0.0], rand_flip=False, is_train=False))
    assert aug.sample_augmentation((900, 1600)) == (0.48, (768, 432), (32, 176, 736, 432),
                                                    False, 0)
    out = aug(dict(img=[np.zeros((900, 1600, 3), np.float32)], ori_shape=(900, 1600)))
    assert out['img'][0].shape == (256, 704, 3)
    np.testing.assert_allclose(out['img_aug_matrix'][0][:2], [[0.48, 0, 0, -32],
                                                              [0, 0.48, 0, -176]], atol=1e-6)


def test_grid_mask_off_draws_once_and_on_masks_every_view_alike():
    results = _camera_results(num=3)
    before = [x.copy() for x in results['img']]
    off = TRANSFORMS.build(dict(type='turbox_mm.GridMask', use_h=True, use_w=True, max_epoch=6,
                                rotate=1, offset=False, ratio=0.5, mode=1, prob=0.0,
                                fixed_prob=True))
    np.random.seed(0)
    out = off(results)
    assert all(np.array_equal(a, b) for a, b in zip(out['img'], before))
    np.random.seed(0)
    np.random.rand()
    assert np.random.rand() == np.random.RandomState(0).rand(2)[1]
    on = TRANSFORMS.build(dict(type='turbox_mm.GridMask', use_h=True, use_w=True, max_epoch=6,
                               rotate=1, ratio=0.5, mode=1, prob=1.0, fixed_prob=True))
    np.random.seed(1)
    out = on(_camera_results(num=3))
    masks = [(x.sum(-1) == 0) for x in out['img']]
    assert masks[0].any() and not masks[0].all()
    assert all(np.array_equal(masks[0], m) for m in masks[1:])
