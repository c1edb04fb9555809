"""Samplers: coverage, order, ranks, determinism and resume of GroupInBatchSampler,
GroupSampler, alone and built through mmengine's Runner.build_dataloader."""
import itertools
import math

import numpy as np
import pytest
import torch
from mmengine.runner import Runner
from torch.utils.data import Dataset

# The package __init__ of samplers does not import these (yet); import them explicitly so
# that they register.
from turbox_mm.datasets.samplers.group_in_batch_sampler import GroupInBatchSampler
from turbox_mm.datasets.samplers.group_sampler import GroupSampler

LENGTHS = [3, 5, 1, 4, 6, 2, 7, 3, 2, 4, 5, 1]  # 12 sequences, 43 frames


class SeqData(Dataset):
    """Frames of sequences stored one sequence after the other; ``flag`` is the sequence id.

    ``__getitem__`` takes a plain index or a GroupInBatchSampler item and returns what it
    got, so that tests can see which index and augmentation seed reached the dataset.
    """

    def __init__(self, lengths=LENGTHS, flag=None):
        self.flag = np.repeat(np.arange(len(lengths)), lengths) if flag is None else flag

    def __len__(self):
        return len(self.flag)

    def __getitem__(self, item):
        if isinstance(item, dict):
            return (item['idx'], item['aug_seed'])
        return item


def members(lengths):
    """Frames of each sequence, as SeqData lays them out."""
    ends = np.cumsum(lengths)
    return [list(range(end - n, end)) for n, end in zip(lengths, ends)]


def take(iterable, n):
    return list(itertools.islice(iterable, n))


# --------------------------------------------------------------------------------------
# GroupInBatchSampler
# --------------------------------------------------------------------------------------
def gib(dataset=None, **kwargs):
    kwargs.setdefault('seed', 3)
    kwargs.setdefault('world_size', 1)
    kwargs.setdefault('rank', 0)
    return GroupInBatchSampler(dataset=dataset or SeqData(), **kwargs)


def walks(sampler, num_batches):
    """Split each slot's items into walks: {global stream position: (sequence, frames, augs)}.

    Only complete walks (followed by another walk's first frame) are returned.
    """
    batches = take(sampler, num_batches)
    found = {}
    for local in range(sampler.batch_size):
        slot = sampler.rank * sampler.batch_size + local
        items = [batch[local] for batch in batches]
        starts = [i for i, item in enumerate(items) if item['first']]
        assert starts[0] == 0
        for j, (a, b) in enumerate(zip(starts, starts[1:])):
            walk = items[a:b]
            assert len({item['sequence'] for item in walk}) == 1
            found[slot + j * sampler.global_batch_size] = (
                walk[0]['sequence'], [item['idx'] for item in walk],
                [item['aug_seed'] for item in walk])
    return found


@pytest.mark.parametrize('world_size,batch_size', [(1, 1), (1, 3), (2, 2), (4, 2), (4, 3)])
def test_gib_each_pass_walks_every_sequence_once_in_order(world_size, batch_size):
    data = SeqData()
    seqs = members(LENGTHS)
    num_seq = len(LENGTHS)
    found = {}
    for rank in range(world_size):
        sampler = gib(data, batch_size=batch_size, world_size=world_size, rank=rank)
        assert sampler.num_sequences == num_seq
        found.update(walks(sampler, 120))
    for first in (0, num_seq):  # passes 0 and 1 of the stream
        positions = range(first, first + num_seq)
        assert all(p in found for p in positions), 'not enough batches drawn'
        assert sorted(found[p][0] for p in positions) == list(range(num_seq))
        frames = []
        for p in positions:
            sequence, idx, _ = found[p]
            assert idx == seqs[sequence]  # the whole sequence, in temporal order
            frames += idx
        assert sorted(frames) == list(range(len(data)))  # every frame once per pass
    assert [found[p][0] for p in range(num_seq)] != [found[p][0] for p in range(num_seq, 24)]


@pytest.mark.parametrize('world_size', [2, 4])
def test_gib_ranks_walk_distinct_sequences(world_size):
    data = SeqData()
    samplers = [gib(data, batch_size=3, world_size=world_size, rank=r) for r in range(world_size)]
    firsts = [item['sequence'] for s in samplers for item in next(iter(s))]
    assert len(firsts) == 3 * world_size == len(set(firsts))
    streams = [[[item['idx'] for item in b] for b in take(s, 30)] for s in samplers]
    assert all(a != b for a, b in itertools.combinations(streams, 2))


