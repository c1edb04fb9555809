"""``turbox_compile_methods``: the methods a module declares are compiled by
``compile.modules='auto'`` (module_compiler.compile_method), guarded as compiled modules are,
eager under the warm-up stance, and eager again in a deep copy of the module (an EMA model)."""
import copy

import pytest
import torch
from torch import nn

from conftest import current_log_records
from turbox_mm.engine.runner import module_compiler
from turbox_mm.engine.runner.module_compiler import auto_methods, compile_submodules


class _Depth(nn.Module):
    turbox_compile_methods = ('loss', )

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([2.0, 3.0]))

    def forward(self, x):
        return x * self.scale

    def loss(self, pred, target):
        fg = target > 0
        return ((pred - target).abs() * fg).sum() / fg.sum().clamp(min=1)


def _model():
    model = nn.Module()
    model.backbone = nn.Sequential(nn.Linear(2, 2))
    model.depth = _Depth()
    return model


def _frames():
    from torch._dynamo.utils import counters
    return dict(counters['frames'])


def test_declared_method_compiles_and_agrees_with_eager():
    torch._dynamo.reset()
    model, eager = _model(), _model()
    eager.load_state_dict(model.state_dict())
    names = compile_submodules(model, 'auto', backend='aot_eager')
    assert names == ['backbone', 'depth:loss']
    assert isinstance(model.depth.__dict__['loss'], module_compiler._CompiledMethod)
    x, target = torch.randn(4, 2), torch.tensor([[1.0, -1.0]]).expand(4, 2)
    for net in (model, eager):
        pred = net.depth(net.backbone(x))
        before = _frames().get('ok', 0)
        net.depth.loss(pred, target).backward()
        # the compiled model's loss is one compiled frame; the eager twin's none
        assert _frames().get('ok', 0) - before == (1 if net is model else 0)
    torch.testing.assert_close(model.depth.scale.grad, eager.depth.scale.grad)
    # the state dict and the class are untouched
    assert list(model.state_dict()) == list(eager.state_dict())
    assert type(model.depth).loss is _Depth.loss


def _raising(*args, **kwargs):
    raise torch._dynamo.exc.Unsupported('no can do')


@pytest.mark.parametrize('eager_first', [False, True])
def test_compile_error_on_the_first_call_falls_back_for_good(monkeypatch, eager_first):
    """A compile error on the first compiled call falls back to the class's eager method for
    good, with a warning naming ``path:method``; also after warm-up calls under the
    ``force_eager`` stance, which run eagerly and are not compiled calls."""
    torch._dynamo.reset()
    model = _model()
    monkeypatch.setattr(torch, 'compile', lambda fn, **kwargs: _raising)
    names = compile_submodules(model, ['depth'], backend='aot_eager')  # no methods: a list
    assert names == ['depth']
    module_compiler.compile_method('depth', model.depth, 'loss', dict(backend='aot_eager'))
    monkeypatch.undo()
    pred, target = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0])
    if eager_first:
        with torch.compiler.set_stance('force_eager'):
            assert float(model.depth.loss(pred, target)) == 0.5
        assert isinstance(model.depth.__dict__['loss'], module_compiler._CompiledMethod)
    logger, handler, records = current_log_records()
    try:
        out = model.depth.loss(pred, target)
    finally:
        logger.removeHandler(handler)
    assert float(out) == 0.5
    assert 'loss' not in model.depth.__dict__  # the class's eager method from now on
    assert any('depth:loss (_Depth) could not be compiled' in r.getMessage() for r in records)


