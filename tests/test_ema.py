"""GraphExponentialMovingAverage and TurboxEMAHook against mmengine's EMA, step for step.

Every comparison is exact (``torch.equal``): the turbox update runs the same ``lerp`` formula
with the same scalar weight as mmengine's, only grouped into foreach calls and replayed as a
CUDA graph, so not one bit may differ. The CUDA tests compare the graph path with the eager
foreach path and with mmengine, count captures and replays, and move tensors under a captured
graph to check that it is captured again.
"""
import copy
import pickle
from unittest import mock

import pytest
import torch
import torch.nn as nn
from mmengine.hooks import EMAHook, Hook
from mmengine.model import BaseModel, ExponentialMovingAverage, MomentumAnnealingEMA
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.testing import RunnerTestCase

from turbox_mm.benchmark.micro import ema as ema_bench
from turbox_mm.engine.hooks.ema_hook import (TurboxEMAHook, convert_ema_hook_cfg,
                                             has_graph_update, resolve_ema_type)
from turbox_mm.engine.hooks.graph_ema import GraphExponentialMovingAverage

needs_cuda = pytest.mark.cuda


# -- helpers ---------------------------------------------------------------------------------

class Net(nn.Module):
    """Parameters and buffers of several kinds: float32 and float64 groups, BN buffers with an
    integer counter, a non-persistent buffer, an empty parameter and a tied submodule (listed
    twice in the state dict)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2).double()
        self.tied = self.fc
        self.empty = nn.Parameter(torch.empty(0))
        self.register_buffer('scratch', torch.zeros(5), persistent=False)


def perturb(model, gen):
    """Change every parameter and buffer in place, as an optimizer step and BN would."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.dtype.is_floating_point:
                t.add_(torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device))
            else:
                t.add_(1)


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key].cpu(), sb[key].cpu()), key


