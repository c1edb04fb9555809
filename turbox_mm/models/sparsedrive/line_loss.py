"""SparseDrive's map regression loss: smooth-L1 on ROI-normalised polylines, per point
(docs/design/sparsedrive.md section 4 "Losses"; upstream ``P/models/map/loss.py`` @ ffebeb4).

:class:`LinesL1Loss` is upstream's element loss: mmdet's smooth-L1 (``beta > 0``) or L1 with
its weight and ``avg_factor`` reduction (``sum / (avg_factor + float32 eps)``), divided by the
number of points ``D // 2``, times ``loss_weight``. It calls mmdet's functional losses, which
read nothing on the host (mmdet's ``SmoothL1Loss`` module first asks ``any(weight > 0)``).

:class:`SparseLineLoss` normalises prediction and target to the ROI (as the map sampler does)
and applies it; it takes the call of :class:`~turbox_mm.models.sparse4d.losses.SparseBox3DLoss`
so that ``Sparse4DHead`` drives it unchanged, ``row_weight`` included (the turbox head keeps
rows in or out with 0/1 weights instead of boolean indexing).
"""
from typing import Dict, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from turbox_mm.models.losses import check_layer_blocks, layer_means, reduces_by_mean
from turbox_mm.registry import MODELS
from .map_match_cost import normalize_lines

__all__ = ['LinesL1Loss', 'SparseLineLoss']

AvgFactor = Optional[Union[float, torch.Tensor]]


