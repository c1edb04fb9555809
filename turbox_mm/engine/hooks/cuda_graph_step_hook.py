"""Mark each iteration's start for the CUDA graphs of ``torch.compile``'s graph-replaying modes."""
from typing import Optional, Sequence, Union

import torch
from mmengine.hooks import Hook

from turbox_mm.registry import HOOKS

DataBatch = Optional[Union[dict, tuple, list, Sequence]]  # as mmengine's hooks take it


@HOOKS.register_module()
class CudaGraphStepHook(Hook):
    """Mark every training, validation and test iteration's start for CUDA graph trees.

    Under ``compile.mode='reduce-overhead'`` (or ``'max-autotune'``) Inductor replays each
    compiled region as a CUDA graph whose outputs live in a shared memory pool. It must know
    where one step ends and the next begins: the outputs of a step stay valid until the next
    step starts, then the pool is reused. Without marks Inductor infers training steps from
    the backward pass, but validation and test steps run no backward, so a later region of
    the same step could overwrite an earlier region's outputs that are still in use. The
    hook calls ``torch.compiler.cudagraph_mark_step_begin()`` before each iteration of every
    loop. After the first mark Inductor goes by marks alone for the rest of the process: a
    compiled model driven outside these loops (a hand-written loop, a second runner) must
    mark its own steps.

    What a model keeps across steps (an instance bank's cache, a previous frame's BEV) must
    be copied out of the pool. turbox's temporal models do, where ``compile.modules='auto'``
    compiles them (their caches clone, or are computed by methods compiled without CUDA
    graphs; a module compiled whole around them gets a warning). A model of another origin
    that keeps a compiled region's output across iterations may read overwritten memory:
    Inductor raises where it can tell ("accessing tensor output of CUDAGraphs that has been
    overwritten").

    :class:`~turbox_mm.engine.runner.TurboxRunner` registers it where ``turbox.compile``
    compiled something in such a mode (not a second time where the config lists one). Priority
    ``VERY_HIGH``: the mark comes before other hooks' per-iteration work.
    """

    priority = 'VERY_HIGH'

    def __init__(self) -> None:
        self.marks = 0  # steps marked in this process

    def _mark(self) -> None:
        torch.compiler.cudagraph_mark_step_begin()
        self.marks += 1

    def before_train_iter(self, runner, batch_idx: int, data_batch: DataBatch = None) -> None:
        self._mark()

    def before_val_iter(self, runner, batch_idx: int, data_batch: DataBatch = None) -> None:
        self._mark()

    def before_test_iter(self, runner, batch_idx: int, data_batch: DataBatch = None) -> None:
        self._mark()
