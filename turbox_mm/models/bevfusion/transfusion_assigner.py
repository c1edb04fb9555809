"""The TransFusion head's Hungarian assignment: costs and the assigner (upstream's stock path).

Per sample and decoder layer, the cost of assigning proposal ``i`` to ground-truth box ``j``
is the sum of

- a focal classification cost (mmdet's ``FocalLossCost`` on the proposals' class logits),
- ``BBoxBEVL1Cost``: the L1 distance of the BEV centres, both normalised to ``[0, 1]`` by the
  point cloud range, times its weight,
- ``IoU3DCost``: minus the 3D IoU of the boxes (mmdet3d's ``BboxOverlaps3D``), times its
  weight;

then scipy's ``linear_sum_assignment`` on the host. A sample without ground truth assigns
every proposal to the background (upstream fails there).

:meth:`HungarianAssigner3D.cost` with ``sync_free=True`` (the batched turbox targets) gives the
same costs without the host waits of the stock procedure: the range constants come from
``device_constant`` (uploaded once) instead of ``new_tensor`` (a host-to-device copy each
call), and for mmdet3d's LiDAR ``BboxOverlaps3D`` the IoU is :func:`lidar_iou_3d`, the same
operations without the list indexing of the boxes' ``bev`` property (another host copy).
"""
from typing import Dict

import torch
from mmcv.ops import box_iou_rotated
from mmdet.models.task_modules import AssignResult
from mmengine.structures import InstanceData
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from turbox_mm.registry import TASK_UTILS
from turbox_mm.utils.upload import device_constant


@TASK_UTILS.register_module()
class BBoxBEVL1Cost:
    """L1 distance of the BEV centres normalised by the point cloud range, times ``weight``."""

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def __call__(self, bboxes: Tensor, gt_bboxes: Tensor, train_cfg: Dict,
                 sync_free: bool = False) -> Tensor:
        """``[P, G]`` costs; ``sync_free`` takes the range constants from
        :func:`~turbox_mm.utils.upload.device_constant` (the same values) instead of two
        host-to-device copies."""
        pcr = train_cfg['point_cloud_range']
        if sync_free:
            start = device_constant(pcr[0:2], bboxes)
            extent = device_constant(pcr[3:5], bboxes) - start
        else:
            start = bboxes.new_tensor(pcr[0:2])
            extent = bboxes.new_tensor(pcr[3:5]) - start
        return torch.cdist((bboxes[:, :2] - start) / extent, (gt_bboxes[:, :2] - start) / extent,
                           p=1) * self.weight


