"""``torch.ops.turbox_mm.geometric_kernel_attn``: the op, its fake, its autograd, its dispatch.

Two ``torch.library`` ops (:func:`turbox_mm.ops._common.define_op`), each with a fake
(shape-only) implementation so that ``torch.compile`` traces through them without a graph
break:

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

An opaque op rather than ``triton_op``: the op also holds the CPU path, whose reference reads
the level tables on the host; an opaque op with an explicit fake serves both paths. Not
``torch.library.custom_op`` either, for its host time per call (:mod:`.._common`).
"""
import functools
from typing import Tuple

import torch
from torch import Tensor

from .. import _common, dispatch
from ..dispatch import ENV_FORCE_REFERENCE, kernel_on_cpu  # noqa: F401 (the op's public names)
from .reference import geometric_kernel_attn_reference

try:
    from . import triton_kernels
except ImportError:  # no Triton: the reference serves every device
    triton_kernels = None

_LOCATIONS = (torch.int32, torch.int64)
_dispatch = dispatch.OpDispatch('geometric_kernel_attn', triton_kernels,
                                'an indexed gather per level')
#: Why the op would run the reference for a tensor rather than the kernel; None if not.
fallback_reason = _dispatch.fallback_reason
reference_in_eager = _dispatch.reference_in_eager


def check_inputs(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                 sampling_loc: Tensor, attn_weight: Tensor) -> None:
    """Raise ``ValueError`` unless the five inputs fit together as upstream's op expects.

    Only shapes, dtypes and devices: nothing here reads a tensor's values (no host sync).
    """
    if _common.multi_scale_inputs_fit(value, spatial_shapes, level_start_index, sampling_loc,
                                      attn_weight, _LOCATIONS):
        return  # the common case, in one expression; otherwise find what to raise
    _common.check_float_dtypes('geometric_kernel_attn', value=value, attn_weight=attn_weight)
    if sampling_loc.dtype not in _LOCATIONS:
        raise ValueError('geometric_kernel_attn: sampling_loc must be int64 (or int32) pixel '
                         f'coordinates, rounded by the caller; got {sampling_loc.dtype}')
    _common.check_integer_dtypes('geometric_kernel_attn', spatial_shapes=spatial_shapes,
                                 level_start_index=level_start_index)
    _common.check_multi_scale_shapes('geometric_kernel_attn', value, spatial_shapes,
                                     level_start_index, ('sampling_loc', sampling_loc),
                                     ('attn_weight', attn_weight))
    _common.check_one_device('geometric_kernel_attn', value=value, sampling_loc=sampling_loc,
                             attn_weight=attn_weight)


def _forward(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
             sampling_loc: Tensor, attn_weight: Tensor) -> Tensor:
    """Geometric kernel attention (see :mod:`.reference`): ``[bs, num_query, heads * D]``."""
    check_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight)
    if _dispatch.use_kernel(value):
        return triton_kernels.geometric_kernel_attn_forward(value, spatial_shapes,
                                                            level_start_index, sampling_loc,
                                                            attn_weight)
    return geometric_kernel_attn_reference(value, spatial_shapes, level_start_index,
                                           sampling_loc, attn_weight).contiguous()


def _forward_fake(value, spatial_shapes, level_start_index, sampling_loc, attn_weight):
    check_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight)
    bs, _, heads, dims = value.shape
    return value.new_empty((bs, sampling_loc.shape[1], heads * dims))


def _backward(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor,
              level_start_index: Tensor, sampling_loc: Tensor,
              attn_weight: Tensor) -> Tuple[Tensor, Tensor]:
    """Gradients of ``value`` and ``attn_weight``, each in its input's dtype."""
    if _dispatch.use_kernel(value):
        return triton_kernels.geometric_kernel_attn_backward(grad_output, value, spatial_shapes,
                                                             level_start_index, sampling_loc,
                                                             attn_weight)

    def forward(val, wts):
        return geometric_kernel_attn_reference(val, spatial_shapes, level_start_index,
                                               sampling_loc, wts)

    return _common.reference_vjp(forward, (value, attn_weight), grad_output)


def _backward_fake(grad_output, value, spatial_shapes, level_start_index, sampling_loc,
                   attn_weight):
    return value.new_empty(value.shape), attn_weight.new_empty(attn_weight.shape)


geometric_kernel_attn_op = _common.define_op('geometric_kernel_attn', _forward, _forward_fake)

geometric_kernel_attn_backward_op = _common.define_op('geometric_kernel_attn_backward',
                                                      _backward, _backward_fake)
# value and attn_weight; the level tables and the integer locations get no gradient.
_common.register_autograd(geometric_kernel_attn_op, geometric_kernel_attn_backward_op, (0, 4))

#: The op for a Python call (the entry point's): the registered op, or, where it would run the
#: reference outside ``torch.compile``, :func:`_forward` under plain autograd
#: (:meth:`~turbox_mm.ops.dispatch.OpDispatch.run`).
geometric_kernel_attn_call = functools.partial(_dispatch.run, geometric_kernel_attn_op, _forward)
