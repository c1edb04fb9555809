"""MapTR's training targets for every decoder layer and sample at once, without a host wait.

Upstream assigns each sample of each decoder layer on its own: a cost matrix copied to the host
for scipy, six layers x the batch (twice that in v2, with the one-to-many queries), then
boolean indexing and ``.item()`` reads. Here (the head's ``op_impl='turbox'``):

- :func:`pad_ground_truth` stacks the batch's instances, padded to the largest count;
- :func:`assign_batched` prices all layers x samples of every query group (v2: one-to-one and
  one-to-many) with :meth:`MapTRAssigner.cost` (the same element-wise costs as the per-sample
  path, ``[layers * batch, V, G_max]``), and solves each matrix on its own sample's columns:
  on the device by ``turbox_mm::lsap`` (:func:`turbox_mm.models.sparse4d.matching.
  solve_on_device`, scipy's matches, no host read), or with scipy after one transfer
  (:func:`~turbox_mm.models.sparse4d.matching.solve_batched`: the first group's matrices are
  the transfer, the other groups' ride along as its ``extras``; the pairs go back without a
  host wait);
- :func:`build_targets` scatters the targets from the pairs (weights by ``index_fill_``, not
  by assigning a Python scalar, which torch copies from the host); the positive count of each
  layer is counted on the device (a comparison and a sum: ``bincount`` would read its output
  size on the host), so the losses need no host read;
- :func:`turbox_losses` computes the head's losses from them with the stock path's values.

Padded columns are never solved, so each matrix is the per-sample one. The only difference
from upstream is upstream's own: scipy gets float64 copies of the float32 costs either way.
"""
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from mmdet.utils import reduce_mean
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from turbox_mm.models.losses import focal_loss_like_mmdet
from turbox_mm.models.sparse4d.matching import (matches_on_device, solve_batched, solve_host,
                                                solve_on_device)
from turbox_mm.utils.upload import upload
from .geometry import denormalize_2d_bbox, denormalize_2d_pts, normalize_2d_bbox, normalize_2d_pts


class PaddedGT(NamedTuple):
    """A batch's map instances, padded to the largest count ``G`` (padding: label 0, zeros).

    Attributes:
        labels (Tensor): ``[B, G]`` long.
        bboxes (Tensor): ``[B, G, 4]`` metric ``xyxy``.
        shifts (Tensor): ``[B, G, O, P, 2]`` metric points of each equivalent order.
        counts (list[int]): Instances of each sample (host ints).
    """
    labels: Tensor
    bboxes: Tensor
    shifts: Tensor
    counts: List[int]


class Targets(NamedTuple):
    """Targets of every layer: ``labels``, ``label_weights`` ``[L, B * V]``; ``bbox_targets``
    (metric ``xyxy``), ``bbox_weights`` ``[L, B * V, 4]``; ``pts_targets`` (metric),
    ``pts_weights`` ``[L, B * V, P, 2]``; ``num_pos`` ``[L]`` float (on the device)."""
    labels: Tensor
    label_weights: Tensor
    bbox_targets: Tensor
    bbox_weights: Tensor
    pts_targets: Tensor
    pts_weights: Tensor
    num_pos: Tensor


def pad_ground_truth(gts: Sequence[Tuple[Tensor, Tensor, Tensor]]) -> PaddedGT:
    """Stack per-sample ``(labels [G], bboxes [G, 4], shifts [G, O, P, 2])`` (already on the
    device) into a :class:`PaddedGT`, zero-padded to the largest ``G``."""
    counts = [int(labels.shape[0]) for labels, _, _ in gts]
    labels, bboxes, shifts = (pad_sequence([gt[i] for gt in gts], batch_first=True)
                              for i in range(3))
    return PaddedGT(labels.long(), bboxes, shifts, counts)