def run_pair(stock, turbox, model, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        perturb(model, gen)
        stock.update_parameters(model)
        turbox.update_parameters(model)
        assert_same_state(stock, turbox)


# -- the averaged model on the CPU -----------------------------------------------------------

@pytest.mark.parametrize('interval', [1, 3])
@pytest.mark.parametrize('update_buffers', [False, True])
def test_matches_mmengine_exactly(interval, update_buffers):
    torch.manual_seed(0)
    model = Net()
    stock = ExponentialMovingAverage(model, momentum=0.1, interval=interval,
                                     update_buffers=update_buffers)
    turbox = GraphExponentialMovingAverage(model, momentum=0.1, interval=interval,
                                           update_buffers=update_buffers)
    run_pair(stock, turbox, model, steps=10)
    assert int(turbox.steps) == 10
    assert turbox.num_plans == 1 and turbox.num_captures == 0
    # The test can fail: one more averaging step on one side changes the averaged weights.
    perturb(model, torch.Generator().manual_seed(1))
    for _ in range(interval):
        turbox.update_parameters(model)
    with pytest.raises(AssertionError):
        assert_same_state(stock.module, turbox.module)


def test_momentum_convention():
    """averaged = (1 - momentum) * averaged + momentum * source, mmengine's convention."""
    model = nn.Linear(2, 1, bias=False)
    ema = GraphExponentialMovingAverage(model, momentum=0.25)
    with torch.no_grad():
        model.weight.fill_(8.0)
        ema.update_parameters(model)  # step 0 copies
        model.weight.fill_(0.0)
        ema.update_parameters(model)
    assert ema.module.weight.tolist() == [[6.0, 6.0]]


def test_replaced_source_tensors_are_followed():
    """User code that replaces tensors or modules instead of writing into them."""
    torch.manual_seed(0)
    model = Net()
    stock = ExponentialMovingAverage(model, momentum=0.2)
    turbox = GraphExponentialMovingAverage(model, momentum=0.2)
    run_pair(stock, turbox, model, steps=2)
    model.conv.weight = nn.Parameter(torch.randn_like(model.conv.weight))
    run_pair(stock, turbox, model, steps=2, seed=1)
    model.fc.bias.data = torch.randn_like(model.fc.bias)
    run_pair(stock, turbox, model, steps=2, seed=2)
    model.bn.running_mean = torch.randn(4)
    run_pair(stock, turbox, model, steps=2, seed=3)
    model.head = nn.Linear(3, 2).double()
    run_pair(stock, turbox, model, steps=2, seed=4)
    assert turbox.num_plans == 5


def test_load_state_dict_restarts_from_the_loaded_steps():
    torch.manual_seed(0)
    model = Net()
    stock = ExponentialMovingAverage(model, momentum=0.3, interval=2)
    turbox = GraphExponentialMovingAverage(model, momentum=0.3, interval=2)
    run_pair(stock, turbox, model, steps=3)
    fresh = GraphExponentialMovingAverage(Net(), momentum=0.3, interval=2).state_dict()
    for ema in (stock, turbox):
        ema.load_state_dict(copy.deepcopy(fresh))
    assert int(turbox.steps) == 0
    run_pair(stock, turbox, model, steps=3, seed=1)
    # assign=True replaces the module's tensors; the turbox model averages the new ones.
    state = copy.deepcopy(turbox.state_dict())
    turbox.load_state_dict(copy.deepcopy(state), assign=True)
    stock.load_state_dict(copy.deepcopy(state))
    run_pair(stock, turbox, model, steps=3, seed=2)


def test_overridden_avg_func_keeps_mmengines_update():
    class Annealing(GraphExponentialMovingAverage):
        gamma = 10
        avg_func = MomentumAnnealingEMA.avg_func

    torch.manual_seed(0)
    model = Net()
    stock = MomentumAnnealingEMA(model, momentum=0.01, gamma=10)
    turbox = Annealing(model, momentum=0.01)
    run_pair(stock, turbox, model, steps=5)
    assert turbox.num_plans == 0


def test_copies_and_pickles_without_runtime_state():
    torch.manual_seed(0)
    model = Net()
    ema = GraphExponentialMovingAverage(model, momentum=0.2)
    run_pair(ExponentialMovingAverage(model, momentum=0.2), ema, model, steps=2)
    for twin in (copy.deepcopy(ema), pickle.loads(pickle.dumps(ema))):
        assert_same_state(ema, twin)
        assert twin.num_plans == 0
        twin.update_parameters(model)
        assert int(twin.steps) == 3


def test_copy_from_equals_mmengines_copy():
    torch.manual_seed(0)
    model = Net()
    ema = GraphExponentialMovingAverage(model, momentum=0.2)
    perturb(model, torch.Generator().manual_seed(0))
    ema.copy_from(model)
    assert_same_state(ema.module, model)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match='interval'):
        GraphExponentialMovingAverage(nn.Linear(1, 1), interval=0)
    with pytest.raises(ValueError, match='warmup'):
        GraphExponentialMovingAverage(nn.Linear(1, 1), warmup=-1)
    with pytest.raises(KeyError, match='NoSuchEMA'):
        TurboxEMAHook(ema_type='NoSuchEMA')
    with pytest.raises(TypeError, match='BaseAveragedModel'):
        TurboxEMAHook(ema_type=nn.Linear)


def test_ema_types_and_config_conversion():
    assert resolve_ema_type('ExponentialMovingAverage') is GraphExponentialMovingAverage
    assert resolve_ema_type('mmengine.StochasticWeightAverage').__name__ == \
        'StochasticWeightAverage'
    assert has_graph_update('turbox_mm.GraphExponentialMovingAverage')
    for name in ('MomentumAnnealingEMA', 'StochasticWeightAverage', 'mmdet.ExpMomentumEMA',
                 'NoSuchEMA'):
        assert not has_graph_update(name)
    stock = dict(type='EMAHook', ema_type='ExponentialMovingAverage', momentum=0.0002,
                 update_buffers=True, begin_iter=10, priority=49)
    assert convert_ema_hook_cfg(stock) == dict(
        stock, type='turbox_mm.TurboxEMAHook',
        ema_type='turbox_mm.GraphExponentialMovingAverage')
    assert stock['type'] == 'EMAHook'  # the input is left alone
    assert convert_ema_hook_cfg(dict(type='EMAHook'))['type'] == 'turbox_mm.TurboxEMAHook'
    assert convert_ema_hook_cfg(dict(type='CheckpointHook')) is None
    with pytest.raises(ValueError, match="ema_type='MomentumAnnealingEMA'"):
        convert_ema_hook_cfg(dict(type='EMAHook', ema_type='MomentumAnnealingEMA'))
    hook = TurboxEMAHook(ema_type='StochasticWeightAverage')
    assert hook.ema_cfg['type'].__name__ == 'StochasticWeightAverage'


