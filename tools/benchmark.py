"""Benchmark configs against each other: stock vs turbox, end to end.

Each config runs in its own fresh process, on the same data with the same seed; after
``--warmup`` iterations, ``--iters`` iterations are timed. One table comes out (median and
spread of the iteration time, its breakdown, samples/s, mean loss, peak GPU memory, GPU
utilisation, host-device synchronisations per iteration, loader CPU use, and the training time
saved against the first config), plus ``benchmark.json`` and a stacked-bar chart
``benchmark.png`` in ``--out``. The synchronisations are counted over ``--sync-iters`` untimed
iterations after the window; ``--profile`` also profiles those iterations and writes, per
config, ``syncs.txt`` (the Python lines that synchronise, per iteration) and ``profile.txt``
(torch profiler operators by self CPU time and, on a GPU, by self device time) beside
its log.

Examples:
    python tools/benchmark.py configs/smoke/smoke_stock.py configs/smoke/smoke_turbox.py \\
        --iters 50 --warmup 10
    python tools/benchmark.py A.py B.py --cfg-options train_dataloader.num_workers=4
    python tools/benchmark.py STOCK.py TURBOX.py \
        --variant "turbox.compile.modules=['img_backbone','img_neck','pts_bbox_head']"

``--variant`` runs the last config once more with its overrides added (repeatable), in the
same call and on the same data, as its own table row: a turbox option switched on or off,
measured beside the configs it is compared with.

``--rounds N`` runs all of that N times, round by round (stock, turbox, stock, turbox, ...),
and prints one table per round and a summary over the rounds (per run: the median iteration
time of each round and their median; the time saved in each round and its median, min and
max). A host-bound step's speed can drift between runs minutes apart (docs/benchmarks.md has
two paired runs of one machine 19 points apart); rounds show that spread instead of one draw.

A config that fails is reported in the table; the others still run.

Component mode times turbox components against the stock ones they replace (optimizer step
and clipping, EMA update, SyncBN, GC pauses, ...), each at the sizes of the stock configs,
and prints one table (``components.json`` in ``--out``)::

    python tools/benchmark.py --components                # every micro benchmark
    python tools/benchmark.py --components optimizer ema  # some of them
    python tools/benchmark.py --components --quick        # tiny sizes: a smoke test

Data mode times the stock and turbox input pipelines on the synthetic nuScenes data (made
once into a cache when ``--data-root`` is not given): CPU time per sample, samples/s with N
loader workers, bytes per sample to the GPU and the GPU time of the moved work::

    python tools/benchmark.py --data sparse4d --workers 0 2 4 8
    python tools/benchmark.py --data bevfusion --data-root data/nuscenes_synth
    python tools/benchmark.py --data maptr --workers 0 2 4   # MapTR v2 (no gpu_decode row)

Op mode is the same for the ops of ``turbox_mm.ops`` (forward and forward+backward against
the stock op or the PyTorch reference, at the stock configs' sizes)::

    python tools/benchmark.py --ops                       # every op
    python tools/benchmark.py --ops deformable_aggregation
"""
import argparse
import json
import os
import os.path as osp
import shlex
import subprocess
import sys
import threading
import time
from typing import List, Optional

