"""Exponential moving average whose update is a few foreach calls, replayed as a CUDA graph.

mmengine's :class:`~mmengine.model.ExponentialMovingAverage` updates the averaged model one
tensor at a time: per step it walks the source model (``named_parameters()`` or
``state_dict()``), launches one ``lerp_`` per floating-point tensor and one ``copy_`` per
buffer. For a ResNet-50 + FPN that is ~330 kernel launches and a few milliseconds of Python per
training step, while the arithmetic itself (read two copies of the weights, write one) takes a
fraction of a millisecond on a current GPU.

:class:`GraphExponentialMovingAverage` computes the same thing with one
``torch._foreach_lerp_`` per (device, dtype) group and one ``torch._foreach_copy_`` for the
buffers. On CUDA, after a few eager warm-up updates on a side stream, the update is captured
once in a :class:`torch.cuda.CUDAGraph` and replayed every step, so one step costs a single
graph launch plus a cheap check that the captured tensors are still the models' tensors.

Semantics are mmengine's, step for step: ``steps`` counts calls; step 0 copies; afterwards
every ``interval``-th call averages the floating-point tensors with
``averaged = (1 - momentum) * averaged + momentum * source`` (integer entries such as
``num_batches_tracked`` are left alone, as mmengine leaves them, when ``update_buffers=True``);
with ``update_buffers=False`` the buffers are copied from the source on every call. The state
dict is the same (``steps`` and ``module.*``), so checkpoints move freely between the two
classes.

When a captured graph would be stale, it is captured again:

* a source or averaged tensor's storage moved (``p.data = ...``, ``model.to(...)``,
  ``load_state_dict(..., assign=True)``), or a parameter, buffer or submodule of either model
  was replaced by assignment; a check of object identities and data pointers before every
  replay finds these;
* ``momentum`` changed (it is a kernel argument of the graph).

If that happens nearly every step (8 captures, each replayed fewer than 4 times on average),
graphs are given up with one warning.

In-place changes (the optimizer's step, ``load_state_dict`` without ``assign``, the EMA hook's
swap for validation) keep every address and need no new capture.

Where no graph can be used (CPU, tensors on several devices, an averaged model on another
device than its source, a capture that fails, or ``use_graph=False``) the same foreach update
runs eagerly, with one log line saying why (a warning where a capture failed, debug level on
a CPU-only run). Subclasses that
override ``avg_func`` (momentum annealing and the like) get mmengine's per-tensor update
unchanged.
"""
import logging
import numbers
import operator
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.model import ExponentialMovingAverage
from torch import Tensor

from turbox_mm.registry import MODELS

# The update kinds that are captured: 'lerp' averages (and copies buffers), 'copy' only copies
# the buffers (calls between two averaging steps when interval > 1).
_LERP, _COPY = 'lerp', 'copy'
# After this many captures, graphs are given up if each one was replayed fewer than 4 times.
_MAX_CHURN_CAPTURES = 8


def _group(pairs: List[Tuple[Tensor, Tensor]]) -> List[Tuple[List[Tensor], List[Tensor]]]:
    """Split (averaged, source) pairs into lists that one foreach call can take.

    A foreach kernel takes one device and one dtype, so pairs are grouped by the device and
    dtype of both sides. A tensor that appears more than once (a tied weight listed under two
    state-dict keys) goes to a later group each time it repeats, so no foreach call writes the
    same memory twice and repeated updates apply in order, as mmengine's loop does. Empty
    tensors are left out.
    """
    seen: Dict[int, int] = {}
    groups: Dict[tuple, Tuple[List[Tensor], List[Tensor]]] = {}
    for avg, src in pairs:
        if avg.numel() == 0:
            continue
        ptr = avg.data_ptr()
        rank = seen.get(ptr, 0)
        seen[ptr] = rank + 1
        key = (rank, avg.device, avg.dtype, src.device, src.dtype)
        avg_list, src_list = groups.setdefault(key, ([], []))
        avg_list.append(avg)
        src_list.append(src)
    return [groups[k] for k in sorted(groups, key=lambda k: k[0])]


