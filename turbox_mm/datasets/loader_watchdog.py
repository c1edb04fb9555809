"""A loader watchdog: a stuck or dead worker becomes an error that names its sample.

torch's ``DataLoader`` waits for a batch forever by default, and when a worker dies it says
which process died, not what it was loading. :func:`watch_dataloader` gives a loader with
workers:

- a ``timeout`` (seconds the main process waits for one batch; torch's own option, left as
  the config sets it when the config sets one);
- a record, in shared memory, of the sample each of its workers is loading and since when:
  the loader's ``worker_init_fn`` gives each worker process the loader's record, and the
  dataset's ``__getitems__`` (which torch's fetcher calls with a batch's indices) writes each
  index there before it loads it (two shared-memory writes a sample; several loaders over
  one dataset each keep their own record);
- on torch's "timed out", "exited unexpectedly" or "killed by signal" error, a
  ``RuntimeError`` that adds, for each busy worker, the sample index, what the dataset's
  ``get_data_info`` says of it (``sample_idx``, ``token``, the lidar file) and how long the
  worker has been on it. A worker killed while the main process is busy elsewhere raises from
  wherever the main process is: :func:`name_stuck_samples` adds the same lines there
  (``TurboxRunner`` calls it on every error of a run).

:class:`TurboxRunner <turbox_mm.engine.runner.TurboxRunner>` applies it to every loader it
builds (``turbox.dataloader.timeout``).
"""
import functools
import multiprocessing
import time
import weakref
from typing import List, Optional

from torch.utils.data import DataLoader, get_worker_info

__all__ = ['watch_dataloader', 'WatchedDataLoader', 'busy_workers', 'name_stuck_samples']

_TORCH_LOADER_FAILURES = ('timed out', 'exited unexpectedly', 'killed by signal')
#: In a worker process: its loader's record (set by :class:`_RecordingWorkerInit`).
_worker_slots = None
#: In the main process: the watched loaders, for :func:`name_stuck_samples`.
_watched: 'weakref.WeakSet[DataLoader]' = weakref.WeakSet()


class _RecordingWorkerInit:
    """The loader's ``worker_init_fn``: hand the worker its loader's record, then run the
    loader's own function. Picklable for spawned workers (the record is shared memory passed
    at process start)."""

    def __init__(self, slots, original) -> None:
        self.slots = slots
        self.original = original

    def __call__(self, worker_id: int) -> None:
        global _worker_slots
        _worker_slots = self.slots
        if self.original is not None:
            self.original(worker_id)


class _RecordingGetItems:
    """Set as a dataset's ``__getitems__``: record each index in the worker's record (when it
    has one) before loading it. Holds no shared memory: the dataset stays picklable."""

    def __init__(self, dataset, original=None) -> None:
        self.dataset = dataset
        self.original = original

    def __call__(self, indices: List[int]) -> list:
        slots = _worker_slots
        info = get_worker_info()
        slot = 2 * info.id if info is not None else -1
        if slots is None or not 0 <= slot < len(slots) - 1:
            return self._load(indices, None, 0)
        try:
            return self._load(indices, slots, slot)
        finally:
            slots[slot] = -1

    def _load(self, indices: List, slots, slot: int) -> list:
        if self.original is not None:  # the dataset's own batched fetch: record its first index
            if slots is not None:
                slots[slot], slots[slot + 1] = _index_of(indices[0]), time.time()
            return self.original(indices)
        out = []
        for index in indices:
            if slots is not None:
                slots[slot], slots[slot + 1] = _index_of(index), time.time()
            out.append(self.dataset[index])
        return out


#: Recorded for a sampler item the record cannot hold (neither an index nor a dict with one).
UNKNOWN = -2


def _index_of(item) -> int:
    """The sample index of a sampler item: the item itself, or its ``'idx'`` (samplers that
    pass augmentation seeds along, such as ``GroupInBatchSampler``); :data:`UNKNOWN` else."""
    if isinstance(item, dict):
        item = item.get('idx', UNKNOWN)
    try:
        return int(item)
    except (TypeError, ValueError):
        return UNKNOWN


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
        if index == UNKNOWN:
            what = 'a sample the sampler gave no index for'
        elif index >= 0:
            what = _describe(loader.dataset, index)
        else:
            continue
        lines.append(f'worker {worker}: {what}, for {now - slots[2 * worker + 1]:.0f} s')
    return lines


def _with_busy_workers(error: RuntimeError, loaders) -> Optional[RuntimeError]:
    """A ``RuntimeError`` that adds the busy workers of ``loaders`` to a loader failure's
    message; None when ``error`` is not one."""
    if not any(text in str(error) for text in _TORCH_LOADER_FAILURES) or \
            'Loader workers at the time' in str(error):
        return None
    busy = [line for loader in loaders for line in busy_workers(loader)]
    where = '; '.join(busy) if busy else 'no worker was inside a sample'
    return RuntimeError(f'{error}. Loader workers at the time: {where}.')


def name_stuck_samples(error: BaseException) -> Optional[RuntimeError]:
    """For a loader failure raised anywhere in the main process (a worker killed while the
    step ran): the error with the busy workers of every watched loader; None otherwise."""
    if not isinstance(error, RuntimeError):
        return None
    return _with_busy_workers(error, list(_watched))


def _next_or_name_stuck(next_data, loader: DataLoader):
    try:
        return next_data()
    except RuntimeError as error:
        named = _with_busy_workers(error, [loader])
        if named is None:
            raise
        raise named from error


def _iterator_hook(base: type):
    """A ``_get_iterator`` for a subclass of ``base`` that wraps the iterator's ``_next_data``
    (a loader failure names the busy workers' samples)."""

    def _get_iterator(self):
        iterator = base._get_iterator(self)
        if self.num_workers > 0:
            iterator._next_data = functools.partial(_next_or_name_stuck, iterator._next_data,
                                                    self)
        return iterator

    return _get_iterator


class WatchedDataLoader(DataLoader):
    """A ``DataLoader`` whose iterators name the stuck or lost sample (see the module)."""

    _get_iterator = _iterator_hook(DataLoader)


@functools.lru_cache(maxsize=None)
def _watched_class(cls: type) -> type:
    """``WatchedDataLoader`` for ``DataLoader`` itself; a subclass of ``cls`` with the same
    iterator hook for a ``DataLoader`` subclass (its own overrides kept)."""
    if cls is DataLoader:
        return WatchedDataLoader
    return type(f'Watched{cls.__name__}', (cls, ), {'_get_iterator': _iterator_hook(cls)})


def watch_dataloader(loader: DataLoader, timeout: Optional[float]) -> DataLoader:
    """Watch ``loader`` (in place) where it has workers.

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
    if loader.num_workers == 0 or getattr(loader, '_turbox_slots', None) is not None:
        return loader
    if timeout is not None and not loader.timeout:
        loader.timeout = float(timeout)
    context = loader.multiprocessing_context or multiprocessing.get_context()
    slots = context.RawArray('d', [-1.0, 0.0] * loader.num_workers)
    dataset = loader.dataset
    if not isinstance(vars(dataset).get('__getitems__'), _RecordingGetItems):
        dataset.__getitems__ = _RecordingGetItems(dataset,
                                                  getattr(dataset, '__getitems__', None))
    loader.worker_init_fn = _RecordingWorkerInit(slots, loader.worker_init_fn)
    loader._turbox_slots = slots
    loader.__class__ = _watched_class(type(loader))
    _watched.add(loader)
    return loader
