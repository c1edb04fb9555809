"""The TransFusion head's training targets for a whole batch, without a host synchronisation
(with the head's ``matcher='host'``: one).

Upstream builds targets sample by sample: a deep copy of the predictions, one cost matrix per
sample and decoder layer copied to the host for scipy, boolean-mask indexing, a Python loop
over ground-truth boxes with scalar reads for the heatmap, and ``.item()`` reads for the
positive count and the mean IoU. :func:`batched_targets` gives the same tensors (the head's
``get_targets`` tuple) from batched GPU operations:

- the proposals of every sample and layer are decoded at once;
- the assigner's costs are computed between all proposals and all ground-truth boxes of the
  batch (every pair's cost is an elementwise function of that pair, so each sample's block
  equals the per-sample matrix) and gathered into ``[layers x samples, P, G_max]``;
- every matrix is solved at once: on the GPU by ``turbox_mm::lsap``
  (:func:`turbox_mm.models.sparse4d.matching.solve_on_device`, scipy's assignment, ties
  included) where its kernel runs and the head's ``matcher`` is ``'device'``, otherwise with
  scipy after one transfer (:func:`~turbox_mm.models.sparse4d.matching.solve_batched`);
- the heatmap Gaussians are drawn for all boxes with ``amax`` reductions, without a bound on
  their radii read on the host
  (:func:`turbox_mm.models.dense_heads.center_targets.draw_gaussians`);
- the positive count is known on the host from the assignment's size; the mean IoU stays a
  tensor.

One difference from upstream, for boxes upstream cannot handle either: a box whose centre cell
lies outside the BEV map draws no Gaussian (upstream slices with negative bounds there; the
pipeline's range filter removes such boxes before they reach the head).
"""
from typing import Dict, List, Tuple

import numpy as np
import torch
from mmengine.structures import InstanceData
from torch import Tensor

from turbox_mm.models.dense_heads.center_targets import draw_gaussians, gaussian_radius
from turbox_mm.models.sparse4d.matching import matches_on_device, solve_batched, solve_on_device
from turbox_mm.utils.upload import upload

#: The head outputs that decode to boxes, in the bbox coder's argument order.
DECODE_KEYS = ('rot', 'dim', 'center', 'height', 'vel')


def _gt_batch(instances: List[InstanceData], device: torch.device):
    """All ground-truth boxes ``[sum G, 9]`` (bottom centre), labels, sample of each, the
    per-sample counts (host ints) and offsets (a host array)."""
    counts = [len(gt.labels_3d) for gt in instances]
    boxes = torch.cat([gt.bboxes_3d.tensor for gt in instances]).to(device)
    labels = torch.cat([gt.labels_3d for gt in instances]).to(device).long()
    offsets = np.cumsum([0] + counts[:-1]).astype(np.int64)
    sample = np.repeat(np.arange(len(instances), dtype=np.int64), counts)
    return boxes, labels, upload(sample, device), counts, offsets


