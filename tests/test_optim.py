"""Fused optimizers and sync-free clipping against mmengine's stock optim wrappers.

The references are mmengine's own ``DefaultOptimWrapperConstructor``, ``OptimWrapper`` and
``AmpOptimWrapper`` and ``torch.nn.utils.clip_grad_norm_``. ``AmpOptimWrapper`` insists on a
GPU; on the CPU it is built here with ``is_cuda_available`` patched and a CPU ``GradScaler``,
which runs the same unscale / inf-check / fused-step code paths.
"""
import contextlib
import copy
import functools
import math
import uuid
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.config import ConfigDict
from mmengine.logging import MessageHub
from mmengine.optim import AmpOptimWrapper, DefaultOptimWrapperConstructor, OptimWrapper
from mmengine.optim.optimizer import amp_optimizer_wrapper as amp_module

# Imported explicitly: the package __init__ does not import these modules (yet).
from turbox_mm.engine.optim import fused_optim_wrapper_constructor as ctor_module
from turbox_mm.engine.optim.fused_optim_wrapper_constructor import TurboxOptimWrapperConstructor
from turbox_mm.engine.optim.merged_adam import MERGED_TWINS, TurboxAdamW, bucket_count
from turbox_mm.engine.optim.sync_free_optim_wrapper import (AsyncScalarLog,
                                                            TurboxAmpOptimWrapper,
                                                            TurboxOptimWrapper)

PARAMWISE = dict(bias_lr_mult=2.0, norm_decay_mult=0.0,
                 custom_keys={'head': dict(lr_mult=0.1, decay_mult=0.5)})
ADAMW = dict(type='AdamW', lr=1e-2, weight_decay=0.05)
SGD = dict(type='SGD', lr=0.05, momentum=0.9, weight_decay=1e-4)
STEPS = 5


class Net(nn.Module):
    """Conv, BN, depth-wise conv, head: every paramwise_cfg rule has something to act on.

    The first conv has no bias: a bias followed by BN gets a zero gradient up to rounding,
    which Adam would blow up into noise that differs between kernels.
    """

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(8),
                                      nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.backbone(x).mean((2, 3)))


def make_model(seed=0, device='cpu'):
    torch.manual_seed(seed)
    return Net().to(device)


def batches(n=STEPS, device='cpu'):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 8, 8, generator=gen).to(device) for _ in range(n)]


def fresh_hub():
    """A new current message hub, so that each wrapper logs into its own."""
    return MessageHub.get_instance(f'test_optim-{uuid.uuid4().hex}')


def build(constructor_cls, model, optimizer, wrapper='OptimWrapper', paramwise_cfg=None,
          **wrapper_kwargs):
    cfg = dict(type=wrapper, optimizer=optimizer, **wrapper_kwargs)
    return constructor_cls(copy.deepcopy(cfg), copy.deepcopy(paramwise_cfg))(model)


@contextlib.contextmanager
def cpu_amp():
    """Let mmengine's AmpOptimWrapper be built on the CPU, with a CPU GradScaler."""
    with mock.patch.object(amp_module, 'is_cuda_available', return_value=True), \
            mock.patch.object(amp_module, 'GradScaler',
                              functools.partial(torch.amp.GradScaler, 'cpu')):
        yield


def train(constructor_cls, wrapper, optimizer, clip_grad, steps=STEPS, model=None,
          device='cpu', poison_step=None, **wrapper_kwargs):
    """Train ``Net`` for ``steps``; return the model, the wrapper and its message hub."""
    model = make_model(device=device) if model is None else model
    hub = fresh_hub()
    if clip_grad is not None:
        wrapper_kwargs['clip_grad'] = clip_grad
    optim_wrapper = build(constructor_cls, model, optimizer, wrapper, PARAMWISE,
                          **wrapper_kwargs)
    for i, x in enumerate(batches(steps, device)):
        with optim_wrapper.optim_context(model):
            loss = model(x).float().pow(2).mean() * 10
        if i == poison_step:
            loss = loss * float('inf')
        optim_wrapper.update_params(loss)
    return model, optim_wrapper, hub


def norm_history(hub):
    if 'train/grad_norm' not in hub.log_scalars:
        return []
    return hub.get_scalar('train/grad_norm').data[0].tolist()


def assert_same_norms(a, b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # NaN == NaN here


def assert_same_params(a, b, exact=True, rtol=1e-5, atol=1e-6):
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if exact:
            rtol = atol = 0
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f'{name}: {m}')


def differ(a, b):
    return any(not torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))


@contextlib.contextmanager
def forbid_host_reads():
    """Fail on any Python-level read of a tensor value (``item``, ``float()``, ``bool()``...)."""

    def boom(*args, **kwargs):
        raise AssertionError('host read of a tensor value')

    with contextlib.ExitStack() as stack:
        for name in ('item', 'tolist', '__float__', '__int__', '__bool__'):
            stack.enter_context(mock.patch.object(torch.Tensor, name, boom))
        yield


