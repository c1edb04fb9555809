"""Transparent huge pages (THP) for torch's host memory, where the kernel allows them.

What torch does, read from ``c10/core/alloc_cpu.cpp`` (torch 2.x):

* The default CPU allocator (``c10::alloc_cpu``, behind every ordinary CPU tensor) reads the
  environment variable ``THP_MEM_ALLOC_ENABLE`` **once**, into a function-local static, at its
  first allocation. When it is ``1``, buffers of 2 MiB or more are page aligned and
  ``madvise(MADV_HUGEPAGE)``'d, so with the kernel's THP mode ``madvise`` (or ``always``) they
  are backed by 2 MiB pages: fewer page faults on first touch, fewer TLB misses. Setting the
  variable after the process's first CPU tensor does nothing. ``import torch`` itself
  allocates nothing (measured with torch 2.13 here, together with mmdet3d, mmcv and
  turbox_mm), so the runner can still set it before it builds anything; setting it in the
  launcher's environment is the sure way.
* Pinned host memory does **not** come from that allocator. The CUDA caching host allocator
  uses ``cudaHostAlloc`` (driver-allocated pages), or, with the allocator option
  ``pinned_use_cuda_host_register:True``, plain ``malloc`` followed by ``cudaHostRegister``.
  ``THP_MEM_ALLOC_ENABLE`` reaches neither. The second path gets huge pages only where the
  kernel's mode is ``always`` (glibc does not ``madvise`` its blocks unless the process was
  started with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``). :func:`enable_huge_pages` can select
  that path (``pinned_host_register=True``) before CUDA starts, and says what to expect.

:func:`enable_huge_pages` checks ``/sys/kernel/mm/transparent_hugepage/enabled``, sets the
variable, and verifies it by allocating a probe tensor and reading ``AnonHugePages`` from
``/proc/self/smaps_rollup``. Where THP is missing or ``never``, or torch had already read the
variable, it warns once and changes nothing else.
"""
import logging
import os
import re
from dataclasses import dataclass
from typing import Optional

ENV = 'THP_MEM_ALLOC_ENABLE'
THP_ROOT = '/sys/kernel/mm/transparent_hugepage'
MODES = ('always', 'madvise', 'never')
PROBE_BYTES = 8 << 20

_warned = set()


