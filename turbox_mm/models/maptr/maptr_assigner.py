"""``MapTRAssigner``: one-to-one matching of predicted vectors to map instances, over every
equivalent point order of each instance (upstream ``assigners/maptr_assigner.py`` @ 2bb012a).

The cost of prediction ``q`` for instance ``g`` is the sum of

- a classification cost (mmdet's ``FocalLossCost`` on the vector's class logits, x2 in
  upstream's configs);
- the ordered-points cost: ``OrderedPtsL1Cost`` between the predicted points (normalised) and
  each equivalent order of the instance (normalised; padding orders at -10000 m become about
  -333 and never win), its minimum over the orders; the order reaching it is ``order_index``
  (x5);
- a box L1 cost and a GIoU cost, weight 0 in upstream's configs (kept only because mmdet 2.x's
  ``DETRHead`` asserts cost weight == loss weight). A weight-0 cost adds zero to every finite
  cost, so it is not computed here; with a non-zero weight it is computed as upstream's mmdet
  2.x costs did, including the L1 cost's quirk: with ``box_format='xywh'`` the already
  ``(cx, cy, w, h)`` targets are converted from ``xyxy`` once more.

then scipy's ``linear_sum_assignment`` (:meth:`MapTRAssigner.assign`, upstream's path: one
sample of one decoder layer a call, one host copy each). :meth:`MapTRAssigner.cost` also
prices many matrices at once (leading batch dimensions) for the head's turbox path, which
solves them all with one host transfer (:mod:`.maptr_targets`).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from mmdet.models.task_modules import AssignResult
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy, bbox_overlaps, bbox_xyxy_to_cxcywh
from mmengine.structures import InstanceData
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from turbox_mm.registry import TASK_UTILS
from .geometry import PC_RANGE, denormalize_2d_bbox, normalize_2d_bbox, normalize_2d_pts

#: nuScenes MapTR's point-cloud range (x, y, z min, then max).


@TASK_UTILS.register_module()
class MapTRAssigner:
    """Hungarian assignment of vectors to map instances (module docstring).

    Args:
        cls_cost (dict): A classification match cost of mmdet 3 (called with
            ``InstanceData(scores=logits)`` and ``InstanceData(labels=...)``). Defaults to
            ``mmdet.FocalLossCost`` with weight 2.
        reg_cost (dict): ``weight`` and ``box_format`` (``'xywh'`` or ``'xyxy'``) of mmdet
            2.x's ``BBoxL1Cost`` on normalised boxes; its ``type`` is not built. Defaults to
            weight 0, ``'xywh'``.
        iou_cost (dict): ``weight`` and ``iou_mode`` of mmdet 2.x's ``IoUCost`` (minus the
            IoU of the metric ``xyxy`` boxes); ``type`` not built. Defaults to weight 0,
            ``'giou'``.
        pts_cost (dict): The points cost. Defaults to ``OrderedPtsL1Cost`` with weight 5.
        pc_range (list[float]): The patch, to normalise. Defaults to :data:`PC_RANGE`.
        z_cfg (dict, optional): Upstream v2's 3D switches; only 2D points
            (``gt_z_flag=False``) are supported. Defaults to None.

    Examples:
        >>> assigner = MapTRAssigner()
        >>> gt_pts = torch.tensor([[[[0., 0.], [3., 0.]], [[3., 0.], [0., 0.]]]])  # 1 x 2 orders
        >>> pred = torch.tensor([[[0.6, 0.5], [0.5, 0.5]], [[0.1, 0.9], [0.2, 0.9]]])
        >>> result, order = assigner.assign(torch.rand(2, 4), torch.zeros(2, 3), pred,
        ...                                 torch.zeros(1, 4), torch.tensor([1]), gt_pts)
        >>> result.gt_inds.tolist(), int(order[0, 0])  # query 0 matches, reversed order
        ([1, 0], 1)
    """

    def __init__(self, cls_cost: dict = dict(type='mmdet.FocalLossCost', weight=2.0),
                 reg_cost: dict = dict(type='BBoxL1Cost', weight=0.0, box_format='xywh'),
                 iou_cost: dict = dict(type='IoUCost', iou_mode='giou', weight=0.0),
                 pts_cost: dict = dict(type='turbox_mm.OrderedPtsL1Cost', weight=5.0),
                 pc_range: Optional[list] = None, z_cfg: Optional[dict] = None) -> None:
        if z_cfg is not None and (z_cfg.get('gt_z_flag') or z_cfg.get('pred_z_flag')):
            raise NotImplementedError('MapTRAssigner: 3D points (z_cfg gt_z_flag / '
                                      'pred_z_flag) are not ported; MapTR v1/v2 nuScenes use 2D')
        self.cls_cost = TASK_UTILS.build(cls_cost)
        self.pts_cost = TASK_UTILS.build(pts_cost)
        self.reg_weight = float(reg_cost.get('weight', 1.0))
        self.reg_box_format = reg_cost.get('box_format', 'xyxy')
        if self.reg_box_format not in ('xywh', 'xyxy'):
            raise ValueError(f"MapTRAssigner: reg_cost box_format must be 'xywh' or 'xyxy', "
                             f'got {self.reg_box_format!r}')
        self.iou_weight = float(iou_cost.get('weight', 1.0))
        self.iou_mode = iou_cost.get('iou_mode', 'giou')
        self.pc_range = list(PC_RANGE if pc_range is None else pc_range)

    def cost(self, bbox_pred: Tensor, cls_pred: Tensor, pts_pred: Tensor, gt_bboxes: Tensor,
             gt_labels: Tensor, gt_pts: Tensor,
             sync_free: bool = False) -> Tuple[Tensor, Tensor]:
        """The cost matrices and the best order of every pair.

        Predictions may carry leading dimensions ``S`` (e.g. ``[layers, batch]``), the ground
        truth leading dimensions that broadcast against them (e.g. ``[batch]``).

        Args:
            bbox_pred (Tensor): ``[*S, Q, 4]`` normalised ``(cx, cy, w, h)``.
            cls_pred (Tensor): ``[*S, Q, K]`` class logits.
            pts_pred (Tensor): ``[*S, Q, P, 2]`` normalised points.
            gt_bboxes (Tensor): ``[*S', G, 4]`` metric ``(x1, y1, x2, y2)``.
            gt_labels (Tensor): ``[*S', G]`` long.
            gt_pts (Tensor): ``[*S', G, O, P_gt, 2]`` metric points of each order.
            sync_free (bool): Normalise the ground truth without upstream's host-to-device
                copies (the same numbers; :mod:`.geometry`). Defaults to False.

        Returns:
            tuple[Tensor, Tensor]: cost ``[*S, Q, G]`` and ``order_index`` ``[*S, Q, G]``.
        """
        num_classes = cls_pred.shape[-1]
        lead, num_query = cls_pred.shape[:-2], cls_pred.shape[-2]
        num_gts, num_orders, gt_points = gt_pts.shape[-4:-1]
        # the focal cost of every query for every class, then each instance's column
        per_class = self.cls_cost(
            InstanceData(scores=cls_pred.reshape(-1, num_classes)),
            InstanceData(labels=torch.arange(num_classes, device=cls_pred.device)))
        per_class = per_class.view(*lead, num_query, num_classes)
        labels = gt_labels[..., None, :].expand(*lead, num_query, num_gts)
        cost = torch.gather(per_class, -1, labels)

        if pts_pred.shape[-2] != gt_points:  # upstream interpolates the predictions
            flat = pts_pred.reshape(-1, pts_pred.shape[-2], 2).permute(0, 2, 1)
            flat = F.interpolate(flat, size=gt_points, mode='linear', align_corners=True)
            pts_pred = flat.permute(0, 2, 1).reshape(*lead, num_query, gt_points, 2)
        ordered = self.pts_cost(pts_pred, normalize_2d_pts(gt_pts, self.pc_range, sync_free))
        pts_cost, order_index = ordered.view(*lead, num_query, num_gts, num_orders).min(-1)
        cost = cost + pts_cost

        if self.reg_weight != 0:
            cost = cost + self.reg_weight * self._l1(bbox_pred, gt_bboxes, sync_free)
        if self.iou_weight != 0:
            cost = cost - self.iou_weight * self._overlaps(bbox_pred, gt_bboxes)
        return cost, order_index

    def _l1(self, bbox_pred: Tensor, gt_bboxes: Tensor, sync_free: bool = False) -> Tensor:
        """mmdet 2.x ``BBoxL1Cost`` on upstream's inputs (module docstring)."""
        gt = normalize_2d_bbox(gt_bboxes, self.pc_range, sync_free)
        if self.reg_box_format == 'xywh':
            gt = bbox_xyxy_to_cxcywh(gt)
        else:
            bbox_pred = bbox_cxcywh_to_xyxy(bbox_pred)
        batch = torch.broadcast_shapes(bbox_pred.shape[:-2], gt.shape[:-2])
        return torch.cdist(bbox_pred.expand(*batch, *bbox_pred.shape[-2:]),
                           gt.expand(*batch, *gt.shape[-2:]), p=1)

    def _overlaps(self, bbox_pred: Tensor, gt_bboxes: Tensor) -> Tensor:
        """The IoU (``iou_mode``) of the metric predicted boxes and the instances' boxes."""
        boxes = denormalize_2d_bbox(bbox_pred, self.pc_range)
        batch = torch.broadcast_shapes(boxes.shape[:-2], gt_bboxes.shape[:-2])
        return bbox_overlaps(boxes.expand(*batch, *boxes.shape[-2:]),
                             gt_bboxes.expand(*batch, *gt_bboxes.shape[-2:]),
                             mode=self.iou_mode)

    def assign(self, bbox_pred: Tensor, cls_pred: Tensor, pts_pred: Tensor, gt_bboxes: Tensor,
               gt_labels: Tensor, gt_pts: Tensor) -> Tuple[AssignResult, Optional[Tensor]]:
        """Upstream's per-sample assignment (one host copy and one scipy call).

        Args:
            bbox_pred, cls_pred, pts_pred, gt_bboxes, gt_labels, gt_pts: As :meth:`cost`,
                without leading dimensions.

        Returns:
            tuple: ``AssignResult`` (``gt_inds``: 0 background, ``g + 1`` for instance ``g``;
            ``labels``: -1 where unmatched) and ``order_index`` ``[Q, G]`` (None without
            ground truth).
        """
        num_gts, num_query = gt_labels.shape[0], pts_pred.shape[0]
        device = pts_pred.device
        gt_inds = torch.zeros(num_query, dtype=torch.long, device=device)
        labels = torch.full((num_query, ), -1, dtype=torch.long, device=device)
        if num_gts == 0 or num_query == 0:
            return AssignResult(num_gts, gt_inds, None, labels=labels), None
        cost, order_index = self.cost(bbox_pred, cls_pred, pts_pred, gt_bboxes, gt_labels,
                                      gt_pts)
        rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
        rows = torch.as_tensor(rows, dtype=torch.long, device=device)
        cols = torch.as_tensor(cols, dtype=torch.long, device=device)
        gt_inds[rows] = cols + 1
        labels[rows] = gt_labels[cols]
        return AssignResult(num_gts, gt_inds, None, labels=labels), order_index
