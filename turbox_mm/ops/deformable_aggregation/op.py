"""``torch.ops.turbox_mm.deformable_aggregation``: the op, its fake, its autograd, its dispatch.

Two ``torch.library`` ops (:func:`turbox_mm.ops._common.define_op`), each with a fake
(shape-only) implementation so that ``torch.compile`` traces through them without a graph
break:

- ``turbox_mm::deformable_aggregation(mc_ms_feat, spatial_shape, scale_start_index,
  sampling_location, weights) -> Tensor``, upstream's signature;
- ``turbox_mm::deformable_aggregation_backward(grad_output, <the same five>) ->
  (grad_mc_ms_feat, grad_sampling_location, grad_weights)``, its autograd formula.

Each dispatches when called: a CUDA tensor with Triton importable runs the Triton kernels of
:mod:`.triton_kernels`; anything else (CPU tensors, no Triton, or ``TURBOX_OPS_REFERENCE=1``
in the environment) runs :func:`.reference.deformable_aggregation_reference`, its backward
being the reference's own autograd (``torch.func.vjp``), and warns once per process.

An opaque op rather than ``triton_op``: the op must also hold the CPU path, whose reference
reads the integer tables on the host and so cannot be traced with fake tensors; an opaque op
with an explicit fake serves both paths. Not ``torch.library.custom_op`` either, for its host
time per call (:mod:`.._common`).
"""
import functools
from typing import Tuple

from torch import Tensor

from .. import _common, dispatch
from ..dispatch import ENV_FORCE_REFERENCE, kernel_on_cpu  # noqa: F401 (the op's public names)
from .reference import deformable_aggregation_reference

try:
    from . import triton_kernels
except ImportError:  # no Triton: the reference serves every device
    triton_kernels = None

_dispatch = dispatch.OpDispatch('deformable_aggregation', triton_kernels,
                                'grid_sample per camera and level')
#: Why the op would run the reference for a tensor rather than the kernel; None if not.
fallback_reason = _dispatch.fallback_reason
reference_in_eager = _dispatch.reference_in_eager


def _inputs_fit(mc_ms_feat: Tensor, spatial_shape: Tensor, scale_start_index: Tensor,
                sampling_location: Tensor, weights: Tensor) -> bool:
    """True when :func:`check_inputs` passes; False only means that it must run (it may say
    False where the checks pass, never True where they fail)."""
    fshape, lshape, wshape = mc_ms_feat.shape, sampling_location.shape, weights.shape
    return (len(fshape) == 3 and len(lshape) == 5 and len(wshape) == 6 and lshape[4] == 2
            and lshape[0] == fshape[0] and wshape[:4] == lshape[:4]
            and spatial_shape.shape == (lshape[3], wshape[4], 2)
            and scale_start_index.shape == wshape[3:5]
            and wshape[5] != 0 and fshape[2] % wshape[5] == 0
            and mc_ms_feat.dtype in _common.FLOATS and sampling_location.dtype in _common.FLOATS
            and weights.dtype in _common.FLOATS and spatial_shape.dtype in _common.INTEGERS
            and scale_start_index.dtype in _common.INTEGERS
            and mc_ms_feat.device == sampling_location.device == weights.device)


