"""mmdet's sigmoid focal loss without mmcv's host read of the largest label.

mmcv's CUDA ``sigmoid_focal_loss`` (what mmdet's ``FocalLoss`` runs on the GPU) checks
``target.max().item() <= num_classes`` in its forward: a host sync a call.
:func:`focal_loss_like_mmdet` computes the same loss with the same formulas (mmcv's kernel:
``p = 1 / (1 + exp(-x))``, ``log(max(p, FLT_MIN))``, the analytic gradient) with
:func:`turbox_mm.ops.sigmoid_focal` (one Triton kernel each way on the GPU), which never
waits for the device; labels outside ``[0, C)`` count as background, as in mmcv's kernel. The
values agree with mmcv's to float32 rounding.
"""
from typing import Optional

import torch
from torch import Tensor

from turbox_mm.ops.sigmoid_focal import sigmoid_focal


def focal_loss_like_mmdet(loss_cls: torch.nn.Module, pred: Tensor, target: Tensor,
                          weight: Optional[Tensor] = None,
                          avg_factor: Optional[Tensor] = None,
                          reduction_override: Optional[str] = None) -> Tensor:
    """``loss_cls(pred, target, weight=weight, avg_factor=avg_factor)`` without host syncs.

    For mmdet's ``FocalLoss`` with ``use_sigmoid=True`` on CUDA tensors: the same loss as
    mmcv's kernel through mmdet's reduction. Any other loss, or CPU tensors (mmdet's own
    PyTorch path, which has no sync), is called as it is.

    Args:
        loss_cls (nn.Module): The configured classification loss.
        pred (Tensor): ``[N, C]`` logits.
        target (Tensor): ``[N]`` long labels (``C`` or beyond: background).
        weight (Tensor, optional): ``[N]`` per-row weights. Defaults to None.
        avg_factor (Tensor, optional): The normaliser. Defaults to None.
        reduction_override (str, optional): ``'none'``, ``'mean'`` or ``'sum'`` instead of
            the loss's own reduction, as mmdet's losses take it. Defaults to None.

    Returns:
        Tensor: The loss (scalar for ``reduction='mean'`` / ``'sum'``).
    """
    from mmdet.models.losses import FocalLoss
    from mmdet.models.losses.utils import weight_reduce_loss
    if type(loss_cls) is not FocalLoss or not loss_cls.use_sigmoid or loss_cls.activated or \
            not _on_gpu(pred) or pred.dim() != 2 or target.dim() != 1:
        override = {} if reduction_override is None else dict(
            reduction_override=reduction_override)  # a loss may not take the argument
        return loss_cls(pred, target, weight=weight, avg_factor=avg_factor, **override)
    loss = sigmoid_focal(pred, target, float(loss_cls.gamma), float(loss_cls.alpha))
    if weight is not None and weight.shape != loss.shape:  # mmdet's sigmoid_focal_loss
        if weight.size(0) == loss.size(0):
            weight = weight.view(-1, 1)
        else:
            if weight.numel() != loss.numel():
                raise ValueError(f'focal loss: weight of shape {tuple(weight.shape)} fits '
                                 f'neither the rows nor the elements of {tuple(loss.shape)}')
            weight = weight.view(loss.size(0), -1)
    return loss_cls.loss_weight * weight_reduce_loss(
        loss, weight, reduction_override or loss_cls.reduction, avg_factor)


def _on_gpu(pred: Tensor) -> bool:
    """Where mmdet's FocalLoss runs mmcv's kernel (and its host read); tests patch this."""
    return pred.is_cuda
