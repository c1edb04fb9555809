"""Data loading, stock against turbox: loader CPU per sample, throughput, bytes and GPU cost.

On the synthetic nuScenes (:mod:`turbox_mm.datasets.synthetic`), mmdet3d's
``NuScenesDataset`` runs three pipelines per setting:

- ``stock``: what the upstream config runs on the CPU;
- ``turbox``: libjpeg-turbo loading with DCT-scaled decoding and one affine warp per image,
  uint8 out; normalisation (and Sparse4D's photometric distortion) on the GPU;
- ``turbox_gpu_decode``: no decoding in the loader at all, only the JPEG bytes and the warp
  matrices; nvJPEG decodes and warps on the GPU.

Settings (:mod:`turbox_mm.benchmark.data_setup`, which builds the pipelines, datasets and data
preprocessors): ``sparse4d`` (Sparse4D v3's camera pipeline, batch 6), ``bevfusion`` (the
training pipeline and data preprocessor of the BEVFusion camera + lidar config, batch 4, and
their ``turbox.data`` rewrite) and ``maptr`` (the same of MapTR v2's config, batch 4: images
scaled by 0.5, photometric distortion, normalisation, depth targets, padding, the precomputed
map ground truth and its rasterisation; ``stock`` and ``turbox`` only, the rewrite refuses
``gpu_decode`` for MapTR). Every pipeline sees the same samples and the same random draws
(MapTR's photometric draws aside: numpy's in the stock workers, a seeded torch generator on
the device in turbox).

What is measured (:func:`measure_data_pipelines`):

- ``cpu_ms``: CPU time (``time.process_time``, all threads of the process) of
  ``dataset[i]`` in the main process, i.e. with ``num_workers=0``, per sample; median and
  20/80% quantiles. OpenCV, torch and BLAS are held to one thread meanwhile, as in a loader
  worker. The pipelines take turns at every sample, in a rotating order.
  ``cpu_ms_by_transform`` splits the mean by transform (the rest is the dataset's own work:
  info lookup and deep copy).
- ``samples_per_s``: a ``DataLoader`` with ``N`` workers (persistent, ``pseudo_collate``,
  the setting's batch size, an endless seeded shuffle) read as fast as the main process can
  take batches: after ``2 * max(N, 1)`` warm-up batches, the arrival times of the next
  batches give the rate over every run of ``max(N, 2)`` consecutive batches; the median of
  those rates.
- ``bytes_to_gpu``: bytes per sample of every tensor and array in the packed ``inputs``
  (float32 images for stock, uint8 for turbox, JPEG bytes and warps for the deferred mode,
  points for BEVFusion), the mean over the timed samples; ``bytes_by_key`` splits it.
- ``gpu_ms``: the data preprocessor's work on a batch of packed samples (pinned, as the
  DataLoader's ``pin_memory`` leaves them), from the host batch to the normalised device
  batch, timed with CUDA events after warm-up, per sample. Stock: mmdet3d's
  ``Det3DDataPreprocessor`` as the upstream config sets it (the H2D copy of the float
  images, plus normalisation for BEVFusion). Turbox: ``TurboxDet3DDataPreprocessor``
  (uint8 copy, photometric distortion for Sparse4D, normalisation); deferred: nvJPEG
  decode, warp, then the same. ``gpu_host_ms`` is the main process's CPU time in that call
  (nvJPEG's Huffman decoding runs on the host). Only with CUDA (or an explicit
  ``gpu_device``, e.g. ``'cpu'`` for tests: then host wall time).
"""
import contextlib
import statistics
import time
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from turbox_mm.benchmark.data_setup import (CAMERAS, PIPELINES, SETTINGS,
                                            UNSUPPORTED_PIPELINES, build_dataset,
                                            build_pipeline, build_preprocessors,
                                            camera_image_hw, setting_pipelines, setting_values,
                                            synthetic_data_root, synthetic_options)
