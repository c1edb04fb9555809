"""The pipelined train loops, the cyclic batch sampler, module compilation and precision.

Parity is exact: the turbox loops train on the same batches in the same order, so stock and
turbox runs of the smoke model give equal losses at every iteration and equal final weights.
"""
import logging
import os
import os.path as osp
import types
from unittest import mock

import pytest
import torch
from mmengine.dataset import DefaultSampler
from torch import nn
from torch.utils.data import BatchSampler

import turbox_mm  # noqa: F401
from conftest import current_log_records, logged_losses, run_python
from turbox_mm.datasets.samplers import CyclicBatchSampler
from turbox_mm.engine.runner.module_compiler import compile_submodules
from turbox_mm.engine.runner.precision import apply_precision

ENV = {'CUDA_VISIBLE_DEVICES': '', 'TORCH_FORCE_WEIGHTS_ONLY_LOAD': '1'}
SMOKE_DIR = 'configs/smoke'


# ---------------------------------------------------------------- CyclicBatchSampler


def _stock_epochs(dataset_len, batch_size, drop_last, epochs, shuffle=True, seed=3):
    sampler = DefaultSampler(list(range(dataset_len)), shuffle=shuffle, seed=seed)
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out += list(BatchSampler(sampler, batch_size, drop_last))
    return out


@pytest.mark.parametrize('dataset_len,batch_size,drop_last', [(10, 3, False), (10, 3, True),
                                                              (8, 4, False), (5, 8, False)])
def test_cyclic_batches_equal_stock_epochs(dataset_len, batch_size, drop_last):
    expected = _stock_epochs(dataset_len, batch_size, drop_last, epochs=4)
    sampler = CyclicBatchSampler(DefaultSampler(list(range(dataset_len)), seed=3), batch_size,
                                 drop_last)
    assert len(sampler) == len(expected) // 4
    sampler.start_cycle(epoch=0)
    it = iter(sampler)
    got = [next(it) for _ in range(len(expected))]
    assert got == expected


def test_cyclic_start_and_skip_continue_the_uninterrupted_stream():
    expected = _stock_epochs(10, 3, False, epochs=5)  # 4 batches an epoch
    for epoch, skip in [(0, 0), (0, 3), (0, 9), (1, 0), (2, 5)]:
        sampler = CyclicBatchSampler(DefaultSampler(list(range(10)), seed=3), 3)
        sampler.start_cycle(epoch=epoch, skip_batches=skip)
        it = iter(sampler)
        start = epoch * 4 + skip
        assert [next(it) for _ in range(20 - start)] == expected[start:], (epoch, skip)


def test_cyclic_sampler_is_transparent_until_started():
    sampler = CyclicBatchSampler(DefaultSampler(list(range(7)), shuffle=False), 2)
    assert list(sampler) == [[0, 1], [2, 3], [4, 5], [6]]
    assert list(sampler) == [[0, 1], [2, 3], [4, 5], [6]]  # one epoch per iterator


def test_cyclic_sampler_wraps_a_batch_sampler_config():
    from mmdet.datasets.samplers import AspectRatioBatchSampler  # noqa: F401 (registers it)

    class Shapes(list):

        def get_data_info(self, idx):
            return dict(width=10, height=5 if idx % 2 else 20)

    dataset = Shapes(range(12))
    sampler = CyclicBatchSampler(DefaultSampler(dataset, seed=0), 2,
                                 batch_sampler=dict(type='mmdet.AspectRatioBatchSampler'))
    sampler.start_cycle()
    it = iter(sampler)
    batches = [next(it) for _ in range(12)]  # two epochs
    for batch in batches:  # one aspect-ratio group per batch
        assert len({i % 2 for i in batch}) == 1
    assert sorted(sum(batches[:6], [])) == list(range(12))
    assert sorted(sum(batches[6:], [])) == list(range(12))
    assert batches[:6] != batches[6:]  # reshuffled for epoch 1


def test_cyclic_sampler_rejects_an_empty_epoch():
    sampler = CyclicBatchSampler(DefaultSampler(list(range(3))), 4, drop_last=True)
    with pytest.raises(ValueError, match='no batch per epoch'):
        sampler.start_cycle()
    with pytest.raises(ValueError, match='must be >= 0'):
        CyclicBatchSampler(DefaultSampler(list(range(3))), 2).start_cycle(skip_batches=-1)


# ---------------------------------------------------------------- training parity


def _write_cfg(tmp_path, name, base, body=''):
    if 'turbox' in base:
        # Fused AdamW rounds differently from the stock foreach AdamW (ulps, tested in
        # test_optim.py); these tests are about the loop, so they keep the stock kernel and
        # compare bit for bit.
        body += "\nturbox = dict(optim=dict(fused=False))\n"
    path = tmp_path / name
    path.write_text(f"_base_ = ['{osp.abspath(osp.join(SMOKE_DIR, base))}']\n{body}")
    return str(path)


