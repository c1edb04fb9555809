"""What the ``op.py`` of the sampling ops share: input checks, the reference backward, autograd.

Used by :mod:`turbox_mm.ops.deformable_aggregation`, :mod:`turbox_mm.ops.ms_deform_attn` and
:mod:`turbox_mm.ops.geometric_kernel_attn`. Every check reads only shapes, dtypes and devices
(no host sync) and raises ``ValueError`` with a message that starts with the op's name. The
dispatch itself (kernel or reference, the one-time warning, ``TURBOX_OPS_REFERENCE``) is
:mod:`turbox_mm.ops.dispatch`.
"""
from typing import Callable, Sequence, Tuple

import torch
from torch import Tensor

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_dtypes(op: str, **tensors: Tensor) -> None:
    """Raise unless every one of ``tensors`` (name=tensor) is float16, bfloat16, float32 or
    float64."""
    for name, t in tensors.items():
        if t.dtype not in FLOATS:
            raise ValueError(f'{op}: {name} must be float16, bfloat16, float32 or float64, got '
                             f'{t.dtype}')


def check_integer_dtypes(op: str, **tensors: Tensor) -> None:
    """Raise unless every one of ``tensors`` (name=tensor) has an integer dtype."""
    for name, t in tensors.items():
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f'{op}: {name} must be an integer tensor, got {t.dtype}')


def check_one_device(op: str, **tensors: Tensor) -> None:
    """Raise unless ``tensors`` (name=tensor, at least two) are all on one device."""
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        names = list(tensors)
        raise ValueError(f'{op}: {", ".join(names[:-1])} and {names[-1]} must be on one device, '
                         f'got {sorted(map(str, devices))}')


def check_multi_scale_shapes(op: str, value: Tensor, spatial_shapes: Tensor,
                             level_start_index: Tensor, loc: Tuple[str, Tensor],
                             weights: Tuple[str, Tensor]) -> None:
    """Raise unless the shapes fit mmcv's multi-scale layout: ``value [bs, num_value, heads,
    dims]``, ``spatial_shapes [levels, 2]``, ``level_start_index [levels]``, the locations
    ``[bs, num_query, heads, levels, points, 2]`` and the weights ``[bs, num_query, heads,
    levels, points]`` (``loc`` and ``weights`` are (name, tensor) pairs, named as the op's
    signature names them)."""
    loc_name, loc = loc
    w_name, weights = weights
    if value.dim() != 4 or loc.dim() != 6 or weights.dim() != 5:
        raise ValueError(f'{op}: expected value [bs, num_value, heads, dims], {loc_name} [bs, '
                         f'num_query, heads, levels, points, 2] and {w_name} [bs, num_query, '
                         f'heads, levels, points], got shapes {tuple(value.shape)}, '
                         f'{tuple(loc.shape)}, {tuple(weights.shape)}')
    bs, _, heads, _ = value.shape
    _, num_query, loc_heads, levels, points, two = loc.shape
    if loc.shape[0] != bs or loc_heads != heads or two != 2 or \
            tuple(weights.shape) != (bs, num_query, heads, levels, points):
        raise ValueError(f'{op}: {loc_name} must be [bs, num_query, heads, levels, points, 2] '
                         f'and {w_name} [bs, num_query, heads, levels, points] with the bs and '
                         f'heads of value ({bs}, {heads}); got {tuple(loc.shape)} and '
                         f'{tuple(weights.shape)}')
    if tuple(spatial_shapes.shape) != (levels, 2) or \
            tuple(level_start_index.shape) != (levels, ):
        raise ValueError(f'{op}: spatial_shapes must be [levels, 2] = [{levels}, 2] and '
                         f'level_start_index [{levels}]; got {tuple(spatial_shapes.shape)} and '
                         f'{tuple(level_start_index.shape)}')


def reference_vjp(forward: Callable[..., Tensor], primals: Sequence[Tensor],
                  grad_output: Tensor) -> Tuple[Tensor, ...]:
    """Gradients of ``forward(*primals)`` for ``grad_output`` (cast to ``primals[0]``'s dtype),
    contiguous: an op's backward on the reference path.

    Autograd does not record inside an op's implementation; functorch's vjp does.
    """
    _, vjp = torch.func.vjp(forward, *primals)
    grads = vjp(grad_output.to(primals[0].dtype))
    return tuple(g.contiguous() for g in grads)


def register_backward_op(op, backward_op, differentiable: Sequence[int]) -> None:
    """Register ``backward_op`` as the autograd of the custom op ``op``.

    ``backward_op(grad_output, *inputs)`` returns the gradients of the inputs at positions
    ``differentiable``, in that order; the other inputs get none. Every input is saved.
    """

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad_output):
        inputs = ctx.saved_tensors
        grads = [None] * len(inputs)
        for i, grad in zip(differentiable, backward_op(grad_output, *inputs)):
            grads[i] = grad
        return tuple(grads)

    op.register_autograd(backward, setup_context=setup_context)
