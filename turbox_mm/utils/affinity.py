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
"""
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from turbox_mm.registry import FUNCTIONS
from .system import read_text, warn_once  # noqa: F401 (warn_once is used by the hook)

#: Environment variable holding the CPUs the process was allowed before anything was pinned,
#: exported by the main process so that workers and later plans start from the same set.
ENV_ALLOWED = 'TURBOX_CPU_ALLOWED'
#: Environment variable holding the NUMA node of each local rank's GPU (JSON list, null when
#: unknown), exported by the main process: a forked loader worker must not touch CUDA.
ENV_GPU_NODES = 'TURBOX_GPU_NUMA_NODES'
#: Environment variable holding ``'<local rank>,<local world size>'`` as the main process
#: resolved them, exported for its loader workers.
ENV_LOCAL = 'TURBOX_LOCAL_RANK_SIZE'
#: Valid values of the ``numa`` option.
NUMA_MODES = ('auto', 'ignore')


# ---------------------------------------------------------------------------------------------
# Parsing what the kernel reports (pure).
# ---------------------------------------------------------------------------------------------


def parse_cpulist(text: str) -> List[int]:
    """Parse a kernel CPU list such as ``'0-3,8,10-11'``.

    Args:
        text (str): The list; blank means no CPU.

    Returns:
        list[int]: The CPUs, sorted and unique.

    Raises:
        ValueError: ``text`` is not a CPU list; the message quotes it.

    Examples:
        >>> parse_cpulist('0-3,8,10-11\\n')
        [0, 1, 2, 3, 8, 10, 11]
    """
    cpus = set()
    for part in text.strip().split(','):
        part = part.strip()
        if not part:
            continue
        try:
            if '-' in part:
                lo, hi = (int(x) for x in part.split('-', 1))
                if hi < lo:
                    raise ValueError
                cpus.update(range(lo, hi + 1))
            else:
                cpus.add(int(part))
        except ValueError:
            raise ValueError(f'not a CPU list: {text!r} (expected e.g. "0-3,8")') from None
    return sorted(cpus)


def format_cpulist(cpus: Sequence[int]) -> str:
    """Format CPUs as a compact kernel-style list.

    Examples:
        >>> format_cpulist([0, 1, 2, 3, 8, 10, 11])
        '0-3,8,10-11'
    """
    cpus = sorted(set(cpus))
    parts = []
    i = 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        parts.append(str(cpus[i]) if i == j else f'{cpus[i]}-{cpus[j]}')
        i = j + 1
    return ','.join(parts)


def parse_cpu_max(text: str) -> Optional[float]:
    """Cores granted by a cgroup v2 ``cpu.max`` (``'QUOTA PERIOD'`` or ``'max PERIOD'``).

    Returns:
        float | None: ``QUOTA / PERIOD``, or None where there is no limit.

    Examples:
        >>> parse_cpu_max('250000 100000')
        2.5
        >>> parse_cpu_max('max 100000') is None
        True
    """
    fields = text.split()
    if not fields or fields[0] == 'max':
        return None
    period = int(fields[1]) if len(fields) > 1 else 100000
    return cfs_quota_cores(int(fields[0]), period)


def cfs_quota_cores(quota_us: int, period_us: int) -> Optional[float]:
    """Cores granted by a cgroup v1 CFS quota; None where the quota is -1 (no limit)."""
    if quota_us <= 0 or period_us <= 0:
        return None
    return quota_us / period_us


# ---------------------------------------------------------------------------------------------
# Reading the machine (small, each with a path argument so that tests can point it elsewhere).
# ---------------------------------------------------------------------------------------------


_read = read_text


def read_cgroup_cpu_limit(proc_cgroup: str = '/proc/self/cgroup',
                          root: str = '/sys/fs/cgroup') -> Optional[float]:
    """The CPU quota of this process's cgroup, in cores; None where there is none.

    Looks at the process's own cgroup and every ancestor (a limit anywhere up the tree
    applies) under cgroup v2 and v1, and returns the smallest.

    Args:
        proc_cgroup (str): The ``/proc/<pid>/cgroup`` file. Defaults to this process's.
        root (str): Where the cgroup file systems are mounted. Defaults to ``/sys/fs/cgroup``.

    Returns:
        float | None: Cores, e.g. 2.5; None where no quota is set or nothing is readable.
    """
    limits = []
    text = _read(proc_cgroup) or ''
    for line in text.splitlines():
        parts = line.split(':', 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        path = path.strip() or '/'
        if controllers == '':  # cgroup v2
            for base in _ancestors(os.path.join(root, path.lstrip('/')), root):
                value = _read(os.path.join(base, 'cpu.max'))
                if value:
                    limits.append(parse_cpu_max(value))
        elif 'cpu' in controllers.split(','):  # cgroup v1
            for mount in (os.path.join(root, controllers), os.path.join(root, 'cpu'),
                          os.path.join(root, 'cpu,cpuacct')):
                for base in _ancestors(os.path.join(mount, path.lstrip('/')), mount):
                    quota = _read(os.path.join(base, 'cpu.cfs_quota_us'))
                    period = _read(os.path.join(base, 'cpu.cfs_period_us'))
                    if quota and period:
                        limits.append(cfs_quota_cores(int(quota), int(period)))
    if not text:  # no /proc: the root files of either version
        value = _read(os.path.join(root, 'cpu.max'))
        if value:
            limits.append(parse_cpu_max(value))
    limits = [x for x in limits if x is not None]
    return min(limits) if limits else None


def _ancestors(path: str, stop: str) -> List[str]:
    """``path`` and its parents up to and including ``stop`` (only ``path`` if outside it)."""
    path, stop = os.path.normpath(path), os.path.normpath(stop)
    out = [path]
    while path != stop and path.startswith(stop + os.sep):
        path = os.path.dirname(path)
        out.append(path)
    return out


def read_numa_nodes(root: str = '/sys/devices/system/node') -> Dict[int, List[int]]:
    """CPUs of each NUMA node, from ``node*/cpulist``; empty where sysfs has no nodes."""
    nodes = {}
    try:
        names = os.listdir(root)
    except OSError:
        return nodes
    for name in names:
        if name.startswith('node') and name[4:].isdigit():
            text = _read(os.path.join(root, name, 'cpulist'))
            if text is not None:
                cpus = parse_cpulist(text)
                if cpus:
                    nodes[int(name[4:])] = cpus
    return dict(sorted(nodes.items()))


def pci_numa_node(bus_id: str, root: str = '/sys/bus/pci/devices') -> Optional[int]:
    """NUMA node of a PCI device (``'0000:18:00.0'``); None where unknown (sysfs says -1).

    CUDA reports bus ids with an 8-digit domain (``'00000000:18:00.0'``); sysfs uses 4.
    """
    bus_id = bus_id.strip().lower()
    domain, _, rest = bus_id.partition(':')
    if len(domain) > 4:
        bus_id = f'{domain[-4:]}:{rest}'
    text = _read(os.path.join(root, bus_id, 'numa_node'))
    try:
        node = int(text) if text else -1
    except ValueError:
        return None
    return node if node >= 0 else None


def gpu_numa_nodes(count: int) -> Optional[List[Optional[int]]]:
    """NUMA node of CUDA devices ``0 .. count-1`` of this process, or None where unknown.

    Uses the value exported by the main process (:data:`ENV_GPU_NODES`) when present; otherwise
    asks CUDA for each device's PCI bus id, but only in a main process (never in a loader
    worker, where initialising CUDA after a fork fails) and only where all ``count`` devices
    are visible, so that every rank reaches the same answer.
    """
    exported = os.environ.get(ENV_GPU_NODES)
    if exported:
        try:
            nodes = json.loads(exported)
            if isinstance(nodes, list) and len(nodes) >= count:
                return nodes[:count]
        except ValueError:
            pass
    if 'torch' not in sys.modules:
        return None
    import torch
    from torch.utils.data import get_worker_info
    if get_worker_info() is not None or not torch.cuda.is_available():
        return None
    if torch.cuda.device_count() < count:
        return None
    nodes = []
    for index in range(count):
        props = torch.cuda.get_device_properties(index)
        domain = getattr(props, 'pci_domain_id', None)
        bus = getattr(props, 'pci_bus_id', None)
        device = getattr(props, 'pci_device_id', None)
        if None in (domain, bus, device):
            return None
        nodes.append(pci_numa_node(f'{domain:04x}:{bus:02x}:{device:02x}.0'))
    return nodes


def allowed_cpus() -> List[int]:
    """The CPUs this process may use, as they were before any turbox pinning.

    The main process exports them in :data:`ENV_ALLOWED` before it pins itself, so workers
    (which inherit the main process's narrower mask) and later plans see the original set.
    """
    exported = os.environ.get(ENV_ALLOWED)
    if exported:
        return parse_cpulist(exported)
    if hasattr(os, 'sched_getaffinity'):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def local_rank_and_size() -> Tuple[int, int]:
    """``(local rank, local world size)`` of this process.

    In order: what the main process exported (:data:`ENV_LOCAL`, so loader workers agree with
    it), torchrun's ``LOCAL_RANK``/``LOCAL_WORLD_SIZE``, Open MPI's and Slurm's variables,
    mmengine's local process group, and finally ``LOCAL_RANK`` with the smaller of the world
    size and the GPUs on this node.
    """
    pairs = ((ENV_LOCAL, None), ('LOCAL_RANK', 'LOCAL_WORLD_SIZE'),
             ('OMPI_COMM_WORLD_LOCAL_RANK', 'OMPI_COMM_WORLD_LOCAL_SIZE'),
             ('SLURM_LOCALID', 'SLURM_NTASKS_PER_NODE'))
    for rank_key, size_key in pairs:
        if size_key is None:
            value = os.environ.get(rank_key, '')
            if ',' in value:
                rank, size = value.split(',', 1)
                return int(rank), int(size)
            continue
        rank, size = os.environ.get(rank_key), os.environ.get(size_key)
        if rank is not None and size is not None:
            match = re.match(r'\d+', size)  # Slurm may say '8(x2)'
            if match:
                return int(rank), int(match.group())
    from mmengine.dist import get_local_rank, get_local_size, get_world_size
    try:
        return get_local_rank(), get_local_size()
    except RuntimeError:  # distributed, but no local group was created
        rank = int(os.environ.get('LOCAL_RANK', 0))
        size = get_world_size()
        gpus = _main_process_gpu_count()
        if gpus:
            size = min(size, gpus)
        return rank, max(size, rank + 1)


def _main_process_gpu_count() -> int:
    if 'torch' not in sys.modules:
        return 0
    import torch
    from torch.utils.data import get_worker_info
    if get_worker_info() is not None or not torch.cuda.is_available():
        return 0
    return torch.cuda.device_count()


# ---------------------------------------------------------------------------------------------
# The plan (pure).
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankLayout:
    """The cores of one local rank.

    Attributes:
        local_rank (int): The rank on this node.
        main (tuple[int]): Cores of the main (training) process.
        workers (tuple[tuple[int]]): Cores of loader worker ``i`` at index ``i``; empty when the
            loader has no workers.
        node (int | None): The NUMA node the rank's cores were taken from first.
        notes (tuple[str]): Where cores had to be shared or left unused, and why.
    """

    local_rank: int
    main: Tuple[int, ...]
    workers: Tuple[Tuple[int, ...], ...]
    node: Optional[int] = None
    notes: Tuple[str, ...] = field(default=())

    @property
    def cores(self) -> Tuple[int, ...]:
        """All cores of the rank, sorted."""
        return tuple(sorted(set(self.main).union(*self.workers)))

    def describe(self) -> str:
        """One line: ``rank 0 (node 0): main 0-3 | workers 4-6, 7-9``."""
        node = '' if self.node is None else f' (node {self.node})'
        workers = ', '.join(format_cpulist(w) for w in self.workers) or 'none'
        return f'local rank {self.local_rank}{node}: main {format_cpulist(self.main)} | ' \
               f'workers {workers}'


def plan_affinity(allowed: Sequence[int],
                  local_world_size: int = 1,
                  num_workers: int = 0,
                  numa_nodes: Optional[Mapping[int, Sequence[int]]] = None,
                  gpu_nodes: Optional[Sequence[Optional[int]]] = None,
                  cpu_limit: Optional[float] = None,
                  main_cores: Optional[int] = None) -> List[RankLayout]:
    """Split the allowed CPUs among the local ranks, and each rank's among its processes.

    1. Cores usable: ``allowed``, cut to ``floor(cpu_limit)`` where the cgroup sets a quota
       (more busy cores than the quota only get the cgroup throttled).
    2. Each local rank gets ``usable // local_world_size`` cores, disjoint from the others,
       taken first from its GPU's NUMA node (``gpu_nodes``) or, where that is unknown, from
       node ``rank * nodes // local_world_size`` (ranks spread over nodes the way GPUs
       usually are); a node's cores go in equal shares to the ranks that prefer it, and a rank
       short of cores tops up from the other nodes. Fewer cores than ranks: ranks share.
    3. Within a rank: the main process gets ``main_cores`` cores (automatic: an equal share
       with the workers, ``ceil(cores / (num_workers + 1))``, at least one); the rest is cut
       into ``num_workers`` contiguous, near-equal, disjoint sets. Fewer cores left than
       workers: every worker gets all of them (the scheduler balances), and a note says so.

    Args:
        allowed (Sequence[int]): CPUs the process may run on (``os.sched_getaffinity(0)``).
        local_world_size (int): Processes (GPUs) on this node. Defaults to 1.
        num_workers (int): Loader workers per rank. Defaults to 0.
        numa_nodes (Mapping[int, Sequence[int]], optional): CPUs of each NUMA node. Defaults to
            None (one node).
        gpu_nodes (Sequence[int | None], optional): NUMA node of local rank ``i``'s GPU.
            Defaults to None (unknown).
        cpu_limit (float, optional): The cgroup's CPU quota in cores. Defaults to None.
        main_cores (int, optional): Cores for each main process. Defaults to None (automatic).

    Returns:
        list[RankLayout]: One per local rank, in rank order.

    Raises:
        ValueError: An argument is out of range; the message names it and its valid values.

    Examples:
        >>> plans = plan_affinity(range(16), local_world_size=2, num_workers=3)
        >>> [p.describe() for p in plans]
        ['local rank 0 (node 0): main 0-1 | workers 2-3, 4-5, 6-7', \
'local rank 1 (node 0): main 8-9 | workers 10-11, 12-13, 14-15']
    """
    allowed = sorted(set(int(c) for c in allowed))
    if not allowed:
        raise ValueError('plan_affinity: allowed must name at least one CPU')
    if not isinstance(local_world_size, int) or local_world_size < 1:
        raise ValueError(f'plan_affinity: local_world_size must be an int >= 1, got '
                         f'{local_world_size!r}')
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f'plan_affinity: num_workers must be an int >= 0, got {num_workers!r}')
    if main_cores is not None and (isinstance(main_cores, bool)
                                   or not isinstance(main_cores, int) or main_cores < 1):
        raise ValueError(f'main_cores must be None (automatic) or an int >= 1, got '
                         f'{main_cores!r}')
    if gpu_nodes is not None and len(gpu_nodes) < local_world_size:
        raise ValueError(f'plan_affinity: gpu_nodes has {len(gpu_nodes)} entries for '
                         f'{local_world_size} local ranks')
    notes: List[str] = []
    allowed_set = set(allowed)

    # Group the allowed CPUs by NUMA node, in node order.
    nodes: Dict[int, List[int]] = {}
    for node, cpus in sorted((numa_nodes or {}).items()):
        mine = [c for c in sorted(cpus) if c in allowed_set]
        if mine:
            nodes[node] = mine
    placed = {c for cpus in nodes.values() for c in cpus}
    rest = [c for c in allowed if c not in placed]
    if rest:
        nodes[max(nodes) + 1 if nodes else 0] = rest
    node_ids = list(nodes)

    usable = len(allowed)
    if cpu_limit is not None and cpu_limit < usable:
        usable = max(1, int(math.floor(cpu_limit + 1e-9)))
        notes.append(f'cgroup CPU quota {cpu_limit:g} cores: using {usable} of '
                     f'{len(allowed)} allowed CPUs')

    per_rank = usable // local_world_size
    shares: List[List[int]] = []
    rank_node: List[Optional[int]] = []
    if per_rank == 0:
        ordered = [c for n in node_ids for c in nodes[n]][:usable]
        notes.append(f'{usable} usable CPUs for {local_world_size} local ranks: ranks share '
                     'cores')
        for rank in range(local_world_size):
            core = ordered[rank % len(ordered)]
            shares.append([core])
            rank_node.append(next(n for n in node_ids if core in nodes[n]))
    else:
        pools = {n: list(cpus) for n, cpus in nodes.items()}
        for rank in range(local_world_size):
            wanted = gpu_nodes[rank] if gpu_nodes is not None else None
            if wanted not in pools:
                wanted = node_ids[rank * len(node_ids) // local_world_size]
            rank_node.append(wanted)
        shares = [[] for _ in range(local_world_size)]
        # Pass 1: a node's cores in equal shares to the ranks that prefer it.
        for node in node_ids:
            ranks = [r for r in range(local_world_size) if rank_node[r] == node]
            if not ranks:
                continue
            each = min(per_rank, len(pools[node]) // len(ranks))
            for r in ranks:
                shares[r], pools[node] = pools[node][:each], pools[node][each:]
        # Pass 2: top up, own node first, then the others in node order.
        for r in range(local_world_size):
            for node in [rank_node[r]] + [n for n in node_ids if n != rank_node[r]]:
                need = per_rank - len(shares[r])
                if need <= 0:
                    break
                shares[r] += pools[node][:need]
                pools[node] = pools[node][need:]
            if any(c not in nodes[rank_node[r]] for c in shares[r]):
                notes.append(f'local rank {r}: its NUMA node {rank_node[r]} has too few free '
                             'cores; some come from another node')
        unused = usable - per_rank * local_world_size
        if unused:
            notes.append(f'{unused} usable CPU(s) left unused so that ranks get equal shares')

    layouts = []
    for rank, share in enumerate(shares):
        rank_notes = list(notes)
        main, workers = _split_rank(share, num_workers, main_cores, rank_notes)
        layouts.append(RankLayout(rank, tuple(main), tuple(tuple(w) for w in workers),
                                  rank_node[rank], tuple(rank_notes)))
    return layouts


def _split_rank(share: List[int], num_workers: int, main_cores: Optional[int],
                notes: List[str]) -> Tuple[List[int], List[List[int]]]:
    if num_workers == 0:
        return share, []
    n = len(share)
    main_n = main_cores if main_cores is not None else max(1, math.ceil(n / (num_workers + 1)))
    if main_n >= n:
        if main_cores is not None and main_cores > n:
            notes.append(f'main_cores={main_cores} but the rank has {n} core(s): main '
                         'process gets all of them')
        notes.append(f'{num_workers} worker(s) share the main process\'s {n} core(s)')
        return share, [list(share) for _ in range(num_workers)]
    main, pool = share[:main_n], share[main_n:]
    if len(pool) < num_workers:
        notes.append(f'{num_workers} workers share {len(pool)} core(s)')
        return main, [list(pool) for _ in range(num_workers)]
    base, extra = divmod(len(pool), num_workers)
    workers, start = [], 0
    for i in range(num_workers):
        size = base + (1 if i < extra else 0)
        workers.append(pool[start:start + size])
        start += size
    return main, workers


def format_plan(layouts: Sequence[RankLayout], allowed: Sequence[int],
                cpu_limit: Optional[float] = None) -> str:
    """A multi-line report of a plan: the inputs, one line per rank, then the notes."""
    limit = 'none' if cpu_limit is None else f'{cpu_limit:g} cores'
    lines = [f'allowed CPUs {format_cpulist(allowed)} ({len(allowed)}), cgroup quota {limit}']
    lines += [f'  {layout.describe()}' for layout in layouts]
    seen = []
    for layout in layouts:
        for note in layout.notes:
            if note not in seen:
                seen.append(note)
    lines += [f'  note: {note}' for note in seen]
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------
# Gathering the inputs and applying a plan.
# ---------------------------------------------------------------------------------------------


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
