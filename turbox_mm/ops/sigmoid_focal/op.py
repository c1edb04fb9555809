"""``torch.ops.turbox_mm.sigmoid_focal`` and ``sigmoid_focal_backward``: the ops, fakes and
autograd.

- ``turbox_mm::sigmoid_focal(logits, target, gamma, alpha) -> [N, C]`` per-element loss
  (see :mod:`.reference`);
- ``turbox_mm::sigmoid_focal_backward(grad, logits, target, gamma, alpha) -> [N, C]``,
  registered as the first op's backward (the target has no gradient), so that
  ``torch.compile`` traces both.

CUDA tensors with Triton run :mod:`.triton_kernels`; anything else runs :mod:`.reference`
and warns once (:mod:`turbox_mm.ops.dispatch`).
"""
from typing import Tuple

from torch import Tensor

from .. import _common, dispatch
from .reference import (check_inputs, sigmoid_focal_backward_reference,
                        sigmoid_focal_reference)

try:
    from . import triton_kernels
except ImportError:  # no Triton: the reference serves every device
    triton_kernels = None

_dispatch = dispatch.OpDispatch('sigmoid_focal', triton_kernels,
                                'torch ops with the same formulas')
#: Why the ops would run the reference for a tensor rather than the kernel; None if not.
fallback_reason = _dispatch.fallback_reason


def _forward(logits: Tensor, target: Tensor, gamma: float, alpha: float) -> Tensor:
    """The per-element loss ``[N, C]``."""
    check_inputs(logits, target)
    if _dispatch.use_kernel(logits):
        return triton_kernels.sigmoid_focal_forward(logits, target, gamma, alpha)
    return sigmoid_focal_reference(logits, target, gamma, alpha)


def _forward_fake(logits, target, gamma, alpha):
    check_inputs(logits, target)
    return logits.new_empty(logits.shape)


def _backward(grad: Tensor, logits: Tensor, target: Tensor, gamma: float,
              alpha: float) -> Tensor:
    """``grad * dloss/dlogits`` ``[N, C]``."""
    _check_grad(grad, logits, target)
    if _dispatch.use_kernel(logits):
        return triton_kernels.sigmoid_focal_backward(grad, logits, target, gamma, alpha)
    return sigmoid_focal_backward_reference(grad, logits, target, gamma, alpha)


def _check_grad(grad: Tensor, logits: Tensor, target: Tensor) -> None:
    check_inputs(logits, target)
    if grad.shape != logits.shape or grad.device != logits.device:
        raise ValueError(f'sigmoid_focal_backward: grad of shape {tuple(grad.shape)} on '
                         f'{grad.device} does not match logits of shape {tuple(logits.shape)} '
                         f'on {logits.device}')


def _backward_fake(grad, logits, target, gamma, alpha):
    _check_grad(grad, logits, target)
    return logits.new_empty(logits.shape)


sigmoid_focal_op = _common.define_op('sigmoid_focal', _forward, _forward_fake)
sigmoid_focal_backward_op = _common.define_op('sigmoid_focal_backward', _backward,
                                              _backward_fake)


def _logits_grad(grad: Tensor, logits: Tensor, target: Tensor, gamma: float,
                 alpha: float) -> Tuple[Tensor]:
    return (sigmoid_focal_backward_op(grad, logits, target, gamma, alpha), )


_common.register_autograd(sigmoid_focal_op, _logits_grad, (0, ), num_tensors=2)
