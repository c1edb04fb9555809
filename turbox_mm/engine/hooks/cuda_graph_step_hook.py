"""Mark each iteration's start for the CUDA graphs of ``torch.compile``'s graph-replaying modes."""
from typing import Optional

import torch
from mmengine.hooks import Hook

from turbox_mm.registry import HOOKS


@HOOKS.register_module()
class CudaGraphStepHook(Hook):
    """Call ``torch.compiler.cudagraph_mark_step_begin()`` before every training, validation
    and test iteration.

    Under ``compile.mode='reduce-overhead'`` (or ``'max-autotune'``) Inductor replays each
    compiled region as a CUDA graph whose outputs live in a shared memory pool. It must know
    where one step ends and the next begins: the outputs of a step stay valid until the next
    step starts, then the pool is reused. Training steps are inferred by Inductor from the
    backward pass, but validation and test steps run no backward; without a mark, a later
    region of the same step can overwrite an earlier region's outputs that are still in use.
    The mark makes every loop's step boundary explicit.

    What a model keeps across steps (an instance bank's cache, a previous frame's BEV) must
    be copied out of the pool; turbox's temporal models do (their caches clone, or are
    computed by methods compiled without CUDA graphs). A model of another origin that keeps a
    compiled region's output across iterations may read overwritten memory: Inductor raises
    where it can tell ("accessing tensor output of CUDAGraphs that has been overwritten").

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

    def before_train_iter(self, runner, batch_idx: int, data_batch: Optional[dict] = None) -> None:
        self._mark()

    def before_val_iter(self, runner, batch_idx: int, data_batch: Optional[dict] = None) -> None:
        self._mark()

    def before_test_iter(self, runner, batch_idx: int, data_batch: Optional[dict] = None) -> None:
        self._mark()
