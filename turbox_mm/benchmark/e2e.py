"""Measure one config's training iterations, in the process that calls it.

:func:`measure_config` builds the config's runner, runs ``warmup + iters`` training iterations
(no validation, no checkpoints) and times the last ``iters`` of them. ``tools/benchmark.py``
calls it once per config, each in a fresh process, so that configs never share caches,
allocator state or loader workers.

The config's own train loop runs (epoch- or iteration-based, with its epoch transitions);
the run stops right after the timed window. What is measured, per iteration of the window:

- ``iter``: host time between the ends of consecutive iterations. The window starts and ends
  with a device synchronisation, so ``samples_per_s`` is exact; per-iteration times are not
  synchronised (that would change what is measured), and in steady state their median is the
  iteration time.
- ``data_wait``: host time from the end of the previous iteration to the start of this one
  (waiting for the loader, and the before-iteration hooks), plus, for turbox's pipelined
  loops, which fetch the next batch inside the iteration, the time that fetch waited for the
  loader: both loop kinds count the loader wait here, not in ``other``.
- ``preprocess`` (data preprocessor: host-to-device copy and batch transforms), ``forward``
  (forward and losses), ``backward``, ``optimizer`` (step and zero_grad): CUDA events around each
  phase on a GPU, host time on a CPU.
- ``other``: what the iteration spent outside those phases (hooks, logging, loss parsing).

Besides: samples/s, peak GPU memory, mean GPU utilisation (NVML, where available), CPU cores
used by loader workers (psutil, where available), and the training loss of every timed
iteration, so stock and turbox runs can be compared at equal loss.

After the timed window, ``sync_iters`` more iterations run (untimed: counting slows the host)
under CUDA's synchronisation debug mode (:mod:`.syncs`): ``host_syncs_per_iter`` and the
Python lines that synchronise most (``sync_sources``). With ``profile=True`` those iterations
also run under ``torch.profiler`` and the work dir gets ``syncs.txt`` (sources) and
``profile.txt`` (operator summary by self CPU time).
"""
import copy
import functools
import math
import os
import threading
import time
from typing import Dict, List, Optional

import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from turbox_mm.utils.atomic_files import atomic_write_text
from .host_time import format_host_breakdown, host_breakdown
from .syncs import SyncCounter, format_sources, profile_table, sync_summary

PHASES = ('data_wait', 'preprocess', 'forward', 'backward', 'optimizer', 'other')


class _PhaseClock:
    """Collects per-iteration phase times with CUDA events (GPU) or perf_counter (CPU)."""

    def __init__(self, use_cuda: bool) -> None:
        self.use_cuda = use_cuda
        self.current: Dict[str, list] = {}
        self.records: List[Dict[str, list]] = []

    def start(self, phase: str):
        if self.use_cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, phase: str, token) -> None:
        if self.use_cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.current.setdefault(phase, []).append((token, end))
        else:
            self.current.setdefault(phase, []).append(time.perf_counter() - token)

    def next_iter(self, keep: bool) -> None:
        if keep:
            self.records.append(self.current)
        self.current = {}

    def resolve(self) -> List[Dict[str, float]]:
        """Phase times in milliseconds, one dict per kept iteration."""
        out = []
        for rec in self.records:
            row = {}
            for phase, items in rec.items():
                if self.use_cuda:
                    row[phase] = sum(a.elapsed_time(b) for a, b in items)
                else:
                    row[phase] = 1e3 * sum(items)
            out.append(row)
        return out


def _wrap(obj, name: str, phase: str, clock: _PhaseClock) -> None:
    original = getattr(obj, name)

    # wraps() also carries the attributes of ``original``: mmengine's parameter schedulers
    # mark the optim wrapper's step they count with ``_with_counter`` and warn ("step() has
    # been overridden after parameter value scheduler initialization") where it is missing.
    @functools.wraps(original)
    def timed(*args, **kwargs):
        token = clock.start(phase)
        result = original(*args, **kwargs)
        clock.stop(phase, token)
        return result

    setattr(obj, name, timed)


class _UtilSampler:
    """Samples GPU utilisation through NVML in a background thread."""

    def __init__(self, interval: float = 0.05) -> None:
        self.samples: List[float] = []
        self.interval = interval
        self._stop = threading.Event()
        self._thread = None
        self.handle = None
        try:
            import pynvml
            pynvml.nvmlInit()
            index = torch.cuda.current_device()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
        except Exception:  # no NVML: utilisation is reported as unavailable
            self.handle = None

    def start(self) -> None:
        if self.handle is None:
            return
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
            time.sleep(self.interval)

    def stop(self) -> Optional[float]:
        if self._thread is None:
            return None
        self._stop.set()
        self._thread.join()
        return sum(self.samples) / len(self.samples) if self.samples else None


