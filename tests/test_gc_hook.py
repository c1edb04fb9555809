"""GCHook in a real Runner: freeze, schedule, memory guard, validation, fork; and its benchmark."""
import gc
import multiprocessing
from unittest import mock

import pytest
from mmengine.hooks import Hook
from mmengine.testing import RunnerTestCase

from turbox_mm.engine.hooks import gc_hook
from turbox_mm.engine.hooks.gc_hook import GCHook


@pytest.mark.parametrize('kwargs,match', [
    (dict(interval=0), 'interval must be an int >= 1'),
    (dict(check_interval=2.5), 'check_interval must be an int >= 1'),
    (dict(generation=3), 'generation is 3; valid values: 0, 1, 2'),
    (dict(generation=True), 'generation is True; valid values'),
    (dict(rss_growth_mb=-1), 'rss_growth_mb must be None'),
])
def test_invalid_options_name_option_and_valid_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GCHook(**kwargs)


def _child_gc_enabled(queue):
    queue.put(gc.isenabled())


class _Probe(Hook):
    """Records the collector's state during training (runs before GCHook: NORMAL < LOWEST)."""

    priority = 'NORMAL'

    def __init__(self, fork=False):
        self.enabled, self.frozen, self.child = [], [], None
        self.fork = fork

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.enabled.append(gc.isenabled())
        self.frozen.append(gc.get_freeze_count())
        if self.fork and self.child is None:
            ctx = multiprocessing.get_context('fork')
            queue = ctx.Queue()
            proc = ctx.Process(target=_child_gc_enabled, args=(queue, ))
            proc.start()
            self.child = queue.get(timeout=30)
            proc.join()


class TestGCHook(RunnerTestCase):

    def setUp(self):
        super().setUp()
        self.was_enabled = gc.isenabled()

    def tearDown(self):
        gc.unfreeze()
        if self.was_enabled:
            gc.enable()
        super().tearDown()

    def _runner(self, cfg, probe=None, **hook):
        cfg.custom_hooks = [dict(type='turbox_mm.GCHook', **hook)]
        runner = self.build_runner(cfg)
        if probe is not None:
            runner.register_hook(probe)
        (gch,) = [h for h in runner.hooks if isinstance(h, GCHook)]
        return runner, gch

    def test_scheduled_collections_on_iteration_count(self):
        cfg = self.iter_based_cfg
        cfg.train_cfg = dict(by_epoch=False, max_iters=12, val_interval=100)
        probe = _Probe(fork=True)
        runner, hook = self._runner(cfg, probe, interval=4, rss_growth_mb=None)
        with mock.patch.object(gc_hook.gc, 'collect', wraps=gc.collect) as collect:
            runner.train()
        scheduled = [(p.mode, p.index) for p in hook.pauses if p.reason == 'scheduled']
        # The final validation (4 batches of 3) has its own schedule, on batch indices.
        assert scheduled == [('train', 4), ('train', 8), ('train', 12), ('val', 4)]
        assert all(p.ms >= 0 for p in hook.pauses)
        # One collection before freezing, the four scheduled ones, one at the end of the
        # validation: nothing else.
        gens = [c.args[0] if c.args else 2 for c in collect.call_args_list]
        assert len(gens) == 6 and gens[1:5] == [2, 2, 2, 2]
        assert probe.enabled == [False] * 12, 'automatic GC off for the whole training'
        assert min(probe.frozen) > 0, 'the built heap is frozen'
        assert probe.child is True, 'a process forked meanwhile switches GC back on'
        assert gc.isenabled() and gc.get_freeze_count() == 0, 'restored after training'
        history = runner.message_hub.get_scalar('train/gc_time').data[0]
        assert len(history) == 12
        assert [i for i, v in enumerate(history) if v > 0] == [3, 7, 11]

    def test_memory_guard_collects_early(self):
        cfg = self.iter_based_cfg
        cfg.train_cfg = dict(by_epoch=False, max_iters=12, val_interval=100)
        runner, hook = self._runner(cfg, interval=100, rss_growth_mb=1, check_interval=2)
        reads = iter([100 << 20] + [100 << 20, 100 << 20, 102 << 20, 100 << 20] + [100 << 20] * 50)
        with mock.patch.object(gc_hook, 'rss_bytes', side_effect=lambda: next(reads)):
            runner.train()
        early = [p for p in hook.pauses if p.reason == 'rss']
        # rss reads: baseline, check@2, check@4, check@6 (+2 MB: fires, re-reads baseline), ...
        assert [p.index for p in early] == [6]

    def test_sync_guard_collects_when_another_rank_fires(self):
        cfg = self.iter_based_cfg
        cfg.train_cfg = dict(by_epoch=False, max_iters=4, val_interval=100)
        runner, hook = self._runner(cfg, interval=100, rss_growth_mb=1, check_interval=2)

        def other_rank_fires(tensor, op):
            assert op == 'max'
            tensor.fill_(1)

        with mock.patch('mmengine.dist.is_distributed', return_value=True), \
                mock.patch('mmengine.dist.all_reduce', side_effect=other_rank_fires) as reduce:
            runner.train()
        assert reduce.call_count == 2  # checks at iterations 2 and 4
        assert [p.index for p in hook.pauses if p.reason == 'rss'] == [2, 4]

    def test_standalone_validation(self):
        cfg = self.epoch_based_cfg
        runner, hook = self._runner(cfg, interval=2, rss_growth_mb=None)
        seen = []
        with mock.patch.object(GCHook, 'after_val_iter', autospec=True,
                               side_effect=lambda self, runner, batch_idx, **kw:
                               (seen.append(gc.isenabled()),
                                GCHook._step(self, runner, 'val', batch_idx + 1, False))):
            runner.val()
        assert seen and not any(seen), 'GC off during validation'
        assert gc.isenabled() and gc.get_freeze_count() == 0
        assert [(p.mode, p.reason) for p in hook.pauses][-1] == ('val', 'end')
        assert [p.index for p in hook.pauses if p.reason == 'scheduled'] == [2, 4]


def test_gc_benchmark_rows():
    from turbox_mm.benchmark.micro import gc as bench
    rows = bench.benchmark('cpu', quick=True)
    assert [r['case'].split(' (')[0] for r in rows] == ['step', 'gc pause']
    for row in rows:
        assert row['component'] == 'GCHook'
        assert row['stock'] is None or row['stock']['median_ms'] >= 0
    assert rows[0]['turbox']['iters'] == 60
    assert rows[1]['turbox']['iters'] == 3  # one scheduled collection every 20 of 60 steps
    assert gc.isenabled() and gc.get_freeze_count() == 0
