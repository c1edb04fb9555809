"""The linear sum assignment in PyTorch: the specification of ``turbox_mm::lsap`` and its CPU
path.

What is solved: for each problem ``p`` of a padded batch ``cost [P, R, C]``, the block of its
first ``num_rows[p]`` rows and ``num_cols[p]`` columns gets a minimum-cost assignment of
``min(rows, cols)`` pairs, one per row or column, as scipy's ``linear_sum_assignment`` finds
it. The result is the **same assignment as scipy's**, ties included, not merely one of equal
cost: the algorithm below is the one scipy implements (the shortest augmenting path method
of Crouse, "On implementing 2D rectangular assignment algorithms", 2016; checked against
scipy 1.17's ``rectangular_lsap.cpp``, and tested against the installed scipy; older
releases subtracted the matrix minimum first, which breaks some ties differently), step for
step, in float64, with the same order of floating-point operations and the same choice among
equal path costs. So integer costs, or copies of one row, give scipy's pairs.

The algorithm, on a working matrix with no more rows than columns (the block itself, or its
transpose when it has more rows than columns, as scipy transposes):

- the rows are added one at a time; for each, a Dijkstra-like search over the columns grows
  shortest reduced-cost paths from the new row until it reaches a free column (the sink);
  the row potentials ``u`` and column potentials ``v`` keep every reduced cost
  ``cost - u - v`` non-negative;
- at each step the column of lowest path cost is taken next; among equal costs, the columns
  are visited in scipy's bookkeeping order of "remaining" columns (a list that starts as
  ``C-1, ..., 0`` and from which a taken column is removed by moving the last entry into its
  place), and a free column wins a tie: the last free one in that order if any column of
  lowest cost is free, else the first one;
- the potentials are updated and the assignment is flipped along the path.

This module keeps ``u`` per column (the potential of the row each column holds) rather than
per row, which needs no row-indexed state and gives the same numbers; the Triton kernel does
the same.

Outside scipy's contract: a problem whose block holds a non-finite cost is not solved (scipy
raises for NaN and -inf, and may fail for +inf); all its rows get -1, in the kernel as here,
because the kernel cannot raise without a host read. Callers replace non-finite costs first
(:func:`turbox_mm.models.sparse4d.matching.solve_on_device`). Sizes outside ``[0, R]`` and
``[0, C]`` are clamped into them.
"""
from typing import Tuple

import torch
from torch import Tensor

from .. import _common

OP = 'lsap'
#: The most rows or columns a problem may have: the kernel holds one row of the working matrix
#: in one block of registers.
MAX_SIZE = 16384


def check_inputs(cost: Tensor, num_rows: Tensor, num_cols: Tensor) -> None:
    """Raise ``ValueError`` unless ``cost`` is a float ``[P, R, C]`` tensor with ``R`` and
    ``C`` at most :data:`MAX_SIZE`, and ``num_rows`` and ``num_cols`` are integer ``[P]``
    tensors on its device (shapes, dtypes and devices only: no host read)."""
    if cost.dim() != 3:
        raise ValueError(f'{OP}: cost must be [problems, rows, cols], got shape '
                         f'{tuple(cost.shape)}')
    _common.check_float_dtypes(OP, cost=cost)
    _common.check_integer_dtypes(OP, num_rows=num_rows, num_cols=num_cols)
    problems = cost.shape[0]
    if tuple(num_rows.shape) != (problems, ) or tuple(num_cols.shape) != (problems, ):
        raise ValueError(f'{OP}: num_rows and num_cols must be [{problems}] (one per problem of '
                         f'cost {tuple(cost.shape)}), got {tuple(num_rows.shape)} and '
                         f'{tuple(num_cols.shape)}')
    if max(cost.shape[1], cost.shape[2]) > MAX_SIZE:
        raise ValueError(f'{OP}: at most {MAX_SIZE} rows and columns a problem, got cost '
                         f'{tuple(cost.shape)}')
    _common.check_one_device(OP, cost=cost, num_rows=num_rows, num_cols=num_cols)


def _pick(lowest_cost: Tensor, remaining: Tensor, position: Tensor, free: Tensor) -> int:
    """The column scipy takes next: among the remaining columns of lowest path cost, the free
    one latest in the remaining list if any is free, else the earliest one."""
    tied = remaining & lowest_cost
    free_tied = tied & free
    if bool(free_tied.any()):
        return int(torch.where(free_tied, position, -1).argmax())
    return int(torch.where(tied, position, position.numel()).argmin())


