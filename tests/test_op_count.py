"""The operation counter (turbox_mm.benchmark.op_count) and tools/step_ops.py: what is counted,
where it is attributed, and a config's step counted per phase."""
import json
import sys

import pytest
import torch

from conftest import ROOT, run_python
from turbox_mm.benchmark.op_count import OpCounter, count_step_ops, format_counts


def _line(marker):
    """The line number of ``marker`` in this file."""
    with open(__file__) as f:
        return next(i for i, text in enumerate(f, 1) if marker in text and 'def _line' not in text
                    and '_line(' not in text)


def test_views_and_allocations_are_free_and_work_is_counted_at_its_line():
    x = torch.randn(4, 3)
    with OpCounter(backward_sources=False) as counted:
        y = x.view(12).view(3, 4).t()  # views only
        z = torch.empty(5)
        w = (y * 2 + 1).sum()  # count-here
    assert counted.total == 3 and sorted(counted.ops) == ['aten.add', 'aten.mul', 'aten.sum']
    assert counted.free >= 4  # view, view, t, empty
    assert counted.top(1) == [(__file__, _line('# count-here'), False, 3)]
    assert z.shape == (5, ) and float(w) == pytest.approx(float((x * 2 + 1).sum()))


def test_backward_operations_point_at_their_forward_line():
    """Backward operations go to the forward line that recorded their node (the forward ran
    under the counter, or anomaly mode, so the node has its traceback); the gradient seed
    (``ones_like``) is no node's and stays at the backward call."""
    w = torch.randn(3, 3, requires_grad=True)
    x = torch.randn(2, 3)
    with OpCounter():
        loss = torch.relu(x @ w).sum()  # forward-line
    with OpCounter() as counted:
        loss.backward()  # backward-line
    sites = {(file, line, bwd): n for file, line, bwd, n in counted.top(10)}
    assert sites == {(__file__, _line('# forward-line'), True): 2,  # relu's and mm's backward
                     (__file__, _line('# backward-line'), False): 1}
    # without the sources: the backward call's line, still marked as backward
    w.grad = None
    with OpCounter():
        loss = torch.relu(x @ w).sum()
    with OpCounter(backward_sources=False) as plain:
        loss.backward()  # plain-backward
    assert {(line, bwd) for _, line, bwd, _ in plain.top(10)} == {
        (_line('# plain-backward'), True), (_line('# plain-backward'), False)}
    assert plain.total == counted.total == 3


@torch.library.custom_op('turbox_test_op_count::triple', mutates_args=())
def _triple(x: torch.Tensor) -> torch.Tensor:
    return (x + x + x).clone()  # three operations inside: one kernel for the counter


def test_a_custom_op_counts_once_and_runs_opaque():
    ones = torch.ones(3)
    with OpCounter(backward_sources=False) as counted:
        out = _triple(ones)
    assert dict(counted.ops) == {'turbox_test_op_count.triple': 1}
    assert out.tolist() == [3.0, 3.0, 3.0]


def test_a_turbox_op_counts_once_at_its_callers_line():
    """turbox_mm's ops count where the model calls them, not inside turbox_mm.ops (entry
    point, registration, dispatch), forward and backward."""
    from turbox_mm.ops.sigmoid_focal import sigmoid_focal
    logits = torch.randn(6, 3, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, -1, 1])
    with OpCounter() as forward:
        loss = sigmoid_focal(logits, target).sum()  # focal-line
    with OpCounter() as backward:
        loss.backward()
    here = _line('# focal-line')
    assert forward.ops['turbox_mm.sigmoid_focal'] == 1
    assert forward.sources[(__file__, here, False)] == forward.total == 2  # the op and the sum
    assert backward.ops['turbox_mm.sigmoid_focal_backward'] == 1
    assert backward.sources[(__file__, here, True)] >= 1


