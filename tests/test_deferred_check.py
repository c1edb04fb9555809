"""turbox_mm.utils.deferred_check: device flags checked on the host once they arrive."""
import pytest
import torch

from fake_event import FakeEvent

from turbox_mm.utils import deferred_check
from turbox_mm.utils.deferred_check import DeferredCheck


def _raise_if_any(flags):
    if bool(flags.any()):
        raise ValueError(f'bad sample {int(flags.nonzero()[0])}')


def test_host_flags_are_checked_at_once():
    checks = DeferredCheck()
    checks.push(torch.tensor([False, False]), _raise_if_any)
    assert len(checks) == 0
    with pytest.raises(ValueError, match='bad sample 1'):
        checks.push(torch.tensor([False, True]), _raise_if_any)


def _queue(checks, flags, check):
    """Queue ``check`` as a CUDA push would (host copy, event), without a GPU."""
    event = FakeEvent()
    checks._pending.append((flags, event, check))
    deferred_check._LIVE.add(checks)
    return event


def test_a_raising_check_leaves_the_later_ones_queued_and_flush_all_runs_them():
    checks, seen = DeferredCheck(), []

    def named(name):
        def check(flags):
            seen.append(name)
            _raise_if_any(flags)
        return check

    first = _queue(checks, torch.tensor([True]), named('step1'))
    second = _queue(checks, torch.tensor([True]), named('step2'))
    _queue(checks, torch.tensor([False]), named('step3'))
    checks.flush()  # nothing has arrived: nothing runs
    assert seen == [] and len(checks) == 3
    first.done = second.done = True
    with pytest.raises(ValueError, match='bad sample 0'):
        checks.flush()
    assert seen == ['step1'] and len(checks) == 2  # step 2 and 3 still queued
    with pytest.raises(ValueError, match='bad sample 0'):
        deferred_check.flush_all()  # at exit: waits for all, raises the first error
    assert seen == ['step1', 'step2', 'step3'] and len(checks) == 0


@pytest.mark.cuda
def test_cuda_flags_are_checked_later_without_a_wait_and_never_dropped():
    from turbox_mm.benchmark.syncs import SyncCounter
    checks = DeferredCheck()
    flags = torch.tensor([False, True], device='cuda')
    torch.cuda._sleep(50_000_000)  # keep the copy from arriving before push returns
    with SyncCounter() as syncs:
        checks.push(flags, _raise_if_any)
    assert syncs.total == 0, syncs.top()
    assert len(checks) == 1
    with pytest.raises(ValueError, match='bad sample 1'):
        checks.flush(wait=True)
    assert len(checks) == 0
    # at most MAX_PENDING wait: a push beyond waits for the oldest and runs it
    seen = []
    torch.cuda._sleep(50_000_000)
    for i in range(deferred_check.MAX_PENDING + 1):
        checks.push(torch.zeros(1, dtype=torch.bool, device='cuda'),
                    lambda f, i=i: seen.append(i))
    assert len(checks) <= deferred_check.MAX_PENDING and seen[0] == 0
    checks.flush(wait=True)
    assert seen == list(range(deferred_check.MAX_PENDING + 1))