def assign_batched(assigner, groups: Sequence[Tuple[Tensor, Tensor, Tensor, PaddedGT]],
                   matcher: str = 'host') -> List[Tuple[Tensor, Tensor]]:
    """Assign every layer and sample of every group, on the device or with one
    device-to-host transfer.

    Args:
        assigner (MapTRAssigner): Prices the pairs.
        groups: Per query group ``(cls [L, B, V, K], bbox [L, B, V, 4], pts [L, B, V, P, 2],
            gt)``; predictions are detached here.
        matcher (str): ``'device'`` (:func:`~turbox_mm.models.sparse4d.matching.
            solve_on_device` where its kernel runs) or ``'host'``. Defaults to 'host'.

    Returns:
        list[tuple[Tensor, Tensor]]: Per group, the pairs ``[3, N]`` (matrix ``l * B + b``,
        query, instance; on the device) and ``order_index`` ``[L * B, V, G]`` (None for a
        group without instances).
    """
    costs, orders, todo = [], [], []
    for index, (cls, bbox, pts, gt) in enumerate(groups):
        if sum(gt.counts) == 0:
            orders.append(None)
            continue
        layers, batch, queries = cls.shape[:3]
        with torch.no_grad():
            cost, order = assigner.cost(bbox.detach(), cls.detach(), pts.detach(),
                                        gt.bboxes, gt.labels, gt.shifts, sync_free=True)
        costs.append(cost.reshape(layers * batch, queries, -1))
        orders.append(order.reshape(layers * batch, queries, -1))
        todo.append(index)
    device = groups[0][0].device
    empty = torch.zeros(3, 0, dtype=torch.long, device=device)
    pairs = [empty] * len(groups)
    if todo and matches_on_device(costs[0], matcher):
        for index, cost in zip(todo, costs):
            pairs[index] = solve_on_device(cost, groups[index][3].counts)
    elif todo:
        first, *rest = todo
        pairs[first], extras = solve_batched(costs[0], groups[first][3].counts, costs[1:])
        for index, host in zip(rest, extras):
            found = solve_host(host.to(torch.float64).numpy(), groups[index][3].counts)
            pairs[index] = upload(found, device)
    return list(zip(pairs, orders))


def build_targets(cls: Tensor, gt: PaddedGT, pairs: Tensor, order_index: Tensor,
                  num_gt_points: int) -> Targets:
    """Targets of every layer from the assigned pairs (upstream's ``_get_target_single`` for
    all layers and samples at once).

    Args:
        cls (Tensor): ``[L, B, V, K]`` class logits (for shapes and device).
        gt (PaddedGT): The instances.
        pairs (Tensor): ``[3, N]`` from :func:`assign_batched`.
        order_index (Tensor): ``[L * B, V, G]`` best order of each pair (None if no pairs).
        num_gt_points (int): Points of a ground-truth order.
    """
    layers, batch, queries, num_classes = cls.shape
    total = layers * batch * queries
    device, dtype = cls.device, cls.dtype
    labels = torch.full((total, ), num_classes, dtype=torch.long, device=device)
    label_weights = torch.ones(total, dtype=dtype, device=device)
    bbox_targets = torch.zeros(total, 4, dtype=dtype, device=device)
    bbox_weights = torch.zeros(total, 4, dtype=dtype, device=device)
    pts_targets = torch.zeros(total, num_gt_points, 2, dtype=dtype, device=device)
    pts_weights = torch.zeros(total, num_gt_points, 2, dtype=dtype, device=device)
    matrix, row, col = pairs
    sample = matrix % batch
    flat = matrix * queries + row
    if order_index is not None:
        order = order_index[matrix, row, col]
        labels[flat] = gt.labels[sample, col]
        bbox_targets[flat] = gt.bboxes[sample, col].to(dtype)
        bbox_weights.index_fill_(0, flat, 1.0)  # not `[flat] = 1.0`: a host scalar, copied
        pts_targets[flat] = gt.shifts[sample, col, order].to(dtype)
        pts_weights.index_fill_(0, flat, 1.0)
    # pairs per layer (bincount would read its size on the host)
    layer_of_pair = matrix // batch
    num_pos = (layer_of_pair == torch.arange(layers, device=device)[:, None]).sum(1).to(dtype)
    shape = (layers, batch * queries)
    return Targets(labels.view(shape), label_weights.view(shape),
                   bbox_targets.view(*shape, 4), bbox_weights.view(*shape, 4),
                   pts_targets.view(*shape, num_gt_points, 2),
                   pts_weights.view(*shape, num_gt_points, 2), num_pos)


def turbox_losses(head, groups: Sequence[Tuple[Dict[str, Tensor], list]]
                  ) -> List[Dict[str, Tensor]]:
    """The head's loss dicts of query groups ``(preds, [(labels, bboxes, shifts)] per
    sample)``: one assignment for all (:func:`assign_batched`, on the head's ``matcher``), then
    :func:`layer_losses` per group."""
    padded = [(preds, pad_ground_truth(gts)) for preds, gts in groups]
    assigned = assign_batched(head.assigner, [
        (p['all_cls_scores'], p['all_bbox_preds'], p['all_pts_preds'], gt) for p, gt in padded],
        getattr(head, 'matcher', 'host'))
    results = []
    for (preds, gt), (pairs, order_index) in zip(padded, assigned):
        targets = build_targets(preds['all_cls_scores'], gt, pairs, order_index,
                                head.num_pts_per_gt_vec)
        results.append(head._loss_dict(layer_losses(head, preds, targets)))
    return results