from mmengine.config import DictAction

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Benchmark training configs end to end')
    parser.add_argument('configs', nargs='*', help='configs to compare; the first is the '
                        'baseline')
    parser.add_argument('--components', nargs='*', metavar='NAME',
                        help='time turbox components against stock ones instead (no NAME: '
                        'all of turbox_mm.benchmark.micro)')
    parser.add_argument('--ops', nargs='*', metavar='NAME',
                        help='time turbox ops against the ops they replace (no NAME: all)')
    parser.add_argument('--data', choices=['sparse4d', 'bevfusion', 'maptr'],
                        help='time the stock and turbox input pipelines of a model setting')
    parser.add_argument('--workers', type=int, nargs='+', default=[0, 2, 4, 8],
                        help='data mode: loader worker counts to measure')
    parser.add_argument('--data-root', help='data mode: a synthetic or real nuScenes root with '
                        'v2 infos (default: a small synthetic set made once into a cache)')
    parser.add_argument('--data-samples', type=int, default=24,
                        help='data mode: samples per measurement')
    parser.add_argument('--quick', action='store_true',
                        help='component mode: tiny sizes, for a smoke test')
    parser.add_argument('--iters', type=int, default=100,
                        help='timed iterations (data mode: timed data-preprocessor calls)')
    parser.add_argument('--warmup', type=int, default=20, help='untimed iterations first')
    parser.add_argument('--sync-iters', type=int, default=3,
                        help='untimed iterations after the window that count host-device '
                        'synchronisations (CUDA); 0 to skip')
    parser.add_argument('--profile', action='store_true',
                        help='profile the sync iterations: syncs.txt and profile.txt per config')
    parser.add_argument('--out', help='folder for benchmark.json and benchmark.png '
                        '(default: work_dirs/benchmark/<time>)')
    parser.add_argument('--rounds', type=int, default=1,
                        help='run the configs (and variants) this many times, round by round '
                        '(A B A B ...): one table per round and a summary over the rounds; '
                        'for hosts whose speed drifts between runs')
    parser.add_argument('--seed', type=int, default=0, help='seed of every run')
    parser.add_argument('--timeout', type=float, default=3600,
                        help='seconds one config may take before it is reported failed')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='overrides applied to every config, key=value')
    parser.add_argument('--variant', nargs='+', action='append', metavar='KEY=VALUE',
                        help='one more run of the last config with these overrides too '
                        '(repeatable), e.g. a turbox option switched on or off, measured in '
                        'the same call as the configs it is compared with')
    parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--result', help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _write_json(path: str, value, indent: Optional[int] = 1) -> None:
    """``value`` as JSON at ``path``, written atomically: a run killed while writing (a time
    limit) leaves the old file or none, never a cut one."""
    from turbox_mm.utils.atomic_files import atomic_write_text
    atomic_write_text(path, json.dumps(value, indent=indent))


def worker(args) -> int:
    """Measure one config in this process and write its result as JSON."""
    from turbox_mm.benchmark import measure_config

    config = args.configs[0]
    options = dict(args.cfg_options or {})
    options.setdefault('randomness', dict(seed=args.seed))

    started = time.monotonic()

    def progress(done, total):
        # the seconds since the process started tell a run cut short by a time limit how long
        # its first, compiling iterations took and how fast the later ones went
        print(f'[{osp.basename(config)}] iteration {done}/{total} '
              f'({time.monotonic() - started:.0f} s)', file=sys.stderr, flush=True)

    # beside the result, named by its stem (a --variant run of a config gets its own)
    work_dir = args.result[:-len('.result.json')]
    result = measure_config(config, iters=args.iters, warmup=args.warmup, cfg_options=options,
                            sync_iters=args.sync_iters, profile=args.profile,
                            work_dir=work_dir, progress=progress)
    _write_json(args.result, result, indent=None)
    return 0


def _variant_options(variant: List[str]) -> dict:
    """``['key=value', ...]`` of ``--variant`` as mmengine's ``--cfg-options`` parses them."""
    bad = [item for item in variant if '=' not in item]
    if bad:
        raise SystemExit(f'benchmark: --variant takes KEY=VALUE overrides, got {bad[0]!r}')
    parser = argparse.ArgumentParser(prog='--variant')
    parser.add_argument('--options', nargs='+', action=DictAction)
    return dict(parser.parse_args(['--options', *variant]).options)


def runs_of(args) -> List[tuple]:
    """``(config, options, variant, index)`` of each run: the configs with ``--cfg-options``
    (variant and index None), then the last config once per ``--variant`` with its overrides
    added (variant: them, as text; index: 1, 2, ...)."""
    common = dict(args.cfg_options or {})
    runs = [(config, common, None, None) for config in args.configs]
    for index, variant in enumerate(args.variant or [], 1):
        extra = _variant_options(variant)
        label = ' '.join(f'{k}={_cli_value(v)}' for k, v in extra.items())
        runs.append((args.configs[-1], {**common, **extra}, label, index))
    return runs


