"""tools/benchmark.py end to end on the smoke configs, and its report helpers."""
import json
import os.path as osp

import pytest
import torch

from conftest import ROOT, run_python
from turbox_mm.benchmark import (format_round_summary, format_table, reduction_percent,
                                 round_summary, summarize)
from turbox_mm.benchmark.e2e import PHASES, cpu_cores_used, prepare_cfg

STOCK = 'configs/smoke/smoke_stock.py'
TURBOX = 'configs/smoke/smoke_turbox.py'
ENV = {'CUDA_VISIBLE_DEVICES': ''}


@pytest.fixture(scope='module')
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench')
    bad = out / 'broken.py'
    bad.write_text("_base_ = ['%s']\nmodel = dict(type='turbox_mm.NoSuchModel')\n" %
                   osp.abspath(STOCK))
    proc = run_python(['tools/benchmark.py', STOCK, str(bad), TURBOX, '--iters', '12',
                       '--warmup', '4', '--out', str(out),
                       '--variant', 'turbox.optim.fused=False'], env=ENV)
    return proc, out


def test_runs_every_config_and_reports_the_failure(bench):
    proc, out = bench
    assert proc.returncode == 1, proc.stderr[-3000:]  # one config failed
    assert 'FAILED' in proc.stdout and 'NoSuchModel' in proc.stdout
    report = json.load(open(out / 'benchmark.json'))
    assert [osp.basename(s['config']) for s in report['summaries']] == \
        ['smoke_stock.py', 'smoke_turbox.py', 'smoke_turbox.py']
    assert [s['variant'] for s in report['summaries']] == [None, None,
                                                           'turbox.optim.fused=False']
    # the variant's files and work folder are its own, beside the config's
    assert (out / 'smoke_turbox.variant1.result.json').is_file()
    assert (out / 'smoke_turbox.result.json').is_file() and (out / 'smoke_turbox.variant1').is_dir()
    assert list(report['failures']) == [str(out / 'broken.py')]
    assert report['machine']['cpu_cores'] >= 1 and report['iters'] == 12
    assert 'tools/benchmark.py' in report['command']


