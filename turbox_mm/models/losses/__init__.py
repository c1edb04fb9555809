"""Losses of mmdet, computed without host syncs (the same values)."""
from .focal_loss import focal_loss_like_mmdet
from .per_layer import check_layer_blocks, layer_means, reduces_by_mean

__all__ = ['check_layer_blocks', 'focal_loss_like_mmdet', 'layer_means', 'reduces_by_mean']
