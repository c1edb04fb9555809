"""Summaries, tables and charts of end-to-end benchmark results."""
import os
import platform
import statistics
from typing import Dict, List, Optional, Sequence

import torch

from .e2e import PHASES


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float('nan')
    pos = q * (len(ordered) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(result: dict) -> dict:
    """Medians and spread of one config's per-iteration measurements.

    Args:
        result (dict): The output of :func:`~turbox_mm.benchmark.measure_config`.

    Returns:
        dict: ``config`` and ``variant`` (the overrides of a ``--variant`` run, or None),
        ``round`` (of ``--rounds``, 1 by default), ``iter_ms`` (median), ``iter_p10_ms``,
        ``iter_p90_ms``, the median of every phase in ``phases_ms``, ``samples_per_s`` and
        ``window_s`` (the whole timed window, slow iterations included), ``loss_mean`` and the
        resource figures.
    """
    rows = result['per_iter']
    iters = [r['iter'] for r in rows]
    losses = result.get('losses') or []
    return dict(
        config=result['config'],
        variant=result.get('variant'),
        variant_index=result.get('variant_index'),
        round=result.get('round', 1),
        iter_ms=statistics.median(iters),
        iter_p10_ms=_quantile(iters, 0.1),
        iter_p90_ms=_quantile(iters, 0.9),
        phases_ms={p: statistics.median(r[p] for r in rows) for p in PHASES},
        samples_per_s=result['samples_per_s'],
        window_s=result['window_s'],
        loss_mean=statistics.fmean(losses) if losses else None,
        peak_mem_mb=result.get('peak_mem_mb'),
        gpu_util=result.get('gpu_util'),
        loader_cpu_cores=result.get('loader_cpu_cores'),
        main_cpu_cores=result.get('main_cpu_cores'),
        other_cpu_cores=result.get('other_cpu_cores'),
        steal_cpu_cores=result.get('steal_cpu_cores'),
        host_syncs_per_iter=result.get('host_syncs_per_iter'),
    )


def reduction_percent(baseline_samples_per_s: float, other_samples_per_s: float) -> float:
    """Training time saved by ``other`` against ``baseline``, in percent (positive: faster).

    Computed from the time per sample over the whole timed window, so slow iterations (epoch
    transitions, loader stalls) count as they do in real training; the median iteration time
    alone would hide them.

    Examples:
        >>> reduction_percent(100.0, 200.0)
        50.0
    """
    return 100.0 * (1.0 - baseline_samples_per_s / other_samples_per_s)


def _render(head: List[str], lines: List[list]) -> List[str]:
    """A plain-text table's lines: the header, a rule and the rows, columns padded alike."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    out = [' | '.join(h.ljust(w) for h, w in zip(head, widths)),
           '-+-'.join('-' * w for w in widths)]
    return out + [' | '.join(str(x).ljust(w) for x, w in zip(row, widths)) for row in lines]


def _fmt(value: Optional[float], spec: str) -> str:
    return 'n/a' if value is None else format(value, spec)


def format_table(summaries: List[dict], failures: Optional[Dict[str, str]] = None,
                 compare: bool = True) -> str:
    """Render summaries as a plain-text table; the first config is the baseline.

    Args:
        summaries (list[dict]): Outputs of :func:`summarize`, baseline first.
        failures (dict, optional): Config path to error message, for configs that failed.
        compare (bool): Show the time saved against the first row; False where the first
            row is not the baseline (it failed), so no column compares against another run.

    Returns:
        str: The table, then one line per failure.
    """
    head = ['config', 'iter ms (p10-p90)', 'time saved', 'samples/s'] + \
        [f'{p} ms' for p in PHASES] + ['loss', 'peak MiB', 'GPU %', 'syncs/iter',
                                       'loader cores', 'main cores', 'other cores',
                                       'steal cores']
    lines = []
    base = summaries[0]['samples_per_s'] if summaries else None
    for s in summaries:
        vs = '-' if s is summaries[0] or not compare else \
            f"{reduction_percent(base, s['samples_per_s']):+.1f}%"
        lines.append([
            run_label(s),
            f"{s['iter_ms']:.2f} ({s['iter_p10_ms']:.2f}-{s['iter_p90_ms']:.2f})",
            vs,
            f"{s['samples_per_s']:.1f}",
            *[f"{s['phases_ms'][p]:.2f}" for p in PHASES],
            _fmt(s['loss_mean'], '.4g'),
            _fmt(s['peak_mem_mb'], '.0f'),
            _fmt(s['gpu_util'], '.0f'),
            _fmt(s.get('host_syncs_per_iter'), '.1f'),
            _fmt(s['loader_cpu_cores'], '.2f'),
            _fmt(s.get('main_cpu_cores'), '.2f'),
            _fmt(s.get('other_cpu_cores'), '.2f'),
            _fmt(s.get('steal_cpu_cores'), '.2f'),
        ])
    out = _render(head, lines)
    out.append("iter ms: median (10th-90th percentile) of the timed iterations; phases: medians. "
               "'time saved': training time per sample saved against the first config over "
               "the whole timed window (positive = faster). 'GPU %': NVML utilisation over the "
               "window; 'syncs/iter': host-device synchronisations per iteration (CUDA's sync "
               "debug mode, untimed iterations after the window; n/a without CUDA). Cores: CPU "
               "cores busy on average over the window: the loader (this run's child "
               "processes), the main process, every other process of the machine, and time "
               "stolen by the hypervisor (a host-bound step slows down when these grow).")
    for config, error in (failures or {}).items():
        out.append(f'FAILED {config}: {error}')
    return '\n'.join(out)


def round_summary(summaries: List[dict], baseline: str) -> List[dict]:
    """Each run (config, or config + variant) over the rounds of ``--rounds``.

    A round runs every config once, in the order given, so a pair measured in one round ran
    minutes apart; a host that drifts between rounds moves both rows of a round alike. Each
    round's "time saved" is against that round's run of ``baseline``; a round where the
    baseline failed has none.

    Args:
        summaries (list[dict]): Outputs of :func:`summarize` with their ``round`` (1, 2, ...),
            in run order.
        baseline (str): The :func:`run_label` of the baseline run (the first config).

    Returns:
        list[dict]: Per run, in the order of first appearance: ``label``; ``iter_ms`` and
        ``saved`` (percent; None for the baseline itself) per round, 1 to the last round with
        a result, None where the run failed or the round's baseline did; ``iter_ms_median``,
        ``saved_median``, ``saved_min``, ``saved_max`` over the rounds with a value (None
        where none has one).

    Examples:
        >>> rows = [dict(config='s.py', round=1, iter_ms=10.0, samples_per_s=10.0),
        ...         dict(config='t.py', round=1, iter_ms=5.0, samples_per_s=20.0),
        ...         dict(config='s.py', round=2, iter_ms=12.0, samples_per_s=8.0),
        ...         dict(config='t.py', round=2, iter_ms=5.0, samples_per_s=20.0)]
        >>> [(r['label'], r['iter_ms_median'], r['saved_median'])
        ...  for r in round_summary(rows, 's.py')]
        [('s.py', 11.0, None), ('t.py', 5.0, 55.0)]
    """
    if not summaries:
        return []
    last = max(s['round'] for s in summaries)
    base = {s['round']: s for s in summaries if run_label(s) == baseline}
    rows: Dict[str, dict] = {}
    for s in summaries:
        label, index = run_label(s), s['round'] - 1
        row = rows.setdefault(label, dict(label=label, iter_ms=[None] * last,
                                          saved=[None] * last))
        row['iter_ms'][index] = s['iter_ms']
        if label != baseline and s['round'] in base:
            row['saved'][index] = reduction_percent(base[s['round']]['samples_per_s'],
                                                    s['samples_per_s'])
    for row in rows.values():
        times = [v for v in row['iter_ms'] if v is not None]
        row['iter_ms_median'] = statistics.median(times)
        values = [v for v in row['saved'] if v is not None]
        row['saved_median'] = statistics.median(values) if values else None
        row['saved_min'] = min(values) if values else None
        row['saved_max'] = max(values) if values else None
    return list(rows.values())


def format_round_summary(rows: List[dict]) -> str:
    """Render :func:`round_summary`'s rows as a plain-text table.

    Args:
        rows (list[dict]): Outputs of :func:`round_summary`.

    Returns:
        str: The table ("-" where a round has no value), then a line saying what it shows.
    """
    head = ['run', 'iter ms per round', 'median iter ms', 'time saved per round',
            'median time saved (min-max)']
    lines = []
    for row in rows:
        times = ', '.join('-' if v is None else f'{v:.2f}' for v in row['iter_ms'])
        saved = ', '.join('-' if v is None else f'{v:+.1f}%' for v in row['saved'])
        spread = '-' if row['saved_median'] is None else (
            f"{row['saved_median']:+.1f}% ({row['saved_min']:+.1f}% to "
            f"{row['saved_max']:+.1f}%)")
        lines.append([row['label'], times, f"{row['iter_ms_median']:.2f}", saved, spread])
    out = _render(head, lines)
    out.append("Over the rounds: each round ran every config once, in order; 'time saved' per "
               "round is against that round's run of the first config ('-' where it or the "
               'run failed).')
    return '\n'.join(out)


def run_label(summary: dict) -> str:
    """A table row's name: the config's file name, with a variant's overrides after it.

    Examples:
        >>> run_label(dict(config='a/x_turbox.py', variant='turbox.gc=False'))
        'x_turbox.py + turbox.gc=False'
    """
    name = os.path.basename(summary['config'])
    return f"{name} + {summary['variant']}" if summary.get('variant') else name


def bar_labels(summaries: Sequence[dict]) -> List[str]:
    """The chart's bar names: :func:`chart_labels` of the distinct configs, a ``--variant``
    run's with ``+ v<its number>``.

    Examples:
        >>> bar_labels([dict(config='a/m_stock.py'), dict(config='a/m_turbox.py'),
        ...             dict(config='a/m_turbox.py', variant='x=1', variant_index=1)])
        ['stock', 'turbox', 'turbox + v1']
    """
    configs = list(dict.fromkeys(s['config'] for s in summaries))
    short = dict(zip(configs, chart_labels(configs)))
    return [f"{short[s['config']]} + v{s.get('variant_index') or ''}" if s.get('variant')
            else short[s['config']] for s in summaries]


def chart_labels(configs: Sequence[str]) -> List[str]:
    """Short bar labels: the config names without the part they all share in front, e.g.
    ``sparse4dv3_r50_..._stock.py`` and ``..._turbox.py`` become ``stock`` and ``turbox``.

    Examples:
        >>> chart_labels(['a/model_x_stock.py', 'b/model_x_turbox.py'])
        ['stock', 'turbox']
        >>> chart_labels(['a/stock.py'])
        ['stock']
    """
    names = [os.path.splitext(os.path.basename(c))[0] for c in configs]
    if len(names) < 2:
        return names
    prefix = os.path.commonprefix(names)
    cut = max(prefix.rfind('_'), prefix.rfind('-')) + 1
    short = [n[cut:] or n for n in names]
    return short if len(set(short)) == len(short) else names


def write_chart(summaries: List[dict], path: str) -> Optional[str]:
    """Write a stacked bar chart of the median phase times per config.

    Args:
        summaries (list[dict]): Outputs of :func:`summarize`.
        path (str): Where to write the PNG.

    Returns:
        str | None: ``path``, or None when matplotlib is not installed.
    """
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = bar_labels(summaries)
    fig, ax = plt.subplots(figsize=(max(5, 1.8 * len(names) + 2), 4.5))
    bottom = [0.0] * len(names)
    for phase in PHASES:
        values = [s['phases_ms'][phase] for s in summaries]
        ax.bar(names, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, s in enumerate(summaries):
        ax.text(i, bottom[i], f"{s['iter_ms']:.1f} ms", ha='center', va='bottom')
    ax.set_ylabel('median time per iteration (ms)')
    ax.set_title('Training iteration breakdown')
    ax.legend(loc='upper right', fontsize='small')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def machine_info() -> dict:
    """Describe the machine the benchmark runs on (for the docs and the JSON)."""
    info = dict(
        host=platform.node(),
        python=platform.python_version(),
        torch=torch.__version__,
        cpu=platform.processor() or platform.machine(),
        cpu_cores=os.cpu_count(),
    )
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    info['cpu'] = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        info['gpu'] = torch.cuda.get_device_name()
        info['cuda'] = torch.version.cuda
    else:
        info['gpu'] = None
    from turbox_mm.utils.sparse_conv import sparse_conv_backend
    info['sparse_conv'] = sparse_conv_backend()
    return info


def machine_line(machine: dict) -> str:
    """One line for a :func:`machine_info` dict.

    Args:
        machine (dict): :func:`machine_info`'s output.

    Returns:
        str: CPU and cores, GPU, torch, and the library mmdet3d builds sparse convolutions
        from in this environment.
    """
    return (f"{machine['cpu']} x{machine['cpu_cores']}, {machine['gpu'] or 'no GPU'}, torch "
            f"{machine['torch']}, mmdet3d's sparse convolutions: "
            f"{machine.get('sparse_conv', '?')}")
