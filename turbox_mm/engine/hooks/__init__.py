"""Hooks (one a file) and the averaged model of the graph EMA."""
from .ema_hook import TurboxEMAHook
from .graph_ema import GraphExponentialMovingAverage

__all__ = ['TurboxEMAHook', 'GraphExponentialMovingAverage']
