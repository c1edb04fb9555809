"""Runners and loops."""
from .turbox_options import TURBOX_OPTIONS, apply_turbox_options
from .turbox_runner import TurboxRunner

__all__ = ['TurboxRunner', 'TURBOX_OPTIONS', 'apply_turbox_options']
