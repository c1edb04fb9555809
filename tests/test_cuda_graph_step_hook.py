"""CudaGraphStepHook: under a compile mode that replays CUDA graphs, every training,
validation and test iteration marks its start (``torch.compiler.cudagraph_mark_step_begin``);
the runner registers the hook for those modes only."""
import copy
import os.path as osp
import time

import pytest
import torch
from mmengine.hooks import Hook

from test_eager_warmup_hook import _registered, _smoke_cfg  # noqa: F401 (fixture)
from turbox_mm.engine.hooks import CudaGraphStepHook
from turbox_mm.registry import HOOKS


class _Order(Hook):
    """Records, per iteration, how many marks came before it (runs after the step hook)."""
    priority = 'NORMAL'
    seen = []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        type(self).seen.append(('train', _MARKS[0]))

    def before_val_iter(self, runner, batch_idx, data_batch=None):
        type(self).seen.append(('val', _MARKS[0]))

    def before_test_iter(self, runner, batch_idx, data_batch=None):
        type(self).seen.append(('test', _MARKS[0]))


_MARKS = [0]


@pytest.fixture
def marks(monkeypatch):
    """Count the calls of torch's mark (the hook looks it up at each call). The runs compile
    with ``aot_eager`` (no code generation on this CPU), which ignores the mode; the runner
    decides as it would for Inductor, the backend the mode is for."""
    from turbox_mm.engine.runner import module_compiler, turbox_runner
    _MARKS[0] = 0
    _Order.seen = []

    def mark():
        _MARKS[0] += 1

    def as_inductor(kwargs):
        return module_compiler.uses_cuda_graphs(dict(kwargs, backend='inductor'))

    monkeypatch.setattr(torch.compiler, 'cudagraph_mark_step_begin', mark)
    monkeypatch.setattr(turbox_runner, 'uses_cuda_graphs', as_inductor)
    HOOKS.register_module(module=_Order, force=True)
    yield _MARKS
    HOOKS._module_dict.pop('_Order', None)


def _runner(cfg, val_interval=2, iters=4):
    from torch._dynamo.utils import counters

    from turbox_mm.engine.runner import TurboxRunner
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=iters, val_interval=val_interval)
    cfg.custom_hooks.append(dict(type='turbox_mm._Order'))
    torch._dynamo.reset()
    counters.clear()
    return TurboxRunner.from_cfg(copy.deepcopy(cfg))


@pytest.mark.parametrize('setting', [dict(mode='reduce-overhead'), dict(mode='max-autotune'),
                                     dict(options={'triton.cudagraphs': True})])
def test_every_iteration_of_every_loop_marks_its_start(tmp_path, marks, setting):
    cfg = _smoke_cfg(tmp_path, iters=4, eager_iters=1)
    cfg.turbox['compile'].update(setting)  # aot_eager ignores it: the CPU runs the same code
    runner = _runner(cfg)
    runner.train()
    hooks = [h for h in runner.hooks if isinstance(h, CudaGraphStepHook)]
    assert len(hooks) == 1
    assert any('CudaGraphStepHook' in c for c in runner.turbox_changes)
    seen = _Order.seen
    kinds = [kind for kind, _ in seen]
    assert kinds.count('train') == 4 and kinds.count('val') >= 2, seen
    # each iteration sees one more mark than the one before it: one mark per iteration,
    # made before the other hooks' per-iteration work
    assert [count for _, count in seen] == list(range(1, len(seen) + 1)), seen
    assert hooks[0].marks == marks[0] == len(seen)
    before = marks[0]
    runner.test()
    tests = [count for kind, count in _Order.seen if kind == 'test']
    assert tests and tests == list(range(before + 1, before + 1 + len(tests)))


@pytest.mark.parametrize('mode', [None, 'default', 'max-autotune-no-cudagraphs'])
def test_no_hook_without_cuda_graphs(tmp_path, marks, mode):
    cfg = _smoke_cfg(tmp_path, iters=2, eager_iters=1)
    cfg.turbox['compile']['mode'] = mode
    runner = _runner(cfg, iters=2)
    runner.train()
    assert not [h for h in runner.hooks if isinstance(h, CudaGraphStepHook)]
    assert marks[0] == 0


def test_no_hook_where_nothing_is_compiled(tmp_path, marks):
    cfg = _smoke_cfg(tmp_path, iters=1)
    cfg.turbox['compile'] = dict(enable=False, mode='reduce-overhead')
    runner = _runner(cfg, iters=1)
    runner.train()
    assert not [h for h in runner.hooks if isinstance(h, CudaGraphStepHook)]
    assert marks[0] == 0


def test_a_configured_hook_is_not_registered_twice(tmp_path, marks):
    cfg = _smoke_cfg(tmp_path, iters=2, eager_iters=1)
    cfg.turbox['compile']['mode'] = 'reduce-overhead'
    cfg.custom_hooks.append(dict(type='turbox_mm.CudaGraphStepHook'))
    runner = _runner(cfg, iters=2, val_interval=100)
    runner.train()
    assert len([h for h in runner.hooks if isinstance(h, CudaGraphStepHook)]) == 1
    # one mark per iteration (the 2 training iterations and the final validation's), not two
    assert [kind for kind, _ in _Order.seen][:2] == ['train', 'train']
    assert marks[0] == len(_Order.seen) > 2


def test_gradient_accumulation_with_cuda_graphs_is_warned(tmp_path, marks):
    """The runner warns when it builds the model (its log file holds the warning)."""
    import glob
    cfg = _smoke_cfg(tmp_path, iters=1, eager_iters=1)
    cfg.turbox['compile']['mode'] = 'reduce-overhead'
    cfg.optim_wrapper['accumulative_counts'] = 2
    # a name of its own: mmengine reuses a logger of the same name (and its log file)
    cfg.experiment_name = f'accumulate_2_{time.time_ns()}'
    runner = _runner(cfg, iters=1, val_interval=100)
    text = ''.join(open(f).read() for f in glob.glob(osp.join(runner.log_dir, '*.log')))
    assert 'accumulative_counts=2 with CUDA graphs' in text, text[-2000:]
    cfg.optim_wrapper['accumulative_counts'] = 1
    cfg.work_dir = str(tmp_path / 'once')
    cfg.experiment_name = f'accumulate_1_{time.time_ns()}'
    runner = _runner(cfg, iters=1, val_interval=100)
    text = ''.join(open(f).read() for f in glob.glob(osp.join(runner.log_dir, '*.log')))
    assert 'with CUDA graphs' not in text


def test_only_modules_replay_graphs_and_accumulation_is_found_everywhere():
    from mmengine.optim import OptimWrapper, OptimWrapperDict

    from turbox_mm.engine.runner.turbox_runner import accumulative_counts, replays_graphs
    graphs = dict(backend='inductor', mode='reduce-overhead')
    assert replays_graphs(['backbone', 'head.bank:cache'], graphs)
    # methods alone compile without CUDA graphs: nothing replays, no hook
    assert not replays_graphs(['head.bank:cache', 'depth:loss'], graphs)
    assert not replays_graphs(['backbone'], dict(backend='inductor'))
    assert not replays_graphs([], graphs)
    net = torch.nn.Linear(2, 2)
    built = OptimWrapper(torch.optim.SGD(net.parameters(), lr=0.1), accumulative_counts=3)
    assert accumulative_counts(built) == 3
    assert accumulative_counts(OptimWrapperDict(a=OptimWrapper(
        torch.optim.SGD(net.parameters(), lr=0.1)), b=built)) == 3
    assert accumulative_counts(dict(type='OptimWrapper', optimizer=dict(type='SGD'))) == 1