class _Watch:
    """Object identities and data pointers that a captured update depends on.

    ``slots`` are ``(dict, key, object)`` triples: a module's ``_parameters``, ``_buffers`` or
    ``_modules`` dict and the object it held when the update was planned. ``tensors`` are the
    tensors whose storage the update reads or writes.
    """

    def __init__(self) -> None:
        self.dicts: List[dict] = []
        self.keys: List[str] = []
        self.objects: List[object] = []
        self.tensors: List[Tensor] = []
        self.ptrs: List[int] = []

    def slot(self, owner: dict, key: str) -> None:
        self.dicts.append(owner)
        self.keys.append(key)
        self.objects.append(owner[key])

    def watch_module_tree(self, root: nn.Module) -> None:
        """Watch every submodule edge, so replacing a submodule is noticed."""
        for module in root.modules():
            for name, child in module._modules.items():
                if child is not None:
                    self.slot(module._modules, name)

    def freeze(self, tensors: List[Tensor]) -> None:
        self.tensors = list(tensors)
        self.ptrs = list(map(Tensor.data_ptr, self.tensors))

    def valid(self) -> bool:
        """Whether every watched slot holds the same object and every tensor the same storage."""
        current = map(dict.get, self.dicts, self.keys)
        if not all(map(operator.is_, current, self.objects)):
            return False
        return list(map(Tensor.data_ptr, self.tensors)) == self.ptrs


def _tensor_slot(root: nn.Module, name: str) -> Optional[Tuple[dict, str]]:
    """The ``(module._parameters or module._buffers, key)`` that holds tensor ``name``."""
    prefix, _, key = name.rpartition('.')
    try:
        owner = root.get_submodule(prefix) if prefix else root
    except AttributeError:
        return None
    for table in (owner._parameters, owner._buffers):
        if table.get(key) is not None:
            return table, key
    return None


class _Plan:
    """The tensor pairs of one update between an averaged model and one source model.

    Built from the same walks that mmengine's ``update_parameters`` makes, so the pairing is
    mmengine's: ``avg_parameters`` keys looked up in the source by name, and buffers paired in
    ``buffers()`` order when buffers are not averaged. The foreach calls get ``.data`` aliases;
    the watch keeps the tensors themselves, whose storage ``p.data = ...`` would move.
    """

    def __init__(self, ema: 'GraphExponentialMovingAverage', model: nn.Module) -> None:
        self.model = model
        self.ok = False
        self.missing = ''
        watch = _Watch()
        if ema.update_buffers:
            src_named = dict(model.named_parameters(remove_duplicate=False))
            src_named.update(model.named_buffers(remove_duplicate=False))
        else:
            src_named = dict(model.named_parameters())
        watched: List[Tensor] = []
        state_pairs = []
        for name, avg in ema.avg_parameters.items():
            src = src_named.get(name)
            slot = _tensor_slot(model, name)
            if src is None or slot is None:
                self.missing = name
                return
            watch.slot(*slot)
            watched += [avg, src]
            state_pairs.append((avg.data, src.data))
        buffer_pairs = []
        if not ema.update_buffers:
            # mmengine pairs buffers by position in buffers(); the names only serve to watch
            # the dicts that hold them.
            avg_bufs = list(ema.module.named_buffers())
            src_bufs = list(model.named_buffers())
            for (avg_name, avg), (src_name, src) in zip(avg_bufs, src_bufs):
                for root, name in ((ema.module, avg_name), (model, src_name)):
                    slot = _tensor_slot(root, name)
                    if slot is not None:
                        watch.slot(*slot)
                watched += [avg, src]
                buffer_pairs.append((avg.data, src.data))
        watch.watch_module_tree(model)
        watch.watch_module_tree(ema.module)
        watch.freeze(watched)
        self.watch = watch
        self.lerp_groups = _group([(a, s) for a, s in state_pairs if a.dtype.is_floating_point])
        self.copy_groups = _group(buffer_pairs)
        self.all_copy_groups = _group(state_pairs + buffer_pairs)
        devices = {t.device for t in watched}
        self.device = next(iter(devices)) if len(devices) == 1 else None
        if not devices:
            self.why_eager = 'the model has no tensors'
        elif self.device is None:
            self.why_eager = ('the averaged and source tensors are on several devices: '
                              + ', '.join(sorted(str(d) for d in devices)))
        elif self.device.type != 'cuda':
            self.why_eager = f'the tensors are on {self.device.type}'
        else:
            self.why_eager = None
        self.ok = True

    def run(self, kind: str, momentum: float) -> None:
        """Enqueue one update of ``kind`` (``'lerp'`` or ``'copy'``)."""
        if kind == _LERP:
            for avg, src in self.lerp_groups:
                torch._foreach_lerp_(avg, _on_device(src, avg[0].device), momentum)
        for avg, src in self.copy_groups:
            torch._foreach_copy_(avg, _on_device(src, avg[0].device))

    def copy_all(self) -> None:
        """Copy every planned source tensor into its averaged tensor (mmengine's step 0)."""
        for avg, src in self.all_copy_groups:
            torch._foreach_copy_(avg, _on_device(src, avg[0].device))


