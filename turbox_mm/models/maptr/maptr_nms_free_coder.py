"""``MapTRNMSFreeCoder``: the last decoder layer's vectors to metric map elements, without
NMS (upstream ``core/bbox/coders/nms_free_coder.py`` @ 66a3d32)."""
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from turbox_mm.registry import TASK_UTILS
from .geometry import denormalize_2d_bbox, denormalize_2d_pts


@TASK_UTILS.register_module()
class MapTRNMSFreeCoder:
    """Top-``max_num`` (vector, class) pairs by sigmoid score, denormalised, centre-filtered.

    The scores of all ``V x K`` pairs compete (a vector can come out under several labels):
    label = index % K, vector = index // K. Boxes and points go back to metres; a vector is
    kept if its ``(x1, y1, x2, y2)`` box lies within ``post_center_range`` (and, with
    ``score_threshold``, scores above it, lowered by 10% steps while nothing passes, down to
    0.01, as upstream). No NMS.

    Args:
        pc_range (list[float]): The patch ``[x_min, y_min, z_min, x_max, y_max, z_max]``.
        post_center_range (list[float]): ``[x1, y1, x2, y2]`` lower then upper bounds of the
            box (upstream: ``[-20, -35, -20, -35, 20, 35, 20, 35]``).
        max_num (int): Kept pairs per sample (at most ``V x K``; upstream fails beyond).
            Defaults to 100 (configs: 50).
        score_threshold (float, optional): Defaults to None (upstream's configs).
        num_classes (int): K. Defaults to 10 (configs: 3).
        voxel_size, z_cfg: Upstream's arguments, unused (2D points only).

    Examples:
        >>> coder = MapTRNMSFreeCoder([-15, -30, -2, 15, 30, 2], [-20, -35, -20, -35, 20, 35,
        ...                           20, 35], max_num=2, num_classes=3)
        >>> cls = torch.tensor([[[0., 3., -1.], [2., -5., -5.]]])
        >>> pts = torch.full((1, 2, 4, 2), 0.5)
        >>> boxes = torch.full((1, 1, 2, 4), 0.5)
        >>> out = coder.decode(dict(all_cls_scores=cls[None], all_bbox_preds=boxes,
        ...                         all_pts_preds=pts[None]))[0]
        >>> out['labels'].tolist(), out['pts'].shape
        ([1, 0], torch.Size([2, 4, 2]))
    """

    def __init__(self, pc_range: Sequence[float], post_center_range: Optional[Sequence] = None,
                 max_num: int = 100, score_threshold: Optional[float] = None,
                 num_classes: int = 10, voxel_size=None, z_cfg: Optional[dict] = None) -> None:
        if post_center_range is None:
            raise ValueError('MapTRNMSFreeCoder needs post_center_range (upstream decodes '
                             'only with it)')
        self.pc_range = list(pc_range)
        self.post_center_range = list(post_center_range)
        self.max_num = max_num
        self.score_threshold = score_threshold
        self.num_classes = num_classes

    def decode_single(self, cls_scores: Tensor, bbox_preds: Tensor,
                      pts_preds: Tensor) -> Dict[str, Tensor]:
        """One sample: ``cls_scores`` ``[V, K]`` logits, ``bbox_preds`` ``[V, 4]`` normalised
        ``(cx, cy, w, h)``, ``pts_preds`` ``[V, P, 2]`` normalised -> ``bboxes`` ``[k, 4]``
        metric ``xyxy``, ``scores`` ``[k]``, ``labels`` ``[k]``, ``pts`` ``[k, P, 2]``
        metric."""
        scores = cls_scores.sigmoid().view(-1)
        scores, index = scores.topk(min(self.max_num, scores.numel()))
        labels = index % self.num_classes
        vector = torch.div(index, self.num_classes, rounding_mode='floor')
        boxes = denormalize_2d_bbox(bbox_preds[vector], self.pc_range)
        pts = denormalize_2d_pts(pts_preds[vector], self.pc_range)
        bounds = boxes.new_tensor(self.post_center_range)
        keep = (boxes[..., :4] >= bounds[:4]).all(1) & (boxes[..., :4] <= bounds[4:]).all(1)
        if self.score_threshold:
            keep &= self._threshold_mask(scores)
        return dict(bboxes=boxes[keep], scores=scores[keep], labels=labels[keep],
                    pts=pts[keep])

    def _threshold_mask(self, scores: Tensor) -> Tensor:
        threshold = self.score_threshold
        mask = scores > threshold
        while mask.sum() == 0:
            threshold *= 0.9
            if threshold < 0.01:
                return scores > -1
            mask = scores >= threshold
        return mask

    def decode(self, preds_dicts: Dict[str, Tensor]) -> List[Dict[str, Tensor]]:
        """The last layer of ``all_cls_scores`` ``[L, B, V, K]``, ``all_bbox_preds``
        ``[L, B, V, 4]`` and ``all_pts_preds`` ``[L, B, V, P, 2]``, per sample."""
        cls = preds_dicts['all_cls_scores'][-1]
        boxes = preds_dicts['all_bbox_preds'][-1]
        pts = preds_dicts['all_pts_preds'][-1]
        return [self.decode_single(cls[i], boxes[i], pts[i]) for i in range(cls.shape[0])]
