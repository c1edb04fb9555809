"""Sparse4D's BEV rotation of the lidar frame: boxes, projections and the global pose."""
import math
from typing import Dict

import numpy as np
import torch
from mmcv.transforms import BaseTransform

from turbox_mm.registry import TRANSFORMS


def rz(angle: float) -> np.ndarray:
    """The float64 4x4 rotation by ``angle`` (radians, counter-clockwise) about z.

    Examples:
        >>> np.round(rz(np.pi / 2) @ [1.0, 0.0, 0.0, 1.0], 6).tolist()
        [0.0, 1.0, 0.0, 1.0]
    """
    cos, sin = math.cos(angle), math.sin(angle)
    mat = np.eye(4)
    mat[:2, :2] = [[cos, -sin], [sin, cos]]
    return mat


@TRANSFORMS.register_module()
class BBoxRotation(BaseTransform):
    """Rotate the lidar frame by ``aug_config['rotate_3d']`` about z (Sparse4D v3).

    With ``a = rotate_3d`` and ``Rz`` the counter-clockwise rotation by ``a``, the new
    (augmented) lidar frame sees a point ``p`` of the old one at ``Rz p``:

    - ``gt_bboxes_3d``: centre ``xyz <- Rz xyz``, ``yaw <- yaw + a`` (not wrapped here;
      ``NuScenesSparse4DAdaptor`` wraps it), velocity ``(vx, vy) <- R2(a) (vx, vy)``.
      mmdet3d boxes are changed through their ``tensor`` (a rotation about z moves the
      bottom and the gravity centre alike); ``(n, >=7)`` arrays and tensors also work.
    - ``lidar2img[i] <- lidar2img[i] @ Rz^-1`` for every camera, and
      ``lidar2global <- lidar2global @ Rz^-1``, so projecting or placing ``Rz p`` gives
      what ``p`` gave.

    ``points``, ``lidar2cam`` and ``cam2img`` are left alone, as upstream (the depth maps are
    made before this transform). Without ``aug_config`` or ``rotate_3d`` the sample passes
    through.

    mmdet3d 1.4's ``LiDARInstance3DBoxes.rotate(angle)`` turns a box the same way for a
    scalar angle, but works in the row-vector convention (it returns, and takes when given a
    3x3 matrix, ``Rz^T``, and reads the angle back from it); the tensor is rotated here
    directly, with an explicit ``Rz``, so nothing depends on that convention.

    Required keys: ``aug_config``, ``lidar2img`` (list of 4x4). Optional: ``lidar2global``,
    ``gt_bboxes_3d``. Modified keys: those present.

    Examples:
        >>> results = dict(aug_config=dict(rotate_3d=np.pi / 2), lidar2img=[np.eye(4)],
        ...                gt_bboxes_3d=np.array([[1., 0, 0, 4, 2, 1.5, 0, 1, 0]]))
        >>> out = BBoxRotation()(results)
        >>> np.round(out['gt_bboxes_3d'][0], 6).tolist()
        [0.0, 1.0, 0.0, 4.0, 2.0, 1.5, 1.570796, 0.0, 1.0]
    """

    def transform(self, results: Dict) -> Dict:
        """Rotate the sample's lidar frame.

        Args:
            results (dict): The sample.

        Returns:
            dict: ``results``, modified in place.
        """
        aug_config = results.get('aug_config')
        if not aug_config or aug_config.get('rotate_3d') is None:
            return results
        angle = float(aug_config['rotate_3d'])
        rot = rz(angle)
        rot_inv = rz(-angle)
        if 'lidar2img' in results:
            results['lidar2img'] = [np.asarray(m, dtype=np.float64) @ rot_inv
                                    for m in results['lidar2img']]
        if 'lidar2global' in results:
            results['lidar2global'] = np.asarray(results['lidar2global'],
                                                 dtype=np.float64) @ rot_inv
        if 'gt_bboxes_3d' in results:
            results['gt_bboxes_3d'] = self.rotate_boxes(results['gt_bboxes_3d'], rot)
        return results

    @staticmethod
    def rotate_boxes(boxes, rot: np.ndarray):
        """Rotate boxes (mmdet3d boxes, tensor or array; ``(n, >=7)``) by the 4x4 ``rot``.

        Args:
            boxes: The boxes; velocity in columns 7, 8 when present.
            rot (np.ndarray): ``rz(angle)``.

        Returns:
            The same kind of object, rotated (mmdet3d boxes and tensors in place).
        """
        angle = math.atan2(rot[1, 0], rot[0, 0])
        data = getattr(boxes, 'tensor', boxes)
        if data.ndim != 2 or data.shape[1] < 7:
            raise ValueError(f'BBoxRotation: gt_bboxes_3d must be (n, >=7), got shape '
                             f'{tuple(data.shape)}')
        if isinstance(data, torch.Tensor):
            r3 = torch.as_tensor(rot[:3, :3], dtype=data.dtype, device=data.device)
            data[:, :3] = data[:, :3] @ r3.T
            data[:, 6] += angle
            if data.shape[1] >= 9:
                data[:, 7:9] = data[:, 7:9] @ r3[:2, :2].T
            return boxes
        data = np.array(data, dtype=np.result_type(data.dtype, np.float32), copy=True)
        r3 = rot[:3, :3].astype(data.dtype)
        data[:, :3] = data[:, :3] @ r3.T
        data[:, 6] += angle
        if data.shape[1] >= 9:
            data[:, 7:9] = data[:, 7:9] @ r3[:2, :2].T
        return data