def test_a_step_is_counted_per_phase_and_turbox_fuses_the_optimizer():
    from mmengine.config import Config
    counts = {}
    for name in ('stock', 'turbox'):
        cfg = Config.fromfile(f'{ROOT}/configs/smoke/smoke_{name}.py')
        counts[name] = count_step_ops(cfg, steps=2)
        assert set(counts[name]) == {'forward', 'backward', 'optimizer'}
        assert all(c.total > 0 for c in counts[name].values())
    # AdamW over every parameter: a loop of per-tensor ops in stock, fused launches in turbox
    assert counts['turbox']['optimizer'].total < counts['stock']['optimizer'].total / 2
    report = format_counts(counts['turbox'], top=3, root=ROOT)
    assert 'turbox_mm/testing/smoke_model.py' in report and 'backward' in report
    with pytest.raises(ValueError, match='steps must be at least 1'):
        count_step_ops(cfg, steps=0)


class _Compiled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)

    def forward(self, x):
        return torch.relu(self.fc(x)) * 2


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _Compiled()
        self.head = torch.nn.Linear(3, 1)

    def forward(self, x):
        return self.head(self.block(x) + 1)  # eager-line


def test_operations_of_compiled_modules_are_counted_apart():
    from turbox_mm.benchmark.compiled_regions import CompiledRegions
    model = _Model()
    regions = CompiledRegions(model, ['block'])
    assert regions.paths == ['block']
    x = torch.randn(2, 3)
    with OpCounter(regions=regions) as forward:
        loss = model(x).sum()
    with OpCounter(regions=regions) as backward:
        loss.backward()
    assert regions.depth == 0
    # the block's linear, relu and mul are compiled; the add, the head's linear and the sum
    # are not
    assert forward.compiled == 3 and forward.total == 3
    assert {line for _, line, _, _ in forward.top(5)} >= {_line('# eager-line')}
    # the block's backward (its nodes were recorded inside its forward) is compiled too
    assert backward.compiled >= 3
    assert all(line != _line('return torch.relu(self.fc(x)) * 2')
               for _, line, _, _ in backward.top(20))
    model.zero_grad(set_to_none=True)  # the same gradient accumulation as the first step
    with OpCounter() as everything:
        model(x).sum().backward()
    assert everything.total == (forward.total + forward.compiled + backward.total
                                + backward.compiled)
    regions.remove()
    with OpCounter(regions=regions) as after:
        model(x).sum()
    assert after.compiled == 0  # hooks gone; the code rule applies to the backward only


def test_a_step_counted_outside_its_compiled_modules():
    from mmengine.config import Config
    cfg = Config.fromfile(f'{ROOT}/configs/smoke/smoke_turbox.py')
    full = count_step_ops(cfg, steps=1, backward_sources=False)
    outside = count_step_ops(cfg, steps=1, outside_compiled=True)
    # the smoke model's backbone (an nn.Sequential, compiled through turbox's frame) is most
    # of its forward; its backward is torch's container code: counted as eager (documented)
    assert outside['forward'].compiled > 0
    assert outside['forward'].total + outside['forward'].compiled == full['forward'].total
    assert outside['optimizer'].total == full['optimizer'].total
    assert 'in compiled modules' in format_counts(outside)
    stock = Config.fromfile(f'{ROOT}/configs/smoke/smoke_stock.py')
    with pytest.raises(ValueError, match='outside_compiled needs a config'):
        count_step_ops(stock, steps=1, outside_compiled=True)


def test_step_ops_tool_writes_its_counts(tmp_path):
    out = tmp_path / 'ops.json'
    proc = run_python(['tools/step_ops.py', 'configs/smoke/smoke_stock.py',
                       'configs/smoke/smoke_turbox.py', '--top', '3', '--no-backward-sources',
                       '--out', str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'smoke_turbox.py:' in proc.stdout and 'operations a step' in proc.stdout
    saved = json.loads(out.read_text())
    stock = saved['results']['configs/smoke/smoke_stock.py']
    assert stock['forward']['operations'] > 0 and len(stock['forward']['lines']) <= 3


@pytest.mark.skipif(sys.platform != 'linux', reason='paths')
def test_step_ops_tool_refuses_cuda_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip('a GPU is present')
    proc = run_python(['tools/step_ops.py', 'configs/smoke/smoke_stock.py', '--device', 'cuda'])
    assert proc.returncode == 2 and 'CUDA is not available' in proc.stderr
