"""A loader watchdog: a stuck or dead worker becomes an error that names its sample.

torch's ``DataLoader`` waits for a batch forever by default, and when a worker dies it says
which process died, not what it was loading. :func:`watch_dataloader` gives a loader with
workers:

- a ``timeout`` (seconds the main process waits for one batch; torch's own option, left as
  the config sets it when the config sets one);
- a record, in shared memory, of the sample each worker is loading and since when (the
  dataset's ``__getitems__``, which torch's fetcher calls with the indices of a batch, records
  each index before it loads it);
- on torch's "timed out" or "exited unexpectedly" error, a ``RuntimeError`` that adds, for
  each busy worker, the sample index, what the dataset's ``get_data_info`` says of it
  (``sample_idx``, ``token``, the lidar file) and how long the worker has been on it.

The record costs two shared-memory writes per sample. :class:`TurboxRunner
<turbox_mm.engine.runner.TurboxRunner>` applies it to every loader it builds
(``turbox.dataloader.timeout``).
"""
import functools
import multiprocessing
import time
from typing import List, Optional

from torch.utils.data import DataLoader, get_worker_info

__all__ = ['watch_dataloader', 'WatchedDataLoader', 'busy_workers']

_TORCH_LOADER_FAILURES = ('timed out', 'exited unexpectedly')


class _RecordingGetItems:
    """Set as a dataset's ``__getitems__``: load each index after recording it in ``slots``
    (``[index, start time]`` per worker; index -1 when idle). Picklable for spawned workers."""

    def __init__(self, dataset, slots, original=None) -> None:
        self.dataset = dataset
        self.slots = slots
        self.original = original

    def __call__(self, indices: List[int]) -> list:
        info = get_worker_info()
        slot = 2 * (info.id if info is not None else 0)
        slots = self.slots
        try:
            if self.original is not None:  # the dataset's own batched fetch: its first index
                slots[slot], slots[slot + 1] = indices[0], time.time()
                return self.original(indices)
            out = []
            for index in indices:
                slots[slot], slots[slot + 1] = index, time.time()
                out.append(self.dataset[index])
            return out
        finally:
            slots[slot] = -1


def _describe(dataset, index: int) -> str:
    """``index`` and what ``dataset.get_data_info`` says of it (best effort, for a message)."""
    try:
        info = dataset.get_data_info(index)
    except Exception:  # noqa: BLE001  (naming only: the loader's own error is raised anyway)
        return f'sample index {index}'
    if not isinstance(info, dict):
        return f'sample index {index}'
    parts = [f'{key} {info[key]}' for key in ('sample_idx', 'token') if key in info]
    lidar = info.get('lidar_points')
    if isinstance(lidar, dict) and lidar.get('lidar_path'):
        parts.append(str(lidar['lidar_path']))
    return f"sample index {index}" + (f" ({', '.join(parts)})" if parts else '')


def busy_workers(loader: DataLoader) -> List[str]:
    """One line per worker of a watched ``loader`` that is loading a sample: which, how long."""
    slots = getattr(loader, '_turbox_slots', None)
    if slots is None:
        return []
    now, lines = time.time(), []
    for worker in range(len(slots) // 2):
        index = int(slots[2 * worker])
        if index >= 0:
            lines.append(f'worker {worker}: {_describe(loader.dataset, index)}, for '
                         f'{now - slots[2 * worker + 1]:.0f} s')
    return lines


def _next_or_name_stuck(next_data, loader: DataLoader):
    try:
        return next_data()
    except RuntimeError as error:
        if not any(text in str(error) for text in _TORCH_LOADER_FAILURES):
            raise
        busy = busy_workers(loader)
        where = '; '.join(busy) if busy else 'no worker was inside a sample'
        raise RuntimeError(f'{error}. Loader workers at the time: {where}.') from error


class WatchedDataLoader(DataLoader):
    """A ``DataLoader`` whose iterators name the stuck or lost sample (see the module)."""

    def _get_iterator(self):
        iterator = super()._get_iterator()
        if self.num_workers > 0:
            iterator._next_data = functools.partial(_next_or_name_stuck, iterator._next_data,
                                                    self)
        return iterator


def watch_dataloader(loader: DataLoader, timeout: Optional[float]) -> DataLoader:
    """Make ``loader`` a :class:`WatchedDataLoader` (in place) where it has workers.

    Args:
        loader (DataLoader): A loader not iterated yet.
        timeout (float, optional): Seconds to wait for a batch, set where the loader has
            none (0); None leaves the loader's.

    Returns:
        DataLoader: ``loader``.

    Raises:
        ValueError: ``timeout`` is not positive.
    """
    if timeout is not None and timeout <= 0:
        raise ValueError(f'watch_dataloader: timeout must be > 0 seconds or None, got {timeout}')
    if loader.num_workers == 0 or isinstance(loader, WatchedDataLoader):
        return loader
    if timeout is not None and not loader.timeout:
        loader.timeout = float(timeout)
    context = loader.multiprocessing_context or multiprocessing.get_context()
    slots = context.RawArray('d', [-1.0, 0.0] * loader.num_workers)
    dataset = loader.dataset
    if '__getitems__' not in vars(dataset):
        dataset.__getitems__ = _RecordingGetItems(dataset, slots,
                                                  getattr(dataset, '__getitems__', None))
    loader._turbox_slots = slots
    loader.__class__ = WatchedDataLoader
    return loader
