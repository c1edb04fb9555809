"""The map patch of a sample: centre, heading and size, as MapTR's ``VectorizedLocalMap`` takes
them from the lidar pose.

Upstream (``nuscenes_map_dataset.py``, ``vectormap_pipeline`` and ``gen_vectorized_samples``):
``lidar2global = ego2global @ lidar2ego``; the patch is centred on the lidar's global ``x, y``
and turned by the yaw of ``lidar2global`` (nuscenes-devkit's ``quaternion_yaw``: the heading
of the rotated x axis). ``patch_size = (60, 30)`` is ``(patch_h, patch_w)`` from the point
cloud range ``[-15, -30, ., 15, 30, .]``: the devkit's ``get_patch_coord`` makes it 30 m
along the lidar's x axis and 60 m along its y axis, so in the lidar frame the patch is
``|x| <= 15``, ``|y| <= 30``.
"""
from typing import NamedTuple

import numpy as np


class PatchPose(NamedTuple):
    """Where a sample cuts its map.

    Attributes:
        x (float): Global x of the patch centre (the lidar).
        y (float): Global y of the patch centre.
        yaw (float): Heading of the lidar's x axis, radians.
        half_x (float): Half extent along the lidar's x axis (``patch_size[1] / 2``).
        half_y (float): Half extent along the lidar's y axis (``patch_size[0] / 2``).
    """
    x: float
    y: float
    yaw: float
    half_x: float
    half_y: float

    @property
    def angle_degrees(self) -> float:
        """The patch angle as upstream passes it to the devkit and shapely."""
        return self.yaw / np.pi * 180

    def to_local(self, xy: np.ndarray) -> np.ndarray:
        """Global ``(N, 2)`` points in the patch frame (the lidar frame's ``x, y``)."""
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        dx, dy = xy[:, 0] - self.x, xy[:, 1] - self.y
        return np.stack([c * dx + s * dy, -s * dx + c * dy], axis=1)

    def global_bounds(self, margin: float = 0.0) -> np.ndarray:
        """``[xmin, ymin, xmax, ymax]`` of the turned patch in the global frame."""
        c, s = abs(np.cos(self.yaw)), abs(np.sin(self.yaw))
        ex = c * self.half_x + s * self.half_y + margin
        ey = s * self.half_x + c * self.half_y + margin
        return np.array([self.x - ex, self.y - ey, self.x + ex, self.y + ey])


def lidar2global_of(results: dict) -> np.ndarray:
    """``ego2global @ lidar2ego`` of an mmdet3d v2 info (or a pipeline's results).

    Raises:
        KeyError: The info lacks ``ego2global`` or ``lidar_points.lidar2ego``.
    """
    missing = [k for k, ok in (('ego2global', 'ego2global' in results),
                               ('lidar_points.lidar2ego',
                                'lidar2ego' in results.get('lidar_points', {}))) if not ok]
    if missing:
        raise KeyError(f'map ground truth needs the lidar pose; the sample lacks {missing}')
    return (np.asarray(results['ego2global'], dtype=np.float64)
            @ np.asarray(results['lidar_points']['lidar2ego'], dtype=np.float64))


def patch_pose(lidar2global: np.ndarray, patch_size=(60.0, 30.0)) -> PatchPose:
    """The map patch of a lidar pose.

    Args:
        lidar2global (np.ndarray): 4x4 lidar pose.
        patch_size (tuple[float, float]): ``(patch_h, patch_w)`` as upstream: extent along
            the lidar's y axis, then along its x axis. Defaults to (60, 30).

    Returns:
        PatchPose: Centre, yaw and half extents.

    Examples:
        >>> pose = patch_pose(np.eye(4))
        >>> pose.half_x, pose.half_y, pose.yaw
        (15.0, 30.0, 0.0)
    """
    m = np.asarray(lidar2global, dtype=np.float64)
    yaw = float(np.arctan2(m[1, 0], m[0, 0]))
    return PatchPose(float(m[0, 3]), float(m[1, 3]), yaw, float(patch_size[1]) / 2,
                     float(patch_size[0]) / 2)
