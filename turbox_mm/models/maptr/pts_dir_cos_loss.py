"""``PtsDirCosLoss``: one minus the cosine between predicted and target edge directions
(upstream ``losses/map_loss.py`` @ 67cadd8, ``pts_dir_cos_loss``)."""
from typing import Optional, Union

from torch import Tensor, nn

from turbox_mm.registry import MODELS


#: The epsilon ATen's ``cosine_embedding_loss`` adds to each squared norm.
_EPS = 1e-12


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine over the last dim, as ``F.cosine_embedding_loss`` computes it for target 1
    (``a.b / sqrt((|a|^2 + eps)(|b|^2 + eps))``: the same value, and the same gradient up to
    the backward's rounding order), in about half its operations (it also builds the targets
    and selects by them): host time in a host-bound step, which calls this 12 times in MapTR
    v2."""
    dot = (a * b).sum(-1)
    return dot / (((a * a).sum(-1) + _EPS) * ((b * b).sum(-1) + _EPS)).sqrt()


def pts_dir_cos_loss(pred: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                     avg_factor: Optional[Union[float, Tensor]] = None,
                     reduction: str = 'mean') -> Tensor:
    """Per edge ``1 - cos(pred, target)`` (``CosineEmbeddingLoss`` with target 1, so a zero
    vector gives cosine 0), times ``weight`` ``[N, D]``, summed and divided by
    ``avg_factor`` (no epsilon, as upstream's reduction).

    Args:
        pred (Tensor): ``[N, D, 2]`` edge vectors.
        target (Tensor): ``[N, D, 2]``.
        weight (Tensor, optional): ``[N, D]``.
        avg_factor (float | Tensor): Required with ``reduction='mean'``.
        reduction (str): ``'mean'`` (sum / avg_factor) or ``'none'``.
    """
    if target.numel() == 0:
        return pred.sum() * 0
    loss = 1 - _cosine(pred, target)
    if weight is not None:
        loss = loss * weight
    if reduction == 'none':
        return loss
    if reduction != 'mean':
        raise ValueError(f"pts_dir_cos_loss: reduction must be 'mean' or 'none', got "
                         f'{reduction!r}')
    if avg_factor is None:
        raise ValueError('pts_dir_cos_loss: avg_factor is required (as upstream)')
    return loss.sum() / avg_factor


@MODELS.register_module()
class PtsDirCosLoss(nn.Module):
    """``loss_weight * sum(weight * (1 - cos)) / avg_factor`` over point-set edges.

    Args:
        reduction (str): ``'mean'`` or ``'none'``. Defaults to 'mean'.
        loss_weight (float): Defaults to 1.0 (upstream's configs: 0.005).

    Examples:
        >>> import torch
        >>> pred = torch.tensor([[[1., 0.], [0., 1.]]])
        >>> target = torch.tensor([[[2., 0.], [0., -1.]]])
        >>> float(PtsDirCosLoss()(pred, target, torch.ones(1, 2), avg_factor=1))
        2.0
    """

    def __init__(self, reduction: str = 'mean', loss_weight: float = 1.0) -> None:
        super().__init__()
        self.reduction = reduction
        self.loss_weight = loss_weight

    def forward(self, pred: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                avg_factor: Optional[Union[float, Tensor]] = None,
                reduction_override: Optional[str] = None) -> Tensor:
        reduction = reduction_override or self.reduction
        return self.loss_weight * pts_dir_cos_loss(pred, target, weight, avg_factor, reduction)