# --- constructor --------------------------------------------------------------------------


@pytest.mark.parametrize('optimizer', [
    ADAMW, dict(type='Adam', lr=1e-3, weight_decay=1e-4), SGD,
    dict(type='torch.optim.AdamW', lr=1e-3, weight_decay=0.05),
    dict(type=torch.optim.AdamW, lr=1e-3, weight_decay=0.05)
], ids=['AdamW', 'Adam', 'SGD', 'torch.optim.AdamW', 'class'])
def test_param_groups_match_mmengine_and_are_fused(optimizer):
    model = make_model()
    ref = build(DefaultOptimWrapperConstructor, model, optimizer, paramwise_cfg=PARAMWISE)
    ours = build(TurboxOptimWrapperConstructor, model, optimizer, paramwise_cfg=PARAMWISE)
    assert type(ours) is OptimWrapper  # the wrapper type is built as written
    ref, ours = ref.optimizer, ours.optimizer
    # Adam/AdamW become their merged-step twins (a subclass); SGD stays torch's class.
    assert type(ours) is MERGED_TWINS.get(type(ref), type(ref)) and isinstance(ours, type(ref))
    assert len(ours.param_groups) == len(ref.param_groups) == len(list(model.parameters()))

    def settings(group):
        return {k: v for k, v in group.items() if k not in ('params', 'fused', 'foreach')}

    for g_ref, g in zip(ref.param_groups, ours.param_groups):
        assert [id(p) for p in g['params']] == [id(p) for p in g_ref['params']]
        assert settings(g) == settings(g_ref)
        assert g['fused'] is True and not g['foreach']
        assert not g_ref['fused']
    assert ours.defaults['fused'] is True and ours._step_supports_amp_scaling
    # The multipliers took effect on both sides (so the comparison is not vacuous).
    lr = optimizer['lr']
    assert {g['lr'] for g in ours.param_groups} == {lr, 2 * lr, 0.1 * lr}
    assert 0.0 in {g['weight_decay'] for g in ours.param_groups}


@pytest.mark.parametrize(
    'optimizer', [ADAMW, SGD, dict(type='RMSprop', lr=1e-3, weight_decay=1e-4)],
    ids=['AdamW', 'SGD', 'RMSprop'])
def test_param_groups_from_a_config_file_become_plain_dicts(optimizer):
    """A runner's config is a ConfigDict, so mmengine's groups are ConfigDicts (slow reads:
    torch's step makes thousands a step with one group a parameter); ours are plain dicts
    with the same entries and the same parameter lists."""
    model = make_model()

    def built(constructor_cls):
        cfg = ConfigDict(type='OptimWrapper', optimizer=copy.deepcopy(optimizer))
        return constructor_cls(cfg, ConfigDict(copy.deepcopy(PARAMWISE)))(model).optimizer

    ref, ours = built(DefaultOptimWrapperConstructor), built(TurboxOptimWrapperConstructor)
    assert {type(g) for g in ref.param_groups} == {ConfigDict}
    assert {type(g) for g in ours.param_groups} == {dict}
    for g_ref, g in zip(ref.param_groups, ours.param_groups):
        assert g['params'] is not None and [id(p) for p in g['params']] == [
            id(p) for p in g_ref['params']]
        assert {k: v for k, v in g.items() if k not in ('params', 'fused', 'foreach')} == {
            k: v for k, v in g_ref.items() if k not in ('params', 'fused', 'foreach')}


def test_fused_without_paramwise_cfg():
    model = make_model()
    optim_wrapper = build(TurboxOptimWrapperConstructor, model, ADAMW)
    (group, ) = optim_wrapper.optimizer.param_groups
    assert group['fused'] is True and len(group['params']) == len(list(model.parameters()))


@pytest.mark.parametrize('setting', [dict(fused=False), dict(foreach=True), dict(foreach=False),
                                     dict(differentiable=True)])
def test_explicit_kernel_setting_is_kept(setting):
    optimizer = build(TurboxOptimWrapperConstructor, make_model(), dict(ADAMW, **setting),
                      paramwise_cfg=PARAMWISE).optimizer
    for key, value in setting.items():
        assert optimizer.defaults[key] is value
    assert not optimizer.defaults['fused']


