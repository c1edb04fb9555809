"""Finding, on the CPU, the operations that would make the host wait for a CUDA device.

:class:`~turbox_mm.benchmark.syncs.SyncCounter` counts the synchronisations CUDA's debug mode
reports, which needs a GPU. :class:`SyncProneOps` is its heuristic stand-in for machines
without one (tests, CI): a ``TorchDispatchMode`` that sees every aten operation of a block run
on the CPU and records, with the Python line that caused it, each one that on CUDA would

- **read a device value on the host** (kind ``'sync'``): ``_local_scalar_dense`` (``.item()``,
  ``int()``, ``float()``, ``bool()``, ``if tensor:``, a tensor in Python's ``max``),
  ``is_nonzero``, ``equal``, or an operation whose output size depends on the data:
  ``nonzero`` (``torch.where(cond)``, ``argwhere``), ``masked_select``, indexing or index
  assignment with a boolean mask, ``unique*``, ``bincount``, ``histc``, ``repeat_interleave``
  without ``output_size``; ``masked_fill`` / ``index_fill`` with a device tensor as the value
  (read with ``.item()``), and the error check of ``torch.inverse`` and friends
  (``_linalg_check_errors``);
- **copy host data to the device** (kind ``'h2d'``): ``x.new_tensor(...)``,
  ``torch.tensor(..., device=...)``, a host tensor ``.to(device)`` (not ``non_blocking``),
  Python lists as indices (``t[:, [0, 1]]``), a Python scalar assigned through advanced
  indexing (``t[idx] = 1.0``: torch makes the value on the host), any host tensor meeting
  device tensors in one operation;
- **copy device data to the host** (kind ``'d2h'``): ``.cpu()``, ``.to('cpu')``, ``.tolist()``,
  ``.numpy()`` of a device tensor.

How host and device are told apart on a CPU-only run: a tensor is *host data* when it was made
from Python or NumPy data (``aten.lift_fresh``: ``torch.tensor``, ``torch.from_numpy``,
``torch.as_tensor``, list indices, Python scalars in ``__setitem__``), copied to the host
(above), or computed from host data only; everything else (parameters, inputs, every factory
such as ``zeros`` / ``arange``, results that involve a device tensor) counts as on the device.
Host data handed to :func:`turbox_mm.utils.upload.upload` (pinned, non-blocking) or moved with
``non_blocking=True`` becomes device data without a finding, as CUDA's debug mode reports no
sync for those. A 0-dim host tensor used as an operand is a CPU scalar (no copy on CUDA) except
where it is written into a device tensor by ``index_put`` or ``copy_``. Operations on host data
alone are host work and are not reported. Each host tensor is reported once, at the line where
the host data came from (for ``new_tensor``, list indices and scalar assignment the line of the
operation itself, where CUDA's debug mode reports it too), then counts as uploaded.

It is a heuristic, not CUDA's own count:

- False positives: host data copied into device tensors with ``copy_(..., non_blocking=True)``
  from pinned memory (only ``upload`` and ``.to(..., non_blocking=True)`` are known to be
  non-blocking); ``.tolist()`` / ``.numpy()`` / ``.item()`` of tensors that on CUDA live on the
  host but here were not made from host data in the block (e.g. fields of the data samples that
  the data preprocessor left on the host); ``.to('cpu')`` (the literal string) of a tensor that
  is on the host anyway.
- False negatives: a device-to-host move written with a ``torch.device``
  (``.to(torch.device('cpu'))``, ``.to(host_tensor.device)``: on the CPU the same as a move
  that stays on the device); a factory without ``device=`` (on CUDA made on the host) that
  later meets device tensors; synchronising operations of libraries called outside PyTorch's
  dispatcher (custom C++/CUDA extensions that call ``.item()`` internally); the inside of
  custom ``torch.library`` ops (turbox_mm's kernels), which run opaque, as one operation,
  because their CPU implementation is a PyTorch reference and not what runs on the device (a
  host read in a kernel's launcher is not seen); explicit ``torch.cuda.synchronize()`` and
  events (not operations); CUDA-only branches the CPU run does not take (code testing
  ``is_cuda``, e.g. mmdet's ``FocalLoss`` runs mmcv's kernel, with its host read, only on
  CUDA), ``pin_memory`` allocation stalls, the caching allocator's ``cudaFree`` syncs; ops
  inside ``torch.compile``d graphs (not dispatched eagerly).
- Attribution: the innermost Python frame outside torch (and this module); for an operation
  of the backward pass, with ``backward_sources`` the forward line that recorded its autograd
  node (anomaly mode's tracebacks, without its NaN checks), else the ``.backward()`` line.
"""
import collections
import os
import re
import sys
import sysconfig
import threading
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