ITER_BODY = """
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters={max_iters},
                 val_interval=1000)
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=8)]
default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=4, by_epoch=False),
                     logger=dict(type='LoggerHook', interval=1))
log_processor = dict(by_epoch=False, window_size=1)
"""
EPOCH_BODY = """
default_hooks = dict(logger=dict(type='LoggerHook', interval=1))
log_processor = dict(window_size=1)
"""


def _train(cfg, work_dir, *extra):
    proc = run_python(['tools/train.py', cfg, '--work-dir', str(work_dir), *extra], env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


_losses = logged_losses


def _weights(path):
    return torch.load(path, map_location='cpu', weights_only=True)['state_dict']


def _assert_same_training(dir_a, dir_b, ckpt, iters):
    a, b = _losses(dir_a), _losses(dir_b)
    assert sorted(a) == list(range(1, iters + 1)), sorted(a)
    assert a == b
    wa, wb = _weights(osp.join(dir_a, ckpt)), _weights(osp.join(dir_b, ckpt))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0, msg=key)


def test_pipelined_epoch_loop_trains_exactly_like_stock(tmp_path):
    stock = _write_cfg(tmp_path, 'stock.py', 'smoke_stock.py', EPOCH_BODY)
    turbox = _write_cfg(tmp_path, 'turbox.py', 'smoke_turbox.py', EPOCH_BODY)
    log = _train(turbox, tmp_path / 'turbox')
    assert "train_cfg.type = 'turbox_mm.PipelinedEpochBasedTrainLoop'" in log
    assert 'train_dataloader.batch_sampler = turbox_mm.CyclicBatchSampler' in log
    _train(stock, tmp_path / 'stock')
    _assert_same_training(tmp_path / 'stock', tmp_path / 'turbox', 'epoch_4.pth', 32)


def test_pipelined_iter_loop_trains_like_stock_and_resumes_without_loading(tmp_path):
    stock = _write_cfg(tmp_path, 'stock.py', 'smoke_stock.py', ITER_BODY.format(max_iters=20))
    turbox = _write_cfg(tmp_path, 'turbox.py', 'smoke_turbox.py',
                        ITER_BODY.format(max_iters=20))
    short = _write_cfg(tmp_path, 'short.py', 'smoke_turbox.py', ITER_BODY.format(max_iters=12))
    log = _train(turbox, tmp_path / 'turbox')
    assert "train_cfg.type = 'turbox_mm.PipelinedIterBasedTrainLoop'" in log
    # mmengine restarts its loader after each pass over the data; the cyclic loader never does.
    assert 'Reach the end of the dataloader' not in log
    stock_log = _train(stock, tmp_path / 'stock')
    assert 'Reach the end of the dataloader' in stock_log
    _assert_same_training(tmp_path / 'stock', tmp_path / 'turbox', 'iter_20.pth', 20)
    # Stop at 12 (mid-epoch: 8 batches an epoch), resume to 20: same as uninterrupted.
    parted = tmp_path / 'parted'
    _train(short, parted)
    log = _train(turbox, parted, '--resume')
    assert 'resumed epoch: 0, iter: 12' in log
    assert 'Advance dataloader' not in log  # skipped by the sampler, nothing loaded
    _assert_same_training(tmp_path / 'turbox', parted, 'iter_20.pth', 20)


def test_epoch_loop_restarts_when_a_hook_drops_the_persistent_loader(tmp_path):
    """mmdet3d's DisableObjectSampleHook changes the dataset at an epoch and drops the
    persistent loader's iterator so that new workers see the change: the turbox loop must
    notice and restart, or its workers keep serving the old data."""
    hook = tmp_path / 'drop_loader_hook.py'
    hook.write_text('''
from mmengine.hooks import Hook
from turbox_mm.registry import DATASETS, HOOKS
from turbox_mm.testing import SmokeDataset

@DATASETS.register_module()
class ShiftDataset(SmokeDataset):
    shift = 0.0
    def __getitem__(self, index):
        item = super().__getitem__(index)
        item['inputs'] = item['inputs'] + self.shift
        return item

@HOOKS.register_module()
class DropLoaderHook(Hook):
    def before_train_epoch(self, runner):
        if runner.epoch == 2:
            loader = runner.train_loop.dataloader
            loader.dataset.shift = 1.0
            loader._DataLoader__initialized = False
            loader._iterator = None
            loader._DataLoader__initialized = True
            print('changed the dataset and dropped the persistent loader iterator')
''')
    body = (EPOCH_BODY + "custom_hooks = [dict(type='turbox_mm.DropLoaderHook')]\n"
            "custom_imports = dict(imports=['turbox_mm', 'drop_loader_hook'])\n"
            "train_dataloader = dict(dataset=dict(type='turbox_mm.ShiftDataset'),\n"
            "                        persistent_workers=True)\n")
    turbox = _write_cfg(tmp_path, 'turbox.py', 'smoke_turbox.py', body)
    stock = _write_cfg(tmp_path, 'stock.py', 'smoke_stock.py', body)
    env = dict(ENV, PYTHONPATH=f'{tmp_path}{os.pathsep}' + os.environ.get('PYTHONPATH', ''))
    for cfg, name in ((stock, 'stock'), (turbox, 'turbox')):
        proc = run_python(['tools/train.py', cfg, '--work-dir', str(tmp_path / name)], env=env)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert 'dropped the persistent loader iterator' in proc.stdout + proc.stderr
    _assert_same_training(tmp_path / 'stock', tmp_path / 'turbox', 'epoch_4.pth', 32)


