"""turbox_mm.benchmark.host_time: a step's host time by kind, from a real torch profile of a
module with a compiled part (Dynamo, aot_eager on the CPU) and an eager part."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from turbox_mm.benchmark.host_time import (UNCOVERED, format_host_breakdown, host_breakdown)


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.fc(x)) * 2


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _Inner()
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        return self.out(self.inner(x) + 1)


def _event(name, start, end, parent=None, device='DeviceType.CPU'):
    return SimpleNamespace(name=name, cpu_parent=parent, device_type=device,
                           time_range=SimpleNamespace(start=start, end=end))


def test_kinds_of_a_compiled_and_eager_step():
    torch._dynamo.reset()
    model = _Model()
    model.inner.compile(backend='aot_eager')
    x = torch.randn(4, 8)
    for _ in range(2):  # compiled before the profile
        model(x).sum().backward()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            model(x).sum().backward()
    rows = {kind: (ms, calls) for kind, ms, calls in host_breakdown(prof.events(), 3)}
    torch._dynamo.reset()
    # one compiled forward region and its guards a step, its compiled backward, and the
    # eager part's operators and autograd nodes
    assert rows['compiled regions (forward)'][1] == 1
    assert rows['Dynamo guards (cache lookup)'][1] == 1
    assert rows['compiled backward'][1] == 1
    assert rows['eager operators'][1] >= 3  # add, linear, sum (and the backward's seed)
    assert rows['eager backward nodes'][1] >= 3
    assert all(ms >= 0 for ms, _ in rows.values())
    assert rows['compiled regions (forward)'][0] > 0 and rows['compiled backward'][0] > 0
    # the kinds (one thread here) fit in the span; what they leave is the uncovered time
    span = rows.pop('profiled span')[0]
    assert sum(ms for ms, _ in rows.values()) == pytest.approx(span, rel=1e-6)
    text = format_host_breakdown(host_breakdown(prof.events(), 3))
    assert 'compiled regions (forward)' in text and UNCOVERED in text


def test_children_other_devices_and_overlapping_threads():
    parent = _event('aten::linear', 0, 10)
    events = [parent, _event('aten::addmm', 1, 9, parent=parent),  # inside: not counted
              _event('cudaLaunchKernel', 11, 12),
              _event('kernel', 0, 100, device='DeviceType.CUDA'),  # device activity: not host
              # the backward's thread overlaps the main thread's range: counted once in the
              # union, in full in its kind
              _event('autograd::engine::evaluate_function: AddmmBackward0', 5, 20),
              _event('Optimizer.step#AdamW.step', 30, 40)]
    rows = {kind: (ms, calls) for kind, ms, calls in host_breakdown(events, 2)}
    assert rows['eager operators'] == (pytest.approx(10 / 1e3 / 2), 0.5)
    assert rows['CUDA runtime calls'][1] == 0.5
    assert rows['eager backward nodes'][0] == pytest.approx(15 / 1e3 / 2)
    assert rows['optimizer'][0] == pytest.approx(10 / 1e3 / 2)
    assert rows['profiled span'][0] == pytest.approx(40 / 1e3 / 2)
    # covered: [0, 20] and [30, 40]; uncovered: [20, 30]
    assert rows[UNCOVERED][0] == pytest.approx(10 / 1e3 / 2)


def test_no_events():
    assert host_breakdown([], 3) == []
    assert 'no CPU events' in format_host_breakdown([])