from .syncs import format_sources

aten = torch.ops.aten

#: Operations that synchronise on CUDA whenever they touch device data (by overload packet).
SYNC_OPS = {
    aten._local_scalar_dense: 'value read on the host',
    aten.is_nonzero: 'value read on the host',
    aten.equal: 'value read on the host',
    aten.nonzero: 'data-dependent output size',
    aten.masked_select: 'data-dependent output size',
    aten._unique: 'data-dependent output size',
    aten._unique2: 'data-dependent output size',
    aten.unique_dim: 'data-dependent output size',
    aten.unique_consecutive: 'data-dependent output size',
    aten.unique_dim_consecutive: 'data-dependent output size',
    aten.bincount: 'data-dependent output size',
    aten.histc: 'range read on the host',
    aten._linalg_check_errors: 'error check read on the host',
}
#: Indexing whose index may be a boolean mask (a mask index is a ``nonzero``).
INDEX_OPS = (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_,
             aten._unsafe_index, aten._unsafe_index_put)
#: Fills whose Tensor value is read with ``.item()`` on CUDA, with the value's position.
VALUE_READ_FILLS = {aten.masked_fill: 2, aten.masked_fill_: 2, aten.index_fill: 3,
                    aten.index_fill_: 3}
#: Operations that write a 0-dim operand into device memory (a host scalar is copied).
SCALAR_WRITES = (aten.index_put, aten.index_put_, aten._index_put_impl_, aten._unsafe_index_put,
                 aten.copy_, aten.copy)
LIFTS = (aten.lift_fresh, aten.lift_fresh_copy)
#: Files whose uploads are pinned and non-blocking (no host wait on CUDA).
UPLOADERS = ('turbox_mm/utils/upload.py', )

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_STDLIB_DIR = sysconfig.get_paths()['stdlib'] + os.sep
_THIS_FILE = os.path.abspath(__file__)
_TRACEBACK_LINE = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+)')


class Finding(NamedTuple):
    """One sync-prone operation: ``kind`` (``'sync'``, ``'h2d'``, ``'d2h'``), the aten ``op``
    (or the method), why, the source ``file`` and ``line``, and whether it ran in backward."""
    kind: str
    op: str
    why: str
    file: str
    line: int
    backward: bool


def _internal(filename: str) -> bool:
    """Frames the attribution skips: torch, the standard library (not packages installed
    under it), this module, frozen or generated code."""
    stdlib = filename.startswith(_STDLIB_DIR) and not any(
        d in filename for d in ('site-packages', 'dist-packages'))
    return (filename.startswith(_TORCH_DIR) or stdlib or filename == _THIS_FILE
            or filename.startswith('<'))


def _python_source(skip: int = 0,
                   internal: Callable[[str], bool] = _internal) -> Tuple[str, int]:
    """``(file, line)`` of the innermost frame whose file is not ``internal`` (by default:
    outside torch, the standard library and this module)."""
    frame = sys._getframe(skip + 1)
    last = None
    while frame is not None:
        filename = frame.f_code.co_filename
        last = (filename, frame.f_lineno)
        if not internal(filename):
            return last
        frame = frame.f_back
    return last or ('<unknown>', 0)


