"""A report of the machine settings that matter to training, with a fix for each bad one.

:func:`collect` reads the machine into a plain dict (THP, CPU governor, cgroup limits, NUMA,
``/dev/shm``, resource limits, torch and CUDA versions, GPUs through NVML or ``nvidia-smi``).
:func:`assess` turns such a dict into :class:`Finding` rows; it and the ``check_*`` functions
are pure, so they are tested on made-up values. ``tools/sysinfo.py`` prints the result.
"""
import os
import platform
import resource
import shutil
import subprocess
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

from .affinity import (allowed_cpus, format_cpulist, read_cgroup_cpu_limit, read_numa_nodes)
from .hugepages import thp_defrag, thp_mode
from .system import read_text

GiB = 1 << 30
NOFILE_MIN = 65536
SHM_MIN = 2 * GiB
SHM_PER_WORKER = 512 << 20
MEMLOCK_MIN = 1 * GiB
NVIDIA_SMI_FIELDS = ('index', 'name', 'driver_version', 'persistence_mode', 'clocks.sm',
                     'clocks.max.sm', 'clocks.mem', 'clocks.max.mem',
                     'clocks.applications.graphics', 'pci.bus_id')


@dataclass
class Finding:
    """One line of the report.

    Attributes:
        name (str): What was looked at.
        value (str): What was found.
        suggestion (str | None): How to fix it where it hurts training, else None.
    """

    name: str
    value: str
    suggestion: Optional[str] = None


def _size(nbytes: Optional[float]) -> str:
    if nbytes is None:
        return 'unknown'
    for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
        if abs(nbytes) < 1024 or unit == 'TiB':
            return f'{nbytes:.0f} {unit}' if unit == 'B' else f'{nbytes:.1f} {unit}'
        nbytes /= 1024
    return str(nbytes)


def _limit(value: Optional[int]) -> str:
    return 'unlimited' if value is None or value < 0 or value == resource.RLIM_INFINITY \
        else str(value)


# ---------------------------------------------------------------------------------------------
# Checks (pure).
# ---------------------------------------------------------------------------------------------


def check_thp(mode: Optional[str], defrag: Optional[str]) -> Finding:
    """THP mode and defrag.

    Examples:
        >>> check_thp('never', 'madvise').suggestion.startswith('echo madvise')
        True
    """
    value = f'{mode} (defrag {defrag})' if mode else 'not available'
    if mode is None:
        return Finding('transparent huge pages', value)
    if mode == 'never':
        return Finding('transparent huge pages', value,
                       'echo madvise > /sys/kernel/mm/transparent_hugepage/enabled (as root), '
                       'then THP_MEM_ALLOC_ENABLE=1 gives torch\'s large CPU tensors huge pages')
    if mode == 'always' and defrag == 'always':
        return Finding('transparent huge pages', value,
                       'defrag "always" stalls page faults on compaction; echo defer+madvise > '
                       '/sys/kernel/mm/transparent_hugepage/defrag')
    return Finding('transparent huge pages', value)


def check_governor(governors: Sequence[str], driver: Optional[str] = None) -> Finding:
    """CPU frequency governor(s) of the allowed CPUs.

    ``powersave`` under ``acpi-cpufreq`` keeps cores at their lowest clock; under
    ``intel_pstate``/``amd-pstate`` (active mode) it still scales, but ``performance`` avoids
    ramp-up latency for the bursty loader work.
    """
    names = sorted(set(governors))
    value = ', '.join(names) if names else 'unknown (no cpufreq)'
    if driver:
        value += f' (driver {driver})'
    if 'powersave' in names:
        scaling = driver in ('intel_pstate', 'amd-pstate', 'amd-pstate-epp')
        why = 'slower ramp-up of loader cores' if scaling else 'cores stay at the lowest clock'
        return Finding('CPU governor', value,
                       f'{why}: cpupower frequency-set -g performance (as root)')
    if names and names != ['performance'] and 'schedutil' not in names:
        return Finding('CPU governor', value,
                       'cpupower frequency-set -g performance (as root) for steady clocks')
    return Finding('CPU governor', value)


def check_cpus(online: int, allowed: Sequence[int], quota: Optional[float]) -> Finding:
    """Online CPUs, the ones allowed to this process, and the cgroup quota."""
    value = f'{online} online, {len(allowed)} allowed ({format_cpulist(allowed)})'
    value += f', cgroup quota {quota:g}' if quota is not None else ', no cgroup quota'
    if quota is not None and quota < len(allowed):
        return Finding('CPUs', value,
                       f'the quota ({quota:g}) is below the allowed CPUs ({len(allowed)}): keep '
                       f'loader workers + main processes <= {int(quota)} or raise the quota '
                       '(docker --cpus)')
    return Finding('CPUs', value)


