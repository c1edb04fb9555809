"""Sparse4D v3's box regression loss with its two quality terms (centerness and yawness).

See docs/design/sparse4d.md 2.11, step 6. Upstream's ``SparseBox3DLoss`` computes the
centerness target from the prediction without detaching it, so the centerness loss also sends
a gradient into the predicted centre through its soft target; this port does the same.
"""
from typing import Dict, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from turbox_mm.models.losses import check_layer_blocks, layer_means, reduces_by_mean
from turbox_mm.registry import MODELS
from .box3d import COS_YAW, SIN_YAW, X, Z

#: Indices of the quality outputs: centerness and yawness logits.
CNS, YNS = 0, 1

AvgFactor = Optional[Union[float, Tensor]]


def _build(cfg: Optional[dict], name: str) -> Optional[nn.Module]:
    if cfg is None:
        return None
    if isinstance(cfg, nn.Module):
        return cfg
    if not isinstance(cfg, dict) or 'type' not in cfg:
        raise TypeError(f'SparseBox3DLoss: {name} must be a config dict with a "type" key or a '
                        f'module, got {cfg!r}')
    return MODELS.build(dict(cfg))


@MODELS.register_module()
class SparseBox3DLoss(nn.Module):
    """L1 loss on the 10-number box target, plus centerness and yawness losses on the quality.

    Args:
        loss_box (dict): Config of the regression loss. Defaults to
            ``dict(type='mmdet.L1Loss', loss_weight=0.25)``.
        loss_centerness (dict, optional): Config of the centerness loss, on logits against the
            soft target ``exp(-||xyz_target - xyz_pred||)``. Defaults to
            ``dict(type='mmdet.CrossEntropyLoss', use_sigmoid=True)``; None drops the term.
        loss_yawness (dict, optional): Config of the yawness loss, on the sigmoid against
            ``cos_sim((sin, cos)_target, (sin, cos)_pred) > 0``. Defaults to
            ``dict(type='mmdet.GaussianFocalLoss')``; None drops the term.
        cls_allow_reverse (list[int], optional): Classes whose heading is ambiguous (the v3
            config gives the barrier, ``[5]``): where the target's (sin, cos) points away from
            the prediction's (negative cosine similarity), the target's pair is negated before
            all three losses. Defaults to None.

    Examples:
        >>> loss = SparseBox3DLoss()
        >>> box, target = torch.zeros(2, 10), torch.ones(2, 10)
        >>> out = loss(box, target, quality=torch.zeros(2, 2), avg_factor=2)
        >>> sorted(out), round(float(out['loss_box']), 4)
        (['loss_box', 'loss_cns', 'loss_yns'], 2.5)
    """

    def __init__(self,
                 loss_box: dict = dict(type='mmdet.L1Loss', loss_weight=0.25),
                 loss_centerness: Optional[dict] = dict(type='mmdet.CrossEntropyLoss',
                                                        use_sigmoid=True),
                 loss_yawness: Optional[dict] = dict(type='mmdet.GaussianFocalLoss'),
                 cls_allow_reverse: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        if loss_box is None:
            raise ValueError('SparseBox3DLoss: loss_box is required')
        self.loss_box = _build(loss_box, 'loss_box')
        self.loss_cns = _build(loss_centerness, 'loss_centerness')
        self.loss_yns = _build(loss_yawness, 'loss_yawness')
        self.cls_allow_reverse = (None if cls_allow_reverse is None else
                                  [int(c) for c in cls_allow_reverse])
        # on the module's device: uploading the list in the step would wait for the device
        self.register_buffer('reverse_classes',
                             torch.tensor(self.cls_allow_reverse or [], dtype=torch.long),
                             persistent=False)

    @staticmethod
    def _yaw_similarity(box_target: Tensor, box: Tensor) -> Tensor:
        """The dot product of the (sin, cos) yaw pairs, without gradient: upstream compares
        their cosine similarity with 0, whose sign is the dot product's (the norms are
        positive), so two operations instead of the cosine's eleven; the two differ only for
        pairs within rounding of perpendicular."""
        # slices, not index lists: an index list is uploaded to the device, which waits
        yaw = slice(SIN_YAW, COS_YAW + 1)  # float32: half-precision products can overflow
        return (box_target[..., yaw].detach().float() * box[..., yaw].detach().float()).sum(-1)

    def forward(self,
                box: Tensor,
                box_target: Tensor,
                weight: Optional[Tensor] = None,
                avg_factor: AvgFactor = None,
                suffix: str = '',
                quality: Optional[Tensor] = None,
                cls_target: Optional[Tensor] = None,
                row_weight: Optional[Tensor] = None,
                layers: int = 1) -> Dict[str, Tensor]:
        """Compute the losses of ``N`` matched boxes.

        Args:
            box (Tensor): ``[N, 10]`` predictions (extra trailing numbers, e.g. ``vz``, are cut
                to the target's length).
            box_target (Tensor): ``[N, 10]`` targets (not modified).
            weight (Tensor, optional): ``[N, 10]`` element weights of the box loss. Defaults to
                None.
            avg_factor (float or Tensor, optional): Normaliser of all three losses (the number
                of positives; ``[layers]`` with ``layers > 1``). Defaults to None (the losses'
                own mean).
            suffix (str): Appended to the keys. Defaults to ''.
            quality (Tensor, optional): ``[N, 2]`` centerness and yawness logits. Defaults to
                None (no quality losses).
            cls_target (Tensor, optional): ``[N]`` labels, for ``cls_allow_reverse``.
                Defaults to None.
            row_weight (Tensor, optional): ``[N]`` 0/1 weights: rows with 0 leave all three
                losses, as if those rows had been indexed away (the sums are the same; the
                host does not wait for a row count, and the L1 loss is called in its
                functional form, which reads nothing on the host). Defaults to None (every
                row, the module as configured).
            layers (int): The rows are this many decoder layers' equal blocks, layer-major,
                and ``avg_factor`` a ``[layers]`` tensor of their normalisers: each loss is
                then a ``[layers]`` tensor, the values of one call per block (up to the order
                of float32 summation; see :func:`~turbox_mm.models.losses.layer_means`). Needs
                ``'mean'`` reductions (:meth:`stacks_layers`). Defaults to 1 (one loss each,
                as the module's own reduction gives it).

        Returns:
            dict[str, Tensor]: ``loss_box{suffix}``, and with ``quality`` also
            ``loss_cns{suffix}`` and ``loss_yns{suffix}``. With ``N = 0`` every loss is a zero
            that stays connected to the inputs' graph.

        Raises:
            ValueError: Shapes that disagree, or ``layers > 1`` with a loss that does not
                reduce by ``'mean'`` or without a ``[layers]`` ``avg_factor``.
        """
        dims = box_target.shape[-1]
        if box.dim() != 2 or box_target.dim() != 2 or box.shape[0] != box_target.shape[0] \
                or box.shape[-1] < dims or dims <= COS_YAW:
            raise ValueError(f'SparseBox3DLoss: box [N, >=D] and box_target [N, D] (D >= '
                             f'{COS_YAW + 1}) must agree, got {tuple(box.shape)} and '
                             f'{tuple(box_target.shape)}')
        box = box[:, :dims]
        if weight is not None and weight.shape != box_target.shape:
            raise ValueError(f'SparseBox3DLoss: weight must be {tuple(box_target.shape)}, got '
                             f'{tuple(weight.shape)}')
        if quality is not None and (quality.dim() != 2 or quality.shape[0] != box.shape[0]
                                    or quality.shape[1] < 2):
            raise ValueError(f'SparseBox3DLoss: quality must be [{box.shape[0]}, 2], got '
                             f'{tuple(quality.shape)}')
        if cls_target is not None and tuple(cls_target.shape) != (box.shape[0], ):
            raise ValueError(f'SparseBox3DLoss: cls_target must be [{box.shape[0]}], got '
                             f'{tuple(cls_target.shape)}')
        if row_weight is not None and tuple(row_weight.shape) != (box.shape[0], ):
            raise ValueError(f'SparseBox3DLoss: row_weight must be [{box.shape[0]}], got '
                             f'{tuple(row_weight.shape)}')

        if layers != 1:
            self._check_layers(layers, box.shape[0], avg_factor)
        if box.shape[0] == 0:
            zero = box.sum() * 0
            if layers != 1:
                zero = zero.expand(layers)
            out = {f'loss_box{suffix}': zero}
            if quality is not None:
                qzero = quality.sum() * 0 + zero
                if self.loss_cns is not None:
                    out[f'loss_cns{suffix}'] = qzero
                if self.loss_yns is not None:
                    out[f'loss_yns{suffix}'] = qzero
            return out

        box_target = box_target.to(box.dtype)
        if self.cls_allow_reverse is not None and cls_target is not None:
            reverse = self._yaw_similarity(box_target, box) < 0
            reverse &= torch.isin(cls_target, self.reverse_classes.to(cls_target.device))
            yaw = box_target[:, SIN_YAW:COS_YAW + 1]
            yaw = torch.where(reverse[:, None], -yaw, yaw)
            box_target = torch.cat([box_target[:, :SIN_YAW], yaw, box_target[:, COS_YAW + 1:]],
                                   dim=-1)

        if row_weight is not None:
            row_weight = row_weight.to(box.dtype)
            weight = row_weight[:, None] if weight is None else weight * row_weight[:, None]
            weight = weight.expand_as(box)
        out = {f'loss_box{suffix}': self._box_loss(box, box_target, weight, avg_factor,
                                                   sync_free=row_weight is not None,
                                                   layers=layers)}
        if quality is not None:
            q_weight = None if row_weight is None else row_weight.to(quality.dtype)
            if self.loss_cns is not None:
                distance = torch.norm(box_target[:, X:Z + 1] - box[:, X:Z + 1], p=2, dim=-1)
                out[f'loss_cns{suffix}'] = self._term(self.loss_cns, quality[:, CNS],
                                                      torch.exp(-distance), q_weight,
                                                      avg_factor, layers)
            if self.loss_yns is not None:
                yns_target = (self._yaw_similarity(box_target, box) > 0).to(quality.dtype)
                out[f'loss_yns{suffix}'] = self._term(self.loss_yns, quality[:, YNS].sigmoid(),
                                                      yns_target, q_weight, avg_factor, layers)
        return out

    def stacks_layers(self) -> bool:
        """Whether :meth:`forward` takes ``layers > 1``: every configured term reduces by
        ``'mean'``."""
        return all(reduces_by_mean(loss) for loss in (self.loss_box, self.loss_cns,
                                                      self.loss_yns))

    def _check_layers(self, layers: int, rows: int, avg_factor: AvgFactor) -> None:
        """Raise unless ``layers > 1`` can be served: ``'mean'`` reductions, a row count
        divisible by ``layers`` and a ``[layers]`` ``avg_factor`` tensor."""
        if not self.stacks_layers():
            raise ValueError('SparseBox3DLoss: layers > 1 needs losses that reduce by '
                             "'mean' (stacks_layers() is False)")
        check_layer_blocks('SparseBox3DLoss', layers, rows, avg_factor)

    @staticmethod
    def _term(loss: nn.Module, pred: Tensor, target: Tensor, weight: Optional[Tensor],
              avg_factor: AvgFactor, layers: int) -> Tensor:
        """One quality term: the module's call, or with ``layers > 1`` its element losses
        reduced per layer."""
        if layers == 1:
            return loss(pred, target, weight=weight, avg_factor=avg_factor)
        return _layer_losses(loss, pred, target, weight, avg_factor, layers)

    def _box_loss(self, box: Tensor, box_target: Tensor, weight: Optional[Tensor],
                  avg_factor: AvgFactor, sync_free: bool, layers: int = 1) -> Tensor:
        """The box loss; with ``sync_free`` (the row-weighted call of the turbox head)
        mmdet's ``L1Loss`` or ``SmoothL1Loss`` through its functional form.

        These modules first ask ``torch.any(weight > 0)`` on the host (a wait for the device)
        to return ``(pred * weight).sum()`` when every weight is 0; the functional form gives
        the same value and gradient there (zero) without asking. Other losses, and the stock
        head's call, go through the module. With ``layers > 1`` the element losses are
        reduced per layer (:func:`~turbox_mm.models.losses.layer_means`).
        """
        from mmdet.models.losses import L1Loss, SmoothL1Loss, l1_loss, smooth_l1_loss
        loss = self.loss_box
        if sync_free and type(loss) in (L1Loss, SmoothL1Loss):
            extra = dict(beta=loss.beta) if type(loss) is SmoothL1Loss else {}
            elements = l1_loss if type(loss) is L1Loss else smooth_l1_loss
            if layers == 1:
                return loss.loss_weight * elements(box, box_target, weight,
                                                   reduction=loss.reduction,
                                                   avg_factor=avg_factor, **extra)
            return loss.loss_weight * layer_means(
                elements(box, box_target, weight, reduction='none', **extra), layers,
                avg_factor)
        if layers == 1:
            return loss(box, box_target, weight=weight, avg_factor=avg_factor)
        return _layer_losses(loss, box, box_target, weight, avg_factor, layers)


def _layer_losses(loss: nn.Module, pred: Tensor, target: Tensor, weight: Optional[Tensor],
                  avg_factor: Tensor, layers: int) -> Tensor:
    """``[layers]`` losses of a configured mmdet-style loss on ``layers`` blocks of rows: its
    element losses (``reduction_override='none'``) reduced per block by
    :func:`~turbox_mm.models.losses.layer_means`.

    mmdet's ``L1Loss`` and ``SmoothL1Loss`` modules return ``(pred * weight).sum()``, a zero
    scalar, whatever the reduction, when every weight is 0; a call per layer returns that
    zero for each layer, so it is expanded to the layers.
    """
    elements = loss(pred, target, weight=weight, reduction_override='none')
    if elements.dim() == 0:
        return elements.expand(layers)
    return layer_means(elements, layers, avg_factor)
