"""Training loops that keep the GPU fed: side-stream prefetch, one loader iterator per run."""
from .batch_prefetcher import BatchPrefetcher, PreprocessedBatch
from .pipelined_epoch_loop import PipelinedEpochBasedTrainLoop
from .pipelined_iter_loop import PipelinedIterBasedTrainLoop

__all__ = ['BatchPrefetcher', 'PreprocessedBatch', 'PipelinedEpochBasedTrainLoop',
           'PipelinedIterBasedTrainLoop']
