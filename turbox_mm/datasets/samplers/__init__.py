"""Data samplers (sequence- and group-aware, cyclic)."""
from .cyclic_batch_sampler import CyclicBatchSampler
from .group_in_batch_sampler import GroupInBatchSampler
from .group_sampler import GroupSampler
from .sequence_sampler import SequenceSampler, sequence_blocks

__all__ = [
    'CyclicBatchSampler', 'GroupInBatchSampler', 'GroupSampler', 'SequenceSampler',
    'sequence_blocks'
]