def check_memory_limit(limit: Optional[int], total: Optional[int]) -> Finding:
    """The cgroup's memory limit against the machine's memory."""
    if limit is None or (total and limit >= total):
        return Finding('cgroup memory limit', f'none (machine {_size(total)})')
    value = f'{_size(limit)} (machine {_size(total)})'
    if limit < 16 * GiB:
        return Finding('cgroup memory limit', value,
                       'under 16 GiB: loader workers, pinned buffers and the dataset infos '
                       'share it; raise it (docker --memory) or lower num_workers')
    return Finding('cgroup memory limit', value)


def check_numa(nodes: Dict[int, Sequence[int]]) -> Finding:
    """NUMA nodes and their CPUs."""
    if not nodes:
        return Finding('NUMA nodes', 'unknown')
    value = f'{len(nodes)}: ' + '; '.join(f'node{n} {format_cpulist(c)}' for n, c in nodes.items())
    if len(nodes) > 1:
        return Finding('NUMA nodes', value,
                       'several nodes: add turbox_mm.CPUAffinityHook so each rank and its '
                       'workers stay on its GPU\'s node')
    return Finding('NUMA nodes', value)


def check_shm(size: Optional[int], num_workers: int = 8) -> Finding:
    """``/dev/shm`` size: loader workers hand every batch to the main process through it.

    Examples:
        >>> check_shm(64 << 20, 8).suggestion is not None
        True
    """
    if size is None:
        return Finding('/dev/shm', 'missing',
                       'loader workers need /dev/shm: mount a tmpfs there (docker --ipc=host)')
    need = max(SHM_MIN, num_workers * SHM_PER_WORKER)
    value = _size(size)
    if size < need:
        return Finding('/dev/shm', value,
                       f'below {_size(need)} for {num_workers} loader workers: batches can fail '
                       'with "bus error"; docker --shm-size=16g or --ipc=host')
    return Finding('/dev/shm', value)


def check_nofile(soft: int, hard: int) -> Finding:
    """Open-file limit: torch shares tensors between processes through file descriptors."""
    value = f'soft {_limit(soft)}, hard {_limit(hard)}'
    if soft != resource.RLIM_INFINITY and 0 <= soft < NOFILE_MIN:
        return Finding('open files (ulimit -n)', value,
                       f'below {NOFILE_MIN}: many workers can hit "Too many open files"; '
                       f'ulimit -n {NOFILE_MIN} (raise the hard limit in limits.conf or '
                       'docker --ulimit nofile=65536:65536)')
    return Finding('open files (ulimit -n)', value)


def check_memlock(soft: int, hard: int) -> Finding:
    """Locked-memory limit: RDMA (NCCL over InfiniBand) registers memory against it."""
    value = f'soft {_limit(soft)}, hard {_limit(hard)}'
    if soft != resource.RLIM_INFINITY and 0 <= soft < MEMLOCK_MIN:
        return Finding('locked memory (ulimit -l)', value,
                       'small: NCCL over InfiniBand/RDMA needs ulimit -l unlimited '
                       '(docker --ulimit memlock=-1)')
    return Finding('locked memory (ulimit -l)', value)


def check_gpus(gpus: Optional[List[dict]]) -> List[Finding]:
    """One finding per GPU: name, driver, clocks, persistence mode.

    Each dict may hold ``index``, ``name``, ``driver``, ``persistence`` (bool),
    ``sm_clock``, ``sm_clock_max``, ``mem_clock``, ``mem_clock_max``, ``app_clock`` (MHz).
    """
    if not gpus:
        return [Finding('GPU', 'no GPU')]
    out = []
    for gpu in gpus:
        clocks = (f"SM {gpu.get('sm_clock', '?')}/{gpu.get('sm_clock_max', '?')} MHz, "
                  f"memory {gpu.get('mem_clock', '?')}/{gpu.get('mem_clock_max', '?')} MHz")
        persistence = gpu.get('persistence')
        value = (f"{gpu.get('name', '?')}, driver {gpu.get('driver', '?')}, {clocks}, "
                 f"persistence {'on' if persistence else 'off' if persistence is False else '?'}")
        suggestions = []
        if persistence is False:
            suggestions.append('nvidia-smi -pm 1 (as root) keeps the driver loaded between '
                               'processes')
        app, top = gpu.get('app_clock'), gpu.get('sm_clock_max')
        if isinstance(app, (int, float)) and isinstance(top, (int, float)) and app < 0.9 * top:
            suggestions.append(f'application clock {app} MHz is below the maximum {top} MHz: '
                               'nvidia-smi -rac (as root)')
        out.append(Finding(f"GPU {gpu.get('index', len(out))}", value,
                           '; '.join(suggestions) or None))
    return out


