"""SparseDrive's map decoding: top-k (polyline, class) pairs, no NMS."""
from typing import Dict, List, Optional

import torch
from torch import Tensor

from turbox_mm.registry import TASK_UTILS


@TASK_UTILS.register_module()
class SparsePoint3DDecoder:
    """Turn the last decoder layer's map outputs into at most ``num_output`` polylines a sample.

    Sigmoid scores of all (anchor, class) pairs, flattened anchor-major to ``[B, M * C]``; the
    ``num_output`` best pairs, best first; ``label = index % C`` and the polyline is anchor
    ``index // C``'s, so one anchor can be reported under several classes (upstream's
    ``SparsePoint3DDecoder``, docs/design/sparsedrive.md, section 4). Points stay in metres.
    With ``score_threshold``, pairs scoring below it are dropped after the top-k.

    Upstream keeps ``M`` pairs (the number of anchors, 100 in its configs); here ``num_output``
    (default 100, the same for that config), or ``M`` where it is None. Upstream returns numpy
    arrays (``vectors`` a list of ``[P, 2]`` arrays); here CPU tensors, as
    :class:`~turbox_mm.models.sparse4d.decoder.SparseBox3DDecoder` returns, so that
    :meth:`to_instance_data` and the map metrics take them as they are (they accept tensors
    and arrays alike) and a batch needs one device-to-host copy per output, not one per sample.

    Args:
        num_output (int, optional): Pairs kept per sample (at most ``M * C``). None keeps
            ``M``, upstream's rule. Defaults to 100.
        score_threshold (float, optional): Drop pairs scoring below it. Defaults to None (keep
            all, as upstream's configs).
        coords_dim (int): Coordinates per point. Defaults to 2.

    Examples:
        >>> dec = SparsePoint3DDecoder(num_output=4)
        >>> out = dec.decode(torch.zeros(1, 5, 3), torch.zeros(1, 5, 40))
        >>> out[0]['vectors'].shape, out[0]['scores'].shape, out[0]['labels'].shape
        (torch.Size([4, 20, 2]), torch.Size([4]), torch.Size([4]))
    """

    def __init__(self,
                 num_output: Optional[int] = 100,
                 score_threshold: Optional[float] = None,
                 coords_dim: int = 2) -> None:
        if num_output is not None and num_output < 0:
            raise ValueError(f'SparsePoint3DDecoder: num_output must be >= 0 or None, got '
                             f'{num_output}')
        self.num_output = num_output
        self.score_threshold = score_threshold
        self.coords_dim = coords_dim

    def decode(self,
               cls_scores: Tensor,
               pts_preds: Tensor,
               quality: Optional[Tensor] = None,
               instance_id: Optional[Tensor] = None) -> List[Dict[str, Tensor]]:
        """Decode a batch.

        Args:
            cls_scores (Tensor): ``[B, M, C]`` logits of the last layer.
            pts_preds (Tensor): ``[B, M, P * coords_dim]`` points of the last layer, metres.
            quality (Tensor, optional): Unused (the map head has no quality branch); accepted
                for the box decoder's signature.
            instance_id (Tensor, optional): Unused (no map tracking), as ``quality``.

        Returns:
            list[dict]: Per sample, on the CPU and detached: ``vectors`` ``[K, P, coords_dim]``
            float32 metres, ``scores`` ``[K]`` float32 sigmoid scores in descending order,
            ``labels`` ``[K]`` int64 classes, ``indices`` ``[K]`` int64 anchors the polylines
            come from. ``K = min(num_output, M * C)`` less those under ``score_threshold``.

        Raises:
            ValueError: The two inputs' shapes do not fit.
        """
        if (cls_scores.dim() != 3 or pts_preds.dim() != 3
                or pts_preds.shape[:2] != cls_scores.shape[:2]
                or pts_preds.shape[-1] % self.coords_dim != 0):
            raise ValueError(f'SparsePoint3DDecoder: cls_scores [B, M, C] and pts_preds '
                             f'[B, M, P * {self.coords_dim}] must agree, got '
                             f'{tuple(cls_scores.shape)} and {tuple(pts_preds.shape)}')
        bs, num_pred, num_cls = cls_scores.shape
        k = num_pred if self.num_output is None else self.num_output
        k = min(k, num_pred * num_cls)
        with torch.no_grad():
            scores, index = cls_scores.detach().sigmoid().flatten(1).topk(k, dim=1)
            labels = index % num_cls
            anchor = torch.div(index, num_cls, rounding_mode='floor')
            pts = pts_preds.detach().reshape(bs, num_pred, -1, self.coords_dim)
            vectors = pts.gather(1, anchor[..., None, None].expand(-1, -1, *pts.shape[2:]))
            # One device-to-host copy per output for the whole batch.
            scores, labels = scores.float().cpu(), labels.cpu()
            anchor, vectors = anchor.cpu(), vectors.float().cpu()
        results = []
        for b in range(bs):
            result = dict(vectors=vectors[b], scores=scores[b], labels=labels[b],
                          indices=anchor[b])
            if self.score_threshold is not None:
                keep = result['scores'] >= self.score_threshold
                result = {key: value[keep] for key, value in result.items()}
            results.append(result)
        return results

    @staticmethod
    def to_instance_data(result: Dict[str, Tensor]):
        """One sample's result as an mmengine ``InstanceData``.

        Fields: ``pts`` ``[K, P, 2]`` (the ``vectors``, metres, lidar frame), ``scores``
        ``[K]``, ``labels`` ``[K]`` (SparseDrive's class order: ped_crossing 0, divider 1,
        boundary 2), what ``SparseDriveMapMetric`` (``turbox_mm/evaluation/
        sparsedrive_map_metric.py``) reads from a data sample's ``pred_map_instances``.
        SparseDrive's ``pred_instances_3d`` holds the detected boxes, so the map goes into a
        field of its own; MapTR's names there (``pts_3d``, ``scores_3d``, ``labels_3d``) are
        not used.

        Args:
            result (dict): One entry of :meth:`decode`'s list.

        Returns:
            InstanceData: The fields above.
        """
        from mmengine.structures import InstanceData
        instances = InstanceData()
        instances.pts = result['vectors']
        instances.scores = result['scores']
        instances.labels = result['labels']
        return instances
