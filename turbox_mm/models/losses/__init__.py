"""Losses of mmdet, computed without host syncs (the same values)."""
from .focal_loss import focal_loss_like_mmdet

__all__ = ['focal_loss_like_mmdet']