def check_versions(versions: dict) -> Finding:
    """torch, CUDA, cuDNN and NCCL versions (no suggestion)."""
    value = ', '.join(f'{k} {v}' for k, v in versions.items() if v is not None)
    return Finding('versions', value or 'unknown')


def assess(info: dict, num_workers: int = 8) -> List[Finding]:
    """Turn :func:`collect`'s dict into report rows.

    Args:
        info (dict): Values as :func:`collect` returns them (missing keys count as unknown).
        num_workers (int): Loader workers per process, for the ``/dev/shm`` check.
            Defaults to 8.

    Returns:
        list[Finding]: One row per setting.

    Examples:
        >>> rows = assess(dict(thp_mode='never', nofile=(1024, 4096)))
        >>> [r.name for r in rows if r.suggestion]
        ['transparent huge pages', 'open files (ulimit -n)']
    """
    rows = [check_versions(info.get('versions', {}))]
    if 'thp_mode' in info:
        rows.append(check_thp(info.get('thp_mode'), info.get('thp_defrag')))
    if 'governors' in info:
        rows.append(check_governor(info['governors'], info.get('cpufreq_driver')))
    if 'allowed_cpus' in info:
        rows.append(check_cpus(info.get('online_cpus', len(info['allowed_cpus'])),
                               info['allowed_cpus'], info.get('cpu_quota')))
    if 'memory_limit' in info:
        rows.append(check_memory_limit(info['memory_limit'], info.get('memory_total')))
    if 'numa_nodes' in info:
        rows.append(check_numa(info['numa_nodes']))
    if 'shm_size' in info:
        rows.append(check_shm(info['shm_size'], num_workers))
    if 'nofile' in info:
        rows.append(check_nofile(*info['nofile']))
    if 'memlock' in info:
        rows.append(check_memlock(*info['memlock']))
    if 'gpus' in info:
        rows.extend(check_gpus(info['gpus']))
    return rows


def format_report(rows: Sequence[Finding]) -> str:
    """The rows as aligned text, each suggestion on an indented line below its row."""
    width = max((len(r.name) for r in rows), default=0)
    lines = []
    for row in rows:
        lines.append(f'{row.name.ljust(width)}  {row.value}')
        if row.suggestion:
            lines.append(f"{''.ljust(width)}  -> {row.suggestion}")
    bad = sum(1 for r in rows if r.suggestion)
    lines.append(f'{bad} setting(s) with a suggestion' if bad else 'nothing to suggest')
    return '\n'.join(lines)


def to_json(rows: Sequence[Finding], info: dict) -> dict:
    """A JSON-serialisable report: the rows and the raw values."""
    raw = {k: (dict((str(n), c) for n, c in v.items()) if isinstance(v, dict) else v)
           for k, v in info.items()}
    return dict(findings=[asdict(r) for r in rows], raw=raw)


# ---------------------------------------------------------------------------------------------
# Reading the machine.
# ---------------------------------------------------------------------------------------------


def _read(path: str) -> Optional[str]:
    return read_text(path, strip=True)


def read_governors(cpus: Sequence[int],
                   root: str = '/sys/devices/system/cpu') -> List[str]:
    """The ``scaling_governor`` of each CPU that has cpufreq."""
    out = []
    for cpu in cpus:
        gov = _read(os.path.join(root, f'cpu{cpu}', 'cpufreq', 'scaling_governor'))
        if gov:
            out.append(gov)
    return out


