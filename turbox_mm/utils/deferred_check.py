"""Checks of device-side flags that do not make the host wait.

A training step that must not sync can still compute, on the device, flags that say whether its
input was bad (a label out of range, say). :class:`DeferredCheck` copies them to pinned host
memory without a wait and runs the host-side check once they have arrived: at the next
:meth:`~DeferredCheck.push` whose copy is done, at the latest when
:data:`MAX_PENDING` checks are waiting (then it waits for the oldest), or at
:meth:`~DeferredCheck.flush` with ``wait=True``. A bad input therefore still raises its named
error, a step or a few later than a synchronous check would (the steps in between have used
it: a label check's caller must keep such labels harmless meanwhile, as the heads clamp
them). Nothing is dropped: the checks still waiting when the process exits run then
(:func:`flush_all`, registered with ``atexit``), and a check that raises leaves the later ones
queued.
"""
import atexit
import collections
import weakref
from typing import Callable, Deque, Tuple

import torch
from torch import Tensor

#: How many checks may wait for their copy before a push waits for the oldest.
MAX_PENDING = 4
#: Every DeferredCheck that has queued a device check (for :func:`flush_all`).
_LIVE: 'weakref.WeakSet[DeferredCheck]' = weakref.WeakSet()


def flush_all() -> None:
    """Wait for and run every queued check of every :class:`DeferredCheck` (at exit; callers
    that end a run early may call it too). The first error raises after all have run."""
    first = None
    for checks in list(_LIVE):
        while len(checks):
            try:
                checks.flush(wait=True)
            except Exception as error:  # keep running the others, report the first
                first = first or error
    if first is not None:
        raise first


atexit.register(flush_all)


class DeferredCheck:
    """Run ``check(host_flags)`` on device flags once they reach the host, without a wait.

    Examples:
        >>> seen = []
        >>> checks = DeferredCheck()
        >>> checks.push(torch.tensor([False, True]), lambda flags: seen.append(flags.tolist()))
        >>> seen  # CPU flags are checked at once
        [[False, True]]
    """

    def __init__(self) -> None:
        self._pending: Deque[Tuple[Tensor, object, Callable[[Tensor], None]]] = \
            collections.deque()

    def __len__(self) -> int:
        return len(self._pending)

    def push(self, flags: Tensor, check: Callable[[Tensor], None]) -> None:
        """Queue ``check`` on a host copy of ``flags`` (run at once for host flags), after the
        earlier checks that have arrived."""
        if flags.device.type != 'cuda':
            self.flush()
            check(flags.detach().cpu())
            return
        host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
        host.copy_(flags.detach(), non_blocking=True)
        arrived = torch.cuda.Event()
        arrived.record(torch.cuda.current_stream(flags.device))
        # queued before any earlier check runs: an earlier check that raises cannot lose it
        self._pending.append((host, arrived, check))
        _LIVE.add(self)
        while len(self._pending) > MAX_PENDING:
            self._run_oldest(wait=True)
        self.flush()

    def flush(self, wait: bool = False) -> None:
        """Run the queued checks whose flags have arrived, oldest first; with ``wait``, wait
        for all of them."""
        while self._pending and self._run_oldest(wait):
            pass

    def _run_oldest(self, wait: bool) -> bool:
        host, arrived, check = self._pending[0]
        if not wait and not arrived.query():
            return False
        if wait:
            arrived.synchronize()
        self._pending.popleft()
        check(host)
        return True