def test_table_chart_and_progress(bench):
    proc, out = bench
    assert 'time saved' in proc.stdout and 'smoke_turbox.py' in proc.stdout
    assert 'smoke_turbox.py + turbox.optim.fused=False' in proc.stdout  # the variant's row
    assert 'iteration 16/16' in proc.stdout
    assert 'main cores' in proc.stdout and 'steal cores' in proc.stdout
    with open(out / 'benchmark.png', 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_measurements_are_complete_and_consistent(bench):
    _, out = bench
    report = json.load(open(out / 'benchmark.json'))
    for result in report['results']:
        assert len(result['per_iter']) == 12 and len(result['losses']) == 12
        for row in result['per_iter']:
            assert set(row) == {'iter', *PHASES}
            assert all(v >= 0 for v in row.values())
            # The phases never add up to more than the iteration they are part of.
            assert sum(row[p] for p in PHASES[:-1]) <= row['iter'] * 1.05 + 0.5
        assert result['samples_per_s'] == pytest.approx(
            12 * result['batch_size'] / result['window_s'])
        # the host's cores over the window: the main process trained (its own CPU time is
        # part of it), the rest is never negative
        assert 0 < result['main_cpu_cores'] <= report['machine']['cpu_cores'] + 0.5
        for key in ('loader_cpu_cores', 'other_cpu_cores', 'steal_cpu_cores'):
            assert result[key] >= 0, key


def test_cpu_cores_used_without_snapshots_and_with_a_busier_machine():
    assert set(cpu_cores_used(None, None, 1.0).values()) == {None}
    a = dict(main=0.0, children=0.0, busy=0.0, steal=0.0)
    # other processes' share is what the machine was busy beyond this run's processes
    used = cpu_cores_used(a, dict(main=1.0, children=0.5, busy=4.0, steal=1.0), 2.0)
    assert used == dict(loader_cpu_cores=0.25, main_cpu_cores=0.5, other_cpu_cores=1.25,
                        steal_cpu_cores=0.5)
    # counters read at slightly different moments never make it negative
    assert cpu_cores_used(a, dict(main=1.0, children=1.0, busy=1.5, steal=0.0),
                          1.0)['other_cpu_cores'] == 0.0


def test_stock_and_turbox_see_the_same_losses(bench):
    """turbox changes how data is loaded and how kernels run, not what is computed: the same
    seed gives the same losses up to the rounding of torch's fused AdamW kernel, which sums in
    another order than the for-each path (measured with torch 2.13.0 on the CPU: at most 2e-3
    relative after 12 steps of lr 1e-2; the losses are bit-identical with
    ``turbox.optim.fused=False``)."""
    _, out = bench
    stock, turbox, unfused = json.load(open(out / 'benchmark.json'))['results']
    assert stock['losses'] == pytest.approx(turbox['losses'], rel=5e-3)
    # the --variant run got its override: without the fused kernel, stock's losses exactly
    assert unfused['cfg_options'] == {'turbox.optim.fused': 'False'}
    assert unfused['losses'] == stock['losses']


def test_a_variant_needs_key_value_and_configs(tmp_path):
    proc = run_python(['tools/benchmark.py', STOCK, '--variant', 'turbox', '--out',
                       str(tmp_path)], env=ENV)
    assert proc.returncode != 0 and "--variant takes KEY=VALUE overrides, got 'turbox'" in \
        proc.stderr
    proc = run_python(['tools/benchmark.py', '--ops', 'bev_pool', '--variant', 'a=1'], env=ENV)
    assert proc.returncode != 0 and '--variant reruns the last config' in proc.stderr


def test_too_short_config_is_reported(tmp_path):
    proc = run_python(['tools/benchmark.py', STOCK, '--iters', '40', '--warmup', '4', '--out',
                       str(tmp_path)], env=ENV)
    assert proc.returncode == 1
    assert ('trains only 32 iterations, fewer than warmup + iters + sync iterations = 44'
            in proc.stdout)


def test_missing_config_named(tmp_path):
    proc = run_python(['tools/benchmark.py', 'configs/nope.py', '--out', str(tmp_path)],
                      env=ENV)
    assert proc.returncode != 0 and 'config file not found: configs/nope.py' in proc.stderr


def test_prepare_cfg_switches_off_validation_and_checkpoints():
    from mmengine.config import Config
    cfg = prepare_cfg(Config.fromfile(STOCK), '/tmp/x')
    assert cfg.val_dataloader is None and cfg.val_cfg is None and cfg.val_evaluator is None
    assert cfg.default_hooks.checkpoint is None
    assert cfg.train_cfg == dict(type='EpochBasedTrainLoop', max_epochs=4)


def test_prepare_cfg_drops_pretrained_init_everywhere_and_keeps_other_init():
    from mmengine.config import Config
    cfg = Config(dict(model=dict(
        type='M', backbone=dict(type='B', init_cfg=dict(type='Pretrained', checkpoint='http://x')),
        necks=[dict(type='N', init_cfg=[dict(type='Pretrained', checkpoint='a.pth'),
                                        dict(type='Kaiming', layer='Conv2d')])],
        head=dict(type='H', init_cfg=dict(type='Xavier')),
        img=dict(type='ResNet', pretrained='torchvision://resnet50'))))
    out = prepare_cfg(cfg, '/tmp/x').model
    assert out.img.pretrained is None
    assert out.backbone.init_cfg is None
    assert out.necks[0].init_cfg == [dict(type='Kaiming', layer='Conv2d')]
    assert out.head.init_cfg == dict(type='Xavier')
    assert cfg.model.backbone.init_cfg['type'] == 'Pretrained'  # the caller's config untouched


def _result(config, iters, sps, losses=(1.0, )):
    rows = [dict(iter=t, data_wait=0.1, preprocess=0.1, forward=t / 2, backward=t / 4,
                 optimizer=0.1, other=0.0) for t in iters]
    return dict(config=config, per_iter=rows, samples_per_s=sps, window_s=1.0,
                losses=list(losses))


def test_summary_and_table():
    a = summarize(_result('a.py', [10, 10, 12, 100], sps=10.0))
    b = summarize(_result('b.py', [5, 5, 6, 7], sps=25.0))
    assert a['iter_ms'] == 11 and b['phases_ms']['forward'] == 2.75
    assert reduction_percent(a['samples_per_s'], b['samples_per_s']) == pytest.approx(60.0)
    table = format_table([a, b], failures={'c.py': 'boom'})
    assert '+60.0%' in table and 'FAILED c.py: boom' in table


def test_round_summary_pairs_each_round_with_its_own_baseline():
    def row(config, round_, sps, variant=None):
        return dict(config=config, variant=variant, round=round_, iter_ms=1000.0 / sps,
                    samples_per_s=sps)

    rows = [row('a/s.py', 1, 10.0), row('a/t.py', 1, 20.0), row('a/t.py', 1, 25.0, 'x=1'),
            # round 2: the host got slower for both; the pair still saves 50%; the variant
            # failed
            row('a/s.py', 2, 5.0), row('a/t.py', 2, 10.0),
            # round 3: the baseline failed, so that round saves nothing against it
            row('a/t.py', 3, 40.0), row('a/t.py', 3, 30.0, 'x=1')]
    summary = {r['label']: r for r in round_summary(rows, 's.py')}
    assert list(summary) == ['s.py', 't.py', 't.py + x=1']
    s = summary['s.py']
    assert s['saved'] == [None] * 3 and s['saved_median'] is None
    assert s['iter_ms'] == [100.0, 200.0, None] and s['iter_ms_median'] == 150.0
    t = summary['t.py']
    assert t['saved'] == [pytest.approx(50.0), pytest.approx(50.0), None]
    assert t['iter_ms'] == [50.0, 100.0, 25.0] and t['saved_min'] == pytest.approx(50.0)
    v = summary['t.py + x=1']  # values stay in their rounds' columns
    assert v['iter_ms'] == [40.0, None, pytest.approx(1000 / 30)]
    assert v['saved'] == [pytest.approx(60.0), None, None]
    assert v['saved_median'] == pytest.approx(60.0) and v['saved_max'] == pytest.approx(60.0)
    text = format_round_summary(list(summary.values()))
    assert '+50.0%, +50.0%, -' in text and '+60.0% (+60.0% to +60.0%)' in text
    assert '40.00, -, 33.33' in text
    # a baseline that failed in round 1 still is the baseline of the other rounds
    later = round_summary([row('a/t.py', 1, 20.0), row('a/s.py', 2, 10.0),
                           row('a/t.py', 2, 20.0)], 's.py')
    assert later[0]['label'] == 't.py' and later[0]['saved'] == [None, pytest.approx(50.0)]
    assert round_summary([], 's.py') == []


def test_a_table_without_its_baseline_compares_nothing():
    a = summarize(_result('a.py', [10, 10], sps=10.0))
    b = summarize(_result('b.py', [5, 5], sps=25.0))
    assert '+60.0%' in format_table([a, b])
    assert '%' not in format_table([a, b], compare=False).split('\n')[3]


def test_rounds_alternate_the_configs_and_summarise(tmp_path):
    proc = run_python(['tools/benchmark.py', STOCK, TURBOX, '--iters', '4', '--warmup', '2',
                       '--sync-iters', '0', '--rounds', '2', '--out', str(tmp_path)], env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # round by round: stock, turbox, stock, turbox
    order = [line.split('] ', 1)[1] for line in proc.stdout.splitlines()
             if line.startswith('[') and '/4] ' in line]
    assert order == [f'{c} (round {r})' for r in (1, 2) for c in (STOCK, TURBOX)], order
    assert 'round 1:' in proc.stdout and 'round 2:' in proc.stdout
    assert 'median time saved (min-max)' in proc.stdout
    report = json.load(open(tmp_path / 'benchmark.json'))
    assert report['rounds'] == 2 and [s['round'] for s in report['summaries']] == [1, 1, 2, 2]
    assert [r['label'] for r in report['round_summary']] == ['smoke_stock.py',
                                                             'smoke_turbox.py']
    assert len(report['round_summary'][1]['saved']) == 2
    for stem in ('smoke_stock', 'smoke_turbox'):
        for r in (1, 2):
            assert (tmp_path / f'{stem}.round{r}.result.json').is_file()


def test_round_tables_compare_only_against_their_own_baseline():
    import sys
    sys.path.insert(0, ROOT)
    from tools.benchmark import _tables

    def row(config, round_, sps):
        return dict(summarize(_result(config, [1000.0 / sps] * 2, sps=sps)), round=round_)

    summaries = [row('a/t.py', 1, 20.0),  # round 1: the baseline s.py failed
                 row('a/s.py', 2, 10.0), row('a/t.py', 2, 20.0)]
    text = _tables(summaries, {'a/s.py (round 1)': 'boom'}, 2, 's.py')
    first, second = text.split('\n\nround 2:')
    assert first.startswith('round 1 (the baseline failed: no time saved):')
    assert '%' not in first.split('\n')[3] and '+50.0%' in second
    assert 'FAILED a/s.py (round 1): boom' in second  # under the last table
    one = _tables(summaries[:1], {}, 1, 's.py')  # one round, its baseline failed
    assert '%' not in one.split('\n')[2]


def test_two_runs_of_one_name_are_refused(tmp_path):
    proc = run_python(['tools/benchmark.py', STOCK, TURBOX, STOCK, '--out', str(tmp_path)],
                      env=ENV)
    assert proc.returncode != 0
    assert "two runs would share the name 'smoke_stock.py'" in proc.stderr, proc.stderr[-2000:]


def test_rounds_must_be_positive(tmp_path):
    proc = run_python(['tools/benchmark.py', STOCK, '--rounds', '0', '--out', str(tmp_path)],
                      env=ENV)
    assert proc.returncode != 0 and '--rounds must be >= 1' in proc.stderr


@pytest.mark.cuda
def test_measures_on_gpu(tmp_path):
    """On a GPU the phases come from CUDA events and peak memory is recorded."""
    proc = run_python(['tools/benchmark.py', TURBOX, '--iters', '12', '--warmup', '4',
                       '--profile', '--out', str(tmp_path)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.load(open(tmp_path / 'benchmark.json'))['results'][0]
    assert result['device'] == 'cuda'
    assert result['peak_mem_mb'] > 0
    assert all(row['forward'] > 0 and row['backward'] > 0 for row in result['per_iter'])
    profile = open(result['profile']).read()  # the GPU's share: what a GPU-bound step costs
    assert 'by self device time' in profile


def test_timeout_stops_a_silent_worker(tmp_path):
    # The worker prints nothing while it imports (seconds); the watchdog must still fire.
    proc = run_python(['tools/benchmark.py', STOCK, '--iters', '4', '--warmup', '2',
                       '--timeout', '0.5', '--out', str(tmp_path)], env=ENV)
    assert proc.returncode == 1
    assert 'timed out after 0.5 s' in proc.stdout


def test_component_mode_prints_one_table(tmp_path):
    proc = run_python(['tools/benchmark.py', '--components', 'ema', '--quick', '--out',
                       str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'component  case' in proc.stdout and 'speed-up' in proc.stdout
    report = json.load(open(tmp_path / 'components.json'))
    assert report['quick'] and report['rows'] and not report['failures']
    assert all(r['component'] == 'ema' and r['stock'] and r['turbox'] for r in report['rows'])


def test_component_mode_names_an_unknown_component(tmp_path):
    proc = run_python(['tools/benchmark.py', '--components', 'emma', '--out', str(tmp_path)])
    assert proc.returncode != 0
    assert "unknown micro benchmark 'emma'; valid names:" in proc.stderr


def test_op_and_component_modes_refuse_each_others_names(tmp_path):
    proc = run_python(['tools/benchmark.py', '--ops', 'ema', '--out', str(tmp_path)])
    assert proc.returncode != 0
    assert "'ema' is not an op benchmark (it runs under --components)" in proc.stderr
    proc = run_python(['tools/benchmark.py', '--components', 'bev_nms', '--out', str(tmp_path)])
    assert proc.returncode != 0
    assert "'bev_nms' is not a component benchmark (it runs under --ops)" in proc.stderr


def test_profile_writes_sources_and_operator_table_on_the_cpu(tmp_path):
    proc = run_python(['tools/benchmark.py', STOCK, '--iters', '4', '--warmup', '2',
                       '--sync-iters', '2', '--profile', '--out', str(tmp_path)], env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert 'syncs/iter' in proc.stdout and 'iteration 8/8' in proc.stdout
    result = json.load(open(tmp_path / 'benchmark.json'))['results'][0]
    assert result['sync_iters'] == 2 and result['host_syncs_per_iter'] is None
    assert len(result['per_iter']) == 4  # the profiled iterations are not timed
    profile = open(result['profile']).read()
    assert '2 iterations after the timed window' in profile and 'Self CPU' in profile
    assert 'by self CPU time' in profile and 'by self device time' not in profile  # no GPU
    # the host's time by kind: the smoke model's eager operators, its optimizer, the rest
    assert 'host time by kind' in profile and 'eager operators' in profile
    assert 'optimizer' in profile and 'profiled span' in profile
    assert 'no CUDA device' in open(result['syncs']).read()
    assert f"profile: {result['syncs']}" in proc.stdout


def test_sync_counter_counts_by_source_line():
    import warnings

    from turbox_mm.benchmark.syncs import SYNC_WARNING, SyncCounter, format_sources

    def record(line, message=f'{SYNC_WARNING}: x.item()'):
        return warnings.WarningMessage(UserWarning(message), UserWarning, 'head.py', line)

    counter = SyncCounter(enabled=False)
    assert counter.total is None
    counter.add([record(10), record(10), record(12), record(99, 'something else')])
    assert counter.total == 3 and counter.top() == [('head.py', 10, 2), ('head.py', 12, 1)]
    table = format_sources(counter.top(), iters=2)
    assert '1.0  head.py:10' in table and '0.5  head.py:12' in table


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_sync_counter_counts_item_and_masks_on_the_gpu():
    from turbox_mm.benchmark.syncs import SyncCounter
    x = torch.arange(10.0, device='cuda')
    with SyncCounter() as syncs:
        x.sum().item()
        x[x > 3].sum()  # a boolean mask: nonzero on the host
        y = x * 2  # no sync
    assert syncs.total >= 2 and y.is_cuda
    assert all(f.endswith('test_benchmark.py') for f, _, _ in syncs.top())
    assert torch.cuda.get_sync_debug_mode() == 0


def test_timing_wrapper_keeps_the_scheduler_step_counter():
    """mmengine's parameter schedulers count the optim wrapper's steps through a wrapped
    ``step`` marked ``_with_counter``; the benchmark's timing wrapper must keep the mark, or
    mmengine warns that ``optimizer.step()`` was overridden (it was seen in benchmark logs)."""
    import warnings

    from mmengine.optim import OptimWrapper
    from mmengine.optim.scheduler import LinearLR

    from turbox_mm.benchmark.e2e import _PhaseClock, _wrap
    param = torch.nn.Parameter(torch.ones(2))
    wrapper = OptimWrapper(torch.optim.SGD([param], lr=0.1))
    scheduler = LinearLR(wrapper, start_factor=0.5, by_epoch=False, begin=0, end=4)
    _wrap(wrapper, 'step', 'optimizer', _PhaseClock(use_cuda=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        for _ in range(2):
            param.sum().backward()
            wrapper.step()
            scheduler.step()
    assert not [w for w in caught if 'overridden' in str(w.message)]
    assert wrapper._global_step == 1  # both steps counted (it starts at -1)


def test_pipelined_loop_counts_its_loader_wait_as_data_wait(monkeypatch, tmp_path):
    """turbox's pipelined loop fetches the next batch inside the iteration; that wait must land
    in data_wait, as the stock loop's wait between iterations does, not in other."""
    import statistics
    import time as time_module

    from turbox_mm.benchmark.e2e import measure_config
    from turbox_mm.testing import SmokeDataset
    real = SmokeDataset.__getitem__

    def slow(self, index):
        time_module.sleep(0.005)  # 8 samples a batch: 40 ms of loader wait per iteration
        return real(self, index)

    monkeypatch.setattr(SmokeDataset, '__getitem__', slow)
    opts = {'train_dataloader.num_workers': 0, 'turbox.system.gc': False,
            'turbox.system.cpu_affinity': False, 'turbox.compile.enable': False,
            'turbox.dataloader.persistent_workers': False}
    result = measure_config('configs/smoke/smoke_turbox.py', iters=6, warmup=2,
                            cfg_options=opts, work_dir=str(tmp_path), sync_iters=0)
    rows = result['per_iter']
    wait = statistics.median(r['data_wait'] for r in rows)
    other = statistics.median(r['other'] for r in rows)
    assert wait >= 30, rows
    assert other < wait, rows


def test_spconv_precision_benchmark_says_it_needs_cuda_on_the_cpu():
    from turbox_mm.benchmark.micro import available, get
    assert 'spconv_precision' in available('component')
    rows = get('spconv_precision')('cpu', quick=True)
    assert len(rows) == 2 and all(r['stock'] is None and 'needs CUDA' in r['note'] for r in rows)


def test_worker_end_names_an_exit_hang(tmp_path):
    """A worker the watchdog stopped after it wrote its result hung on exit, and is named so;
    one stopped before is a plain timeout; a failed one gives its last line."""
    from tools.benchmark import check_worker_end
    result = tmp_path / 'a.result.json'
    with pytest.raises(RuntimeError, match='timed out after 5 s'):
        check_worker_end(True, -9, str(result), [], 5, 'a.log')
    with pytest.raises(RuntimeError, match=r'boom \(exit code 1; full log: a.log\)'):
        check_worker_end(False, 1, str(result), ['x\n', 'boom\n'], 5, 'a.log')
    result.write_text('{}')
    with pytest.raises(RuntimeError, match='did not exit within 5 s: an exit hang'):
        check_worker_end(True, -9, str(result), [], 5, 'a.log')
    check_worker_end(False, 0, str(result), [], 5, 'a.log')  # a good end: no error


def test_attention_benchmark_rows_on_the_cpu():
    from turbox_mm.benchmark.micro import available, get
    assert 'attention' in available('component')
    precision = torch.get_float32_matmul_precision()
    rows = get('attention')('cpu', quick=True)
    assert torch.get_float32_matmul_precision() == precision  # restored
    assert [r['case'] for r in rows] == [
        f'{size}: mmcv call vs {other}' for size in ('tiny cross', 'tiny self')
        for other in ('turbox', 'math backend', "torch's fused kernels")]
    assert all(r['stock']['median_ms'] > 0 and r['turbox']['median_ms'] > 0 for r in rows)