@MODELS.register_module()
class LinesL1Loss(nn.Module):
    """Upstream's ``LinesL1Loss``: smooth-L1 (or L1) over the coordinates of polylines, per
    point.

    Args:
        reduction (str): ``'none'``, ``'mean'`` or ``'sum'``. Defaults to ``'mean'``.
        loss_weight (float): Multiplies the loss. Defaults to 1.0.
        beta (float): Smooth-L1 threshold; 0 gives L1. Defaults to 0.5 (upstream's default;
            the map config sets 0.01).

    Examples:
        >>> loss = LinesL1Loss(loss_weight=10.0, beta=0.01)  # 4 x (1 - 0.005) / 2 points x 10
        >>> round(float(loss(torch.zeros(1, 4), torch.ones(1, 4), avg_factor=1.0)), 4)
        19.9
    """

    def __init__(self, reduction: str = 'mean', loss_weight: float = 1.0,
                 beta: float = 0.5) -> None:
        super().__init__()
        if reduction not in ('none', 'mean', 'sum'):
            raise ValueError(f"LinesL1Loss: reduction must be 'none', 'mean' or 'sum', got "
                             f'{reduction!r}')
        if beta < 0:
            raise ValueError(f'LinesL1Loss: beta must be >= 0, got {beta}')
        self.reduction = reduction
        self.loss_weight = float(loss_weight)
        self.beta = float(beta)

    def forward(self, pred: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                avg_factor: AvgFactor = None,
                reduction_override: Optional[str] = None) -> Tensor:
        """Compute the loss.

        Args:
            pred (Tensor): ``[..., D]`` normalised lines (``D / 2`` points).
            target (Tensor): Same shape.
            weight (Tensor, optional): Element weights, same shape. Defaults to None.
            avg_factor (float or Tensor, optional): Normaliser of ``'mean'`` (a tensor keeps
                the host from reading it). Defaults to None (the mean over elements).
            reduction_override (str, optional): Replaces ``reduction``. Defaults to None.

        Returns:
            Tensor: The loss (a scalar unless the reduction is ``'none'``).
        """
        from mmdet.models.losses import l1_loss, smooth_l1_loss
        if reduction_override not in (None, 'none', 'mean', 'sum'):
            raise ValueError(f'LinesL1Loss: bad reduction_override {reduction_override!r}')
        reduction = reduction_override or self.reduction
        if self.beta > 0:
            loss = smooth_l1_loss(pred, target, weight, reduction=reduction,
                                  avg_factor=avg_factor, beta=self.beta)
        else:
            loss = l1_loss(pred, target, weight, reduction=reduction, avg_factor=avg_factor)
        return loss / (pred.shape[-1] // 2) * self.loss_weight


def _build(cfg: Union[dict, nn.Module]) -> nn.Module:
    if isinstance(cfg, nn.Module):
        return cfg
    if not isinstance(cfg, dict) or 'type' not in cfg:
        raise TypeError(f'SparseLineLoss: loss_line must be a config dict with a "type" key or '
                        f'a module, got {cfg!r}')
    cfg = dict(cfg)
    if cfg['type'] in ('LinesL1Loss', 'turbox_mm.LinesL1Loss'):
        cfg['type'] = LinesL1Loss  # found whatever the default scope of the build
    return MODELS.build(cfg)


@MODELS.register_module()
class SparseLineLoss(nn.Module):
    """The map head's line loss on ROI-normalised polylines.

    Args:
        loss_line (dict): Config of the element loss. Defaults to upstream's
            ``dict(type='LinesL1Loss', loss_weight=10.0, beta=0.01)``.
        num_sample (int): Points per line. Defaults to 20.
        roi_size (tuple[float, float]): ``(W, H)`` x and y extents of the ROI in metres.
            Defaults to ``(30, 60)``.

    Examples:
        >>> loss = SparseLineLoss()
        >>> line, target = torch.zeros(1, 40), torch.full((1, 40), 3.0)
        >>> round(float(loss(line, target, avg_factor=1.0)['loss_line']), 4)
        1.4
    """

    def __init__(self,
                 loss_line: Union[dict, nn.Module] = dict(type='LinesL1Loss', loss_weight=10.0,
                                                          beta=0.01),
                 num_sample: int = 20,
                 roi_size: Sequence[float] = (30, 60)) -> None:
        super().__init__()
        if loss_line is None:
            raise ValueError('SparseLineLoss: loss_line is required')
        if len(roi_size) != 2 or min(roi_size) <= 0:
            raise ValueError(f'SparseLineLoss: roi_size must be two positive extents (x, y), '
                             f'got {roi_size!r}')
        self.loss_line = _build(loss_line)
        self.num_sample = int(num_sample)
        self.roi_size = (float(roi_size[0]), float(roi_size[1]))

    def forward(self,
                line: Tensor,
                line_target: Tensor,
                weight: Optional[Tensor] = None,
                avg_factor: AvgFactor = None,
                suffix: str = '',
                quality: Optional[Tensor] = None,
                cls_target: Optional[Tensor] = None,
                row_weight: Optional[Tensor] = None,
                prefix: str = '',
                layers: int = 1) -> Dict[str, Tensor]:
        """Compute the line loss of ``N`` matched polylines.

        Args:
            line (Tensor): ``[N, 2 * num_sample]`` predicted points in metres.
            line_target (Tensor): ``[N, 2 * num_sample]`` target points in metres.
            weight (Tensor, optional): ``[N, 2 * num_sample]`` element weights. Defaults to
                None.
            avg_factor (float or Tensor, optional): Normaliser (the number of positives).
                Defaults to None (the element loss's own mean).
            suffix (str): Appended to the key. Defaults to ''.
            quality (Tensor, optional): Accepted and ignored (the head passes the det
                quality slot, None for the map). Defaults to None.
            cls_target (Tensor, optional): Accepted and ignored. Defaults to None.
            row_weight (Tensor, optional): ``[N]`` 0/1 weights: rows with 0 leave the loss as
                if indexed away (same sum; without ``avg_factor`` and with a ``'mean'`` element
                loss, the mean is taken over the kept rows' elements). Defaults to None.
            prefix (str): Prepended to the key (upstream's argument). Defaults to ''.
            layers (int): The rows are this many decoder layers' equal blocks, layer-major,
                and ``avg_factor`` a ``[layers]`` tensor: the loss is then a ``[layers]``
                tensor, the values of one call per block (up to the order of float32
                summation; see :func:`~turbox_mm.models.losses.layer_means`). Needs a
                ``'mean'`` element loss (:meth:`stacks_layers`). Defaults to 1.

        Returns:
            dict[str, Tensor]: ``{prefix}loss_line{suffix}``. With ``N = 0`` a zero that stays
            connected to the inputs' graph.

        Raises:
            ValueError: Shapes that disagree, or ``layers > 1`` with an element loss that
                does not reduce by ``'mean'`` or without a ``[layers]`` ``avg_factor``.
        """
        dims = 2 * self.num_sample
        if line.dim() != 2 or line.shape[-1] != dims or line_target.shape != line.shape:
            raise ValueError(f'SparseLineLoss: line and line_target must both be [N, {dims}] '
                             f'(2 * num_sample), got {tuple(line.shape)} and '
                             f'{tuple(line_target.shape)}')
        if weight is not None and weight.shape != line.shape:
            raise ValueError(f'SparseLineLoss: weight must be {tuple(line.shape)}, got '
                             f'{tuple(weight.shape)}')
        if row_weight is not None and tuple(row_weight.shape) != (line.shape[0], ):
            raise ValueError(f'SparseLineLoss: row_weight must be [{line.shape[0]}], got '
                             f'{tuple(row_weight.shape)}')
        key = f'{prefix}loss_line{suffix}'
        if layers != 1:
            if not self.stacks_layers():
                raise ValueError("SparseLineLoss: layers > 1 needs an element loss that "
                                 "reduces by 'mean' (stacks_layers() is False)")
            check_layer_blocks('SparseLineLoss', layers, line.shape[0], avg_factor)
        if line.shape[0] == 0:
            zero = line.sum() * 0
            return {key: zero if layers == 1 else zero.expand(layers)}
        line = normalize_lines(line, self.num_sample, self.roi_size)
        line_target = normalize_lines(line_target.to(line.dtype), self.num_sample,
                                      self.roi_size)
        if row_weight is not None:
            rows = row_weight.to(line.dtype)[:, None].expand_as(line)
            weight = rows if weight is None else weight * rows
            if avg_factor is None and getattr(self.loss_line, 'reduction', None) == 'mean':
                avg_factor = rows.sum()  # the kept rows' elements, as the mean of indexing
        if layers == 1:
            return {key: self.loss_line(line, line_target, weight=weight,
                                        avg_factor=avg_factor)}
        return {key: layer_means(self.loss_line(line, line_target, weight=weight,
                                                reduction_override='none'),
                                 layers, avg_factor)}

    def stacks_layers(self) -> bool:
        """Whether :meth:`forward` takes ``layers > 1``: the element loss reduces by
        ``'mean'``."""
        return reduces_by_mean(self.loss_line)
