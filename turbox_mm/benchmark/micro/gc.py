"""GC pauses: Python's automatic collector against GCHook's frozen heap and scheduled collections.

A training process holds a large, long-lived heap (here a dataset of ``infos`` dicts shaped
like mmdet3d's, as an unserialised dataset keeps them) and every step allocates short-lived
containers, some in reference cycles, a few kept for several steps (like logged outputs or a
prefetch queue) so that they age into the oldest generation. With automatic GC those survivors
eventually trigger full collections that walk the whole heap, at steps nobody chose. The turbox
side does what :class:`~turbox_mm.engine.hooks.gc_hook.GCHook` does: ``gc.freeze()`` after the
heap is built, automatic GC off, ``gc.collect()`` every ``interval`` steps.

Rows: the time of one step (pauses included) and the length of each GC pause, measured with
``gc.callbacks`` for both sides. The notes give counts, totals and the worst step.
"""
import gc
import time
from typing import Dict, List, Tuple

from turbox_mm.benchmark.timing import summarize_ms

CAMS = ('CAM_FRONT', 'CAM_FRONT_RIGHT', 'CAM_FRONT_LEFT', 'CAM_BACK', 'CAM_BACK_LEFT',
        'CAM_BACK_RIGHT')


def build_infos(n: int) -> List[dict]:
    """``n`` info dicts of about 15 tracked containers each (paths, matrices, boxes)."""
    infos = []
    for i in range(n):
        infos.append(dict(
            token=f'{i:032x}', timestamp=1.5e9 + i, lidar_path=f'samples/LIDAR_TOP/{i:08d}.bin',
            cams={c: dict(data_path=f'samples/{c}/{i:08d}.jpg', cam2img=[1266.4, 816.3, 491.5])
                  for c in CAMS},
            gt_names=['car', 'pedestrian'], gt_boxes=[[0.5 * i, 1.0, 2.0, 4.0, 1.8, 1.5, 0.1]]))
    return infos


class _Sample:
    """A data sample that points back at its batch: a reference cycle, like mmengine's
    data elements with their meta information often are."""

    def __init__(self, batch, index: int, size: int):
        self.batch = batch
        self.meta = dict(index=index, img_shape=(900, 1600), flip=False)
        self.boxes = [[float(j), 1.0, 2.0] for j in range(size)]


def _step(history: list, samples: int, size: int, keep: int) -> None:
    batch: list = []
    batch.extend(_Sample(batch, i, size) for i in range(samples))
    losses = {f'loss_{k}': [float(k)] * 4 for k in range(8)}
    history.append((batch, losses))
    if len(history) > keep:
        history.pop(0)


def _run(steps: int, interval: int, scheduled: bool, samples: int, size: int,
         keep: int) -> Tuple[List[float], List[float]]:
    pauses: List[float] = []
    started = []

    def on_gc(phase, info):
        if phase == 'start':
            started.append(time.perf_counter())
        elif started:
            pauses.append((time.perf_counter() - started.pop()) * 1e3)

    history: list = []
    steps_ms = []
    gc.collect()
    if scheduled:
        gc.freeze()
        gc.disable()
    gc.callbacks.append(on_gc)
    try:
        for i in range(steps):
            t0 = time.perf_counter()
            _step(history, samples, size, keep)
            if scheduled and (i + 1) % interval == 0:
                gc.collect()
            steps_ms.append((time.perf_counter() - t0) * 1e3)
    finally:
        gc.callbacks.remove(on_gc)
        if scheduled:
            gc.unfreeze()
        gc.enable()
        del history
        gc.collect()
    return steps_ms, pauses


def _note(steps_ms: List[float], pauses: List[float]) -> str:
    ordered = sorted(steps_ms)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return (f'{len(pauses)} pauses, {sum(pauses):.0f} ms total, max pause '
            f'{max(pauses, default=0):.1f} ms; step p99 {p99:.2f} ms, max {ordered[-1]:.1f} ms')


def benchmark(device: str, quick: bool = False) -> List[Dict]:
    """Automatic GC vs frozen heap + scheduled collections, on the host.

    Args:
        device (str): Ignored: garbage collection happens on the host.
        quick (bool): 20k infos and 60 steps instead of 1M infos and 3000 steps.
            Defaults to False.

    Returns:
        list[dict]: Rows ``step`` and ``gc pause`` (see the module docstring).
    """
    n_infos, steps, interval = (20_000, 60, 20) if quick else (1_000_000, 3000, 100)
    samples, size, keep = (8, 50, 8) if quick else (16, 400, 16)
    infos = build_infos(n_infos)
    try:
        stock = _run(steps, interval, False, samples, size, keep)
        turbox = _run(steps, interval, True, samples, size, keep)
    finally:
        del infos
        gc.collect()
    case = f'{n_infos} infos heap, {steps} steps'
    return [
        dict(component='GCHook', case=f'step ({case})', stock=summarize_ms(stock[0]),
             turbox=summarize_ms(turbox[0]),
             note=f'stock: {_note(*stock)} | turbox (collect every {interval}): '
             f'{_note(*turbox)}'),
        dict(component='GCHook', case='gc pause (each)',
             stock=summarize_ms(stock[1]) if stock[1] else None,
             turbox=summarize_ms(turbox[1]) if turbox[1] else None,
             note=f'stock {sum(stock[1]):.0f} ms in {len(stock[1])} pauses, turbox '
             f'{sum(turbox[1]):.0f} ms in {len(turbox[1])}'),
    ]
