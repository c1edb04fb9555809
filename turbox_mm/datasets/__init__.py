"""Datasets, samplers and transforms."""
from . import samplers, transforms  # noqa: F401
from .sparse4d_dataset import SPARSE4D_CLASSES, Sparse4DNuScenesDataset
from .sparsedrive_dataset import SparseDriveNuScenesDataset

__all__ = ['SPARSE4D_CLASSES', 'Sparse4DNuScenesDataset', 'SparseDriveNuScenesDataset']