def test_cyclic_loader_needs_persistent_workers():
    from mmengine.config import Config

    from turbox_mm.engine.runner import TURBOX_OPTIONS, apply_turbox_options
    from turbox_mm.utils.options import check_options
    loader = dict(batch_size=2, num_workers=2, sampler=dict(type='DefaultSampler'))
    opts = check_options({'dataloader': {'persistent_workers': False}}, TURBOX_OPTIONS)
    cfg = Config(dict(train_cfg=dict(type='EpochBasedTrainLoop', max_epochs=1),
                      train_dataloader=dict(loader)))
    apply_turbox_options(cfg, opts)
    assert cfg.train_cfg.type == 'turbox_mm.PipelinedEpochBasedTrainLoop'
    assert 'batch_sampler' not in cfg.train_dataloader  # restarted per epoch, as stock
    cfg = Config(dict(train_cfg=dict(type='EpochBasedTrainLoop', max_epochs=1),
                      train_dataloader=dict(loader)))
    apply_turbox_options(cfg, check_options({}, TURBOX_OPTIONS))
    assert cfg.train_dataloader.batch_sampler.type == 'turbox_mm.CyclicBatchSampler'


def test_prefetcher_raises_a_loader_error_when_its_batch_is_due():
    from turbox_mm.engine.loops import BatchPrefetcher

    def batches():
        yield dict(inputs=torch.zeros(1))
        raise OSError('corrupt file x.jpg (sample 1)')

    prefetcher = BatchPrefetcher(batches(), nn.Linear(1, 1))
    raw, _ = prefetcher.pop()
    assert prefetcher.prefetch()  # the failure is kept, not raised during step 0
    with pytest.raises(OSError, match='corrupt file x.jpg'):
        prefetcher.pop()


def test_unknown_loop_type_is_kept_with_a_warning(tmp_path):
    from mmengine.config import Config

    from turbox_mm.engine.runner import TURBOX_OPTIONS, apply_turbox_options
    from turbox_mm.utils.options import check_options
    cfg = Config(dict(train_cfg=dict(type='MyLoop', max_iters=3),
                      train_dataloader=dict(batch_size=2, sampler=dict(type='DefaultSampler'))))
    changes = apply_turbox_options(cfg, check_options({}, TURBOX_OPTIONS))
    assert cfg.train_cfg.type == 'MyLoop'
    assert not any('train_cfg' in c for c in changes)
    shorthand = Config(dict(train_cfg=dict(by_epoch=False, max_iters=3)))
    apply_turbox_options(shorthand, check_options({}, TURBOX_OPTIONS))
    assert shorthand.train_cfg.type == 'turbox_mm.PipelinedIterBasedTrainLoop'
    assert 'by_epoch' not in shorthand.train_cfg
    with pytest.raises(KeyError, match="did you mean 'preprocess_ahead'"):
        check_options({'loop': {'preprocess_ahaed': True}}, TURBOX_OPTIONS)


# ---------------------------------------------------------------- compile


class _Net(nn.Module):

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.backbone(x))


class _Breaks(nn.Module):

    def forward(self, x):
        torch._dynamo.graph_break()
        return x * 2


def test_compile_auto_keeps_state_dict_and_results():
    torch.manual_seed(0)
    net = _Net()
    keys = list(net.state_dict())
    x = torch.randn(3, 4)
    eager = net(x)
    assert compile_submodules(net, 'auto', backend='eager') == ['backbone']
    assert list(net.state_dict()) == keys  # no _orig_mod prefixes: checkpoints unchanged
    torch.testing.assert_close(net(x), eager)
    assert net.backbone._compiled_call_impl is not None


class _Layer(nn.Module):
    """A layer with a forward of its own (Dynamo compiles its frame)."""

    def __init__(self, dims: int = 4):
        super().__init__()
        self.fc = nn.Linear(dims, dims)

    def forward(self, x):
        return self.fc(x).relu()


class _DeclaringHead(nn.Module):
    """A head that declares its static parts to ``modules='auto'``."""
    turbox_compile_submodules = ('encoder', 'layers.*')

    def __init__(self):
        super().__init__()
        self.encoder = _Layer()
        self.layers = nn.ModuleList([_Layer(), _Layer()])
        self.loss_fc = nn.Linear(4, 1)  # not declared: stays eager


