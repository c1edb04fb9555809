"""``torch.ops.turbox_mm.ms_deform_attn``: the op, its fake, its autograd, its dispatch.

Two ``torch.library`` ops (:func:`turbox_mm.ops._common.define_op`), each with a fake
(shape-only) implementation so that ``torch.compile`` traces through them without a graph
break:

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

An opaque op rather than ``triton_op``: the op also holds the CPU path, whose reference reads
the level tables on the host; an opaque op with an explicit fake serves both paths. Not
``torch.library.custom_op`` either, for its host time per call (:mod:`.._common`).
"""
import functools
from typing import Tuple

from torch import Tensor

from .. import _common, dispatch
from ..dispatch import ENV_FORCE_REFERENCE, kernel_on_cpu  # noqa: F401 (the op's public names)
from .reference import ms_deform_attn_reference

try:
    from . import triton_kernels
except ImportError:  # no Triton: the reference serves every device
    triton_kernels = None

_dispatch = dispatch.OpDispatch('ms_deform_attn', triton_kernels, 'grid_sample per level')
#: Why the op would run the reference for a tensor rather than the kernel; None if not.
fallback_reason = _dispatch.fallback_reason
reference_in_eager = _dispatch.reference_in_eager


def check_inputs(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                 sampling_locations: Tensor, attention_weights: Tensor) -> None:
    """Raise ``ValueError`` unless the five inputs fit together as mmcv's op expects.

    Only shapes, dtypes and devices: nothing here reads a tensor's values (no host sync).
    """
    if _common.multi_scale_inputs_fit(value, spatial_shapes, level_start_index,
                                      sampling_locations, attention_weights, _common.FLOATS):
        return  # the common case, in one expression; otherwise find what to raise
    _common.check_float_dtypes('ms_deform_attn', value=value,
                               sampling_locations=sampling_locations,
                               attention_weights=attention_weights)
    _common.check_integer_dtypes('ms_deform_attn', spatial_shapes=spatial_shapes,
                                 level_start_index=level_start_index)
    _common.check_multi_scale_shapes('ms_deform_attn', value, spatial_shapes, level_start_index,
                                     ('sampling_locations', sampling_locations),
                                     ('attention_weights', attention_weights))
    _common.check_one_device('ms_deform_attn', value=value,
                             sampling_locations=sampling_locations,
                             attention_weights=attention_weights)


def _forward(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
             sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention (see :mod:`.reference`): ``[bs, num_query, heads * D]``."""
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if _dispatch.use_kernel(value):
        return triton_kernels.ms_deform_attn_forward(value, spatial_shapes, level_start_index,
                                                     sampling_locations, attention_weights)
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations,
                                    attention_weights).contiguous()


def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations,
                  attention_weights):
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    bs, _, heads, dims = value.shape
    return value.new_empty((bs, sampling_locations.shape[1], heads * dims))


def _backward(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor,
              level_start_index: Tensor, sampling_locations: Tensor,
              attention_weights: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``value``, ``sampling_locations`` and ``attention_weights``, each in its
    input's dtype."""
    if _dispatch.use_kernel(value):
        return triton_kernels.ms_deform_attn_backward(grad_output, value, spatial_shapes,
                                                      level_start_index, sampling_locations,
                                                      attention_weights)

    def forward(val, loc, wts):
        return ms_deform_attn_reference(val, spatial_shapes, level_start_index, loc, wts)

    return _common.reference_vjp(forward, (value, sampling_locations, attention_weights),
                                 grad_output)


def _backward_fake(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights):
    return (value.new_empty(value.shape), sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape))


ms_deform_attn_op = _common.define_op('ms_deform_attn', _forward, _forward_fake)

ms_deform_attn_backward_op = _common.define_op('ms_deform_attn_backward', _backward,
                                               _backward_fake)
# value, sampling_locations and attention_weights; the level tables get no gradient.
_common.register_autograd(ms_deform_attn_op, ms_deform_attn_backward_op, (0, 3, 4))

#: The op for a Python call (the entry point's): the registered op, or, where it would run the
#: reference outside ``torch.compile``, :func:`_forward` under plain autograd
#: (:meth:`~turbox_mm.ops.dispatch.OpDispatch.run`).
ms_deform_attn_call = functools.partial(_dispatch.run, ms_deform_attn_op, _forward)
