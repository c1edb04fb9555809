"""Counting host-device synchronisations, and where they come from.

A training step that waits for the GPU (``.item()``, ``.tolist()``, a boolean mask, a
``nonzero``, a device-to-host copy) stops the host from queueing work ahead. CUDA's
synchronisation debug mode (``torch.cuda.set_sync_debug_mode('warn')``) makes torch warn at
every such point; :class:`SyncCounter` turns those warnings into a count per iteration and a
table of the Python lines that caused them. Explicit ``torch.cuda.synchronize()`` calls are not
reported by torch and are not counted.
"""
import collections
import warnings
from typing import Dict, List, Optional, Tuple

import torch

#: Substring of the warning torch's synchronisation debug mode issues.
SYNC_WARNING = 'called a synchronizing CUDA operation'


class SyncCounter:
    """Count the synchronising CUDA operations made inside a ``with`` block.

    Without CUDA the block runs unchanged and :attr:`total` stays None.

    Attributes:
        total (int or None): Synchronisations counted (None where CUDA is not in use).
        sources (Counter): ``(file, line)`` of the Python code that made each one.

    Examples:
        >>> with SyncCounter(enabled=False) as syncs:
        ...     pass
        >>> syncs.total is None
        True
    """

    def __init__(self, enabled: Optional[bool] = None) -> None:
        self.enabled = torch.cuda.is_available() if enabled is None else enabled
        self.total: Optional[int] = None
        self.sources: collections.Counter = collections.Counter()
        self._records = None
        self._catcher = None
        self._mode = None

    def __enter__(self) -> 'SyncCounter':
        if not self.enabled:
            return self
        self._catcher = warnings.catch_warnings(record=True)
        self._records = self._catcher.__enter__()
        warnings.simplefilter('always')  # every occurrence, not the first per line
        self._mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode('warn')
        return self

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        torch.cuda.set_sync_debug_mode(self._mode)
        self._catcher.__exit__(*exc)
        self.add(self._records)
        others = [r for r in self._records if SYNC_WARNING not in str(r.message)]
        for record in others:  # the block's own warnings, passed on
            warnings.warn_explicit(record.message, record.category, record.filename,
                                   record.lineno)

    def add(self, records) -> None:
        """Count the synchronisation warnings among ``records`` (``warnings.WarningMessage``)."""
        syncs = [r for r in records if SYNC_WARNING in str(r.message)]
        self.total = (self.total or 0) + len(syncs)
        self.sources.update((r.filename, r.lineno) for r in syncs)

    def top(self, count: int = 20) -> List[Tuple[str, int, int]]:
        """The ``count`` most frequent ``(file, line, syncs)``."""
        return [(f, line, n) for (f, line), n in self.sources.most_common(count)]


def format_sources(sources: List[Tuple[str, int, int]], iters: int) -> str:
    """A table of synchronisation sources with their count per iteration."""
    lines = [f'{"syncs/iter":>10}  source']
    for filename, line, count in sources:
        lines.append(f'{count / max(iters, 1):>10.1f}  {filename}:{line}')
    return '\n'.join(lines)


def profile_table(profiler: 'torch.profiler.profile', rows: int = 30) -> str:
    """The profiler's operator summary by self CPU time (the host's share of the step), and,
    where the profile holds device (CUDA) activity, by self device time too (the GPU's share:
    what a GPU-bound step spends its time on)."""
    averages = profiler.key_averages()
    text = ('by self CPU time\n'
            + averages.table(sort_by='self_cpu_time_total', row_limit=rows))
    if any(getattr(a, 'self_device_time_total', 0) > 0 for a in averages):
        text += ('\n\nby self device time\n'
                 + averages.table(sort_by='self_device_time_total', row_limit=rows))
    return text


def sync_summary(counter: SyncCounter, iters: int) -> Dict[str, object]:
    """``host_syncs_per_iter`` and the top sources, for a benchmark result."""
    if counter.total is None:
        return dict(host_syncs_per_iter=None, sync_sources=[])
    return dict(host_syncs_per_iter=counter.total / max(iters, 1), sync_sources=counter.top())
