"""What the machine allows, for :func:`~turbox_mm.utils.affinity.plan_affinity`.

Parsing what the kernel reports (pure: CPU lists, cgroup v2 ``cpu.max``, cgroup v1 CFS quota)
and reading it: the cgroup's CPU quota, the NUMA nodes, the NUMA node of each GPU, the CPUs
this process was allowed before any pinning and the local rank and world size. Each reader
takes its path as an argument so that tests can point it elsewhere. The environment variables
through which the main process hands these to its loader workers are defined here too.
"""
import json
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from .system import read_text

#: Environment variable holding the CPUs the process was allowed before anything was pinned,
#: exported by the main process so that workers and later plans start from the same set.
ENV_ALLOWED = 'TURBOX_CPU_ALLOWED'
#: Environment variable holding the NUMA node of each local rank's GPU (JSON list, null when
#: unknown), exported by the main process: a forked loader worker must not touch CUDA.
ENV_GPU_NODES = 'TURBOX_GPU_NUMA_NODES'
#: Environment variable holding ``'<local rank>,<local world size>'`` as the main process
#: resolved them, exported for its loader workers.
ENV_LOCAL = 'TURBOX_LOCAL_RANK_SIZE'


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