def test_compile_auto_adds_the_parts_heads_declare():
    """``'auto'``: the conventional names, then each declared path of each module (``*``
    expanded), under the module's own path; a declared part inside an already listed module
    is not compiled twice, nor an undeclared one at all."""
    from turbox_mm.engine.runner.module_compiler import auto_paths
    net = _Net()
    net.head = nn.Sequential(_DeclaringHead())  # nested: the declaration is relative
    net.backbone.add_module('inner', _DeclaringHead())  # inside backbone: already compiled
    names = compile_submodules(net, 'auto', backend='eager')
    assert names == ['backbone', 'head.0.encoder', 'head.0.layers.0', 'head.0.layers.1']
    assert auto_paths(net) == names
    assert net.head[0].encoder._compiled_call_impl is not None
    assert net.head[0].loss_fc._compiled_call_impl is None
    assert net.backbone.inner.encoder._compiled_call_impl is None

    class _Wrong(nn.Module):
        turbox_compile_submodules = ('missing', )
    net = _Net()
    net.head = _Wrong()
    with pytest.raises(KeyError, match='missing'):  # a defect of the declaring class, named
        compile_submodules(net, 'auto', backend='eager')

    class _Optional(nn.Module):  # an optional part this instance left out (None) is skipped
        turbox_compile_submodules = ('fuser', 'layers.*', 'extra.block', 'extra.*')

        def __init__(self):
            super().__init__()
            self.fuser = self.extra = None
            self.layers = nn.ModuleList([_Layer()])
    net = _Net()
    net.head = _Optional()
    assert auto_paths(net) == ['backbone', 'head.layers.0']
    net.head.fuser = _Layer()
    net.head.extra = nn.Module()
    net.head.extra.block = None  # the end of a path left out below an existing part
    net.head.extra.other = _Layer()
    assert auto_paths(net) == ['backbone', 'head.fuser', 'head.layers.0', 'head.extra.other']
    net.head.extra.block = 3  # neither a submodule nor None: a defect, named
    with pytest.raises(KeyError, match='block'):
        auto_paths(net)


def test_compile_a_star_stands_for_each_child():
    """``'backbone.*'``: each layer of the Sequential on its own (regional compile, e.g.
    a head's decoder layers), results and state dict unchanged."""
    torch.manual_seed(0)
    net = _Net()
    net.backbone = nn.Sequential(_Layer(), _Layer(), _Layer())
    net.head = _Layer()
    x = torch.randn(3, 4)
    eager = net(x)
    names = compile_submodules(net, ['backbone.*', 'head'], backend='eager')
    assert names == ['backbone.0', 'backbone.1', 'backbone.2', 'head']
    assert all(net.backbone[i]._compiled_call_impl is not None for i in range(3))
    assert net.backbone._compiled_call_impl is None  # the container itself is not compiled
    torch.testing.assert_close(net(x), eager)
    with pytest.raises(KeyError, match=r"'head.\*' matches no submodule of _Net"):
        compile_submodules(_Net(), ['head.*'], backend='eager')
    with pytest.raises(KeyError, match=r"'tail.\*' matches no submodule"):
        compile_submodules(_Net(), ['tail.*'], backend='eager')
    # glob semantics: children without the rest of the path are skipped; duplicates once
    net = nn.Module()
    net.blocks = nn.ModuleList([nn.Sequential(_Layer(2)), nn.ReLU(),
                                nn.Sequential(_Layer(2), nn.ReLU())])
    names = compile_submodules(net, ['blocks.*.0', 'blocks.0.0'], backend='eager')
    assert names == ['blocks.0.0', 'blocks.2.0']