def test_gib_flip_and_skip_keep_walk_order():
    seqs = members(LENGTHS)
    flipped = walks(gib(sequence_flip_prob=1.0, batch_size=2), 80)
    for sequence, idx, _ in flipped.values():
        assert idx == seqs[sequence][::-1]
    skipped = walks(gib(skip_prob=0.5, batch_size=2), 200)
    num_skips = 0
    for sequence, idx, _ in skipped.values():
        full = seqs[sequence]
        assert idx[0] == full[0] and idx[-1] == full[-1]
        steps = np.diff(idx)
        assert np.all((steps == 1) | (steps == 2))  # in order, at most one frame skipped
        num_skips += int((steps == 2).sum())
    assert num_skips > 0


def test_gib_sequences_split_num():
    lengths = [5, 8, 3]
    data = SeqData(lengths)
    sampler = gib(data, sequences_split_num=2)
    # ceil(n / 2) frames per piece: 5 -> 3+2, 8 -> 4+4, 3 -> 2+1
    assert sampler.num_sequences == 6
    got = {frozenset(idx) for _, idx, _ in walks(sampler, 40).values()}
    expected = [[0, 1, 2], [3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14], [15]]
    assert got == {frozenset(e) for e in expected}
    # 5 frames in 4 pieces -> pieces of 2: only 3 pieces (upstream asserts here)
    assert gib(data, sequences_split_num=4).num_sequences == 3 + 4 + 3
    every = gib(data, sequences_split_num='all')
    assert every.num_sequences == 16
    assert all(len(idx) == 1 for _, idx, _ in walks(every, 40).values())
    with pytest.raises(ValueError, match='sequences_split_num'):
        gib(data, sequences_split_num=0)
    with pytest.raises(ValueError, match='sequences_split_num'):
        gib(data, sequences_split_num='half')


def test_gib_flag_may_be_sparse_and_unsorted_values():
    flag = np.array([7, 7, 7, 2, 2, 40, 40, 40, 40])  # ids with gaps, not in index order
    found = walks(gib(SeqData(flag=flag), batch_size=1), 40)
    assert {tuple(idx) for _, idx, _ in found.values()} == {(0, 1, 2), (3, 4), (5, 6, 7, 8)}


def test_gib_augmentation_seed_per_walk_or_per_frame():
    per_walk = walks(gib(batch_size=2), 80)
    seeds = [augs[0] for _, _, augs in per_walk.values()]
    assert all(len(set(augs)) == 1 for _, _, augs in per_walk.values())
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds)
    per_frame = walks(gib(batch_size=2, keep_consistent_seq_aug=False), 80)
    for _, idx, augs in per_frame.values():
        assert len(set(augs)) == len(idx)


def test_gib_deterministic_under_seed():
    a, b = take(gib(batch_size=2), 50), take(gib(batch_size=2), 50)
    assert a == b
    assert take(gib(batch_size=2, seed=4), 50) != a
    assert take(gib(batch_size=2, rank=1, world_size=2), 50) != take(
        gib(batch_size=2, rank=0, world_size=2), 50)


def test_gib_plain_indices_and_length():
    sampler = gib(batch_size=2, return_dict=False, world_size=2, rank=1)
    batch = next(iter(sampler))
    assert len(batch) == 2 and all(type(i) is int for i in batch)
    assert len(sampler) == sampler.epoch_length == math.ceil(43 / 4)


RESUME_CASES = [
    dict(batch_size=2),
    dict(batch_size=3, world_size=2, rank=1, skip_prob=0.5, sequence_flip_prob=0.3),
    dict(batch_size=1, keep_consistent_seq_aug=False, sequences_split_num=2),
]


@pytest.mark.parametrize('kwargs', RESUME_CASES)
def test_gib_resume_equals_uninterrupted(kwargs):
    total = 70
    straight = take(gib(**kwargs), total)
    for k in (0, 1, 6, 23, 69):
        resumed = gib(**kwargs)
        resumed.fast_forward(k)
        assert take(resumed, total - k) == straight[k:], k
    # A sampler that has run ahead of training (as a prefetching DataLoader makes it) saves
    # the position the loop passes, not its own.
    running = gib(**kwargs)
    take(running, 40)
    state = running.state_dict(num_batches=23)
    fresh = gib(**dict(kwargs, seed=999))
    fresh.load_state_dict(state)
    assert fresh.seed == 3
    assert take(fresh, total - 23) == straight[23:]
    assert take(fresh, 5) == straight[23:28]  # every new iterator starts there