def lidar_iou_3d(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """``[N, M]`` 3D IoU of LiDAR boxes ``[N, 7+]`` and ``[M, 7+]`` (bottom centre, l, w, h,
    yaw): the operations of mmdet3d's ``BboxOverlaps3D(coordinate='lidar')`` in their order,
    without a host wait (its ``bev`` property indexes with a Python list, a host copy)."""
    rows, cols = boxes1.shape[0], boxes2.shape[0]
    boxes1, boxes2 = boxes1.float(), boxes2.float()  # mmdet3d's box classes hold float32
    if rows * cols == 0:
        return boxes1.new_zeros(rows, cols)
    bottom1, bottom2 = boxes1[:, 2].view(-1, 1), boxes2[:, 2].view(1, -1)
    top1 = (boxes1[:, 2] + boxes1[:, 5]).view(-1, 1)
    top2 = (boxes2[:, 2] + boxes2[:, 5]).view(1, -1)
    overlaps_h = torch.clamp(torch.min(top1, top2) - torch.max(bottom1, bottom2), min=0)
    bev1, bev2 = (torch.stack([b[:, 0], b[:, 1], b[:, 3], b[:, 4], b[:, 6]], 1)
                  for b in (boxes1, boxes2))
    bev1[:, 2:4] = bev1[:, 2:4].clamp(min=1e-4)  # mmdet3d's guard for box_iou_rotated
    bev2[:, 2:4] = bev2[:, 2:4].clamp(min=1e-4)
    iou2d = box_iou_rotated(bev1, bev2)
    areas1 = (bev1[:, 2] * bev1[:, 3]).unsqueeze(1).expand(rows, cols)
    areas2 = (bev2[:, 2] * bev2[:, 3]).unsqueeze(0).expand(rows, cols)
    overlaps_3d = iou2d * (areas1 + areas2) / (1 + iou2d) * overlaps_h
    volume1 = (boxes1[:, 3] * boxes1[:, 4] * boxes1[:, 5]).view(-1, 1)
    volume2 = (boxes2[:, 3] * boxes2[:, 4] * boxes2[:, 5]).view(1, -1)
    return overlaps_3d / torch.clamp(volume1 + volume2 - overlaps_3d, min=1e-8)


@TASK_UTILS.register_module()
class IoU3DCost:
    """Minus the IoU, times ``weight``."""

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def __call__(self, iou: Tensor) -> Tensor:
        return -iou * self.weight


@TASK_UTILS.register_module()
class HungarianAssigner3D:
    """One-to-one assignment of proposals to ground-truth boxes at the lowest total cost
    (module docstring).

    Args:
        cls_cost, reg_cost, iou_cost (dict): The three costs' configs.
        iou_calculator (dict): The IoU of ``[P, 7+]`` and ``[G, 7+]`` LiDAR boxes.
    """

    def __init__(self, cls_cost: Dict = dict(type='mmdet.FocalLossCost', weight=0.15),
                 reg_cost: Dict = dict(type='turbox_mm.BBoxBEVL1Cost', weight=0.25),
                 iou_cost: Dict = dict(type='turbox_mm.IoU3DCost', weight=0.25),
                 iou_calculator: Dict = dict(type='mmdet3d.BboxOverlaps3D', coordinate='lidar')
                 ) -> None:
        self.cls_cost = TASK_UTILS.build(cls_cost)
        self.reg_cost = TASK_UTILS.build(reg_cost)
        self.iou_cost = TASK_UTILS.build(iou_cost)
        self.iou_calculator = TASK_UTILS.build(iou_calculator)

    def cost(self, bboxes: Tensor, gt_bboxes: Tensor, gt_labels: Tensor, cls_logits: Tensor,
             train_cfg: Dict, sync_free: bool = False):
        """``(cost [P, G], iou [P, G])`` (``cls_logits``: ``[K, P]``); ``sync_free``: the
        same values without host waits where the costs allow it (module docstring)."""
        cls_cost = self.cls_cost(InstanceData(scores=cls_logits.T),
                                 InstanceData(labels=gt_labels))
        if sync_free and self._lidar_iou():
            iou = lidar_iou_3d(bboxes, gt_bboxes)
        else:
            iou = self.iou_calculator(bboxes, gt_bboxes)
        if sync_free and isinstance(self.reg_cost, BBoxBEVL1Cost):
            reg_cost = self.reg_cost(bboxes, gt_bboxes, train_cfg, sync_free=True)
        else:
            reg_cost = self.reg_cost(bboxes, gt_bboxes, train_cfg)
        return cls_cost + reg_cost + self.iou_cost(iou), iou

    def _lidar_iou(self) -> bool:
        """Whether the IoU calculator is mmdet3d's 3D IoU of LiDAR boxes."""
        from mmdet3d.structures.ops import BboxOverlaps3D
        calc = self.iou_calculator
        return type(calc) is BboxOverlaps3D and calc.coordinate == 'lidar'

    def assign(self, bboxes: Tensor, gt_bboxes: Tensor, gt_labels: Tensor, cls_logits: Tensor,
               train_cfg: Dict) -> AssignResult:
        """Assign ``[P, 9]`` decoded proposals to ``[G, 9]`` boxes (``cls_logits``: ``[K, P]``).

        Returns:
            AssignResult: ``gt_inds`` (0 background, ``j + 1`` for box ``j``), ``max_overlaps``
            (the matched pairs' IoU, else 0), ``labels`` (-1 where unmatched).
        """
        num_gts, num_bboxes = gt_bboxes.shape[0], bboxes.shape[0]
        gt_inds = bboxes.new_zeros(num_bboxes, dtype=torch.long)
        labels = bboxes.new_full((num_bboxes, ), -1, dtype=torch.long)
        overlaps = bboxes.new_zeros(num_bboxes)
        if num_gts == 0 or num_bboxes == 0:
            return AssignResult(num_gts, gt_inds, overlaps, labels=labels)
        cost, iou = self.cost(bboxes, gt_bboxes, gt_labels, cls_logits, train_cfg)
        rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
        rows = torch.as_tensor(rows, dtype=torch.long, device=bboxes.device)
        cols = torch.as_tensor(cols, dtype=torch.long, device=bboxes.device)
        gt_inds[rows] = cols + 1
        labels[rows] = gt_labels[cols]
        overlaps[rows] = iou[rows, cols].to(overlaps.dtype)
        return AssignResult(num_gts, gt_inds, overlaps, labels=labels)