def test_torchs_own_modules_compile_through_a_frame_of_turbox_or_stay_eager():
    """Dynamo compiles no outer frame of torch's own files: ``Module.compile`` on an
    ``nn.Sequential`` compiled nothing (checked: no frame counted). turbox compiles such a
    container through a frame of its own, one code object per module (so that 8 of them do
    not exhaust Dynamo's recompile limit of one shared frame), and leaves torch's single
    layers eager, saying so."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    net = nn.Module()
    net.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LayerNorm(4))
                                for _ in range(10)])
    net.norm = nn.LayerNorm(4)
    x = torch.randn(3, 4, requires_grad=True)
    eager = [block(x) for block in net.blocks]
    logger, handler, records = current_log_records()
    try:
        names = compile_submodules(net, ['blocks.*', 'norm'], backend='aot_eager')
    finally:
        logger.removeHandler(handler)
    assert names == [f'blocks.{i}' for i in range(10)]
    assert net.norm._compiled_call_impl is None
    assert [(r.levelno, r.getMessage()[:61]) for r in records] == [
        (logging.WARNING, "turbox.compile: norm not compiled: each is one of torch's own")]
    for block, want in zip(net.blocks, eager):
        got = block(x)
        torch.testing.assert_close(got, want)
        got.sum().backward()
    assert dict(counters['frames']) == {'total': 10, 'ok': 10}
    for block in net.blocks:  # no recompile: each has its own cached graph
        block(x)
    assert dict(counters['frames']) == {'total': 10, 'ok': 10}


def test_compile_takes_mmdet3ds_numpy_strides_as_one_graph():
    """mmdet3d's SECONDFPN (``use_conv_for_no_stride``, as CenterPoint and BEVFusion build it)
    has NumPy strides, which Dynamo reads as tensors: without turning them into ints the
    neck's frame fails to compile (seen on the GPU as a graph break in BEVFusion's pts_neck)."""
    import numpy as np
    from mmdet3d.models.necks import SECONDFPN
    from turbox_mm.engine.runner.module_compiler import plain_int_conv_args
    torch._dynamo.reset()
    torch.manual_seed(0)
    neck = SECONDFPN(in_channels=[4, 8], out_channels=[4, 4], upsample_strides=[1, 2],
                     use_conv_for_no_stride=True).eval()
    assert isinstance(neck.deblocks[0][0].stride[0], np.integer)  # what mmdet3d builds
    x = [torch.randn(1, 4, 8, 8), torch.randn(1, 8, 4, 4)]
    eager = neck(x)[0]
    net = nn.Module()
    net.pts_neck = neck
    assert compile_submodules(net, 'auto', backend='aot_eager', fullgraph=True) == ['pts_neck']
    # fullgraph: a frame that fails to compile raises here instead of running eagerly
    torch.testing.assert_close(neck(x)[0], eager)
    assert type(neck.deblocks[0][0].stride[0]) is int
    assert plain_int_conv_args(neck) == 0  # nothing left to change


def test_compile_names_a_missing_submodule():
    with pytest.raises(KeyError, match=r"no submodule 'backbone\.9'.*'0', '1', '2'"):
        compile_submodules(_Net(), ['backbone.9'], backend='eager')
    with pytest.raises(ValueError, match="expected 'auto' or a list"):
        compile_submodules(_Net(), 'backbone', backend='eager')


@pytest.mark.parametrize('eager_first', [False, True])
def test_compile_failure_falls_back_to_eager_with_a_warning(eager_first):
    """On the first compiled call, a compile error falls back to eager with a warning; also
    where calls under the ``force_eager`` stance came first (EagerWarmupHook's iterations:
    they run the eager call and are not compiled calls)."""
    torch._dynamo.reset()
    net = nn.Module()
    net.backbone = _Breaks()
    compile_submodules(net, ['backbone'], backend='eager')
    net.backbone._compiled_call_impl = _raising(torch._dynamo.exc.Unsupported('no can do'))
    from turbox_mm.engine.runner.module_compiler import _guard
    _guard('backbone', net.backbone)
    if eager_first:
        with torch.compiler.set_stance('force_eager'):
            torch.testing.assert_close(net.backbone(torch.ones(2)), torch.full((2, ), 2.0))
        assert net.backbone._compiled_call_impl is not None  # still compiled
    logger, handler, records = current_log_records()
    try:
        out = net.backbone(torch.ones(2))
    finally:
        logger.removeHandler(handler)
    torch.testing.assert_close(out, torch.full((2, ), 2.0))
    assert net.backbone._compiled_call_impl is None  # eager from now on
    assert any('backbone (_Breaks) could not be compiled' in r.getMessage() for r in records)


def _raising(error):
    def call(*args, **kwargs):
        raise error
    return call


def test_fullgraph_compile_failure_raises_naming_the_module():
    """A graph break under fullgraph=True is an error, not a silent fallback."""
    torch._dynamo.reset()
    net = nn.Module()
    net.backbone = _Breaks()
    compile_submodules(net, ['backbone'], backend='eager', fullgraph=True)
    with pytest.raises(RuntimeError, match=r'fullgraph=True: backbone \(_Breaks\) could not '
                                           r'be compiled as one graph'):
        net.backbone(torch.ones(2))


def test_runtime_errors_of_the_compiled_call_are_not_rerun():
    """An error while the compiled code runs (out of memory, a kernel) propagates; the module
    is not run a second time eagerly (that would apply side effects, like BN statistics,
    twice)."""
    net = nn.Module()
    net.backbone = nn.BatchNorm1d(3)
    compile_submodules(net, ['backbone'], backend='eager')
    net.backbone._compiled_call_impl = _raising(torch.cuda.OutOfMemoryError('out of memory'))
    from turbox_mm.engine.runner.module_compiler import _guard
    _guard('backbone', net.backbone)
    before = net.backbone.num_batches_tracked.clone()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        net.backbone(torch.randn(4, 3))
    assert torch.equal(net.backbone.num_batches_tracked, before)  # eager never ran


def test_compile_keeps_errors_of_the_inputs():
    torch._dynamo.reset()
    net = _Net()
    compile_submodules(net, ['backbone'], backend='eager')
    with pytest.raises(RuntimeError, match='shapes cannot be multiplied'):
        net.backbone(torch.randn(2, 5))  # eager fails too: the caller's error, unchanged
    assert net.backbone._compiled_call_impl is not None  # still compiled


class _BNThenBreak(nn.Module):
    """BatchNorm (training statistics: a side effect), a graph break, more ops: two graphs."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        x = self.bn(x)
        torch._dynamo.graph_break()
        return self.lin(x).relu()