def test_micro_benchmark_quick():
    rows = ema_bench.benchmark('cpu', quick=True)
    assert [r['component'] for r in rows] == ['ema']
    assert rows[0]['stock']['iters'] == rows[0]['turbox']['iters'] == 5
    assert 'max|stock-turbox|=0.0e+00' in rows[0]['note']


# -- the hook in a real Runner ---------------------------------------------------------------

class BNToyModel(BaseModel):
    """mmengine's toy model with a BatchNorm, so that buffers are averaged and swapped."""

    def __init__(self, data_preprocessor=None):
        super().__init__(data_preprocessor=data_preprocessor)
        self.linear1 = nn.Linear(2, 2)
        self.bn = nn.BatchNorm1d(2)
        self.linear2 = nn.Linear(2, 1)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        if isinstance(inputs, list):
            inputs = torch.stack(inputs)
        if isinstance(data_samples, list):
            data_samples = torch.stack(data_samples)
        outputs = self.linear2(self.bn(self.linear1(inputs)))
        if mode == 'loss':
            return dict(loss=((data_samples - outputs.squeeze(-1))**2).mean())
        return outputs


class SwapProbe(Hook):
    """Records the model around validation; runs after the EMA hook (lower priority)."""

    priority = 'LOW'

    def __init__(self):
        self.records = []

    def _ema_hook(self, runner):
        return next(h for h in runner.hooks if isinstance(h, EMAHook))

    def _state(self, module):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        ema = self._ema_hook(runner).ema_model
        self.last_train = self._state(runner.model)
        self.last_ema = self._state(ema.module)

    def before_val_epoch(self, runner):
        ema = self._ema_hook(runner).ema_model
        self.records.append(('val', self._state(runner.model), self._state(ema.module),
                             self.last_train, self.last_ema))

    def after_val_epoch(self, runner, metrics=None):
        self.records.append(('after', self._state(runner.model)))


def assert_dicts_equal(a, b):
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key].cpu(), b[key].cpu()), key


