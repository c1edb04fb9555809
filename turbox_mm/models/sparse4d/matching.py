"""Hungarian matching of many cost matrices with one device-to-host copy.

scipy's ``linear_sum_assignment`` runs on the host. Solving each decoder layer and sample on
its own costs one synchronising copy per matrix; :func:`solve_batched` instead takes every
matrix of a step as one padded tensor, copies it (and any small tensors that should come
along) in one transfer, solves each matrix on its valid columns, and sends the assignment back
as one index tensor without waiting for it (pinned memory, ``non_blocking``).
:func:`solve_on_device` gives the same pairs without the host: ``turbox_mm::lsap`` solves the
matrices where they are (scipy's algorithm, ties included), so the step does not wait.
:func:`group_pairs` cuts one group of matrices (e.g. the last decoder layer) out of that tensor
per matrix, without a wait: how many pairs each matrix got is known on the host.
"""
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from turbox_mm.utils.deferred_check import DeferredCheck
from turbox_mm.utils.upload import upload

#: What an infinite or NaN matching cost is replaced by before the solver sees it.
INVALID_COST = 1e8
#: The ``(row, column)`` long index tensors of one matrix's assignment.
Pairs = Tuple[Tensor, Tensor]


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
    _check_counts(num_cols)
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


def _check_counts(num_cols: Sequence[int]) -> None:
    """Raise ``ValueError`` unless ``num_cols`` holds one or more counts, none negative."""
    if len(num_cols) == 0 or min(int(c) for c in num_cols) < 0:
        raise ValueError(f'matching: num_cols must hold one or more counts >= 0, got '
                         f'{list(num_cols)}')


