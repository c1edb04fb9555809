"""Hungarian matching of many cost matrices with one device-to-host copy.

scipy's ``linear_sum_assignment`` runs on the host. Solving each decoder layer and sample on
its own costs one synchronising copy per matrix; :func:`solve_batched` instead takes every
matrix of a step as one padded tensor, copies it (and any small tensors that should come
along) in one transfer, solves each matrix on its valid columns, and sends the assignment back
as one index tensor without waiting for it (pinned memory, ``non_blocking``).
"""
from typing import List, Sequence, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from turbox_mm.utils.upload import upload

#: What an infinite or NaN matching cost is replaced by before the solver sees it.
INVALID_COST = 1e8


def solve(cost: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """scipy's assignment of one ``[rows, cols]`` float64 matrix; non-finite costs become
    :data:`INVALID_COST`."""
    return linear_sum_assignment(np.where(np.isfinite(cost), cost, INVALID_COST))


def solve_host(cost: np.ndarray, num_cols: Sequence[int]) -> np.ndarray:
    """The host half of :func:`solve_batched`: ``[3, K]`` int64 (matrix, row, column) of every
    assigned pair of ``[R, Q, N]`` float64 host costs, matrix ``r`` on its first
    ``num_cols[r % len(num_cols)]`` columns.

    Examples:
        >>> cost = np.array([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 5.0], [9.0, 9.0]]])
        >>> solve_host(cost, [2, 1]).tolist()  # matrix 1 keeps only its first column
        [[0, 0, 1], [0, 1, 0], [1, 0, 0]]
    """
    found = []
    for r in range(cost.shape[0]):
        cols = int(num_cols[r % len(num_cols)])
        if cols == 0:
            continue
        rows, picked = solve(cost[r, :, :cols])
        found.append(np.stack([np.full_like(rows, r), rows, picked]).astype(np.int64))
    return np.concatenate(found, 1) if found else np.zeros((3, 0), np.int64)


def solve_batched(cost: Tensor, num_cols: Sequence[int],
                  extras: Sequence[Tensor] = ()) -> Tuple[Tensor, List[Tensor]]:
    """Assign the rows of ``R`` cost matrices to their first ``num_cols[r % len(num_cols)]``
    columns, one transfer for all.

    Args:
        cost (Tensor): ``[R, Q, N]`` costs (any float dtype; solved in float64, as the
            per-matrix path did with ``.double()``).
        num_cols (Sequence[int]): Valid columns of each matrix, cycled over ``R`` (e.g. the
            ground truths of each sample, for ``R = layers x samples`` in layer-major order).
        extras (Sequence[Tensor]): Small tensors to bring to the host in the same transfer
            (e.g. validity flags to check before the result is used).

    Returns:
        tuple: ``[3, K]`` int64 on ``cost``'s device: matrix, row and column of every
        assigned pair (matrix-major), and ``extras`` on the host.
    """
    device = cost.device
    extras_host = [e.detach().to('cpu', non_blocking=device.type == 'cuda') for e in extras]
    host = cost.detach().to('cpu', torch.float64).numpy()  # the one sync
    return upload(solve_host(host, num_cols), device), extras_host
