"""The sensor rig: six cameras around the car and the top lidar, placed as on nuScenes' cars.

Frames follow nuScenes: ego x forward, y left, z up (origin on the ground); camera x right,
y down, z forward; LIDAR_TOP x right, y forward, z up.
"""
from dataclasses import dataclass

import numpy as np

from .geometry import make_transform, rot_xyz, rot_z

# The order of mmdet3d's converter (and so of ``info['images']``).
CAMERA_NAMES = ('CAM_FRONT', 'CAM_FRONT_RIGHT', 'CAM_FRONT_LEFT', 'CAM_BACK', 'CAM_BACK_LEFT',
                'CAM_BACK_RIGHT')
NOMINAL_SIZE = (1600, 900)  # width, height of nuScenes images
# name: (translation in the ego frame, yaw in degrees, focal length, cx, cy) at 1600x900,
# rounded from the calibrations of nuScenes' cars.
_CAMERAS = {
    'CAM_FRONT': ((1.70, 0.02, 1.51), 0.0, 1266.4, 816.3, 491.5),
    'CAM_FRONT_RIGHT': ((1.55, -0.49, 1.50), -55.0, 1260.8, 807.97, 495.3),
    'CAM_FRONT_LEFT': ((1.52, 0.49, 1.51), 55.0, 1272.6, 826.6, 479.8),
    'CAM_BACK': ((0.03, 0.00, 1.57), 180.0, 809.2, 829.2, 481.8),
    'CAM_BACK_LEFT': ((1.04, 0.48, 1.56), 110.0, 1256.7, 817.8, 451.9),
    'CAM_BACK_RIGHT': ((1.03, -0.48, 1.59), -110.0, 1259.5, 807.3, 501.2),
}
# Offset of each camera's exposure from the lidar keyframe, in microseconds: the cameras fire
# when the spinning lidar sweeps across their field of view.
CAMERA_DELAY_US = {
    'CAM_FRONT': 12_500, 'CAM_FRONT_RIGHT': 20_100, 'CAM_FRONT_LEFT': 4_900,
    'CAM_BACK': -12_400, 'CAM_BACK_LEFT': -2_600, 'CAM_BACK_RIGHT': -22_200}
LIDAR_TRANSLATION = (0.943713, 0.0, 1.84023)
# Camera axes expressed in the ego frame for a camera looking forward (columns: x, y, z).
_CAMERA_AXES = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


@dataclass
class Camera:
    """One calibrated camera.

    Attributes:
        name (str): Channel name, e.g. ``'CAM_FRONT'``.
        cam2ego (np.ndarray): 4x4 transform.
        intrinsic (np.ndarray): 3x3 matrix for the generated image size.
        width (int): Image width in pixels.
        height (int): Image height in pixels.
    """
    name: str
    cam2ego: np.ndarray
    intrinsic: np.ndarray
    width: int
    height: int


def camera_rig(rng: np.random.Generator, image_size=NOMINAL_SIZE) -> list:
    """Calibrate the six cameras of one car (a few tenths of a degree off nominal).

    Args:
        rng (np.random.Generator): Source of the small calibration offsets.
        image_size (tuple[int, int]): ``(width, height)`` of the images. Intrinsics scale with
            it. Defaults to 1600x900.

    Returns:
        list[Camera]: In :data:`CAMERA_NAMES` order.
    """
    width, height = image_size
    scale_x, scale_y = width / NOMINAL_SIZE[0], height / NOMINAL_SIZE[1]
    cameras = []
    for name in CAMERA_NAMES:
        translation, yaw, focal, cx, cy = _CAMERAS[name]
        roll, pitch, dyaw = np.radians(rng.normal(0, [0.2, 0.3, 0.3]))
        rotation = rot_z(np.radians(yaw) + dyaw) @ rot_xyz(roll, pitch, 0.0) @ _CAMERA_AXES
        position = np.array(translation) + rng.normal(0, 0.01, size=3)
        focal = focal * (1 + rng.normal(0, 0.003))
        intrinsic = np.array([[focal * scale_x, 0.0, cx * scale_x],
                              [0.0, focal * scale_y, cy * scale_y],
                              [0.0, 0.0, 1.0]])
        cameras.append(Camera(name, make_transform(rotation, position), intrinsic, width, height))
    return cameras


def lidar_mount(rng: np.random.Generator) -> np.ndarray:
    """lidar2ego of LIDAR_TOP: turned -90 degrees about z (x right, y forward), roof mounted."""
    translation = np.array(LIDAR_TRANSLATION) + rng.normal(0, 0.005, size=3)
    return make_transform(rot_z(-np.pi / 2), translation)
