"""``turbox.ops.fast`` for test-time NMS: mmdet3d's NMS calls run turbox_mm's kernels.

mmdet3d 1.4 calls its NMS as functions, not as registered modules, so no config rewrite can
reach them. With ``ops.fast`` the runner rebinds, in the mmdet3d modules that use them:

- ``mmdet3d.models.layers.box3d_nms.nms_rotated`` and ``.nms`` (mmcv's, called by mmdet3d's
  ``nms_bev`` / ``nms_normal_bev``, which CenterHead, the anchor heads'
  ``box3d_multiclass_nms``, the RPN and RoI heads and test-time augmentation call);
- ``nms3d`` / ``nms3d_normal`` in the heads that import mmcv's (``fcaf3d_head``,
  ``imvoxel_head``).

The replacements are :mod:`turbox_mm.ops.bev_nms`: the same kept indices (see its reference)
with one host sync, where mmcv's rotated and iou3d NMS copy the suppression mask to the host.
They take the same arguments; a call they do not cover goes to mmcv's own function: CPU
tensors (mmcv's CPU ops are faster than the reference's Python walk, and its CPU
``nms_rotated`` keeps boxes at ``iou == thr`` apart), ``nms_rotated`` with labels or
counter-clockwise angles, ``nms`` with an offset, score threshold or ``max_num``, empty inputs.
The rebinding is process-wide; :func:`uninstall` restores mmcv's functions. mmdet3d's
``circle_nms`` is not rebound: CenterHead calls it on a NumPy copy.
"""
import importlib
from typing import Callable, List, Optional

import torch
from torch import Tensor

from turbox_mm.ops import bev_nms
from .rebind import Rebindings, Target

_BOX3D_NMS = 'mmdet3d.models.layers.box3d_nms'
_IOU3D_USERS = ('mmdet3d.models.dense_heads.fcaf3d_head',
                'mmdet3d.models.dense_heads.imvoxel_head')


def _on_gpu(boxes: Tensor) -> bool:
    """Whether a call goes to turbox_mm's kernels (CUDA tensors); tests patch this."""
    return boxes.is_cuda


def _nms_rotated(original: Callable) -> Callable:

    def nms_rotated(dets: Tensor, scores: Tensor, iou_threshold: float,
                    labels: Optional[Tensor] = None, clockwise: bool = True):
        if labels is not None or not clockwise or dets.shape[0] == 0 or not _on_gpu(dets):
            return original(dets, scores, iou_threshold, labels, clockwise)
        keep = bev_nms.bev_nms(dets, scores, iou_threshold, 'rotated')
        return torch.cat([dets[keep], scores[keep, None]], 1), keep

    nms_rotated.__wrapped__ = original
    return nms_rotated


def _nms(original: Callable) -> Callable:

    def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, offset: int = 0,
            score_threshold: float = 0, max_num: int = -1):
        if offset != 0 or score_threshold > 0 or max_num > 0 or not isinstance(boxes, Tensor) \
                or boxes.shape[0] == 0 or not _on_gpu(boxes):
            return original(boxes, scores, iou_threshold, offset, score_threshold, max_num)
        keep = bev_nms.bev_nms(boxes, scores, iou_threshold, 'aligned')
        return torch.cat([boxes[keep], scores[keep, None]], 1), keep

    nms.__wrapped__ = original
    return nms


def _on_cuda_only(replacement: Callable) -> Callable:
    """A factory: ``replacement`` for CUDA boxes, mmcv's ``original`` otherwise (mmcv's iou3d
    NMS has no CPU op; its error stays the user's)."""

    def factory(original: Callable) -> Callable:

        def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
            if not _on_gpu(boxes):
                return original(boxes, scores, iou_threshold)
            return replacement(boxes, scores, iou_threshold)

        nms.__wrapped__ = original
        return nms

    return factory


def _targets() -> List[Target]:
    """``(module, attribute, replacement factory)`` for every rebinding available here."""
    import mmcv.ops
    targets = []
    box3d = importlib.import_module(_BOX3D_NMS)
    if getattr(box3d, 'nms_rotated', None) is mmcv.ops.nms_rotated:
        targets.append((_BOX3D_NMS, 'nms_rotated', _nms_rotated))
    if getattr(box3d, 'nms', None) is mmcv.ops.nms:
        targets.append((_BOX3D_NMS, 'nms', _nms))
    for name in _IOU3D_USERS:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a head whose own dependencies are missing here
            continue
        if getattr(module, 'nms3d', None) is mmcv.ops.nms3d:
            targets.append((name, 'nms3d', _on_cuda_only(bev_nms.nms3d)))
        if getattr(module, 'nms3d_normal', None) is mmcv.ops.nms3d_normal:
            targets.append((name, 'nms3d_normal', _on_cuda_only(bev_nms.nms3d_normal)))
    return targets


_REBINDINGS = Rebindings('turbox_mm.ops.bev_nms', _targets)
#: Rebind mmdet3d's NMS calls to turbox_mm's; returns one line per rebinding (none twice).
install = _REBINDINGS.install
#: Restore every function :func:`install` replaced.
uninstall = _REBINDINGS.uninstall
#: ``module.attribute`` of every rebinding in place.
installed = _REBINDINGS.installed
