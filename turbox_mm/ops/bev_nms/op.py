"""``torch.ops.turbox_mm.bev_nms`` and ``bev_iou``: the ops, fakes and dispatch.

- ``turbox_mm::bev_nms(boxes, scores, threshold, kind) -> keep [K] int64``: kept indices,
  highest score first (``K`` is data-dependent: the fake returns an unbacked size);
- ``turbox_mm::bev_iou(boxes_a, boxes_b, kind) -> [M, N] float32``: the IoU of ``'rotated'``
  pairs or the BEV overlap area of ``'iou3d'`` pairs.

CUDA tensors with Triton run :mod:`.triton_kernels`; anything else runs :mod:`.reference` and
warns once (:mod:`turbox_mm.ops.dispatch`). No autograd: NMS has no gradient, and mmcv's
overlap ops have none either.
"""
import math

import torch
from torch import Tensor

from .. import dispatch
from .reference import check_boxes, iou_matrix_reference, nms_reference

try:
    from . import triton_kernels
except ImportError:  # no Triton: the reference serves every device
    triton_kernels = None

#: Kinds whose pair values the overlap op computes.
IOU_KINDS = ('rotated', 'iou3d')

# One dispatch per op, each warning once under its own name.
_nms_dispatch = dispatch.OpDispatch('bev_nms', triton_kernels, 'a loop over the boxes')
_iou_dispatch = dispatch.OpDispatch('bev_iou', triton_kernels, 'batched torch ops')


def _check_nms(boxes: Tensor, scores: Tensor, threshold: float, kind: str) -> None:
    check_boxes(boxes, kind)
    if scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f'bev_nms: scores must be [N] for the {boxes.shape[0]} boxes, got '
                         f'shape {tuple(scores.shape)}')
    if scores.device != boxes.device:
        raise ValueError(f'bev_nms: boxes are on {boxes.device}, scores on {scores.device}')
    if math.isnan(threshold):
        raise ValueError('bev_nms: threshold is NaN')


@torch.library.custom_op('turbox_mm::bev_nms', mutates_args=())
def bev_nms_op(boxes: Tensor, scores: Tensor, threshold: float, kind: str) -> Tensor:
    """Kept box indices (see :mod:`.reference`)."""
    _check_nms(boxes, scores, threshold, kind)
    if _nms_dispatch.use_kernel(boxes):
        return triton_kernels.nms_keep(boxes, scores, threshold, kind)
    return nms_reference(boxes, scores, threshold, kind)


@bev_nms_op.register_fake
def _(boxes, scores, threshold, kind):
    _check_nms(boxes, scores, threshold, kind)
    kept = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty(kept, dtype=torch.int64)


def _check_iou(boxes_a: Tensor, boxes_b: Tensor, kind: str) -> None:
    if kind not in IOU_KINDS:
        raise ValueError(f'bev_iou: kind must be one of {IOU_KINDS}, got {kind!r}')
    check_boxes(boxes_a, kind, 'boxes_a')
    check_boxes(boxes_b, kind, 'boxes_b')
    if boxes_a.device != boxes_b.device:
        raise ValueError(f'bev_iou: boxes_a are on {boxes_a.device}, boxes_b on '
                         f'{boxes_b.device}')


@torch.library.custom_op('turbox_mm::bev_iou', mutates_args=())
def bev_iou_op(boxes_a: Tensor, boxes_b: Tensor, kind: str) -> Tensor:
    """``[M, N]`` IoU (``'rotated'``) or BEV overlap area (``'iou3d'``)."""
    _check_iou(boxes_a, boxes_b, kind)
    if _iou_dispatch.use_kernel(boxes_a):
        return triton_kernels.iou_matrix(boxes_a, boxes_b, kind)
    return iou_matrix_reference(boxes_a, boxes_b, kind)


@bev_iou_op.register_fake
def _(boxes_a, boxes_b, kind):
    _check_iou(boxes_a, boxes_b, kind)
    return boxes_a.new_empty(boxes_a.shape[0], boxes_b.shape[0], dtype=torch.float32)
