"""A group sampler for MapTR-style training: every batch holds samples of one group."""
from typing import Iterator, Optional, Sized

import numpy as np
import torch
from mmengine.dist import get_dist_info, sync_random_seed
from torch.utils.data import Sampler

from turbox_mm.registry import DATA_SAMPLERS


def group_flag_of(dataset: Sized, owner: str) -> np.ndarray:
    """Read and check the per-sample group ids (``dataset.flag``) of a dataset.

    Args:
        dataset (Sized): A dataset with a ``flag`` attribute: one integer group id per sample
            (an aspect-ratio group for MapTR, a scene or sequence id for Sparse4D).
        owner (str): Name of the caller, used in error messages.

    Returns:
        np.ndarray: The flag as a 1-D int64 array of length ``len(dataset)``.

    Raises:
        AttributeError: The dataset has no ``flag``.
        ValueError: The flag is not a 1-D integer array of the dataset's length, or the
            dataset is empty.
    """
    if not hasattr(dataset, 'flag'):
        raise AttributeError(
            f'{owner} needs dataset.flag (one integer group id per sample), but '
            f'{type(dataset).__name__} has no attribute "flag". Dataset wrappers hide it: '
            'set flag on the outermost dataset.')
    flag = np.asarray(dataset.flag)
    if flag.ndim != 1 or len(flag) != len(dataset):
        raise ValueError(f'{owner}: dataset.flag must be 1-D with one entry per sample '
                         f'({len(dataset)}), got shape {flag.shape}')
    if len(flag) == 0:
        raise ValueError(f'{owner}: the dataset is empty')
    if not np.issubdtype(flag.dtype, np.integer):
        raise ValueError(f'{owner}: dataset.flag must hold integers, got dtype {flag.dtype}')
    return flag.astype(np.int64, copy=False)