def _traceback_source(lines: Sequence[str], internal: Callable[[str], bool] = _internal
                      ) -> Optional[Tuple[str, int]]:
    """The innermost frame of a formatted traceback (anomaly mode's) whose file is not
    ``internal``."""
    for entry in reversed(lines):
        match = _TRACEBACK_LINE.search(entry)
        if match and not internal(match.group('file')):
            return match.group('file'), int(match.group('line'))
    return None


def call_opaque(keys: Tuple[Any, Any], func, args, kwargs) -> Any:
    """Run a custom op as one operation under a dispatch mode: with the dispatch keys
    ``keys`` that held when the mode was entered (so its insides reach no Python mode) and
    without autograd (its CPU implementation is not what runs on the device)."""
    with torch._C._ForceDispatchKeyGuard(*keys), torch.no_grad():
        return func(*args, **kwargs)


def _on_stack(files: Sequence[str]) -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename.replace(os.sep, '/')
        if any(filename.endswith(f) for f in files):
            return True
        frame = frame.f_back
    return False


def _is_literal_cpu(value: Any) -> bool:
    return isinstance(value, str) and value.split(':')[0] == 'cpu'


class SyncProneOps(TorchDispatchMode):
    """Record the operations of a ``with`` block that would synchronise the host on CUDA
    (module docstring: what counts, and what the heuristic gets wrong).

    Args:
        backward_sources (bool): Attribute backward operations to the forward line that made
            their autograd node (turns on anomaly mode's tracebacks, without NaN checks, for
            the block: slower). Defaults to True.
        uploaders (Sequence[str]): Path endings of files whose host-to-device copies are
            non-blocking. Defaults to :data:`UPLOADERS`.

    Attributes:
        total (int): Findings.
        sources (Counter): ``(file, line)`` of each finding.
        findings (list[Finding]): Every finding, in order.

    Examples:
        >>> x = torch.ones(3)
        >>> with SyncProneOps() as found:
        ...     y = x * 2
        ...     n = int(y.sum())
        ...     z = y / y.new_tensor([1.0, 2.0, 4.0])
        >>> found.total, sorted({f.kind for f in found.findings})
        (2, ['h2d', 'sync'])
    """

    def __init__(self, backward_sources: bool = True,
                 uploaders: Sequence[str] = UPLOADERS) -> None:
        super().__init__()
        self.backward_sources = backward_sources
        self.uploaders = tuple(uploaders)
        self.findings: List[Finding] = []
        self.sources: collections.Counter = collections.Counter()
        self._host = WeakTensorKeyDictionary()  # host tensor -> (file, line) of its data
        self._patches: List[Tuple[Any, str, bool, Any]] = []
        self._anomaly = None
        self._thread: Optional[int] = None
        self._keys = None
        self._opaque = 0  # > 0 inside a custom op (its CPU implementation is not the device's)

    @property
    def total(self) -> int:
        return len(self.findings)

    # -- recording ------------------------------------------------------------------------------

    def _site(self) -> Tuple[Tuple[str, int], bool]:
        node = torch._C._current_autograd_node()
        if node is None:
            return _python_source(2), False
        if self.backward_sources:
            found = _traceback_source(node.metadata.get('traceback_', ()))
            if found is not None:
                return found, True
        return _python_source(2), True

    def _record(self, kind: str, op: str, why: str,
                site: Optional[Tuple[str, int]] = None) -> None:
        here, backward = self._site()
        file, line = site or here
        self.findings.append(Finding(kind, op, why, file, line, backward))
        self.sources[(file, line)] += 1

    def _here(self) -> bool:
        """Whether the caller is the block's thread (the method patches are process-wide) and
        outside a custom op."""
        return threading.get_ident() == self._thread and not self._opaque

    def _is_host(self, value: Any) -> bool:
        return isinstance(value, torch.Tensor) and value in self._host

    def _mark_host(self, outputs: Any, site: Tuple[str, int]) -> None:
        for out in tree_leaves(outputs):
            if isinstance(out, torch.Tensor):
                self._host[out] = site

    # -- the dispatch mode ----------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in ('aten', 'prims'):
            out = func(*args, **kwargs)
        else:  # a custom op: opaque, run with the dispatch keys of the block (module docstring)
            self._opaque += 1
            try:
                out = call_opaque(self._keys, func, args, kwargs)
            finally:
                self._opaque -= 1
        packet = func.overloadpacket
        if packet in LIFTS:
            if not _on_stack(self.uploaders):
                self._mark_host(out, _python_source(1))
            return out
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        host = [t for t in inputs if t in self._host]
        if inputs and len(host) == len(inputs):  # host work on host data
            self._mark_host(out, self._host[host[0]])
            return out
        name = str(func)
        if host:
            self._mixed(packet, name, args, host)
        if packet in SYNC_OPS:
            self._record('sync', name, SYNC_OPS[packet])
        elif packet in INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get('indices', ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                   for i in indices or ()):
                self._record('sync', name, 'boolean mask index (a nonzero)')
        elif packet is aten.repeat_interleave and kwargs.get('output_size') is None:
            self._record('sync', name, 'data-dependent output size (no output_size)')
        elif packet in VALUE_READ_FILLS:
            position = VALUE_READ_FILLS[packet]
            value = args[position] if len(args) > position else kwargs.get('value')
            if isinstance(value, torch.Tensor) and value not in self._host:
                self._record('sync', name, 'device tensor fill value read on the host')
        return out

    def _mixed(self, packet, name: str, args: Sequence, host: List[torch.Tensor]) -> None:
        """Host and device tensors in one operation: a copy into a host tensor is a
        device-to-host copy; else each non-scalar host tensor (and a host scalar written into
        device memory) is a host-to-device copy, recorded at its data's source."""
        if packet in (aten.copy_, aten.copy) and args and self._is_host(args[0]):
            self._record('d2h', name, 'device data copied into a host tensor')
            return
        writes = packet in SCALAR_WRITES
        for tensor in host:
            if tensor.dim() == 0 and not writes:
                continue  # a CPU scalar operand: no copy on CUDA
            self._record('h2d', name, 'host data used with device tensors',
                         self._host.pop(tensor))

    # -- Python-level entry points the dispatcher does not show as moves ------------------------

    def _patch(self, owner: Any, name: str, make: Callable[[Callable], Callable]) -> None:
        own = name in vars(owner)
        self._patches.append((owner, name, own, vars(owner).get(name)))
        setattr(owner, name, make(getattr(owner, name)))

    def _install(self) -> None:
        # torch records its functions by identity in tables built on first use: Dynamo's
        # (when it is imported) and the device context's list of factories (on the first
        # `with torch.device(...)`). Built inside the block (a lazy import or first use by
        # the code under test), they would hold the wrappers below in place of
        # torch.tensor / torch.as_tensor for the rest of the process: every later graph
        # breaks at the real functions ("function marked as skipped"), and a device context
        # no longer moves them. Build both from the unpatched module first.
        import torch._dynamo  # noqa: F401
        import torch.utils._device
        torch.utils._device._device_constructors()
        mode = self

        def new_tensor(original):
            def wrapper(self, *args, **kwargs):
                out = original(self, *args, **kwargs)
                if mode._here() and self not in mode._host and not _on_stack(mode.uploaders):
                    mode._host.pop(out, None)
                    mode._record('h2d', 'Tensor.new_tensor', 'host data copied to the device')
                return out
            return wrapper

        def factory(original, name):
            def wrapper(*args, **kwargs):
                out = original(*args, **kwargs)
                device = kwargs.get('device')
                if mode._here() and device is not None and not _is_literal_cpu(device) \
                        and out in mode._host and not _on_stack(mode.uploaders):
                    mode._host.pop(out, None)
                    mode._record('h2d', name, 'host data copied to the device')
                return out
            return wrapper

        def to(original):
            def wrapper(self, *args, **kwargs):
                if not mode._here():
                    return original(self, *args, **kwargs)
                device, _, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
                literal_cpu = any(_is_literal_cpu(a) for a in args) or _is_literal_cpu(
                    kwargs.get('device'))
                out = original(self, *args, **kwargs)
                if device is None:
                    return out
                if self in mode._host and not literal_cpu:  # an upload
                    mode._host.pop(out, None)
                    if out is not self:
                        mode._host.pop(self, None)
                    if not (non_blocking or _on_stack(mode.uploaders)):
                        mode._record('h2d', 'Tensor.to', 'host data copied to the device')
                elif literal_cpu and self not in mode._host:
                    out = out.clone() if out is self else out  # a host copy, as on CUDA
                    if not non_blocking:
                        mode._record('d2h', 'Tensor.to', 'device data copied to the host')
                    mode._mark_host(out, _python_source(1))
                return out
            return wrapper

        def cpu(original):
            def wrapper(self, *args, **kwargs):
                out = original(self, *args, **kwargs)
                if not mode._here() or self in mode._host:
                    return out
                out = out.clone() if out is self else out
                mode._record('d2h', 'Tensor.cpu', 'device data copied to the host')
                mode._mark_host(out, _python_source(1))
                return out
            return wrapper

        def read(original, name):
            def wrapper(self, *args, **kwargs):
                if mode._here() and self not in mode._host:
                    mode._record('d2h', name, 'device data read on the host')
                return original(self, *args, **kwargs)
            return wrapper

        self._patch(torch.Tensor, 'new_tensor', new_tensor)
        self._patch(torch.Tensor, 'to', to)
        self._patch(torch.Tensor, 'cpu', cpu)
        self._patch(torch.Tensor, 'tolist', lambda f: read(f, 'Tensor.tolist'))
        self._patch(torch.Tensor, 'numpy', lambda f: read(f, 'Tensor.numpy'))
        for name in ('tensor', 'as_tensor'):
            self._patch(torch, name, lambda f, n=name: factory(f, f'torch.{n}'))

    def _uninstall(self) -> None:
        for owner, name, own, original in reversed(self._patches):
            if own:
                setattr(owner, name, original)
            else:  # inherited (torch._C.TensorBase's method): remove the shadow
                delattr(owner, name)
        self._patches = []

    def __enter__(self) -> 'SyncProneOps':
        if self.backward_sources:
            self._anomaly = torch.autograd.set_detect_anomaly(True, check_nan=False)
            self._anomaly.__enter__()
        self._thread = threading.get_ident()
        self._keys = (torch._C._dispatch_tls_local_include_set(),
                      torch._C._dispatch_tls_local_exclude_set())
        self._install()
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._uninstall()
            if self._anomaly is not None:
                self._anomaly.__exit__(*exc)
                self._anomaly = None

    # -- reports --------------------------------------------------------------------------------

    def top(self, count: int = 20) -> List[Tuple[str, int, int]]:
        """The ``count`` most frequent ``(file, line, findings)``."""
        return [(f, line, n) for (f, line), n in self.sources.most_common(count)]

    def outside(self, allowed: Sequence[Tuple[str, Optional[int]]] = ()) -> List[Finding]:
        """The findings not in ``allowed``: ``(path ending, line)`` pairs, line None for any
        line of the file."""
        def ok(finding: Finding) -> bool:
            path = finding.file.replace(os.sep, '/')
            return any(path.endswith(end) and (line is None or line == finding.line)
                       for end, line in allowed)
        return [f for f in self.findings if not ok(f)]

    def table(self, iters: int = 1, root: Optional[str] = None) -> str:
        """Findings per iteration by source, with the operations seen there."""
        ops: Dict[Tuple[str, int], collections.Counter] = collections.defaultdict(
            collections.Counter)
        for f in self.findings:
            ops[(f.file, f.line)][f'{f.kind}:{f.op}{" (bwd)" if f.backward else ""}'] += 1
        rows = format_sources(self.top(len(self.sources)), iters).splitlines()
        out = [rows[0]]
        for row, (file, line, _) in zip(rows[1:], self.top(len(self.sources))):
            if root:
                row = row.replace(root.rstrip(os.sep) + os.sep, '')
            out.append(f'{row}  {", ".join(sorted(ops[(file, line)]))}')
        return '\n'.join(out)