def _backend_failing_on_graph(number, error=None):
    """A backend that runs graphs as they are (``gm.forward``) but fails to compile graph
    ``number`` (1-based); with ``error``, the compiled graph ``number`` raises it when it runs
    instead."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        if len(graphs) != number:
            return gm.forward
        if error is None:
            raise RuntimeError(f'the backend fails on graph {number}')

        def run(*args):
            raise error
        return run

    backend.graphs = graphs
    return backend


@pytest.mark.parametrize('failing', [2, 1])
def test_compile_failure_after_a_graph_ran_does_not_rerun_the_module(failing):
    """The backend fails on the second graph, after the first (BatchNorm in training mode)
    has run: only the part that could not be compiled runs eagerly; the statistics are
    updated once, the output is eager's and the first graph stays compiled. On the first
    graph (nothing has run): the forward runs eagerly, with the same one warning."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net, ref = nn.Module(), _BNThenBreak()
    net.backbone = _BNThenBreak()
    net.backbone.load_state_dict(ref.state_dict())
    backend = _backend_failing_on_graph(failing)
    compile_submodules(net, ['backbone'], backend=backend)
    x = torch.randn(4, 3)
    logger, handler, records = current_log_records()
    dynamo_records = []
    dynamo_handler = logging.Handler()
    dynamo_handler.emit = dynamo_records.append
    logging.getLogger('torch._dynamo').addHandler(dynamo_handler)
    try:
        out = net.backbone(x)
        assert net.backbone.bn.num_batches_tracked.item() == 1  # once, not twice
        torch.testing.assert_close(out, ref(x))
        out = net.backbone(x)  # the failing part is not compiled again
    finally:
        logger.removeHandler(handler)
        logging.getLogger('torch._dynamo').removeHandler(dynamo_handler)
    torch.testing.assert_close(out, ref(x))
    assert net.backbone.bn.num_batches_tracked.item() == 2
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(net.backbone.state_dict()[key], value, msg=key)
    # graph 1 compiled once and reused; the failing one not tried again
    assert len(backend.graphs) == failing
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert 'backbone (_BNThenBreak) could not be compiled and runs eagerly in part' in \
        warnings[0]
    assert f'the backend fails on graph {failing}' in warnings[0]
    assert ('resume_in_forward' if failing == 2 else 'Dynamo runs forward') in warnings[0]
    assert not [r for r in dynamo_records if r.levelno >= logging.WARNING]  # ours, not both
    assert net.backbone._compiled_call_impl is not None  # the rest stays compiled


def test_fullgraph_compile_failure_is_raised_even_with_suppress_errors():
    """``fullgraph=True`` raises even where the environment asks Dynamo to suppress errors."""
    torch._dynamo.reset()
    net = nn.Module()
    net.backbone = _Net()  # a module of ours: Dynamo skips torch.nn's own forwards
    compile_submodules(net, ['backbone'], backend=_backend_failing_on_graph(1),
                       fullgraph=True)
    with torch._dynamo.config.patch(suppress_errors=True), \
            pytest.raises(RuntimeError, match=r'fullgraph=True: backbone \(_Net\) could not '
                                              r'be compiled as one graph: BackendCompiler'
                                              r'Failed.*the backend fails on graph 1'):
        net.backbone(torch.randn(2, 4))


def test_runtime_error_of_a_later_compiled_graph_propagates_and_nothing_reruns():
    """A real compiled graph that raises while it runs (here the second, after BatchNorm's
    graph ran): the error propagates as it is, nothing runs again."""
    torch._dynamo.reset()
    net = nn.Module()
    net.backbone = _BNThenBreak()
    oom = torch.cuda.OutOfMemoryError('out of memory')
    compile_submodules(net, ['backbone'],
                       backend=_backend_failing_on_graph(2, error=oom))
    with pytest.raises(torch.cuda.OutOfMemoryError, match='out of memory'):
        net.backbone(torch.randn(4, 3))
    assert net.backbone.bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize('when', ['a later call', 'a frame compiled first'])
def test_compile_error_reaching_the_call_after_part_of_it_ran_raises(when):
    """A compile error that reaches the wrapper (not suppressed by Dynamo) where part of the
    module may have run (a call after the first, or a frame compiled in this call) is raised
    naming the module, not answered by running the module again."""
    torch._dynamo.reset()
    net = nn.Module()
    net.backbone = nn.BatchNorm1d(3)
    double = torch.compile(lambda y: y * 2, backend='eager')
    calls = []

    def compiled(x):  # runs the module (once), then fails as a compile error would
        calls.append(1)
        out = net.backbone._call_impl(double(x) if when != 'a later call' else x)
        if when == 'a frame compiled first' or len(calls) == 2:
            raise torch._dynamo.exc.Unsupported('no can do')
        return out

    from turbox_mm.engine.runner.module_compiler import _guard
    net.backbone._compiled_call_impl = compiled
    _guard('backbone', net.backbone)
    if when == 'a later call':
        net.backbone(torch.randn(4, 3))
    with pytest.raises(RuntimeError, match=r'backbone \(BatchNorm1d\) failed to compile after '
                                           r'part of its call had run.*Unsupported: no can do'):
        net.backbone(torch.randn(4, 3))
    assert net.backbone.num_batches_tracked.item() == len(calls)  # each call ran once
    assert net.backbone._compiled_call_impl is not None


