"""Python garbage collection on a schedule instead of at random points of a training step."""
import collections
import gc
import logging
import os
import statistics
import time
from typing import Deque, NamedTuple, Optional, Union

from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.logging import print_log

from turbox_mm.registry import HOOKS

GENERATIONS = (0, 1, 2)
_PAGE = os.sysconf('SC_PAGE_SIZE') if hasattr(os, 'sysconf') else 4096
# Set while a GCHook has automatic collection switched off in this process. A process forked
# meanwhile (a loader worker) inherits the switched-off state; it switches it back on.
_state = {'disabled_by_hook': False}


def _reenable_in_child() -> None:
    if _state['disabled_by_hook']:
        _state['disabled_by_hook'] = False
        gc.enable()


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_reenable_in_child)


def rss_bytes() -> Optional[int]:
    """Resident memory of this process in bytes (``/proc/self/statm``, else psutil), or None."""
    try:
        with open('/proc/self/statm', 'rb') as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except Exception:  # noqa: BLE001  (psutil missing or refused)
        return None


class Pause(NamedTuple):
    """One collection made by :class:`GCHook`."""
    mode: str  # 'train', 'val' or 'test'
    index: int  # iteration (train) or batch index (val/test) after which it ran
    reason: str  # 'scheduled', 'rss' or 'end'
    ms: float
    collected: int  # unreachable objects found


