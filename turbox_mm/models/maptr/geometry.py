"""MapTR's coordinate conventions: normalised points and boxes over the BEV patch.

Everything is in the lidar frame, x to the right over ``[pc_range[0], pc_range[3]]`` (30 m),
y forward over ``[pc_range[1], pc_range[4]]`` (60 m). The head predicts points in ``[0, 1]``:
``x' = (x - pc_range[0]) / (pc_range[3] - pc_range[0])`` and the same for y; boxes are
``(cx, cy, w, h)`` normalised the same way (docs/design/maptr.md, section 0). The operations
are the ones of upstream's ``normalize_2d_pts`` / ``denormalize_2d_pts`` /
``normalize_2d_bbox`` / ``denormalize_2d_bbox`` (subtract, then divide; multiply, then add),
so that the numbers match to the last bit.

The normalisations divide by a tensor of the patch's extent, as upstream. Upstream makes it with
``new_tensor`` (a host-to-device copy, which waits for the device); with ``sync_free=True`` (the
turbox paths) the same numbers are uploaded once and kept on the device
(:func:`turbox_mm.utils.upload.device_constant`). Both divide by a device
tensor, so the results are bit-identical (dividing by a Python scalar would not be: CUDA
multiplies by its reciprocal).
"""
from typing import Sequence, Tuple

import torch
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy, bbox_xyxy_to_cxcywh
from torch import Tensor

from turbox_mm.utils.upload import device_constant

#: MapTR v1's point cloud range (``maptr_tiny_r50_24e``), the default of its modules.
PC_RANGE = [-15.0, -30.0, -2.0, 15.0, 30.0, 2.0]


def _extent(pc_range: Sequence[float]) -> Tuple[float, float]:
    return pc_range[3] - pc_range[0], pc_range[4] - pc_range[1]


def _extent_tensor(like: Tensor, values: Sequence[float], sync_free: bool) -> Tensor:
    """``values`` as a 1-D tensor of ``like``'s dtype and device: upstream's ``new_tensor``
    (a host-to-device copy), or with ``sync_free`` uploaded once (``device_constant``)."""
    return device_constant(values, like) if sync_free else like.new_tensor(values)


def normalize_2d_pts(pts: Tensor, pc_range: Sequence[float], sync_free: bool = False) -> Tensor:
    """Metric ``[..., 2]`` points -> ``[0, 1]`` over the patch.

    Args:
        pts (Tensor): ``[..., 2]`` metric points.
        pc_range (Sequence[float]): The point cloud range.
        sync_free (bool): Divide by an extent made on the device (the same numbers, no
            host-to-device copy). Defaults to False (upstream's ``new_tensor``).

    Examples:
        >>> normalize_2d_pts(torch.tensor([[-15., 30.]]), [-15, -30, -2, 15, 30, 2]).tolist()
        [[0.0, 1.0]]
    """
    width, height = _extent(pc_range)
    shifted = torch.stack([pts[..., 0] - pc_range[0], pts[..., 1] - pc_range[1]], -1)
    return shifted / _extent_tensor(pts, [width, height], sync_free)


def denormalize_2d_pts(pts: Tensor, pc_range: Sequence[float]) -> Tensor:
    """``[0, 1]`` points ``[..., 2]`` -> metres.

    Examples:
        >>> denormalize_2d_pts(torch.tensor([[0.5, 0.25]]), [-15, -30, -2, 15, 30, 2]).tolist()
        [[0.0, -15.0]]
    """
    width, height = _extent(pc_range)
    return torch.stack([pts[..., 0] * width + pc_range[0], pts[..., 1] * height + pc_range[1]],
                       -1)


def normalize_2d_bbox(bboxes: Tensor, pc_range: Sequence[float],
                      sync_free: bool = False) -> Tensor:
    """Metric ``(x1, y1, x2, y2)`` -> normalised ``(cx, cy, w, h)`` (``sync_free`` as
    :func:`normalize_2d_pts`)."""
    width, height = _extent(pc_range)
    cxcywh = bbox_xyxy_to_cxcywh(bboxes)
    shifted = torch.cat([cxcywh[..., 0:1] - pc_range[0], cxcywh[..., 1:2] - pc_range[1],
                         cxcywh[..., 2:4]], -1)
    return shifted / _extent_tensor(bboxes, [width, height, width, height], sync_free)


def denormalize_2d_bbox(bboxes: Tensor, pc_range: Sequence[float]) -> Tensor:
    """Normalised ``(cx, cy, w, h)`` -> metric ``(x1, y1, x2, y2)``."""
    width, height = _extent(pc_range)
    xyxy = bbox_cxcywh_to_xyxy(bboxes)
    return torch.stack([xyxy[..., 0] * width + pc_range[0], xyxy[..., 1] * height + pc_range[1],
                        xyxy[..., 2] * width + pc_range[0], xyxy[..., 3] * height + pc_range[1]],
                       -1)


def pts_to_bbox(pts: Tensor) -> Tensor:
    """Upstream's ``transform_box`` with ``transform_method='minmax'``: the ``(cx, cy, w, h)``
    of each point set's bounds. ``[..., P, 2]`` -> ``[..., 4]``.

    Examples:
        >>> pts_to_bbox(torch.tensor([[[0.25, 0.0], [0.75, 0.5], [0.5, 0.25]]])).tolist()
        [[0.5, 0.25, 0.5, 0.5]]
    """
    low, high = pts.min(dim=-2)[0], pts.max(dim=-2)[0]
    return bbox_xyxy_to_cxcywh(torch.cat([low, high], -1))