def _cpu_seconds() -> Optional[Dict[str, float]]:
    """CPU seconds so far: this process's own (``main``, every thread), its descendants'
    (``children``: the loader workers and any compile workers, those that ended too), and
    the machine's, busy and stolen (``busy``: every process, ``steal``: time the hypervisor
    gave a vCPU to another guest; 0 where the system does not report it). None without
    psutil."""
    try:
        import psutil
    except ImportError:
        return None
    me = psutil.Process()
    own = me.cpu_times()
    # descendants that ended and were reaped count here (their CPU time stays ours)
    children = getattr(own, 'children_user', 0.0) + getattr(own, 'children_system', 0.0)
    for child in me.children(recursive=True):
        try:
            times = child.cpu_times()
            children += times.user + times.system
        except psutil.Error:  # a worker that ended meanwhile
            continue
    machine = psutil.cpu_times()
    busy = sum(getattr(machine, f, 0.0) for f in ('user', 'nice', 'system', 'irq', 'softirq'))
    return dict(main=own.user + own.system, children=children, busy=busy,
                steal=getattr(machine, 'steal', 0.0))


def cpu_cores_used(start: Optional[Dict[str, float]], end: Optional[Dict[str, float]],
                   seconds: float) -> Dict[str, Optional[float]]:
    """Cores busy on average between two :func:`_cpu_seconds` snapshots.

    ``loader_cpu_cores``: this process's descendants; ``main_cpu_cores``: this process;
    ``other_cpu_cores``: every other process of the machine (busy cores less ours, at least
    0); ``steal_cpu_cores``: stolen by the hypervisor. A host-bound step that slows down with
    nothing else changed shows it here: other processes, or a busy neighbour (steal).

    Examples:
        >>> a = dict(main=1.0, children=2.0, busy=10.0, steal=0.5)
        >>> b = dict(main=2.0, children=4.0, busy=14.0, steal=0.5)
        >>> used = cpu_cores_used(a, b, 2.0)
        >>> used['loader_cpu_cores'], used['main_cpu_cores'], used['other_cpu_cores']
        (1.0, 0.5, 0.5)
    """
    keys = ('loader_cpu_cores', 'main_cpu_cores', 'other_cpu_cores', 'steal_cpu_cores')
    if start is None or end is None or seconds <= 0:
        return dict.fromkeys(keys)
    d = {k: (end[k] - start[k]) / seconds for k in start}
    return dict(zip(keys, (d['children'], d['main'],
                           max(0.0, d['busy'] - d['main'] - d['children']), d['steal'])))


class _WindowHook(Hook):
    """Marks iteration boundaries and the timed window; registered last (LOWEST)."""

    priority = 'LOWEST'

    def __init__(self, bench: '_Bench') -> None:
        self.bench = bench

    def before_train(self, runner) -> None:
        self.bench.instrument(runner)

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        self.bench.iter_started()

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self.bench.iter_ended(runner, outputs)


