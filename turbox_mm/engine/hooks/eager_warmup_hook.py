"""The first training iterations of a process run eagerly, not through ``torch.compile``."""
from typing import Optional

import torch
from mmengine.hooks import Hook

from turbox_mm.registry import HOOKS


@HOOKS.register_module()
class EagerWarmupHook(Hook):
    """Run the first ``iters`` training iterations of this process with Dynamo's stance
    ``force_eager``: compiled modules run their eager code there, and nothing is compiled.

    A temporal model's first iteration is unlike every later one: its instance caches are
    empty, so its heads see shapes, strides and ``requires_grad`` flags that never recur
    (Sparse4D's and SparseDrive's instance banks, SparseDrive's motion queue). Compiling those
    graphs costs warm-up time for code that runs once: on the tiny SparseDrive stage-2 model
    over five frames, 41 graphs are compiled when the first iteration is compiled too, 32
    when it runs eagerly (``tests/test_eager_warmup_hook.py``). For a model without such
    state the hook only moves the compilation one iteration later. The results are the same
    either way: compiled code computes what the eager code computes.

    :class:`~turbox_mm.engine.runner.TurboxRunner` registers it where ``turbox.compile``
    compiled something and ``turbox.compile.eager_iters`` > 0 (not a second time where the
    config lists one already). The stance is process-wide and held from each of those
    iterations' ``before_train_iter`` to its ``after_train_iter`` (the hook runs first in both,
    priority ``VERY_HIGH``), so a validation or checkpoint between them runs as usual; the
    previous stance comes back after each iteration, after training, or, through
    :meth:`restore`, when the loop fails. Iterations are counted in this process, so a resumed
    run's first iterations are eager again (its caches start empty too).
    Needs ``torch.compiler.set_stance`` (torch 2.6 or later); the runner does not register
    the hook on an older torch.

    Args:
        iters (int): Training iterations to run eagerly. Defaults to 1.

    Raises:
        ValueError: ``iters`` is not an int >= 0.
    """

    priority = 'VERY_HIGH'

    def __init__(self, iters: int = 1) -> None:
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
            raise ValueError(f'EagerWarmupHook: iters must be an int >= 0, got {iters!r}')
        self.iters = iters
        self.done = 0  # eager iterations finished
        self._stance = None  # the set_stance object that restores the previous stance

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if self.done < self.iters and self._stance is None:
            self._stance = torch.compiler.set_stance('force_eager')

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs: Optional[dict] = None) -> None:
        if self._stance is not None:
            self.done += 1
            self.restore()

    def after_train(self, runner) -> None:
        self.restore()

    def restore(self) -> None:
        """Give back the stance that was set before (a no-op where none is held)."""
        if self._stance is not None:
            stance, self._stance = self._stance, None
            stance.__exit__(None, None, None)
