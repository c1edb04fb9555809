"""``torch.compile`` for chosen submodules of a model; what fails to compile runs eagerly."""
import logging
import types
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from mmengine.logging import print_log
from torch import nn

# Submodule names that OpenMMLab detectors commonly use for their heavy, static parts; what
# ``modules='auto'`` looks for. Heads are left out: their target assignment is full of
# data-dependent control flow that would only cause graph breaks and recompiles.
AUTO_MODULES = ('backbone', 'neck', 'img_backbone', 'img_neck', 'pts_backbone', 'pts_neck')

#: The class attribute by which a module (a head) names, relative to itself, the submodules
#: that ``modules='auto'`` also compiles: parts free of data-dependent control flow, whose
#: eager launches dominate a host-bound step (Sparse4D's head: its anchor encoder and each
#: decoder layer). Paths as in :func:`expand_paths` (``'layers.*'``).
DECLARED_ATTR = 'turbox_compile_submodules'


def _resolve(model: nn.Module, path: str) -> nn.Module:
    module = model
    for part in path.split('.'):
        children = dict(module.named_children())
        if part not in children:
            raise KeyError(
                f'turbox.compile.modules: {type(model).__name__} has no submodule {path!r} '
                f'({part!r} is not among {sorted(children) or "no children"} of '
                f'{type(module).__name__})')
        module = children[part]
    return module


def expand_paths(model: nn.Module, path: str) -> List[str]:
    """The submodule paths that ``path`` names: itself, or, with ``*`` parts, every path
    whose parts match it (a ``*`` stands for any one child: ``'head.layers.*'`` is each layer
    of a ``ModuleList``), in the model's order.

    Raises:
        KeyError: A path without ``*`` that names no submodule (as :func:`_resolve`), or a
            pattern that matches none (named as written).

    Examples:
        >>> from torch import nn
        >>> model = nn.Module()
        >>> model.head = nn.Module()
        >>> model.head.layers = nn.ModuleList([nn.Linear(2, 2), nn.ReLU()])
        >>> expand_paths(model, 'head.layers.*')
        ['head.layers.0', 'head.layers.1']
    """
    parts = path.split('.')
    if '*' not in parts:
        _resolve(model, path)
        return [path]
    found = _matches(model, parts, [])
    if not found:
        raise KeyError(f'turbox.compile.modules: {path!r} matches no submodule of '
                       f'{type(model).__name__} (a * stands for any one child)')
    return found


def _matches(module: nn.Module, parts: List[str], done: List[str]) -> List[str]:
    """The dotted paths below ``module`` (reached by ``done``) whose parts match ``parts``."""
    if not parts:
        return ['.'.join(done)]
    out = []
    for name, child in module.named_children():
        if parts[0] in ('*', name):
            out += _matches(child, parts[1:], done + [name])
    return out


def auto_paths(model: nn.Module) -> List[str]:
    """What ``modules='auto'`` compiles: the names of :data:`AUTO_MODULES` that ``model`` has,
    then, in the model's order, the submodules that modules declare through
    :data:`DECLARED_ATTR` (``*`` expanded), without one inside another already listed.

    Raises:
        KeyError: A declared path that names no submodule (a defect of that module's class).

    Examples:
        >>> from torch import nn
        >>> class Head(nn.Module):
        ...     turbox_compile_submodules = ('layers.*', )
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layers = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
        >>> model = nn.Module()
        >>> model.backbone, model.head = nn.Linear(2, 2), Head()
        >>> auto_paths(model)
        ['backbone', 'head.layers.0', 'head.layers.1']
    """
    names = [n for n in AUTO_MODULES if isinstance(getattr(model, n, None), nn.Module)]
    for prefix, module in model.named_modules():
        for path in getattr(type(module), DECLARED_ATTR, ()):
            names += expand_paths(model, f'{prefix}.{path}' if prefix else path)
    kept: List[str] = []
    for name in dict.fromkeys(names):
        if not any(name.startswith(k + '.') or k.startswith(name + '.') for k in kept):
            kept.append(name)
    return kept


def _compile_errors() -> tuple:
    """The exceptions that mean "this code could not be compiled": Dynamo's tracing limits
    and its backend's (Inductor's) failures."""
    import torch._dynamo.exc as dynamo_exc
    errors = [dynamo_exc.Unsupported, dynamo_exc.BackendCompilerFailed,
              dynamo_exc.InternalTorchDynamoError]
    try:
        from torch._inductor.exc import InductorError
        errors.append(InductorError)
    except ImportError:  # older torch
        pass
    return tuple(errors)


# Dynamo's logger for the frames it could not compile and ran eagerly (``suppress_errors``).
_DYNAMO_FRAME_LOG = 'torch._dynamo.convert_frame'