class TestHookInRunner(RunnerTestCase):

    def setUp(self):
        super().setUp()
        MMENGINE_MODELS.register_module(module=BNToyModel, force=True)
        cfg = self.iter_based_cfg
        cfg.model = dict(type='BNToyModel')
        cfg.train_cfg = dict(by_epoch=False, max_iters=8, val_interval=4)
        cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=4, by_epoch=False)
        cfg.randomness = dict(seed=0)
        self.ema_args = dict(momentum=0.2, interval=2, begin_iter=2, update_buffers=True)

    def tearDown(self):
        MMENGINE_MODELS.module_dict.pop('BNToyModel', None)
        super().tearDown()

    def _train(self, hook, work_dir, probe=None, resume_from=None):
        cfg = copy.deepcopy(self.iter_based_cfg)
        cfg.work_dir = work_dir
        cfg.custom_hooks = [hook]
        if resume_from:
            cfg.load_from, cfg.resume = resume_from, True
        runner = self.build_runner(cfg)
        if probe is not None:
            runner.register_hook(probe)
        runner.train()
        ema_hook = next(h for h in runner.hooks if isinstance(h, EMAHook))
        return runner, ema_hook

    def test_train_resume_and_swap_match_mmengine(self):
        root = self.temp_dir.name
        _, stock_hook = self._train(dict(type='EMAHook', **self.ema_args), f'{root}/stock')
        probe = SwapProbe()
        turbox_cfg = dict(type='turbox_mm.TurboxEMAHook', warmup=1, **self.ema_args)
        _, hook = self._train(turbox_cfg, f'{root}/turbox', probe=probe)
        assert isinstance(hook, TurboxEMAHook)
        assert isinstance(hook.ema_model, GraphExponentialMovingAverage)
        if torch.cuda.is_available():
            assert hook.ema_model.num_captures == 1

        def load(path):
            return torch.load(path, map_location='cpu', weights_only=True)

        stock = load(f'{root}/stock/iter_8.pth')
        turbox = load(f'{root}/turbox/iter_8.pth')
        assert_dicts_equal(stock['ema_state_dict'], turbox['ema_state_dict'])
        assert_dicts_equal(stock['state_dict'], turbox['state_dict'])
        assert int(turbox['ema_state_dict']['steps']) == 7  # iterations 2..8

        # Validation ran twice (iterations 4 and 8) on the EMA weights, and gave the
        # training weights back afterwards.
        assert [r[0] for r in probe.records] == ['val', 'after'] * 2
        for (_, during, ema_during, train, ema), (_, after) in zip(
                probe.records[::2], probe.records[1::2]):
            assert_dicts_equal(during, ema)
            assert_dicts_equal(ema_during, train)
            assert_dicts_equal(after, train)

        # Resume the turbox run from iteration 4 (written by mmengine's own hooks, with the
        # training weights swapped into ema_state_dict) and finish it.
        self._train(turbox_cfg, f'{root}/resumed', resume_from=f'{root}/turbox/iter_4.pth')
        resumed = load(f'{root}/resumed/iter_8.pth')
        assert_dicts_equal(turbox['ema_state_dict'], resumed['ema_state_dict'])
        assert_dicts_equal(turbox['state_dict'], resumed['state_dict'])


# -- CUDA: the graph path --------------------------------------------------------------------

def cuda_net():
    torch.manual_seed(0)
    return nn.Sequential(Net(), nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64),
                         nn.Linear(512, 1024)).cuda()


def count_replays():
    return mock.patch.object(torch.cuda.CUDAGraph, 'replay', autospec=True,
                             side_effect=torch.cuda.CUDAGraph.replay)