def test_gib_load_state_dict_rejects_other_stream():
    state = gib(batch_size=2).state_dict(5)
    with pytest.raises(ValueError, match='world_size'):
        gib(batch_size=2, world_size=2, rank=0).load_state_dict(state)
    with pytest.raises(ValueError, match='skip_prob'):
        gib(batch_size=2, skip_prob=0.1).load_state_dict(state)


def test_gib_bad_arguments():
    with pytest.raises(ValueError, match='cannot fill'):
        gib(batch_size=4, world_size=4)  # 12 sequences, 16 slots
    with pytest.raises(AttributeError, match='flag'):
        GroupInBatchSampler(dataset=list(range(4)), seed=0, world_size=1, rank=0)
    with pytest.raises(ValueError, match='skip_prob'):
        gib(skip_prob=1.5)
    with pytest.raises(ValueError, match='batch_size'):
        gib(batch_size=0)
    with pytest.raises(ValueError, match='rank'):
        gib(rank=2, world_size=2)
    with pytest.raises(ValueError, match='dataset'):
        GroupInBatchSampler(batch_size=2)


# --------------------------------------------------------------------------------------
# GroupSampler
# --------------------------------------------------------------------------------------
def reference_group_order(flag, batch_size, world_size, rank, seed, epoch):
    """mmdet 2.x DistributedGroupSampler's order, spelled out with Python lists."""
    gen = torch.Generator()
    gen.manual_seed(seed + epoch)
    multiple = batch_size * world_size
    order = []
    for value in sorted(set(flag.tolist())):
        group = [i for i, f in enumerate(flag.tolist()) if f == value]
        perm = torch.randperm(len(group), generator=gen).tolist()
        group = [group[p] for p in perm]
        padded_size = -(-len(group) // multiple) * multiple
        order += [group[i % len(group)] for i in range(padded_size)]
    chunks = torch.randperm(len(order) // batch_size, generator=gen).tolist()
    order = [order[c * batch_size + j] for c in chunks for j in range(batch_size)]
    per_rank = len(order) // world_size
    return order[rank * per_rank:(rank + 1) * per_rank]


ASPECT_FLAG = np.array([1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 1, 3, 1, 0])  # groups of 4, 9, 1


@pytest.mark.parametrize('world_size', [1, 2, 4])
@pytest.mark.parametrize('batch_size', [1, 3])
def test_group_sampler_matches_distributed_group_sampler(world_size, batch_size):
    data = SeqData(flag=ASPECT_FLAG)
    for epoch in (0, 1, 2):
        seen = []
        for rank in range(world_size):
            sampler = GroupSampler(data, batch_size=batch_size, seed=11, world_size=world_size,
                                   rank=rank)
            sampler.set_epoch(epoch)
            order = list(sampler)
            assert order == reference_group_order(ASPECT_FLAG, batch_size, world_size, rank,
                                                  11, epoch)
            assert len(order) == len(sampler) and len(order) % batch_size == 0
            for start in range(0, len(order), batch_size):  # every batch is one group
                assert len(set(ASPECT_FLAG[order[start:start + batch_size]])) == 1
            seen += order
        assert set(seen) == set(range(len(data)))  # every sample at least once per epoch
        multiple = batch_size * world_size
        for value, size in zip(*np.unique(ASPECT_FLAG, return_counts=True)):
            assert sum(ASPECT_FLAG[seen] == value) == -(-size // multiple) * multiple


def test_group_sampler_epochs_seed_and_resume():
    data = SeqData(flag=ASPECT_FLAG)
    sampler = GroupSampler(data, batch_size=2, seed=5, world_size=2, rank=1)
    epoch0 = list(sampler)
    assert list(sampler) == epoch0
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0
    assert list(GroupSampler(data, batch_size=2, seed=6, world_size=2, rank=1)) != epoch0
    sampler.fast_forward(4)
    assert list(sampler) == epoch1[4:]
    assert list(sampler) == epoch1  # one-shot
    state = sampler.state_dict(num_samples=6)
    other = GroupSampler(data, batch_size=2, seed=0, world_size=2, rank=1)
    other.load_state_dict(state)
    assert other.seed == 5 and other.epoch == 1
    assert list(other) == epoch1[6:]
    with pytest.raises(ValueError, match='batch_size'):
        GroupSampler(data, batch_size=4, seed=0, world_size=2, rank=1).load_state_dict(state)
    with pytest.raises(ValueError, match='num_samples'):
        sampler.fast_forward(len(sampler) + 1)


def test_group_sampler_needs_batch_size_and_flag():
    with pytest.raises(ValueError, match='batch_size'):
        GroupSampler(SeqData(), seed=0)
    with pytest.raises(AttributeError, match='flag'):
        GroupSampler(list(range(5)), batch_size=2, seed=0)
    with pytest.raises(ValueError, match='integers'):
        GroupSampler(SeqData(flag=np.array([0.5, 1.0])), batch_size=1, seed=0)


def test_build_dataloader_group_in_batch_sampler():
    data = SeqData()
    loader = Runner.build_dataloader(
        dict(dataset=data, sampler=dict(type='DefaultSampler', shuffle=False),
             batch_sampler=dict(type='turbox_mm.GroupInBatchSampler', sequences_split_num=2),
             batch_size=2, num_workers=2, persistent_workers=True, collate_fn=list), seed=7)
    sampler = loader.batch_sampler
    assert isinstance(sampler, GroupInBatchSampler)
    assert sampler.seed == 7 and sampler.batch_size == 2 and sampler.sequences_split_num == 2
    assert hasattr(sampler.sampler, 'set_epoch')  # what DistSamplerSeedHook reaches for
    assert len(loader) == sampler.epoch_length
    expected = take(gib(data, seed=7, batch_size=2, sequences_split_num=2), 30)
    got = take(loader, 30)  # the dicts travel to the workers and reach __getitem__
    assert got == [[(item['idx'], item['aug_seed']) for item in b] for b in expected]


def test_build_dataloader_group_sampler_one_group_per_batch():
    data = SeqData(flag=ASPECT_FLAG)
    loader = Runner.build_dataloader(
        dict(dataset=data, sampler=dict(type='turbox_mm.GroupSampler', batch_size=3),
             batch_size=3, num_workers=0), seed=1)
    assert isinstance(loader.sampler, GroupSampler)
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader) == len(loader.sampler) // 3
        assert all(len(set(ASPECT_FLAG[b])) == 1 for b in batches)
        assert set(itertools.chain(*batches)) == set(range(len(data)))


# --------------------------------------------------------------------------------------------
# SequenceSampler (evaluation of temporal models)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize('world_size', [1, 2, 3, 4, 7])
def test_sequence_sampler_gives_whole_sequences_in_order_once(world_size):
    from turbox_mm.datasets.samplers import SequenceSampler
    data = SeqData(lengths=(5, 3, 8, 2, 6, 4, 7))
    parts = [list(SequenceSampler(data, rank=r, world_size=world_size))
             for r in range(world_size)]
    assert [i for part in parts for i in part] == list(range(len(data)))  # once, in order
    assert [len(SequenceSampler(data, rank=r, world_size=world_size))
            for r in range(world_size)] == [len(p) for p in parts]
    for part in parts:  # whole sequences: no sequence straddles two ranks
        if part:
            assert part[0] == 0 or data.flag[part[0]] != data.flag[part[0] - 1]
            assert part[-1] == len(data) - 1 or data.flag[part[-1]] != data.flag[part[-1] + 1]
    if world_size > 1:  # balanced to about half a sequence around N / W
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 8, sizes


def test_sequence_blocks_balance_and_too_few_sequences():
    from turbox_mm.datasets.samplers import sequence_blocks
    flag = np.repeat(np.arange(8), 10)
    assert sequence_blocks(flag, 4).tolist() == [0, 20, 40, 60, 80]
    assert sequence_blocks(np.array([3, 3, 9, 9, 9]), 4).tolist() == [0, 2, 2, 2, 5]
    assert sequence_blocks(np.array([1, 1, 2, 1]), 3).tolist() == [0, 2, 3, 4]  # runs count


def test_sequence_sampler_bad_arguments():
    from turbox_mm.datasets.samplers import SequenceSampler
    with pytest.raises(ValueError, match='rank 2 is not below world_size 2'):
        SequenceSampler(SeqData(), rank=2, world_size=2)
    with pytest.raises(ValueError, match='world_size must be an integer >= 1'):
        SequenceSampler(SeqData(), rank=0, world_size=0)
    with pytest.raises(AttributeError, match='flag'):
        SequenceSampler(list(range(4)))
