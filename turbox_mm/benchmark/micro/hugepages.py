"""Transparent huge pages for torch's CPU buffers: ``system.huge_pages`` on and off.

``THP_MEM_ALLOC_ENABLE`` is read once by torch's CPU allocator, so each side runs in its own
fresh Python process (the variable ``0`` for stock, ``1`` for turbox, set before torch
allocates). Each process repeats what the main process and the loader workers do with large
CPU tensors in a camera pipeline: a batch of uint8 images is collated into one new tensor
(``torch.stack``, a fresh large allocation each time, since torch returns buffers of that size
to the kernel when they are freed) and read once. The rows time one such collate; the note
gives the ``AnonHugePages`` growth of the process measured around one live batch (2 MiB pages
backing torch's buffer, or none) and the kernel's THP modes. Under THP ``never`` (or without
THP) both sides are the same and the note says so.
"""
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

from turbox_mm.benchmark.timing import summarize_ms
from turbox_mm.utils.hugepages import ENV, anon_huge_kb, thp_defrag, thp_mode


def _child(views: int, height: int, width: int, iters: int, warmup: int) -> None:
    """Run in a fresh process: time ``iters`` collates, print one JSON line."""
    import torch
    torch.set_num_threads(1)
    parts = [torch.randint(0, 256, (views, 3, height, width), dtype=torch.uint8)
             for _ in range(6)]
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        batch = torch.stack(parts)
        batch.sum(dtype=torch.int64)  # read it once, as the copy to the device does
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
        del batch
    before = anon_huge_kb()
    live = torch.stack(parts)
    after = anon_huge_kb()
    print(json.dumps(dict(times=times, huge_kb=None if before is None else after - before,
                          batch_mb=live.numel() / 2**20)))


def _run_side(enable: bool, size: Dict) -> Dict:
    env = dict(os.environ, **{ENV: '1' if enable else '0'}, OMP_NUM_THREADS='1')
    code = ('from turbox_mm.benchmark.micro.hugepages import _child; '
            f"_child({size['views']}, {size['height']}, {size['width']}, {size['iters']}, "
            f"{size['warmup']})")
    proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f'hugepages benchmark child ({ENV}={int(enable)}) failed:\n'
                           f'{proc.stderr[-2000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def benchmark(device: str, quick: bool = False) -> List[Dict]:
    """Time a 6-sample collate of uint8 camera images with and without huge pages.

    Args:
        device (str): Unused (host memory only); kept for the common signature.
        quick (bool): A 4.9 MB batch (torch advises huge pages from 2 MiB on) and few
            iterations, for tests. Defaults to False.

    Returns:
        list[dict]: One row, ``collate``.
    """
    size = (dict(views=6, height=128, width=352, iters=5, warmup=1) if quick else
            dict(views=6, height=256, width=704, iters=200, warmup=20))
    stock, turbox = _run_side(False, size), _run_side(True, size)
    mode, defrag = thp_mode(), thp_defrag()
    if mode is None:
        where = 'THP not offered by this kernel: both sides equal'
    else:
        where = f'THP mode {mode}, defrag {defrag}' + (': both sides equal'
                                                       if mode == 'never' else '')
    return [dict(component='hugepages',
                 case=f"collate 6x[{size['views']},3,{size['height']},{size['width']}] uint8 "
                 f"({turbox['batch_mb']:.1f} MB)",
                 stock=summarize_ms(stock['times']), turbox=summarize_ms(turbox['times']),
                 note=f'{where}; AnonHugePages growth per live batch: stock {stock["huge_kb"]} '
                 f'kB, turbox {turbox["huge_kb"]} kB; one thread, fresh process per side')]