def test_other_optimizer_types_are_left_unchanged():
    model = make_model()
    optimizer = dict(type='RMSprop', lr=1e-3, weight_decay=1e-4)
    with mock.patch.object(ctor_module, 'print_log', wraps=ctor_module.print_log) as log:
        ours = build(TurboxOptimWrapperConstructor, model, optimizer, paramwise_cfg=PARAMWISE)
    ref = build(DefaultOptimWrapperConstructor, model, optimizer, paramwise_cfg=PARAMWISE)
    assert type(ours.optimizer) is torch.optim.RMSprop
    assert ours.optimizer.defaults == ref.optimizer.defaults
    for g_ref, g in zip(ref.optimizer.param_groups, ours.optimizer.param_groups):
        assert {k: v for k, v in g.items() if k != 'params'} == \
            {k: v for k, v in g_ref.items() if k != 'params'}
    assert any('RMSprop' in call.args[0] for call in log.call_args_list)


def test_unfusable_parameter_falls_back_to_foreach_with_one_warning():
    model = make_model()
    model.phase = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    with mock.patch.object(ctor_module, 'print_log', wraps=ctor_module.print_log) as log:
        optimizer = build(TurboxOptimWrapperConstructor, model, ADAMW).optimizer
    assert optimizer.defaults['foreach'] is True and not optimizer.defaults['fused']
    warnings = [c for c in log.call_args_list if c.kwargs.get('level') == 30]
    assert len(warnings) == 1
    assert "'phase'" in warnings[0].args[0] and 'complex64' in warnings[0].args[0]


def test_device_without_fused_or_foreach_keeps_torch_default():
    with torch.device('meta'):
        model = Net()
    with mock.patch.object(ctor_module, 'print_log', wraps=ctor_module.print_log) as log:
        optimizer = build(TurboxOptimWrapperConstructor, model, ADAMW).optimizer
    assert optimizer.defaults['fused'] is None and optimizer.defaults['foreach'] is None
    (warning, ) = [c for c in log.call_args_list if c.kwargs.get('level') == 30]
    assert 'meta' in warning.args[0]


# --- training parity ----------------------------------------------------------------------

CLIPS = [
    dict(max_norm=0.05, norm_type=2),
    dict(max_norm=0.2, norm_type=1),
    dict(max_norm=0.01, norm_type='inf'),
    dict(type='value', clip_value=0.005),
    None,
]


@pytest.mark.parametrize('clip_grad', CLIPS, ids=['L2', 'L1', 'inf', 'value', 'none'])
@pytest.mark.parametrize('optimizer', [ADAMW, SGD], ids=['AdamW', 'SGD'])
def test_training_matches_stock_optim_wrapper(optimizer, clip_grad):
    # Same fused kernel on both sides: only the clipping and logging path differ -> bit-exact.
    stock, _, stock_hub = train(DefaultOptimWrapperConstructor, 'OptimWrapper',
                                dict(optimizer, fused=True), copy.deepcopy(clip_grad))
    ours, optim_wrapper, hub = train(TurboxOptimWrapperConstructor, 'turbox_mm.TurboxOptimWrapper',
                                     optimizer, copy.deepcopy(clip_grad))
    assert isinstance(optim_wrapper, TurboxOptimWrapper)
    assert optim_wrapper.optimizer.defaults['fused'] is True
    assert_same_params(ours, stock)
    assert_same_norms(norm_history(hub), norm_history(stock_hub))
    if clip_grad is not None and clip_grad.get('type', 'norm') == 'norm':
        assert len(norm_history(hub)) == STEPS
        assert max(norm_history(hub)) > clip_grad['max_norm']  # clipping was active
    # torch's default kernel (the for-loop on the CPU) agrees to rounding.
    default, _, _ = train(DefaultOptimWrapperConstructor, 'OptimWrapper', optimizer,
                          copy.deepcopy(clip_grad))
    assert_same_params(ours, default, exact=False)
    if clip_grad is not None:
        unclipped, _, _ = train(TurboxOptimWrapperConstructor, TurboxOptimWrapper, optimizer, None)
        assert differ(ours, unclipped)


def test_nonfinite_norm_proceeds_like_torch():
    """error_if_nonfinite=False: the step runs with NaN gradients, as in stock mmengine."""
    clip = dict(max_norm=0.05)
    stock, _, stock_hub = train(DefaultOptimWrapperConstructor, 'OptimWrapper',
                                dict(ADAMW, fused=True), dict(clip), poison_step=2)
    ours, _, hub = train(TurboxOptimWrapperConstructor, TurboxOptimWrapper, ADAMW, dict(clip),
                         poison_step=2)
    assert_same_params(ours, stock)
    assert any(torch.isnan(p).any() for p in ours.parameters())
    assert math.isinf(norm_history(hub)[2]) or math.isnan(norm_history(hub)[2])
    assert len(norm_history(hub)) == len(norm_history(stock_hub)) == STEPS


def test_error_if_nonfinite_uses_mmengine_clipping():
    clip = dict(max_norm=0.05, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match='non-finite'):
        train(TurboxOptimWrapperConstructor, TurboxOptimWrapper, ADAMW, clip, poison_step=1)