def test_inside_an_outer_compiled_region_the_method_is_inlined():
    """Traced from an outer compiled function, the method runs its eager code (Dynamo
    inlines it into the outer graph) instead of the guard's bookkeeping: one graph, no
    break."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    model = _model()
    compile_submodules(model, 'auto', backend='aot_eager')
    outer = torch.compile(lambda p, t: model.depth.loss(p, t) * 2, backend='aot_eager',
                          fullgraph=True)
    assert float(outer(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0]))) == 1.0
    assert not counters['graph_break']


def test_pickled_model_gets_the_eager_method():
    import pickle
    torch._dynamo.reset()
    model = _model()
    compile_submodules(model, 'auto', backend='aot_eager')
    loaded = pickle.loads(pickle.dumps(model))
    method = loaded.depth.__dict__['loss']
    assert method.__self__ is loaded.depth and method.__func__ is _Depth.loss


@pytest.mark.parametrize('given, for_methods', [
    (dict(mode='reduce-overhead'), {}),
    (dict(mode='max-autotune'), dict(mode='max-autotune-no-cudagraphs')),
    (dict(options={'triton.cudagraphs': True, 'combo_kernels': True}),
     dict(options={'triton.cudagraphs': False, 'combo_kernels': True})),
    (dict(backend='cudagraphs'), dict(backend='aot_eager'))])
def test_cuda_graph_modes_compile_the_methods_without_graphs(monkeypatch, given, for_methods):
    """Methods keep tensors across steps (an instance bank's cache): under a mode that
    replays CUDA graphs (whose outputs the next step's replays overwrite) they are compiled in
    the same mode without CUDA graphs; the modules get the mode asked for. (Inductor compiles
    on the first call; nothing is called here.)"""
    torch._dynamo.reset()
    calls = []
    real = torch.compile

    def recording(target, **kwargs):
        calls.append((target, copy.deepcopy(kwargs)))
        return real(target, **kwargs)

    monkeypatch.setattr(torch, 'compile', recording)
    model = _model()
    asked = copy.deepcopy(given)
    logger, handler, records = current_log_records()
    try:
        names = compile_submodules(model, 'auto', **dict(dict(backend='inductor'), **given))
    finally:
        logger.removeHandler(handler)
    assert given == asked  # the caller's settings are not changed in place
    assert names == ['backbone', 'depth:loss']
    assert isinstance(model.depth.__dict__['loss'], module_compiler._CompiledMethod)
    assert [kwargs for _, kwargs in calls] == [
        dict(dict(backend='inductor'), **given),
        dict(dict(backend='inductor'), **for_methods)], calls
    assert any('(depth:loss) are compiled without CUDA graphs' in r.getMessage()
               for r in records)


def test_deep_copy_runs_the_copy_eagerly_with_its_own_weights():
    """An EMA model is a deep copy: its method must be its own (a compiled call bound to the
    source module would compute with the source's weights)."""
    torch._dynamo.reset()
    model = _model()
    compile_submodules(model, 'auto', backend='aot_eager')
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.depth.scale.fill_(10.0)
    method = twin.depth.__dict__['loss']
    assert method.__self__ is twin.depth and method.__func__ is _Depth.loss
    assert isinstance(model.depth.__dict__['loss'], module_compiler._CompiledMethod)
    pred = twin.depth(torch.ones(2))
    assert float(twin.depth.loss(pred, torch.ones(2))) == 9.0


def test_methods_only_with_auto_and_not_inside_compiled_modules():
    model = nn.Module()
    model.backbone = nn.Sequential(_Depth())  # compiled whole: its methods are traced there
    model.depth = _Depth()
    assert [(p, m) for p, _, m in auto_methods(model, ['backbone'])] == [('depth', 'loss')]
    torch._dynamo.reset()
    names = compile_submodules(model, ['depth'], backend='aot_eager')  # a list: no methods
    assert names == ['depth'] and 'loss' not in model.depth.__dict__


def test_a_declared_method_that_does_not_exist_is_named():
    class Bad(nn.Module):
        turbox_compile_methods = ('los', )

    model = nn.Module()
    model.head = Bad()
    with pytest.raises(KeyError, match="Bad declares 'los' in turbox_compile_methods"):
        auto_methods(model, [])


class _Bank(nn.Module):
    """Keeps a tensor across steps, as an instance bank does."""
    turbox_compile_methods = ('cache', )
    turbox_keeps_state = True

    def cache(self, x):
        self.kept = x.detach().clone()


def test_a_whole_module_around_kept_state_is_warned_under_cuda_graphs():
    """A module compiled whole traces the methods of the modules inside it into its replayed
    graphs: the tensors a stateful one keeps would live in the graph's pool. Methods without
    state (a loss) are no reason to warn."""
    torch._dynamo.reset()

    def model():
        net = _model()
        net.head = nn.Module()
        net.head.bank = _Bank()
        return net

    logger, handler, records = current_log_records()
    try:
        compile_submodules(model(), ['head'], backend='inductor', mode='reduce-overhead')
        first = len(records)
        compile_submodules(model(), ['head'], backend='inductor')
        compile_submodules(model(), ['depth', 'backbone'], backend='inductor',
                           mode='reduce-overhead')
    finally:
        logger.removeHandler(handler)
    warned = [r.getMessage() for r in records if 'keep tensors across steps' in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith('turbox.compile: head.bank keep'), warned
    assert first >= 1 and len(records) == first


def test_uses_cuda_graphs_by_backend_mode_and_options():
    from turbox_mm.engine.runner.module_compiler import uses_cuda_graphs
    assert uses_cuda_graphs(dict(mode='reduce-overhead'))  # inductor is torch's default
    assert uses_cuda_graphs(dict(backend='inductor', mode='max-autotune'))
    assert uses_cuda_graphs(dict(backend='cudagraphs'))
    assert not uses_cuda_graphs(dict(backend='aot_eager', mode='reduce-overhead'))
    assert not uses_cuda_graphs(dict(backend='inductor', mode='default'))
    assert not uses_cuda_graphs(dict(options={'triton.cudagraphs': False}))


def test_compile_kwargs_from_options():
    from turbox_mm.engine.runner.module_compiler import (compile_kwargs_from_options,
                                                         uses_cuda_graphs)
    base = dict(backend='inductor', mode=None, dynamic=None, fullgraph=False, options={})
    # mmengine's --cfg-options nest dotted names: turbox.compile.options.triton.cudagraphs=True
    nested = compile_kwargs_from_options(dict(base, options={'triton': {'cudagraphs': True}}))
    assert nested['options'] == {'triton.cudagraphs': True} and uses_cuda_graphs(nested)
    assert compile_kwargs_from_options(base) == dict(backend='inductor', fullgraph=False)
    kwargs = compile_kwargs_from_options(dict(base, options={'combo_kernels': True}))
    assert kwargs['options'] == {'combo_kernels': True} and not uses_cuda_graphs(kwargs)
    assert uses_cuda_graphs(compile_kwargs_from_options(
        dict(base, options={'triton.cudagraphs': True})))
    assert uses_cuda_graphs(compile_kwargs_from_options(dict(base, mode='reduce-overhead')))
    assert not uses_cuda_graphs(compile_kwargs_from_options(
        dict(base, mode='max-autotune-no-cudagraphs')))
    with pytest.raises(ValueError, match="mode='reduce-overhead' and options="):
        compile_kwargs_from_options(dict(base, mode='reduce-overhead',
                                         options={'combo_kernels': True}))
