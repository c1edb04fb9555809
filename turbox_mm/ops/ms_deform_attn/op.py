"""``torch.ops.turbox_mm.ms_deform_attn``: the op, its fake, its autograd, its dispatch.

Two ``torch.library.custom_op`` ops, each with a fake (shape-only) implementation so that
``torch.compile`` traces through them without a graph break:

- ``turbox_mm::ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
  attention_weights) -> Tensor``, the tensors of mmcv's ``MultiScaleDeformableAttnFunction``
  (its ``im2col_step`` only sizes mmcv's own batching; the public functions of
  :mod:`turbox_mm.ops.ms_deform_attn` take and ignore it);
- ``turbox_mm::ms_deform_attn_backward(grad_output, <the same five>) -> (grad_value,
  grad_sampling_locations, grad_attention_weights)``, its autograd formula.

Each dispatches when called: a CUDA tensor with Triton importable runs the Triton kernels of
:mod:`.triton_kernels`; anything else (CPU tensors, no Triton, or ``TURBOX_OPS_REFERENCE=1``
in the environment) runs :func:`.reference.ms_deform_attn_reference`, its backward being the
reference's own autograd (``torch.func.vjp``), and warns once per process.

``custom_op`` rather than ``triton_op``: the op also holds the CPU path, whose reference reads
the level tables on the host; an opaque op with an explicit fake serves both paths.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import dispatch
from ..dispatch import ENV_FORCE_REFERENCE, kernel_on_cpu  # noqa: F401 (the op's public names)
from .reference import ms_deform_attn_reference

try:
    from . import triton_kernels
except ImportError:  # no Triton: the reference serves every device
    triton_kernels = None

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fallback_reason(tensor: Tensor) -> Optional[str]:
    """Why the op would run the reference for ``tensor`` rather than the kernel; None if not."""
    return dispatch.fallback_reason(tensor, triton_kernels is not None)


def _use_kernel(tensor: Tensor) -> bool:
    return dispatch.use_kernel('ms_deform_attn', tensor, triton_kernels is not None,
                               'grid_sample per level')


def check_inputs(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                 sampling_locations: Tensor, attention_weights: Tensor) -> None:
    """Raise ``ValueError`` unless the five inputs fit together as mmcv's op expects.

    Only shapes, dtypes and devices: nothing here reads a tensor's values (no host sync).
    """
    for name, t in (('value', value), ('sampling_locations', sampling_locations),
                    ('attention_weights', attention_weights)):
        if t.dtype not in _FLOATS:
            raise ValueError(f'ms_deform_attn: {name} must be float16, bfloat16, float32 or '
                             f'float64, got {t.dtype}')
    for name, t in (('spatial_shapes', spatial_shapes),
                    ('level_start_index', level_start_index)):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f'ms_deform_attn: {name} must be an integer tensor, got {t.dtype}')
    if value.dim() != 4 or sampling_locations.dim() != 6 or attention_weights.dim() != 5:
        raise ValueError('ms_deform_attn: expected value [bs, num_value, heads, dims], '
                         'sampling_locations [bs, num_query, heads, levels, points, 2] and '
                         'attention_weights [bs, num_query, heads, levels, points], got shapes '
                         f'{tuple(value.shape)}, {tuple(sampling_locations.shape)}, '
                         f'{tuple(attention_weights.shape)}')
    bs, _, heads, _ = value.shape
    _, num_query, loc_heads, levels, points, two = sampling_locations.shape
    if sampling_locations.shape[0] != bs or loc_heads != heads or two != 2 or \
            tuple(attention_weights.shape) != (bs, num_query, heads, levels, points):
        raise ValueError('ms_deform_attn: sampling_locations must be [bs, num_query, heads, '
                         'levels, points, 2] and attention_weights [bs, num_query, heads, levels, '
                         f'points] with the bs and heads of value ({bs}, {heads}); got '
                         f'{tuple(sampling_locations.shape)} and '
                         f'{tuple(attention_weights.shape)}')
    if tuple(spatial_shapes.shape) != (levels, 2) or \
            tuple(level_start_index.shape) != (levels, ):
        raise ValueError(f'ms_deform_attn: spatial_shapes must be [levels, 2] = [{levels}, 2] '
                         f'and level_start_index [{levels}]; got {tuple(spatial_shapes.shape)} '
                         f'and {tuple(level_start_index.shape)}')
    devices = {t.device for t in (value, sampling_locations, attention_weights)}
    if len(devices) != 1:
        raise ValueError(f'ms_deform_attn: value, sampling_locations and attention_weights must '
                         f'be on one device, got {sorted(map(str, devices))}')


@torch.library.custom_op('turbox_mm::ms_deform_attn', mutates_args=())
def ms_deform_attn_op(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                      sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention (see :mod:`.reference`): ``[bs, num_query, heads * D]``."""
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if _use_kernel(value):
        return triton_kernels.ms_deform_attn_forward(value, spatial_shapes, level_start_index,
                                                     sampling_locations, attention_weights)
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations,
                                    attention_weights).contiguous()


@ms_deform_attn_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    bs, _, heads, dims = value.shape
    return value.new_empty((bs, sampling_locations.shape[1], heads * dims))


@torch.library.custom_op('turbox_mm::ms_deform_attn_backward', mutates_args=())
def ms_deform_attn_backward_op(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor,
                               level_start_index: Tensor, sampling_locations: Tensor,
                               attention_weights: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``value``, ``sampling_locations`` and ``attention_weights``, each in its
    input's dtype."""
    if _use_kernel(value):
        return triton_kernels.ms_deform_attn_backward(grad_output, value, spatial_shapes,
                                                      level_start_index, sampling_locations,
                                                      attention_weights)

    def forward(val, loc, wts):
        return ms_deform_attn_reference(val, spatial_shapes, level_start_index, loc, wts)

    # Autograd does not record inside an op's implementation; functorch's vjp does.
    _, vjp = torch.func.vjp(forward, value, sampling_locations, attention_weights)
    grads = vjp(grad_output.to(value.dtype))
    return tuple(g.contiguous() for g in grads)


@ms_deform_attn_backward_op.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
      attention_weights):
    return (value.new_empty(value.shape), sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = \
        ctx.saved_tensors
    grad_value, grad_loc, grad_w = ms_deform_attn_backward_op(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations,
        attention_weights)
    return grad_value, None, None, grad_loc, grad_w


ms_deform_attn_op.register_autograd(_backward, setup_context=_setup_context)
