"""Losses of mmdet, computed without host syncs (the same values)."""
from .focal_loss import focal_loss_like_mmdet
from .per_layer import layer_means, reduces_by_mean

__all__ = ['focal_loss_like_mmdet', 'layer_means', 'reduces_by_mean']