def solve_on_device(cost: Tensor, num_cols: Sequence[int]) -> Tensor:
    """:func:`solve_batched`'s pairs, solved on ``cost``'s device by ``turbox_mm::lsap``: no
    host read.

    The costs are taken in float64 with non-finite ones replaced by :data:`INVALID_COST`, as
    :func:`solve_batched` hands them to scipy, so the assignment is scipy's. The pairs are
    listed matrix by matrix, rows ascending, as :func:`solve_host` lists them; how many there
    are (``min(Q, num_cols[r])`` for matrix ``r``) is known on the host, so cutting them out
    of the per-row result needs no wait either.

    The first call on each device checks its pairs against :func:`solve_batched`'s (one
    host sync, once per process and device): a kernel that disagreed with scipy there would
    otherwise train on wrong matches without a sign.

    Args:
        cost (Tensor): ``[R, Q, N]`` costs (any float dtype).
        num_cols (Sequence[int]): Valid columns of each matrix, cycled over ``R``.

    Returns:
        Tensor: ``[3, K]`` int64 on ``cost``'s device: matrix, row and column of every
        assigned pair.

    Raises:
        RuntimeError: The first call's pairs differ from scipy's (names the device and the
            first differing matrix; ``matcher='host'`` avoids the kernel).

    Examples:
        >>> cost = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 5.0], [9.0, 9.0]]])
        >>> solve_on_device(cost, [2, 1]).tolist()  # as solve_host's example
        [[0, 0, 1], [0, 1, 0], [1, 0, 0]]
    """
    from turbox_mm.ops.lsap import linear_sum_assignment
    matrices, rows = cost.shape[:2]
    device = cost.device
    _check_counts(num_cols)
    # as solve_host slices: at most the tensor's columns
    cols = np.minimum(np.resize(np.asarray(num_cols, np.int64), matrices), cost.shape[2])
    count = int(np.minimum(cols, rows).sum())
    work = cost.detach().to(torch.float64)
    work = torch.where(torch.isfinite(work), work, INVALID_COST)
    column = linear_sum_assignment(work, None, upload(cols, device)).flatten()  # all rows
    # the assigned rows in (matrix, row) order: a stable sort puts them first
    flat = torch.sort((column < 0).to(torch.uint8), stable=True).indices[:count]
    pairs = torch.stack([flat // rows, flat % rows, column[flat]])
    if str(device) not in _CHECKED_DEVICES:
        _check_against_scipy(pairs, cost, num_cols)
        _CHECKED_DEVICES.add(str(device))
    return pairs


#: Devices whose first :func:`solve_on_device` call was checked against scipy.
_CHECKED_DEVICES = set()


def _check_against_scipy(pairs: Tensor, cost: Tensor, num_cols: Sequence[int]) -> None:
    """Raise unless ``pairs`` are :func:`solve_batched`'s pairs of the same costs."""
    want, _ = solve_batched(cost, num_cols)
    if pairs.shape == want.shape and torch.equal(pairs, want):
        return
    got = pairs.cpu()
    want = want.cpu()
    differ = [r for r in range(cost.shape[0])
              if not torch.equal(got[1:, got[0] == r], want[1:, want[0] == r])]
    raise RuntimeError(f'turbox_mm::lsap on {cost.device} assigned {got.shape[1]} pairs, '
                       f'scipy {want.shape[1]}; they differ first in matrix '
                       f'{differ[0] if differ else "?"} of {cost.shape[0]} '
                       f'({tuple(cost.shape[1:])} costs). Set the matcher to \'host\' to '
                       f'solve with scipy, and report this.')


#: Where the turbox heads solve their matchings: ``'host'`` (scipy after one transfer,
#: :func:`solve_batched`) or ``'device'`` (``turbox_mm::lsap``, :func:`solve_on_device`).
MATCHERS = ('host', 'device')


def matches_on_device(cost: Tensor, matcher: str = 'device') -> bool:
    """Whether :func:`solve_on_device` serves ``cost``: ``matcher`` is ``'device'`` and the
    op's kernel runs for it (a CUDA tensor, Triton importable, ``TURBOX_OPS_REFERENCE``
    unset); otherwise the host path, whose scipy solve is faster than the op's reference.

    Raises:
        ValueError: ``matcher`` is not one of :data:`MATCHERS`.
    """
    if check_matcher('matches_on_device', matcher, allow_none=False) == 'host':
        return False
    from turbox_mm.ops.lsap import fallback_reason
    return fallback_reason(cost) is None


def check_matcher(owner: str, matcher: Optional[str], allow_none: bool = True) -> Optional[str]:
    """``matcher`` if it is one of :data:`MATCHERS` (or None where ``allow_none``); else
    ``ValueError`` naming ``owner``."""
    if (matcher is None and allow_none) or matcher in MATCHERS:
        return matcher
    choices = "'host', 'device' or None" if allow_none else "'host' or 'device'"
    raise ValueError(f'{owner}: matcher must be {choices}, got {matcher!r}')


def solve_checked(cost: Tensor, num_cols: Sequence[int], bad: Tensor,
                  check: Callable[[Tensor], None], matcher: str,
                  deferred: DeferredCheck) -> Tensor:
    """:func:`solve_batched`'s pairs on ``matcher``'s side, with ``check`` run on a host copy
    of the device flags ``bad`` (it raises the caller's named error): at once after the host
    path's transfer, which carries the flags along; on the device path through ``deferred``,
    once they have arrived (no wait)."""
    if matches_on_device(cost, matcher):
        pairs = solve_on_device(cost, num_cols)
        deferred.push(bad, check)
        return pairs
    pairs, (bad, ) = solve_batched(cost, num_cols, extras=(bad, ))
    check(bad)
    return pairs


def no_pairs(device: Union[torch.device, str]) -> Pairs:
    """The assignment of a matrix without columns: two empty long tensors on ``device``."""
    empty = torch.zeros(0, dtype=torch.long, device=device)
    return empty, empty


def group_pairs(pairs: Tensor, num_rows: int, num_cols: Sequence[int], group: int = -1,
                num_groups: int = 1) -> List[Pairs]:
    """The ``(row, column)`` pairs of each matrix of one group, cut from
    :func:`solve_batched`'s result without reading it on the host.

    The matrices of :func:`solve_batched` come in ``num_groups`` groups of ``len(num_cols)``
    (e.g. layers of samples, layer-major). scipy assigns ``min(num_rows, num_cols[i])`` pairs
    to matrix ``i`` of a group, rows ascending, and :func:`solve_host` lists them matrix by
    matrix, so the slice of each matrix follows from the host-side counts.

    Args:
        pairs (Tensor): ``[3, K]`` (matrix, row, column) from :func:`solve_batched`.
        num_rows (int): Rows of every matrix (e.g. the queries).
        num_cols (Sequence[int]): Valid columns of the matrices of one group, as given to
            :func:`solve_batched`.
        group (int): Which group; negative counts from the end. Defaults to -1 (the last).
        num_groups (int): How many groups ``pairs`` holds. Defaults to 1.

    Returns:
        list[tuple[Tensor, Tensor]]: Per matrix of the group, the row and column index
        tensors (views of ``pairs``; :func:`no_pairs` for a matrix without columns).

    Raises:
        ValueError: ``group`` outside ``[-num_groups, num_groups)``.

    Examples:
        >>> cost = torch.tensor([[[1., 0.], [0., 1.]], [[0., 5.], [9., 9.]]])
        >>> pairs, _ = solve_batched(cost, [2, 1])  # one group of two matrices
        >>> [(r.tolist(), c.tolist()) for r, c in group_pairs(pairs, 2, [2, 1])]
        [([0, 1], [1, 0]), ([0], [0])]
        >>> [(r.tolist(), c.tolist()) for r, c in group_pairs(pairs, 2, [2], 1, 2)]
        [([0], [0])]
    """
    if not -num_groups <= group < num_groups:
        raise ValueError(f'group_pairs: group {group} outside [-{num_groups}, {num_groups})')
    counts = [min(num_rows, int(c)) for c in num_cols]
    start = (group % num_groups) * sum(counts)
    out = []
    for count in counts:
        if count == 0:
            out.append(no_pairs(pairs.device))
        else:
            out.append((pairs[1, start:start + count], pairs[2, start:start + count]))
        start += count
    return out
