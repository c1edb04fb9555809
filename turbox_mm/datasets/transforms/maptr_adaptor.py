"""``NuScenesMapTRAdaptor``: the per-sample inputs MapTR's dataset adds (camera matrices,
poses, the CAN bus with the patch angle), from mmdet3d v2 infos."""
from typing import Dict

import numpy as np
from mmcv.transforms import BaseTransform
from pyquaternion import Quaternion

from turbox_mm.datasets.sparse4d_dataset import camera_projections
from turbox_mm.registry import TRANSFORMS


def can_bus_of(can_bus, ego2global) -> np.ndarray:
    """Upstream's ``get_data_info`` CAN bus: the info's 18 numbers with ``[:3]`` the ego
    position, ``[3:7]`` the ego rotation as a quaternion ``(w, x, y, z)``, ``[-2]`` the yaw
    (the patch angle) in radians in ``[0, 2 pi)`` and ``[-1]`` in degrees.

    Args:
        can_bus (Sequence[float], optional): The info's ``can_bus`` (18 numbers); zeros when
            None.
        ego2global (array-like): ``4 x 4``.

    Returns:
        np.ndarray: ``[18]`` float64.

    Examples:
        >>> pose = np.eye(4); pose[:3, 3] = [1, 2, 3]
        >>> pose[:2, :2] = [[0, -1], [1, 0]]  # 90 degrees to the left
        >>> can_bus_of(None, pose)[[0, 1, 2, 16, 17]].round(4).tolist()
        [1.0, 2.0, 3.0, 1.5708, 90.0]
    """
    out = np.zeros(18) if can_bus is None else np.array(can_bus, dtype=np.float64)
    if out.shape != (18, ):
        raise ValueError(f'can_bus must hold 18 numbers, got shape {out.shape}')
    pose = np.asarray(ego2global, dtype=np.float64)
    rotation = pose[:3, :3]
    out[:3] = pose[:3, 3]
    out[3:7] = Quaternion(matrix=rotation, atol=1e-5, rtol=1e-5).elements
    # nuscenes-devkit's quaternion_yaw: the angle of the rotated x axis in the x-y plane
    angle = np.degrees(np.arctan2(rotation[1, 0], rotation[0, 0]))
    if angle < 0:
        angle += 360
    out[-2] = angle / 180 * np.pi
    out[-1] = angle
    return out


@TRANSFORMS.register_module()
class NuScenesMapTRAdaptor(BaseTransform):
    """What upstream's ``CustomNuScenesLocalMapDataset.get_data_info`` adds to a sample
    (hustvl/MapTR ``nuscenes_map_dataset.py`` @ 04413da), from an mmdet3d v2 info (mmdet3d's
    converter or ``tools/create_data.py synthetic``, which also write ``can_bus`` and
    ``scene_token``).

    Adds, per camera in the info's order (the order the multi-view loaders use):

    - ``lidar2img`` (list of ``4 x 4``): ``K @ lidar2cam`` with ``K`` the intrinsics padded
      into a ``4 x 4`` identity (upstream's ``viewpad @ lidar2cam_rt.T``);
    - ``camera_intrinsics`` (list of ``4 x 4``): ``K`` padded; ``cam2img`` as mmdet3d names it;
    - ``camera2ego`` (list of ``4 x 4``): the info's ``cam2ego``;
    - ``img_aug_matrix`` (list of ``4 x 4``): identities (the rescale multiplies them);

    and ``lidar2ego``, ``lidar2global = ego2global @ lidar2ego`` (``4 x 4``) and ``can_bus``
    (:func:`can_bus_of`). Upstream's ``union2one`` (zeroing ``can_bus[:3]`` and ``[-1]`` of a
    frame without history) is the detector's (:class:`~turbox_mm.models.maptr.MapTR`).

    Required keys: ``images`` (per camera ``cam2img``, ``lidar2cam``, ``cam2ego``: a missing
    one is a ``KeyError`` naming the sample and camera),
    ``ego2global``, ``lidar_points.lidar2ego``; ``can_bus`` optional (zeros).

    Examples:
        >>> cam = dict(cam2img=np.eye(3).tolist(), lidar2cam=np.eye(4).tolist(),
        ...            cam2ego=np.eye(4).tolist())
        >>> out = NuScenesMapTRAdaptor()(dict(images=dict(CAM_FRONT=cam),
        ...     ego2global=np.eye(4).tolist(), lidar_points=dict(lidar2ego=np.eye(4).tolist())))
        >>> len(out['lidar2img']), out['can_bus'].shape
        (1, (18,))
    """

    def transform(self, results: Dict) -> Dict:
        token = results.get('token', results.get('sample_idx'))
        images = results.get('images')
        if not images:
            raise KeyError(f'NuScenesMapTRAdaptor: sample {token} has no images (the dataset '
                           "needs modality=dict(use_camera=True))")
        for name, cam in images.items():
            if 'cam2ego' not in cam:
                raise KeyError(f"NuScenesMapTRAdaptor: sample {token}, camera {name} lacks "
                               "['cam2ego']")
        lidar2img, intrinsics = camera_projections(
            images, where=f'NuScenesMapTRAdaptor: sample {token}')
        camera2ego = [np.asarray(cam['cam2ego'], dtype=np.float64) for cam in images.values()]
        lidar2ego = np.asarray(results['lidar_points']['lidar2ego'], dtype=np.float64)
        ego2global = np.asarray(results['ego2global'], dtype=np.float64)
        results.update(
            lidar2img=lidar2img, camera_intrinsics=intrinsics, cam2img=intrinsics,
            camera2ego=camera2ego, img_aug_matrix=[np.eye(4) for _ in lidar2img],
            lidar2ego=lidar2ego, lidar2global=ego2global @ lidar2ego,
            can_bus=can_bus_of(results.get('can_bus'), ego2global))
        return results