def _run_one(config: str, args, out_dir: str, options: dict, tag: str = '') -> dict:
    """Measure ``config`` with the overrides ``options`` in a worker process; ``tag`` tells a
    variant's files from the config's."""
    stem = osp.splitext(osp.basename(config))[0] + tag
    result_path = osp.join(out_dir, stem + '.result.json')
    cmd = [sys.executable, osp.abspath(__file__), config, '--worker', '--result', result_path,
           '--iters', str(args.iters), '--warmup', str(args.warmup), '--seed', str(args.seed),
           '--sync-iters', str(args.sync_iters)] + (['--profile'] if args.profile else [])
    if options:
        cmd += ['--cfg-options'] + [f'{k}={_cli_value(v)}' for k, v in options.items()]
    env = dict(os.environ)
    env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
    log_path = osp.join(out_dir, stem + '.log')
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.PIPE, text=True, env=env)
        # A watchdog, so that a worker that hangs without printing is stopped too.
        fired = threading.Event()

        def stop_worker():
            fired.set()
            proc.kill()

        timer = threading.Timer(args.timeout, stop_worker)
        timer.start()
        tail = []
        try:
            for line in proc.stderr:  # progress goes to the terminal, everything to the log
                log.write(line)
                tail = (tail + [line])[-30:]
                if line.startswith('['):
                    print('  ' + line.rstrip(), flush=True)
            proc.wait()
        finally:
            timer.cancel()
    check_worker_end(fired.is_set(), proc.returncode, result_path, tail, args.timeout, log_path)
    with open(result_path) as f:
        result = json.load(f)
    # How long the worker took to exit after writing its result (its shutdown: loader workers,
    # threads, exit handlers); a slow exit is part of a training job's wall time too.
    result['exit_s'] = round(max(0.0, time.time() - osp.getmtime(result_path)), 2)
    if result['exit_s'] > 10:
        print(f'  note: {osp.basename(config)} took {result["exit_s"]:.1f} s to exit after '
              'writing its result', flush=True)
    return result


def check_worker_end(timed_out: bool, returncode: Optional[int], result_path: str,
                     tail: List[str], timeout: float, log_path: str) -> None:
    """Raise ``RuntimeError`` unless a benchmark worker ended well: it exited with status 0
    and wrote its result. A worker stopped by the watchdog after writing its result is named
    an exit hang (it measured, then did not end)."""
    if timed_out:
        if osp.isfile(result_path):
            raise RuntimeError(f'wrote its result, then did not exit within {timeout:g} s: an '
                               f'exit hang (log: {log_path})')
        raise RuntimeError(f'timed out after {timeout:g} s (log: {log_path})')
    if returncode != 0 or not osp.isfile(result_path):
        last = ''.join(tail).strip().splitlines()
        reason = last[-1] if last else f'exit code {returncode}'
        raise RuntimeError(f'{reason} (exit code {returncode}; full log: {log_path})')


def _tables(summaries: List[dict], failures: dict, rounds: int, baseline: str) -> str:
    """The report's tables.

    Args:
        summaries (list[dict]): Every run's summary, with its ``round``.
        failures (dict): Run label to error, listed under the last table.
        rounds (int): ``--rounds``.
        baseline (str): The baseline run's label (``run_label`` of the first config).

    Returns:
        str: One table of every run; with several rounds one per round, each against that
        round's baseline, or with no "time saved" where the baseline failed in it.
    """
    from turbox_mm.benchmark.report import format_table, run_label
    if not summaries:
        return '\n'.join(f'FAILED {c}: {e}' for c, e in failures.items())
    if rounds == 1:
        return format_table(summaries, failures, compare=run_label(summaries[0]) == baseline)
    parts = []
    done = sorted({s['round'] for s in summaries})
    for round_ in done:
        rows = [s for s in summaries if s['round'] == round_]
        ok = run_label(rows[0]) == baseline
        title = f'round {round_}:' if ok else \
            f'round {round_} (the baseline failed: no time saved):'
        parts.append(title + '\n' + format_table(
            rows, failures if round_ == done[-1] else None, compare=ok))
    return '\n\n'.join(parts)