from turbox_mm.benchmark.timing import summarize_ms, warm_up_gpu

__all__ = ['CAMERAS', 'PIPELINES', 'SETTINGS', 'build_dataset', 'build_pipeline',
           'format_data_rows', 'loader_threads', 'measure_data_pipelines', 'setting_pipelines',
           'synthetic_data_root']


@contextlib.contextmanager
def loader_threads():
    """One thread for OpenCV, torch and BLAS meanwhile, as in a DataLoader worker.

    Yields:
        bool: Whether BLAS could be limited (needs ``threadpoolctl``).
    """
    import cv2
    cv2_threads, torch_threads = cv2.getNumThreads(), torch.get_num_threads()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            yield False
        else:
            with threadpool_limits(limits=1, user_api='blas'):
                yield True
    finally:
        cv2.setNumThreads(cv2_threads)
        torch.set_num_threads(torch_threads)


def _worker_init(worker_id: int) -> None:
    """DataLoader workers: one OpenCV and BLAS thread (torch already sets its own to 1)."""
    import cv2
    cv2.setNumThreads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(limits=1, user_api='blas')

# -- measurements -----------------------------------------------------------------------------


def _nbytes(value) -> int:
    """Bytes of the tensors and arrays in ``value`` (nested lists, tuples and dicts)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    tensor = getattr(value, 'tensor', None)  # BasePoints
    return _nbytes(tensor) if isinstance(tensor, torch.Tensor) else 0


class _TimedTransform:
    """A transform that adds its CPU time to ``total_ms``."""

    def __init__(self, transform) -> None:
        self.transform = transform
        self.name = getattr(transform, 'name', type(transform).__name__)
        self.total_ms = 0.0

    def __call__(self, results):
        t0 = time.process_time()
        try:
            return self.transform(results)
        finally:
            self.total_ms += (time.process_time() - t0) * 1e3


def _cpu_per_sample(datasets: Dict, num_samples: int, warmup: int) -> Dict[str, Dict]:
    """CPU ms per sample of each dataset in this process (turns taken per sample), its
    split by transform, and the mean bytes of its packed inputs."""
    length = len(next(iter(datasets.values())))
    for i in range(warmup):
        for dataset in datasets.values():
            dataset[i % length]
    times = {name: [] for name in datasets}
    sizes = {name: {} for name in datasets}
    originals = {name: d.pipeline.transforms for name, d in datasets.items()}
    timed = {name: [_TimedTransform(t) for t in ts] for name, ts in originals.items()}
    try:
        for name, dataset in datasets.items():
            dataset.pipeline.transforms = timed[name]
        names = list(datasets)
        for i in range(num_samples):
            # Turns in a rotating order: no pipeline always runs first, on colder caches.
            for name in names[i % len(names):] + names[:i % len(names)]:
                dataset = datasets[name]
                t0 = time.process_time()
                packed = dataset[i % length]
                times[name].append((time.process_time() - t0) * 1e3)
                for key, value in packed['inputs'].items():
                    sizes[name][key] = sizes[name].get(key, 0) + _nbytes(value)
    finally:
        for name, dataset in datasets.items():
            dataset.pipeline.transforms = originals[name]
    out = {}
    for name in datasets:
        by_key = {k: v / num_samples for k, v in sizes[name].items()}
        mean = statistics.fmean(times[name])
        stages = {}
        for t in timed[name]:
            stages[t.name] = stages.get(t.name, 0.0) + t.total_ms / num_samples
        stages['dataset (info, copy)'] = max(0.0, mean - sum(stages.values()))
        out[name] = dict(cpu=summarize_ms(times[name]), cpu_mean=mean, stages=stages,
                         bytes_by_key=by_key, bytes_to_gpu=sum(by_key.values()))
    return out


class _EndlessShuffle(torch.utils.data.Sampler):
    """Seeded permutations of the indices, one after another, forever."""

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.seed = seed

    def __iter__(self) -> Iterator[int]:
        epoch = 0
        while True:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            yield from torch.randperm(self.length, generator=gen).tolist()
            epoch += 1


def _loader_rate(dataset, num_workers: int, batch_size: int, num_batches: int,
                 seed: int) -> Dict:
    """Samples/s of a DataLoader with ``num_workers`` workers in steady state."""
    from mmengine.dataset import pseudo_collate
    kwargs = dict(persistent_workers=True, prefetch_factor=2,
                  worker_init_fn=_worker_init) if num_workers else {}
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=_EndlessShuffle(len(dataset), seed),
        num_workers=num_workers, collate_fn=pseudo_collate, **kwargs)
    warmup = 2 * max(num_workers, 1)
    window = max(num_workers, 2)
    num_batches = max(num_batches, 2 * window)
    iterator = iter(loader)
    try:
        for _ in range(warmup):
            next(iterator)
        stamps = [time.perf_counter()]
        for _ in range(num_batches):
            next(iterator)
            stamps.append(time.perf_counter())
    finally:
        shutdown = getattr(iterator, '_shutdown_workers', None)
        if shutdown is not None:
            shutdown()
        del iterator, loader
    rates = [window * batch_size / (stamps[i + window] - stamps[i])
             for i in range(len(stamps) - window)]
    total = num_batches * batch_size / (stamps[-1] - stamps[0])
    return dict(median=statistics.median(rates), whole_window=total)


def _pinned(value):
    """``value`` with every tensor in pinned host memory (what ``pin_memory=True`` does)."""
    if isinstance(value, torch.Tensor):
        return value.pin_memory()
    if isinstance(value, list):
        return [_pinned(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_pinned(v) for v in value)
    if isinstance(value, dict):
        return {k: _pinned(v) for k, v in value.items()}
    return value


def _preprocess_time(preprocessor, batch: Dict, device: str, iters: int,
                     warmup: int) -> Dict:
    """Device time (CUDA events; host wall time elsewhere) and host CPU time in ms of one
    ``preprocessor(batch, training=True)``."""
    use_cuda = device.startswith('cuda')
    preprocessor = preprocessor.to(device)
    if use_cuda:
        batch = dict(batch, inputs=_pinned(batch['inputs']))

    def call():
        return preprocessor(dict(batch, inputs=dict(batch['inputs'])), training=True)

    for _ in range(warmup):
        call()
    if use_cuda:
        torch.cuda.synchronize(device)
    device_ms, host_ms = [], []
    for _ in range(iters):
        if use_cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
        t0, c0 = time.perf_counter(), time.process_time()
        call()
        host_ms.append((time.process_time() - c0) * 1e3)
        if use_cuda:
            end.record()
            end.synchronize()
            device_ms.append(start.elapsed_time(end))
        else:
            device_ms.append((time.perf_counter() - t0) * 1e3)
    return dict(device=summarize_ms(device_ms), host=summarize_ms(host_ms),
                backend=getattr(preprocessor, 'last_decode_backend', None))


def measure_data_pipelines(data_root: Optional[str] = None,
                           setting: str = 'sparse4d',
                           num_workers_list: Sequence[int] = (0, 2, 4, 8),
                           num_samples: int = 24,
                           seed: int = 0,
                           pipelines: Optional[Sequence[str]] = None,
                           gpu_device: Optional[str] = None,
                           gpu_iters: int = 20,
                           progress: bool = False) -> List[Dict]:
    """Time the stock and turbox data pipelines of one setting per sample.

    Measurement order: CPU per sample in this process, then the DataLoader rates (workers
    are forked before any CUDA work), then the device side.

    Args:
        data_root (str, optional): A nuScenes-format data root with
            ``nuscenes_infos_train.pkl`` (maptr: with the map ground truth precomputed).
            Defaults to a synthetic one of :data:`DEFAULT_SYNTHETIC` (maptr:
            :data:`MAPTR_SYNTHETIC`) made once by :func:`synthetic_data_root`.
        setting (str): ``'sparse4d'``, ``'bevfusion'`` or ``'maptr'``. Defaults to
            'sparse4d'.
        num_workers_list (sequence[int]): DataLoader worker counts to measure samples/s at.
            Defaults to (0, 2, 4, 8).
        num_samples (int): Timed samples per CPU measurement; each rate is measured over at
            least as many samples. Defaults to 24.
        seed (int): Seed of the augmentation parameters and the sample order. Defaults to 0.
        pipelines (sequence[str], optional): A subset of the setting's pipelines
            (:func:`setting_pipelines`: :data:`PIPELINES`, maptr without
            ``turbox_gpu_decode``). Defaults to all of them.
        gpu_device (str, optional): Where to time the data preprocessors: ``'cuda'``,
            ``'cuda:N'``, or ``'cpu'`` (host wall time; for tests). Defaults to ``'cuda'``
            when available, else not measured.
        gpu_iters (int): Timed preprocessor calls (after ``gpu_iters // 4 + 2`` warm-up
            calls). Defaults to 20.
        progress (bool): Print what is being measured. Defaults to False.

    Returns:
        list[dict]: One row per pipeline with ``setting``, ``pipeline``, ``data_root``,
        ``image_hw``, ``final_dim``, ``dataset_len``, ``batch_size``, ``cpu_ms`` (median),
        ``cpu_ms_p20``, ``cpu_ms_p80``, ``cpu_ms_mean``, ``cpu_ms_by_transform`` (mean ms per
        sample of each transform, and of the dataset's own work), ``cpu_samples``, ``cpu_vs_stock``
        (stock's median over this one, None without a stock row), ``samples_per_s``
        (``{num_workers: median rate}``), ``samples_per_s_whole`` (the rate over the whole
        timed window), ``bytes_to_gpu``, ``bytes_by_key``, ``gpu_ms`` (per sample),
        ``gpu_ms_batch``, ``gpu_host_ms`` (per sample), ``gpu_device``, ``decode_backend``
        (None where not measured or not deferred) and ``blas_limited``.

    Examples:
        >>> from turbox_mm.benchmark.data import (format_data_rows, measure_data_pipelines,
        ...                                       synthetic_data_root)
        >>> root = synthetic_data_root(scenes=1, frames=3, image_size=(320, 180),
        ...                            points=2000, sweeps=3)
        >>> rows = measure_data_pipelines(root, 'sparse4d', num_workers_list=(0, ),
        ...                               num_samples=3)
        >>> [row['pipeline'] for row in rows]
        ['stock', 'turbox', 'turbox_gpu_decode']
        >>> print(format_data_rows(rows))  # doctest: +SKIP
    """
    valid = setting_pipelines(setting)
    if pipelines is None:
        pipelines = valid
    unsupported = UNSUPPORTED_PIPELINES.get(setting, {})
    for name in pipelines:
        if name in unsupported:
            raise ValueError(f'{setting} has no {name} pipeline: {unsupported[name]}')
    unknown = [p for p in pipelines if p not in valid]
    if unknown or not pipelines:
        raise ValueError(f'pipelines must be a non-empty subset of {valid}, got '
                         f'{list(pipelines)}')
    if num_samples < 1:
        raise ValueError(f'num_samples must be >= 1, got {num_samples}')
    if any(n < 0 for n in num_workers_list):
        raise ValueError(f'num_workers must be >= 0, got {list(num_workers_list)}')
    if data_root is None:
        data_root = synthetic_data_root(progress=progress, **synthetic_options(setting))
    image_hw = camera_image_hw(data_root)
    cfg = setting_values(setting, image_hw)
    batch_size = cfg['batch_size']
    if gpu_device is None and torch.cuda.is_available():
        gpu_device = 'cuda'

    def say(what):
        if progress:
            print(f'[data {setting}] {what}', flush=True)

    datasets = {name: build_dataset(data_root, setting, name, seed) for name in pipelines}
    lengths = {name: len(d) for name, d in datasets.items()}
    if len(set(lengths.values())) != 1:
        raise RuntimeError(f'the pipelines see different sample counts: {lengths}')
    say(f'CPU per sample ({num_samples} samples per pipeline)')
    with loader_threads() as blas_limited:
        cpu = _cpu_per_sample(datasets, num_samples, warmup=min(2, num_samples))
    rates = {name: {} for name in pipelines}
    for workers in num_workers_list:
        for name in pipelines:
            say(f'{name}: samples/s with {workers} workers')
            num_batches = -(-num_samples // batch_size)
            if workers == 0:
                with loader_threads():
                    rates[name][workers] = _loader_rate(datasets[name], 0, batch_size,
                                                        num_batches, seed)
            else:
                rates[name][workers] = _loader_rate(datasets[name], workers, batch_size,
                                                    max(num_batches, 4 * workers), seed)
    gpu = {}
    if gpu_device is not None:
        from mmengine.dataset import pseudo_collate
        preprocessors = build_preprocessors(setting, seed)
        if str(gpu_device).startswith('cuda'):
            warm_up_gpu(1.0)
        for name in pipelines:
            say(f'{name}: data preprocessor on {gpu_device}')
            length = lengths[name]
            batch = pseudo_collate([datasets[name][i % length] for i in range(batch_size)])
            gpu[name] = _preprocess_time(preprocessors[name], batch, str(gpu_device),
                                         gpu_iters, gpu_iters // 4 + 2)
        if str(gpu_device).startswith('cuda'):
            torch.cuda.empty_cache()

    stock_ms = cpu['stock']['cpu']['median_ms'] if 'stock' in cpu else None
    rows = []
    for name in pipelines:
        c, g = cpu[name], gpu.get(name)
        rows.append(dict(
            setting=setting, pipeline=name, data_root=data_root, image_hw=image_hw,
            final_dim=cfg['aug_conf']['final_dim'], dataset_len=lengths[name],
            batch_size=batch_size, cpu_ms=c['cpu']['median_ms'], cpu_ms_p20=c['cpu']['p20_ms'],
            cpu_ms_p80=c['cpu']['p80_ms'], cpu_ms_mean=c['cpu_mean'],
            cpu_ms_by_transform=c['stages'], cpu_samples=num_samples,
            cpu_vs_stock=(stock_ms / c['cpu']['median_ms']
                          if stock_ms is not None and c['cpu']['median_ms'] > 0 else None),
            samples_per_s={n: r['median'] for n, r in rates[name].items()},
            samples_per_s_whole={n: r['whole_window'] for n, r in rates[name].items()},
            bytes_to_gpu=c['bytes_to_gpu'], bytes_by_key=c['bytes_by_key'],
            gpu_ms=g['device']['median_ms'] / batch_size if g else None,
            gpu_ms_batch=g['device']['median_ms'] if g else None,
            gpu_host_ms=g['host']['median_ms'] / batch_size if g else None,
            gpu_device=str(gpu_device) if g else None,
            decode_backend=g['backend'] if g else None, blas_limited=blas_limited))
    return rows


# -- report -----------------------------------------------------------------------------------

_PIPELINE_NOTES = {
    'stock': 'upstream loader + PIL aug, float32 to the GPU',
    'turbox': 'libjpeg-turbo scaled decode + one warp, uint8 to the GPU',
    'turbox_gpu_decode': 'JPEG bytes + warps to the GPU, nvJPEG decode there',
}
# Where a setting's pipelines do other work than the notes above say.
_SETTING_NOTES = {
    'maptr': {
        'stock': 'upstream loader + cv2 0.5 rescale, photometric, normalise; float32 to the GPU',
        'turbox': 'libjpeg-turbo 1/2 DCT decode, uint8 to the GPU; photometric + normalise there',
    },
}


def format_data_rows(rows: List[Dict], title: str = '') -> str:
    """One plain-text table of :func:`measure_data_pipelines` rows, a block per setting.

    Args:
        rows (list[dict]): Rows of one or more settings.
        title (str): A first line. Defaults to ''.

    Returns:
        str: Per setting, a heading (cameras, sizes, batch, data root) and one line per
        pipeline: CPU ms/sample (p20-p80) and the ratio to stock, samples/s at each worker
        count, MB/sample to the GPU, GPU ms/sample and the host ms of that GPU work; then
        each pipeline's CPU time split by transform.
    """
    lines = [title] if title else []
    settings = list(dict.fromkeys(r['setting'] for r in rows))
    for setting in settings:
        block = [r for r in rows if r['setting'] == setting]
        first = block[0]
        workers = sorted({n for r in block for n in r['samples_per_s']})
        (h, w), (fh, fw) = first['image_hw'], first['final_dim']
        device = next((r['gpu_device'] for r in block if r['gpu_device']), None)
        lines.append(f'{setting}: {len(CAMERAS)} cameras {w}x{h} -> {fh}x{fw}, batch '
                     f'{first["batch_size"]}, {first["dataset_len"]} samples in '
                     f'{first["data_root"]}; CPU over {first["cpu_samples"]} samples, '
                     f'GPU on {device or "n/a (no CUDA)"}')
        header = (['pipeline', 'CPU ms/sample (p20-p80)',
                   'stock CPU ms / this (GPU work not counted)']
                  + [f'samples/s N={n}' for n in workers]
                  + ['MB/sample to GPU', 'GPU ms/sample', 'GPU host ms', 'note'])
        table = [header]
        for r in block:
            ratio = f'{r["cpu_vs_stock"]:.2f}x' if r['cpu_vs_stock'] else 'n/a'
            notes = _SETTING_NOTES.get(setting, {})
            note = notes.get(r['pipeline'], _PIPELINE_NOTES[r['pipeline']])
            if r['decode_backend']:
                note += f' ({r["decode_backend"]})'
            table.append(
                [r['pipeline'],
                 f'{r["cpu_ms"]:.1f} ({r["cpu_ms_p20"]:.1f}-{r["cpu_ms_p80"]:.1f})', ratio]
                + [_fmt(r['samples_per_s'].get(n), '.1f') for n in workers]
                + [f'{r["bytes_to_gpu"] / 1e6:.2f}', _fmt(r['gpu_ms'], '.3f'),
                   _fmt(r['gpu_host_ms'], '.3f'), note])
        unsupported = UNSUPPORTED_PIPELINES.get(setting, {})
        for name in unsupported:
            table.append([name, 'n/a', 'n/a'] + ['n/a'] * len(workers)
                         + ['n/a', 'n/a', 'n/a', f'not run: no {name} for {setting}'])
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for i, row in enumerate(table):
            lines.append('  '.join(c.ljust(wd) for c, wd in zip(row, widths)).rstrip())
            if i == 0:
                lines.append('  '.join('-' * wd for wd in widths))
        for name, why in unsupported.items():
            lines.append(f'({name} not run: {why})')
        lines.append('CPU ms/sample by transform (mean):')
        for r in block:
            stages = ', '.join(f'{k} {v:.1f}' for k, v in r['cpu_ms_by_transform'].items())
            lines.append(f'  {r["pipeline"]}: {stages}')
        if not all(r['blas_limited'] for r in block):
            lines.append('(BLAS threads not limited: install threadpoolctl)')
        lines.append('')
    return '\n'.join(lines).rstrip('\n')


def _fmt(value: Optional[float], spec: str) -> str:
    return 'n/a' if value is None else format(value, spec)