# This module loads standalone (by file path, before torch and turbox_mm are imported, so that
# the setting precedes torch's first allocation), hence its own copies of the two small
# helpers of turbox_mm.utils.system.
def _warn_once(key: str, msg: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    from mmengine.logging import print_log
    print_log(msg, logger='current', level=logging.WARNING)


def parse_bracketed(text: Optional[str]) -> Optional[str]:
    """The selected entry of a sysfs choice list.

    Examples:
        >>> parse_bracketed('always [madvise] never\\n')
        'madvise'
        >>> parse_bracketed(None) is None
        True
    """
    if not text:
        return None
    match = re.search(r'\[([^\]]+)\]', text)
    if match:
        return match.group(1)
    text = text.strip()
    return text or None


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def thp_mode(root: str = THP_ROOT) -> Optional[str]:
    """The kernel's THP mode: ``'always'``, ``'madvise'``, ``'never'``, or None (no THP)."""
    return parse_bracketed(_read(os.path.join(root, 'enabled')))


def thp_defrag(root: str = THP_ROOT) -> Optional[str]:
    """The kernel's THP defrag mode (``'always'``, ``'defer'``, ``'madvise'``, ...) or None."""
    return parse_bracketed(_read(os.path.join(root, 'defrag')))


def anon_huge_kb(pid: str = 'self') -> Optional[int]:
    """``AnonHugePages`` of a process in kB (``/proc/<pid>/smaps_rollup``), or None."""
    text = _read(f'/proc/{pid}/smaps_rollup')
    if text is None:
        text = _read(f'/proc/{pid}/smaps')
        if text is None:
            return None
    total, found = 0, False
    for line in text.splitlines():
        if line.startswith('AnonHugePages:'):
            total += int(line.split()[1])
            found = True
    return total if found else None


def probe_torch_thp(nbytes: int = PROBE_BYTES) -> Optional[bool]:
    """Whether a fresh CPU tensor of ``nbytes`` is backed by huge pages; None if unknowable.

    Allocates and touches the tensor, and compares ``AnonHugePages`` before and after. Note
    that this is itself an allocation: if ``THP_MEM_ALLOC_ENABLE`` was not set yet, torch
    latches it off.
    """
    import torch
    before = anon_huge_kb()
    if before is None:
        return None
    probe = torch.empty(nbytes, dtype=torch.uint8)
    probe.fill_(1)
    after = anon_huge_kb()
    del probe
    return after is not None and after - before >= 2048


@dataclass
class HugePageStatus:
    """What :func:`enable_huge_pages` found and did.

    Attributes:
        mode (str | None): The kernel's THP mode, None where the kernel has no THP.
        defrag (str | None): The kernel's THP defrag mode.
        env_set (bool): ``THP_MEM_ALLOC_ENABLE=1`` is in the environment now.
        effective (bool | None): A probe tensor got huge pages (None: not probed/unknowable).
        pinned_host_register (bool): The pinned-memory allocator was switched to
            ``malloc`` + ``cudaHostRegister``.
        message (str): One line for the start-up report.
    """

    mode: Optional[str]
    defrag: Optional[str]
    env_set: bool
    effective: Optional[bool]
    pinned_host_register: bool
    message: str


def _alloc_conf_var() -> str:
    # torch parses PYTORCH_CUDA_ALLOC_CONF first where set, then PYTORCH_ALLOC_CONF.
    if 'PYTORCH_CUDA_ALLOC_CONF' in os.environ or 'PYTORCH_ALLOC_CONF' not in os.environ:
        return 'PYTORCH_CUDA_ALLOC_CONF'
    return 'PYTORCH_ALLOC_CONF'


def _select_host_register() -> bool:
    import sys
    torch = sys.modules.get('torch')
    if torch is not None and torch.cuda.is_initialized():
        _warn_once('pinned-late', 'enable_huge_pages: CUDA is already initialised, so the '
                   'pinned-memory allocator keeps its setting; set pinned_use_cuda_host_register'
                   ':True in PYTORCH_CUDA_ALLOC_CONF before CUDA starts')
        return False
    var = _alloc_conf_var()
    conf = os.environ.get(var, '')
    if 'pinned_use_cuda_host_register' in conf:
        return 'pinned_use_cuda_host_register:True' in conf.replace(' ', '')
    os.environ[var] = ','.join(x for x in (conf, 'pinned_use_cuda_host_register:True') if x)
    return True


def enable_huge_pages(probe: bool = True,
                      pinned_host_register: bool = False,
                      root: str = THP_ROOT) -> HugePageStatus:
    """Let torch's CPU allocator use transparent huge pages, where the kernel allows.

    Call it before the process's first CPU tensor (torch reads ``THP_MEM_ALLOC_ENABLE`` once,
    at its first allocation): at the top of a launcher, or in the runner before it builds the
    model. An explicit ``THP_MEM_ALLOC_ENABLE=0`` in the environment is respected.

    Args:
        probe (bool): Verify with an 8 MiB probe tensor. Defaults to True.
        pinned_host_register (bool): Also make pinned buffers ``malloc`` + ``cudaHostRegister``
            (``pinned_use_cuda_host_register:True``), the only pinned path THP can reach, and
            only with THP mode ``always``. Must precede CUDA's start. Defaults to False.
        root (str): The THP sysfs directory. Defaults to
            ``/sys/kernel/mm/transparent_hugepage``.

    Returns:
        HugePageStatus: What was found and done.

    Examples:
        >>> status = enable_huge_pages(probe=False)  # doctest: +SKIP
        >>> status.message  # doctest: +SKIP
        'THP madvise (defrag madvise): THP_MEM_ALLOC_ENABLE=1 set (not probed)'
    """
    mode, defrag = thp_mode(root), thp_defrag(root)
    if mode is None:
        msg = f'transparent huge pages: not offered by this kernel ({root} missing); unchanged'
        _warn_once('thp-missing', msg)
        return HugePageStatus(None, defrag, False, None, False, msg)
    if mode == 'never':
        msg = (f'transparent huge pages: the kernel mode is "never"; unchanged (an '
               f'administrator can run: echo madvise > {root}/enabled)')
        _warn_once('thp-never', msg)
        return HugePageStatus(mode, defrag, False, None, False, msg)
    head = f'THP {mode} (defrag {defrag})'
    if os.environ.get(ENV, '1').strip() not in ('1', ''):
        msg = f'{head}: {ENV}={os.environ[ENV]} set by the user; unchanged'
        return HugePageStatus(mode, defrag, False, None, False, msg)
    os.environ[ENV] = '1'
    pinned = _select_host_register() if pinned_host_register else False
    effective = probe_torch_thp() if probe else None
    msg = f'{head}: {ENV}=1 set'
    if effective is None:
        msg += ' (not probed)' if not probe else ' (cannot read /proc smaps to verify)'
    elif effective:
        msg += ', large CPU tensors get huge pages (verified)'
    else:
        msg += (', but a probe tensor got no huge pages: torch had already allocated before '
                f'the variable was set (export {ENV}=1 in the launcher instead)')
        if defrag in ('never', 'defer'):
            msg += f', or defrag "{defrag}" leaves it to khugepaged'
        _warn_once('thp-late', 'enable_huge_pages: ' + msg)
    if pinned:
        msg += ('; pinned buffers use malloc + cudaHostRegister'
                + (' (huge pages under mode always)' if mode == 'always' else
                   ' (no huge pages under mode madvise unless the process was started with '
                   'GLIBC_TUNABLES=glibc.malloc.hugetlb=1)'))
    return HugePageStatus(mode, defrag, True, effective, pinned, msg)


#: Set in the environment of a process that :func:`reexec_for_huge_pages` started.
REEXEC_MARK = 'TURBOX_THP_REEXEC'


def raw_thp_works(nbytes: int = PROBE_BYTES) -> Optional[bool]:
    """Whether this process can get huge pages at all, torch aside; None if unknowable.

    Maps ``nbytes`` of anonymous memory, advises ``MADV_HUGEPAGE``, touches every page and
    reads ``AnonHugePages``: False where the kernel or the process (``prctl
    PR_SET_THP_DISABLE``, memory limits) gives none, which no setting of torch's changes.
    """
    import mmap
    if not hasattr(mmap, 'MADV_HUGEPAGE'):
        return None
    before = anon_huge_kb()
    if before is None:
        return None
    area = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        area.madvise(mmap.MADV_HUGEPAGE)
        for offset in range(0, nbytes, 4096):
            area[offset] = 1
        after = anon_huge_kb()
    finally:
        area.close()
    return after is not None and after - before >= 2048


def reexec_for_huge_pages(wanted: bool, argv=None, root: str = THP_ROOT) -> bool:
    """Restart the launcher once with ``THP_MEM_ALLOC_ENABLE=1`` if torch latched it off.

    torch's CPU allocator reads the variable at its first allocation, and on some machines a
    library import already allocates (measured on the H200 machine: ``tools/train.py`` had
    allocated before the runner could set it, while a process started with the variable
    got huge pages). A launcher calls this after reading its config and before building
    anything. The process replaces itself (``os.execv`` with the interpreter's original
    command line, ``sys.orig_argv``: same PID, interpreter options, ``-m`` / ``-c`` form and
    arguments, and the environment plus the variable, which keeps ``torchrun``'s bookkeeping
    intact) only where all of these hold: huge pages are ``wanted``; the kernel offers them;
    the user has not set the variable; this process can get huge pages at all
    (:func:`raw_thp_works`); and a torch probe shows that torch nonetheless does not, i.e.
    it had latched the setting off. It does so at most once (:data:`REEXEC_MARK`).

    Args:
        wanted (bool): The config's ``turbox.system.huge_pages``.
        argv (list[str], optional): The full command line to restart, interpreter first;
            defaults to ``sys.orig_argv``.
        root (str): The THP sysfs directory.

    Returns:
        bool: False when nothing was needed or possible (otherwise the call does not return).
    """
    import sys
    if not wanted or ENV in os.environ or os.environ.get(REEXEC_MARK):
        return False
    if thp_mode(root) not in ('always', 'madvise'):
        return False
    os.environ[ENV] = '1'
    if probe_torch_thp() is not False:  # in time (or unknowable): the runner goes on as is
        return False
    if not raw_thp_works():  # no huge pages for this process anyway: a restart cannot help
        return False
    argv = list(sys.orig_argv if argv is None else argv)
    os.environ[REEXEC_MARK] = '1'
    print(f'turbox_mm: restarting with {ENV}=1: torch had allocated before the setting could '
          'reach it (turbox.system.huge_pages)', file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable] + argv[1:])
    return True  # not reached
