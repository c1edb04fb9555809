"""Layers shared across models."""
from .dynamic_scatter import TurboxDynamicScatter
from .sdpa_attention import MultiheadSDPAttention
from .sync_batchnorm import TurboxSyncBatchNorm, convert_sync_batchnorm
from .voxelization import TurboxVoxelization

__all__ = [
    'TurboxSyncBatchNorm', 'convert_sync_batchnorm', 'TurboxVoxelization', 'TurboxDynamicScatter',
    'MultiheadSDPAttention'
]
