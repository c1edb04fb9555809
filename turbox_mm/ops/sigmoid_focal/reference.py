"""The specification: mmcv's sigmoid focal loss kernels (``sigmoid_focal_loss_cuda_kernel.cuh``
of mmcv 2.1) in PyTorch, per element, with their analytic gradient.

For logits ``x [N, C]`` and labels ``t [N]`` (a label outside ``[0, C)`` is background: no
class of its row is positive), with ``p = 1 / (1 + exp(-x))``:

- positive (``t == c``): ``loss = -alpha (1 - p)^gamma log(max(p, FLT_MIN))``,
  ``dloss/dx = -alpha (1 - p)^gamma (1 - p - gamma p log(max(p, FLT_MIN)))``;
- negative: ``loss = -(1 - alpha) p^gamma log(max(1 - p, FLT_MIN))``,
  ``dloss/dx = -(1 - alpha) p^gamma (gamma (1 - p) log(max(1 - p, FLT_MIN)) - p)``.

mmcv's kernel reads ``target.max()`` on the host first (a sync a call); these formulas need
no host read. Labels above ``C`` are background here; mmcv's launcher asserts that none is
(with that host read).
"""
from typing import Tuple

import torch
from torch import Tensor

from .. import _common

#: float32's smallest normal number, mmcv's guard inside the logarithms.
FLT_MIN = 1.1754943508222875e-38
OP = 'sigmoid_focal'


def check_inputs(logits: Tensor, target: Tensor) -> None:
    """Raise ``ValueError`` unless ``logits`` is a float ``[N, C]`` and ``target`` an integer
    ``[N]`` on the same device (shapes, dtypes and devices only: no host sync)."""
    if logits.dim() != 2 or target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f'{OP}: expected logits [N, C] and target [N], got logits of shape '
                         f'{tuple(logits.shape)} and target of shape {tuple(target.shape)}')
    _common.check_float_dtypes(OP, logits=logits)
    _common.check_integer_dtypes(OP, target=target)
    _common.check_one_device(OP, logits=logits, target=target)


def _terms(logits: Tensor, target: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``p``, ``log(max(p, FLT_MIN))``, ``log(max(1 - p, FLT_MIN))`` (float32, float64 for
    float64 logits) and the positive mask ``[N, C]``."""
    p = 1.0 / (1.0 + torch.exp(-logits.to(torch.promote_types(logits.dtype, torch.float32))))
    positive = target[:, None] == torch.arange(logits.shape[1], device=logits.device)
    return p, torch.log(p.clamp(min=FLT_MIN)), torch.log((1.0 - p).clamp(min=FLT_MIN)), positive


def sigmoid_focal_reference(logits: Tensor, target: Tensor, gamma: float,
                            alpha: float) -> Tensor:
    """The per-element loss ``[N, C]`` in ``logits``' dtype (computed in float32, or float64
    for float64 logits)."""
    check_inputs(logits, target)
    p, log_p, log_q, positive = _terms(logits, target)
    term_p = (1.0 - p).pow(gamma) * log_p
    term_n = p.pow(gamma) * log_q
    loss = torch.where(positive, -alpha * term_p, -(1.0 - alpha) * term_n)
    return loss.to(logits.dtype).contiguous()  # as the kernel's and the fake's


def sigmoid_focal_backward_reference(grad: Tensor, logits: Tensor, target: Tensor,
                                     gamma: float, alpha: float) -> Tensor:
    """``grad * dloss/dlogits`` ``[N, C]`` in ``logits``' dtype (the analytic gradient)."""
    p, log_p, log_q, positive = _terms(logits, target)
    term_p = (1.0 - p).pow(gamma) * (1.0 - p - gamma * p * log_p)
    term_n = p.pow(gamma) * (gamma * (1.0 - p) * log_q - p)
    local = torch.where(positive, -alpha * term_p, -(1.0 - alpha) * term_n)
    return (grad.to(local.dtype) * local).to(logits.dtype).contiguous()
