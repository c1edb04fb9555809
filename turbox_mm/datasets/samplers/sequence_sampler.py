"""An evaluation sampler for temporal models: every rank walks whole sequences, in order."""
from typing import Iterator, Optional, Sized

import numpy as np
from mmengine.dist import get_dist_info
from mmengine.logging import print_log
from torch.utils.data import Sampler

from turbox_mm.registry import DATA_SAMPLERS
from .group_sampler import check_int, group_flag_of


def sequence_blocks(flag: np.ndarray, parts: int) -> np.ndarray:
    """Split samples into ``parts`` contiguous blocks of whole sequences, balanced by length.

    A sequence is a run of equal values of ``flag`` (the samples are in the dataset's order).
    Block ``r`` is ``bounds[r]:bounds[r + 1]``; every inner bound is the sequence start
    closest to ``r * N / parts`` (and never before the previous bound), so blocks differ from
    ``N / parts`` by at most about half a sequence. With fewer sequences than parts, some
    blocks are empty.

    Args:
        flag (np.ndarray): ``[N]`` sequence ids.
        parts (int): Number of blocks (ranks).

    Returns:
        np.ndarray: ``[parts + 1]`` int64 sample indices, ``bounds[0] = 0``, ``bounds[-1] = N``.

    Examples:
        >>> sequence_blocks(np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3]), 2).tolist()
        [0, 5, 10]
    """
    n = len(flag)
    starts = np.flatnonzero(np.r_[True, flag[1:] != flag[:-1]]) if n else np.zeros(0, int)
    bounds = [0]
    for r in range(1, parts):
        target = r * n / parts
        i = int(np.searchsorted(starts, target))
        nearest = [starts[j] for j in (i - 1, i) if 0 <= j < len(starts)]
        choice = min(nearest, key=lambda s: (abs(s - target), s)) if nearest else n
        bounds.append(max(bounds[-1], int(choice)))
    bounds.append(n)
    return np.asarray(bounds, dtype=np.int64)


@DATA_SAMPLERS.register_module()
class SequenceSampler(Sampler):
    """Evaluation sampler for temporal models: each rank gets whole sequences, in order.

    mmengine's ``DefaultSampler`` deals samples to ranks interleaved (rank ``r`` of ``W``
    gets samples ``r, r + W, ...``), so a temporal model (Sparse4D's instance bank, BEVFormer's
    history) sees every ``W``-th frame of a scene, and the time gap resets its memory at
    every frame. Here rank ``r`` walks one contiguous block of whole sequences
    (:func:`sequence_blocks`, balanced by frame count) in the dataset's order; every sample
    goes to exactly one rank, none is repeated for padding, so ranks may hold different
    counts. Collect the results with :class:`~turbox_mm.evaluation.OrderedEvaluator`,
    which concatenates them in rank order (mmengine's default collection assumes the
    interleaving and would misorder and truncate them).

    On one process it is a sequential sampler.

    Args:
        dataset (Sized): A dataset with ``flag``, one sequence id per sample, in temporal
            order within each sequence (``Sparse4DNuScenesDataset``).
        seed (int, optional): Unused (no randomness); accepted because mmengine passes it.
        rank (int, optional): This process's rank; defaults to the distributed rank.
        world_size (int, optional): Number of ranks; defaults to the distributed world size.
    """

    def __init__(self, dataset: Sized, seed: Optional[int] = None, rank: Optional[int] = None,
                 world_size: Optional[int] = None) -> None:
        flag = group_flag_of(dataset, 'SequenceSampler')
        dist_rank, dist_world_size = get_dist_info()
        self.world_size = check_int(dist_world_size if world_size is None else world_size,
                                    'world_size', 'SequenceSampler', minimum=1)
        self.rank = check_int(dist_rank if rank is None else rank, 'rank', 'SequenceSampler')
        if self.rank >= self.world_size:
            raise ValueError(f'SequenceSampler: rank {self.rank} is not below world_size '
                             f'{self.world_size}')
        self.dataset = dataset
        bounds = sequence_blocks(flag, self.world_size)
        self.start, self.stop = int(bounds[self.rank]), int(bounds[self.rank + 1])
        self.num_sequences = int(1 + np.count_nonzero(flag[1:] != flag[:-1]))
        if self.num_sequences < self.world_size and self.rank == 0:
            print_log(f'SequenceSampler: {self.num_sequences} sequences for {self.world_size} '
                      f'ranks; {self.world_size - self.num_sequences} ranks evaluate nothing',
                      logger='current', level=30)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do: the order never changes (kept for mmengine's loops)."""
