"""``TurboxRuntimeInfoHook``: mmengine's ``RuntimeInfoHook`` without a host sync per iteration.

mmengine's hook writes each training output (the loss and every loss term) into the message
hub after every iteration with ``update_scalar``, which reads each tensor with ``.item()``: one
host-device synchronisation per value and iteration, about 45 a Sparse4D step. This hook
sends them through :class:`~turbox_mm.engine.async_scalars.AsyncScalars` instead: copied
asynchronously, pushed once they reach the host, and all of them pushed (one wait) on the
iterations where ``LoggerHook`` reads them, before a checkpoint saves the message hub, before
validation and at the end of each epoch and of training. The logged numbers are the stock
ones (``tests/test_runtime_info_hook.py``).
"""
from typing import Optional

from mmengine.hooks import LoggerHook, RuntimeInfoHook
from mmengine.utils import apply_to

from turbox_mm.engine.async_scalars import AsyncScalars
from turbox_mm.registry import HOOKS


@HOOKS.register_module()
class TurboxRuntimeInfoHook(RuntimeInfoHook):
    """``RuntimeInfoHook`` whose per-iteration outputs reach the message hub asynchronously.

    Priority VERY_HIGH, as mmengine's: it runs before ``LoggerHook`` (BELOW_NORMAL) in every
    stage, so the logger always reads complete windows.

    Args:
        interval (int, optional): Iterations between logs; None (the default) takes the
            interval of the runner's ``LoggerHook``, or 10 without one.
        capacity (int, optional): Iterations whose values may be in flight before the host
            waits for the oldest. Defaults to twice the interval (at least 16).
    """

    priority = 'VERY_HIGH'

    def __init__(self, interval: Optional[int] = None, capacity: Optional[int] = None) -> None:
        for name, value in (('interval', interval), ('capacity', capacity)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise ValueError(f'TurboxRuntimeInfoHook: {name} must be a positive int or '
                                 f'None, got {value!r}')
        self.interval = interval
        self.capacity = capacity
        self._scalars: Optional[AsyncScalars] = None

    def before_train(self, runner) -> None:
        super().before_train(runner)
        if self.interval is None:
            loggers = [h for h in runner.hooks if isinstance(h, LoggerHook)]
            self.interval = loggers[0].interval if loggers else 10
        capacity = self.capacity or max(2 * self.interval, 16)
        self._scalars = AsyncScalars(runner.message_hub, capacity)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs: Optional[dict] = None) -> None:
        """Queue ``outputs`` for the message hub; deliver everything on logging iterations."""
        if outputs is not None:
            if self._scalars is None:  # called without before_train (a hand-driven loop)
                self.before_train(runner)
            self._scalars.push({f'train/{key}': value for key, value in outputs.items()})
        if self._scalars is not None and (
                self.every_n_inner_iters(batch_idx, self.interval)
                or self.end_of_epoch(runner.train_dataloader, batch_idx)):
            self._scalars.flush()

    def flush(self) -> None:
        """Push every value still in flight (waits for them)."""
        if self._scalars is not None:
            self._scalars.flush()

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        # The checkpoint holds the message hub: it must hold every value logged so far. The
        # runner builds the hub's state before this stage, so refresh it here.
        if self._scalars is not None and self._scalars.num_pending:
            self._scalars.flush()
            if 'message_hub' in checkpoint:  # as Runner.save_checkpoint stores it
                checkpoint['message_hub'] = apply_to(runner.message_hub.state_dict(),
                                                     lambda x: hasattr(x, 'cpu'),
                                                     lambda x: x.cpu())

    def after_train_epoch(self, runner) -> None:
        self.flush()
        super().after_train_epoch(runner)

    def before_val(self, runner) -> None:
        self.flush()
        super().before_val(runner)

    def after_train(self, runner) -> None:
        self.flush()
        super().after_train(runner)