def run_three(stock, graph, eager, model, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        perturb(model, gen)
        emas = [ema for ema in (stock, graph, eager) if ema is not None]
        for ema in emas:
            ema.update_parameters(model)
        for ema in emas[1:]:
            assert_same_state(emas[0], ema)
    torch.cuda.synchronize()


@needs_cuda
@pytest.mark.parametrize('interval, update_buffers, kinds', [(1, True, 1), (3, False, 2)])
def test_graph_matches_eager_and_mmengine(interval, update_buffers, kinds):
    model = cuda_net()
    args = dict(momentum=0.01, interval=interval, update_buffers=update_buffers)
    stock = ExponentialMovingAverage(model, **args)
    graph = GraphExponentialMovingAverage(model, warmup=2, **args)
    eager = GraphExponentialMovingAverage(model, use_graph=False, **args)
    with count_replays() as replay:
        run_three(stock, graph, eager, model, steps=40)
    assert graph.num_captures == kinds and eager.num_captures == 0
    assert graph.graph_active
    # 39 updates after the copy at step 0, of which the first `warmup` ran eagerly; with
    # interval 3 and buffers copied, the calls in between replay a second, copy-only graph.
    assert replay.call_count == 37


@needs_cuda
def test_swap_for_validation_keeps_the_graph():
    model = cuda_net()
    graph = GraphExponentialMovingAverage(model, momentum=0.05, warmup=1)
    eager = GraphExponentialMovingAverage(model, momentum=0.05, use_graph=False)
    run_three(None, graph, eager, model, steps=5)
    hook = TurboxEMAHook(momentum=0.05)
    hook.src_model, hook.ema_model = model, graph
    before = copy.deepcopy(model.state_dict())
    averaged = copy.deepcopy(graph.module.state_dict())
    hook._swap_ema_parameters()
    assert_dicts_equal(averaged, model.state_dict())
    hook._swap_ema_parameters()
    assert_dicts_equal(before, model.state_dict())
    run_three(None, graph, eager, model, steps=5, seed=1)
    assert graph.num_captures == 1 and graph.num_plans == 1


@needs_cuda
def test_moved_or_replaced_tensors_are_captured_again():
    model = cuda_net()
    stock = ExponentialMovingAverage(model, momentum=0.05)
    graph = GraphExponentialMovingAverage(model, momentum=0.05, warmup=1)
    eager = GraphExponentialMovingAverage(model, momentum=0.05, use_graph=False)
    run_three(stock, graph, eager, model, steps=4)
    assert graph.num_captures == 1
    # In-place load: same addresses, same graph; steps is re-read.
    state = copy.deepcopy(graph.state_dict())
    for ema in (stock, graph, eager):
        ema.load_state_dict(copy.deepcopy(state))
    run_three(stock, graph, eager, model, steps=2, seed=1)
    assert graph.num_captures == 1
    # Changes that move storage or replace tensors; each needs a new capture.
    changes = [
        lambda: setattr(model[0].fc.bias, 'data', model[0].fc.bias.data.clone()),
        lambda: setattr(model[1], 'weight', nn.Parameter(model[1].weight.detach() * 2)),
        lambda: setattr(model[2], 'running_var', model[2].running_var.clone()),
    ]
    for n, change in enumerate(changes, start=2):
        change()
        run_three(stock, graph, eager, model, steps=2, seed=n)
        assert graph.num_captures == n
    graph.load_state_dict(copy.deepcopy(graph.state_dict()), assign=True)
    run_three(stock, graph, eager, model, steps=2, seed=9)
    assert graph.num_captures == 5
    for ema in (stock, graph, eager):
        ema.momentum = 0.1
    run_three(stock, graph, eager, model, steps=2, seed=10)
    assert graph.num_captures == 6


@needs_cuda
def test_graphs_are_given_up_when_tensors_move_every_step():
    model = cuda_net()
    stock = ExponentialMovingAverage(model, momentum=0.05)
    graph = GraphExponentialMovingAverage(model, momentum=0.05, warmup=0)
    for n in range(12):
        model[3].weight.data = model[3].weight.data.clone()
        run_three(stock, graph, None, model, steps=1, seed=n)
    # Step 0 copies; steps 1-8 capture once each; step 9 gives graphs up.
    assert graph.num_captures == 8 and not graph.graph_active
    assert 'too often' in graph._runtime.graph_disabled


@needs_cuda
def test_failed_capture_falls_back_to_eager():
    model = cuda_net()
    stock = ExponentialMovingAverage(model, momentum=0.05)
    graph = GraphExponentialMovingAverage(model, momentum=0.05, warmup=0)
    with mock.patch.object(torch.cuda.CUDAGraph, 'capture_begin',
                           side_effect=RuntimeError('no capture here')):
        run_three(stock, graph, None, model, steps=4)
    assert graph.num_captures == 0 and not graph.graph_active
    assert 'no capture here' in graph._runtime.graph_disabled
    run_three(stock, graph, None, model, steps=2, seed=1)
    assert graph.num_captures == 0


@needs_cuda
def test_averaged_model_on_another_device_runs_eagerly():
    model = cuda_net()
    stock = ExponentialMovingAverage(model, momentum=0.05, device='cpu')
    turbox = GraphExponentialMovingAverage(model, momentum=0.05, device='cpu')
    run_three(stock, turbox, None, model, steps=4)
    assert turbox.num_captures == 0


@needs_cuda
def test_micro_benchmark_quick_cuda():
    rows = ema_bench.benchmark('cuda', quick=True)
    assert 'graph=True' in rows[0]['note'] and 'max|stock-turbox|=0.0e+00' in rows[0]['note']
