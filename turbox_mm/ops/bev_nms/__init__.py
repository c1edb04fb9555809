"""BEV box overlaps and NMS: mmcv's rotated, iou3d, axis-aligned and circle NMS on the GPU.

- :mod:`.reference`: the specification in plain PyTorch (mmcv 2.1's and mmdet3d 1.4's
  semantics) and the CPU path.
- :mod:`.triton_kernels`: the pair-mask and on-GPU reduction kernels, and the overlap kernel.
- :mod:`.op`: ``torch.ops.turbox_mm.bev_nms`` / ``bev_iou`` with fakes and the dispatch.

The functions below take the arguments of the mmcv / mmdet3d functions of the same names and
return what they return: the same kept indices in the same order (up to an IoU within float32
rounding of the threshold, see :mod:`.reference`), as int64 tensors on the boxes' device. One
host sync per call (the number kept), where mmcv's rotated and iou3d NMS copy the whole
suppression mask to the host (its axis-aligned ``nms`` walks the mask on the GPU too).
"""
from typing import List, Optional, Union

import numpy as np
import torch
from torch import Tensor

from .op import bev_iou_op, bev_nms_op
from .reference import KINDS, iou_matrix_reference, nms_reference

__all__ = [
    'bev_nms', 'nms_bev', 'nms_normal_bev', 'nms3d', 'nms3d_normal', 'circle_nms',
    'box_iou_rotated', 'boxes_overlap_bev', 'boxes_iou3d', 'nms_reference',
    'iou_matrix_reference', 'KINDS'
]


def bev_nms(boxes: Tensor, scores: Tensor, threshold: float, kind: str) -> Tensor:
    """Kept indices, highest score first.

    Args:
        boxes (Tensor): ``[N, D]`` in ``kind``'s layout (:data:`KINDS`), any float dtype
            (compared in float32), any strides.
        scores (Tensor): ``[N]``.
        threshold (float): IoU above which a later box goes (``'circle'``: squared centre
            distance at or below which it goes).
        kind (str): ``'rotated'``, ``'iou3d'``, ``'aligned'``, ``'iou3d_normal'``, ``'circle'``.

    Returns:
        Tensor: ``[K]`` int64.

    Examples:
        >>> import torch
        >>> boxes = torch.tensor([[0., 0., 4., 2., 0.], [0.1, 0., 4., 2., 0.],
        ...                       [9., 9., 1., 1., 0.]])
        >>> bev_nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5, 'rotated').tolist()
        [0, 2]
    """
    return bev_nms_op(boxes, scores, float(threshold), kind)


def nms_bev(boxes: Tensor, scores: Tensor, thresh: float, pre_max_size: Optional[int] = None,
            post_max_size: Optional[int] = None) -> Tensor:
    """mmdet3d's ``nms_bev``: rotated NMS of ``[N, 5]`` ``(x1, y1, x2, y2, angle)`` boxes.

    As mmdet3d: the ``pre_max_size`` best boxes go in (as ``(cx, cy, w, h, angle)``), the first
    ``post_max_size`` kept ones come out.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 5:
        raise ValueError(f'nms_bev: boxes must be [N, 5] (x1, y1, x2, y2, angle), got shape '
                         f'{tuple(boxes.shape)}')
    order = scores.sort(0, descending=True)[1]
    if pre_max_size is not None:
        order = order[:pre_max_size]
    sel = boxes[order]
    xywhr = torch.stack([(sel[:, 0] + sel[:, 2]) / 2, (sel[:, 1] + sel[:, 3]) / 2,
                         sel[:, 2] - sel[:, 0], sel[:, 3] - sel[:, 1], sel[:, 4]], -1)
    keep = order[bev_nms(xywhr, scores[order], thresh, 'rotated')]
    return keep if post_max_size is None else keep[:post_max_size]


def nms_normal_bev(boxes: Tensor, scores: Tensor, thresh: float) -> Tensor:
    """mmdet3d's ``nms_normal_bev``: axis-aligned NMS of ``[N, 5]`` boxes, angle ignored."""
    if boxes.dim() != 2 or boxes.shape[1] != 5:
        raise ValueError(f'nms_normal_bev: boxes must be [N, 5], got shape {tuple(boxes.shape)}')
    return bev_nms(boxes[:, :4], scores, thresh, 'aligned')


def nms3d(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """mmcv's ``nms3d``: rotated BEV NMS of ``[N, 7]`` ``(x, y, z, dx, dy, dz, heading)``."""
    return bev_nms(boxes, scores, iou_threshold, 'iou3d')


def nms3d_normal(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """mmcv's ``nms3d_normal``: ``nms3d`` with the heading set to 0."""
    return bev_nms(boxes, scores, iou_threshold, 'iou3d_normal')


def circle_nms(dets: Union[Tensor, np.ndarray], thresh: float,
               post_max_size: int = 83) -> Union[Tensor, List[int]]:
    """mmdet3d's ``circle_nms``: ``[N, 3]`` ``(x, y, score)``; a later centre goes when its
    squared distance to a kept one is ``<= thresh``.

    A NumPy array (mmdet3d's call) gives a list of ints as mmdet3d's does; a tensor gives an
    int64 tensor on its device.
    """
    as_list = isinstance(dets, np.ndarray)
    dets_t = torch.from_numpy(np.ascontiguousarray(dets)) if as_list else dets
    if dets_t.dim() != 2 or dets_t.shape[1] < 3:
        raise ValueError(f'circle_nms: dets must be [N, 3] (x, y, score), got shape '
                         f'{tuple(dets_t.shape)}')
    keep = bev_nms(dets_t[:, :2], dets_t[:, 2], thresh, 'circle')[:post_max_size]
    return keep.tolist() if as_list else keep


def box_iou_rotated(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """mmcv's ``box_iou_rotated(a, b)`` (``mode='iou'``, not aligned, ``(x, y, w, h, angle)``):
    ``[M, N]`` float32."""
    return bev_iou_op(boxes_a, boxes_b, 'rotated')


def boxes_overlap_bev(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """mmcv's ``boxes_overlap_bev``: ``[M, N]`` BEV overlap areas of ``[., 7]`` boxes."""
    return bev_iou_op(boxes_a, boxes_b, 'iou3d')


def boxes_iou3d(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """mmcv's ``boxes_iou3d``: ``[M, N]`` 3D IoU of ``[., 7]`` boxes (z is the box centre)."""
    overlap = boxes_overlap_bev(boxes_a, boxes_b)
    a, b = boxes_a.float(), boxes_b.float()
    top = torch.minimum((a[:, 2] + a[:, 5] / 2)[:, None], (b[:, 2] + b[:, 5] / 2)[None])
    bottom = torch.maximum((a[:, 2] - a[:, 5] / 2)[:, None], (b[:, 2] - b[:, 5] / 2)[None])
    inter = overlap * (top - bottom).clamp(min=0)
    vol_a = (a[:, 3] * a[:, 4] * a[:, 5])[:, None]
    vol_b = (b[:, 3] * b[:, 4] * b[:, 5])[None]
    return inter / torch.clamp(vol_a + vol_b - inter, min=1e-6)
