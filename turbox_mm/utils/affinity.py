"""CPU affinity: which cores the main process and each loader worker of every local rank use.

The layout is a pure function, :func:`plan_affinity`, of what the machine allows: the CPUs of
``os.sched_getaffinity`` (the cgroup's cpuset), the cgroup's CPU quota (cgroup v2 ``cpu.max``,
v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``), the NUMA nodes
(``/sys/devices/system/node/node*/cpulist``), the NUMA node of each rank's GPU where known
(``/sys/bus/pci/devices/<bus id>/numa_node``), the local world size and the number of loader
workers. Every local rank computes the same plan for the whole node and takes its own part,
so the parts are disjoint without any communication.

How it is applied:

* :class:`~turbox_mm.engine.hooks.cpu_affinity_hook.CPUAffinityHook` pins the main process and
  wraps each dataloader's existing ``worker_init_fn`` with :class:`AffinityWorkerInit`, so
  mmengine's stock seeding runs first and unchanged; workers that already run (an
  iteration-based loop starts them while it is built) are pinned from the main process by pid.
* :func:`affinity_worker_init_fn` (registered in ``FUNCTIONS``) is for a dataloader config that
  names its ``worker_init_fn`` itself. mmengine then calls it with only ``worker_id`` and the
  config's keyword arguments (no seed), so it does the stock seeding only when given ``seed``.

Where pinning is refused (no ``sched_setaffinity``, no permission, a core outside the cpuset)
a warning is printed once and nothing is pinned.

This file gathers the inputs and applies a plan; the plan itself is in ``affinity_plan.py``,
the parsing and reading of the machine in ``affinity_machine.py``. Their public names are
importable from here too.
"""
import json
import os
import sys
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

from turbox_mm.registry import FUNCTIONS
from .affinity_machine import (ENV_ALLOWED, ENV_GPU_NODES, ENV_LOCAL,  # noqa: F401 (re-exported)
                               allowed_cpus, cfs_quota_cores, format_cpulist, gpu_numa_nodes,
                               local_rank_and_size, parse_cpu_max, parse_cpulist,
                               pci_numa_node, read_cgroup_cpu_limit, read_numa_nodes)
from .affinity_plan import RankLayout, format_plan, plan_affinity
from .system import warn_once

#: Valid values of the ``numa`` option.
NUMA_MODES = ('auto', 'ignore')


def current_plan(num_workers: int,
                 main_cores: Optional[int] = None,
                 numa: str = 'auto',
                 local_rank: Optional[int] = None,
                 local_world_size: Optional[int] = None) -> Tuple[List[RankLayout], dict]:
    """:func:`plan_affinity` for this machine and process.

    Args:
        num_workers (int): Loader workers per rank.
        main_cores (int, optional): As in :func:`plan_affinity`. Defaults to None.
        numa (str): ``'auto'`` (use NUMA nodes and GPU nodes where known) or ``'ignore'``.
            Defaults to ``'auto'``.
        local_rank (int, optional): Defaults to ``LOCAL_RANK`` (or mmengine's local rank).
        local_world_size (int, optional): Defaults to ``LOCAL_WORLD_SIZE`` (or mmengine's).

    Returns:
        tuple[list[RankLayout], dict]: The plan for every local rank, and the inputs read
        (``allowed``, ``cpu_limit``, ``numa_nodes``, ``gpu_nodes``, ``local_rank``,
        ``local_world_size``).

    Raises:
        ValueError: ``numa`` is not one of :data:`NUMA_MODES`.
    """
    if numa not in NUMA_MODES:
        raise ValueError(f"numa is {numa!r}; valid values: {', '.join(map(repr, NUMA_MODES))}")
    rank, size = local_rank_and_size()
    rank = rank if local_rank is None else local_rank
    size = size if local_world_size is None else local_world_size
    inputs = dict(allowed=allowed_cpus(), cpu_limit=read_cgroup_cpu_limit(),
                  numa_nodes=read_numa_nodes() if numa == 'auto' else None,
                  gpu_nodes=gpu_numa_nodes(size) if numa == 'auto' else None,
                  local_rank=rank, local_world_size=size)
    layouts = plan_affinity(inputs['allowed'], size, num_workers, inputs['numa_nodes'],
                            inputs['gpu_nodes'], inputs['cpu_limit'], main_cores)
    return layouts, inputs