def _cli_value(value) -> str:
    return repr(value).replace(' ', '') if isinstance(value, (list, tuple, dict)) else str(value)


def run_components(args, command: str) -> int:
    """Component mode: each micro benchmark in this process, one table."""
    import torch

    from turbox_mm.benchmark import machine_info, machine_line, micro
    from turbox_mm.benchmark.timing import format_rows, warm_up_gpu

    kind = 'op' if args.ops is not None else 'component'
    names = (args.ops if kind == 'op' else args.components) or micro.available(kind)
    valid = micro.available(kind)
    for name in names:
        micro.get(name)  # unknown names fail before anything runs, listing the valid ones
        if name not in valid:  # an op under --components or a component under --ops
            other = '--components' if kind == 'op' else '--ops'
            article = 'an op' if kind == 'op' else 'a component'
            raise SystemExit(f'benchmark: {name!r} is not {article} benchmark (it runs under '
                             f'{other}); valid names: {", ".join(valid)}')
    if not names:
        raise SystemExit(f'benchmark: no {kind} benchmark is available yet')
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    out_dir = args.out or osp.join('work_dirs', 'benchmark', time.strftime('%Y%m%d_%H%M%S'))
    os.makedirs(out_dir, exist_ok=True)
    machine = machine_info()
    print(f'{kind}s: {", ".join(names)} on {device}{" (quick)" if args.quick else ""}',
          flush=True)
    rows, failures = [], {}
    warm_up_gpu()
    for name in names:
        print(f'[{name}]', flush=True)
        try:
            rows += micro.get(name)(device, quick=args.quick)
        except Exception as exc:  # one failure must not stop the others
            failures[name] = f'{type(exc).__name__}: {exc}'
            print(f'  FAILED: {failures[name]}', flush=True)
    result_path = osp.join(out_dir, f'{kind}s.json')  # components.json or ops.json
    _write_json(result_path, dict(command=command, machine=machine, device=device,
                                  quick=args.quick, rows=rows, failures=failures))
    print(f'\nmachine: {machine_line(machine)}')
    print(f'command: {command}\n')
    print(format_rows(rows))
    for name, error in failures.items():
        print(f'FAILED {name}: {error}')
    print(f'\nresults: {result_path}')
    return 1 if failures else 0


