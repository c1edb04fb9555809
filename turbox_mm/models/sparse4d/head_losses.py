"""The training losses of :class:`~turbox_mm.models.sparse4d.Sparse4DHead`: per decoder layer,
the matching of queries to ground truth, classification and regression losses, and those of the
denoising queries, in upstream's sample-by-sample form (``op_impl='stock'``) or batched without
host waits (``op_impl='turbox'``)."""
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from turbox_mm.models.losses import focal_loss_like_mmdet, layer_means, reduces_by_mean


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
        target = self._background_outside(target, cls.shape[-1])
        if self.op_impl == 'turbox':
            return focal_loss_like_mmdet(self.loss_cls, cls.float(), target, weight=weight,
                                         avg_factor=avg_factor)
        return self.loss_cls(cls.float(), target, weight=weight, avg_factor=avg_factor)

    @staticmethod
    def _background_outside(target: Tensor, num_classes: int) -> Tensor:
        """``target`` with every label outside ``[0, C)`` set to ``C`` (background)."""
        return torch.where((target < 0) | (target > num_classes),
                           torch.full_like(target, num_classes), target)

    def _cls_loss_layers(self, cls: Tensor, target: Tensor, avg_factor: Tensor, layers: int,
                         weight: Optional[Tensor] = None) -> Tensor:
        """:meth:`_cls_loss` of several decoder layers in one call.

        Args:
            cls (Tensor): ``[layers * R, C]`` logits, the layers' rows one block after the
                other.
            target (Tensor): ``[layers * R]`` labels.
            avg_factor (Tensor): ``[layers]`` normalisers.
            layers (int): Number of blocks.
            weight (Tensor, optional): ``[layers * R]`` row weights. Defaults to None.

        Returns:
            Tensor: ``[layers]`` losses, each the value of :meth:`_cls_loss` on its block (up
            to the order of float32 summation).
        """
        target = self._background_outside(target, cls.shape[-1])
        elements = focal_loss_like_mmdet(self.loss_cls, cls.float(), target, weight=weight,
                                         reduction_override='none')
        return layer_means(elements, layers, avg_factor)

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
        return self._score_gate(mask, cls), num_pos

    def _score_gate(self, matched: Tensor, cls: Tensor) -> Tensor:
        """``matched`` rows whose best class score is above ``cls_threshold_to_reg`` (all of
        them where that is not set): the rows of the regression losses."""
        if self.cls_threshold_to_reg > 0:
            return matched & (cls.max(dim=-1).values.sigmoid() > self.cls_threshold_to_reg)
        return matched

    def _dn_targets(self, outputs: Dict, layer: int):
        """Denoising ``(valid_mask, cls_target, reg_target)`` of decoder layer ``layer``: the
        layers after the bank's update see the temporal denoising queries."""
        prefix = ('temp_' if layer >= self.num_single_frame_decoder
                  and 'temp_dn_valid_mask' in outputs else '')
        return (outputs[f'{prefix}dn_valid_mask'], outputs[f'{prefix}dn_cls_target'],
                outputs[f'{prefix}dn_reg_target'])

    def _loss_batched(self, outputs: Dict, gt_labels: List[Tensor],
                      gt_boxes: List[Tensor]) -> Dict[str, Tensor]:
        """:meth:`loss` with ``op_impl='turbox'``: the same losses without host waits, all
        decoder layers in one call of each loss where they stack (:meth:`_layers_stack`),
        else a call per layer."""
        if self._layers_stack(outputs):
            return self._loss_stacked(outputs, gt_labels, gt_boxes)
        return self._loss_layer_by_layer(outputs, gt_labels, gt_boxes)

    def _layers_stack(self, outputs: Dict) -> bool:
        """Whether :meth:`_loss_stacked` serves these outputs: losses that reduce by
        ``'mean'`` (a regression loss with ``stacks_layers``) and every layer with a quality
        output or none. Both follow from the configuration, not from the data, so every rank
        takes the same path and makes the same collectives."""
        stacks = getattr(self.loss_reg, 'stacks_layers', None)
        if stacks is None or not stacks() or not reduces_by_mean(self.loss_cls):
            return False
        return len({q is None for q in outputs['quality']}) == 1

    def _loss_stacked(self, outputs: Dict, gt_labels: List[Tensor],
                      gt_boxes: List[Tensor]) -> Dict[str, Tensor]:
        """:meth:`_loss_layer_by_layer` with the decoder layers stacked: one call of each loss
        for all layers (and one for all denoising layers), each returning a loss per layer
        (:func:`~turbox_mm.models.losses.layer_means`), and one ``reduce_mean`` of all
        layers' normalisers. The values equal the per-layer calls up to the order of float32
        summation; the keys and their order are the same.

        As in the per-layer loop (and upstream), the collective depends on whether the
        denoising outputs are present (``L`` or ``L + L_dn`` normalisers); they are whenever
        the sampler has denoising groups, on every rank alike.
        """
        from mmdet.utils import reduce_mean
        dims = len(self.reg_weights)
        preds = [r[..., :dims] for r in outputs['prediction']]
        cls_target, reg_target, reg_weights = self.sampler.sample_layers(
            outputs['classification'], preds, gt_labels, gt_boxes, stacked=True)
        cls = torch.stack(list(outputs['classification']))  # [L, B, Q, C]
        reg = torch.stack(preds)
        layers = cls.shape[0]
        reg_target = reg_target[..., :dims]
        mask = (reg_target != 0).any(dim=-1)  # [L, B, Q]
        counts = [mask.sum((1, 2))]
        dn = self._stacked_dn_targets(outputs, dims) if 'dn_prediction' in outputs else None
        if dn is not None:
            counts.append(dn[0].sum((1, 2)))
        # every layer's normaliser in one collective (elementwise, so each is the value of
        # its own reduce_mean)
        norms = reduce_mean(torch.cat(counts).float()).clamp(min=1.0)
        num_pos = norms[:layers]
        mask = self._score_gate(mask, cls)  # after counting, as _matched_rows
        cls_losses = self._cls_loss_layers(cls.flatten(0, 2), cls_target.flatten(), num_pos,
                                           layers)
        weight = reg_weights * self.reg_weight_vector.to(reg_weights.dtype)
        quality = outputs['quality']
        quality = None if quality[0] is None else torch.stack(list(quality)).flatten(0, 2)
        reg_losses = self.loss_reg(
            reg.flatten(0, 2), torch.nan_to_num(reg_target.flatten(0, 2)),
            weight=weight.flatten(0, 2), avg_factor=num_pos, quality=quality,
            cls_target=cls_target.flatten(), row_weight=mask.flatten().to(reg.dtype),
            layers=layers)
        losses = self._per_layer_keys(cls_losses, reg_losses, '')
        if dn is None:
            return losses
        valid, dn_cls_target, dn_reg_target = dn
        dn_layers = valid.shape[0]
        dn_cls = torch.stack(list(outputs['dn_classification']))
        dn_reg = torch.stack([r[..., :dims] for r in outputs['dn_prediction']]).flatten(0, 2)
        positive = valid & (dn_cls_target >= 0)
        num_dn = norms[layers:]
        cls_losses = self._cls_loss_layers(dn_cls.flatten(0, 2), dn_cls_target.flatten(),
                                           num_dn, dn_layers, weight=valid.flatten().float())
        reg_losses = self.loss_reg(
            dn_reg, torch.nan_to_num(dn_reg_target.flatten(0, 2)),
            weight=self.reg_weight_vector.to(dn_reg.dtype).expand_as(dn_reg),
            avg_factor=num_dn, row_weight=positive.flatten().to(dn_reg.dtype),
            layers=dn_layers)
        losses.update(self._per_layer_keys(cls_losses, reg_losses, '_dn'))
        return losses

    @staticmethod
    def _per_layer_keys(cls_losses: Tensor, reg_losses: Dict[str, Tensor],
                        infix: str) -> Dict[str, Tensor]:
        """``loss_cls{infix}_i`` then the regression keys ``{key}{infix}_i`` of each layer
        ``i``, in the order of the per-layer calls."""
        reg_values = {key: value.unbind(0) for key, value in reg_losses.items()}
        losses = {}
        for i, value in enumerate(cls_losses.unbind(0)):
            losses[f'loss_cls{infix}_{i}'] = value
            for key, values in reg_values.items():
                losses[f'{key}{infix}_{i}'] = values[i]
        return losses

    def _stacked_dn_targets(self, outputs: Dict, dims: int) -> Tuple[Tensor, Tensor, Tensor]:
        """The denoising targets of every decoder layer, stacked.

        Args:
            outputs (dict): :meth:`forward`'s training output, with ``dn_prediction``.
            dims (int): Regression numbers kept of the targets.

        Returns:
            tuple[Tensor]: ``(valid [L, B, Q], cls_target [L, B, Q], reg_target [L, B, Q,
            dims])``, each layer's as :meth:`_dn_targets` gives it (the first frame's targets
            up to ``num_single_frame_decoder``, then the temporal ones).

        Raises:
            ValueError: No denoising layer, or temporal targets shaped unlike the first
                frame's (the sampler's ``update_dn`` keeps the shapes).
        """
        dn_layers = len(outputs['dn_prediction'])
        if dn_layers == 0:
            raise ValueError('Sparse4DHead.loss: dn_prediction holds no layer')
        first = dn_layers
        if 'temp_dn_valid_mask' in outputs:
            first = min(self.num_single_frame_decoder, dn_layers)
            for name in ('valid_mask', 'cls_target', 'reg_target'):
                old, new = outputs[f'dn_{name}'], outputs[f'temp_dn_{name}']
                if new.shape[:2] != old.shape[:2] or new.dim() != old.dim():
                    raise ValueError(f'Sparse4DHead.loss: temp_dn_{name} is '
                                     f'{tuple(new.shape)}, dn_{name} {tuple(old.shape)}; '
                                     'the stacked losses need equal batch and query sizes')
        stacked = []
        for name in ('valid_mask', 'cls_target', 'reg_target'):
            parts = [(outputs[f'{prefix}dn_{name}'], count)
                     for prefix, count in (('', first), ('temp_', dn_layers - first)) if count]
            if name == 'reg_target':
                parts = [(t[..., :dims], count) for t, count in parts]
            expanded = [t[None].expand(count, *t.shape) for t, count in parts]
            stacked.append(expanded[0] if len(expanded) == 1 else torch.cat(expanded))
        return tuple(stacked)

    def _loss_layer_by_layer(self, outputs: Dict, gt_labels: List[Tensor],
                             gt_boxes: List[Tensor]) -> Dict[str, Tensor]:
        """:meth:`_loss_batched` a decoder layer at a time: losses that do not stack."""
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