def export_inputs(inputs: Mapping) -> None:
    """Export the allowed CPUs, local rank/size and GPU nodes, for workers and later plans."""
    os.environ.setdefault(ENV_ALLOWED, format_cpulist(inputs['allowed']))
    os.environ[ENV_LOCAL] = f"{inputs['local_rank']},{inputs['local_world_size']}"
    if inputs.get('gpu_nodes') is not None:
        os.environ.setdefault(ENV_GPU_NODES, json.dumps(list(inputs['gpu_nodes'])))


def pin_process(cores: Sequence[int], pid: int = 0) -> bool:
    """Pin every thread of process ``pid`` (0: this one) to ``cores``.

    ``sched_setaffinity`` applies to one thread; threads that already exist (OpenMP pools,
    the pin-memory thread) would keep their old mask, so each task of ``/proc/<pid>/task`` is
    pinned. A refusal (no such call, no permission, a core outside the cpuset) warns once and
    returns False.

    Args:
        cores (Sequence[int]): The CPUs.
        pid (int): The process. Defaults to 0 (this process).

    Returns:
        bool: Whether the process's threads were pinned.
    """
    if not hasattr(os, 'sched_setaffinity'):
        warn_once('no-affinity', 'turbox_mm affinity: os.sched_setaffinity is not available on '
                  f'{sys.platform}; processes stay unpinned')
        return False
    cores = set(cores)
    proc = '/proc/self/task' if pid == 0 else f'/proc/{pid}/task'
    try:
        tids = [int(t) for t in os.listdir(proc)]
    except OSError:
        tids = [pid]
    try:
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cores)
            except ProcessLookupError:  # the thread ended meanwhile
                pass
    except OSError as err:
        warn_once(f'refused-{err.errno}',
                  f'turbox_mm affinity: pinning to CPUs {format_cpulist(cores)} was refused '
                  f'({err}); processes stay unpinned')
        return False
    return True


def limit_worker_threads() -> None:
    """In a loader worker: one intra-op thread for torch.

    OpenCV's threads are not touched here: resizing OpenCV's thread pool in a process forked
    from a parent whose pool was active can deadlock (seen with 8 pinned workers on the GPU
    machine). OpenCV's thread count is set in the main process before the workers start
    (``env_cfg.mp_cfg.opencv_num_threads``, 0 under ``configs/_base_/turbox.py``), which the
    workers inherit.
    """
    if 'torch' in sys.modules:
        sys.modules['torch'].set_num_threads(1)


class AffinityWorkerInit:
    """A loader ``worker_init_fn`` that runs the loader's own one first, then pins the worker.

    Picklable (module-level class holding plain data and the wrapped callable), so it works
    with the ``spawn`` start method too.

    Args:
        init_fn (callable, optional): The loader's previous ``worker_init_fn`` (mmengine's
            seeding partial); called first with ``worker_id``. Defaults to None.
        worker_cores (Sequence[Sequence[int]]): Cores of worker ``i`` at index ``i``.
        limit_threads (bool): Also call :func:`limit_worker_threads`. Defaults to True.

    Examples:
        >>> init = AffinityWorkerInit(None, [[0], [1]])
        >>> init.worker_cores
        ((0,), (1,))
    """

    def __init__(self, init_fn: Optional[Callable[[int], None]],
                 worker_cores: Sequence[Sequence[int]], limit_threads: bool = True):
        self.init_fn = init_fn
        self.worker_cores = tuple(tuple(c) for c in worker_cores)
        self.limit_threads = limit_threads

    def __call__(self, worker_id: int) -> None:
        if self.init_fn is not None:
            self.init_fn(worker_id)
        if self.worker_cores:
            pin_process(self.worker_cores[worker_id % len(self.worker_cores)])
        if self.limit_threads:
            limit_worker_threads()


