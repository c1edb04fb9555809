"""``PtsL1Loss``: L1 between predicted and target point sets (upstream
``losses/map_loss.py`` @ 67cadd8, mmdet's ``weighted_loss`` reduction)."""
from typing import Optional, Union

from mmdet.models.losses.utils import weighted_loss
from torch import Tensor, nn

from turbox_mm.registry import MODELS


@weighted_loss
def pts_l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Element-wise ``|pred - target|`` of ``[N, P, 2]`` point sets (0 for no targets)."""
    if target.numel() == 0:
        return pred.sum() * 0
    if pred.shape != target.shape:
        raise ValueError(f'pts_l1_loss: pred {tuple(pred.shape)} and target '
                         f'{tuple(target.shape)} differ')
    return (pred - target).abs()


@MODELS.register_module()
class PtsL1Loss(nn.Module):
    """``loss_weight * sum(weight * |pred - target|) / avg_factor`` (mmdet's reduction:
    ``avg_factor`` gets float32's epsilon added, as in mmdet 3).

    Args:
        reduction (str): ``'mean'``, ``'sum'`` or ``'none'``. Defaults to 'mean'.
        loss_weight (float): Defaults to 1.0 (upstream's configs: 5.0).

    Examples:
        >>> import torch
        >>> loss = PtsL1Loss(loss_weight=5.0)
        >>> pred, target = torch.zeros(2, 3, 2), torch.ones(2, 3, 2)
        >>> weight = torch.zeros(2, 3, 2); weight[0] = 1
        >>> round(float(loss(pred, target, weight, avg_factor=1)), 4)
        30.0
    """

    def __init__(self, reduction: str = 'mean', loss_weight: float = 1.0) -> None:
        super().__init__()
        self.reduction = reduction
        self.loss_weight = loss_weight

    def forward(self, pred: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                avg_factor: Optional[Union[float, Tensor]] = None,
                reduction_override: Optional[str] = None) -> Tensor:
        """``pred`` and ``target`` ``[N, P, 2]`` normalised points; ``weight`` like them."""
        reduction = reduction_override or self.reduction
        return self.loss_weight * pts_l1_loss(pred, target, weight, reduction=reduction,
                                              avg_factor=avg_factor)
