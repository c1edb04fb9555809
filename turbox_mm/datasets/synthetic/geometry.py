"""Rigid transforms and quaternions, in nuScenes' conventions.

Quaternions are ``[w, x, y, z]`` (scalar first), as in the nuScenes tables and pyquaternion.
Transforms are 4x4 homogeneous matrices that act on column vectors: ``p_b = T_a2b @ p_a``,
so ``lidar2ego @ p_lidar`` is the point in the ego frame, as in mmdet3d's v2 infos.
"""
import math

import numpy as np


def rot_z(yaw: float) -> np.ndarray:
    """Rotation about the z axis (counter-clockwise seen from above).

    Args:
        yaw (float): Angle in radians.

    Returns:
        np.ndarray: 3x3 rotation matrix.
    """
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def rot_xyz(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """Rotation ``Rz(yaw) @ Ry(pitch) @ Rx(roll)``, angles in radians."""
    cr, sr = math.cos(roll), math.sin(roll)
    cp, sp = math.cos(pitch), math.sin(pitch)
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cr, -sr], [0.0, sr, cr]])
    ry = np.array([[cp, 0.0, sp], [0.0, 1.0, 0.0], [-sp, 0.0, cp]])
    return rot_z(yaw) @ ry @ rx


def make_transform(rotation: np.ndarray, translation) -> np.ndarray:
    """Build a 4x4 transform from a 3x3 rotation and a translation."""
    mat = np.eye(4)
    mat[:3, :3] = rotation
    mat[:3, 3] = translation
    return mat


def invert(transform: np.ndarray) -> np.ndarray:
    """Invert a rigid 4x4 transform exactly (transpose of the rotation)."""
    rot = transform[:3, :3]
    return make_transform(rot.T, -rot.T @ transform[:3, 3])


def apply(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 transform to points of shape ``(..., 3)``."""
    return points @ transform[:3, :3].T + transform[:3, 3]


def quaternion_from_matrix(rotation: np.ndarray) -> list:
    """Unit quaternion ``[w, x, y, z]`` of a rotation matrix, with ``w >= 0``.

    Uses the numerically stable branch on the largest diagonal term (Shepperd's method).

    Args:
        rotation (np.ndarray): 3x3 rotation matrix.

    Returns:
        list[float]: The quaternion as plain floats.
    """
    m = rotation
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    if trace > 0:
        s = 2.0 * math.sqrt(1.0 + trace)
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2.0 * math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif m[1, 1] > m[2, 2]:
        s = 2.0 * math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = 2.0 * math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    q = np.array(q)
    q /= np.linalg.norm(q)
    if q[0] < 0:
        q = -q
    return [float(v) for v in q]


def matrix_from_quaternion(q) -> np.ndarray:
    """Rotation matrix of a quaternion ``[w, x, y, z]`` (normalised first)."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def devkit_yaw(rotation: np.ndarray) -> float:
    """The yaw that nuScenes tools read from a box orientation.

    mmdet3d's converters take ``Quaternion(...).yaw_pitch_roll[0]`` from pyquaternion, whose
    formula is ``atan2(2 (w z - x y), 1 - 2 (y^2 + z^2))``. For a rotation about z alone this
    is the heading; for a box seen from a camera (y axis down) it is what mmdet3d stores,
    negated, as the camera-frame yaw. Computing it the same way keeps our infos identical to
    what the converter would write from our tables.

    Args:
        rotation (np.ndarray): 3x3 rotation matrix of the box in the target frame.

    Returns:
        float: The angle in radians, in ``[-pi, pi]``.
    """
    w, x, y, z = quaternion_from_matrix(rotation)
    return math.atan2(2 * (w * z - x * y), 1 - 2 * (y * y + z * z))


def wrap_angle(angle):
    """Wrap angles to ``[-pi, pi)``."""
    return (np.asarray(angle) + np.pi) % (2 * np.pi) - np.pi


def to_list(array: np.ndarray) -> list:
    """A nested list of plain Python floats (pickles the same under numpy 1 and 2)."""
    return np.asarray(array, dtype=np.float64).tolist()
