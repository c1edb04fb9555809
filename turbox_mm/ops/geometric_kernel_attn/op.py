"""``torch.ops.turbox_mm.geometric_kernel_attn``: the op, its fake, its autograd, its dispatch.

Two ``torch.library.custom_op`` ops, each with a fake (shape-only) implementation so that
``torch.compile`` traces through them without a graph break:

- ``turbox_mm::geometric_kernel_attn(value, spatial_shapes, level_start_index, sampling_loc,
  attn_weight) -> Tensor``, the tensors of MapTR's ``GeometricKernelAttentionFunc`` (its
  ``im2col_step`` only sizes upstream's own batching; the public functions of
  :mod:`turbox_mm.ops.geometric_kernel_attn` take and ignore it);
- ``turbox_mm::geometric_kernel_attn_backward(grad_output, <the same five>) -> (grad_value,
  grad_attn_weight)``, its autograd formula (the integer locations get no gradient).

Each dispatches when called: a CUDA tensor with Triton importable runs the Triton kernels of
:mod:`.triton_kernels`; anything else (CPU tensors, no Triton, or ``TURBOX_OPS_REFERENCE=1``
in the environment) runs :func:`.reference.geometric_kernel_attn_reference`, its backward
being the reference's own autograd (``torch.func.vjp``), and warns once per process.

``custom_op`` rather than ``triton_op``: the op also holds the CPU path, whose reference reads
the level tables on the host; an opaque op with an explicit fake serves both paths.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import dispatch
from ..dispatch import ENV_FORCE_REFERENCE, kernel_on_cpu  # noqa: F401 (the op's public names)
from .reference import geometric_kernel_attn_reference

try:
    from . import triton_kernels
except ImportError:  # no Triton: the reference serves every device
    triton_kernels = None

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LOCATIONS = (torch.int32, torch.int64)


def fallback_reason(tensor: Tensor) -> Optional[str]:
    """Why the op would run the reference for ``tensor`` rather than the kernel; None if not."""
    return dispatch.fallback_reason(tensor, triton_kernels is not None)


def _use_kernel(tensor: Tensor) -> bool:
    return dispatch.use_kernel('geometric_kernel_attn', tensor, triton_kernels is not None,
                               'an indexed gather per level')


def check_inputs(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                 sampling_loc: Tensor, attn_weight: Tensor) -> None:
    """Raise ``ValueError`` unless the five inputs fit together as upstream's op expects.

    Only shapes, dtypes and devices: nothing here reads a tensor's values (no host sync).
    """
    for name, t in (('value', value), ('attn_weight', attn_weight)):
        if t.dtype not in _FLOATS:
            raise ValueError(f'geometric_kernel_attn: {name} must be float16, bfloat16, float32 '
                             f'or float64, got {t.dtype}')
    if sampling_loc.dtype not in _LOCATIONS:
        raise ValueError('geometric_kernel_attn: sampling_loc must be int64 (or int32) pixel '
                         f'coordinates, rounded by the caller; got {sampling_loc.dtype}')
    for name, t in (('spatial_shapes', spatial_shapes),
                    ('level_start_index', level_start_index)):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f'geometric_kernel_attn: {name} must be an integer tensor, got '
                             f'{t.dtype}')
    if value.dim() != 4 or sampling_loc.dim() != 6 or attn_weight.dim() != 5:
        raise ValueError('geometric_kernel_attn: expected value [bs, num_value, heads, dims], '
                         'sampling_loc [bs, num_query, heads, levels, points, 2] and '
                         'attn_weight [bs, num_query, heads, levels, points], got shapes '
                         f'{tuple(value.shape)}, {tuple(sampling_loc.shape)}, '
                         f'{tuple(attn_weight.shape)}')
    bs, _, heads, _ = value.shape
    _, num_query, loc_heads, levels, points, two = sampling_loc.shape
    if sampling_loc.shape[0] != bs or loc_heads != heads or two != 2 or \
            tuple(attn_weight.shape) != (bs, num_query, heads, levels, points):
        raise ValueError('geometric_kernel_attn: sampling_loc must be [bs, num_query, heads, '
                         'levels, points, 2] and attn_weight [bs, num_query, heads, levels, '
                         f'points] with the bs and heads of value ({bs}, {heads}); got '
                         f'{tuple(sampling_loc.shape)} and {tuple(attn_weight.shape)}')
    if tuple(spatial_shapes.shape) != (levels, 2) or \
            tuple(level_start_index.shape) != (levels, ):
        raise ValueError(f'geometric_kernel_attn: spatial_shapes must be [levels, 2] = '
                         f'[{levels}, 2] and level_start_index [{levels}]; got '
                         f'{tuple(spatial_shapes.shape)} and {tuple(level_start_index.shape)}')
    devices = {t.device for t in (value, sampling_loc, attn_weight)}
    if len(devices) != 1:
        raise ValueError(f'geometric_kernel_attn: value, sampling_loc and attn_weight must be '
                         f'on one device, got {sorted(map(str, devices))}')


@torch.library.custom_op('turbox_mm::geometric_kernel_attn', mutates_args=())
def geometric_kernel_attn_op(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                             sampling_loc: Tensor, attn_weight: Tensor) -> Tensor:
    """Geometric kernel attention (see :mod:`.reference`): ``[bs, num_query, heads * D]``."""
    check_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight)
    if _use_kernel(value):
        return triton_kernels.geometric_kernel_attn_forward(value, spatial_shapes,
                                                            level_start_index, sampling_loc,
                                                            attn_weight)
    return geometric_kernel_attn_reference(value, spatial_shapes, level_start_index,
                                           sampling_loc, attn_weight).contiguous()


@geometric_kernel_attn_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_loc, attn_weight):
    check_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight)
    bs, _, heads, dims = value.shape
    return value.new_empty((bs, sampling_loc.shape[1], heads * dims))


@torch.library.custom_op('turbox_mm::geometric_kernel_attn_backward', mutates_args=())
def geometric_kernel_attn_backward_op(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor,
                                      level_start_index: Tensor, sampling_loc: Tensor,
                                      attn_weight: Tensor) -> Tuple[Tensor, Tensor]:
    """Gradients of ``value`` and ``attn_weight``, each in its input's dtype."""
    if _use_kernel(value):
        return triton_kernels.geometric_kernel_attn_backward(grad_output, value, spatial_shapes,
                                                             level_start_index, sampling_loc,
                                                             attn_weight)

    def forward(val, wts):
        return geometric_kernel_attn_reference(val, spatial_shapes, level_start_index,
                                               sampling_loc, wts)

    # Autograd does not record inside an op's implementation; functorch's vjp does.
    _, vjp = torch.func.vjp(forward, value, attn_weight)
    grads = vjp(grad_output.to(value.dtype))
    return tuple(g.contiguous() for g in grads)


@geometric_kernel_attn_backward_op.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_loc, attn_weight):
    return value.new_empty(value.shape), attn_weight.new_empty(attn_weight.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_loc, attn_weight = ctx.saved_tensors
    grad_value, grad_w = geometric_kernel_attn_backward_op(grad_output, value, spatial_shapes,
                                                           level_start_index, sampling_loc,
                                                           attn_weight)
    return grad_value, None, None, None, grad_w


geometric_kernel_attn_op.register_autograd(_backward, setup_context=_setup_context)
