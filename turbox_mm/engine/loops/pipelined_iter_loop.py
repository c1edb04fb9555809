"""Iteration-based training with the next batch staged on the GPU during the current step."""
import logging
from typing import Dict, List, Optional, Tuple, Union

import torch
from mmengine.logging import print_log
from mmengine.runner import IterBasedTrainLoop
from mmengine.runner.base_loop import BaseLoop
from mmengine.runner.loops import _InfiniteDataloaderIterator
from mmengine.runner.utils import calc_dynamic_intervals
from torch.utils.data import DataLoader

from turbox_mm.datasets.samplers.cyclic_batch_sampler import CyclicBatchSampler
from turbox_mm.registry import LOOPS
from .batch_prefetcher import BatchPrefetcher, ahead_context, flush_grad_norm
from .loader_shutdown import shutdown_loader_workers


def _draw_loader_seed_now(dataloader) -> None:
    """Draw, now, the number mmengine's loop draws when it is built.

    mmengine's ``IterBasedTrainLoop`` starts its loader iterator in ``__init__``, before the
    runner initialises the model's weights; starting one draws the workers' base seed from
    torch's global generator. This loop starts its iterator when training starts (once a
    resume is known), after the weights: the same draws in another order would give other
    initial weights for the same seed. So the number is drawn here, at mmengine's point in the
    stream, and seeds the loader's own generator, which its iterators then draw from.
    """
    if isinstance(dataloader, DataLoader) and dataloader.generator is None:
        seed = int(torch.empty((), dtype=torch.int64).random_().item())
        dataloader.generator = torch.Generator().manual_seed(seed)


@LOOPS.register_module()
class PipelinedIterBasedTrainLoop(IterBasedTrainLoop):
    """mmengine's ``IterBasedTrainLoop`` with a pipelined input path.

    Three differences, none of which changes what is trained on:

    - The next batch is taken from the loader, copied to the GPU on a side stream and run
      through the data preprocessor right after the current step's kernels are queued
      (:class:`~turbox_mm.engine.loops.BatchPrefetcher`), so the copy, the preprocessing and the
      wait for loader workers overlap the step.
    - With a :class:`~turbox_mm.datasets.samplers.CyclicBatchSampler` as the loader's batch
      sampler (``configs/_base_/turbox.py`` sets one), one loader iterator serves the whole run:
      no restart and no 2 s pause at each pass over the dataset (mmengine's loop sleeps there).
    - On resume at iteration ``k`` the sampler skips ``k`` batches by drawing indices only,
      instead of loading and discarding ``k`` batches (``CyclicBatchSampler``, and batch
      samplers with ``fast_forward`` counted in batches such as
      :class:`~turbox_mm.datasets.samplers.GroupInBatchSampler`).

    The loader iterator is created when training starts (after a resume is known), not when
    the loop is built. Without a cyclic batch sampler the loop restarts the loader at the end
    of the data as mmengine's does.

    Args:
        runner (Runner): The runner.
        dataloader (DataLoader | dict): The training loader or its config.
        max_iters (int): Total training iterations.
        val_begin (int): The iteration that begins validating. Defaults to 1.
        val_interval (int): Validation interval. Defaults to 1000.
        dynamic_intervals (list[tuple[int, int]], optional): ``(milestone, interval)`` pairs,
            as mmengine's. Defaults to None.
        preprocess_ahead (bool): Run the data preprocessor for the next batch ahead too, not
            only its copy. Defaults to True.
    """

    def __init__(self,
                 runner,
                 dataloader: Union[DataLoader, Dict],
                 max_iters: int,
                 val_begin: int = 1,
                 val_interval: int = 1000,
                 dynamic_intervals: Optional[List[Tuple[int, int]]] = None,
                 preprocess_ahead: bool = True) -> None:
        # mmengine's __init__ would start a loader iterator here, before a resume is known;
        # set up the same state without it.
        BaseLoop.__init__(self, runner, dataloader)
        self._max_iters = int(max_iters)
        if self._max_iters != max_iters:
            raise ValueError(f'max_iters must be an integer, got {max_iters!r}')
        self._max_epochs = 1
        self._epoch = 0
        self._iter = 0
        self.val_begin = val_begin
        self.val_interval = val_interval
        self.stop_training = False
        self.preprocess_ahead = preprocess_ahead
        if hasattr(self.dataloader.dataset, 'metainfo'):
            self.runner.visualizer.dataset_meta = self.dataloader.dataset.metainfo
        self.dynamic_milestones, self.dynamic_intervals = calc_dynamic_intervals(
            self.val_interval, dynamic_intervals)
        self._prefetcher: Optional[BatchPrefetcher] = None
        _draw_loader_seed_now(self.dataloader)

    def _start_batches(self):
        """The batch iterator for the run, positioned after ``self._iter`` consumed batches."""
        batch_sampler = getattr(self.dataloader, 'batch_sampler', None)
        if isinstance(batch_sampler, CyclicBatchSampler):
            batch_sampler.start_cycle(epoch=0, skip_batches=self._iter)
            return iter(self.dataloader)
        if getattr(batch_sampler, 'unit', None) == 'batch' and hasattr(batch_sampler,
                                                                       'fast_forward'):
            # An infinite, resumable batch sampler (turbox_mm.GroupInBatchSampler).
            batch_sampler.fast_forward(self._iter)
            return iter(self.dataloader)
        batches = _InfiniteDataloaderIterator(self.dataloader)
        if self._iter > 0:
            print_log(f'Advance dataloader {self._iter} steps to skip data that has already '
                      'been trained (a turbox_mm.CyclicBatchSampler would skip them without '
                      'loading)', logger='current', level=logging.WARNING)
            for _ in range(self._iter):
                next(batches)
        return batches

    def run(self):
        """Launch training."""
        self.runner.call_hook('before_train')
        self.runner.call_hook('before_train_epoch')
        batches = self._start_batches()
        self._prefetcher = BatchPrefetcher(batches, self.runner.model, self.preprocess_ahead,
                                           ahead_context(self.runner, self))
        try:
            while self._iter < self._max_iters and not self.stop_training:
                self.runner.model.train()
                data_batch, ready = self._prefetcher.pop()
                self.run_iter(data_batch, ready)
                self._decide_current_val_interval()
                if (self.runner.val_loop is not None and self._iter >= self.val_begin
                        and (self._iter % self.val_interval == 0
                             or self._iter == self._max_iters)):
                    self.runner.val_loop.run()
        finally:
            flush_grad_norm(self.runner)
            self._prefetcher.close()
            # the loader's workers end with training, not at interpreter exit
            shutdown_loader_workers(self.dataloader, batches)
        self.runner.call_hook('after_train_epoch')
        self.runner.call_hook('after_train')
        return self.runner.model

    def run_iter(self, data_batch, ready=None) -> None:
        """One training step; the next batch is staged once this step's work is queued.

        Args:
            data_batch: The batch as the loader gave it (what hooks receive).
            ready: The same batch on the device, possibly preprocessed
                (:class:`~turbox_mm.engine.loops.BatchPrefetcher`). Defaults to
                ``data_batch``.
        """
        self.runner.call_hook('before_train_iter', batch_idx=self._iter, data_batch=data_batch)
        outputs = self.runner.model.train_step(
            data_batch if ready is None else ready, optim_wrapper=self.runner.optim_wrapper)
        if self._prefetcher is not None and self._iter + 1 < self._max_iters:
            self._prefetcher.prefetch()
        self.runner.call_hook('after_train_iter', batch_idx=self._iter, data_batch=data_batch,
                              outputs=outputs)
        self._iter += 1
