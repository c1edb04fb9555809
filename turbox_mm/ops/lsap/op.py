"""``torch.ops.turbox_mm.lsap``: the op and its fake.

``turbox_mm::lsap(cost, num_rows, num_cols) -> [P, R]`` int64, the column assigned to each
row (see :mod:`.reference`). No autograd: the output is an index.

CUDA tensors with Triton run :mod:`.triton_kernels`; anything else runs :mod:`.reference`
and warns once (:mod:`turbox_mm.ops.dispatch`).
"""
import torch
from torch import Tensor

from .. import _common, dispatch
from .reference import check_inputs, lsap_reference

try:
    from . import triton_kernels
except ImportError:  # no Triton: the reference serves every device
    triton_kernels = None

_dispatch = dispatch.OpDispatch('lsap', triton_kernels, "scipy's algorithm step by step")
#: Why the op would run the reference for a tensor rather than the kernel; None if not.
fallback_reason = _dispatch.fallback_reason


def _lsap(cost: Tensor, num_rows: Tensor, num_cols: Tensor) -> Tensor:
    """The column of each row ``[P, R]``, -1 where none."""
    check_inputs(cost, num_rows, num_cols)
    if _dispatch.use_kernel(cost):
        return triton_kernels.lsap(cost, num_rows, num_cols)
    return lsap_reference(cost, num_rows, num_cols)


def _lsap_fake(cost, num_rows, num_cols):
    check_inputs(cost, num_rows, num_cols)
    return cost.new_empty(cost.shape[:2], dtype=torch.long)


lsap_op = _common.define_op('lsap', _lsap, _lsap_fake)
