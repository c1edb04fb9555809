"""A batch sampler that can run through many epochs in one iterator."""
from typing import Dict, Iterator, List, Optional, Union

from torch.utils.data import BatchSampler, Sampler

from turbox_mm.registry import DATA_SAMPLERS


@DATA_SAMPLERS.register_module()
class CyclicBatchSampler(Sampler):
    """Batches of a sampler, epoch after epoch, from one iterator when asked to.

    A DataLoader restarts its pipeline at each epoch: the last batches of an epoch drain the
    workers' queues and the first batch of the next one waits for a worker to load it from
    scratch (mmengine's iteration-based loop even sleeps 2 s there). Run in *cyclic* mode, this
    batch sampler yields epoch ``e`` (``sampler.set_epoch(e)``, then exactly the batches that a
    ``BatchSampler`` over that epoch gives), then epoch ``e + 1`` and so on, so one DataLoader
    iterator serves the whole training run and its workers never stop. The batches, their
    order and their per-epoch shuffling are identical to the stock loader's.

    Outside cyclic mode (the default) it is transparent: each ``iter()`` yields one epoch of the
    wrapped batch sampler, so mmengine's stock loops work unchanged with it.
    :class:`~turbox_mm.engine.loops.PipelinedEpochBasedTrainLoop` and
    :class:`~turbox_mm.engine.loops.PipelinedIterBasedTrainLoop` switch cyclic mode on with
    :meth:`start_cycle`.

    Args:
        sampler (Sampler): The per-sample sampler (mmengine's ``DefaultSampler`` or any sampler
            with ``set_epoch``). mmengine passes it.
        batch_size (int): Samples per batch. mmengine passes it.
        drop_last (bool): Drop each epoch's last incomplete batch, as ``BatchSampler`` does.
            Defaults to False.
        batch_sampler (dict, optional): A batch sampler config to wrap instead of a plain
            ``BatchSampler`` (e.g. mmdet's ``AspectRatioBatchSampler``); it is built with the
            same ``sampler`` and ``batch_size``. It must be finite (one epoch per iterator).
            Defaults to None.

    Examples:
        >>> from mmengine.dataset import DefaultSampler
        >>> sampler = CyclicBatchSampler(DefaultSampler(list(range(5)), seed=0), batch_size=2)
        >>> len(sampler)
        3
        >>> sampler.start_cycle(epoch=0)
        >>> it = iter(sampler)
        >>> [len(next(it)) for _ in range(4)]  # epoch 0's three batches, then epoch 1's first
        [2, 2, 1, 2]
    """

    def __init__(self,
                 sampler: Sampler,
                 batch_size: int,
                 drop_last: bool = False,
                 batch_sampler: Optional[Union[Dict, Sampler]] = None) -> None:
        if batch_sampler is None:
            self.batch_sampler = BatchSampler(sampler, batch_size, drop_last)
        elif isinstance(batch_sampler, dict):
            self.batch_sampler = DATA_SAMPLERS.build(
                batch_sampler, default_args=dict(sampler=sampler, batch_size=batch_size))
        else:
            self.batch_sampler = batch_sampler
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.cyclic = False
        self._epoch = 0
        self._skip = 0

    def __len__(self) -> int:
        """Batches in one epoch."""
        return len(self.batch_sampler)

    def start_cycle(self, epoch: int = 0, skip_batches: int = 0) -> None:
        """Switch to cyclic mode; the next iterator starts at ``epoch``.

        Args:
            epoch (int): The epoch the next iterator starts with. Defaults to 0.
            skip_batches (int): Batches of the run to skip first, counted from the start of
                ``epoch``; they may span several epochs. Only indices are drawn for them, no
                data is loaded, so resuming at iteration ``k`` costs nothing.
                Defaults to 0.
        """
        if epoch < 0 or skip_batches < 0:
            raise ValueError(f'start_cycle: epoch ({epoch}) and skip_batches ({skip_batches}) '
                             'must be >= 0')
        per_epoch = len(self)
        if per_epoch == 0:
            raise ValueError('CyclicBatchSampler: the sampler yields no batch per epoch '
                             '(empty dataset, or fewer samples than batch_size with '
                             'drop_last=True)')
        self.cyclic = True
        self._epoch = epoch + skip_batches // per_epoch
        self._skip = skip_batches % per_epoch

    def _set_epoch(self, epoch: int) -> None:
        for obj in (self.sampler, self.batch_sampler):
            if hasattr(obj, 'set_epoch'):
                obj.set_epoch(epoch)

    def __iter__(self) -> Iterator[List[int]]:
        if not self.cyclic:
            yield from self.batch_sampler
            return
        epoch, skip = self._epoch, self._skip
        while True:
            self._set_epoch(epoch)
            batches = iter(self.batch_sampler)
            for _ in range(skip):
                next(batches)
            skip = 0
            yield from batches
            epoch += 1