def run_data(args, command: str) -> int:
    """Data mode: stock vs turbox input pipelines of one model setting."""
    from turbox_mm.benchmark import machine_info, machine_line
    from turbox_mm.benchmark.data import format_data_rows, measure_data_pipelines

    out_dir = args.out or osp.join('work_dirs', 'benchmark', time.strftime('%Y%m%d_%H%M%S'))
    os.makedirs(out_dir, exist_ok=True)
    machine = machine_info()
    rows = measure_data_pipelines(args.data_root, args.data, num_workers_list=args.workers,
                                  num_samples=args.data_samples, seed=args.seed,
                                  gpu_iters=args.iters, progress=True)
    result_path = osp.join(out_dir, f'data_{args.data}.json')
    _write_json(result_path, dict(command=command, machine=machine, rows=rows))
    print(f'\nmachine: {machine_line(machine)}')
    print(f'command: {command}\n')
    print(format_data_rows(rows))
    print(f'\nresults: {result_path}')
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    command = ' '.join(shlex.quote(a) for a in ['python', 'tools/benchmark.py', *sys.argv[1:]]) \
        if argv is None else 'tools/benchmark.py ' + ' '.join(map(shlex.quote, argv))
    if args.variant and not args.configs:
        raise SystemExit('benchmark: --variant reruns the last config: give configs')
    if args.data is not None:
        if args.configs or args.components is not None or args.ops is not None:
            raise SystemExit('benchmark: give configs, --components, --ops or --data, one of '
                             'them')
        return run_data(args, command)
    if args.components is not None or args.ops is not None:
        if args.configs or (args.components is not None and args.ops is not None):
            raise SystemExit('benchmark: give configs, --components or --ops, one of them')
        return run_components(args, command)
    if not args.configs:
        raise SystemExit('benchmark: give at least one config, or --components')
    if args.rounds < 1:
        raise SystemExit(f'benchmark: --rounds must be >= 1, got {args.rounds}')
    runs = runs_of(args)
    from turbox_mm.benchmark import (format_round_summary, machine_info, machine_line,
                                     round_summary, summarize, write_chart)
    from turbox_mm.benchmark.report import run_label
    labels = [run_label(dict(config=config, variant=variant)) for config, _, variant, _ in runs]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:  # rows, files and round summaries are told apart by these names
        raise SystemExit(f'benchmark: two runs would share the name {twice[0]!r} (a config '
                         'file name, plus a variant\'s overrides): give each config a file '
                         'name of its own; to measure a config again, use --rounds')

    for config in args.configs:
        if not osp.isfile(config):
            raise FileNotFoundError(f'config file not found: {config}')
    out_dir = args.out or osp.join('work_dirs', 'benchmark', time.strftime('%Y%m%d_%H%M%S'))
    os.makedirs(out_dir, exist_ok=True)
    machine = machine_info()
    rounds = args.rounds
    print(f'benchmark: {len(runs)} run(s)' + (f' x {rounds} rounds' if rounds > 1 else '') +
          f', {args.warmup} warm-up + {args.iters} timed iterations each, seed {args.seed}',
          flush=True)
    results, summaries, failures = [], [], {}
    for round_ in range(1, rounds + 1):
        for i, (config, options, variant, index) in enumerate(runs, 1):
            label = f'{config} + {variant}' if variant else config
            if rounds > 1:
                label += f' (round {round_})'
            print(f'[{i + (round_ - 1) * len(runs)}/{len(runs) * rounds}] {label}', flush=True)
            tag = (f'.variant{index}' if variant else '') + (
                f'.round{round_}' if rounds > 1 else '')
            try:
                result = _run_one(config, args, out_dir, options, tag)
            except Exception as exc:  # one failure must not stop the others
                failures[label] = str(exc)
                print(f'  FAILED: {exc}', flush=True)
                continue
            result['variant'] = variant
            result['variant_index'] = index
            result['round'] = round_
            result['cfg_options'] = {k: _cli_value(v) for k, v in options.items()}
            results.append(result)
            summaries.append(summarize(result))
    baseline = labels[0]
    table = _tables(summaries, failures, rounds, baseline)
    over_rounds = round_summary(summaries, baseline) if rounds > 1 else None
    if over_rounds:
        table += '\n\n' + format_round_summary(over_rounds)
    # the chart shows one round (every round's rows are in the tables): the first whose
    # baseline ran, else the first with a result
    with_base = [s['round'] for s in summaries if run_label(s) == baseline]
    chart_round = min(with_base or [s['round'] for s in summaries], default=None)
    charted = [s for s in summaries if s['round'] == chart_round]
    chart = write_chart(charted, osp.join(out_dir, 'benchmark.png')) if charted else None
    report = dict(command=command, machine=machine, iters=args.iters, warmup=args.warmup,
                  seed=args.seed, rounds=rounds, summaries=summaries, failures=failures,
                  results=results, round_summary=over_rounds)
    _write_json(osp.join(out_dir, 'benchmark.json'), report)
    print(f'\nmachine: {machine_line(machine)}')
    print(f'command: {command}\n')
    print(table)
    if chart:
        note = chart
    else:
        note = '(matplotlib not installed)' if summaries else '(no config succeeded)'
    print(f"\nresults: {osp.join(out_dir, 'benchmark.json')}\nchart:   {note}")
    for result in results:
        if result.get('profile'):
            print(f"profile: {result['syncs']}\n         {result['profile']}")
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