@FUNCTIONS.register_module()
def affinity_worker_init_fn(worker_id: int,
                            num_workers: Optional[int] = None,
                            rank: Optional[int] = None,
                            seed: Optional[int] = None,
                            disable_subprocess_warning: bool = False,
                            main_cores: Optional[int] = None,
                            numa: str = 'auto') -> None:
    """A ``worker_init_fn`` for dataloader configs: stock seeding, then this worker's cores.

    mmengine's ``Runner.build_dataloader`` replaces its default seeding function by a
    configured ``worker_init_fn`` and calls it with ``worker_id`` and the config's keyword
    arguments only. With ``seed`` given, this function first does exactly what mmengine's
    ``mmengine.dataset.worker_init_fn`` does (``num_workers * rank + worker_id + seed`` for
    ``random``, numpy and torch); pass the config's ``randomness.seed``. Without ``seed`` the
    workers keep torch's own per-worker seeds (distinct, and reproducible for a fixed runner
    seed, but not stock's numbers); :class:`~turbox_mm.engine.hooks.CPUAffinityHook` keeps
    stock seeding without any of this.

    Args:
        worker_id (int): Passed by the DataLoader.
        num_workers (int, optional): Defaults to the loader's (from ``get_worker_info``).
        rank (int, optional): Global rank for the seed. Defaults to ``RANK`` or mmengine's.
        seed (int, optional): The runner's seed. Defaults to None (torch's worker seeds).
        disable_subprocess_warning (bool): As in mmengine. Defaults to False.
        main_cores (int, optional): As in :func:`plan_affinity`; must match the hook's.
        numa (str): ``'auto'`` or ``'ignore'``. Defaults to ``'auto'``.

    Examples:
        >>> train_dataloader = dict(  # doctest: +SKIP
        ...     num_workers=4, worker_init_fn=dict(
        ...         type='turbox_mm.affinity_worker_init_fn', seed=0))
    """
    from torch.utils.data import get_worker_info
    info = get_worker_info()
    if num_workers is None:
        num_workers = info.num_workers if info is not None else 1
    if seed is not None:
        from mmengine.dataset import worker_init_fn as default_worker_init_fn
        if rank is None:
            rank = int(os.environ['RANK']) if 'RANK' in os.environ else _mmengine_rank()
        default_worker_init_fn(worker_id, num_workers, rank, seed, disable_subprocess_warning)
    layouts, inputs = current_plan(num_workers, main_cores, numa)
    layout = layouts[inputs['local_rank'] % len(layouts)]
    AffinityWorkerInit(None, layout.workers)(worker_id)


def _mmengine_rank() -> int:
    from mmengine.dist import get_rank
    return get_rank()


def wrap_worker_init(dataloader, worker_cores: Sequence[Sequence[int]],
                     limit_threads: bool = True) -> bool:
    """Make ``dataloader`` pin its future workers, keeping its ``worker_init_fn`` first.

    Args:
        dataloader (torch.utils.data.DataLoader): The loader; changed in place.
        worker_cores (Sequence[Sequence[int]]): Cores of worker ``i`` at index ``i``.
        limit_threads (bool): See :class:`AffinityWorkerInit`. Defaults to True.

    Returns:
        bool: False where there is nothing to do (no workers) or it was already wrapped.
    """
    if getattr(dataloader, 'num_workers', 0) == 0:
        return False
    current = dataloader.worker_init_fn
    if isinstance(current, AffinityWorkerInit):
        current = current.init_fn
    dataloader.worker_init_fn = AffinityWorkerInit(current, worker_cores, limit_threads)
    return True


def running_worker_pids(dataloader, iterator=None) -> List[int]:
    """Pids of loader workers already started (persistent iterator or ``iterator``), in order.

    Reads private attributes of torch's multi-process iterator; returns [] where they differ.
    """
    its = [iterator, getattr(dataloader, '_iterator', None)]
    for it in its:
        workers = getattr(it, '_workers', None)
        if workers:
            return [w.pid for w in workers if getattr(w, 'pid', None)]
    return []


__all__ = [
    'ENV_ALLOWED', 'ENV_GPU_NODES', 'ENV_LOCAL', 'NUMA_MODES', 'RankLayout', 'AffinityWorkerInit',
    'affinity_worker_init_fn', 'allowed_cpus', 'current_plan', 'export_inputs', 'format_cpulist',
    'format_plan', 'gpu_numa_nodes', 'limit_worker_threads', 'parse_cpu_max', 'parse_cpulist',
    'pci_numa_node', 'pin_process', 'plan_affinity', 'read_cgroup_cpu_limit', 'read_numa_nodes',
    'running_worker_pids', 'wrap_worker_init'
]
