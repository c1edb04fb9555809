"""A batch sampler whose every batch slot walks one sequence in temporal order (Sparse4D)."""
import math
from typing import Dict, Iterator, List, Optional, Sized, Union

import numpy as np
import torch
from mmengine.dist import sync_random_seed

from turbox_mm.registry import DATA_SAMPLERS
from .group_sampler import check_int, group_flag_of, resolve_dist

_UNIT = 2.0**-53


@DATA_SAMPLERS.register_module()
class GroupInBatchSampler:
    """Every slot of the global batch walks its own sequence, frame after frame, forever.

    The semantics are those of Sparse4D's and SparseDrive's ``GroupInBatchSampler`` (from
    SOLOFusion), made deterministic and resumable:

    * ``dataset.flag`` gives each sample its sequence (scene) id. Frames of a sequence are
      walked in dataset-index order, so a dataset must store them in temporal order.
    * ``sequences_split_num=k`` cuts every sequence of ``n`` frames into pieces of
      ``ceil(n / k)`` frames (the last one shorter; fewer than ``k`` pieces when ``n`` is
      small), as Sparse4D's dataset does to its ``flag``; ``'all'`` makes every frame its own
      sequence. Leave it at 1 for a dataset whose ``flag`` is already split.
    * Sequences are dealt from an endless stream of permutations of all sequences: pass
      ``e`` is ``torch.randperm(num_sequences)`` seeded with ``seed + e``. Global slot ``g``
      (``rank * batch_size + i``) takes stream positions ``g, g + G, g + 2G, ...`` with
      ``G = batch_size * world_size``. So the slots of all ranks walk distinct stream
      positions, and each pass of the stream holds every sequence exactly once.
    * A slot yields its sequence's frames one per batch and takes its next sequence when
      done. With ``sequence_flip_prob`` a walk runs backwards; with ``skip_prob`` each step
      after the first skips one frame with that probability while more than one frame is
      left (upstream's rule).
    * Augmentation: each walk gets one ``aug_seed`` (``keep_consistent_seq_aug=True``) or
      one per frame. See "Dataset contract" below.

    All randomness of a walk (flip, skips, augmentation seeds) is a hash of ``(seed, stream
    position)`` (``numpy.random.SeedSequence``, stable across numpy versions), so the stream
    of batches is a pure function of the arguments and the batch number.

    **Length and loops.** The stream is infinite. ``len()`` is :attr:`epoch_length`, the
    number of batches in which all ranks together draw about ``len(dataset)`` frames
    (``ceil(len(dataset) / (batch_size * world_size))``): use it to size schedules. Use it
    with an iteration-based loop (``IterBasedTrainLoop``) or with a loop that reads all
    epochs from one iterator; mmengine's ``EpochBasedTrainLoop`` would never end an epoch.

    **Resume.** Positions are absolute batch numbers since the start of training. The
    DataLoader prefetches, so what this sampler has yielded runs ahead of what was trained
    on; the training loop, which knows how many batches it consumed (``runner.iter``),
    passes that number: ``state_dict(num_batches)`` to save and ``fast_forward(num_batches)``
    (or :meth:`load_state_dict`) before creating the DataLoader iterator to resume. Every
    iterator then starts at that batch, computed from the sequence lengths alone (no data is
    loaded; cost grows with the number of sequences walked, not frames). Do not also let the
    loop skip batches by loading them (mmengine's ``IterBasedTrainLoop`` does that on resume),
    or they are skipped twice.

    **Dataset contract.** With ``return_dict=True`` (the default) a batch is a list of
    ``batch_size`` dicts, which the DataLoader passes one by one to ``dataset[item]``:

    * ``idx`` (int): the sample index.
    * ``aug_seed`` (int): a 63-bit seed for this frame's augmentation parameters; equal for
      all frames of a walk when ``keep_consistent_seq_aug``. Draw every random augmentation
      parameter (resize, crop, flip, rotation, ...) from ``numpy.random.default_rng(aug_seed)``
      instead of the global random state; the result is the same in any worker and on resume.
    * ``sequence`` (int): the (split) sequence id being walked.
    * ``first`` (bool): True on the first frame of a walk; temporal models reset their memory.

    A dataset accepting both this and a plain index (for validation) looks like::

        def __getitem__(self, item):
            if isinstance(item, dict):
                idx, aug_seed = item['idx'], item['aug_seed']
            else:
                idx, aug_seed = item, None  # None: fresh entropy, per-sample augmentation
            results = self.get_data_info(idx)
            results['aug_config'] = self.get_augmentation(np.random.default_rng(aug_seed))
            return self.pipeline(results)

    Upstream put the augmentation dict itself in the item (``aug_config``, drawn from the
    global ``np.random`` in the main process); a seed keeps the sampler independent of the
    dataset's augmentation code and makes it reproducible. With ``return_dict=False`` the
    batches hold plain indices, for datasets that take no part in this contract.

    Args:
        sampler (Sampler, optional): What mmengine passes when it builds a ``batch_sampler``:
            the dataloader's ``sampler``. Only its ``dataset`` and ``seed`` are used; its order
            is not. Defaults to None.
        batch_size (int): Slots per rank. mmengine passes the dataloader's ``batch_size``.
            Defaults to 1.
        dataset (Sized, optional): The dataset, with ``flag``; defaults to
            ``sampler.dataset``.
        seed (int, optional): Seed, equal on all ranks. Defaults to ``sampler.seed`` (which
            mmengine synchronises), else one broadcast from rank 0.
        world_size (int, optional): Number of ranks. Defaults to the process group's.
        rank (int, optional): This rank. Defaults to the process group's.
        sequences_split_num (int | str): Pieces per sequence, or ``'all'``. Defaults to 1.
        skip_prob (float): Probability of skipping a frame at each step. Defaults to 0.
            (Sparse4D v3's builder left upstream's default of 0.5 in place; SparseDrive uses 0.)
        sequence_flip_prob (float): Probability that a walk runs backwards. Defaults to 0.
            (Sparse4D: 0.1; SparseDrive: 0.)
        keep_consistent_seq_aug (bool): One ``aug_seed`` per walk rather than per frame.
            Defaults to True.
        return_dict (bool): Yield dicts (see above) rather than plain indices. Defaults to
            True.

    Examples:
        >>> import numpy as np
        >>> class Scenes:
        ...     flag = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
        ...     def __len__(self):
        ...         return 9
        >>> sampler = GroupInBatchSampler(batch_size=2, dataset=Scenes(), seed=0,
        ...                               world_size=1, rank=0, return_dict=False)
        >>> stream = iter(sampler)
        >>> batches = [next(stream) for _ in range(4)]
        >>> len(sampler), [len(b) for b in batches]
        (5, [2, 2, 2, 2])
        >>> sampler.fast_forward(2)  # e.g. resuming at runner.iter == 2
        >>> next(iter(sampler)) == batches[2]
        True
    """

    unit = 'batch'

    def __init__(self,
                 sampler=None,
                 batch_size: int = 1,
                 dataset: Optional[Sized] = None,
                 seed: Optional[int] = None,
                 world_size: Optional[int] = None,
                 rank: Optional[int] = None,
                 sequences_split_num: Union[int, str] = 1,
                 skip_prob: float = 0.0,
                 sequence_flip_prob: float = 0.0,
                 keep_consistent_seq_aug: bool = True,
                 return_dict: bool = True) -> None:
        name = type(self).__name__
        if dataset is None:
            if sampler is None or not hasattr(sampler, 'dataset'):
                raise ValueError(f'{name} needs dataset=..., or a sampler with a dataset '
                                 '(mmengine passes the dataloader\'s sampler)')
            dataset = sampler.dataset
        if seed is None:
            seed = getattr(sampler, 'seed', None)
        # Kept for mmengine's DistSamplerSeedHook, which reads ``batch_sampler.sampler``.
        self.sampler = sampler
        self.dataset = dataset
        self.batch_size = check_int(batch_size, 'batch_size', name, minimum=1)
        self.rank, self.world_size = resolve_dist(rank, world_size, name)
        self.seed = sync_random_seed() if seed is None else check_int(seed, 'seed', name)
        for key, prob in (('skip_prob', skip_prob), ('sequence_flip_prob', sequence_flip_prob)):
            if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not (
                    0.0 <= prob <= 1.0):
                raise ValueError(f'{name}: {key} must be a probability in [0, 1], got {prob!r}')
        self.skip_prob = float(skip_prob)
        self.sequence_flip_prob = float(sequence_flip_prob)
        self.keep_consistent_seq_aug = bool(keep_consistent_seq_aug)
        self.return_dict = bool(return_dict)
        self.sequences_split_num = sequences_split_num
        self._build_sequences(group_flag_of(dataset, name), sequences_split_num)

        self.global_batch_size = self.batch_size * self.world_size
        if self.num_sequences < self.global_batch_size:
            raise ValueError(
                f'{name}: {self.num_sequences} sequences (after sequences_split_num='
                f'{sequences_split_num!r}) cannot fill batch_size * world_size = '
                f'{self.batch_size} * {self.world_size} = {self.global_batch_size} slots; '
                'lower batch_size or raise sequences_split_num')
        self._start = 0
        self._perm_cache: Dict[int, np.ndarray] = {}

    def _build_sequences(self, flag: np.ndarray, split) -> None:
        """Lay out the (split) sequences as offsets into one array of sample indices."""
        _, group_of_sample = np.unique(flag, return_inverse=True)
        group_of_sample = group_of_sample.reshape(-1)
        self._members = np.argsort(group_of_sample, kind='stable')
        sizes = np.bincount(group_of_sample)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        if split == 'all':
            piece = np.ones_like(sizes)
        else:
            split = check_int(split, 'sequences_split_num', type(self).__name__, minimum=1)
            piece = -(-sizes // split)
        pieces = -(-sizes // piece)
        parent = np.repeat(np.arange(len(sizes)), pieces)
        within = np.arange(len(parent)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        self._seq_starts = starts[parent] + within * piece[parent]
        self._seq_lengths = np.minimum(piece[parent], sizes[parent] - within * piece[parent])
        self.num_sequences = len(self._seq_starts)

    @property
    def epoch_length(self) -> int:
        """Batches per rank in which all ranks together draw about ``len(dataset)`` frames."""
        return math.ceil(len(self.dataset) / self.global_batch_size)

    def __len__(self) -> int:
        """The nominal epoch length (:attr:`epoch_length`); the stream itself is infinite."""
        return self.epoch_length

    def sequence_at(self, position: int) -> int:
        """Return the sequence id at a position of the endless stream of permutations.

        Args:
            position (int): Position in the stream (slot ``g``'s ``j``-th walk is at
                ``g + j * batch_size * world_size``).

        Returns:
            int: The (split) sequence id.
        """
        rnd, offset = divmod(position, self.num_sequences)
        perm = self._perm_cache.get(rnd)
        if perm is None:
            if len(self._perm_cache) >= 16:
                self._perm_cache.pop(min(self._perm_cache))
            gen = torch.Generator()
            gen.manual_seed(self.seed + rnd)
            perm = torch.randperm(self.num_sequences, generator=gen).numpy()
            self._perm_cache[rnd] = perm
        return int(perm[offset])

    def walk_at(self, position: int) -> tuple:
        """Return the walk at a stream position: the frames a slot yields, in order.

        Args:
            position (int): Position in the stream.

        Returns:
            tuple: ``(sequence, frames, aug_seeds)``: the sequence id, the sample indices
            (after flip and skips) and one augmentation seed per frame.
        """
        seq = self.sequence_at(position)
        start, length = int(self._seq_starts[seq]), int(self._seq_lengths[seq])
        frames = self._members[start:start + length]
        words = np.random.SeedSequence([self.seed, position]).generate_state(
            2 + 2 * length, np.uint64)
        uniforms = (words[:2 + length] >> np.uint64(11)).astype(np.float64) * _UNIT
        if uniforms[0] < self.sequence_flip_prob:
            frames = frames[::-1]
        if self.skip_prob > 0 and length > 2:
            keep, i = [0], 1
            while i < length:
                if length - i > 1 and uniforms[2 + i] < self.skip_prob:
                    i += 1
                keep.append(i)
                i += 1
            frames = frames[keep]
        seeds = words >> np.uint64(1)
        if self.keep_consistent_seq_aug:
            aug_seeds = np.full(len(frames), seeds[1])
        else:
            aug_seeds = seeds[2 + length:2 + length + len(frames)]
        return seq, frames, aug_seeds

    def _seek(self, slot: int, num_batches: int) -> tuple:
        """Return ``(walk number, frame offset)`` of a global slot after ``num_batches``."""
        walk = 0
        while True:
            position = slot + walk * self.global_batch_size
            if self.skip_prob > 0:
                length = len(self.walk_at(position)[1])
            else:  # no skips: the length is the sequence's, no need to draw the walk
                length = int(self._seq_lengths[self.sequence_at(position)])
            if num_batches < length:
                return walk, num_batches
            num_batches -= length
            walk += 1

    def __iter__(self) -> Iterator[List[Union[int, dict]]]:
        """Yield batches forever, starting at the batch set by :meth:`fast_forward`."""
        slots = []
        for local in range(self.batch_size):
            slot = self.rank * self.batch_size + local
            walk, offset = self._seek(slot, self._start)
            slots.append([slot, walk, offset, self.walk_at(slot + walk * self.global_batch_size)])
        while True:
            batch = []
            for state in slots:
                slot, walk, offset, (seq, frames, aug_seeds) = state
                if self.return_dict:
                    batch.append(dict(idx=int(frames[offset]), aug_seed=int(aug_seeds[offset]),
                                      sequence=seq, first=offset == 0))
                else:
                    batch.append(int(frames[offset]))
                offset += 1
                if offset == len(frames):
                    walk, offset = walk + 1, 0
                    state[3] = self.walk_at(slot + walk * self.global_batch_size)
                state[1], state[2] = walk, offset
            yield batch

    def set_epoch(self, epoch: int) -> None:
        """Do nothing: the stream is infinite; positions are set by :meth:`fast_forward`."""

    def fast_forward(self, num_batches: int) -> None:
        """Make every new iterator start at batch ``num_batches`` of the stream.

        Args:
            num_batches (int): Batches the training loop has consumed since the start of
                training (``runner.iter``), not what this sampler has yielded.
        """
        self._start = check_int(num_batches, 'num_batches', type(self).__name__)

    def state_dict(self, num_batches: int) -> dict:
        """Return the state to store in a checkpoint.

        Args:
            num_batches (int): Batches the training loop has consumed (``runner.iter``).

        Returns:
            dict: Seed, position and what must match on resume. It is the same on every
            rank, so rank 0's copy serves all.
        """
        return dict(type=type(self).__name__, seed=self.seed,
                    num_batches=check_int(num_batches, 'num_batches', type(self).__name__),
                    **self._fingerprint())

    def _fingerprint(self) -> dict:
        return dict(batch_size=self.batch_size, world_size=self.world_size,
                    dataset_length=len(self.dataset), num_sequences=self.num_sequences,
                    skip_prob=self.skip_prob, sequence_flip_prob=self.sequence_flip_prob,
                    keep_consistent_seq_aug=self.keep_consistent_seq_aug)

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`: the seed and the position.

        The seed comes from the state even if this sampler was built with another one
        (mmengine builds the dataloader before it reads the checkpoint's seed).

        Args:
            state (dict): What :meth:`state_dict` returned.

        Raises:
            ValueError: A setting that shapes the stream (batch size, world size, dataset,
                sequences, probabilities) differs from the saved one.
        """
        for key, value in self._fingerprint().items():
            if state.get(key) != value:
                raise ValueError(f'{type(self).__name__}.load_state_dict: {key} was '
                                 f'{state.get(key)!r} in the saved state but is {value!r} now; '
                                 'the stream cannot continue')
        self.seed = int(state['seed'])
        self._perm_cache.clear()
        self.fast_forward(state['num_batches'])
