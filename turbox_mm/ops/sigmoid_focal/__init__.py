"""Sigmoid focal loss per element, without the host read of mmcv's kernel.

- :mod:`.reference`: the specification (mmcv 2.1's CUDA kernels' formulas) in PyTorch, and
  the CPU path.
- :mod:`.triton_kernels`: one kernel for the forward, one for the backward.
- :mod:`.op`: ``torch.ops.turbox_mm.sigmoid_focal`` / ``sigmoid_focal_backward`` with fakes
  and autograd.
"""
from torch import Tensor

from .op import fallback_reason, sigmoid_focal_op
from .reference import (check_inputs, sigmoid_focal_backward_reference,
                        sigmoid_focal_reference)

__all__ = ['sigmoid_focal', 'sigmoid_focal_op', 'sigmoid_focal_reference',
           'sigmoid_focal_backward_reference', 'check_inputs', 'fallback_reason']


def sigmoid_focal(logits: Tensor, target: Tensor, gamma: float = 2.0,
                  alpha: float = 0.25) -> Tensor:
    """The sigmoid focal loss of each logit, as mmcv's ``sigmoid_focal_loss`` with
    ``reduction='none'`` and no weight.

    Args:
        logits (Tensor): ``[N, C]`` float logits, any strides.
        target (Tensor): ``[N]`` integer labels; a label outside ``[0, C)`` is background.
        gamma (float): The focusing exponent. Defaults to 2.0.
        alpha (float): The positives' weight. Defaults to 0.25.

    Returns:
        Tensor: ``[N, C]`` in ``logits``' dtype, differentiable in ``logits``.

    Examples:
        >>> import torch
        >>> loss = sigmoid_focal(torch.zeros(1, 2), torch.tensor([1]), gamma=0.0, alpha=0.5)
        >>> [round(v, 4) for v in loss.flatten().tolist()]  # -0.5 log(0.5) each
        [0.3466, 0.3466]
    """
    return sigmoid_focal_op(logits, target, float(gamma), float(alpha))
