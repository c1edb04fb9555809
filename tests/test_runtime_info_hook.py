"""TurboxRuntimeInfoHook: the stock log, without a host sync per iteration.

The asynchronous path needs CUDA events; on the CPU the tests run it with the device pieces
replaced (CPU values treated as device values, events that complete only when waited on), so
every value reaches the message hub only through the hook's flushes. The smoke config then
trains twice, with mmengine's hook and with turbox's, and the logs, the message hub kept in
the checkpoints and validation must be identical.
"""
import json
import os
import textwrap

import pytest
import torch

from conftest import run_python

SCRIPT = textwrap.dedent('''
    import sys
    import torch
    from mmengine.config import Config
    from turbox_mm.engine import async_scalars
    from turbox_mm.engine.runner import build_runner

    class NeverDone:  # completes only when waited on: values move only at flushes
        def query(self):
            return False

        def synchronize(self):
            pass

    async_scalars.AsyncScalars.ASYNC_DEVICES = ('cpu', )
    async_scalars.AsyncScalars._record_event = lambda self, device: NeverDone()
    async_scalars.AsyncScalars._allocate_host = lambda self, width: torch.zeros(
        self.capacity, width, dtype=torch.float64)

    cfg = Config.fromfile('configs/smoke/smoke_stock.py')
    cfg.work_dir = sys.argv[1]
    cfg.default_hooks.logger.interval = 3  # windows that straddle epochs (8 iters each)
    if sys.argv[2] == 'turbox':
        cfg.default_hooks.runtime_info = dict(type='turbox_mm.TurboxRuntimeInfoHook')
    runner = build_runner(cfg)
    runner.train()
    hub = torch.load(f'{sys.argv[1]}/epoch_3.pth', weights_only=False)['message_hub']
    history = {k: v._log_history.tolist() for k, v in hub['log_scalars'].items()
               if k.startswith('train/') and not k.endswith('time')}
    torch.save(history, f'{sys.argv[1]}/history.pt')
''')


def _scalars(work_dir):
    records = []
    for stamp in sorted(os.listdir(work_dir)):
        path = os.path.join(work_dir, stamp, 'vis_data', 'scalars.json')
        if os.path.isfile(path):
            with open(path) as f:
                records += [json.loads(line) for line in f]
    drop = ('time', 'data_time', 'memory', 'eta')
    return [{k: v for k, v in r.items() if k not in drop} for r in records]


def test_logs_and_checkpointed_history_equal_mmengine_hook(tmp_path):
    script = tmp_path / 'train.py'
    script.write_text(SCRIPT)
    runs = {}
    for kind in ('stock', 'turbox'):
        work_dir = tmp_path / kind
        proc = run_python([str(script), str(work_dir), kind], env={'CUDA_VISIBLE_DEVICES': ''})
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[kind] = (_scalars(work_dir), torch.load(work_dir / 'history.pt'))
    (stock_log, stock_hist), (turbox_log, turbox_hist) = runs['stock'], runs['turbox']
    assert len(stock_log) >= 8 and sum('loss' in r for r in stock_log) >= 8
    assert any('accuracy' in str(r) or 'val' in str(r) or 'step' in r for r in stock_log)
    assert turbox_log == stock_log
    assert sorted(turbox_hist) == sorted(stock_hist) and 'train/loss' in stock_hist
    for key in stock_hist:
        assert turbox_hist[key] == stock_hist[key], key


def test_values_wait_for_the_flush_and_arrive_in_order():
    from mmengine.logging import MessageHub

    from fake_event import FakeEvent
    from turbox_mm.engine.async_scalars import AsyncScalars

    class CPUScalars(AsyncScalars):
        ASYNC_DEVICES = ('cpu', )

        def _allocate_host(self, width):
            return torch.zeros(self.capacity, width, dtype=torch.float64)

        def _record_event(self, device):
            return FakeEvent()

    hub = MessageHub.get_instance('test_runtime_info_hook_order')
    log = CPUScalars(hub, capacity=8)
    half = torch.tensor(0.5, dtype=torch.float64)
    log.push({'train/loss': torch.tensor(1.5), 'train/loss_cls': half})
    log.push({'train/loss': torch.tensor(2.5), 'train/lr': 0.1})  # a host value queues behind
    assert 'train/loss' not in hub.log_scalars and 'train/lr' not in hub.log_scalars
    log.flush()
    assert hub.get_scalar('train/loss').data[0].tolist() == [1.5, 2.5]
    assert hub.get_scalar('train/loss_cls').data[0].tolist() == [0.5]
    assert hub.get_scalar('train/lr').data[0].tolist() == [0.1]
    for value in range(20):  # capacity 8: the host waits for the oldest, nothing is lost
        log.push({'train/x': torch.tensor(float(value))})
    log.flush()
    assert hub.get_scalar('train/x').data[0].tolist() == [float(v) for v in range(20)]


def test_bad_arguments_are_named():
    from turbox_mm.engine.hooks import TurboxRuntimeInfoHook
    with pytest.raises(ValueError, match='interval must be a positive int'):
        TurboxRuntimeInfoHook(interval=0)
    with pytest.raises(ValueError, match='capacity must be a positive int'):
        TurboxRuntimeInfoHook(capacity=True)


def test_option_swaps_the_default_hook():
    from mmengine.config import Config

    from turbox_mm.engine.runner.turbox_options import TURBOX_OPTIONS, apply_turbox_options
    from turbox_mm.utils.options import check_options
    cfg = Config.fromfile('configs/smoke/smoke_stock.py')
    changes = apply_turbox_options(cfg, check_options({}, TURBOX_OPTIONS))
    assert cfg.default_hooks.runtime_info == dict(type='turbox_mm.TurboxRuntimeInfoHook',
                                                  interval=4)
    assert any('TurboxRuntimeInfoHook' in c for c in changes)
    cfg = Config.fromfile('configs/smoke/smoke_stock.py')
    cfg.default_hooks.runtime_info = None  # switched off by the user: left off
    apply_turbox_options(cfg, check_options({}, TURBOX_OPTIONS))
    assert cfg.default_hooks.runtime_info is None
