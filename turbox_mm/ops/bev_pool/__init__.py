"""BEV pooling (lift-splat): camera features lifted along depth bins, summed into BEV cells.

- :mod:`.reference`: the specification in plain PyTorch (the ``bev_pool`` of mmdet3d 1.4's
  ``projects/BEVFusion`` with the depth x feature product made inside) and the CPU path.
- :mod:`.triton_kernels`: a forward and a backward kernel over tiles of image rows and pixels
  (every bin, or blocks of bins), the product never stored, the depth softmax fused
  (``depth_logits``; its backward a third kernel); atomic sums, so the last bits of a cell's
  value and of the feature gradient may vary between runs.
- :mod:`.op`: ``torch.ops.turbox_mm.bev_pool`` / ``bev_pool_backward`` with fakes and
  autograd.
"""
from typing import Sequence

from torch import Tensor

from .op import bev_pool_backward_reference, bev_pool_op, fallback_reason
from .reference import bev_pool_reference, cell_indices, check_inputs

__all__ = ['bev_pool', 'bev_pool_op', 'bev_pool_reference', 'bev_pool_backward_reference',
           'cell_indices', 'check_inputs', 'fallback_reason']


def bev_pool(depth: Tensor, feats: Tensor, geom: Tensor, lower: Sequence[float],
             cell_size: Sequence[float], grid: Sequence[int],
             depth_logits: bool = False) -> Tensor:
    """Sum the lifted camera features of each BEV cell.

    Args:
        depth (Tensor): ``[B, N, D, H, W]`` depth probabilities (logits with
            ``depth_logits``), any strides (a channel slice of the depth net's output works).
        feats (Tensor): ``[B, N, C, H, W]`` context features, any strides.
        geom (Tensor): ``[B, N, D, H, W, 3]`` each point's (x, y, z).
        lower (Sequence[float]): The grid's lower bound (x, y, z).
        cell_size (Sequence[float]): The cell size (x, y, z).
        grid (Sequence[int]): Cells along x, y, z.
        depth_logits (bool): Softmax ``depth`` over the bins inside the op. Defaults to False.

    Returns:
        Tensor: ``[B, Z * C, X, Y]``, channel ``z * C + c``, channels-last memory.

    Examples:
        >>> import torch
        >>> depth = torch.ones(1, 1, 2, 1, 1)  # two bins of one pixel
        >>> feats = torch.tensor([1.0, 10.0]).view(1, 1, 2, 1, 1)
        >>> geom = torch.tensor([[0.5, 0.5, 0.5], [0.6, 0.2, 0.1]]).view(1, 1, 2, 1, 1, 3)
        >>> bev_pool(depth, feats, geom, [0, 0, 0], [1, 1, 1], [2, 2, 1]).flatten().tolist()
        [2.0, 0.0, 0.0, 0.0, 20.0, 0.0, 0.0, 0.0]
    """
    lower = [float(v) for v in lower]
    cell_size = [float(v) for v in cell_size]
    grid = [int(g) for g in grid]
    return bev_pool_op(depth, feats, geom, lower, cell_size, grid,
                       bool(depth_logits)).permute(0, 3, 1, 2)
