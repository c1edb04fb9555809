"""Hooks (one a file) and the averaged model of the graph EMA."""
from .checkpoint_hook import TurboxCheckpointHook
from .cpu_affinity_hook import CPUAffinityHook
from .cuda_graph_step_hook import CudaGraphStepHook
from .eager_warmup_hook import EagerWarmupHook
from .ema_hook import TurboxEMAHook
from .gc_hook import GCHook
from .graph_ema import GraphExponentialMovingAverage
from .runtime_info_hook import TurboxRuntimeInfoHook

__all__ = ['CPUAffinityHook', 'CudaGraphStepHook', 'EagerWarmupHook', 'GCHook', 'TurboxEMAHook',
           'GraphExponentialMovingAverage', 'TurboxRuntimeInfoHook', 'TurboxCheckpointHook']
