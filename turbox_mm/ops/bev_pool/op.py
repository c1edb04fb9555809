"""``torch.ops.turbox_mm.bev_pool`` and ``bev_pool_backward``: the ops, fakes and autograd.

- ``turbox_mm::bev_pool(depth, feats, geom, lower, cell_size, grid, depth_logits) -> [B, X, Y,
  Z * C]`` (see :mod:`.reference`);
- ``turbox_mm::bev_pool_backward(grad, depth, feats, geom, ...) -> (grad_depth, grad_feats)``,
  registered as the first op's backward, so that ``torch.compile`` traces both (fakes give the
  shapes). ``geom`` has no gradient (upstream's has none either: it is built from the camera
  matrices).

Both are ``torch.library`` ops (:func:`turbox_mm.ops._common.define_op`), not ``custom_op``,
for the host time per call.

CUDA tensors with Triton run :mod:`.triton_kernels`; anything else (CPU tensors, no Triton,
``TURBOX_OPS_REFERENCE=1``) runs :mod:`.reference` and warns once.
"""
from typing import List, Tuple

import torch
from torch import Tensor

from .. import _common, dispatch
from .reference import bev_pool_reference, cell_indices, check_inputs

try:
    from . import triton_kernels
except ImportError:  # no Triton: the reference serves every device
    triton_kernels = None


_dispatch = dispatch.OpDispatch('bev_pool', triton_kernels,
                                'the [B, N, D, H, W, C] product and index_add')
#: Why the ops would run the reference for a tensor rather than the kernel; None if not.
fallback_reason = _dispatch.fallback_reason


def _forward(depth: Tensor, feats: Tensor, geom: Tensor, lower: List[float],
             cell_size: List[float], grid: List[int], depth_logits: bool) -> Tensor:
    """Pool lifted camera features into BEV cells: ``[B, X, Y, Z * C]``."""
    check_inputs(depth, feats, geom, lower, cell_size, grid)
    if _dispatch.use_kernel(depth):
        return triton_kernels.bev_pool_forward(depth, feats, geom, lower, cell_size, grid,
                                               depth_logits)
    return bev_pool_reference(depth, feats, geom, lower, cell_size, grid, depth_logits)


def _forward_fake(depth, feats, geom, lower, cell_size, grid, depth_logits):
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


def _backward(grad: Tensor, depth: Tensor, feats: Tensor, geom: Tensor, lower: List[float],
              cell_size: List[float], grid: List[int],
              depth_logits: bool) -> Tuple[Tensor, Tensor]:
    """``(grad_depth, grad_feats)`` of :func:`bev_pool_op`."""
    if _dispatch.use_kernel(depth):
        return triton_kernels.bev_pool_backward(grad, depth, feats, geom, lower, cell_size,
                                                grid, depth_logits)
    return bev_pool_backward_reference(grad, depth, feats, geom, lower, cell_size, grid,
                                       depth_logits)


def _backward_fake(grad, depth, feats, geom, lower, cell_size, grid, depth_logits):
    return (depth.new_empty(depth.shape), feats.new_empty(feats.shape))


bev_pool_op = _common.define_op('bev_pool', _forward, _forward_fake)
bev_pool_backward_op = _common.define_op('bev_pool_backward', _backward, _backward_fake)
# depth and feats; geom (the first three inputs are the tensors) gets none.
_common.register_autograd(bev_pool_op, bev_pool_backward_op, (0, 1), num_tensors=3)
