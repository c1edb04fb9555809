"""Timing of one callable, the way every micro benchmark in turbox_mm measures.

Components and ops are timed with :func:`time_fn`: warm-up calls first (compilation, caches,
allocator), then ``iters`` timed calls, each bracketed by CUDA events on a GPU or
``time.perf_counter`` on the CPU; the result is the median with the 20% and 80% quantiles.
Rows from several measurements print side by side with :func:`format_rows`.
"""
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch


def time_fn(fn: Callable[[], object],
            iters: int = 50,
            warmup: int = 10,
            device: Optional[str] = None,
            setup: Optional[Callable[[], object]] = None) -> Dict[str, float]:
    """Time ``fn()``: median and 20/80% quantiles in milliseconds.

    Args:
        fn (callable): Called with no arguments; its result is ignored.
        iters (int): Timed calls. Defaults to 50.
        warmup (int): Untimed calls before them. Defaults to 10.
        device (str, optional): ``'cuda'`` times with CUDA events (device time of the work the
            call enqueues, host overhead included where it stalls the stream); anything else
            times on the host. Defaults to ``'cuda'`` when CUDA is available.
        setup (callable, optional): Called untimed before each call (e.g. to reset grads).

    Returns:
        dict: ``median_ms``, ``p20_ms``, ``p80_ms`` and ``iters``.

    Examples:
        >>> import torch
        >>> x = torch.randn(64, 64)
        >>> stats = time_fn(lambda: x @ x, iters=5, warmup=1, device='cpu')
        >>> sorted(stats)
        ['iters', 'median_ms', 'p20_ms', 'p80_ms']
    """
    if iters < 1:
        raise ValueError(f'time_fn: iters must be >= 1, got {iters}')
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    use_cuda = device == 'cuda' or str(device).startswith('cuda:')
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    if use_cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if setup is not None:
            setup()
        if use_cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return summarize_ms(times)


def warm_up_gpu(seconds: float = 2.0) -> None:
    """Keep the GPU busy for ``seconds`` so its clocks are up before anything is timed.

    Without it, whatever is measured first in a process runs on a GPU still ramping its
    clocks and looks slower than what follows.
    """
    if not torch.cuda.is_available():
        return
    x = torch.randn(4096, 4096, device='cuda')
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            x = torch.tanh(x @ x)
        torch.cuda.synchronize()


def summarize_ms(times: Sequence[float]) -> Dict[str, float]:
    """Median and 20/80% quantiles of a list of times in milliseconds."""
    ordered = sorted(times)
    n = len(ordered)

    def q(frac):
        return ordered[min(n - 1, max(0, round(frac * (n - 1))))]

    return dict(median_ms=statistics.median(ordered), p20_ms=q(0.2), p80_ms=q(0.8), iters=n)


def format_rows(rows: List[Dict], title: str = '') -> str:
    """A plain-text table of stock vs turbox rows.

    Args:
        rows (list[dict]): Each with ``component``, ``case``, ``stock`` and ``turbox`` (outputs of
            :func:`time_fn`, or None where that side could not run) and optionally ``note``.
        title (str): A first line. Defaults to ''.

    Returns:
        str: The table; the speed-up column is stock median / turbox median.
    """
    header = ('component', 'case', 'stock ms (p20-p80)', 'turbox ms (p20-p80)', 'speed-up',
              'note')
    lines = []

    def cell(stats):
        if not stats:
            return 'n/a'
        return f"{stats['median_ms']:.3f} ({stats['p20_ms']:.3f}-{stats['p80_ms']:.3f})"

    table = [header]
    for row in rows:
        stock, turbox = row.get('stock'), row.get('turbox')
        speed = (f"{stock['median_ms'] / turbox['median_ms']:.2f}x"
                 if stock and turbox and turbox['median_ms'] > 0 else 'n/a')
        table.append((row['component'], row['case'], cell(stock), cell(turbox), speed,
                      row.get('note', '')))
    widths = [max(len(str(r[i])) for r in table) for i in range(len(header))]
    if title:
        lines.append(title)
    for i, r in enumerate(table):
        lines.append('  '.join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            lines.append('  '.join('-' * w for w in widths))
    return '\n'.join(lines)


def benchmark_device(name: str, device: str) -> torch.device:
    """``torch.device(device)`` for the micro benchmark ``name``; a CUDA device without CUDA
    raises ``RuntimeError`` naming the benchmark."""
    dev = torch.device(device)
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError(f'{name} benchmark: device {device!r} requested but CUDA is not '
                           'available')
    return dev
