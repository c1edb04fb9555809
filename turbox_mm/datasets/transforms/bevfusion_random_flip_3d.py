"""``BEVFusionRandomFlip3D``: BEVFusion's lidar flip that records itself in the lidar
augmentation matrix."""
import numpy as np
from mmcv.transforms import BaseTransform

from turbox_mm.registry import TRANSFORMS

_FLIP_Y = np.array([[1, 0, 0], [0, -1, 0], [0, 0, 1]])  # horizontal: y -> -y
_FLIP_X = np.array([[-1, 0, 0], [0, 1, 0], [0, 0, 1]])  # vertical: x -> -x


@TRANSFORMS.register_module()
class BEVFusionRandomFlip3D(BaseTransform):
    """Flip the points, the boxes (and a BEV mask) across the x axis, then across the y axis,
    each with probability 1/2, and left-multiply the flips into ``lidar_aug_matrix`` (created
    as the identity when missing), which the camera branch uses to follow the points.

    As upstream (mmdet3d 1.4 ``projects/BEVFusion``): both draws come first, from numpy's
    global generator (``np.random.choice([0, 1])`` twice), then the horizontal flip (y -> -y,
    yaw -> -yaw, vy -> -vy) and the vertical one (x -> -x, yaw -> pi - yaw, vx -> -vx) are
    applied by mmdet3d's own ``flip`` of points and boxes.
    """

    def transform(self, results: dict) -> dict:
        horizontal = np.random.choice([0, 1])
        vertical = np.random.choice([0, 1])
        rotation = np.eye(3)
        for flip, matrix, direction, bev_axis in ((horizontal, _FLIP_Y, 'horizontal', 2),
                                                  (vertical, _FLIP_X, 'vertical', 1)):
            if not flip:
                continue
            rotation = matrix @ rotation
            if 'points' in results:
                results['points'].flip(direction)
            if 'gt_bboxes_3d' in results:
                results['gt_bboxes_3d'].flip(direction)
            if 'gt_masks_bev' in results:
                results['gt_masks_bev'] = np.flip(results['gt_masks_bev'], bev_axis).copy()
        if 'lidar_aug_matrix' not in results:
            results['lidar_aug_matrix'] = np.eye(4)
        results['lidar_aug_matrix'][:3, :] = rotation @ results['lidar_aug_matrix'][:3, :]
        return results