def check_inputs(mc_ms_feat: Tensor, spatial_shape: Tensor, scale_start_index: Tensor,
                 sampling_location: Tensor, weights: Tensor) -> None:
    """Raise ``ValueError`` unless the five inputs fit together as upstream's op expects."""
    if _inputs_fit(mc_ms_feat, spatial_shape, scale_start_index, sampling_location, weights):
        return  # the common case, in one expression; otherwise find what to raise
    _common.check_float_dtypes('deformable_aggregation', mc_ms_feat=mc_ms_feat,
                               sampling_location=sampling_location, weights=weights)
    _common.check_integer_dtypes('deformable_aggregation', spatial_shape=spatial_shape,
                                 scale_start_index=scale_start_index)
    if mc_ms_feat.dim() != 3 or sampling_location.dim() != 5 or weights.dim() != 6:
        raise ValueError('deformable_aggregation: expected mc_ms_feat [bs, num_feat, C], '
                         'sampling_location [bs, anchors, pts, cams, 2] and weights '
                         '[bs, anchors, pts, cams, levels, groups], got shapes '
                         f'{tuple(mc_ms_feat.shape)}, {tuple(sampling_location.shape)}, '
                         f'{tuple(weights.shape)}')
    bs, _, channels = mc_ms_feat.shape
    _, anchors, pts, cams, two = sampling_location.shape
    levels, groups = weights.shape[-2:]
    if (sampling_location.shape[0] != bs or two != 2
            or tuple(weights.shape[:4]) != (bs, anchors, pts, cams)):
        raise ValueError('deformable_aggregation: sampling_location must be [bs, anchors, pts, '
                         'cams, 2] and weights [bs, anchors, pts, cams, levels, groups] with the '
                         f'bs of mc_ms_feat ({bs}); got {tuple(sampling_location.shape)} and '
                         f'{tuple(weights.shape)}')
    if tuple(spatial_shape.shape) != (cams, levels, 2) or \
            tuple(scale_start_index.shape) != (cams, levels):
        raise ValueError(f'deformable_aggregation: spatial_shape must be [cams, levels, 2] = '
                         f'[{cams}, {levels}, 2] and scale_start_index [{cams}, {levels}]; got '
                         f'{tuple(spatial_shape.shape)} and {tuple(scale_start_index.shape)}')
    if groups == 0 or channels % groups != 0:
        raise ValueError(f'deformable_aggregation: C ({channels}) must be a multiple of groups '
                         f'({groups})')
    _common.check_one_device('deformable_aggregation', mc_ms_feat=mc_ms_feat,
                             sampling_location=sampling_location, weights=weights)


def _forward(mc_ms_feat: Tensor, spatial_shape: Tensor, scale_start_index: Tensor,
             sampling_location: Tensor, weights: Tensor) -> Tensor:
    """Sparse4D's deformable aggregation (see :mod:`.reference`): ``[bs, anchors, C]``."""
    check_inputs(mc_ms_feat, spatial_shape, scale_start_index, sampling_location, weights)
    if _dispatch.use_kernel(mc_ms_feat):
        return triton_kernels.deformable_aggregation_forward(
            mc_ms_feat, spatial_shape, scale_start_index, sampling_location, weights)
    return deformable_aggregation_reference(mc_ms_feat, spatial_shape, scale_start_index,
                                            sampling_location, weights).contiguous()


def _forward_fake(mc_ms_feat, spatial_shape, scale_start_index, sampling_location, weights):
    check_inputs(mc_ms_feat, spatial_shape, scale_start_index, sampling_location, weights)
    bs, anchors = sampling_location.shape[:2]
    return mc_ms_feat.new_empty((bs, anchors, mc_ms_feat.shape[-1]))


def _backward(grad_output: Tensor, mc_ms_feat: Tensor, spatial_shape: Tensor,
              scale_start_index: Tensor, sampling_location: Tensor,
              weights: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``mc_ms_feat``, ``sampling_location`` and ``weights``, each in its dtype."""
    if _dispatch.use_kernel(mc_ms_feat):
        return triton_kernels.deformable_aggregation_backward(
            grad_output, mc_ms_feat, spatial_shape, scale_start_index, sampling_location, weights)

    def forward(feat, loc, wts):
        return deformable_aggregation_reference(feat, spatial_shape, scale_start_index, loc, wts)

    return _common.reference_vjp(forward, (mc_ms_feat, sampling_location, weights), grad_output)


def _backward_fake(grad_output, mc_ms_feat, spatial_shape, scale_start_index,
                   sampling_location, weights):
    return (mc_ms_feat.new_empty(mc_ms_feat.shape), sampling_location.new_empty(
        sampling_location.shape), weights.new_empty(weights.shape))


deformable_aggregation_op = _common.define_op('deformable_aggregation', _forward,
                                              _forward_fake)

deformable_aggregation_backward_op = _common.define_op('deformable_aggregation_backward',
                                                       _backward, _backward_fake)
# mc_ms_feat, sampling_location and weights; the level tables get no gradient.
_common.register_autograd(deformable_aggregation_op, deformable_aggregation_backward_op,
                          (0, 3, 4))

#: The op for a Python call (the entry point's): the registered op, or, where it would run the
#: reference outside ``torch.compile``, :func:`_forward` under plain autograd
#: (:meth:`~turbox_mm.ops.dispatch.OpDispatch.run`).
deformable_aggregation_call = functools.partial(_dispatch.run, deformable_aggregation_op, _forward)
