"""Counting the operations a training step dispatches, by the Python line that issued them.

A step is host-bound when the host cannot issue its kernels as fast as the GPU runs them; in
eager PyTorch each dispatched operation costs the host a roughly fixed time (Python, the
dispatcher, the launch), so the number of operations a step dispatches is a measure of its
host work that needs no GPU. :class:`OpCounter` is a ``TorchDispatchMode`` that counts every
aten operation of a block that does work: views and metadata (``view``, ``permute``,
``expand``, ``detach``, ...) and uninitialised allocations (``empty``, ``empty_strided``) are
counted apart as free, and the profiler's ``record_function`` markers not at all. A custom op
(``turbox_mm::...``) counts once and runs opaque: its CPU implementation is a reference, not
the one kernel it is on the GPU. Operations of the
backward pass are attributed to the forward line that recorded their autograd node (anomaly
mode's tracebacks, as :mod:`turbox_mm.benchmark.sync_prone` does).

What it does not see: operations inside ``torch.compile``d graphs (not dispatched eagerly),
work of libraries outside PyTorch's dispatcher (spconv, custom C++ extensions), and how long
each operation takes on a GPU (a fused kernel and a scalar add count the same).

:func:`count_step_ops` counts one training step of a config (``tools/step_ops.py`` is its
command line).
"""
import collections
import contextlib
import copy
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from turbox_mm.benchmark.sync_prone import (_internal, _python_source, _traceback_source,
                                            call_opaque)

aten = torch.ops.aten
_THIS_FILE = os.path.abspath(__file__)
#: turbox_mm's ops (entry points, registration, dispatch): an op counts at its caller's line.
_OPS_DIR = os.path.join(os.path.dirname(os.path.dirname(_THIS_FILE)), 'ops') + os.sep
#: Operations that launch no kernel: uninitialised allocations and metadata queries.
FREE = frozenset({aten.empty, aten.empty_strided, aten.empty_like, aten.new_empty,
                  aten.new_empty_strided, aten.lift_fresh, aten._unsafe_view, aten._reshape_alias,
                  aten.is_same_size, aten.sym_size, aten.sym_stride, aten.sym_numel,
                  aten.sym_storage_offset, aten.detach, aten.alias, aten.set_})


def _skipped(filename: str) -> bool:
    """Frames the attribution skips: torch, the standard library, generated code
    (:mod:`~turbox_mm.benchmark.sync_prone`'s rule), this file and :mod:`turbox_mm.ops`
    (so a turbox op counts at the model line that calls it)."""
    return _internal(filename) or filename == _THIS_FILE or filename.startswith(_OPS_DIR)


class OpCounter(TorchDispatchMode):
    """Count the dispatched operations of a block by kind and by source line.

    Args:
        backward_sources (bool): Attribute backward operations to the forward line that
            recorded their node (slower: anomaly mode's tracebacks). Defaults to True.

    Attributes:
        ops (Counter): ``op name -> count`` of the counted operations.
        sources (Counter): ``(file, line, backward) -> count``.
        free (int): Views, metadata and uninitialised allocations (not in ``ops``).
        compiled (int): With ``regions`` (a
            :class:`~turbox_mm.benchmark.compiled_regions.CompiledRegions`), the operations
            that would run inside compiled graphs (not in ``ops``).

    Examples:
        >>> x = torch.ones(4, 3)
        >>> with OpCounter(backward_sources=False) as counted:
        ...     y = (x * 2).t().sum()
        >>> counted.total, counted.free, sorted(counted.ops)
        (2, 1, ['aten.mul', 'aten.sum'])
    """

    def __init__(self, backward_sources: bool = True, regions=None) -> None:
        super().__init__()
        self.backward_sources = backward_sources
        self.regions = regions
        self.ops: collections.Counter = collections.Counter()
        self.sources: collections.Counter = collections.Counter()
        self.free = 0
        self.compiled = 0
        self._keys = None
        self._anomaly = None

    @property
    def total(self) -> int:
        """The counted operations (views and the like excluded)."""
        return sum(self.ops.values())

    def _site(self) -> Tuple[str, int, bool]:
        node = torch._C._current_autograd_node()
        if node is not None and self.backward_sources:
            found = _traceback_source(node.metadata.get('traceback_', ()), _skipped)
            if found is not None:
                return (*found, True)
        return (*_python_source(1, _skipped), node is not None)

    def _in_compiled(self) -> bool:
        if self.regions is None:
            return False
        if self.regions.depth > 0:
            return True
        node = torch._C._current_autograd_node()
        return (node is not None and self.backward_sources
                and self.regions.recorded_inside(node.metadata.get('traceback_')))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == 'profiler':  # record_function markers: no device work
            return func(*args, **kwargs)
        packet = func.overloadpacket
        custom = func.namespace not in ('aten', 'prims')
        if not custom and (func.is_view or packet in FREE):
            self.free += 1
        elif self._in_compiled():
            self.compiled += 1
        else:
            self.ops[f'{func.namespace}.{packet.__name__}'] += 1
            self.sources[self._site()] += 1
        if not custom:
            return func(*args, **kwargs)
        # one operation on the device; its CPU reference runs below the mode, not counted
        return call_opaque(self._keys, func, args, kwargs)

    def __enter__(self) -> 'OpCounter':
        if self.backward_sources:
            self._anomaly = torch.autograd.set_detect_anomaly(True, check_nan=False)
            self._anomaly.__enter__()
        self._keys = (torch._C._dispatch_tls_local_include_set(),
                      torch._C._dispatch_tls_local_exclude_set())
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        try:
            super().__exit__(*exc)
        finally:
            if self._anomaly is not None:
                self._anomaly.__exit__(*exc)
                self._anomaly = None

    def top(self, count: int = 20) -> List[Tuple[str, int, bool, int]]:
        """The ``count`` busiest ``(file, line, backward, operations)``."""
        return [(f, line, bwd, n) for (f, line, bwd), n in self.sources.most_common(count)]


