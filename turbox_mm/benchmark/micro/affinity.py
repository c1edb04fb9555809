"""Micro benchmark: a CPU-heavy loader next to a busy main process, with and without pinning.

The situation ``turbox.system.cpu_affinity`` addresses: loader workers decode and resize
images while the main process runs its own CPU work (the Python side of the step, host-side
ops, the pin-memory thread) with torch's intra-op thread pool sized to every core, so
processes and threads oversubscribe the cores and migrate between them.

Each call fetches ``batches`` batches from a loader whose workers decode a 1600x900 JPEG and
resize it to 704x396 per sample, while the main process runs a CPU matmul between fetches.
Stock: no pinning, torch's default thread count. Turbox: the layout of
:class:`~turbox_mm.engine.hooks.CPUAffinityHook` (:func:`~turbox_mm.utils.affinity.current_plan`):
the main process pinned to its cores with as many intra-op threads, each worker pinned to
its own cores with one thread. Where pinning is refused the turbox row says so and equals the
stock one.
"""
import os
from typing import Dict, List

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from turbox_mm.benchmark.timing import time_fn
from turbox_mm.utils.affinity import AffinityWorkerInit, current_plan, pin_process


class _JpegDataset(Dataset):
    """Decode and resize one JPEG per sample (what a camera loader does)."""

    def __init__(self, size, out_size, length=10**6):
        import cv2
        rng = np.random.default_rng(0)
        img = cv2.GaussianBlur((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8),
                               (5, 5), 1.5)
        self.jpeg = cv2.imencode('.jpg', img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
        self.out_size = out_size
        self.length = length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        import cv2
        img = cv2.imdecode(self.jpeg, cv2.IMREAD_COLOR)
        return torch.from_numpy(cv2.resize(img, self.out_size, interpolation=cv2.INTER_AREA))


def _fetch(loader_iter, batches: int, work: torch.Tensor):

    def run():
        for _ in range(batches):
            next(loader_iter)
            work @ work  # the main process's own CPU work between batches

    return run


def benchmark(device: str, quick: bool = False) -> List[Dict]:
    """Time fetching batches from a CPU-heavy loader next to a busy main process.

    Args:
        device (str): Unused (the loader and the main-process work run on the CPU).
        quick (bool): Small images and few batches. Defaults to False.

    Returns:
        list[dict]: One row, stock (unpinned) vs turbox (pinned).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    workers = max(1, min(8, cores - 2))
    size, out, batches, iters = (((320, 180), (160, 90), 4, 3) if quick else
                                 ((1600, 900), (704, 396), 24, 10))
    work = torch.randn(256 if quick else 1024, 256 if quick else 1024)
    original = os.sched_getaffinity(0) if hasattr(os, 'sched_getaffinity') else None
    threads = torch.get_num_threads()
    layouts, inputs = current_plan(workers)
    layout = layouts[inputs['local_rank'] % len(layouts)]
    results = {}
    pinned = False
    import cv2
    cv2_threads = cv2.getNumThreads()
    # As mmengine's env_cfg.mp_cfg.opencv_num_threads=0 does in both stock and turbox configs.
    cv2.setNumThreads(0)
    try:
        for mode in ('stock', 'turbox'):
            init = None
            if mode == 'turbox':
                pinned = pin_process(layout.main)
                if pinned:
                    torch.set_num_threads(max(1, len(layout.main)))
                    init = AffinityWorkerInit(None, layout.workers or [layout.main])
            loader = DataLoader(_JpegDataset(size, out), batch_size=6, num_workers=workers,
                                persistent_workers=True, worker_init_fn=init)
            it = iter(loader)
            results[mode] = time_fn(_fetch(it, batches, work), iters=iters, warmup=2,
                                    device='cpu')
            del it, loader
    finally:
        if original is not None:
            pin_process(sorted(original))
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv2_threads)
    note = (f'{workers} workers decoding {size[0]}x{size[1]} JPEGs, batch 6, {batches} batches '
            f'a call; main: {len(layout.main)} pinned cores, workers: '
            f'{", ".join(map(str, map(len, layout.workers)))} cores each')
    if not pinned:
        note += '; pinning refused here, turbox ran unpinned'
    return [dict(component='cpu affinity', case=f'loader + busy main process, {cores} cores',
                 stock=results['stock'], turbox=results['turbox'], note=note)]
