"""SparseDrive's motion decoding: the detection head's boxes with each box's predicted futures
(docs/design/sparsedrive.md section 6.5; upstream ``P/models/motion/decoder.py`` @ ffebeb4).

The boxes are chosen exactly as :class:`~turbox_mm.models.sparse4d.SparseBox3DDecoder` chooses
them (best class per query, top ``num_output``, scores weighted by the centerness and
re-sorted, optional threshold on the class score); every kept box also carries, from the
motion head's last layer, its ``K`` trajectories as positions in the lidar frame (per-step
offsets summed up and moved to the box centre), the sigmoid of the mode logits, its decoded
anchor history from the instance queue and its period.

Upstream selects per sample and copies every field of every sample to the host on its own;
here the selection runs batched on the device and each field crosses to the host once for the
batch (the threshold, when set, is applied on the host copy).

Differences from upstream, on purpose:

- Upstream's motion decoder returns only the motion fields (``trajs_3d``, ``trajs_score``,
  ``anchor_queue``, ``period``) and relies on the detection decoder having chosen the same
  boxes in the same order; this one also returns the detection fields (equal to
  :meth:`SparseBox3DDecoder.decode`'s for the same inputs), so a merge of the two dicts is
  consistent by construction.
- The selection is our detection decoder's: the best class per query (upstream's path when
  tracking ids are given, as in SparseDrive's inference; without ids upstream ranks the
  flattened query x class scores) and ``cls_scores`` in the boxes' order (design section 3).
"""
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from turbox_mm.models.sparse4d.box3d import STATE_DIM, X, Y, decode_boxes
from turbox_mm.models.sparse4d.decoder import CENTERNESS, SparseBox3DDecoder
from turbox_mm.registry import TASK_UTILS

__all__ = ['SparseBox3DMotionDecoder', 'last_layer', 'stack_queue']

LayerOutputs = Union[Tensor, Sequence[Optional[Tensor]]]


def last_layer(value: Optional[LayerOutputs], output_idx: int = -1) -> Optional[Tensor]:
    """A head output's layer ``output_idx`` when given per layer (upstream passes lists),
    else the tensor itself; None stays None."""
    if value is None or isinstance(value, Tensor):
        return value
    return value[output_idx]


def stack_queue(queue: Union[Tensor, Sequence[Tensor]], name: str) -> Tensor:
    """The instance queue's anchors, a list (oldest first) of ``[B, Q, 11]``, as one
    ``[B, Q, L, 11]`` tensor (a tensor already stacked passes through)."""
    if isinstance(queue, Tensor):
        stacked = queue
    else:
        if len(queue) == 0:
            raise ValueError(f'{name}: the anchor queue is empty')
        stacked = torch.stack(list(queue), dim=2)
    if stacked.dim() != 4 or stacked.shape[-1] != STATE_DIM:
        raise ValueError(f'{name}: the anchor queue must be L x [B, Q, {STATE_DIM}] (or '
                         f'[B, Q, L, {STATE_DIM}]), got {tuple(stacked.shape)}')
    return stacked


def _gather_rows(value: Tensor, index: Tensor) -> Tensor:
    """``value[b, index[b]]`` for every sample: ``[B, Q, ...]`` and ``[B, K]`` ->
    ``[B, K, ...]`` (one gather, no host work)."""
    shape = index.shape + value.shape[2:]
    expanded = index.reshape(index.shape + (1, ) * (value.dim() - 2)).expand(shape)
    return torch.gather(value, 1, expanded)


