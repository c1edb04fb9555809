"""EagerWarmupHook: the first training iterations run eagerly, then compiled code is used."""
import copy
import os

import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from torch._dynamo import eval_frame

from conftest import (build_model, config_with_root, make_sparsedrive_stage2_tiny,
                      train_batches, turbox_applied)
from turbox_mm.engine.hooks import EagerWarmupHook
from turbox_mm.engine.runner.turbox_options import TURBOX_OPTIONS
from turbox_mm.registry import HOOKS, MODELS
from turbox_mm.testing import SmokeModel

SMOKE = 'configs/smoke/smoke_turbox.py'


def _stance() -> str:
    return eval_frame._stance.stance


class _Blocks(torch.nn.Module):
    """The smoke model's conv blocks behind a forward of our own: Dynamo does not compile a
    frame of torch's own files (``nn.Sequential.forward``) on its own, only inlined."""

    def __init__(self, blocks: torch.nn.Module) -> None:
        super().__init__()
        self.blocks = blocks

    def forward(self, x):
        return self.blocks(x)


class _WarmupSmokeModel(SmokeModel):

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.backbone = _Blocks(self.backbone)


class _RecordIterations(Hook):
    """Records Dynamo's stance and its compiled-frame count at each training iteration's
    start and end (runs after the warm-up hook's before, and after its after)."""
    priority = 'NORMAL'
    seen = []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        from torch._dynamo.utils import counters
        type(self).seen.append(('before', _stance(), counters['frames']['ok']))

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        from torch._dynamo.utils import counters
        type(self).seen.append(('after', _stance(), counters['frames']['ok']))


@pytest.fixture(autouse=True)
def _registered():
    """The test model and hook in turbox_mm's registries while a test runs, not after."""
    MODELS.register_module(module=_WarmupSmokeModel, force=True)
    HOOKS.register_module(module=_RecordIterations, force=True)
    yield
    MODELS._module_dict.pop('_WarmupSmokeModel', None)
    HOOKS._module_dict.pop('_RecordIterations', None)


def _smoke_cfg(tmp_path, iters=3, eager_iters=1):
    cfg = Config.fromfile(SMOKE)
    cfg.work_dir = str(tmp_path)
    cfg.model.type = 'turbox_mm._WarmupSmokeModel'
    cfg.experiment_name = f'eager_warmup_{os.getpid()}_{eager_iters}'
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=iters, val_interval=100)
    cfg.train_dataloader.num_workers = 0
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=100)
    cfg.default_hooks.logger.interval = 100
    cfg.log_level = 'WARNING'
    cfg.custom_hooks = [dict(type='turbox_mm._RecordIterations')]
    cfg.turbox = dict(cfg.get('turbox', {}))
    cfg.turbox['system'] = dict(gc=False, cpu_affinity=False, huge_pages=False)
    cfg.turbox['loop'] = dict(pipelined=False)
    cfg.turbox['compile'] = dict(enable=True, modules='auto', backend='aot_eager',
                                 on_cpu=True, eager_iters=eager_iters)
    return cfg


def _train(cfg):
    from torch._dynamo.utils import counters

    from turbox_mm.engine.runner import TurboxRunner
    torch._dynamo.reset()
    counters.clear()
    _RecordIterations.seen = []
    runner = TurboxRunner.from_cfg(copy.deepcopy(cfg))
    runner.train()
    return runner


@pytest.mark.parametrize('eager_iters', [1, 2])
def test_the_first_iterations_run_eagerly_and_compile_nothing(tmp_path, eager_iters):
    runner = _train(_smoke_cfg(tmp_path, iters=4, eager_iters=eager_iters))
    hooks = [h for h in runner.hooks if isinstance(h, EagerWarmupHook)]
    assert len(hooks) == 1 and hooks[0].iters == eager_iters
    assert any('EagerWarmupHook' in c for c in runner.turbox_changes)
    seen = _RecordIterations.seen
    assert len(seen) == 8
    for i in range(eager_iters):  # eager, nothing compiled; the stance back after each
        assert seen[2 * i] == ('before', 'force_eager', 0), seen
        assert seen[2 * i + 1] == ('after', 'default', 0), seen
    first = seen[2 * eager_iters]  # the first compiled iteration compiles the backbone
    assert first == ('before', 'default', 0), seen
    assert seen[2 * eager_iters + 1][1:] == ('default', 1), seen
    assert seen[-1] == ('after', 'default', 1), seen  # and nothing after it recompiles
    assert _stance() == 'default'


def test_a_configured_hook_is_not_registered_twice(tmp_path):
    """Two hooks would give the stance back in the order they took it, leaving
    ``force_eager`` set for the rest of the run."""
    cfg = _smoke_cfg(tmp_path, iters=3)
    cfg.custom_hooks.append(dict(type='turbox_mm.EagerWarmupHook', iters=2))
    runner = _train(cfg)
    hooks = [h for h in runner.hooks if isinstance(h, EagerWarmupHook)]
    assert [h.iters for h in hooks] == [2]
    assert [s[1] for s in _RecordIterations.seen] == ['force_eager', 'default'] * 2 + [
        'default'] * 2
    assert _stance() == 'default'


