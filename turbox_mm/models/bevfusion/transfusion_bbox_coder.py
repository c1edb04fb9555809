"""``TransFusionBBoxCoder``: boxes <-> the TransFusion head's regression targets."""
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from turbox_mm.registry import TASK_UTILS


@TASK_UTILS.register_module()
class TransFusionBBoxCoder:
    """The regression code of BEVFusion's TransFusion head (``code_size`` 10):
    ``[cx, cy, z_gravity, log l, log w, log h, sin yaw, cos yaw, vx, vy]`` with the centre in
    BEV feature cells (``(x - pc_min) / (out_size_factor * voxel_size)``).

    Args:
        pc_range (Sequence[float]): ``(x_min, y_min)`` of the point cloud range.
        out_size_factor (int): Voxels per BEV feature cell.
        voxel_size (Sequence[float]): ``(vx, vy)``.
        post_center_range (Sequence[float], optional): ``[x, y, z min, x, y, z max]`` a decoded
            centre must lie in (``filter=True``).
        score_threshold (float, optional): Applied with ``filter=True`` when it is not 0 or
            None (upstream's truthiness test: 0.0 means off).
        code_size (int): 8 (no velocity) or 10. Defaults to 8.
    """

    def __init__(self, pc_range: Sequence[float], out_size_factor: int,
                 voxel_size: Sequence[float], post_center_range: Optional[Sequence[float]] = None,
                 score_threshold: Optional[float] = None, code_size: int = 8) -> None:
        if code_size not in (8, 10):
            raise ValueError(f'TransFusionBBoxCoder: code_size must be 8 or 10, got {code_size}')
        self.pc_range = [float(v) for v in pc_range]
        self.out_size_factor = out_size_factor
        self.voxel_size = [float(v) for v in voxel_size]
        self.post_center_range = None if post_center_range is None else \
            [float(v) for v in post_center_range]
        self.score_threshold = score_threshold
        self.code_size = code_size

    def encode(self, boxes: Tensor) -> Tensor:
        """``[M, 7 or 9]`` LiDAR boxes (bottom centre, l, w, h, yaw, v) -> ``[M, code_size]``."""
        cell_x = self.out_size_factor * self.voxel_size[0]
        cell_y = self.out_size_factor * self.voxel_size[1]
        parts = [(boxes[:, 0] - self.pc_range[0]) / cell_x,
                 (boxes[:, 1] - self.pc_range[1]) / cell_y,
                 boxes[:, 2] + boxes[:, 5] * 0.5,  # bottom centre -> gravity centre
                 boxes[:, 3].log(), boxes[:, 4].log(), boxes[:, 5].log(),
                 torch.sin(boxes[:, 6]), torch.cos(boxes[:, 6])]
        if self.code_size == 10:
            parts += [boxes[:, 7], boxes[:, 8]]
        return torch.stack(parts, 1).float()

    def decode_boxes(self, rot: Tensor, dim: Tensor, center: Tensor, height: Tensor,
                     vel: Optional[Tensor]) -> Tensor:
        """Head outputs ``[B, *, P]`` -> ``[B, P, 7 or 9]`` boxes (bottom centre, metres)."""
        x = center[:, 0:1] * self.out_size_factor * self.voxel_size[0] + self.pc_range[0]
        y = center[:, 1:2] * self.out_size_factor * self.voxel_size[1] + self.pc_range[1]
        size = dim.exp()
        z = height - size[:, 2:3] * 0.5  # gravity centre -> bottom centre
        yaw = torch.atan2(rot[:, 0:1], rot[:, 1:2])
        parts = [x, y, z, size, yaw] + ([] if vel is None else [vel])
        return torch.cat(parts, 1).permute(0, 2, 1)

    def decode(self, heatmap: Tensor, rot: Tensor, dim: Tensor, center: Tensor, height: Tensor,
               vel: Optional[Tensor], filter: bool = False) -> List[Dict[str, Tensor]]:
        """Per sample ``bboxes``, ``scores`` (the best class score) and ``labels``.

        Args:
            heatmap (Tensor): ``[B, K, P]`` class scores.
            rot, dim, center, height, vel (Tensor): The head's outputs, ``[B, *, P]``.
            filter (bool): Keep only centres within ``post_center_range`` (and above the
                score threshold, see the class). Defaults to False.
        """
        scores, labels = heatmap.max(1)
        boxes = self.decode_boxes(rot, dim, center, height, vel)
        if not filter:
            return [dict(bboxes=boxes[i], scores=scores[i], labels=labels[i])
                    for i in range(heatmap.shape[0])]
        if self.post_center_range is None:
            raise ValueError('TransFusionBBoxCoder: decode(filter=True) needs '
                             'post_center_range')
        limits = boxes.new_tensor(self.post_center_range)
        keep = (boxes[..., :3] >= limits[:3]).all(2) & (boxes[..., :3] <= limits[3:]).all(2)
        if self.score_threshold:
            keep &= scores > self.score_threshold
        return [dict(bboxes=boxes[i, keep[i]], scores=scores[i, keep[i]],
                     labels=labels[i, keep[i]]) for i in range(heatmap.shape[0])]
