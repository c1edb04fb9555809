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
"""
from typing import Dict

import torch
from mmdet.models.task_modules import AssignResult
from mmengine.structures import InstanceData
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from turbox_mm.registry import TASK_UTILS


@TASK_UTILS.register_module()
class BBoxBEVL1Cost:
    """L1 distance of the BEV centres normalised by the point cloud range, times ``weight``."""

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def __call__(self, bboxes: Tensor, gt_bboxes: Tensor, train_cfg: Dict) -> Tensor:
        pcr = train_cfg['point_cloud_range']
        start = bboxes.new_tensor(pcr[0:2])
        extent = bboxes.new_tensor(pcr[3:5]) - start
        return torch.cdist((bboxes[:, :2] - start) / extent, (gt_bboxes[:, :2] - start) / extent,
                           p=1) * self.weight


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
             train_cfg: Dict):
        """``(cost [P, G], iou [P, G])`` (``cls_logits``: ``[K, P]``)."""
        cls_cost = self.cls_cost(InstanceData(scores=cls_logits.T),
                                 InstanceData(labels=gt_labels))
        iou = self.iou_calculator(bboxes, gt_bboxes)
        return cls_cost + self.reg_cost(bboxes, gt_bboxes, train_cfg) + self.iou_cost(iou), iou

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