def read_memory_limit(root: str = '/sys/fs/cgroup') -> Optional[int]:
    """The cgroup memory limit (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``) in bytes."""
    limits = []
    cgroup = _read('/proc/self/cgroup') or ''
    for line in cgroup.splitlines():
        parts = line.split(':', 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == '':
            candidates = [os.path.join(root, path.lstrip('/'), 'memory.max'),
                          os.path.join(root, 'memory.max')]
        elif 'memory' in controllers.split(','):
            candidates = [os.path.join(root, 'memory', path.lstrip('/'),
                                       'memory.limit_in_bytes'),
                          os.path.join(root, 'memory', 'memory.limit_in_bytes')]
        else:
            continue
        for candidate in candidates:
            text = _read(candidate)
            if text and text != 'max':
                try:
                    limits.append(int(text))
                except ValueError:
                    pass
    # v1 reports "no limit" as a huge number.
    limits = [x for x in limits if x < (1 << 60)]
    return min(limits) if limits else None


def read_gpus_nvml() -> Optional[List[dict]]:
    """GPUs through NVML (the ``pynvml`` module of nvidia-ml-py); None where unavailable."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001  (no module, no driver)
        return None
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            gpu = dict(index=i, name=name.decode() if isinstance(name, bytes) else name,
                       driver=driver)
            for key, fn, arg in (('sm_clock', 'nvmlDeviceGetClockInfo', 'NVML_CLOCK_SM'),
                                 ('sm_clock_max', 'nvmlDeviceGetMaxClockInfo', 'NVML_CLOCK_SM'),
                                 ('mem_clock', 'nvmlDeviceGetClockInfo', 'NVML_CLOCK_MEM'),
                                 ('mem_clock_max', 'nvmlDeviceGetMaxClockInfo',
                                  'NVML_CLOCK_MEM'),
                                 ('app_clock', 'nvmlDeviceGetApplicationsClock',
                                  'NVML_CLOCK_GRAPHICS')):
                try:
                    gpu[key] = getattr(pynvml, fn)(h, getattr(pynvml, arg))
                except Exception:  # noqa: BLE001  (not supported on this GPU)
                    pass
            try:
                gpu['persistence'] = bool(pynvml.nvmlDeviceGetPersistenceMode(h))
            except Exception:  # noqa: BLE001
                pass
            gpus.append(gpu)
        return gpus
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def parse_nvidia_smi(text: str) -> List[dict]:
    """Parse ``nvidia-smi --query-gpu=<NVIDIA_SMI_FIELDS> --format=csv,noheader,nounits``.

    Examples:
        >>> parse_nvidia_smi('0, NVIDIA H100, 570.1, Enabled, 345, 1980, 2619, 2619, 1755, '
        ...                  '00000000:18:00.0')[0]['persistence']
        True
    """
    gpus = []
    for line in text.strip().splitlines():
        cells = [c.strip() for c in line.split(',')]
        if len(cells) < len(NVIDIA_SMI_FIELDS):
            continue
        row = dict(zip(NVIDIA_SMI_FIELDS, cells))

        def mhz(key):
            try:
                return int(float(row[key]))
            except ValueError:
                return None
        gpus.append(dict(index=int(row['index']), name=row['name'], driver=row['driver_version'],
                         persistence={'Enabled': True, 'Disabled': False}.get(
                             row['persistence_mode']),
                         sm_clock=mhz('clocks.sm'), sm_clock_max=mhz('clocks.max.sm'),
                         mem_clock=mhz('clocks.mem'), mem_clock_max=mhz('clocks.max.mem'),
                         app_clock=mhz('clocks.applications.graphics'),
                         bus_id=row['pci.bus_id']))
    return gpus


def read_gpus_smi() -> Optional[List[dict]]:
    """GPUs through ``nvidia-smi``; None where it is missing or fails."""
    exe = shutil.which('nvidia-smi')
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, f"--query-gpu={','.join(NVIDIA_SMI_FIELDS)}",
                              '--format=csv,noheader,nounits'], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvidia_smi(out.stdout) if out.returncode == 0 else None


def read_versions() -> dict:
    """Python, torch, CUDA, cuDNN and NCCL versions (None where absent)."""
    versions = dict(python=platform.python_version(), torch=None, cuda=None, cudnn=None,
                    nccl=None)
    try:
        import torch
    except ImportError:
        return versions
    versions['torch'] = torch.__version__
    versions['cuda'] = torch.version.cuda
    if torch.cuda.is_available():
        versions['cudnn'] = torch.backends.cudnn.version()
        try:
            nccl = torch.cuda.nccl.version()
            versions['nccl'] = '.'.join(map(str, nccl)) if isinstance(nccl, tuple) else nccl
        except Exception:  # noqa: BLE001
            pass
    return versions


def collect() -> dict:
    """Read every setting of the report from this machine and process."""
    allowed = allowed_cpus()
    shm = None
    try:
        st = os.statvfs('/dev/shm')
        shm = st.f_blocks * st.f_frsize
    except OSError:
        pass
    try:
        total = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):
        total = None
    gpus = read_gpus_nvml()
    if gpus is None:
        gpus = read_gpus_smi()
    return dict(
        versions=read_versions(),
        thp_mode=thp_mode(), thp_defrag=thp_defrag(),
        governors=read_governors(allowed),
        cpufreq_driver=_read('/sys/devices/system/cpu/cpu0/cpufreq/scaling_driver'),
        online_cpus=os.cpu_count() or len(allowed), allowed_cpus=allowed,
        cpu_quota=read_cgroup_cpu_limit(),
        memory_limit=read_memory_limit(), memory_total=total,
        numa_nodes=read_numa_nodes(),
        shm_size=shm,
        nofile=resource.getrlimit(resource.RLIMIT_NOFILE),
        memlock=resource.getrlimit(resource.RLIMIT_MEMLOCK),
        gpus=gpus or [],
    )