class _Bench:

    def __init__(self, iters: int, warmup: int, progress, sync_iters: int = 0,
                 profile: bool = False) -> None:
        self.iters = iters
        self.warmup = warmup
        self.progress = progress
        self.use_cuda = torch.cuda.is_available()
        self.profile = profile
        # Untimed iterations after the window: sync counting (CUDA) and the profile.
        self.extra = sync_iters if (self.use_cuda or profile) else 0
        self.syncs = SyncCounter(enabled=self.use_cuda)
        self.profiler = None
        self.clock = _PhaseClock(self.use_cuda)
        self.count = 0
        self.last_end = None
        self.iter_ms: List[float] = []
        self.wait_ms: List[float] = []
        self.fetch_ms: List[float] = []  # loader waits inside the iteration (pipelined loops)
        self.losses: List[torch.Tensor] = []
        self.batch_size = None
        self.window: Dict[str, float] = {}
        self.util = None

    def instrument(self, runner) -> None:
        model = runner.model
        inner = model.module if is_model_wrapper(model) else model
        _wrap(inner.data_preprocessor, 'forward', 'preprocess', self.clock)
        _wrap(model, '_run_forward', 'forward', self.clock)
        wrapper = runner.optim_wrapper
        _wrap(wrapper, 'backward', 'backward', self.clock)
        _wrap(wrapper, 'step', 'optimizer', self.clock)
        _wrap(wrapper, 'zero_grad', 'optimizer', self.clock)
        loader = runner.train_dataloader
        # A loader built with a batch sampler has batch_size None; the sampler knows it.
        self.batch_size = loader.batch_size or getattr(loader.batch_sampler, 'batch_size', None)

    def _timed(self) -> bool:
        """Whether the iteration now running (index ``count``) is in the timed window."""
        return self.warmup <= self.count < self.warmup + self.iters

    @property
    def total_iters(self) -> int:
        return self.warmup + self.iters + self.extra

    def iter_started(self) -> None:
        now = time.perf_counter()
        if self.last_end is not None and self._timed():
            self.wait_ms.append(1e3 * (now - self.last_end))

    def _sync(self) -> None:
        if self.use_cuda:
            torch.cuda.synchronize()

    def iter_ended(self, runner, outputs) -> None:
        timed = self._timed()
        self.clock.next_iter(keep=timed)
        prefetcher = getattr(runner.train_loop, '_prefetcher', None)
        fetched = getattr(prefetcher, 'fetch_seconds', 0.0)
        if prefetcher is not None:
            prefetcher.fetch_seconds = 0.0
        if timed:
            self.fetch_ms.append(1e3 * fetched)
        if timed and outputs is not None and 'loss' in outputs:
            loss = outputs['loss']
            self.losses.append(loss.detach() if torch.is_tensor(loss) else
                               torch.tensor(float(loss)))
        self.count += 1
        if self.count == self.warmup:
            self._start_window()
        elif timed:
            now = time.perf_counter()
            self.iter_ms.append(1e3 * (now - self.last_end))
        if self.progress and (self.count % max(1, self.total_iters // 10) == 0):
            self.progress(self.count, self.total_iters)
        if self.count == self.warmup + self.iters:
            self._end_window()
            if self.extra:
                self._start_extra()
        if self.count == self.total_iters:
            if self.extra:
                self._end_extra()
            raise BenchmarkDone()
        self.last_end = time.perf_counter()

    def _start_extra(self) -> None:
        self.syncs.__enter__()
        if self.profile:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.use_cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()

    def _end_extra(self) -> None:
        self._sync()
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
        self.syncs.__exit__(None, None, None)

    def _start_window(self) -> None:
        self._sync()
        if self.use_cuda:
            torch.cuda.reset_peak_memory_stats()
        self.util = _UtilSampler() if self.use_cuda else None
        if self.util:
            self.util.start()
        self.window['cpu0'] = _cpu_seconds()
        self.window['t0'] = time.perf_counter()

    def _end_window(self) -> None:
        self._sync()
        self.window['t1'] = time.perf_counter()
        self.window['cpu1'] = _cpu_seconds()
        self.window['util'] = self.util.stop() if self.util else None

    def result(self) -> dict:
        phases = self.clock.resolve()
        seconds = self.window['t1'] - self.window['t0']
        per_iter = []
        for i, total in enumerate(self.iter_ms):
            wait = self.wait_ms[i] if i < len(self.wait_ms) else 0.0
            row = {'iter': total,
                   'data_wait': wait + (self.fetch_ms[i] if i < len(self.fetch_ms) else 0.0)}
            for phase in ('preprocess', 'forward', 'backward', 'optimizer'):
                row[phase] = phases[i].get(phase, 0.0) if i < len(phases) else 0.0
            row['other'] = max(0.0, total - sum(row[p] for p in PHASES[:-1]))
            per_iter.append(row)
        return dict(
            iters=self.iters,
            warmup=self.warmup,
            batch_size=self.batch_size,
            device='cuda' if self.use_cuda else 'cpu',
            window_s=seconds,
            samples_per_s=self.iters * (self.batch_size or 0) / seconds,
            per_iter=per_iter,
            losses=[float(x) for x in self.losses],
            peak_mem_mb=(torch.cuda.max_memory_allocated() / 2**20 if self.use_cuda else None),
            gpu_util=self.window.get('util'),
            **cpu_cores_used(self.window.get('cpu0'), self.window.get('cpu1'), seconds),
            sync_iters=self.extra,
            **sync_summary(self.syncs, self.extra),
        )

    def write_profile(self, work_dir: str) -> Dict[str, str]:
        """``syncs.txt`` and ``profile.txt`` in ``work_dir`` (with ``profile=True``)."""
        if self.profiler is None:
            return {}
        os.makedirs(work_dir, exist_ok=True)
        paths = dict(syncs=os.path.join(work_dir, 'syncs.txt'),
                     profile=os.path.join(work_dir, 'profile.txt'))
        if self.syncs.total is None:
            syncs = 'no CUDA device: no synchronisations to count\n'
        else:
            syncs = format_sources(self.syncs.top(50), self.extra) + '\n'
        atomic_write_text(paths['syncs'], syncs)
        atomic_write_text(paths['profile'], ''.join((
            f'{self.extra} iterations after the timed window\n',
            format_host_breakdown(host_breakdown(self.profiler.events(), self.extra)) + '\n',
            profile_table(self.profiler) + '\n')))
        return paths


class BenchmarkDone(Exception):
    """Raised by the window hook after the last timed iteration, to stop the run there."""


def prepare_cfg(cfg: Config, work_dir: str) -> Config:
    """Turn a training config into a benchmark run.

    Validation, testing, checkpoints and resuming are switched off and the log interval is
    kept; the train loop, model, data, optimizer and turbox section are left as they are, so
    the run does exactly what training does (an iteration-based loop's epoch transitions
    included). The run is stopped after the timed window by :class:`BenchmarkDone`.
    """
    cfg = copy.deepcopy(cfg)
    cfg.work_dir = work_dir
    for key in ('val_dataloader', 'val_cfg', 'val_evaluator', 'test_dataloader', 'test_cfg',
                'test_evaluator'):
        cfg[key] = None
    if cfg.get('train_cfg'):
        cfg.train_cfg.pop('val_interval', None)
        cfg.train_cfg.pop('val_begin', None)
    hooks = cfg.get('default_hooks') or {}
    hooks['checkpoint'] = None
    cfg.default_hooks = hooks
    cfg.resume = False
    cfg.load_from = None
    drop_pretrained(cfg.get('model'))
    return cfg


def drop_pretrained(model) -> None:
    """Remove every ``Pretrained`` init config below ``model`` in place (a list of init configs
    keeps its other entries) and mmdet's deprecated ``pretrained=<checkpoint>`` strings."""
    from turbox_mm.engine.runner.turbox_options import config_dicts
    from turbox_mm.utils.pretrained import is_pretrained_init
    for _, node in config_dicts(model, 'model'):
        init = node.get('init_cfg')
        if is_pretrained_init(init):
            node['init_cfg'] = None
        elif isinstance(init, list) and any(is_pretrained_init(i) for i in init):
            node['init_cfg'] = [i for i in init if not is_pretrained_init(i)]
        if isinstance(node.get('pretrained'), str):
            node['pretrained'] = None


def measure_config(config: str,
                   iters: int = 100,
                   warmup: int = 20,
                   cfg_options: Optional[dict] = None,
                   work_dir: Optional[str] = None,
                   progress=None,
                   sync_iters: int = 3,
                   profile: bool = False) -> dict:
    """Build ``config``'s runner and time ``iters`` training iterations after ``warmup``.

    Args:
        config (str): Path of the training config.
        iters (int): Timed iterations. Defaults to 100.
        warmup (int): Untimed iterations first (compilation, allocator, loader start).
            Defaults to 20.
        cfg_options (dict, optional): Overrides merged into the config first.
        work_dir (str, optional): Where the runner writes its logs. Defaults to
            ``work_dirs/benchmark/<config name>``.
        progress (callable, optional): Called as ``progress(done, total)`` now and then.
        sync_iters (int): Untimed iterations after the window that count host
            synchronisations (on CUDA) and are profiled (with ``profile``). Defaults to 3.
        profile (bool): Profile those iterations; write ``syncs.txt`` and ``profile.txt`` to
            the work dir. Defaults to False.

    Returns:
        dict: The measurements described in this module's docstring.
    """
    from turbox_mm.engine.runner import build_runner

    if iters < 1 or warmup < 1 or sync_iters < 0:
        raise ValueError(f'iters and warmup must be >= 1 and sync_iters >= 0, got iters={iters} '
                         f'warmup={warmup} sync_iters={sync_iters}')
    if profile and sync_iters < 1:
        raise ValueError('profile needs sync_iters >= 1: the profiled iterations')
    if not os.path.isfile(config):
        raise FileNotFoundError(f'config file not found: {config}')
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    name = os.path.splitext(os.path.basename(config))[0]
    cfg = prepare_cfg(cfg, work_dir or os.path.join('work_dirs', 'benchmark', name))
    runner = build_runner(cfg)
    bench = _Bench(iters, warmup, progress, sync_iters=sync_iters, profile=profile)
    runner.register_hook(_WindowHook(bench))
    try:
        runner.train()
    except BenchmarkDone:
        pass
    if bench.count < bench.total_iters:
        raise RuntimeError(
            f'{config} trains only {bench.count} iterations, fewer than warmup + iters + '
            f'sync iterations = {bench.total_iters}; lower --warmup/--iters/--sync-iters or '
            'lengthen train_cfg (e.g. --cfg-options train_cfg.max_epochs=N)')
    result = bench.result()
    result['config'] = config
    result.update(bench.write_profile(cfg.work_dir))
    if any(not math.isfinite(x) for x in result['losses']):
        result['warning'] = 'non-finite loss in the timed window'
    return result