class _SuppressedFrames(logging.Filter):
    """Takes the warning Dynamo logs when it runs a frame eagerly because compiling it failed
    (a ``WARNING`` record carrying the exception), for the innermost guarded call running,
    and drops it: that call prints its own warning, naming the module, instead."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: List[List[logging.LogRecord]] = []  # one list per guarded call, innermost last

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not self.calls or record.levelno != logging.WARNING or not isinstance(exc, Exception):
            return True
        self.calls[-1].append(record)
        return False


_SUPPRESSED = _SuppressedFrames()


class _SuppressErrors:
    """Within: Dynamo's ``suppress_errors`` is ``value`` (in this thread: Dynamo's config is
    thread-local) and, with ``records`` given, :data:`_SUPPRESSED` takes Dynamo's warnings for
    the frames it runs eagerly into ``records``. Set directly, not with ``config.patch``
    (some 70 us a call)."""

    def __init__(self, value: bool, records: Optional[List[logging.LogRecord]] = None):
        from torch._dynamo import config  # imported late: importing Dynamo takes a while
        self.config, self.value, self.records = config, value, records

    def __enter__(self) -> None:
        self.before = self.config.suppress_errors
        if self.before != self.value:
            self.config.suppress_errors = self.value
        if self.records is not None:
            # adding it again is a no-op (a guarded call inside another)
            logging.getLogger(_DYNAMO_FRAME_LOG).addFilter(_SUPPRESSED)
            _SUPPRESSED.calls.append(self.records)

    def __exit__(self, *exc_info) -> None:
        if self.records is not None:
            _SUPPRESSED.calls.pop()
            if not _SUPPRESSED.calls:
                logging.getLogger(_DYNAMO_FRAME_LOG).removeFilter(_SUPPRESSED)
        if self.before != self.value:
            self.config.suppress_errors = self.before


def _forced_eager() -> bool:
    """Whether Dynamo's stance is ``force_eager`` (``torch.compiler.set_stance``; False on a
    torch without stances)."""
    from torch._dynamo import eval_frame
    stance = getattr(eval_frame, '_stance', None)
    return getattr(stance, 'stance', 'default') == 'force_eager'


def _frames() -> Tuple[int, int]:
    """Dynamo's counts of the frames it tried to compile, and of those it compiled."""
    from torch._dynamo.utils import counters
    frames = counters['frames']
    return frames['total'], frames['ok']


def _reason(exc: BaseException) -> str:
    """``Type: first line`` of ``exc``, and of the backend's own error it wraps, if any."""
    def line(e):
        text = str(e).splitlines()
        return f'{type(e).__name__}: {text[0] if text else ""}'.rstrip(': ')
    inner = getattr(exc, 'inner_exception', None)
    return line(exc) + (f' ({line(inner)})' if isinstance(inner, BaseException) else '')