@contextlib.contextmanager
def cuda_route_on_cpu() -> Iterator[None]:
    """Run turbox_mm's ops and losses on the CPU by the route they take on CUDA.

    On CUDA the attention ops call their registered op (one kernel) and the turbox focal loss
    ``turbox_mm::sigmoid_focal``; on CPU tensors they call an eager reference and mmdet's own
    loss. Inside this context the CPU takes CUDA's route (the registered op's reference runs
    opaque under :class:`OpCounter`), so a CPU count stands for what the GPU step of a turbox
    head dispatches. Stock code with CUDA-only kernels is not rerouted: mmdet's ``FocalLoss``
    and mmcv's attention run their many-op PyTorch paths on the CPU where the GPU runs one
    kernel, so a stock step's CPU count overstates its GPU step.
    """
    from turbox_mm.models.losses import focal_loss
    from turbox_mm.ops.dispatch import OpDispatch
    saved = OpDispatch.reference_in_eager, focal_loss._on_gpu
    OpDispatch.reference_in_eager = lambda self, tensor: False
    focal_loss._on_gpu = lambda pred: True
    try:
        yield
    finally:
        OpDispatch.reference_in_eager, focal_loss._on_gpu = saved


def _first_batch(cfg) -> dict:
    """The config's first training batch: the dataset's first ``batch_size`` samples (numpy,
    random and torch seeded at 0 first, so the augmentations draw the same every run),
    collated as mmengine's runner collates."""
    import functools
    import random

    import numpy as np
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import FUNCTIONS

    from turbox_mm.registry import DATASETS
    loader = cfg.train_dataloader
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    dataset = DATASETS.build(copy.deepcopy(loader.dataset))
    size = loader.get('batch_size') or (loader.get('batch_sampler') or {}).get('batch_size') or 1
    if len(dataset) < size:
        raise ValueError(f'count_step_ops: the training dataset has {len(dataset)} samples, '
                         f'fewer than a batch ({size})')
    collate = copy.deepcopy(loader.get('collate_fn')) or dict(type=pseudo_collate)
    if callable(collate):
        fn = collate
    else:
        kind = collate.pop('type')
        fn = functools.partial(FUNCTIONS.get(kind) if isinstance(kind, str) else kind,
                               **collate)
    return fn([dataset[i] for i in range(size)])


