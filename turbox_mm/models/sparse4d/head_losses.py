"""The training losses of :class:`~turbox_mm.models.sparse4d.Sparse4DHead`: per decoder layer,
the matching of queries to ground truth, classification and regression losses, and those of the
denoising queries, in upstream's sample-by-sample form (``op_impl='stock'``) or batched without
host waits (``op_impl='turbox'``)."""
from typing import Dict, List, Optional

import torch
from torch import Tensor

from turbox_mm.models.losses import focal_loss_like_mmdet


class Sparse4DHeadLosses:
    """:class:`~turbox_mm.models.sparse4d.Sparse4DHead`'s loss methods (a mixin: the head
    provides ``sampler``, ``loss_cls``, ``loss_reg``, ``reg_weights``,
    ``reg_weight_vector``, ``cls_threshold_to_reg``, ``num_single_frame_decoder``,
    ``gt_cls_key``, ``gt_reg_key``, ``task_prefix`` and ``op_impl``)."""

    def _cls_loss(self, cls: Tensor, target: Tensor, avg_factor: Tensor,
                  weight: Optional[Tensor] = None) -> Tensor:
        """Focal loss with every label outside ``[0, C)`` read as background.

        mmdet's CPU focal loss one-hot encodes ``C + 1`` classes and fails on the negative
        labels of denoising (-1, -3); its CUDA path treats any label outside ``[0, C)`` as
        background. Mapping them to ``C`` gives both paths the same, valid input. ``weight``
        (``[N]``, 0 or 1) keeps rows in or out without indexing (which would wait for the
        device).
        """
        num_classes = cls.shape[-1]
        target = torch.where((target < 0) | (target > num_classes),
                             torch.full_like(target, num_classes), target)
        if self.op_impl == 'turbox':
            return focal_loss_like_mmdet(self.loss_cls, cls.float(), target, weight=weight,
                                         avg_factor=avg_factor)
        return self.loss_cls(cls.float(), target, weight=weight, avg_factor=avg_factor)

    def loss(self, outputs: Dict, metas: Dict) -> Dict[str, Tensor]:
        """Losses of every decoder layer, and of the denoising queries.

        Args:
            outputs (dict): :meth:`forward`'s output (training mode).
            metas (dict): The ground truth (see :meth:`forward`).

        Returns:
            dict[str, Tensor]: ``loss_cls_i``, ``loss_box_i``, ``loss_cns_i``, ``loss_yns_i``
            per layer ``i``; ``loss_cls_dn_i``, ``loss_box_dn_i`` with denoising (the keys of
            ``loss_reg``); each prefixed with ``task_prefix + '_'`` where that is set.

        Raises:
            KeyError: ``metas`` lacks the ground truth keys.
        """
        if self.sampler is None or self.loss_cls is None or self.loss_reg is None:
            raise RuntimeError('Sparse4DHead.loss needs sampler, loss_cls and loss_reg')
        for key in (self.gt_cls_key, self.gt_reg_key):
            if key not in metas:
                raise KeyError(f'Sparse4DHead.loss: metas lack {key!r} (gt_cls_key / '
                               'gt_reg_key)')
        gt_labels, gt_boxes = metas[self.gt_cls_key], metas[self.gt_reg_key]
        if self.op_impl == 'turbox':
            losses = self._loss_batched(outputs, gt_labels, gt_boxes)
        else:
            losses = self._loss_per_layer(outputs, gt_labels, gt_boxes)
        if self.task_prefix:
            losses = {f'{self.task_prefix}_{k}': v for k, v in losses.items()}
        return losses

    def _loss_per_layer(self, outputs: Dict, gt_labels: List[Tensor],
                        gt_boxes: List[Tensor]) -> Dict[str, Tensor]:
        """:meth:`loss` with ``op_impl='stock'``: upstream's sample-by-sample matching."""
        from mmdet.utils import reduce_mean
        losses = {}
        for i, (cls, reg, quality) in enumerate(
                zip(outputs['classification'], outputs['prediction'], outputs['quality'])):
            reg = reg[..., :len(self.reg_weights)]
            cls_target, reg_target, reg_weights = self.sampler.sample(cls, reg, gt_labels,
                                                                      gt_boxes)
            reg_target = reg_target[..., :len(self.reg_weights)]
            mask, num_pos = self._matched_rows(cls, reg_target)
            losses[f'loss_cls_{i}'] = self._cls_loss(cls.flatten(0, 1), cls_target.flatten(),
                                                     num_pos)
            mask = mask.flatten()
            weight = reg_weights * reg.new_tensor(self.reg_weights)
            target = torch.nan_to_num(reg_target.flatten(0, 1)[mask])
            losses.update(self.loss_reg(
                reg.flatten(0, 1)[mask], target, weight=weight.flatten(0, 1)[mask],
                avg_factor=num_pos, suffix=f'_{i}',
                quality=quality.flatten(0, 1)[mask] if quality is not None else None,
                cls_target=cls_target.flatten()[mask]))
        if 'dn_prediction' not in outputs:
            return losses
        for i, (cls, reg) in enumerate(zip(outputs['dn_classification'],
                                           outputs['dn_prediction'])):
            valid, cls_target, reg_target = self._dn_targets(outputs, i)
            valid_cls = cls_target[valid]
            positive = valid_cls >= 0
            num_dn = reduce_mean(valid.sum().float()).clamp(min=1.0)
            losses[f'loss_cls_dn_{i}'] = self._cls_loss(cls[valid], valid_cls, num_dn)
            reg = reg[valid][positive][:, :len(self.reg_weights)]
            target = torch.nan_to_num(reg_target[valid][positive][:, :len(self.reg_weights)])
            weight = reg.new_tensor(self.reg_weights).expand_as(reg)
            losses.update(self.loss_reg(reg, target, weight=weight, avg_factor=num_dn,
                                        suffix=f'_dn_{i}'))
        return losses

    def _matched_rows(self, cls: Tensor, reg_target: Tensor):
        """``[B, Q]`` rows that enter a layer's regression losses (a matched ground truth,
        and a best class score above ``cls_threshold_to_reg`` where that is set), and the
        number of matched rows (averaged over ranks, at least 1): the losses' normaliser."""
        from mmdet.utils import reduce_mean
        mask = (reg_target != 0).any(dim=-1)
        num_pos = reduce_mean(mask.sum().float()).clamp(min=1.0)
        if self.cls_threshold_to_reg > 0:
            mask = mask & (cls.max(dim=-1).values.sigmoid() > self.cls_threshold_to_reg)
        return mask, num_pos

    def _dn_targets(self, outputs: Dict, layer: int):
        """Denoising ``(valid_mask, cls_target, reg_target)`` of decoder layer ``layer``: the
        layers after the bank's update see the temporal denoising queries."""
        prefix = ('temp_' if layer >= self.num_single_frame_decoder
                  and 'temp_dn_valid_mask' in outputs else '')
        return (outputs[f'{prefix}dn_valid_mask'], outputs[f'{prefix}dn_cls_target'],
                outputs[f'{prefix}dn_reg_target'])

    def _loss_batched(self, outputs: Dict, gt_labels: List[Tensor],
                      gt_boxes: List[Tensor]) -> Dict[str, Tensor]:
        """:meth:`loss` with ``op_impl='turbox'``: the same losses without host waits."""
        from mmdet.utils import reduce_mean
        dims = len(self.reg_weights)
        # Rows leave the losses through 0/1 row weights, not boolean indexing: the sums are
        # those of the selected rows, and the host never waits for a row count.
        targets = self.sampler.sample_layers(outputs['classification'],
                                             [r[..., :dims] for r in outputs['prediction']],
                                             gt_labels, gt_boxes)
        losses = {}
        for i, (cls, reg, quality) in enumerate(
                zip(outputs['classification'], outputs['prediction'], outputs['quality'])):
            reg = reg[..., :dims]
            cls_target, reg_target, reg_weights = targets[i]
            reg_target = reg_target[..., :dims]
            mask, num_pos = self._matched_rows(cls, reg_target)
            losses[f'loss_cls_{i}'] = self._cls_loss(cls.flatten(0, 1), cls_target.flatten(),
                                                     num_pos)
            weight = reg_weights * self.reg_weight_vector.to(reg_weights.dtype)
            losses.update(self.loss_reg(
                reg.flatten(0, 1), torch.nan_to_num(reg_target.flatten(0, 1)),
                weight=weight.flatten(0, 1), avg_factor=num_pos, suffix=f'_{i}',
                quality=quality.flatten(0, 1) if quality is not None else None,
                cls_target=cls_target.flatten(), row_weight=mask.flatten().to(reg.dtype)))
        if 'dn_prediction' not in outputs:
            return losses
        for i, (cls, reg) in enumerate(zip(outputs['dn_classification'],
                                           outputs['dn_prediction'])):
            valid, cls_target, reg_target = self._dn_targets(outputs, i)
            valid, cls_target = valid.flatten(), cls_target.flatten()
            reg_target = reg_target.flatten(0, 1)[:, :dims]
            positive = valid & (cls_target >= 0)
            num_dn = reduce_mean(valid.sum().float()).clamp(min=1.0)
            losses[f'loss_cls_dn_{i}'] = self._cls_loss(cls.flatten(0, 1), cls_target, num_dn,
                                                        weight=valid.float())
            reg = reg.flatten(0, 1)[:, :dims]
            weight = self.reg_weight_vector.to(reg.dtype).expand_as(reg)
            losses.update(self.loss_reg(reg, torch.nan_to_num(reg_target), weight=weight,
                                        avg_factor=num_dn, suffix=f'_dn_{i}',
                                        row_weight=positive.to(reg.dtype)))
        return losses
