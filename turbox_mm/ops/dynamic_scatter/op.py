"""``torch.ops.turbox_mm.dynamic_scatter``: the op, its fake, its autograd and the dispatch.

``turbox_mm::dynamic_scatter(feats, coors, reduce_type) -> (voxel_feats [M, C], voxel_coors
[M, D], point2voxel [N], counts [M], argmax [M or 0, C])``, a ``torch.library.custom_op``
whose fake returns an unbacked voxel count, so that ``torch.compile`` traces through it. The
backward (:func:`.reference.dynamic_scatter_backward`) is torch ops, registered with
``register_autograd``; only ``feats`` has a gradient.

CUDA tensors with Triton run :mod:`.triton_kernels`; anything else (CPU tensors, no Triton,
``TURBOX_OPS_REFERENCE=1``) runs :mod:`.reference` and warns once (:mod:`turbox_mm.ops.dispatch`).
A coordinate too large for the kernel's packed keys (over 32767 with four columns, over about
10^6 with three) runs the reference too, with a warning.
"""
import warnings
from typing import Tuple

import torch
from torch import Tensor

from .. import dispatch
from .reference import check_inputs, dynamic_scatter_backward, dynamic_scatter_reference

try:
    from . import triton_kernels
except ImportError:  # no Triton: the reference serves every device
    triton_kernels = None


_dispatch = dispatch.OpDispatch('dynamic_scatter', triton_kernels, 'torch.unique')
#: Why the op would run the reference for a tensor rather than the kernel; None if not (the
#: op's two further conditions, no points or a coordinate too large, are checked in the op).
fallback_reason = _dispatch.fallback_reason


@torch.library.custom_op('turbox_mm::dynamic_scatter', mutates_args=())
def dynamic_scatter_op(feats: Tensor, coors: Tensor,
                       reduce_type: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Reduce point features into voxels (see :mod:`.reference`)."""
    check_inputs(feats, coors, reduce_type)
    if feats.shape[0] and _dispatch.use_kernel(feats):
        result = triton_kernels.dynamic_scatter(feats, coors, reduce_type)
        if result is not None:
            return result
        warnings.warn('turbox_mm.ops.dynamic_scatter: a coordinate is too large for the '
                      "kernel's packed keys (over 32767 with four columns, about 10^6 with "
                      'three); such calls run the PyTorch reference (torch.unique).')
    return dynamic_scatter_reference(feats, coors, reduce_type)


@dynamic_scatter_op.register_fake
def _(feats, coors, reduce_type):
    check_inputs(feats, coors, reduce_type)
    voxels = torch.library.get_ctx().new_dynamic_size()
    channels = feats.shape[1]
    return (feats.new_empty(voxels, channels), coors.new_empty(voxels, coors.shape[1]),
            feats.new_empty(feats.shape[0], dtype=torch.int64),
            feats.new_empty(voxels, dtype=torch.int32),
            feats.new_empty(voxels if reduce_type == 'max' else 0, channels, dtype=torch.int64))


def _setup_context(ctx, inputs, output) -> None:
    feats, _, reduce_type = inputs
    _, _, point2voxel, counts, argmax = output
    ctx.num, ctx.reduce_type = feats.shape[0], reduce_type
    ctx.save_for_backward(point2voxel, counts, argmax)


def _backward(ctx, grad_feats, *_):
    point2voxel, counts, argmax = ctx.saved_tensors
    grad = dynamic_scatter_backward(grad_feats.contiguous(), ctx.num, point2voxel, counts,
                                    argmax, ctx.reduce_type)
    return grad, None, None


dynamic_scatter_op.register_autograd(_backward, setup_context=_setup_context)
