"""Sparse4D's box state: the 11 numbers an anchor or a predicted box is made of.

``[x, y, z, log(l), log(w), log(h), sin(yaw), cos(yaw), vx, vy, vz]`` in the (augmented) lidar
frame, centre at the box's gravity centre, yaw as mmdet3d's LiDAR boxes (and nuScenes' infos)
store it. The size slots hold the extent along the box's own x axis first (mmdet3d's
``x_size``, nuScenes' length), then along its y axis, then the height; the logarithm keeps the
regression targets of small and large objects on one scale. See docs/design/sparse4d.md, 0.1.

Decoded boxes drop the sine and cosine for the angle: ``[x, y, z, l, w, h, yaw, vx, vy, vz]``.
"""
from typing import Optional

import torch
from torch import Tensor

X, Y, Z, SIZE_X, SIZE_Y, SIZE_Z, SIN_YAW, COS_YAW, VX, VY, VZ = range(11)
#: Length of the encoded state and of a decoded box.
STATE_DIM, DECODED_DIM = 11, 10


def encode_boxes(boxes: Tensor, velocity: Optional[Tensor] = None) -> Tensor:
    """Boxes ``[..., 7]`` (``x, y, z, l, w, h, yaw``, gravity centre) to the 11-number state.

    Args:
        boxes (Tensor): ``[..., 7]`` or ``[..., 9]`` (then the last two are ``vx, vy``).
        velocity (Tensor, optional): ``[..., 2]`` or ``[..., 3]``; overrides velocities carried
            by 9-number boxes. Defaults to None (zero, or what the boxes carry).

    Returns:
        Tensor: ``[..., 11]``; ``vz`` is 0 unless ``velocity`` gives it.

    Raises:
        ValueError: The last dimension is not 7 or 9, or a size is not positive.

    Examples:
        >>> state = encode_boxes(torch.tensor([[1., 2., 0.5, 4., 2., 1.5, 0.3]]))
        >>> state.shape
        torch.Size([1, 11])
    """
    if boxes.shape[-1] not in (7, 9):
        raise ValueError(f'encode_boxes: expected boxes of shape [..., 7] or [..., 9], got '
                         f'{tuple(boxes.shape)}')
    sizes = boxes[..., 3:6]
    if sizes.numel() and not bool((sizes > 0).all()):
        raise ValueError('encode_boxes: box sizes must be positive (their logarithm is encoded)')
    state = boxes.new_zeros(boxes.shape[:-1] + (STATE_DIM, ))
    state[..., X:Z + 1] = boxes[..., :3]
    state[..., SIZE_X:SIZE_Z + 1] = sizes.log()
    state[..., SIN_YAW] = boxes[..., 6].sin()
    state[..., COS_YAW] = boxes[..., 6].cos()
    if boxes.shape[-1] == 9:
        state[..., VX:VY + 1] = boxes[..., 7:9]
    if velocity is not None:
        state[..., VX:VX + velocity.shape[-1]] = velocity
    return state


def decode_boxes(state: Tensor) -> Tensor:
    """The 11-number state to ``[..., 10]`` boxes ``x, y, z, l, w, h, yaw, vx, vy, vz``.

    Args:
        state (Tensor): ``[..., 11]``.

    Returns:
        Tensor: ``[..., 10]``; ``yaw = atan2(sin, cos)`` (the pair need not be normalised).

    Examples:
        >>> boxes = torch.tensor([[1., 2., 0.5, 4., 2., 1.5, 0.3, 1., -1.]])
        >>> torch.allclose(decode_boxes(encode_boxes(boxes))[:, :9], boxes)
        True
    """
    if state.shape[-1] != STATE_DIM:
        raise ValueError(f'decode_boxes: expected a state of shape [..., {STATE_DIM}], got '
                         f'{tuple(state.shape)}')
    yaw = torch.atan2(state[..., SIN_YAW], state[..., COS_YAW])
    return torch.cat([state[..., X:Z + 1], state[..., SIZE_X:SIZE_Z + 1].exp(), yaw[..., None],
                      state[..., VX:VZ + 1]], dim=-1)


def to_lidar_boxes(decoded: Tensor):
    """Decoded boxes ``[N, 10]`` as mmdet3d ``LiDARInstance3DBoxes`` with velocities.

    mmdet3d stores the bottom centre; the state holds the gravity centre, hence
    ``origin=(0.5, 0.5, 0.5)``. ``vz`` is dropped (nuScenes evaluates ``vx, vy``).

    Args:
        decoded (Tensor): ``[N, 10]`` from :func:`decode_boxes`.

    Returns:
        LiDARInstance3DBoxes: ``N`` boxes of 9 numbers.
    """
    from mmdet3d.structures import LiDARInstance3DBoxes
    return LiDARInstance3DBoxes(decoded[:, :9], box_dim=9, origin=(0.5, 0.5, 0.5))