def _guard(name: str, module: nn.Module, fullgraph: bool = False) -> None:
    """Handle the compile errors of ``module``'s compiled call so that no part of a call runs
    twice.

    A call of a compiled module can run several graphs (one per graph break) and eager code
    between them; each of Dynamo's frames (the forward, and the code after each graph break)
    is compiled when it is first reached, so compiling a later frame can fail after the
    earlier ones have run and changed state (BatchNorm statistics, in-place updates).
    A call under Dynamo's ``force_eager`` stance (:class:`~turbox_mm.engine.hooks.
    EagerWarmupHook`) runs the module's eager call and is not counted as a compiled call.

    - ``fullgraph=False``: the call runs with Dynamo's ``suppress_errors``: a frame that fails
      to compile runs eagerly, from where the call has got to, and Dynamo runs that frame's
      code eagerly from then on, in every module that runs it (other instances of the class
      too, without a warning of their own); the frames before and after it stay compiled.
      Dynamo's warning for it (logger ``torch._dynamo.convert_frame``, none where that logger
      is set above ``WARNING``) is replaced by one through :func:`~mmengine.logging.print_log`
      naming the module, the frame and the error. Dynamo suppresses every error it meets
      while compiling a frame, an error of the inputs found while tracing (a shape mismatch)
      included: the frame then runs eagerly, raises the inputs' own error and stays eager.
    - A compile error (:func:`_compile_errors`) that still reaches the call (raised outside
      Dynamo's frame compiler) falls back to eager, with the same warning, for this module
      from then on, only if nothing of the module can have run yet: its first call, no frame
      compiled or run eagerly in it. Otherwise it raises a ``RuntimeError`` naming the module
      rather than run the module again.
    - ``fullgraph=True``: errors are not suppressed (``suppress_errors`` off, whatever the
      environment sets); a compile error is raised as a ``RuntimeError`` naming the module,
      and nothing is run again.
    - Every other error (the inputs', out of memory, a failing kernel while a compiled graph
      runs) propagates unchanged, and nothing is run twice.

    Args:
        name (str): The module's path in the model, for messages.
        module (nn.Module): A module compiled with :meth:`torch.nn.Module.compile`.
        fullgraph (bool): Whether it was compiled with ``fullgraph=True``. Defaults to False.
    """
    compiled = module._compiled_call_impl
    errors = _compile_errors()
    state = {'calls': 0}  # compiled calls begun

    def warn(reason: str, where: str = '') -> None:
        print_log(f'turbox.compile: {name} ({type(module).__name__}) could not be compiled '
                  f'and runs eagerly{where}: {reason}', logger='current',
                  level=logging.WARNING)

    def call_fullgraph(*args, **kwargs):
        if _forced_eager():
            return module._call_impl(*args, **kwargs)
        try:
            with _SuppressErrors(False):
                return compiled(*args, **kwargs)
        except errors as exc:
            raise RuntimeError(
                f'turbox.compile.fullgraph=True: {name} ({type(module).__name__}) could not '
                f'be compiled as one graph: {_reason(exc)}') from exc

    def call(*args, **kwargs):
        if _forced_eager():  # nothing is compiled: not a compiled call (EagerWarmupHook)
            return module._call_impl(*args, **kwargs)
        suppressed: List[logging.LogRecord] = []
        first_call = state['calls'] == 0
        state['calls'] += 1
        total, ok = _frames()
        try:
            with _SuppressErrors(True, suppressed):
                return compiled(*args, **kwargs)
        except errors as exc:
            now_total, now_ok = _frames()
            if not (first_call and not suppressed and now_total - total <= 1 and now_ok == ok):
                raise RuntimeError(
                    f'turbox.compile: {name} ({type(module).__name__}) failed to compile '
                    f'after part of its call had run; it is not run again eagerly (that would '
                    f'repeat what already ran): {_reason(exc)}') from exc
            module._compiled_call_impl = None
            warn(_reason(exc))
        finally:
            for record in suppressed:  # also where the call then raised
                frame = record.getMessage().splitlines()[0].replace("WON'T CONVERT", '')
                warn(_reason(record.exc_info[1]),
                     f' in part (Dynamo runs {frame.strip()} eagerly from now on; the rest '
                     f'stays compiled)')
        return module._call_impl(*args, **kwargs)

    module._compiled_call_impl = call_fullgraph if fullgraph else call


_CONV_SHAPE_ARGS = ('kernel_size', 'stride', 'padding', 'dilation', 'output_padding')


def plain_int_conv_args(module: nn.Module) -> int:
    """Turn NumPy integers in the shape arguments of ``module``'s convolutions into ``int``.

    mmdet3d builds some convolutions with NumPy strides (``SECONDFPN`` with
    ``use_conv_for_no_stride=True``, as in CenterPoint and BEVFusion, passes
    ``np.round(1 / stride).astype(np.int64)``). Dynamo traces a NumPy scalar as a tensor, so
    such a convolution reads its stride back from a tensor and the whole frame fails to compile.
    The values are equal, so the convolution computes the same thing.

    Args:
        module (nn.Module): Searched recursively, changed in place.

    Returns:
        int: How many convolution arguments were changed.
    """
    changed = 0
    for conv in module.modules():
        if not isinstance(conv, nn.modules.conv._ConvNd):
            continue
        for arg in _CONV_SHAPE_ARGS:
            value = getattr(conv, arg, None)
            if isinstance(value, tuple) and any(isinstance(v, np.integer) for v in value):
                setattr(conv, arg, tuple(int(v) for v in value))
                changed += 1
    return changed