def solve_one(work: Tensor) -> Tensor:
    """scipy's assignment of one float64 working matrix ``[rows, cols]`` with
    ``rows <= cols``, all costs finite.

    Returns:
        Tensor: ``[cols]`` int64, the working row each column is assigned to, -1 for free
        columns.
    """
    rows, cols = work.shape
    index = torch.arange(cols)
    v = torch.zeros(cols, dtype=torch.float64)
    u_of_col = torch.zeros(cols, dtype=torch.float64)  # u of the row that holds the column
    row_of_col = torch.full((cols, ), -1, dtype=torch.long)
    path = torch.full((cols, ), -1, dtype=torch.long)
    for current in range(rows):
        path_cost = torch.full((cols, ), float('inf'), dtype=torch.float64)
        taken = torch.zeros(cols, dtype=torch.bool)
        position = cols - 1 - index  # scipy's "remaining" list starts as cols-1, ..., 0
        left = cols
        min_val = torch.zeros((), dtype=torch.float64)
        row, u_row, sink = current, torch.zeros((), dtype=torch.float64), -1
        while sink < 0:
            reduced = min_val + work[row] - u_row - v  # scipy's order of operations
            better = ~taken & (reduced < path_cost)
            path = torch.where(better, row, path)
            path_cost = torch.where(better, reduced, path_cost)
            lowest = torch.where(taken, float('inf'), path_cost).min()
            col = _pick(path_cost == lowest, ~taken, position, row_of_col < 0)
            min_val = lowest
            # remove col from the remaining list: the last entry takes its place
            position = torch.where(~taken & (position == left - 1), position[col], position)
            taken[col] = True
            left -= 1
            if row_of_col[col] < 0:
                sink = col
            else:
                row, u_row = int(row_of_col[col]), u_of_col[col]
        # potentials: the new row, every row reached (through the column it holds), the
        # columns taken
        u_current = min_val  # 0 + min_val: the new row's u was 0
        held = taken & (row_of_col >= 0)
        u_of_col = torch.where(held, u_of_col + (min_val - path_cost), u_of_col)
        v = torch.where(taken, v - (min_val - path_cost), v)
        # flip the path from the sink back to the new row; each row moves to the column it
        # was reached from, taking its potential along
        col = sink
        while True:
            row = int(path[col])
            was = int(torch.nonzero(row_of_col == row).flatten()[0]) if row != current else -1
            u_row = u_current if row == current else u_of_col[was]
            row_of_col[col] = row
            u_of_col[col] = u_row
            if row == current:
                break
            col = was
    return row_of_col


def problem_sizes(cost: Tensor, num_rows: Tensor, num_cols: Tensor) -> Tuple[list, list]:
    """Host lists of each problem's rows and columns, clamped into ``cost``'s shape (a host
    read: the reference's business only)."""
    rows = num_rows.cpu().clamp(0, cost.shape[1]).tolist()
    cols = num_cols.cpu().clamp(0, cost.shape[2]).tolist()
    return rows, cols


def lsap_reference(cost: Tensor, num_rows: Tensor, num_cols: Tensor) -> Tensor:
    """scipy's ``linear_sum_assignment`` of every problem of a padded batch.

    Args:
        cost (Tensor): ``[P, R, C]`` float costs (any float dtype; solved in float64).
        num_rows (Tensor): ``[P]`` integer, the rows of each problem (its first rows).
        num_cols (Tensor): ``[P]`` integer, the columns of each problem (its first columns).

    Returns:
        Tensor: ``[P, R]`` int64 on ``cost``'s device: the column assigned to each row, -1
        for a row without one (a padded row, a row left over where a problem has more rows
        than columns, every row of a problem with a non-finite cost).

    Examples:
        >>> cost = torch.tensor([[[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]]])
        >>> lsap_reference(cost, torch.tensor([3]), torch.tensor([3])).tolist()
        [[1, 0, 2]]
        >>> lsap_reference(cost, torch.tensor([3]), torch.tensor([1])).tolist()  # column 0
        [[-1, 0, -1]]
    """
    check_inputs(cost, num_rows, num_cols)
    out = torch.full(cost.shape[:2], -1, dtype=torch.long)
    rows, cols = problem_sizes(cost, num_rows, num_cols)
    host = cost.detach().cpu().double()
    for p, (r, c) in enumerate(zip(rows, cols)):
        block = host[p, :r, :c]
        if r == 0 or c == 0 or not bool(torch.isfinite(block).all()):
            continue
        transposed = c < r
        held = solve_one(block.t() if transposed else block)
        assigned = torch.nonzero(held >= 0).flatten()
        if transposed:  # working columns are the rows
            out[p, assigned] = held[assigned]
        else:
            out[p, held[assigned]] = assigned
    return out.to(cost.device)