def test_validation_between_eager_iterations_runs_compiled(tmp_path):
    """The stance is held within an iteration only: a validation after the first of two
    eager iterations runs with the previous stance."""
    cfg = _smoke_cfg(tmp_path, iters=2, eager_iters=2)
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=2, val_interval=1)
    stances = []

    @HOOKS.register_module(force=True)
    class _RecordVal(Hook):

        def before_val_iter(self, runner, batch_idx, data_batch=None):
            stances.append(_stance())

    try:
        cfg.custom_hooks.append(dict(type='turbox_mm._RecordVal'))
        _train(cfg)
    finally:
        HOOKS._module_dict.pop('_RecordVal', None)
    assert stances and set(stances) == {'default'}, stances


def test_eager_iters_0_registers_no_hook_and_compiles_at_once(tmp_path):
    runner = _train(_smoke_cfg(tmp_path, iters=2, eager_iters=0))
    assert not [h for h in runner.hooks if isinstance(h, EagerWarmupHook)]
    assert _RecordIterations.seen[:2] == [('before', 'default', 0), ('after', 'default', 1)]


def test_no_hook_where_nothing_is_compiled(tmp_path):
    cfg = _smoke_cfg(tmp_path, iters=1)
    cfg.turbox['compile'] = dict(enable=False)
    runner = _train(cfg)
    assert not [h for h in runner.hooks if isinstance(h, EagerWarmupHook)]


def test_a_failing_first_iteration_gives_the_stance_back(tmp_path, monkeypatch):
    def fail(self, *args, **kwargs):
        raise RuntimeError('boom in the first step')

    monkeypatch.setattr(SmokeModel, 'forward', fail)
    with pytest.raises(RuntimeError, match='boom in the first step'):
        _train(_smoke_cfg(tmp_path, iters=2))
    assert _RecordIterations.seen == [('before', 'force_eager', 0)]
    assert _stance() == 'default'


def test_negative_eager_iters_is_a_named_error(tmp_path):
    with pytest.raises(ValueError, match=r"'turbox.compile.eager_iters' must be >= 0, got -1"):
        _train(_smoke_cfg(tmp_path, eager_iters=-1))
    with pytest.raises(ValueError, match='iters must be an int >= 0'):
        EagerWarmupHook(iters=True)


def test_the_previous_stance_comes_back():
    """A stance the user set before training is what the hook restores, not 'default'."""
    hook = EagerWarmupHook(iters=1)
    with torch.compiler.set_stance('eager_on_recompile'):
        hook.before_train_iter(None, 0)
        assert _stance() == 'force_eager'
        hook.after_train_iter(None, 0)
        assert _stance() == 'eager_on_recompile'
        hook.before_train_iter(None, 1)  # done: nothing more
        assert _stance() == 'eager_on_recompile'
    hook.restore()  # holds nothing: a no-op
    assert _stance() == 'default'


def test_sparsedrive_stage2_compiles_fewer_graphs_without_its_first_frame(tmp_path, full_fp32):
    """What the hook is for: the tiny SparseDrive stage-2 model, its heads compiled as
    ``modules='auto'`` does (Dynamo with its eager backend: the frames counted are Dynamo's
    whatever the backend), over five temporal frames. Compiling the first frame (no cached
    instances, no queue) compiles graphs that no later frame uses; run eagerly, the first
    frame adds none, and the later frames need fewer graphs in all."""
    from torch._dynamo.utils import counters

    from turbox_mm.engine.runner.module_compiler import compile_submodules
    root = make_sparsedrive_stage2_tiny(tmp_path / 'nuscenes_tiny2')
    cfg, _ = turbox_applied(config_with_root(
        'configs/sparsedrive/sparsedrive_tiny_stage2_turbox.py', root))
    totals = {}
    limit = TURBOX_OPTIONS['compile']['recompile_limit'].default  # the runner's, not torch's 8
    for eager_iters in (0, 1):
        torch.manual_seed(0)
        torch._dynamo.reset()
        counters.clear()
        model = build_model(cfg)
        compile_submodules(model, 'auto', backend='eager')
        hook = EagerWarmupHook(eager_iters)
        per_step = []
        with torch._dynamo.config.patch(recompile_limit=limit):
            _frames_per_step(model, cfg, hook, per_step)
        assert counters['frames']['total'] == counters['frames']['ok']
        totals[eager_iters] = per_step
    assert totals[1][0] == 0
    # the second and third frames compile most of what is needed (the motion queue's second
    # length marks its dimension dynamic in the layers); the queue's own steps (compiled
    # methods) compile one variant per queue length until the queue is full, then nothing
    # more: measured [0, 44, 48, 50, 51] over five frames (under aot_eager)
    assert totals[1][-1] - totals[1][2] <= 3, totals
    # fewer graphs in all without the first frame (measured 66 with it, 51 without)
    assert totals[1][-1] < totals[0][-1], totals


def _frames_per_step(model, cfg, hook, per_step, steps=5):
    """Train ``steps`` temporal frames with ``hook``'s stance, recording Dynamo's count of
    compiled frames after each."""
    from torch._dynamo.utils import counters
    for step, data in enumerate(train_batches(cfg, steps)):
        hook.before_train_iter(None, step)
        model.train()
        batch = model.data_preprocessor(copy.deepcopy(data), training=True)
        losses = model.loss(batch['inputs'], batch['data_samples'])
        sum(v for k, v in losses.items() if 'loss' in k).backward()
        hook.after_train_iter(None, step)
        per_step.append(counters['frames']['ok'])
