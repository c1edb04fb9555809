"""Optimisation: fused optimizer constructor and sync-free clipping wrappers."""
from .fused_optim_wrapper_constructor import TurboxOptimWrapperConstructor
from .merged_adam import TurboxAdam, TurboxAdamW
from .sync_free_optim_wrapper import TurboxAmpOptimWrapper, TurboxOptimWrapper

__all__ = ['TurboxOptimWrapperConstructor', 'TurboxOptimWrapper', 'TurboxAmpOptimWrapper',
           'TurboxAdam', 'TurboxAdamW']
