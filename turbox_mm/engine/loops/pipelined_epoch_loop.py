"""Epoch-based training with the next batch staged on the GPU during the current step."""
from typing import Dict, List, Optional, Tuple, Union

from mmengine.runner import EpochBasedTrainLoop
from torch.utils.data import DataLoader

from turbox_mm.datasets.samplers.cyclic_batch_sampler import CyclicBatchSampler
from turbox_mm.registry import LOOPS
from .batch_prefetcher import BatchPrefetcher, ahead_context, flush_grad_norm
from .loader_shutdown import shutdown_loader_workers


@LOOPS.register_module()
class PipelinedEpochBasedTrainLoop(EpochBasedTrainLoop):
    """mmengine's ``EpochBasedTrainLoop`` with a pipelined input path.

    - The next batch is taken from the loader, copied to the GPU on a side stream and run
      through the data preprocessor right after the current step's kernels are queued
      (:class:`~turbox_mm.engine.loops.BatchPrefetcher`).
    - With a :class:`~turbox_mm.datasets.samplers.CyclicBatchSampler` as the loader's batch
      sampler (``configs/_base_/turbox.py`` sets one), one loader iterator serves every epoch,
      so the first batches of epoch ``e + 1`` are loaded while epoch ``e`` ends (and while it is
      validated): the pipeline never drains at epoch boundaries. Each epoch still holds exactly
      the stock loader's batches for that epoch, in the same order.

    A hook that restarts the loader at an epoch boundary so that a changed dataset reaches the
    workers (mmdet3d's ``DisableObjectSampleHook`` and mmdet's ``PipelineSwitchHook`` drop the
    persistent iterator) is honoured: the loop notices that the loader's iterator was dropped,
    discards what it staged and restarts the cycle at the current epoch. Hooks that change the
    dataset in ``before_train_epoch`` without restarting the loader reach neither the stock
    loop's persistent workers nor this one's.

    Args:
        runner (Runner): The runner.
        dataloader (DataLoader | dict): The training loader or its config.
        max_epochs (int): Total training epochs.
        val_begin (int): The epoch that begins validating. Defaults to 1.
        val_interval (int): Validation interval. Defaults to 1.
        dynamic_intervals (list[tuple[int, int]], optional): ``(milestone, interval)`` pairs,
            as mmengine's. Defaults to None.
        preprocess_ahead (bool): Run the data preprocessor for the next batch ahead too, not
            only its copy. Defaults to True.
    """

    def __init__(self,
                 runner,
                 dataloader: Union[DataLoader, Dict],
                 max_epochs: int,
                 val_begin: int = 1,
                 val_interval: int = 1,
                 dynamic_intervals: Optional[List[Tuple[int, int]]] = None,
                 preprocess_ahead: bool = True) -> None:
        super().__init__(runner, dataloader, max_epochs, val_begin, val_interval,
                         dynamic_intervals)
        self.preprocess_ahead = preprocess_ahead
        self._prefetcher: Optional[BatchPrefetcher] = None
        self._loader_iter = None

    @property
    def _cyclic(self) -> bool:
        """One iterator for the whole run: a cyclic batch sampler, or an infinite resumable
        one (``turbox_mm.GroupInBatchSampler``: restarting it would replay epoch 0)."""
        batch_sampler = getattr(self.dataloader, 'batch_sampler', None)
        return isinstance(batch_sampler, CyclicBatchSampler) or (
            getattr(batch_sampler, 'unit', None) == 'batch'
            and hasattr(batch_sampler, 'fast_forward'))

    def _restart(self) -> None:
        """(Re)start the loader at the current epoch, dropping anything staged."""
        if self._prefetcher is not None:
            self._prefetcher.close()
        batch_sampler = getattr(self.dataloader, 'batch_sampler', None)
        if isinstance(batch_sampler, CyclicBatchSampler):
            batch_sampler.start_cycle(epoch=self._epoch)
        elif self._cyclic:
            batch_sampler.fast_forward(self._iter)
        self._loader_iter = iter(self.dataloader)
        self._prefetcher = BatchPrefetcher(self._loader_iter, self.runner.model,
                                           self.preprocess_ahead,
                                           ahead_context(self.runner, self))

    def _loader_was_reset(self) -> bool:
        # A persistent loader keeps its iterator in ``_iterator``; hooks that need fresh
        # workers set it to None.
        return (getattr(self.dataloader, 'persistent_workers', False)
                and self.dataloader.num_workers > 0
                and getattr(self.dataloader, '_iterator', None) is not self._loader_iter)

    def run(self):
        """Launch training."""
        try:
            return super().run()
        finally:
            if self._prefetcher is not None:
                self._prefetcher.close()
            # the loader's workers end with training, not at interpreter exit
            shutdown_loader_workers(self.dataloader, self._loader_iter)
            self._prefetcher = self._loader_iter = None

    def run_epoch(self) -> None:
        """Iterate one epoch."""
        self.runner.call_hook('before_train_epoch')
        self.runner.model.train()
        if not self._cyclic or self._prefetcher is None or self._loader_was_reset():
            self._restart()
        num_batches = len(self.dataloader)
        for idx in range(num_batches):
            try:
                data_batch, ready = self._prefetcher.pop()
            except StopIteration:  # a non-cyclic loader shorter than its len()
                break
            self.run_iter(idx, data_batch, ready)
        flush_grad_norm(self.runner)  # the epoch's last norms, before logs and checkpoints
        self.runner.call_hook('after_train_epoch')
        self._epoch += 1

    def run_iter(self, idx, data_batch, ready=None) -> None:
        """One training step; the next batch is staged once this step's work is queued.

        Args:
            idx (int): Index of the batch in the epoch.
            data_batch: The batch as the loader gave it (what hooks receive).
            ready: The same batch on the device, possibly preprocessed. Defaults to
                ``data_batch``.
        """
        self.runner.call_hook('before_train_iter', batch_idx=idx, data_batch=data_batch)
        outputs = self.runner.model.train_step(
            data_batch if ready is None else ready, optim_wrapper=self.runner.optim_wrapper)
        last_of_epoch = idx + 1 >= len(self.dataloader)
        last_of_run = last_of_epoch and self._epoch + 1 >= self._max_epochs
        if self._prefetcher is not None and not last_of_run and \
                (self._cyclic or not last_of_epoch):
            self._prefetcher.prefetch()
        self.runner.call_hook('after_train_iter', batch_idx=idx, data_batch=data_batch,
                              outputs=outputs)
        self._iter += 1