@pytest.mark.parametrize('loss_scale',
                         ['dynamic', 512.0, dict(init_scale=1024.0, growth_interval=2)],
                         ids=['dynamic', 'static', 'dict'])
def test_amp_training_matches_stock_amp_optim_wrapper(loss_scale):
    clip = dict(max_norm=0.05)
    with cpu_amp():
        stock, stock_wrapper, stock_hub = train(
            DefaultOptimWrapperConstructor, 'AmpOptimWrapper', dict(ADAMW, fused=True),
            dict(clip), loss_scale=copy.deepcopy(loss_scale), dtype='bfloat16', poison_step=2)
        ours, optim_wrapper, hub = train(
            TurboxOptimWrapperConstructor, TurboxAmpOptimWrapper, ADAMW, dict(clip),
            loss_scale=copy.deepcopy(loss_scale), dtype='bfloat16', poison_step=2)
    assert isinstance(optim_wrapper, AmpOptimWrapper)
    assert optim_wrapper.optimizer.defaults['fused'] is True
    assert_same_params(ours, stock)
    assert all(torch.isfinite(p).all() for p in ours.parameters())  # the inf step was skipped
    assert optim_wrapper.loss_scaler.state_dict() == stock_wrapper.loss_scaler.state_dict()
    assert_same_norms(norm_history(hub), norm_history(stock_hub))
    if loss_scale == 'dynamic':
        assert optim_wrapper.loss_scaler.get_scale() == 2.0**15  # backed off once


# --- clipping -----------------------------------------------------------------------------


