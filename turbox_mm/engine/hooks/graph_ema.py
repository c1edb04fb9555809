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

This file holds the averaged model and its graph capture; the tensor pairs of an update, their
foreach grouping and the staleness watch are in ``graph_ema_plan.py``.
"""
import logging
import numbers
from typing import Dict, Optional

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.model import ExponentialMovingAverage
from torch import Tensor

from turbox_mm.registry import MODELS
from .graph_ema_plan import _COPY, _LERP, _group, _Plan

# After this many captures, graphs are given up if each one was replayed fewer than 4 times.
_MAX_CHURN_CAPTURES = 8


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
