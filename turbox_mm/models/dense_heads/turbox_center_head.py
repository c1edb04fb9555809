"""``TurboxCenterHead``: mmdet3d's ``CenterHead`` with its training targets built per batch."""
from typing import List, Tuple

import torch
from mmdet3d.models.dense_heads import CenterHead
from mmengine.structures import InstanceData
from torch import Tensor

from turbox_mm.ops.dispatch import check_op_impl
from turbox_mm.registry import MODELS
from .center_targets import draw_gaussians, gaussian_radius, task_order


@MODELS.register_module()
class TurboxCenterHead(CenterHead):
    """mmdet3d's ``CenterHead``; with ``op_impl='turbox'`` its targets are built for the whole
    batch in a few GPU operations (:mod:`.center_targets`) instead of a Python loop over boxes.

    The targets are the stock ones, element for element (``tests/test_center_head.py``):
    heatmaps, regression targets, indices and masks, with mmdet3d's conventions kept (centre
    cells truncated towards zero, boxes of zero size skipped, at most ``max_objs`` boxes a
    task and sample). Everything else is ``CenterHead``'s.

    Args:
        op_impl (str): ``'turbox'`` or ``'stock'`` (mmdet3d's loop). Defaults to 'stock'.
        **kwargs: ``CenterHead``'s arguments.
    """

    def __init__(self, *args, op_impl: str = 'stock', **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.op_impl = check_op_impl('TurboxCenterHead', op_impl)

    def get_targets(self, batch_gt_instances_3d: List[InstanceData]) -> Tuple[List[Tensor], ...]:
        """``CenterHead.get_targets``: per task, ``[B, C_t, H, W]`` heatmaps, ``[B, max_objs,
        10]`` box targets, ``[B, max_objs]`` indices and ``[B, max_objs]`` uint8 masks."""
        if (self.op_impl != 'turbox' or not batch_gt_instances_3d
                or batch_gt_instances_3d[0].bboxes_3d.tensor.shape[1] != 9):
            # Boxes without velocity (7 values) fail in CenterHead's loop at the first box it
            # draws; the stock code keeps that behaviour and its error.
            return super().get_targets(batch_gt_instances_3d)
        return self._batched_targets(batch_gt_instances_3d)

    def _batched_targets(self, instances: List[InstanceData]) -> Tuple[List[Tensor], ...]:
        cfg = self.train_cfg
        device = instances[0].labels_3d.device
        num_samples = len(instances)
        boxes = torch.cat([torch.cat((gt.bboxes_3d.gravity_center, gt.bboxes_3d.tensor[:, 3:]),
                                     dim=1).to(device) for gt in instances])
        labels = torch.cat([gt.labels_3d for gt in instances]).long()
        sample = torch.cat([torch.full((len(gt.labels_3d), ), i, dtype=torch.int64,
                                       device=device) for i, gt in enumerate(instances)])
        max_objs = cfg['max_objs'] * cfg['dense_reg']
        factor = cfg['out_size_factor']
        grid = torch.tensor(cfg['grid_size'])
        width_cells, height_cells = (grid[:2] // factor).tolist()  # feature map W (x), H (y)
        # On the host, as CenterHead keeps them: CUDA divides by a host scalar as a
        # multiplication by its reciprocal, by a device tensor exactly; the targets must
        # round as the stock ones do.
        pc_range = torch.tensor(cfg['point_cloud_range'], dtype=torch.float32)
        voxel = torch.tensor(cfg['voxel_size'], dtype=torch.float32)

        # Everything CenterHead computes per box, for all boxes (the same float32 operations).
        length = boxes[:, 3] / voxel[0] / factor
        width = boxes[:, 4] / voxel[1] / factor
        sized = (width > 0) & (length > 0)
        radius = gaussian_radius(width, length, min_overlap=cfg['gaussian_overlap'])
        radius = torch.clamp(torch.where(sized, radius, 0).to(torch.int64), min=cfg['min_radius'])
        center = torch.stack([(boxes[:, 0] - pc_range[0]) / voxel[0] / factor,
                              (boxes[:, 1] - pc_range[1]) / voxel[1] / factor], dim=1)
        center_int = center.to(torch.int32)  # truncation towards zero, as CenterHead
        inside = ((center_int[:, 0] >= 0) & (center_int[:, 0] < width_cells) &
                  (center_int[:, 1] >= 0) & (center_int[:, 1] < height_cells))
        box_dim = boxes[:, 3:6].log() if self.norm_bbox else boxes[:, 3:6]
        rot = boxes[:, 6]
        target = torch.cat([center - center_int, boxes[:, 2:3], box_dim, torch.sin(rot)[:, None],
                            torch.cos(rot)[:, None], boxes[:, 7:9]], dim=1)
        cell = center_int[:, 1].long() * width_cells + center_int[:, 0].long()

        heatmaps, anno_boxes, inds, masks = [], [], [], []
        spans, drawn_any = [], torch.zeros_like(sized)
        first = 0
        for names in self.class_names:
            count = len(names)
            in_task, position = task_order(labels, sample, first, count, num_samples)
            spans.append((first, count))
            first += count
            drawn = in_task & (position < max_objs) & sized & inside
            drawn_any |= drawn  # a box belongs to one task
            slot = torch.where(drawn, sample * max_objs + position, num_samples * max_objs)
            anno = boxes.new_zeros(num_samples * max_objs + 1, 10, dtype=torch.float32)
            anno[slot] = target.float()
            ind = labels.new_zeros(num_samples * max_objs + 1, dtype=torch.int64)
            ind[slot] = cell
            mask = boxes.new_zeros(num_samples * max_objs + 1, dtype=torch.uint8)
            mask.index_fill_(0, slot, 1)  # a scalar argument; `[...] = 1` uploads it
            anno_boxes.append(anno[:-1].view(num_samples, max_objs, 10))
            inds.append(ind[:-1].view(num_samples, max_objs))
            masks.append(mask[:-1].view(num_samples, max_objs))
        # every task's Gaussians in one call (each box once), over all classes' channels
        heatmap = boxes.new_zeros(num_samples, first, height_cells, width_cells)
        draw_gaussians(heatmap, sample, labels, center_int.long(), radius, drawn_any)
        heatmaps = [heatmap[:, start:start + count].contiguous() for start, count in spans]
        return heatmaps, anno_boxes, inds, masks
