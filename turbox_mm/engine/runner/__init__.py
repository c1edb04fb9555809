"""Runners and loops."""
from .build import build_runner
from .turbox_options import TURBOX_OPTIONS, apply_turbox_options
from .turbox_runner import TurboxRunner

__all__ = ['build_runner', 'TurboxRunner', 'TURBOX_OPTIONS', 'apply_turbox_options']