def check_int(value, name: str, owner: str, minimum: int = 0) -> int:
    """Return ``value`` as an int, raising a :class:`ValueError` naming it if it is invalid.

    Args:
        value: The value to check.
        name (str): The option's name, for the message.
        owner (str): The component's name, for the message.
        minimum (int): The smallest valid value. Defaults to 0.

    Returns:
        int: ``value``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f'{owner}: {name} must be an integer >= {minimum}, got {value!r}')
    return int(value)


def resolve_dist(rank: Optional[int], world_size: Optional[int], owner: str) -> tuple:
    """Fill in ``rank`` and ``world_size`` from the process group where not given.

    Args:
        rank (int, optional): This process's rank, or None for the process group's.
        world_size (int, optional): The number of ranks, or None for the process group's.
        owner (str): The component's name, for error messages.

    Returns:
        tuple[int, int]: ``(rank, world_size)``.
    """
    dist_rank, dist_world_size = get_dist_info()
    rank = dist_rank if rank is None else check_int(rank, 'rank', owner)
    world_size = (dist_world_size if world_size is None else check_int(
        world_size, 'world_size', owner, minimum=1))
    if rank >= world_size:
        raise ValueError(f'{owner}: rank must be < world_size ({world_size}), got {rank}')
    return rank, world_size


def iter_ints(indices: np.ndarray, chunk: int = 4096) -> Iterator[int]:
    """Yield the entries of an integer array as Python ints, converting in chunks."""
    for start in range(0, len(indices), chunk):
        yield from indices[start:start + chunk].tolist()


@DATA_SAMPLERS.register_module()
class GroupSampler(Sampler):
    """Shuffle within groups, pad each group to whole batches, then shuffle the batches.

    The order of every epoch is that of mmdet 2.x's ``DistributedGroupSampler``, which
    MapTR and BEVFormer train with, for the same ``seed``, ``epoch`` and world size:

    1. A ``torch.Generator`` is seeded with ``seed + epoch``.
    2. For each group (``dataset.flag`` value, ascending), its sample indices are permuted
       with ``torch.randperm`` and repeated cyclically up to the next multiple of
       ``batch_size * world_size``.
    3. The groups are concatenated and cut into chunks of ``batch_size``; the chunks are
       permuted with ``torch.randperm`` (same generator).
    4. Rank ``r`` takes the ``r``-th of ``world_size`` equal contiguous slices.

    Each rank therefore gets whole chunks, each chunk from one group, and every sample of
    the dataset is seen at least once per epoch across the ranks (more often only as padding).
    Everything is done on numpy index arrays; no per-epoch Python lists of the dataset are
    built.

    It is a plain sampler (it yields sample indices), so it stays in the DataLoader's
    ``sampler`` slot and mmengine's ``DistSamplerSeedHook`` calls its :meth:`set_epoch`.
    **The DataLoader's ``batch_size`` must equal ``batch_size`` here**: the DataLoader cuts
    the index stream into batches of its own size, and only then do batches coincide with
    the one-group chunks (a rank's stream length is a multiple of ``batch_size``, so no batch
    straddles two chunks). A sampler cannot see the DataLoader's batch size, so this cannot be
    checked here.

    Resume: ``set_epoch(e)`` then ``fast_forward(n)`` makes the next iterator start at the
    ``n``-th sample of epoch ``e`` (one-shot: the iterator after that starts at 0 again), where
    ``n`` is the number of this rank's samples the training loop has consumed in the epoch
    (``batches * batch_size``), not the number this sampler has yielded, which runs ahead
    because the DataLoader prefetches. :meth:`state_dict` and :meth:`load_state_dict` carry
    the same information through a checkpoint.

    Args:
        dataset (Sized): The dataset; needs ``flag``, one integer group id per sample.
        batch_size (int): Samples per batch on one rank (``samples_per_gpu`` upstream). Must
            equal the DataLoader's ``batch_size``.
        seed (int, optional): Seed of the shuffles; must be the same on all ranks. None draws
            one on rank 0 and broadcasts it. Defaults to None.
        world_size (int, optional): Number of ranks. Defaults to the process group's.
        rank (int, optional): This rank. Defaults to the process group's.

    Examples:
        >>> import numpy as np
        >>> class Data:
        ...     flag = np.array([0, 0, 0, 1, 1])
        ...     def __len__(self):
        ...         return 5
        >>> sampler = GroupSampler(Data(), batch_size=2, seed=0, world_size=1, rank=0)
        >>> len(sampler)  # group 0 padded from 3 to 4, group 1 stays 2
        6
        >>> batches = np.array(list(sampler)).reshape(-1, 2)
        >>> [len(set(Data.flag[b])) for b in batches]
        [1, 1, 1]
        >>> sampler.set_epoch(1)
        >>> sampler.fast_forward(4)
        >>> len(list(sampler))
        2
    """

    unit = 'sample'

    def __init__(self,
                 dataset: Sized,
                 batch_size: Optional[int] = None,
                 seed: Optional[int] = None,
                 world_size: Optional[int] = None,
                 rank: Optional[int] = None) -> None:
        name = type(self).__name__
        if batch_size is None:
            raise ValueError(f'{name} needs batch_size, equal to the dataloader\'s batch_size '
                             f'(e.g. sampler=dict(type="turbox_mm.{name}", batch_size=4))')
        self.batch_size = check_int(batch_size, 'batch_size', name, minimum=1)
        self.rank, self.world_size = resolve_dist(rank, world_size, name)
        self.dataset = dataset
        flag = group_flag_of(dataset, name)
        self.seed = sync_random_seed() if seed is None else check_int(seed, 'seed', name)
        self.epoch = 0
        self._skip = 0

        # Members of every group, in dataset order, as one array plus offsets.
        _, group_of_sample = np.unique(flag, return_inverse=True)
        group_of_sample = group_of_sample.reshape(-1)
        self._members = np.argsort(group_of_sample, kind='stable')
        self.group_sizes = np.bincount(group_of_sample)
        self._group_starts = np.concatenate([[0], np.cumsum(self.group_sizes)[:-1]])
        per_rank = self.batch_size * self.world_size
        self._padded_sizes = -(-self.group_sizes // per_rank) * per_rank
        self.total_size = int(self._padded_sizes.sum())
        self.num_samples = self.total_size // self.world_size

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """Return this rank's sample indices of an epoch.

        Args:
            epoch (int): The epoch.

        Returns:
            np.ndarray: ``num_samples`` int64 indices; consecutive runs of ``batch_size`` are
            one group each.
        """
        gen = torch.Generator()
        gen.manual_seed(self.seed + int(epoch))
        padded = np.empty(self.total_size, dtype=np.int64)
        out = 0
        for start, size, padded_size in zip(self._group_starts, self.group_sizes,
                                            self._padded_sizes):
            members = self._members[start:start + size]
            shuffled = members[torch.randperm(int(size), generator=gen).numpy()]
            padded[out:out + padded_size] = np.resize(shuffled, padded_size)
            out += padded_size
        chunks = torch.randperm(self.total_size // self.batch_size, generator=gen).numpy()
        padded = padded.reshape(-1, self.batch_size)[chunks].reshape(-1)
        begin = self.rank * self.num_samples
        return padded[begin:begin + self.num_samples]

    def __iter__(self) -> Iterator[int]:
        """Iterate this rank's indices of the current epoch.

        The order is computed when the iterator is created, so a later :meth:`set_epoch`
        does not change an iterator already running.
        """
        indices = self.epoch_indices(self.epoch)[self._skip:]
        self._skip = 0
        return iter_ints(indices)

    def __len__(self) -> int:
        """The number of samples of this rank per epoch (a multiple of ``batch_size``)."""
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch whose order the next iterator yields.

        Args:
            epoch (int): The epoch.
        """
        self.epoch = int(epoch)

    def fast_forward(self, num_samples: int) -> None:
        """Make the next iterator skip the first ``num_samples`` of the epoch, without data.

        Args:
            num_samples (int): Samples of this rank the training loop has consumed in the
                current epoch: ``batches_consumed * batch_size``.
        """
        num_samples = check_int(num_samples, 'num_samples', type(self).__name__)
        if num_samples > self.num_samples:
            raise ValueError(f'{type(self).__name__}.fast_forward: num_samples={num_samples} '
                             f'is past the end of an epoch of {self.num_samples} samples')
        self._skip = num_samples

    def state_dict(self, num_samples: int) -> dict:
        """Return the state to store in a checkpoint.

        Args:
            num_samples (int): Samples of this rank the training loop has consumed in the
                current epoch (not what the sampler has yielded: the DataLoader prefetches).

        Returns:
            dict: The seed, the epoch, ``num_samples`` and what must match on resume. It is
            the same on every rank, so rank 0's copy serves all.
        """
        return dict(type=type(self).__name__, seed=self.seed, epoch=self.epoch,
                    num_samples=check_int(num_samples, 'num_samples', type(self).__name__),
                    batch_size=self.batch_size, world_size=self.world_size,
                    dataset_length=len(self.dataset))

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`: seed, epoch and position in the epoch.

        Args:
            state (dict): What :meth:`state_dict` returned.

        Raises:
            ValueError: ``batch_size``, ``world_size`` or the dataset's length differ from the
                saved ones (the order would not continue the saved run's).
        """
        name = type(self).__name__
        now = dict(batch_size=self.batch_size, world_size=self.world_size,
                   dataset_length=len(self.dataset))
        for key, value in now.items():
            if state.get(key) != value:
                raise ValueError(f'{name}.load_state_dict: {key} was {state.get(key)!r} in the '
                                 f'saved state but is {value!r} now; the order cannot continue')
        self.seed = int(state['seed'])
        self.set_epoch(state['epoch'])
        self.fast_forward(state['num_samples'])
