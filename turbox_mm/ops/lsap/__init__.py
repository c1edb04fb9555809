"""Linear sum assignment (the Hungarian matching of DETR-style heads) on the device.

- :mod:`.reference`: scipy's algorithm step by step in PyTorch: the specification and the CPU
  path.
- :mod:`.triton_kernels`: one program per problem, float64, the same steps.
- :mod:`.op`: ``torch.ops.turbox_mm.lsap`` with its fake.

The assignment equals scipy's ``linear_sum_assignment`` (ties included) for finite costs, and
stays on the device: a training step that matches on the GPU has no host read for it, where
scipy needs the cost matrices on the host (a sync a step, with the GPU idle until the host has
solved them).
"""
from typing import Optional

import torch
from torch import Tensor

from .op import fallback_reason, lsap_op
from .reference import MAX_SIZE, check_inputs, lsap_reference

__all__ = ['linear_sum_assignment', 'lsap_op', 'lsap_reference', 'check_inputs',
           'fallback_reason', 'MAX_SIZE']


def linear_sum_assignment(cost: Tensor, num_rows: Optional[Tensor] = None,
                          num_cols: Optional[Tensor] = None) -> Tensor:
    """scipy's ``linear_sum_assignment`` of each problem of a padded batch, as a column per row.

    Args:
        cost (Tensor): ``[P, R, C]`` float costs, any strides (solved in float64). Every cost
            of a problem's block must be finite; a problem with a non-finite cost is not
            solved (all its rows -1).
        num_rows (Tensor, optional): ``[P]`` integer rows of each problem (its first rows), on
            ``cost``'s device. Defaults to ``R`` for all.
        num_cols (Tensor, optional): ``[P]`` integer columns of each problem (its first
            columns). Defaults to ``C`` for all.

    Returns:
        Tensor: ``[P, R]`` int64 on ``cost``'s device: the column of each row, -1 for rows
        without one. Problem ``p`` assigns ``min(num_rows[p], num_cols[p])`` rows.

    Examples:
        >>> cost = torch.tensor([[[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]]])
        >>> linear_sum_assignment(cost).tolist()  # scipy: rows 0, 1, 2 to columns 1, 0, 2
        [[1, 0, 2]]
    """
    problems = cost.shape[0] if cost.dim() == 3 else 0
    if num_rows is None:
        num_rows = torch.full((problems, ), cost.shape[1] if cost.dim() == 3 else 0,
                              dtype=torch.long, device=cost.device)
    if num_cols is None:
        num_cols = torch.full((problems, ), cost.shape[2] if cost.dim() == 3 else 0,
                              dtype=torch.long, device=cost.device)
    return lsap_op(cost, num_rows, num_cols)
