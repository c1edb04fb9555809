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