def _heatmap_geometry(head, boxes: Tensor) -> Tuple[Tensor, ...]:
    """Per box: the Gaussian radius, the ``(x, y)`` cell and whether it is drawn; the map
    shape. The same float32 operations as the head's stock loop (module docstring)."""
    cfg = head.train_cfg
    grid = torch.tensor(cfg['grid_size'])
    pc_range = torch.tensor(cfg['point_cloud_range'])
    voxel = torch.tensor(cfg['voxel_size'])
    factor = cfg['out_size_factor']
    fmap = (grid[:2] // factor).tolist()
    width = boxes[:, 3] / voxel[0] / factor
    length = boxes[:, 4] / voxel[1] / factor
    sized = (width > 0) & (length > 0)
    radius = gaussian_radius(length, width, min_overlap=cfg['gaussian_overlap'])
    radius = torch.where(sized, radius, 0).to(torch.int64).clamp(min=cfg['min_radius'])
    x = (boxes[:, 0] - pc_range[0]) / voxel[0] / factor
    y = (boxes[:, 1] - pc_range[1]) / voxel[1] / factor
    cell = torch.stack([x, y], 1).to(torch.float32).to(torch.int32).long()
    # the stock map is [K, fmap[1], fmap[0]] indexed [x cell, y cell]
    inside = ((cell[:, 0] >= 0) & (cell[:, 0] < fmap[1]) & (cell[:, 1] >= 0) &
              (cell[:, 1] < fmap[0]))
    return radius, cell, sized & inside, fmap


def batched_targets(head, batch_gt_instances_3d: List[InstanceData], preds: Dict[str, Tensor]):
    """The head's ``get_targets`` tuple for the whole batch (module docstring).

    Args:
        head (TransFusionHead): The head (its assigner, coder, configs).
        batch_gt_instances_3d (list[InstanceData]): ``bboxes_3d`` (9 values a box) and
            ``labels_3d`` per sample.
        preds (dict): The head's forward outputs.

    Returns:
        tuple: labels, label weights ``[B, L * P]``, box targets and weights
        ``[B, L * P, code]``, IoUs ``[B, L * P]``, the positive count (a host int), the mean
        matched IoU (a 0-dim tensor) and the dense heatmap targets ``[B, K, X, Y]``.
    """
    cfg = head.train_cfg
    score = preds['heatmap'].detach()
    batch, num_classes, total = score.shape
    layers, proposals = head._layers(), head.num_proposals
    device = score.device
    decoded = head.bbox_coder.decode_boxes(*(preds[k].detach() if k in preds else None
                                             for k in DECODE_KEYS))  # [B, L*P, 9]
    gt_boxes, gt_labels, gt_sample, counts, offsets = _gt_batch(batch_gt_instances_3d, device)
    num_gt = gt_boxes.shape[0]

    radius, cell, drawn, fmap = _heatmap_geometry(head, gt_boxes)
    heatmap = score.new_zeros(batch, head.num_classes, fmap[1], fmap[0], dtype=torch.float32)

    code = head.bbox_coder.code_size
    labels = torch.full((batch * total, ), head.num_classes, dtype=torch.long, device=device)
    label_weights = torch.ones(batch * total, dtype=torch.long, device=device)
    bbox_targets = torch.zeros(batch * total, code, device=device)
    bbox_weights = torch.zeros(batch * total, code, device=device)
    ious = torch.zeros(batch * total, dtype=decoded.dtype, device=device)
    matched_ious = score.new_zeros((), dtype=torch.float32)
    num_pos = 0
    if num_gt:
        flat_boxes = decoded.reshape(batch * total, -1)
        logits = score.permute(1, 0, 2).reshape(num_classes, batch * total)
        cost, iou = head.bbox_assigner.cost(flat_boxes, gt_boxes, gt_labels, logits, cfg,
                                            sync_free=True)
        # each sample's columns, padded to the largest count (padding is never solved); a
        # sample without boxes points at column 0 or its offset, kept inside the matrix (a
        # last sample's offset is the box count)
        g_max = max(counts)
        last = np.maximum(np.asarray(counts) - 1, 0)
        col = upload(np.minimum(offsets[:, None] + np.minimum(np.arange(g_max)[None],
                                                              last[:, None]), num_gt - 1),
                     device)
        blocks = cost.view(batch, layers, proposals, num_gt).gather(
            3, col[:, None, None, :].expand(-1, layers, proposals, -1))
        blocks = blocks.permute(1, 0, 2, 3).reshape(layers * batch, proposals, g_max)
        if matches_on_device(blocks, head.matcher):
            pairs = solve_on_device(blocks, counts)
        else:
            pairs, _ = solve_batched(blocks, counts)  # the one host synchronisation
        matrix, row, column = pairs
        sample, layer = matrix % batch, matrix // batch
        proposal = sample * total + layer * proposals + row
        gt_index = column + upload(offsets, device)[sample]
        num_pos = int(pairs.shape[1])
        labels[proposal] = gt_labels[gt_index]
        if cfg['pos_weight'] > 0:  # index_fill_: a scalar, where `[...] = x` copies it over
            label_weights.index_fill_(0, proposal, cfg['pos_weight'])
        bbox_targets[proposal] = head.bbox_coder.encode(gt_boxes[gt_index])
        bbox_weights.index_fill_(0, proposal, 1.0)
        ious[proposal] = iou[proposal, gt_index].to(ious.dtype)
        ious = ious.clamp(0.0, 1.0)
        per_sample = torch.zeros(batch, dtype=torch.float32, device=device)
        per_sample.index_add_(0, sample, ious[proposal].float())
        found = torch.zeros(batch, dtype=torch.float32, device=device).index_add_(
            0, sample, torch.ones_like(sample, dtype=torch.float32))  # bincount waits
        matched_ious = (per_sample / found.clamp(min=1)).mean()
        draw_gaussians(heatmap, gt_sample, gt_labels, cell.flip(1), radius, drawn)
    return (labels.view(batch, total), label_weights.view(batch, total),
            bbox_targets.view(batch, total, code), bbox_weights.view(batch, total, code),
            ious.view(batch, total), num_pos, matched_ious, heatmap)