@pytest.mark.parametrize('nonfinite', [False, True], ids=['finite', 'nan'])
@pytest.mark.parametrize('norm_type', [2, 1, 'inf', 2.5])
def test_clip_equals_torch_clip_grad_norm(norm_type, nonfinite):
    model = make_model()
    gen = torch.Generator().manual_seed(3)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    model.head.bias.grad = None  # no gradient: left out, as by mmengine
    model.backbone[3].bias.requires_grad_(False)  # frozen: left out, although it has a grad
    if nonfinite:
        model.head.weight.grad[0, 0] = float('nan')
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    before = [p.grad.clone() for p in params]
    frozen_grad = model.backbone[3].bias.grad.clone()

    ref_grads = [g.clone().requires_grad_() for g in before]
    for g in ref_grads:
        g.grad = g.detach().clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref_grads, 0.5, norm_type)

    hub = fresh_hub()
    optim_wrapper = TurboxOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1),
                                       clip_grad=dict(max_norm=0.5, norm_type=norm_type))
    optim_wrapper._clip_grad()
    for p, g in zip(params, ref_grads):
        torch.testing.assert_close(p.grad, g.grad, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(model.backbone[3].bias.grad, frozen_grad)
    (logged, ) = norm_history(hub)
    assert logged == pytest.approx(ref_norm.item(), nan_ok=True)
    if not nonfinite:
        # And the definition, written out.
        flat = torch.cat([g.flatten() for g in before])
        total = torch.linalg.vector_norm(flat, float(norm_type))
        coef = torch.clamp(0.5 / (total + 1e-6), max=1.0)
        assert coef < 1  # clipping is active
        for p, g in zip(params, before):
            torch.testing.assert_close(p.grad, g * coef, rtol=1e-5, atol=1e-7)


# --- no host sync ---------------------------------------------------------------------------


def _step_twice_forbidding_host_reads(model, optim_wrapper):
    xs = batches(3)
    optim_wrapper.update_params(model(xs[0]).pow(2).mean())  # warm-up: optimizer state
    losses = [model(x).pow(2).mean() for x in xs[1:]]
    with forbid_host_reads():
        for loss in losses:
            optim_wrapper.update_params(loss)


@pytest.mark.parametrize('wrapper, expect_sync', [
    ('OptimWrapper', True),
    (TurboxOptimWrapper, False),
], ids=['stock', 'turbox'])
def test_no_host_read_in_update_params(wrapper, expect_sync):
    model = make_model()
    hub = fresh_hub()
    optim_wrapper = build(TurboxOptimWrapperConstructor, model, ADAMW, wrapper, PARAMWISE,
                          clip_grad=dict(max_norm=0.05))
    if expect_sync:  # the control: the patch does catch mmengine's float(grad_norm)
        with pytest.raises(AssertionError, match='host read'):
            _step_twice_forbidding_host_reads(model, optim_wrapper)
    else:
        _step_twice_forbidding_host_reads(model, optim_wrapper)
        assert len(norm_history(hub)) == 3


@pytest.mark.parametrize('loss_scale', ['dynamic', 512.0])
@pytest.mark.parametrize('fused', [True, False], ids=['fused', 'for-loop'])
def test_no_host_read_in_amp_update_params_with_fused_optimizer(fused, loss_scale):
    model = make_model()
    with cpu_amp():
        optim_wrapper = build(TurboxOptimWrapperConstructor, model,
                              dict(ADAMW, fused=fused), TurboxAmpOptimWrapper, PARAMWISE,
                              clip_grad=dict(max_norm=0.05), loss_scale=loss_scale)
    if fused:
        _step_twice_forbidding_host_reads(model, optim_wrapper)
    else:  # GradScaler.step reads found_inf (and the for-loop AdamW its step count)
        with pytest.raises(AssertionError, match='host read'):
            _step_twice_forbidding_host_reads(model, optim_wrapper)


# --- deferred logging ---------------------------------------------------------------------


class FakeEvent:

    def __init__(self):
        self.done = False
        self.waited = False

    def query(self):
        return self.done

    def synchronize(self):
        self.waited = True
        self.done = True


class DeferredCPULog(AsyncScalarLog):
    """AsyncScalarLog with the CUDA pieces replaced: CPU values, hand-completed events."""
    ASYNC_DEVICES = ('cpu', )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.events = []

    def _allocate_host(self, width):
        return torch.full((self.capacity, width), -1.0, dtype=torch.float64)

    def _record_event(self, device):
        self.events.append(FakeEvent())
        return self.events[-1]


def test_deferred_values_reach_the_hub_in_order():
    hub = fresh_hub()
    log = DeferredCPULog(hub, 'train/grad_norm', capacity=3)
    for v in (1.0, 2.0, 3.0):
        log.push(torch.tensor(v))
    assert norm_history(hub) == [] and log.num_pending == 3
    log.events[0].done = log.events[2].done = True
    log.poll()
    assert norm_history(hub) == [1.0]  # 3.0 waits behind 2.0
    log.events[1].done = True
    log.poll()
    assert norm_history(hub) == [1.0, 2.0, 3.0] and log.num_pending == 0
    assert not any(e.waited for e in log.events)


def test_deferred_log_waits_only_when_capacity_steps_behind():
    hub = fresh_hub()
    log = DeferredCPULog(hub, 'train/grad_norm', capacity=3)
    for v in (1.0, 2.0, 3.0, 4.0):
        log.push(torch.tensor(v))
    assert [e.waited for e in log.events] == [True, False, False, False]
    assert norm_history(hub) == [1.0] and log.num_pending == 3
    log.flush()
    assert norm_history(hub) == [1.0, 2.0, 3.0, 4.0]  # slot 0 was reused without clobbering


def test_log_interval_is_validated():
    with pytest.raises(ValueError, match='log_interval'):
        TurboxOptimWrapper(torch.optim.SGD(make_model().parameters(), lr=0.1),
                           clip_grad=dict(max_norm=1.0), log_interval=0)


# --- checkpoints and the runner -----------------------------------------------------------


@pytest.mark.parametrize('amp', [False, True], ids=['fp32', 'amp'])
def test_state_dict_round_trip(amp):
    wrapper = TurboxAmpOptimWrapper if amp else TurboxOptimWrapper
    stock_wrapper = 'AmpOptimWrapper' if amp else 'OptimWrapper'
    extra = dict(loss_scale=dict(init_scale=256.0, growth_interval=1)) if amp else {}
    with cpu_amp():
        model, optim_wrapper, _ = train(TurboxOptimWrapperConstructor, wrapper, ADAMW,
                                        dict(max_norm=0.05), steps=3, **extra)
        state = optim_wrapper.state_dict()
        if amp:
            assert state['loss_scaler']['scale'] == 256.0 * 2**3
        resumed = {}
        for name, ctor, kind in (('turbox', TurboxOptimWrapperConstructor, wrapper),
                                 ('stock', DefaultOptimWrapperConstructor, stock_wrapper)):
            twin = make_model()
            twin.load_state_dict(model.state_dict())
            twin_wrapper = build(ctor, twin, dict(ADAMW, fused=True), kind, PARAMWISE,
                                 clip_grad=dict(max_norm=0.05), **extra)
            twin_wrapper.load_state_dict(copy.deepcopy(state))
            resumed[name] = (twin, twin_wrapper)
    for m, w in [(model, optim_wrapper), *resumed.values()]:
        for x in batches(2):
            w.update_params(m(x).pow(2).mean())
    for twin, twin_wrapper in resumed.values():
        assert_same_params(twin, model)
        if amp:
            assert twin_wrapper.loss_scaler.get_scale() == optim_wrapper.loss_scaler.get_scale()


def train_toy_runner(work_dir, **optim_wrapper):
    """Train mmengine's toy model for 4 iterations with a Runner; return the runner."""
    from mmengine.runner import Runner
    from mmengine.testing.runner_test_case import ToyDataset, ToyModel
    runner = Runner(
        model=ToyModel(),
        work_dir=str(work_dir),
        train_dataloader=dict(dataset=dict(type=ToyDataset),
                              sampler=dict(type='DefaultSampler', shuffle=False),
                              batch_size=3, num_workers=0),
        train_cfg=dict(by_epoch=False, max_iters=4),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=1e-3),
                           clip_grad=dict(max_norm=35, norm_type=2),
                           constructor='turbox_mm.TurboxOptimWrapperConstructor',
                           paramwise_cfg=dict(bias_lr_mult=2.0), **optim_wrapper),
        default_hooks=dict(logger=dict(type='LoggerHook', interval=1)),
        log_processor=dict(by_epoch=False),
        experiment_name=f'test_optim-{uuid.uuid4().hex}')
    runner.train()
    assert all(g['fused'] is True for g in runner.optim_wrapper.optimizer.param_groups)
    if hasattr(runner.optim_wrapper, 'flush_grad_norm'):
        runner.optim_wrapper.flush_grad_norm()
    history = runner.message_hub.get_scalar('train/grad_norm').data[0]
    assert len(history) == 4 and all(math.isfinite(v) and v > 0 for v in history)
    return runner