# ---------------------------------------------------------------- precision


def test_precision_policy_sets_and_validates():
    before = torch.get_float32_matmul_precision()
    try:
        assert apply_precision(dict(allow_tf32=True)) == [
            'float32 matmul precision: high', 'cuDNN float32 convolution: tf32']
        assert torch.get_float32_matmul_precision() == 'high'
        apply_precision(dict(allow_tf32=False))
        assert torch.get_float32_matmul_precision() == 'highest'
        assert apply_precision({}) == []
        with pytest.raises(ValueError, match="'low' is not one of"):
            apply_precision(dict(matmul_precision='low'))
    finally:
        torch.set_float32_matmul_precision(before)


def test_precision_policy_sets_spconvs_tf32_flag_where_spconv_imports(monkeypatch):
    import importlib.machinery
    import sys
    import types
    spconv = types.ModuleType('spconv')
    spconv.__spec__ = importlib.machinery.ModuleSpec('spconv', None)
    spconv.constants = types.SimpleNamespace(SPCONV_ALLOW_TF32=False)
    monkeypatch.setitem(sys.modules, 'spconv', spconv)
    before = torch.get_float32_matmul_precision()
    try:
        assert 'spconv float32 convolution: tf32' in apply_precision(dict(allow_tf32=True))
        assert spconv.constants.SPCONV_ALLOW_TF32 is True
        assert 'spconv float32 convolution: ieee' in apply_precision(dict(allow_tf32=False))
        assert spconv.constants.SPCONV_ALLOW_TF32 is False
    finally:
        torch.set_float32_matmul_precision(before)


def test_only_mmengines_train_step_counts_as_stock():
    from mmengine.model import BaseModel

    from turbox_mm.engine.loops.batch_prefetcher import has_stock_train_step

    class Stock(BaseModel):

        def forward(self, inputs, data_samples=None, mode='tensor'):
            return inputs

    class Own(Stock):

        def train_step(self, data, optim_wrapper):
            return {}

    assert has_stock_train_step(Stock())
    assert not has_stock_train_step(Own())
    assert not has_stock_train_step(nn.Linear(2, 2))  # no train_step at all


@pytest.mark.cuda
def test_prefetcher_stages_batches_on_the_gpu():
    from mmengine.model import BaseDataPreprocessor, BaseModel

    from turbox_mm.engine.loops import BatchPrefetcher, PreprocessedBatch

    class Doubler(BaseDataPreprocessor):

        def forward(self, data, training=False):
            data = self.cast_data(data)
            return dict(inputs=data['inputs'] * 2)

    class Model(BaseModel):  # mmengine's train_step: the preprocessor may run ahead

        def __init__(self):
            super().__init__(data_preprocessor=Doubler())
            self.data_preprocessor.cuda()

        def forward(self, inputs, data_samples=None, mode='tensor'):
            return inputs

    model = Model()
    batches = [dict(inputs=torch.arange(6.).pin_memory() + i) for i in range(3)]
    prefetcher = BatchPrefetcher(iter(batches), model, preprocess=True)
    for i in range(3):
        raw, ready = prefetcher.pop()
        assert raw is batches[i]
        assert isinstance(ready, PreprocessedBatch)
        # train_step calls the preprocessor again: it passes the staged batch through.
        out = model.data_preprocessor(ready, True)
        torch.testing.assert_close(out['inputs'].cpu(), (torch.arange(6.) + i) * 2)
        if i < 2:
            assert prefetcher.prefetch()
    with pytest.raises(StopIteration):
        prefetcher.pop()
    prefetcher.close()
    assert 'forward' not in model.data_preprocessor.__dict__


def test_compile_and_precision_micro_benchmark_runs_quick():
    from turbox_mm.benchmark.micro import get
    before = torch.get_float32_matmul_precision()
    rows = get('compile')('cpu', quick=True)
    assert [r['component'] for r in rows] == ['precision', 'compile']
    assert all(r['stock']['median_ms'] > 0 and r['turbox']['median_ms'] > 0 for r in rows)
    assert torch.get_float32_matmul_precision() == before  # global state restored


class _LoopRunner:
    """The little of a runner a train loop's constructor reads."""
    visualizer = None