def count_step_ops(cfg, steps: int = 2, backward_sources: bool = True,
                   device: str = 'cpu', outside_compiled: bool = False
                   ) -> Dict[str, OpCounter]:
    """Count the operations of the last of ``steps`` training steps of ``cfg``'s model.

    As mmengine's ``train_step``: the forward under the wrapper's ``optim_context`` (autocast
    for AMP wrappers, which need a GPU), the loss scaled for the backward. The model is built
    and initialised in the config's ``default_scope`` (mmdet3d's by default; a ``turbox``
    section applied as
    :class:`~turbox_mm.engine.TurboxRunner` applies it, to the config and, with ``ops.fast``,
    to the model (:mod:`~turbox_mm.engine.runner.fast_model`), ``torch.compile`` left out: compiled
    graphs are not dispatched eagerly), then runs ``steps`` steps on the config's first
    training batch; the earlier steps fill caches that a steady-state step would have filled.
    On the CPU the ops take their CUDA route (:func:`cuda_route_on_cpu`).

    Args:
        cfg (Config): A training config.
        steps (int): Steps to run; the last is counted. Defaults to 2.
        backward_sources (bool): See :class:`OpCounter`. Defaults to True.
        device (str): ``'cpu'`` or ``'cuda'``. Defaults to 'cpu'.
        outside_compiled (bool): Count apart (``OpCounter.compiled``) the operations of the
            modules that the config's ``turbox.compile`` compiles
            (:class:`~turbox_mm.benchmark.compiled_regions.CompiledRegions`): what remains is
            what the compiled step still dispatches eagerly. Needs a ``turbox`` section with
            compilation on. Defaults to False.

    Returns:
        dict: ``'forward'`` (the data preprocessor and the losses), ``'backward'`` and
        ``'optimizer'`` (step and zero_grad of the config's optimizer wrapper) counters.
    """
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope

    from turbox_mm.engine.runner.fast_model import apply_fast_model
    from turbox_mm.engine.runner.turbox_options import TURBOX_OPTIONS, apply_turbox_options
    from turbox_mm.registry import MODELS
    from turbox_mm.utils.options import check_options
    if steps < 1:
        raise ValueError(f'count_step_ops: steps must be at least 1, got {steps}')
    cfg = copy.deepcopy(cfg)
    compile_modules = None
    if cfg.get('turbox') is not None:
        options = check_options(cfg.get('turbox'), TURBOX_OPTIONS)
        if options['compile']['enable']:
            compile_modules = options['compile']['modules']
        options['compile'] = dict(options['compile'], enable=False)
        apply_turbox_options(cfg, options)
    if outside_compiled and compile_modules is None:
        raise ValueError('count_step_ops: outside_compiled needs a config whose turbox section '
                         'compiles (turbox.compile.enable=True)')
    route = cuda_route_on_cpu() if device == 'cpu' else contextlib.nullcontext()
    scope = cfg.get('default_scope') or 'mmdet3d'
    with DefaultScope.overwrite_default_scope(scope), route:
        torch.manual_seed(0)
        model = MODELS.build(cfg.model)
        model.init_weights()
        model.to(device).train()
        if cfg.get('turbox') is not None and options['ops']['fast']:
            apply_fast_model(model)
        try:
            wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
        except AssertionError as error:  # mmengine's AmpOptimWrapper asserts a GPU
            if device != 'cpu' or 'Amp' not in str(cfg.optim_wrapper.get('type', '')):
                raise
            raise RuntimeError(
                f'count_step_ops: optim_wrapper {cfg.optim_wrapper.get("type")!r} needs a GPU '
                f'({error}); on the CPU count with '
                "--cfg-options optim_wrapper.type=OptimWrapper (no autocast)") from error
        wrapper.initialize_count_status(model, 0, steps)
        batch = _first_batch(cfg)
        regions = None
        if outside_compiled:
            from turbox_mm.benchmark.compiled_regions import CompiledRegions
            regions = CompiledRegions(model, compile_modules)
        counters: Dict[str, OpCounter] = {}
        for step in range(steps):
            counted = step == steps - 1
            phase = {name: (OpCounter(backward_sources, regions) if counted
                            else contextlib.nullcontext())
                     for name in ('forward', 'backward', 'optimizer')}
            with phase['forward'], wrapper.optim_context(model):  # autocast where AMP
                data = model.data_preprocessor(batch, training=True)
                losses = model(**data, mode='loss')
                loss, _ = model.parse_losses(losses)
            with phase['backward']:
                wrapper.backward(wrapper.scale_loss(loss))
            with phase['optimizer']:
                wrapper.step()
                wrapper.zero_grad()
            if counted:
                counters = phase
    return counters


def format_counts(counters: Dict[str, OpCounter], top: int = 15,
                  root: Optional[str] = None) -> str:
    """A text report: operations per phase, the busiest lines and the commonest ops."""
    def where(file: str, line: int) -> str:
        if root and file.startswith(root.rstrip(os.sep) + os.sep):
            file = file[len(root.rstrip(os.sep)) + 1:]
        elif 'site-packages' + os.sep in file:
            file = file.split('site-packages' + os.sep, 1)[1]
        return f'{file}:{line}'

    regions = any(c.regions is not None for c in counters.values())
    out = ['phase      operations  free (views, metadata)'
           + ('  in compiled modules' if regions else '')]
    for name, counted in counters.items():
        out.append(f'{name:<10} {counted.total:>10}  {counted.free:>10}'
                   + (f'  {counted.compiled:>20}' if regions else ''))
    out.append(f'{"total":<10} {sum(c.total for c in counters.values()):>10}')
    for name, counted in counters.items():
        if not counted.total:
            continue
        how = ' (by the forward line that recorded them)' if name == 'backward' else ''
        out += ['', f'{name}: busiest lines{how}']
        out += [f'  {n:>6}  {where(f, line)}{"  (backward)" if bwd else ""}'
                for f, line, bwd, n in counted.top(top)]
        out.append(f'{name}: commonest operations: ' + ', '.join(
            f'{op} {n}' for op, n in counted.ops.most_common(8)))
    return '\n'.join(out)


def sources_by_file(counter: OpCounter) -> Dict[str, int]:
    """Operations per source file (both passes)."""
    files: Dict[str, int] = collections.Counter()
    for (file, _, _), n in counter.sources.items():
        files[file] += n
    return dict(files)


__all__: Sequence[str] = ('OpCounter', 'count_step_ops', 'cuda_route_on_cpu', 'format_counts',
                          'sources_by_file')
