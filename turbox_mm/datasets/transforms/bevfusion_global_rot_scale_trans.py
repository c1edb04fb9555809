"""``BEVFusionGlobalRotScaleTrans``: mmdet3d's ``GlobalRotScaleTrans`` in BEVFusion's order,
recorded in the lidar augmentation matrix."""
import numpy as np
from mmdet3d.datasets.transforms import GlobalRotScaleTrans

from turbox_mm.registry import TRANSFORMS


@TRANSFORMS.register_module()
class BEVFusionGlobalRotScaleTrans(GlobalRotScaleTrans):
    """Rotate, then translate, then scale (``x' = s (R x + t)``; mmdet3d's own transform
    scales before translating), with mmdet3d's random draws in its order (rotation, scale,
    translation), and left-multiply ``[[R s, t s], [0, 1]]`` into ``lidar_aug_matrix`` (the
    identity when missing). Arguments are ``GlobalRotScaleTrans``'s.
    """

    def transform(self, input_dict: dict) -> dict:
        input_dict.setdefault('transformation_3d_flow', [])
        self._rot_bbox_points(input_dict)
        if 'pcd_scale_factor' not in input_dict:
            self._random_scale(input_dict)
        self._trans_bbox_points(input_dict)
        self._scale_bbox_points(input_dict)
        input_dict['transformation_3d_flow'].extend(['R', 'T', 'S'])
        scale = input_dict['pcd_scale_factor']
        augment = np.eye(4)
        augment[:3, :3] = np.asarray(input_dict['pcd_rotation']).T * scale
        augment[:3, 3] = np.asarray(input_dict['pcd_trans']) * scale
        input_dict['lidar_aug_matrix'] = augment @ input_dict.get('lidar_aug_matrix', np.eye(4))
        return input_dict