def test_pipelined_iter_loop_leaves_the_generator_where_mmengines_loop_does():
    """mmengine's iteration loop starts its loader iterator when it is built, which draws the
    workers' base seed from torch's global generator before the runner initialises the
    weights; the pipelined loop starts its iterator later, so it must make that draw when it is
    built too, or one seed gives other initial weights (seen as a BEVFusion lidar-camera first
    loss of 44.06 against stock's 44.23: its Swin backbone initialises at the runner's
    init_weights)."""
    from mmengine.runner import IterBasedTrainLoop
    from torch.utils.data import DataLoader

    from turbox_mm.engine.loops.pipelined_iter_loop import PipelinedIterBasedTrainLoop

    def after_building(loop_type):
        torch.manual_seed(0)
        loader = DataLoader(list(range(8)), batch_size=2, shuffle=False)
        loop = loop_type(_LoopRunner(), loader, max_iters=4)
        return loop, torch.rand(3)  # what the weight initialisation would draw

    stock_loop, stock_draw = after_building(IterBasedTrainLoop)
    turbox_loop, turbox_draw = after_building(PipelinedIterBasedTrainLoop)
    assert torch.equal(stock_draw, turbox_draw)
    # the later iterator draws from the loader's own generator, not the global one
    state = torch.get_rng_state()
    batches = turbox_loop._start_batches()
    assert torch.equal(torch.get_rng_state(), state)
    assert [b.tolist() for b in (next(batches), next(batches))] == [[0, 1], [2, 3]]


def _alive_workers(iterator):
    return [w for w in getattr(iterator, '_workers', []) if w.is_alive()]


def test_shutdown_loader_workers_ends_a_persistent_loaders_workers():
    """Persistent workers outlive the loop that drew from them (the loader keeps its
    iterator); torch reaps them only at interpreter exit, one join timeout per worker. The
    helper ends them at once and leaves the loader usable."""
    from torch.utils.data import DataLoader

    from turbox_mm.engine.loops.loader_shutdown import shutdown_loader_workers
    loader = DataLoader(list(range(16)), batch_size=2, num_workers=2, persistent_workers=True)
    iterator = iter(loader)
    next(iterator)
    assert len(_alive_workers(iterator)) == 2 and loader._iterator is iterator
    assert shutdown_loader_workers(loader, iterator, iterator) == 1  # once, not twice
    assert not _alive_workers(iterator) and loader._iterator is None
    assert [b.tolist() for b in loader][:2] == [[0, 1], [2, 3]]  # fresh workers
    shutdown_loader_workers(loader)
    # an mmengine-style wrapper holding the iterator, and a loader without workers
    wrapped = types.SimpleNamespace(_iterator=iter(loader))
    assert shutdown_loader_workers(None, wrapped) == 1
    assert shutdown_loader_workers(DataLoader([1, 2]), iter(DataLoader([1, 2]))) == 0


@pytest.mark.parametrize('fail', [False, True])
def test_pipelined_iter_loop_ends_its_loader_workers_with_training(fail):
    """The pipelined loop shuts its persistent loader's workers down when it stops, also when
    a step raises, instead of leaving them to the interpreter's exit."""
    _check_loader_workers_end_with_training('iter', fail)


@pytest.mark.parametrize('fail', [False, True])
def test_pipelined_epoch_loop_ends_its_loader_workers_with_training(fail):
    """The same for the epoch loop (one epoch, a loader without a cyclic sampler)."""
    _check_loader_workers_end_with_training('epoch', fail)


def _check_loader_workers_end_with_training(loop_type, fail):
    from mmengine.logging import MessageHub
    from torch.utils.data import DataLoader

    from turbox_mm.engine.loops.pipelined_epoch_loop import PipelinedEpochBasedTrainLoop
    from turbox_mm.engine.loops.pipelined_iter_loop import PipelinedIterBasedTrainLoop

    class Runner(_LoopRunner):
        model = nn.Module()
        val_loop = None
        message_hub = MessageHub.get_instance('test_loader_shutdown')

        def call_hook(self, *args, **kwargs):
            pass

    Runner.model.data_preprocessor = lambda data, training=False: data
    loader = DataLoader(list(range(32)), batch_size=2, num_workers=2, persistent_workers=True)
    if loop_type == 'iter':
        loop = PipelinedIterBasedTrainLoop(Runner(), loader, max_iters=3)
    else:
        loop = PipelinedEpochBasedTrainLoop(Runner(), loader, max_epochs=1)

    def step(*args, ready=None):  # (data_batch) for the iteration loop, (idx, data_batch)
        if fail and loop._iter == 1:
            raise RuntimeError('a step failed')
        loop._iter += 1

    loop.run_iter = step
    seen = {}
    real_iter = DataLoader.__iter__

    def spy(self):
        seen['iterator'] = real_iter(self)
        return seen['iterator']

    with mock.patch.object(DataLoader, '__iter__', spy):
        if fail:
            with pytest.raises(RuntimeError, match='a step failed'):
                loop.run()
        else:
            loop.run()
    assert loop._iter == (1 if fail else 3 if loop_type == 'iter' else 16)
    assert seen['iterator']._workers and not _alive_workers(seen['iterator'])
    assert loader._iterator is None