@TASK_UTILS.register_module()
class SparseBox3DMotionDecoder(SparseBox3DDecoder):
    """Detection boxes plus their motion forecasts (module docstring).

    Args:
        num_output (int): Boxes kept per sample. Defaults to 300.
        score_threshold (float, optional): Drop boxes whose class score (before the centerness
            product) is below it. Defaults to None (upstream's config: keep all).

    Examples:
        >>> dec = SparseBox3DMotionDecoder(num_output=2)
        >>> motion = dict(prediction=[torch.zeros(1, 4, 6, 12, 2)],
        ...               classification=[torch.zeros(1, 4, 6)],
        ...               anchor_queue=[torch.zeros(1, 4, 11)] * 3,
        ...               period=torch.ones(1, 4, dtype=torch.long))
        >>> out = dec.decode([torch.zeros(1, 4, 10)], [torch.zeros(1, 4, 11)],
        ...                  motion_output=motion)
        >>> out[0]['trajs_3d'].shape, out[0]['anchor_queue'].shape
        (torch.Size([2, 6, 12, 2]), torch.Size([2, 3, 10]))
    """

    def decode(self,
               cls_scores: LayerOutputs,
               box_preds: LayerOutputs,
               instance_id: Optional[Tensor] = None,
               quality: Optional[LayerOutputs] = None,
               motion_output: Optional[Mapping] = None,
               output_idx: int = -1) -> List[Dict[str, Tensor]]:
        """Decode a batch (upstream's argument order).

        Args:
            cls_scores (Tensor or list[Tensor]): ``[B, Q, C]`` detection logits, or the
                per-layer list (layer ``output_idx`` is used).
            box_preds (Tensor or list[Tensor]): ``[B, Q, 11]`` box states, or per layer.
            instance_id (Tensor, optional): ``[B, Q]`` tracking ids.
            quality (Tensor or list, optional): ``[B, Q, 2]`` quality logits, or per layer
                (a None layer means no quality).
            motion_output (dict): The motion head's ``classification`` (per layer
                ``[B, Q, K]``), ``prediction`` (per layer ``[B, Q, K, F, 2]`` per-step
                offsets), ``anchor_queue`` (list of ``[B, Q, 11]``, oldest first) and
                ``period`` (``[B, Q]``); the last motion layer is used, as upstream.
            output_idx (int): Detection layer to decode. Defaults to -1.

        Returns:
            list[dict]: Per sample, on the CPU, the detection decoder's fields
            (``boxes_3d`` ``[N, 10]``, ``scores_3d``, ``labels_3d``, ``cls_scores``,
            ``indices``, and ``instance_ids`` with ids; the same values as
            :meth:`SparseBox3DDecoder.decode`) and upstream's motion fields:
            ``trajs_3d`` ``[N, K, F, 2]`` (positions, lidar frame), ``trajs_score``
            ``[N, K]``, ``anchor_queue`` ``[N, L, 10]`` (decoded boxes), ``period`` ``[N]``.

        Raises:
            ValueError: ``motion_output`` is missing or a shape disagrees.
        """
        cls = last_layer(cls_scores, output_idx)
        boxes = last_layer(box_preds, output_idx)
        qual = last_layer(quality, output_idx)
        if motion_output is None:
            raise ValueError('SparseBox3DMotionDecoder.decode: motion_output is required')
        if cls.dim() != 3 or boxes.dim() != 3 or boxes.shape[:2] != cls.shape[:2]:
            raise ValueError(f'SparseBox3DMotionDecoder.decode: cls_scores [B, Q, C] and '
                             f'box_preds [B, Q, 11] must agree, got {tuple(cls.shape)} and '
                             f'{tuple(boxes.shape)}')
        batch_query = tuple(cls.shape[:2])
        trajs = last_layer(motion_output['prediction'])
        traj_cls = last_layer(motion_output['classification'])
        queue = stack_queue(motion_output['anchor_queue'], 'SparseBox3DMotionDecoder.decode')
        period = motion_output['period']
        for name, value, dims in (('prediction', trajs, 5), ('classification', traj_cls, 3),
                                  ('anchor_queue', queue, 4), ('period', period, 2)):
            if value.dim() != dims or tuple(value.shape[:2]) != batch_query:
                raise ValueError(f'SparseBox3DMotionDecoder.decode: motion_output[{name!r}] '
                                 f'must start with [B, Q] = {list(batch_query)} ({dims} dims), '
                                 f'got {tuple(value.shape)}')
        if trajs.shape[2] != traj_cls.shape[2] or trajs.shape[-1] != 2:
            raise ValueError(f'SparseBox3DMotionDecoder.decode: prediction [B, Q, K, F, 2] and '
                             f'classification [B, Q, K] disagree: {tuple(trajs.shape)}, '
                             f'{tuple(traj_cls.shape)}')
        if instance_id is not None and tuple(instance_id.shape) != batch_query:
            raise ValueError(f'SparseBox3DMotionDecoder.decode: instance_id must be '
                             f'{list(batch_query)}, got {tuple(instance_id.shape)}')

        scores, labels = cls.sigmoid().max(dim=-1)
        top, index = scores.topk(min(self.num_output, scores.shape[1]), dim=1)
        final = top
        if qual is not None:
            final = top * torch.gather(qual[..., CENTERNESS], 1, index).sigmoid()
            final, order = final.sort(dim=1, descending=True)
            index, top = torch.gather(index, 1, order), torch.gather(top, 1, order)
        kept_boxes = decode_boxes(_gather_rows(boxes, index).float())
        centre = kept_boxes[..., None, None, X:Y + 1]
        fields = dict(
            boxes_3d=kept_boxes, scores_3d=final, labels_3d=torch.gather(labels, 1, index),
            cls_scores=top, indices=index)
        if instance_id is not None:
            fields['instance_ids'] = torch.gather(instance_id, 1, index)
        fields.update(
            trajs_3d=_gather_rows(trajs, index).float().cumsum(dim=-2) + centre,
            trajs_score=_gather_rows(traj_cls, index).float().sigmoid(),
            anchor_queue=decode_boxes(_gather_rows(queue, index).float()),
            period=_gather_rows(period, index))
        host = {key: value.detach().cpu() for key, value in fields.items()}  # one copy a field
        keep = None
        if self.score_threshold is not None:
            keep = host['cls_scores'] >= self.score_threshold
        results = []
        for b in range(batch_query[0]):
            if keep is None:
                results.append({key: value[b] for key, value in host.items()})
            else:
                results.append({key: value[b][keep[b]] for key, value in host.items()})
        return results