def test_built_and_trained_by_a_runner(tmp_path):
    runner = train_toy_runner(tmp_path, type='turbox_mm.TurboxOptimWrapper')
    assert type(runner.optim_wrapper) is TurboxOptimWrapper


@pytest.mark.cuda
def test_cuda_amp_built_and_trained_by_a_runner(tmp_path):
    # Dynamic scaling from a small initial scale: at the default 65536 the toy model's fp16
    # gradients overflow in the first steps (skipped steps with inf norms, as in stock).
    runner = train_toy_runner(tmp_path, type='turbox_mm.TurboxAmpOptimWrapper',
                              loss_scale=dict(init_scale=16.0), dtype='float16')
    assert type(runner.optim_wrapper) is TurboxAmpOptimWrapper
    assert next(runner.model.parameters()).is_cuda


def test_micro_benchmark_runs_quick():
    from turbox_mm.benchmark.micro import get
    from turbox_mm.benchmark.timing import format_rows
    rows = get('optimizer')('cpu', quick=True)
    assert [r['component'] for r in rows] == ['optimizer'] * 4
    for row in rows[:3]:
        assert row['stock']['median_ms'] > 0 and row['turbox']['median_ms'] > 0
    assert rows[3]['stock'] is None and 'CUDA' in rows[3]['note']
    assert 'ResNet-50+FPN' in format_rows(rows)


# --- GPU ------------------------------------------------------------------------------------

CUDA_CASES = {
    'fp32': dict(wrapper=TurboxOptimWrapper, stock='OptimWrapper'),
    # Dynamic scaling from a small initial scale: at the default 65536 the first steps of the
    # toy model overflow (skipped, with an inf norm, in stock too).
    'fp16-dynamic': dict(wrapper=TurboxAmpOptimWrapper, stock='AmpOptimWrapper',
                         loss_scale=dict(init_scale=16.0), dtype='float16'),
    'fp16-static': dict(wrapper=TurboxAmpOptimWrapper, stock='AmpOptimWrapper',
                        loss_scale=512.0, dtype='float16'),
    'bf16': dict(wrapper=TurboxAmpOptimWrapper, stock='AmpOptimWrapper', dtype='bfloat16'),
}


@contextlib.contextmanager
def sync_debug_error():
    torch.cuda.set_sync_debug_mode('error')
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _cuda_losses(model, optim_wrapper, n):
    losses = []
    for x in batches(n, 'cuda'):
        with optim_wrapper.optim_context(model):
            losses.append(model(x).float().pow(2).mean() * 10)
    return losses


@pytest.mark.cuda
@pytest.mark.parametrize('case', list(CUDA_CASES))
def test_cuda_update_params_is_sync_free(case):
    kwargs = dict(CUDA_CASES[case])
    wrapper, stock = kwargs.pop('wrapper'), kwargs.pop('stock')
    for kind, expect_sync in ((wrapper, False), (stock, True)):
        model = make_model(device='cuda')
        hub = fresh_hub()
        optim_wrapper = build(TurboxOptimWrapperConstructor, model, ADAMW, kind, PARAMWISE,
                              clip_grad=dict(max_norm=0.05, norm_type=2), **kwargs)
        assert optim_wrapper.optimizer.defaults['fused'] is True
        optim_wrapper.update_params(_cuda_losses(model, optim_wrapper, 1)[0])  # warm-up
        losses = _cuda_losses(model, optim_wrapper, 3)
        if expect_sync:  # the control: mmengine's float(grad_norm) is caught
            with pytest.raises(RuntimeError), sync_debug_error():
                optim_wrapper.update_params(losses[0])
            continue
        with sync_debug_error():
            for loss in losses:
                optim_wrapper.update_params(loss)
        torch.cuda.synchronize()
        optim_wrapper.flush_grad_norm()
        history = norm_history(hub)
        assert len(history) == 4 and all(math.isfinite(v) for v in history)


