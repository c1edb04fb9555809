"""Dense heads: mmdet3d's heads with batched, host-sync-free training targets."""
from .turbox_center_head import TurboxCenterHead

__all__ = ['TurboxCenterHead']