@HOOKS.register_module()
class GCHook(Hook):
    """Freeze the built heap, switch automatic GC off, and collect at fixed iterations.

    Python's automatic collector runs whenever allocations outnumber deallocations by a
    threshold, that is at a random point of a step and, across ranks of a distributed run, at
    different steps: each rank's pause then stalls all the others at the next collective. A
    full collection also walks every tracked object, including a dataset's millions of info
    dicts, which can take seconds.

    * ``before_train`` (all models, datasets and loaders exist): one full collection, then
      ``gc.freeze()`` (what exists now moves to a permanent generation no collection walks,
      so loader workers forked later do not dirty those pages when they collect) and
      ``gc.disable()``. Workers forked while collection is off switch it back on.
    * ``after_train_iter``: ``gc.collect(generation)`` after every ``interval``-th iteration.
      It is counted on ``runner.iter``, so every rank collects after the same iteration and
      the ranks pause together.
    * A guard against the known failure of switching GC off, reference cycles piling up between
      collections: every ``check_interval`` iterations the resident memory (``/proc/self/statm``,
      a few microseconds) is compared with its value after the last collection; past
      ``rss_growth_mb`` the hook collects at once. One rank collecting alone is a straggler, so
      with ``sync_guard`` the ranks all-reduce the decision (max) at these checks, which fall on
      the same iterations everywhere, and collect together; this costs one tiny collective
      every ``check_interval`` iterations. Without it the rank collects alone and says so.
    * Validation and test loops (also when run on their own): collections after every
      ``interval``-th batch, the guard without the collective, and one collection when the loop
      ends, since its outputs have just been dropped.
    * ``after_train`` (or the end of a stand-alone validation/test): ``gc.unfreeze()`` and
      automatic GC back on as it was.

    Pause times: the scalar ``train/gc_time`` (seconds spent collecting in the iteration, 0 in
    most) goes to the message hub each iteration, so the logger's window mean is the amortised
    cost per iteration; each guard collection is logged as a warning; a summary (count,
    median, max, total) is logged when a loop ends, and :attr:`pauses` keeps the last 10000.

    Priority ``'LOWEST'``: the freeze should come after other hooks' ``before_train`` has built
    what they build, and a collection after the iteration's logging and checkpointing, whose
    garbage it then includes. Its pause lands in the next iteration's ``data_time``.

    Args:
        interval (int): Iterations between scheduled collections. Defaults to 100.
        generation (int): Generation collected (0, 1 or 2). Objects surviving a collection of
            a younger generation move up and, with automatic GC off, are only reclaimed by a
            full collection, so keep 2 unless measured otherwise. Defaults to 2.
        rss_growth_mb (float, optional): Growth of resident memory since the last collection
            that triggers an early one; None switches the guard off. Defaults to 2048.
        check_interval (int): Iterations between memory checks. Defaults to 10.
        sync_guard (bool): All-reduce the guard's decision in distributed runs so ranks collect
            together. Defaults to True.
        freeze (bool): ``gc.freeze()`` the heap built before training. Defaults to True.

    Examples:
        >>> custom_hooks = [dict(type='turbox_mm.GCHook', interval=100)]
        >>> hook = GCHook(interval=50, rss_growth_mb=None)
        >>> hook.priority
        'LOWEST'
    """

    priority = 'LOWEST'

    def __init__(self,
                 interval: int = 100,
                 generation: int = 2,
                 rss_growth_mb: Optional[Union[int, float]] = 2048,
                 check_interval: int = 10,
                 sync_guard: bool = True,
                 freeze: bool = True):
        for name, value in (('interval', interval), ('check_interval', check_interval)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f'GCHook: {name} must be an int >= 1, got {value!r}')
        if generation not in GENERATIONS or isinstance(generation, bool):
            raise ValueError(f'GCHook: generation is {generation!r}; valid values: '
                             f"{', '.join(map(str, GENERATIONS))}")
        if rss_growth_mb is not None and (isinstance(rss_growth_mb, bool)
                                          or not isinstance(rss_growth_mb, (int, float))
                                          or rss_growth_mb <= 0):
            raise ValueError(f'GCHook: rss_growth_mb must be None (no guard) or a number > 0, '
                             f'got {rss_growth_mb!r}')
        self.interval = interval
        self.generation = generation
        self.rss_growth = None if rss_growth_mb is None else int(rss_growth_mb * 2**20)
        self.check_interval = check_interval
        self.sync_guard = sync_guard
        self.freeze = freeze
        self.pauses: Deque[Pause] = collections.deque(maxlen=10000)
        self._owner: Optional[str] = None  # the loop that switched GC off
        self._was_enabled = True
        self._baseline: Optional[int] = None
        self._guard_ok = rss_growth_mb is not None
        self._unreported: list = []

    # -- life cycle ------------------------------------------------------------------------

    def before_train(self, runner) -> None:
        """Freeze the built heap and switch automatic collection off."""
        self._activate(runner, 'train')

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        """Collect after every ``interval``-th iteration, or when the guard fires."""
        seconds = self._step(runner, 'train', runner.iter + 1, sync=self.sync_guard)
        runner.message_hub.update_scalar('train/gc_time', seconds, resumed=False)

    def after_train(self, runner) -> None:
        """Log the pauses and restore automatic collection."""
        self._deactivate(runner, 'train')

    def before_val(self, runner) -> None:
        """Switch GC off for a stand-alone validation (during training it already is)."""
        self._activate(runner, 'val')

    def after_val_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        """Scheduled collections and the (local) guard during validation."""
        self._step(runner, 'val', batch_idx + 1, sync=False)

    def after_val(self, runner) -> None:
        """Collect the validation's garbage; restore GC if the validation switched it off."""
        self._end_loop(runner, 'val')

    def before_test(self, runner) -> None:
        """Switch GC off for a test run."""
        self._activate(runner, 'test')

    def after_test_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        """Scheduled collections and the (local) guard during testing."""
        self._step(runner, 'test', batch_idx + 1, sync=False)

    def after_test(self, runner) -> None:
        """Collect the test's garbage; restore GC if the test switched it off."""
        self._end_loop(runner, 'test')

    def after_run(self, runner) -> None:
        """Restore automatic collection whatever loop left it off."""
        if self._owner is not None:
            self._deactivate(runner, self._owner)

    # -- work --------------------------------------------------------------------------------

    def _activate(self, runner, mode: str) -> None:
        if self._owner is not None:
            return
        self._owner = mode
        self._was_enabled = gc.isenabled()
        start = time.perf_counter()
        collected = gc.collect()
        if self.freeze:
            gc.freeze()
        gc.disable()
        _state['disabled_by_hook'] = True
        self._baseline = rss_bytes()
        if self._guard_ok and self._baseline is None:
            self._guard_ok = False
            print_log('GCHook: resident memory cannot be read here (no /proc/self/statm, no '
                      'psutil); the memory guard is off, scheduled collections go on',
                      logger='current', level=logging.WARNING)
        frozen = f', {gc.get_freeze_count()} objects frozen' if self.freeze else ''
        first_ms = 1e3 * (time.perf_counter() - start)
        print_log(f'GCHook: automatic GC off for {mode}{frozen}; collecting generation '
                  f'{self.generation} every {self.interval} iterations{self._guard_text()} '
                  f'(first collection {first_ms:.0f} ms, {collected} objects)',
                  logger=runner.logger)

    def _guard_text(self) -> str:
        if not self._guard_ok:
            return ''
        return (f', and early when resident memory grows by {self.rss_growth / 2**20:g} MB '
                f'(checked every {self.check_interval})')

    def _deactivate(self, runner, mode: str) -> None:
        if self._owner != mode:
            return
        self._owner = None
        if self.freeze:
            gc.unfreeze()
        _state['disabled_by_hook'] = False
        if self._was_enabled:
            gc.enable()
        self._log_summary(runner, mode)

    def _end_loop(self, runner, mode: str) -> None:
        if self._owner is None:
            return
        self._collect(mode, -1, 'end', log=False)
        if self._owner == mode:
            self._deactivate(runner, mode)
        else:
            self._log_summary(runner, mode)

    def _step(self, runner, mode: str, count: int, sync: bool) -> float:
        """Collect if ``count`` completed iterations call for it; return the pause in s."""
        if self._owner is None:
            return 0.0
        if count % self.interval == 0:
            return self._collect(mode, count, 'scheduled') / 1e3
        if self.rss_growth is None or count % self.check_interval:
            return 0.0
        # Every rank with this config reaches the collective below at the same iterations,
        # even one whose memory cannot be read, so that none waits forever.
        rss = rss_bytes() if self._guard_ok else None
        fire = rss is not None and self._baseline is not None and \
            rss - self._baseline > self.rss_growth
        if sync:
            fire = self._any_rank(fire)
        if not fire:
            return 0.0
        grown = (rss - self._baseline) / 2**20 if rss is not None and self._baseline else 0.0
        ms = self._collect(mode, count, 'rss')
        alone = '' if sync else ' (this rank alone: others wait for it at the next collective)'
        print_log(f'GCHook: rank {get_rank()} resident memory grew {grown:.0f} MB since the '
                  f'last collection; collected early after {mode} iteration {count}{alone}: '
                  f'{ms:.1f} ms', logger=runner.logger, level=logging.WARNING)
        return ms / 1e3

    @staticmethod
    def _any_rank(flag: bool) -> bool:
        from mmengine.dist import all_reduce, is_distributed
        if not is_distributed():
            return flag
        import torch
        tensor = torch.tensor([int(flag)], dtype=torch.int32)
        all_reduce(tensor, op='max')
        return bool(tensor.item())

    def _collect(self, mode: str, index: int, reason: str, log: bool = True) -> float:
        start = time.perf_counter()
        collected = gc.collect(self.generation if reason != 'end' else 2)
        ms = (time.perf_counter() - start) * 1e3
        self._baseline = rss_bytes()
        pause = Pause(mode, index, reason, ms, collected)
        self.pauses.append(pause)
        self._unreported.append(pause)
        if log:
            print_log(f'GCHook: {mode} iteration {index}: {reason} collection of generation '
                      f'{self.generation}, {collected} objects, {ms:.1f} ms', logger='current',
                      level=logging.DEBUG)
        return ms

    def _log_summary(self, runner, mode: str) -> None:
        pauses = [p for p in self._unreported if p.mode == mode]
        self._unreported = [p for p in self._unreported if p.mode != mode]
        if not pauses:
            return
        ms = [p.ms for p in pauses]
        early = sum(p.reason == 'rss' for p in pauses)
        print_log(f'GCHook: {mode}: {len(ms)} collections ({early} early), pause median '
                  f'{statistics.median(ms):.1f} ms, max {max(ms):.1f} ms, total '
                  f'{sum(ms) / 1e3:.2f} s, {sum(p.collected for p in pauses)} objects freed',
                  logger=runner.logger)