@pytest.mark.cuda
def test_cuda_amp_with_unfused_optimizer_syncs():
    """The other control: without fused kernels GradScaler.step reads found_inf."""
    model = make_model(device='cuda')
    optim_wrapper = build(TurboxOptimWrapperConstructor, model, dict(ADAMW, foreach=True),
                          TurboxAmpOptimWrapper, clip_grad=dict(max_norm=0.05))
    optim_wrapper.update_params(_cuda_losses(model, optim_wrapper, 1)[0])
    loss = _cuda_losses(model, optim_wrapper, 1)[0]
    with pytest.raises(RuntimeError), sync_debug_error():
        optim_wrapper.update_params(loss)


@pytest.mark.cuda
@pytest.mark.parametrize('case', list(CUDA_CASES))
def test_cuda_training_matches_stock(case):
    kwargs = dict(CUDA_CASES[case])
    wrapper, stock = kwargs.pop('wrapper'), kwargs.pop('stock')
    poison = 2 if wrapper is TurboxAmpOptimWrapper else None
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        ref, ref_wrapper, ref_hub = train(DefaultOptimWrapperConstructor, stock,
                                          dict(ADAMW, fused=True), dict(max_norm=0.05),
                                          device='cuda', poison_step=poison, **kwargs)
        ours, optim_wrapper, hub = train(TurboxOptimWrapperConstructor, wrapper, ADAMW,
                                         dict(max_norm=0.05), device='cuda',
                                         poison_step=poison, **kwargs)
    torch.cuda.synchronize()
    optim_wrapper.flush_grad_norm()
    # Two runs of the same kernels; cuDNN is made deterministic, the tolerance covers the rest.
    assert_same_params(ours, ref, exact=False, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(norm_history(hub), norm_history(ref_hub), rtol=1e-4)
    if poison is not None:
        assert all(torch.isfinite(p).all() for p in ours.parameters())
        assert optim_wrapper.loss_scaler.state_dict() == ref_wrapper.loss_scaler.state_dict()


@pytest.mark.cuda
def test_cuda_norms_arrive_without_flush():
    """Completed copies are pushed by the next step's poll, with no explicit wait."""
    model = make_model(device='cuda')
    hub = fresh_hub()
    optim_wrapper = build(TurboxOptimWrapperConstructor, model, ADAMW, TurboxOptimWrapper,
                          clip_grad=dict(max_norm=0.05), log_interval=2)
    for loss in _cuda_losses(model, optim_wrapper, 6):
        optim_wrapper.update_params(loss)
        torch.cuda.synchronize()
    # Each step's own poll finds its copy done (the GPU was idle) or the next step's does.
    assert len(norm_history(hub)) >= 5
    assert optim_wrapper._grad_norm_log.num_pending <= 1


# --- merged step ----------------------------------------------------------------------------


def assert_same_optimizer_state(a, b):
    """Same groups (hyper-parameters and parameter indices) and the same state tensors."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa['param_groups'] == sb['param_groups']
    assert sa['state'].keys() == sb['state'].keys() and sa['state']
    for key, state in sb['state'].items():
        assert state.keys() == sa['state'][key].keys()
        assert all(torch.equal(sa['state'][key][k], v) for k, v in state.items())


def _train_plain(optimizer_cls, model, steps, scheduler=False, **kwargs):
    """``steps`` updates of ``model`` through ``optimizer_cls`` built on mmengine's paramwise
    groups (one a parameter), optionally under mmengine's warm-up + cosine schedulers."""
    from mmengine.optim.scheduler import CosineAnnealingLR, LinearLR
    groups = []
    DefaultOptimWrapperConstructor(dict(type='OptimWrapper', optimizer=ADAMW),
                                   copy.deepcopy(PARAMWISE)).add_params(groups, model)
    optimizer = optimizer_cls(groups, lr=ADAMW['lr'], weight_decay=ADAMW['weight_decay'],
                              **kwargs)
    schedulers = [LinearLR(optimizer, start_factor=0.1, by_epoch=False, begin=0, end=3),
                  CosineAnnealingLR(optimizer, T_max=steps, by_epoch=False, begin=3,
                                    end=steps + 3)] if scheduler else []
    lrs = []
    for x in batches(steps):
        optimizer.zero_grad()
        model(x).pow(2).mean().mul(10).backward()
        optimizer.step()
        for sched in schedulers:
            sched.step()
        lrs.append([g['lr'] for g in optimizer.param_groups])
    return optimizer, lrs


@pytest.mark.parametrize('kernel', [dict(fused=True), dict(foreach=True), dict(foreach=False)],
                         ids=['fused', 'foreach', 'for-loop'])
def test_merged_step_equals_torch_step_bit_for_bit(kernel):
    ref_model, model = make_model(), make_model()
    ref, ref_lrs = _train_plain(torch.optim.AdamW, ref_model, 7, scheduler=True, **kernel)
    ours, lrs = _train_plain(TurboxAdamW, model, 7, scheduler=True, **kernel)
    assert lrs == ref_lrs and len(set(lrs[0])) == 3  # the schedule, per group, unchanged
    assert_same_params(model, ref_model)
    assert_same_optimizer_state(ours, ref)
    # 7 parameter groups, 4 distinct (lr, decay) sets: 4 fused update calls instead of 7; the
    # foreach and for-loop paths keep a call a group (their code is chosen per call)
    calls = 4 if kernel.get('fused') else 7
    assert len(ours.param_groups) == 7 and ours.last_step_calls == bucket_count(
        ours.param_groups) == calls


def test_update_key_fast_path_equals_the_general_one():
    from turbox_mm.engine.optim.merged_adam import UPDATE_KEYS, _hashable, update_key
    param = torch.zeros(2)
    group = dict(params=[param], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 amsgrad=False, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=True, decoupled_weight_decay=True)
    general = tuple(_hashable(group[k]) for k in UPDATE_KEYS) + (param.device, )
    assert update_key(group) == general
    assert update_key(dict(group, betas=[0.9, 0.999])) == general  # a list from a config
    assert update_key(dict(group, lr=2e-3)) != general
    lr_a, lr_b = torch.tensor(1e-3), torch.tensor(1e-3)  # tensors: only the same one merges
    assert update_key(dict(group, lr=lr_a)) == update_key(dict(group, lr=lr_a))
    assert update_key(dict(group, lr=lr_a)) != update_key(dict(group, lr=lr_b))
    beta = torch.tensor(0.9)
    assert update_key(dict(group, betas=(beta, 0.999))) != update_key(
        dict(group, betas=(torch.tensor(0.9), 0.999)))
    unfused = dict(group, fused=False)  # a call of its own (the module docstring says why)
    assert update_key(unfused) == ('group', id(unfused))


def test_merged_step_counts_one_adam_call_per_bucket():
    import torch.optim.adam as adam_module

    import turbox_mm.engine.optim.merged_adam as merged_module
    model = make_model()
    opt, _ = _train_plain(TurboxAdamW, model, 1, fused=True)
    model(batches(1)[0]).sum().backward()
    with mock.patch.object(merged_module, 'adam', wraps=adam_module.adam) as calls:
        opt.step()
    assert calls.call_count == 4
    assert sorted(len(c.args[0]) for c in calls.call_args_list) == [1, 2, 2, 2]  # 7 params


def test_merged_and_torch_checkpoints_load_into_each_other():
    model_a, model_b = make_model(), make_model()
    ours, _ = _train_plain(TurboxAdamW, model_a, 3, fused=True)
    ref, _ = _train_plain(torch.optim.AdamW, model_b, 3, fused=True)
    # torch's state into ours and ours into torch's: same layout, same tensors
    fresh_ours, _ = _train_plain(TurboxAdamW, make_model(), 0, fused=True)
    fresh_ref, _ = _train_plain(torch.optim.AdamW, make_model(), 0, fused=True)
    fresh_ours.load_state_dict(ref.state_dict())
    fresh_ref.load_state_dict(ours.state_dict())
    assert_same_optimizer_state(fresh_ours, ref)
    assert_same_optimizer_state(fresh_ref, ours)


def test_constructor_logs_the_launch_count():
    with mock.patch.object(ctor_module, 'print_log', wraps=ctor_module.print_log) as log:
        wrapper = build(TurboxOptimWrapperConstructor, make_model(), ADAMW,
                        paramwise_cfg=PARAMWISE)
    assert type(wrapper.optimizer) is TurboxAdamW
    assert any('7 parameter groups updated in 4 launches a step' in c.args[0]
               for c in log.call_args_list)


def test_merged_step_under_compile_is_torchs_step():
    model_a, model_b = make_model(), make_model()
    ours, _ = _train_plain(TurboxAdamW, model_a, 0, fused=True)
    ref, _ = _train_plain(torch.optim.AdamW, model_b, 0, fused=True)
    for opt, model in ((ours, model_a), (ref, model_b)):
        model(batches(1)[0]).pow(2).mean().backward()
        torch.compile(opt.step, backend='eager')()
    assert_same_params(model_a, model_b)
