"""Micro benchmark: the Hungarian matching of a training step, scipy on the host against
``turbox_mm::lsap`` on the device.

Stock is :func:`turbox_mm.models.sparse4d.matching.solve_batched`, the path every turbox head
took so far: all cost matrices of a step copied to the host in one transfer (the step's one
sync: the host waits for the GPU to finish everything queued before), scipy's
``linear_sum_assignment`` per matrix, the pairs uploaded without a wait. Upstream heads do
worse: one transfer per matrix. Turbox is :func:`~turbox_mm.models.sparse4d.matching.
solve_on_device`: the same pairs (checked, the note says so), no host read.

Sizes: Sparse4D v3's one-to-one matching (6 decoder layers x 6 samples, 900 queries, 40
boxes) and MapTR v2's one-to-many matching (6 layers x 4 samples, 300 queries against 6
copies of 30 map instances). CUDA events time the device's span of each call, so the stock
row includes the host's solve (the GPU idles through it) and the transfers. On the CPU the
rows are not timed.
"""
from typing import Dict, List

import numpy as np
import torch

from turbox_mm.benchmark.timing import benchmark_device, time_fn

CASES = {'Sparse4D one-to-one (36 x 900 x 40)': (36, 900, 40),
         'MapTR v2 one-to-many (24 x 300 x 180)': (24, 300, 180)}
QUICK_CASES = {'quick (4 x 12 x 5)': (4, 12, 5)}


def _costs(matrices: int, rows: int, cols: int, device: torch.device):
    """Focal-style class costs plus L1 box costs: random, no exact ties; per matrix a column
    count between half and all of ``cols`` (samples differ in their ground truths)."""
    gen = torch.Generator().manual_seed(0)
    cost = torch.rand(matrices, rows, cols, generator=gen) * 4 + \
        torch.rand(matrices, rows, 1, generator=gen)
    counts = torch.randint(cols // 2, cols + 1, (matrices, ), generator=gen).tolist()
    return cost.to(device), counts


def benchmark(device: str, quick: bool = False) -> List[Dict]:
    """Time the matching of every case, stock and turbox.

    Args:
        device (str): ``'cuda'`` (or ``'cuda:N'``) or ``'cpu'``.
        quick (bool): Tiny sizes, a few iterations. Defaults to False.

    Returns:
        list[dict]: Rows as described in :mod:`turbox_mm.benchmark.micro`.
    """
    from turbox_mm.models.sparse4d.matching import solve_batched, solve_on_device
    dev = benchmark_device('lsap', device)
    cases = QUICK_CASES if quick else CASES
    rows = []
    if dev.type != 'cuda':
        for name in cases:
            rows.append(dict(component='lsap', case=name, stock=None, turbox=None,
                             note='needs CUDA (the stock row is a device-to-host transfer)'))
        return rows
    iters, warmup = (3, 1) if quick else (50, 10)
    for name, (matrices, num_rows, num_cols) in cases.items():
        cost, counts = _costs(matrices, num_rows, num_cols, dev)
        stock_pairs, _ = solve_batched(cost, counts)
        same = torch.equal(stock_pairs, solve_on_device(cost, counts))
        rows.append(dict(component='lsap', case=name,
                         stock=time_fn(lambda: solve_batched(cost, counts), iters=iters,
                                       warmup=warmup, device='cuda'),
                         turbox=time_fn(lambda: solve_on_device(cost, counts), iters=iters,
                                        warmup=warmup, device='cuda'),
                         note=f'{"the same" if same else "DIFFERENT"} pairs as scipy; '
                              f'{int(np.minimum(counts, num_rows).sum())} pairs; stock syncs'))
    return rows
