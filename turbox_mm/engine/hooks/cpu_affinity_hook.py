"""Pin the main process and the loader workers of each local rank to disjoint cores."""
import os
from typing import List, Optional

from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.runner import BaseLoop

from turbox_mm.registry import HOOKS
from turbox_mm.utils.affinity import (NUMA_MODES, RankLayout, current_plan, export_inputs,
                                      format_cpulist, format_plan, pin_process,
                                      running_worker_pids, wrap_worker_init)

_LOOPS = ('_train_loop', '_val_loop', '_test_loop')


@HOOKS.register_module()
class CPUAffinityHook(Hook):
    """Pin each local rank's main process and loader workers to their own cores.

    The layout comes from :func:`turbox_mm.utils.affinity.plan_affinity`: the CPUs allowed to
    the process (cpuset), cut to the cgroup's CPU quota, split into disjoint shares per local
    rank (``LOCAL_RANK``/``LOCAL_WORLD_SIZE``), preferring the NUMA node of the rank's GPU;
    within a share the main process gets ``main_cores`` cores and each worker of the training
    loader its own slice. The layout of every local rank is logged once.

    In ``before_run`` the hook

    * exports the allowed CPUs (``TURBOX_CPU_ALLOWED``), so that workers and later plans start
      from the set as it was before pinning;
    * pins every thread of the main process, and lowers torch's intra-op threads to the main
      process's core count (more threads than cores only oversubscribe them; a lower setting,
      such as ``OMP_NUM_THREADS=1``, is kept);
    * for each dataloader of the runner's built loops, wraps its ``worker_init_fn`` with
      :class:`~turbox_mm.utils.affinity.AffinityWorkerInit`: mmengine's seeding function runs
      first, unchanged, then the worker pins itself and limits torch to one thread (OpenCV's
      threads come from ``env_cfg.mp_cfg.opencv_num_threads`` in the parent); workers that
      already run (an ``IterBasedTrainLoop`` starts them while it is built, before
      any hook runs) are pinned from here by pid.

    ``after_run`` gives the main process its original CPUs and thread count back. Where
    pinning is refused (no permission, unsupported platform) a warning is printed once and the
    run goes on unpinned.

    Priority ``'VERY_HIGH'``: the pinning should precede other hooks' ``before_run`` work, so that
    threads they start inherit the mask and memory they first touch lands on the rank's NUMA
    node.

    Args:
        main_cores (int, optional): Cores of each main process. Defaults to None (an equal
            share with the workers, at least one).
        pin_workers (bool): Pin loader workers too. Defaults to True.
        set_num_threads (bool): Lower ``torch.set_num_threads`` to the main process's cores.
            Defaults to True.
        numa (str): ``'auto'`` uses NUMA nodes and the GPUs' nodes where known; ``'ignore'``
            treats the machine as one node. Defaults to ``'auto'``.

    Examples:
        >>> custom_hooks = [dict(type='turbox_mm.CPUAffinityHook')]
        >>> hook = CPUAffinityHook(main_cores=2)
        >>> hook.priority
        'VERY_HIGH'
    """

    priority = 'VERY_HIGH'

    def __init__(self,
                 main_cores: Optional[int] = None,
                 pin_workers: bool = True,
                 set_num_threads: bool = True,
                 numa: str = 'auto'):
        if main_cores is not None and (isinstance(main_cores, bool)
                                       or not isinstance(main_cores, int) or main_cores < 1):
            raise ValueError(f'CPUAffinityHook: main_cores must be None (automatic) or an int '
                             f'>= 1, got {main_cores!r}')
        if numa not in NUMA_MODES:
            raise ValueError(f"CPUAffinityHook: numa is {numa!r}; valid values: "
                             f"{', '.join(map(repr, NUMA_MODES))}")
        self.main_cores = main_cores
        self.pin_workers = pin_workers
        self.set_num_threads = set_num_threads
        self.numa = numa
        self.layout: Optional[RankLayout] = None
        self._original: Optional[set] = None
        self._threads: Optional[int] = None
        self._reported = False

    def before_run(self, runner) -> None:
        """Pin the main process and arrange for the workers to be pinned."""
        loaders = self._dataloaders(runner)
        train = next((dl for name, dl in loaders if name == '_train_loop'), None)
        workers = getattr(train, 'num_workers', 0) if train is not None else 0
        if workers == 0 and loaders:
            workers = max(getattr(dl, 'num_workers', 0) for _, dl in loaders)
        layouts, inputs = current_plan(workers, self.main_cores, self.numa)
        layout = layouts[inputs['local_rank'] % len(layouts)]
        if not self._reported:
            report = format_plan(layouts, inputs['allowed'], inputs['cpu_limit'])
            print_log(f'CPUAffinityHook: {report}', logger=runner.logger)
            self._reported = True
        export_inputs(inputs)
        if hasattr(os, 'sched_getaffinity'):
            self._original = os.sched_getaffinity(0)
        if not pin_process(layout.main):
            return
        self.layout = layout
        if self.set_num_threads:
            import torch
            if torch.get_num_threads() > len(layout.main):
                self._threads = torch.get_num_threads()
                torch.set_num_threads(len(layout.main))
        if not self.pin_workers:
            return
        for name, loader in loaders:
            if getattr(loader, 'num_workers', 0) == 0:
                continue
            cores = self._worker_cores(loader.num_workers, layout, layouts, inputs)
            wrap_worker_init(loader, cores)
            loop = getattr(runner, name)
            iterator = getattr(getattr(loop, 'dataloader_iterator', None), '_iterator', None)
            for index, pid in enumerate(running_worker_pids(loader, iterator)):
                pin_process(cores[index % len(cores)], pid)

    def after_run(self, runner) -> None:
        """Give the main process its original CPUs and intra-op thread count back."""
        if self.layout is not None and self._original:
            pin_process(self._original)
        if self._threads is not None:
            import torch
            torch.set_num_threads(self._threads)
            self._threads = None
        self.layout = None

    def _worker_cores(self, num_workers: int, layout: RankLayout, layouts: List[RankLayout],
                      inputs: dict) -> List[tuple]:
        if num_workers == len(layout.workers):
            return list(layout.workers)
        # Another loader with a different worker count: the same main cores, the rest of the
        # rank's share spread over its workers.
        pool = [c for c in layout.cores if c not in layout.main] or list(layout.main)
        if len(pool) < num_workers:
            return [tuple(pool)] * num_workers
        base, extra = divmod(len(pool), num_workers)
        out, start = [], 0
        for i in range(num_workers):
            size = base + (1 if i < extra else 0)
            out.append(tuple(pool[start:start + size]))
            start += size
        return out

    @staticmethod
    def _dataloaders(runner) -> list:
        """``(loop attribute, DataLoader)`` of the loops already built; builds nothing."""
        found = []
        for name in _LOOPS:
            loop = getattr(runner, name, None)
            if isinstance(loop, BaseLoop) and getattr(loop, 'dataloader', None) is not None:
                found.append((name, loop.dataloader))
        return found

    def describe(self) -> str:
        """The main process's cores after ``before_run``, for logs and tests."""
        if self.layout is None:
            return 'CPUAffinityHook: not pinned'
        return f'CPUAffinityHook: main process on CPUs {format_cpulist(self.layout.main)}'
