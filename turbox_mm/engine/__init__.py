"""Training-engine components: runner, loops, hooks, optimisation."""
from . import hooks, loops, optim, runner  # noqa: F401
from .runner import TurboxRunner

__all__ = ['TurboxRunner']
