"""Layers shared across models."""
from .sync_batchnorm import TurboxSyncBatchNorm, convert_sync_batchnorm

__all__ = ['TurboxSyncBatchNorm', 'convert_sync_batchnorm']