def _on_device(tensors: List[Tensor], device: torch.device) -> List[Tensor]:
    """``tensors`` moved to ``device`` (one group shares a device), as mmengine's ``.to``."""
    if tensors[0].device == device:
        return tensors
    return [t.to(device) for t in tensors]


class _Runtime:
    """What a :class:`GraphExponentialMovingAverage` keeps between calls; never serialised."""

    def __init__(self) -> None:
        self.plan: Optional[_Plan] = None
        self.graphs: Dict[str, 'torch.cuda.CUDAGraph'] = {}
        self.graph_momentum: Optional[float] = None
        self.stream: Optional['torch.cuda.Stream'] = None
        self.eager_updates = 0
        self.steps: Optional[int] = None
        self.steps_tensor: Optional[Tensor] = None
        self.steps_version = -1
        self.graph_disabled: Optional[str] = None
        self.logged: set = set()
        # Counters for tests and logs.
        self.captures = 0
        self.replays = 0
        self.plans = 0


@MODELS.register_module()
class GraphExponentialMovingAverage(ExponentialMovingAverage):
    r"""Exponential moving average of a model, updated by foreach ops replayed as a CUDA graph.

    A drop-in for :class:`mmengine.model.ExponentialMovingAverage` (same arguments, formula,
    ``interval`` and ``steps`` semantics and state dict):

    .. math::

        Xema_{t+1} = (1 - momentum) * Xema_{t} + momentum * X_t

    Each update is one ``torch._foreach_lerp_`` per (device, dtype) group plus one
    ``torch._foreach_copy_`` for buffers. On CUDA the update is captured once in a
    :class:`torch.cuda.CUDAGraph` after ``warmup`` eager updates and then replayed; it is
    captured again when a tensor it touches moves or is replaced, or when ``momentum`` changes.
    Only the EMA update is captured (never the optimizer), in thread-local capture mode so that
    data-loader threads may use CUDA meanwhile. ``steps`` is mirrored on the host, so an update
    never synchronises with the device.

    Args:
        model (nn.Module): The model to average (unwrapped; the EMA hook unwraps DDP).
        momentum (float): Weight of the source in each update. Defaults to 0.0002.
        interval (int): Average every ``interval`` calls. Defaults to 1.
        device (torch.device, optional): Where to keep the averaged model. Defaults to None
            (the source's device). A device other than the source's runs eagerly.
        update_buffers (bool): Average the floating-point buffers too (integer ones are left
            alone after the first copy, as in mmengine); otherwise copy all buffers every call.
            Defaults to False.
        use_graph (bool): Capture and replay CUDA graphs where possible. Defaults to True.
        warmup (int): Eager updates, on a side stream, before the first capture.
            Defaults to 3.

    Examples:
        >>> import torch.nn as nn
        >>> from turbox_mm.engine.hooks.graph_ema import GraphExponentialMovingAverage
        >>> model = nn.Linear(4, 2)
        >>> ema = GraphExponentialMovingAverage(model, momentum=0.5)
        >>> ema.update_parameters(model)  # step 0 copies
        >>> _ = nn.init.zeros_(model.weight)
        >>> ema.update_parameters(model)  # averages
        >>> int(ema.steps)
        2
    """

    def __init__(self,
                 model: nn.Module,
                 momentum: float = 0.0002,
                 interval: int = 1,
                 device: Optional[torch.device] = None,
                 update_buffers: bool = False,
                 use_graph: bool = True,
                 warmup: int = 3) -> None:
        if not isinstance(interval, numbers.Integral) or interval < 1:
            raise ValueError(f'GraphExponentialMovingAverage: interval must be an int >= 1, '
                             f'got {interval!r}')
        if not isinstance(warmup, numbers.Integral) or warmup < 0:
            raise ValueError(f'GraphExponentialMovingAverage: warmup must be an int >= 0, '
                             f'got {warmup!r}')
        super().__init__(model, momentum=momentum, interval=interval, device=device,
                         update_buffers=update_buffers)
        self.use_graph = bool(use_graph)
        self.warmup = warmup
        self._runtime = _Runtime()

    # -- public counters -------------------------------------------------------------------

    @property
    def num_captures(self) -> int:
        """How many CUDA graphs this instance has captured (0 where it runs eagerly)."""
        return self._runtime.captures

    @property
    def num_plans(self) -> int:
        """How many times the tensor pairs were (re)collected from the models."""
        return self._runtime.plans

    @property
    def graph_active(self) -> bool:
        """Whether updates currently replay a captured graph (False on the eager path)."""
        rt = self._runtime
        return bool(rt.graphs) and rt.graph_disabled is None

    # -- the update ------------------------------------------------------------------------

    def update_parameters(self, model: nn.Module) -> None:
        """Update the averaged tensors from ``model``, as mmengine's method does.

        Args:
            model (nn.Module): The source model (the same one, or one of the same structure,
                every call).
        """
        if type(self).avg_func is not ExponentialMovingAverage.avg_func:
            self._log_once('avg_func', f'{type(self).__name__} overrides avg_func; using '
                           'mmengine\'s per-tensor update', logging.INFO)
            return super().update_parameters(model)
        plan = self._plan(model)
        if plan is None:
            return super().update_parameters(model)
        step = self._host_steps()
        if step == 0:
            plan.copy_all()
        elif step % self.interval == 0:
            self._run(plan, _LERP)
        elif plan.copy_groups:
            self._run(plan, _COPY)
        self.steps.add_(1)
        rt = self._runtime
        rt.steps = step + 1
        rt.steps_version = self.steps._version

    def copy_from(self, model: nn.Module) -> None:
        """Copy ``model``'s whole state dict into the averaged model, without averaging.

        What :class:`~mmengine.hooks.EMAHook` does on iterations before ``begin_iter`` /
        ``begin_epoch``, with grouped foreach copies instead of one copy per tensor.

        Args:
            model (nn.Module): The source model.
        """
        avg_state = self.module.state_dict()
        src_state = model.state_dict()
        pairs = [(avg, src_state[name].to(avg.device)) for name, avg in avg_state.items()]
        for avg, src in _group(pairs):
            torch._foreach_copy_(avg, src)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a state dict as :meth:`torch.nn.Module.load_state_dict` does.

        With ``assign=True`` the module's tensors are replaced rather than copied into, so the
        averaged tensors are collected again (mmengine's class would keep averaging the old,
        detached ones). Either way the next update re-reads ``steps`` and, if a tensor moved,
        captures a new graph.
        """
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if assign:
            self.avg_parameters = (self.module.state_dict() if self.update_buffers else
                                   dict(self.module.named_parameters()))
            self._runtime.plan = None
            self._runtime.graphs.clear()
        return result

    # -- internals -------------------------------------------------------------------------

    def _plan(self, model: nn.Module) -> Optional[_Plan]:
        rt = self._runtime
        plan = rt.plan
        if plan is not None and plan.model is model and plan.watch.valid():
            return plan
        rt.graphs.clear()
        rt.plan = None
        plan = _Plan(self, model)
        rt.plans += 1
        if not plan.ok:
            self._log_once('plan', f'GraphExponentialMovingAverage: the source model has no '
                           f'parameter or buffer named {plan.missing!r}; using mmengine\'s '
                           'per-tensor update', logging.WARNING)
            return None
        rt.plan = plan
        return plan

    def _host_steps(self) -> int:
        """``int(self.steps)``, read from the device only after something else changed it."""
        rt = self._runtime
        steps = self._buffers['steps']
        if steps is not rt.steps_tensor or steps._version != rt.steps_version:
            rt.steps = int(steps.item())
            rt.steps_tensor = steps
            rt.steps_version = steps._version
        return rt.steps

    def _graph_blocker(self, plan: _Plan) -> Optional[str]:
        """Why this update cannot use a CUDA graph, or None if it can."""
        rt = self._runtime
        if not self.use_graph:
            return 'use_graph=False'
        if rt.graph_disabled is not None:
            return rt.graph_disabled
        return plan.why_eager

    def _run(self, plan: _Plan, kind: str) -> None:
        rt = self._runtime
        blocker = self._graph_blocker(plan)
        if blocker is not None:
            # Expected conditions (no GPU, graphs switched off) log at DEBUG; the others were
            # already warned about (capture failures) or deserve a line (mixed devices).
            expected = plan.device is not None and plan.device.type != 'cuda'
            level = logging.DEBUG if expected or not self.use_graph else logging.INFO
            self._log_once(('eager', blocker), 'GraphExponentialMovingAverage: updating '
                           f'eagerly with foreach ops ({blocker})', level)
            plan.run(kind, self.momentum)
            return
        if torch.cuda.is_current_stream_capturing():
            # Someone is capturing a larger graph around us: our ops join theirs.
            plan.run(kind, self.momentum)
            return
        if rt.graph_momentum != self.momentum:
            rt.graphs.clear()
        graph = rt.graphs.get(kind)
        if graph is None:
            if rt.eager_updates < self.warmup:
                self._on_side_stream(plan.device, lambda: plan.run(kind, self.momentum))
                rt.eager_updates += 1
                return
            graph = self._capture(plan, kind)
            if graph is None:
                plan.run(kind, self.momentum)
                return
        graph.replay()
        rt.replays += 1

    def _side_stream(self, device: torch.device) -> 'torch.cuda.Stream':
        rt = self._runtime
        if rt.stream is None or rt.stream.device != device:
            rt.stream = torch.cuda.Stream(device=device)
        return rt.stream

    def _on_side_stream(self, device: torch.device, fn) -> None:
        """Run ``fn`` on a side stream ordered after, and before, the current stream's work."""
        current = torch.cuda.current_stream(device)
        stream = self._side_stream(device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            fn()
        current.wait_stream(stream)

    def _capture(self, plan: _Plan, kind: str) -> Optional['torch.cuda.CUDAGraph']:
        """Capture one update of ``kind``; on failure disable graphs and return None."""
        rt = self._runtime
        if rt.captures >= _MAX_CHURN_CAPTURES and rt.replays < 4 * rt.captures:
            # Tensors move (or momentum changes) nearly every step, e.g. parameters that are
            # re-materialised each iteration: capturing costs more than it saves.
            rt.graph_disabled = (f'{rt.captures} captures for {rt.replays} replays: the '
                                 'tensors or momentum change too often for a graph to pay off')
            self._log_once('churn', f'GraphExponentialMovingAverage: {rt.graph_disabled}; '
                           'updating eagerly with foreach ops from now on', logging.WARNING)
            return None
        momentum = self.momentum
        graph = torch.cuda.CUDAGraph()

        def capture():
            graph.capture_begin(capture_error_mode='thread_local')
            try:
                plan.run(kind, momentum)
            finally:
                graph.capture_end()

        try:
            with torch.cuda.device(plan.device):
                torch.cuda.synchronize()
                self._on_side_stream(plan.device, capture)
        except Exception as exc:  # a failed capture leaves the update to the eager path
            rt.graph_disabled = f'CUDA graph capture failed: {type(exc).__name__}: {exc}'
            rt.graphs.clear()
            self._log_once('capture', f'GraphExponentialMovingAverage: {rt.graph_disabled}; '
                           'updating eagerly with foreach ops from now on', logging.WARNING)
            return None
        rt.graphs[kind] = graph
        rt.graph_momentum = momentum
        rt.captures += 1
        return graph

    def _log_once(self, key, msg: str, level: int) -> None:
        rt = self._runtime
        if key not in rt.logged:
            rt.logged.add(key)
            print_log(msg, logger='current', level=level)

    def __getstate__(self) -> dict:
        # Graphs, streams and tensor lists are runtime state: a copy starts without them.
        state = self.__dict__.copy()
        state['_runtime'] = _Runtime()
        return state
