"""Components for smoke runs: a deterministic dataset, a small model and its metric.

They exercise the training machinery (runner, loops, hooks, optimizers, checkpoints) on any
machine in seconds, without data on disk. ``configs/smoke/`` uses them.
"""
from .smoke_dataset import SmokeDataset
from .smoke_metric import SmokeMetric
from .smoke_model import SmokeModel

__all__ = ['SmokeDataset', 'SmokeModel', 'SmokeMetric']