def layer_losses(head, preds: Dict[str, Tensor], targets: Targets) -> List[Tuple[Tensor, ...]]:
    """Every layer's ``(loss_cls, loss_bbox, loss_iou, loss_pts, loss_dir)`` with the values of
    the head's stock ``loss_single``: the normaliser is a device tensor (all-reduced once for
    all layers), non-finite box targets are masked instead of indexed away, weight-0 box terms
    are zeros that keep the graph; with upstream's loss configuration all layers at once
    (:func:`_all_layers_at_once`)."""
    num_pos = reduce_mean(targets.num_pos.clone()).clamp(min=1)
    cls_avg = num_pos if head.sync_cls_avg_factor else targets.num_pos.clamp(min=1)
    normalized = normalize_2d_bbox(targets.bbox_targets, head.pc_range, sync_free=True)
    finite = torch.isfinite(normalized).all(-1)
    keep = finite[..., None].to(normalized.dtype)
    pts_targets = torch.where(finite[..., None, None], targets.pts_targets, 0.0)
    pts_weights = targets.pts_weights * keep[..., None]
    norm_pts_targets = normalize_2d_pts(pts_targets, head.pc_range, sync_free=True)
    step = head.dir_interval
    target_dirs = pts_targets[:, :, step:] - pts_targets[:, :, :-step]
    if _layers_batchable(head, preds):
        return _all_layers_at_once(head, preds, targets, cls_avg, num_pos, norm_pts_targets,
                                   pts_weights, target_dirs)
    # layer by layer: a loss configuration that the batched path does not know
    normalized = torch.where(finite[..., None], normalized, 0.0)
    bbox_targets = torch.where(finite[..., None], targets.bbox_targets, 0.0)
    bbox_weights = targets.bbox_weights * head.code_weights * keep
    out = []
    for i in range(preds['all_cls_scores'].shape[0]):
        cls = preds['all_cls_scores'][i].reshape(-1, head.num_classes)
        loss_cls = focal_loss_like_mmdet(head.loss_cls, cls, targets.labels[i],
                                         targets.label_weights[i], avg_factor=cls_avg[i])
        bbox_preds = preds['all_bbox_preds'][i].reshape(-1, 4)
        pts_preds = preds['all_pts_preds'][i]
        pts_preds = head._pred_pts(pts_preds.reshape(-1, pts_preds.shape[-2], 2))
        loss_bbox = _weighted_or_zero(head.loss_bbox, bbox_preds, normalized[i],
                                      bbox_weights[i], num_pos[i])
        loss_pts = head.loss_pts(pts_preds, norm_pts_targets[i], pts_weights[i],
                                 avg_factor=num_pos[i])
        metric_preds = denormalize_2d_pts(pts_preds, head.pc_range)
        loss_dir = head.loss_dir(metric_preds[:, step:] - metric_preds[:, :-step],
                                 target_dirs[i], pts_weights[i][:, :-step, 0],
                                 avg_factor=num_pos[i])
        loss_iou = _weighted_or_zero(head.loss_iou, bbox_preds, bbox_targets[i],
                                     bbox_weights[i], num_pos[i],
                                     lambda b: denormalize_2d_bbox(b, head.pc_range))
        out.append((loss_cls, loss_bbox, loss_iou, loss_pts, loss_dir))
    return nan_to_num_all(out)


#: Float32's epsilon, which mmdet's mean reduction adds to ``avg_factor``.
_MMDET_EPS = torch.finfo(torch.float32).eps


def _layers_batchable(head, preds: Dict[str, Tensor]) -> bool:
    """Whether :func:`_all_layers_at_once` knows the head's losses: mmdet's sigmoid
    ``FocalLoss``, ``PtsL1Loss`` and ``PtsDirCosLoss`` with the mean reduction, the box and
    IoU terms weighted 0 (upstream's configs), and queries to score."""
    from mmdet.models.losses import FocalLoss

    from .pts_dir_cos_loss import PtsDirCosLoss
    from .pts_l1_loss import PtsL1Loss
    cls = head.loss_cls
    return (type(cls) is FocalLoss and cls.use_sigmoid and not cls.activated
            and cls.reduction == 'mean' and type(head.loss_pts) is PtsL1Loss
            and head.loss_pts.reduction == 'mean' and type(head.loss_dir) is PtsDirCosLoss
            and head.loss_dir.reduction == 'mean'
            and getattr(head.loss_bbox, 'loss_weight', 1.0) == 0
            and getattr(head.loss_iou, 'loss_weight', 1.0) == 0
            and preds['all_pts_preds'][0].numel() > 0)


