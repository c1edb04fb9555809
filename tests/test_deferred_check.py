"""turbox_mm.utils.deferred_check: device flags checked on the host once they arrive."""
import pytest
import torch

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
