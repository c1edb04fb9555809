"""``torch.ops.turbox_mm.bev_pool`` and ``bev_pool_backward``: the ops, fakes and autograd.

- ``turbox_mm::bev_pool(depth, feats, geom, lower, cell_size, grid, depth_logits) -> [B, X, Y,
  Z * C]`` (see :mod:`.reference`);
- ``turbox_mm::bev_pool_backward(grad, depth, feats, geom, ...) -> (grad_depth, grad_feats)``,
  registered as the first op's backward, so that ``torch.compile`` traces both (fakes give the
  shapes). ``geom`` has no gradient (upstream's has none either: it is built from the camera
  matrices).

CUDA tensors with Triton run :mod:`.triton_kernels`; anything else (CPU tensors, no Triton,
``TURBOX_OPS_REFERENCE=1``) runs :mod:`.reference` and warns once.
"""
from typing import List, Tuple

import torch
from torch import Tensor

from .. import dispatch
from .reference import bev_pool_reference, cell_indices, check_inputs

try:
    from . import triton_kernels
except ImportError:  # no Triton: the reference serves every device
    triton_kernels = None


_dispatch = dispatch.OpDispatch('bev_pool', triton_kernels,
                                'the [B, N, D, H, W, C] product and index_add')
#: Why the ops would run the reference for a tensor rather than the kernel; None if not.
fallback_reason = _dispatch.fallback_reason


@torch.library.custom_op('turbox_mm::bev_pool', mutates_args=())
def bev_pool_op(depth: Tensor, feats: Tensor, geom: Tensor, lower: List[float],
                cell_size: List[float], grid: List[int], depth_logits: bool) -> Tensor:
    """Pool lifted camera features into BEV cells: ``[B, X, Y, Z * C]``."""
    check_inputs(depth, feats, geom, lower, cell_size, grid)
    if _dispatch.use_kernel(depth):
        return triton_kernels.bev_pool_forward(depth, feats, geom, lower, cell_size, grid,
                                               depth_logits)
    return bev_pool_reference(depth, feats, geom, lower, cell_size, grid, depth_logits)


@bev_pool_op.register_fake
def _(depth, feats, geom, lower, cell_size, grid, depth_logits):
    check_inputs(depth, feats, geom, lower, cell_size, grid)
    x_cells, y_cells, z_cells = (int(g) for g in grid)
    return feats.new_empty(depth.shape[0], x_cells, y_cells, z_cells * feats.shape[2])


def bev_pool_backward_reference(grad: Tensor, depth: Tensor, feats: Tensor, geom: Tensor,
                                lower, cell_size, grid, depth_logits: bool
                                ) -> Tuple[Tensor, Tensor]:
    """The gradients in torch ops: each point gathers its cell's output gradient."""
    channels = feats.shape[2]
    if channels == 0 or depth.numel() == 0:  # nothing was pooled
        return torch.zeros_like(depth), torch.zeros_like(
            feats, memory_format=torch.contiguous_format)
    cells, kept = cell_indices(geom, lower, cell_size, grid)
    rows = grad.reshape(-1, channels).float()
    point_grad = torch.where(kept[..., None], rows[torch.where(kept, cells, 0)], 0.0)
    feat_last = feats.float().permute(0, 1, 3, 4, 2).unsqueeze(2)  # [B, N, 1, H, W, C]
    prob = depth.float().softmax(2) if depth_logits else depth.float()
    grad_prob = (point_grad * feat_last).sum(-1)  # [B, N, D, H, W]
    grad_feats = (point_grad * prob.unsqueeze(-1)).sum(2).permute(0, 1, 4, 2, 3)
    if depth_logits:
        grad_prob = prob * (grad_prob - (prob * grad_prob).sum(2, keepdim=True))
    return grad_prob.to(depth.dtype), grad_feats.to(feats.dtype).contiguous()


@torch.library.custom_op('turbox_mm::bev_pool_backward', mutates_args=())
def bev_pool_backward_op(grad: Tensor, depth: Tensor, feats: Tensor, geom: Tensor,
                         lower: List[float], cell_size: List[float], grid: List[int],
                         depth_logits: bool) -> Tuple[Tensor, Tensor]:
    """``(grad_depth, grad_feats)`` of :func:`bev_pool_op`."""
    if _dispatch.use_kernel(depth):
        return triton_kernels.bev_pool_backward(grad, depth, feats, geom, lower, cell_size,
                                                grid, depth_logits)
    return bev_pool_backward_reference(grad, depth, feats, geom, lower, cell_size, grid,
                                       depth_logits)


@bev_pool_backward_op.register_fake
def _(grad, depth, feats, geom, lower, cell_size, grid, depth_logits):
    return (depth.new_empty(depth.shape), feats.new_empty(feats.shape))


def _setup_context(ctx, inputs, output) -> None:
    depth, feats, geom, lower, cell_size, grid, depth_logits = inputs
    ctx.save_for_backward(depth, feats, geom)
    ctx.args = (lower, cell_size, grid, depth_logits)


def _backward(ctx, grad):
    depth, feats, geom = ctx.saved_tensors
    grad_depth, grad_feats = bev_pool_backward_op(grad, depth, feats, geom, *ctx.args)
    return grad_depth, grad_feats, None, None, None, None, None


bev_pool_op.register_autograd(_backward, setup_context=_setup_context)
