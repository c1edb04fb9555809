"""Triton kernel of the linear sum assignment (spec: :mod:`.reference`).

One program per problem, the working matrix's columns across the program's lanes (a block of
``BLOCK >= max(R, C)``): every per-column quantity of scipy's algorithm (path costs, column
potentials, the potential of the row each column holds, the row it holds, the path, the
position in scipy's "remaining" list) lives in registers, and every scalar step (the next
column, the row it leads to, a step of the path flip) is a reduction over the block. Rows are
read from the cost tensor as the search reaches them, by strides, so a transposed working
matrix costs nothing. All arithmetic is float64 in scipy's order of operations, so the
assignment equals scipy's bit for bit (ties included).

Problems run in parallel, one per streaming multiprocessor; within a problem the work is the
sequential algorithm's, a few reductions per search step. A batch of a training step (tens of
problems of up to ~1000 columns) takes on the order of a millisecond and, above all, needs no
host: the assignment stays on the device.
"""
import contextlib

import torch
import triton
import triton.language as tl

from .._triton_launch import next_power_of_2

_INF = tl.constexpr(float('inf'))


@triton.jit
def _take(values, lanes, at):
    """``values[at]`` of a block, as a scalar (a masked sum: one lane is non-zero)."""
    return tl.sum(tl.where(lanes == at, values, tl.zeros_like(values)), axis=0)


@triton.jit(do_not_specialize=['R', 'C', 's_p', 's_r', 's_c', 'so_p'])
def _lsap_kernel(cost_ptr, rows_ptr, cols_ptr, out_ptr, R, C, s_p, s_r, s_c, so_p,
                 BLOCK: tl.constexpr):
    p = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    # clamped in the sizes' own dtype (int64 sizes beyond int32 must not wrap), then narrowed
    num_rows = tl.minimum(tl.maximum(tl.load(rows_ptr + p), 0), R).to(tl.int32)
    num_cols = tl.minimum(tl.maximum(tl.load(cols_ptr + p), 0), C).to(tl.int32)
    transposed = num_cols < num_rows
    work_rows = tl.minimum(num_rows, num_cols)
    work_cols = tl.maximum(num_rows, num_cols)
    stride_row = tl.where(transposed, s_c, s_r).to(tl.int64)
    stride_col = tl.where(transposed, s_r, s_c).to(tl.int64)
    base = cost_ptr + p.to(tl.int64) * s_p
    live = lanes < work_cols
    col_offset = lanes.to(tl.int64) * stride_col
    # every row -1 first (rows without a column keep it)
    out = out_ptr + p.to(tl.int64) * so_p
    for start in range(0, R, BLOCK):
        tl.store(out + start + lanes, tl.full((BLOCK, ), -1, tl.int64), mask=start + lanes < R)
    # a non-finite cost anywhere in the block: the problem is not solved
    bad = tl.zeros((BLOCK, ), tl.int32)
    for i in range(0, work_rows):
        c = tl.load(base + i * stride_row + col_offset, mask=live, other=0.0).to(tl.float64)
        bad += (~(tl.abs(c) < _INF)).to(tl.int32)  # NaN or +-inf
    solve_rows = tl.where(tl.sum(bad, axis=0) == 0, work_rows, 0)

    inf = tl.full((BLOCK, ), _INF, tl.float64)
    zero = tl.zeros((BLOCK, ), tl.float64)
    v = zero
    u_of_col = zero
    row_of_col = tl.full((BLOCK, ), -1, tl.int32)
    path = tl.full((BLOCK, ), -1, tl.int32)
    for current in range(0, solve_rows):
        path_cost = inf
        taken = lanes >= work_cols  # padding lanes count as taken: never candidates
        position = work_cols - 1 - lanes
        left = work_cols
        min_val = tl.zeros((), tl.float64)
        row = current
        u_row = tl.zeros((), tl.float64)
        sink = tl.full((), -1, tl.int32)
        while sink < 0:
            c = tl.load(base + row * stride_row + col_offset, mask=live, other=0.0)
            reduced = min_val + c.to(tl.float64) - u_row - v
            better = (~taken) & (reduced < path_cost)
            path = tl.where(better, row, path)
            path_cost = tl.where(better, reduced, path_cost)
            lowest = tl.min(tl.where(taken, inf, path_cost), axis=0)
            tied = (~taken) & (path_cost == lowest)
            # position and lane in one key: one reduction picks the column and its position
            key = position * BLOCK + lanes
            last_free = tl.max(tl.where(tied & (row_of_col < 0), key, -1), axis=0)
            first_tied = tl.min(tl.where(tied, key, BLOCK * BLOCK), axis=0)
            found_free = last_free >= 0
            chosen_key = tl.where(found_free, last_free, first_tied)
            col = chosen_key % BLOCK
            chosen = chosen_key // BLOCK
            min_val = lowest
            position = tl.where((~taken) & (position == left - 1), chosen, position)
            taken = taken | (lanes == col)
            left -= 1
            if found_free:
                sink = col
            else:  # a held column: go on from the row that holds it
                row = _take(row_of_col, lanes, col)
                u_row = _take(u_of_col, lanes, col)
        u_current = min_val
        real = lanes < work_cols
        step = min_val - path_cost
        u_of_col = tl.where(taken & real & (row_of_col >= 0), u_of_col + step, u_of_col)
        v = tl.where(taken & real, v - step, v)
        col = sink
        done = tl.zeros((), tl.int32)
        while done == 0:
            row = _take(path, lanes, col)
            at_current = row == current
            was = tl.sum(tl.where(row_of_col == row, lanes, 0), axis=0)
            u_row = tl.where(at_current, u_current, _take(u_of_col, lanes, was))
            row_of_col = tl.where(lanes == col, row, row_of_col)
            u_of_col = tl.where(lanes == col, u_row, u_of_col)
            col = was
            done = at_current.to(tl.int32)
    tl.debug_barrier()  # the -1 fill above is done before the assignment is written
    held = live & (row_of_col >= 0)
    target = tl.where(transposed, lanes, row_of_col)
    value = tl.where(transposed, row_of_col, lanes)
    tl.store(out + target, value.to(tl.int64), mask=held)


def lsap(cost: torch.Tensor, num_rows: torch.Tensor, num_cols: torch.Tensor) -> torch.Tensor:
    """The kernel's launch: ``[P, R]`` int64, the column of each row or -1 (see
    :func:`.reference.lsap_reference`)."""
    problems, rows, cols = cost.shape
    out = torch.empty((problems, rows), dtype=torch.long, device=cost.device)
    if problems == 0 or rows == 0:
        return out
    block = max(next_power_of_2(max(rows, cols)), 16)
    num_rows, num_cols = num_rows.contiguous(), num_cols.contiguous()  # read at p, not by stride
    # Triton launches on the current device: make it the tensors' one
    guard = torch.cuda.device(cost.device) if cost.is_cuda else contextlib.nullcontext()
    with guard:
        _lsap_kernel[(problems, )](cost, num_rows, num_cols, out, rows, cols, cost.stride(0),
                                   cost.stride(1), cost.stride(2), out.stride(0), BLOCK=block,
                                   num_warps=4 if block <= 1024 else 8)
    return out
