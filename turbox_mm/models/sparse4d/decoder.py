"""Sparse4D's inference decoding: top-k boxes, no NMS, scores weighted by centerness."""
from typing import Dict, List, Optional

from torch import Tensor

from turbox_mm.registry import TASK_UTILS
from .box3d import decode_boxes, to_lidar_boxes

#: Index of the centerness output in the quality head.
CENTERNESS = 0


@TASK_UTILS.register_module()
class SparseBox3DDecoder:
    """Turn the last decoder layer's outputs into at most ``num_output`` boxes per sample.

    For each anchor, the best class and its sigmoid score; the ``num_output`` best anchors;
    with quality estimation, each score multiplied by the sigmoid of the anchor's centerness
    and the boxes re-sorted by that product; boxes decoded from the 11-number state.

    Args:
        num_output (int): Boxes kept per sample. Defaults to 300.
        score_threshold (float, optional): Drop boxes scoring below it (before the centerness
            product, as upstream). Defaults to None (keep all).

    Examples:
        >>> import torch
        >>> dec = SparseBox3DDecoder(num_output=2)
        >>> out = dec.decode(torch.zeros(1, 4, 3), torch.zeros(1, 4, 11))
        >>> out[0]['boxes_3d'].shape, out[0]['labels_3d'].shape
        (torch.Size([2, 10]), torch.Size([2]))
    """

    def __init__(self, num_output: int = 300, score_threshold: Optional[float] = None) -> None:
        self.num_output = num_output
        self.score_threshold = score_threshold

    def decode(self,
               cls_scores: Tensor,
               box_preds: Tensor,
               quality: Optional[Tensor] = None,
               instance_id: Optional[Tensor] = None) -> List[Dict[str, Tensor]]:
        """Decode a batch.

        Args:
            cls_scores (Tensor): ``[B, Q, num_classes]`` logits.
            box_preds (Tensor): ``[B, Q, 11]`` box states.
            quality (Tensor, optional): ``[B, Q, 2]`` logits (centerness, yawness).
            instance_id (Tensor, optional): ``[B, Q]`` tracking ids of the queries
                (:meth:`InstanceBank.get_instance_id`).

        Returns:
            list[dict]: Per sample ``boxes_3d`` ``[K, 10]``, ``scores_3d`` (centerness-weighted
            where quality is given), ``labels_3d``, ``cls_scores`` (the class scores alone),
            ``indices`` (the anchors kept), with ``instance_id`` also ``instance_ids``, all on
            the CPU.
        """
        if cls_scores.dim() != 3 or box_preds.shape[:2] != cls_scores.shape[:2]:
            raise ValueError(f'SparseBox3DDecoder: cls_scores [B, Q, C] and box_preds [B, Q, 11] '
                             f'must agree, got {tuple(cls_scores.shape)} and '
                             f'{tuple(box_preds.shape)}')
        if instance_id is not None and instance_id.shape != cls_scores.shape[:2]:
            raise ValueError(f'SparseBox3DDecoder: instance_id must be [B, Q] = '
                             f'{tuple(cls_scores.shape[:2])}, got {tuple(instance_id.shape)}')
        scores, labels = cls_scores.sigmoid().max(dim=-1)
        k = min(self.num_output, scores.shape[1])
        top, indices = scores.topk(k, dim=1)
        results = []
        for b in range(scores.shape[0]):
            idx, cls_top = indices[b], top[b]
            final = cls_top
            if quality is not None:
                final = cls_top * quality[b, idx, CENTERNESS].sigmoid()
                final, order = final.sort(descending=True)
                idx, cls_top = idx[order], cls_top[order]
            if self.score_threshold is not None:
                keep = cls_top >= self.score_threshold
                idx, cls_top, final = idx[keep], cls_top[keep], final[keep]
            results.append(dict(
                boxes_3d=decode_boxes(box_preds[b, idx].float()).cpu(),
                scores_3d=final.cpu(),
                labels_3d=labels[b, idx].cpu(),
                cls_scores=cls_top.cpu(),
                indices=idx.cpu()))
            if instance_id is not None:
                results[-1]['instance_ids'] = instance_id[b, idx].cpu()
        return results

    @staticmethod
    def to_instance_data(result: Dict[str, Tensor]):
        """One sample's result as mmdet3d's ``InstanceData`` (``bboxes_3d`` as LiDAR boxes), what
        ``Det3DDataSample.pred_instances_3d`` and mmdet3d's nuScenes metric expect; with
        ``cls_scores`` and ``instance_ids`` where the result has them (what
        :class:`~turbox_mm.evaluation.NuScenesTrackingMetric` reads)."""
        from mmengine.structures import InstanceData
        instances = InstanceData()
        instances.bboxes_3d = to_lidar_boxes(result['boxes_3d'])
        instances.scores_3d = result['scores_3d']
        instances.labels_3d = result['labels_3d']
        for key in ('cls_scores', 'instance_ids'):
            if key in result:
                instances[key] = result[key]
        return instances