def _per_layer(elements: Tensor, layers: int, avg_factor: Tensor, eps: float) -> Tensor:
    """``[L]``: each layer's sum of ``elements`` (layer-major) over ``avg_factor + eps``, as
    the mean reduction of a per-layer call computes it."""
    return elements.reshape(layers, -1).sum(1) / (avg_factor + eps)


def _all_layers_at_once(head, preds: Dict[str, Tensor], targets: Targets, cls_avg: Tensor,
                        num_pos: Tensor, norm_pts_targets: Tensor, pts_weights: Tensor,
                        target_dirs: Tensor) -> List[Tuple[Tensor, ...]]:
    """:func:`layer_losses`' loop in one pass over all layers: every loss element-wise over
    ``[L * B * V, ...]`` (the loss modules with ``reduction_override='none'``), then each
    layer's sum over its normaliser, as each layer's own mean reduction divides it. The same
    values up to the order of the sums (float rounding), in about a sixth of the operations
    (a host-bound step pays for each)."""
    cls_scores = preds['all_cls_scores']
    layers = cls_scores.shape[0]
    cls_el = focal_loss_like_mmdet(head.loss_cls, cls_scores.reshape(-1, head.num_classes),
                                   targets.labels.reshape(-1), targets.label_weights.reshape(-1),
                                   reduction_override='none')
    loss_cls = _per_layer(cls_el, layers, cls_avg, _MMDET_EPS)
    pts = preds['all_pts_preds']
    pts = head._pred_pts(pts.reshape(-1, pts.shape[-2], 2))  # [L * B * V, P_gt, 2]
    pts_el = head.loss_pts(pts, norm_pts_targets.reshape(pts.shape),
                           pts_weights.reshape(pts.shape), reduction_override='none')
    loss_pts = _per_layer(pts_el, layers, num_pos, _MMDET_EPS)
    step = head.dir_interval
    metric = denormalize_2d_pts(pts, head.pc_range)
    dirs = metric[:, step:] - metric[:, :-step]
    dir_el = head.loss_dir(dirs, target_dirs.reshape(dirs.shape),
                           pts_weights[..., :-step, 0].reshape(dirs.shape[:-1]),
                           reduction_override='none')
    loss_dir = _per_layer(dir_el, layers, num_pos, 0.0)  # upstream's own mean: no epsilon
    zero = preds['all_bbox_preds'].reshape(layers, -1).sum(1) * 0  # weight-0 box and IoU
    stacked = torch.nan_to_num(torch.stack([loss_cls, zero, zero, loss_pts, loss_dir], 1))
    return [tuple(row.unbind(0)) for row in stacked.unbind(0)]


def nan_to_num_all(losses: List[Tuple[Tensor, ...]]) -> List[Tuple[Tensor, ...]]:
    """``torch.nan_to_num`` of every loss, as upstream applies it to each, in one call over
    the stacked scalars (a few operations a step instead of some six a loss, backward
    included). The same values and gradients; losses of mixed dtypes or shapes are converted
    one by one."""
    flat = [loss for layer in losses for loss in layer]
    if not flat or any(loss.shape != flat[0].shape or loss.dtype != flat[0].dtype
                       for loss in flat):
        return [tuple(torch.nan_to_num(loss) for loss in layer) for layer in losses]
    clean = torch.nan_to_num(torch.stack(flat)).unbind(0)
    out, start = [], 0
    for layer in losses:
        out.append(tuple(clean[start:start + len(layer)]))
        start += len(layer)
    return out


def _weighted_or_zero(loss: nn.Module, pred: Tensor, target: Tensor, weight: Tensor,
                      avg_factor: Tensor,
                      transform: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """A weight-0 term as the zero it is (keeping the graph to ``pred``; ``transform`` is not
    even run: MapTR's IoU term, weight 0 in upstream's configs, would denormalise every
    layer's boxes for nothing); else the loss of ``transform(pred)`` (mmdet's box losses then
    read the weights on the host once)."""
    if getattr(loss, 'loss_weight', 1.0) == 0:
        return pred.sum() * 0
    return loss(pred if transform is None else transform(pred), target, weight,
                avg_factor=avg_factor)