def compile_submodules(model: nn.Module,
                       modules: Union[str, Sequence[str]] = 'auto',
                       **compile_kwargs) -> List[str]:
    """Compile submodules of ``model`` in place with ``torch.compile``.

    Each module is compiled with :meth:`torch.nn.Module.compile`, so parameter names,
    ``state_dict`` keys and hooks are unchanged and checkpoints stay interchangeable with
    eager runs. Compilation happens on first use, one Dynamo frame (the forward, the code
    after each graph break) at a time; a frame that fails to compile runs eagerly with one
    warning naming the module while the rest stays compiled, or, with ``fullgraph=True``,
    the error is raised; no part of a call is ever run twice (see :func:`_guard`).
    Compiled graphs are cached by Inductor (``TORCHINDUCTOR_CACHE_DIR``, by default under the
    system temp dir), so a second run starts faster.

    A module whose forward is torch's own (an ``nn.Sequential``) is compiled through a frame
    of this file instead (see :func:`_forward_of_torch`), as one graph; one of torch's single
    layers (no children: ``nn.LayerNorm``, ``nn.Linear``) is left eager and named in one log
    line (a warning where the paths were given, information for ``'auto'``).

    Args:
        model (nn.Module): The unwrapped model.
        modules (str | Sequence[str]): Dotted paths of submodules (a ``*`` part stands for
            each child: ``'head.layers.*'``), or ``'auto'`` for those of
            :data:`AUTO_MODULES` that the model has plus those its modules declare
            (:func:`auto_paths`). Defaults to ``'auto'``.
        **compile_kwargs: Passed to ``torch.compile`` (``mode``, ``dynamic``, ``backend``,
            ``fullgraph``, ``options``).

    Returns:
        list[str]: The paths compiled (``*`` expanded).

    Raises:
        KeyError: An explicit path names no submodule; the message lists what exists.

    Examples:
        >>> from torch import nn
        >>> model = nn.Module()
        >>> model.backbone = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        >>> compile_submodules(model, 'auto')
        ['backbone']
    """
    if modules == 'auto':
        names = auto_paths(model)
    elif isinstance(modules, str):
        raise ValueError(f"turbox.compile.modules: expected 'auto' or a list of submodule "
                         f'paths, got {modules!r}')
    else:  # in order, each module once
        names = list(dict.fromkeys(name for path in modules
                                   for name in expand_paths(model, path)))
    compiled, leaves = [], []
    for name in names:
        module = _resolve(model, name)
        of_torch = _forward_of_torch(module)
        if of_torch and not any(True for _ in module.children()):
            leaves.append(name)
            continue
        plain_int_conv_args(module)
        if of_torch:
            _compile_through_own_frame(name, module, compile_kwargs)
        else:
            module.compile(**compile_kwargs)
        _guard(name, module, bool(compile_kwargs.get('fullgraph')))
        compiled.append(name)
    if leaves:
        print_log(f"turbox.compile: {', '.join(leaves)} not compiled: each is one of torch's "
                  'own single layers (LayerNorm, Linear, ...), which a graph of its own would '
                  'not fuse with anything', logger='current',
                  level=logging.INFO if modules == 'auto' else logging.WARNING)
    return compiled


def _forward_of_torch(module: nn.Module) -> bool:
    """Whether ``module``'s forward is defined in torch itself (``nn.Sequential``,
    ``nn.LayerNorm``, ...). Dynamo does not compile a frame of torch's own files as the outer
    frame: :meth:`torch.nn.Module.compile` on such a module compiles nothing of torch's own
    layers, silently, and compiles each child with a forward of its own (mmdet's blocks in an
    ``nn.Sequential``) as a frame of its own, not the container as one graph."""
    return (getattr(type(module).forward, '__module__', None) or '').startswith('torch.')


def _own_frame(*args, **kwargs):
    return _call(*args, **kwargs)  # noqa: F821  (``_call`` is bound in each copy's globals)


def _compile_through_own_frame(name: str, module: nn.Module, compile_kwargs: Dict) -> None:
    """Compile a module whose forward is torch's (an ``nn.Sequential`` of layers) through a
    frame of this file that calls it, which Dynamo compiles, inlining torch's forward. Each
    module gets its own copy of the code object: Dynamo counts recompiles per code object, so
    one shared frame would serve only 8 modules."""
    import builtins

    import torch
    code = _own_frame.__code__.replace(co_name=f"turbox_compiled_{name.replace('.', '_')}")
    frame = types.FunctionType(code, {'_call': module._call_impl, '__builtins__': builtins},
                               code.co_name)
    module._compiled_call_impl = torch.compile(frame, **compile_kwargs)


def set_recompile_limit(limit: int) -> str:
    """Set Dynamo's recompile limit per code object, process-wide and for the rest of the
    process (as ``env_cfg``'s cuDNN flags are): ``recompile_limit``, or ``cache_size_limit``
    on a torch that predates that name. Returns the change, for the runner's log."""
    from torch._dynamo import config
    name = 'recompile_limit' if hasattr(config, 'recompile_limit') else 'cache_size_limit'
    before = getattr(config, name)
    setattr(config, name, limit)
    return f"torch.compile: Dynamo's {name} = {limit} (was {before}; process-wide)"


def compile_kwargs_from_options(options: Dict) -> Dict:
    """The ``torch.compile`` keyword arguments of a validated ``turbox.compile`` section."""
    kwargs = dict(backend=options['backend'], mode=options['mode'],
                  dynamic=options['dynamic'], fullgraph=options['fullgraph'])
    return {k: v for k, v in kwargs.items() if v is not None}
