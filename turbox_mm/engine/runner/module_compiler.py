"""``torch.compile`` for chosen submodules of a model; what fails to compile runs eagerly."""
import copy
import logging
import types
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
import torch
from mmengine.logging import print_log
from torch import nn

from .compile_guard import _guard, guarded_call

# Submodule names that OpenMMLab detectors commonly use for their heavy, static parts; what
# ``modules='auto'`` looks for. Heads are left out: their target assignment is full of
# data-dependent control flow that would only cause graph breaks and recompiles.
AUTO_MODULES = ('backbone', 'neck', 'img_backbone', 'img_neck', 'pts_backbone', 'pts_neck')

#: The class attribute by which a module (a head) names, relative to itself, the submodules
#: that ``modules='auto'`` also compiles: parts free of data-dependent control flow, whose
#: eager launches dominate a host-bound step (Sparse4D's head: its anchor encoder and each
#: decoder layer). Paths as in :func:`expand_paths` (``'layers.*'``).
DECLARED_ATTR = 'turbox_compile_submodules'

#: The class attribute by which a module names its own methods that ``modules='auto'`` also
#: compiles, each as one compiled function bound to the module (a head's ``loss``: its target
#: assignment and losses, dozens of small operations a layer, called by the detector and not
#: by the forward). Not for a module inside a compiled one (its code is traced there).
DECLARED_METHODS_ATTR = 'turbox_compile_methods'

#: The class attribute by which a module with declared methods says that they keep tensors
#: across steps (an instance bank's cache): compiled whole inside a module that replays CUDA
#: graphs, those tensors would live in the graph's pool (:func:`_warn_kept_state_in_graphs`).
KEEPS_STATE_ATTR = 'turbox_keeps_state'

#: ``torch.compile`` modes that run CUDA graphs, each with its mode without them. A replayed
#: graph's outputs live in a memory pool that the next step's replays overwrite, so the
#: declared methods, some of which keep tensors across steps (an instance bank's cache), are
#: all compiled in the mode without CUDA graphs: their outputs are ordinary allocations.
CUDA_GRAPH_MODES = {'reduce-overhead': None, 'max-autotune': 'max-autotune-no-cudagraphs'}


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


def _left_out(module: nn.Module, path: str) -> bool:
    """Whether the declared ``path`` (relative to ``module``) passes through an optional part
    that this instance left out: an attribute set to ``None`` instead of a submodule
    (BEVFusion's ``fusion_layer`` without the camera branch), at its end or above a ``*``.
    A name that is neither a submodule nor ``None`` is not left out: :func:`expand_paths`
    reports it (a defect of the declaring class)."""
    current = module
    for part in path.split('.'):
        if part == '*':
            return False
        children = dict(current.named_children())
        if part in children:
            current = children[part]
            continue
        return hasattr(current, part) and getattr(current, part) is None
    return False


def auto_paths(model: nn.Module) -> List[str]:
    """What ``modules='auto'`` compiles: the names of :data:`AUTO_MODULES` that ``model`` has,
    then, in the model's order, the submodules that modules declare through
    :data:`DECLARED_ATTR` (``*`` expanded), without one inside another already listed. A
    declared optional part that the instance set to ``None`` is skipped.

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
            if _left_out(module, path):
                continue
            names += expand_paths(model, f'{prefix}.{path}' if prefix else path)
    kept: List[str] = []
    for name in dict.fromkeys(names):
        if not any(name.startswith(k + '.') or k.startswith(name + '.') for k in kept):
            kept.append(name)
    return kept


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


def selected_paths(model: nn.Module, modules: Union[str, Sequence[str]]) -> List[str]:
    """The submodule paths ``modules`` (``'auto'`` or paths, as ``turbox.compile.modules``)
    names in ``model``, ``*`` expanded, in order, each once (torch's single layers included:
    see :func:`left_eager`).

    Raises:
        ValueError: ``modules`` is a string other than ``'auto'``.
        KeyError: A path names no submodule.
    """
    if modules == 'auto':
        return auto_paths(model)
    if isinstance(modules, str):
        raise ValueError(f"turbox.compile.modules: expected 'auto' or a list of submodule "
                         f'paths, got {modules!r}')
    return list(dict.fromkeys(name for path in modules for name in expand_paths(model, path)))


def left_eager(module: nn.Module) -> bool:
    """Whether :func:`compile_submodules` leaves a selected ``module`` eager: one of torch's
    own single layers (no children), which a graph of its own would not fuse with anything."""
    return _forward_of_torch(module) and not any(True for _ in module.children())


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
            (:func:`auto_paths`), and then the methods that modules declare
            (:func:`auto_methods`, each compiled by :func:`compile_method` and listed as
            ``path:method``). Defaults to ``'auto'``.
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
    compiled, leaves = [], []
    for name in selected_paths(model, modules):
        module = _resolve(model, name)
        of_torch = _forward_of_torch(module)
        if left_eager(module):
            leaves.append(name)
            continue
        plain_int_conv_args(module)
        if of_torch:
            _compile_through_own_frame(name, module, compile_kwargs)
        else:
            module.compile(**compile_kwargs)
        _guard(name, module, bool(compile_kwargs.get('fullgraph')))
        compiled.append(name)
    if compiled and uses_cuda_graphs(compile_kwargs):
        _warn_kept_state_in_graphs(model, compiled)
    if modules == 'auto':
        found = auto_methods(model, compiled)
        method_kwargs = compile_kwargs
        if found and uses_cuda_graphs(compile_kwargs):
            method_kwargs = without_cuda_graphs(compile_kwargs)
            listed = ', '.join(f'{p}:{m}' for p, _, m in found)
            print_log(f'turbox.compile: the declared methods ({listed}) are compiled without '
                      'CUDA graphs: some keep tensors across steps (caches), which a replayed '
                      'graph would overwrite', logger='current', level=logging.INFO)
        for path, module, method in found:
            compiled.append(compile_method(path, module, method, method_kwargs))
    if leaves:
        print_log(f"turbox.compile: {', '.join(leaves)} not compiled: each is one of torch's "
                  'own single layers (LayerNorm, Linear, ...), which a graph of its own would '
                  'not fuse with anything', logger='current',
                  level=logging.INFO if modules == 'auto' else logging.WARNING)
    return compiled


def _warn_kept_state_in_graphs(model: nn.Module, compiled: List[str]) -> None:
    """Warn where a module compiled into replayed CUDA graphs holds a module that keeps
    tensors across steps (:data:`KEEPS_STATE_ATTR`): traced into a replayed graph, the
    tensors it keeps live in the graph's pool, which the next step's replays overwrite
    (Inductor raises where it sees an overwritten tensor read)."""
    inside = []
    for path in compiled:
        for name, sub in _resolve(model, path).named_modules():
            if getattr(type(sub), KEEPS_STATE_ATTR, False):
                inside.append(f'{path}.{name}' if name else path)
    if inside:
        print_log(f"turbox.compile: {', '.join(inside)} keep tensors across steps and are "
                  'compiled inside modules that replay CUDA graphs, whose outputs the next '
                  "step overwrites; use modules='auto' (it compiles their methods without "
                  'CUDA graphs) or a mode without CUDA graphs', logger='current',
                  level=logging.WARNING)


def uses_cuda_graphs(compile_kwargs: Dict) -> bool:
    """Whether ``torch.compile(**compile_kwargs)`` replays CUDA graphs.

    Args:
        compile_kwargs (dict): ``torch.compile`` keyword arguments.

    Returns:
        bool: True for Dynamo's ``cudagraphs`` backend, and for Inductor (the default backend)
        in the ``reduce-overhead`` / ``max-autotune`` modes or with
        ``options={'triton.cudagraphs': True}``; other backends ignore the mode.
    """
    backend = compile_kwargs.get('backend', 'inductor')
    if backend == 'cudagraphs':
        return True
    if backend != 'inductor':
        return False
    options = compile_kwargs.get('options') or {}
    return compile_kwargs.get('mode') in CUDA_GRAPH_MODES or bool(
        options.get('triton.cudagraphs'))


def without_cuda_graphs(compile_kwargs: Dict) -> Dict:
    """``compile_kwargs`` with CUDA graphs switched off and everything else kept (a mode
    becomes its variant without them, :data:`CUDA_GRAPH_MODES`; Dynamo's ``cudagraphs``
    backend, AOTAutograd with graphs, becomes ``aot_eager``, the same without them).

    Examples:
        >>> without_cuda_graphs(dict(backend='inductor', mode='max-autotune'))
        {'backend': 'inductor', 'mode': 'max-autotune-no-cudagraphs'}
        >>> without_cuda_graphs(dict(options={'triton.cudagraphs': True}))
        {'options': {'triton.cudagraphs': False}}
    """
    kwargs = dict(compile_kwargs)
    if kwargs.get('backend') == 'cudagraphs':
        kwargs['backend'] = 'aot_eager'
    if kwargs.get('mode') in CUDA_GRAPH_MODES:
        kwargs['mode'] = CUDA_GRAPH_MODES[kwargs['mode']]
        if kwargs['mode'] is None:
            del kwargs['mode']
    if (kwargs.get('options') or {}).get('triton.cudagraphs'):
        kwargs['options'] = dict(kwargs['options'], **{'triton.cudagraphs': False})
    return kwargs


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


def auto_methods(model: nn.Module,
                 compiled: Sequence[str]) -> List[Tuple[str, nn.Module, str]]:
    """``(path, module, method)`` of the methods that modules of ``model`` declare through
    :data:`DECLARED_METHODS_ATTR`, in the model's order, leaving out the modules that are, or
    are inside, one of the ``compiled`` paths.

    Raises:
        KeyError: A declared name that is not a method of the module's class (a defect of
            that class).

    Examples:
        >>> from torch import nn
        >>> class Head(nn.Linear):
        ...     turbox_compile_methods = ('loss', )
        ...     def loss(self, x):
        ...         return self(x).sum()
        >>> model = nn.Module()
        >>> model.head, model.backbone = Head(2, 2), nn.Sequential(Head(2, 2))
        >>> [(path, method) for path, _, method in auto_methods(model, ['backbone'])]
        [('head', 'loss')]
    """
    found = []
    for prefix, module in model.named_modules():
        methods = getattr(type(module), DECLARED_METHODS_ATTR, ())
        if not methods or any(prefix == c or prefix.startswith(c + '.') for c in compiled):
            continue
        for method in methods:
            if not callable(getattr(type(module), method, None)):
                raise KeyError(f'turbox.compile: {type(module).__name__} declares {method!r} in '
                               f'{DECLARED_METHODS_ATTR}, but has no such method')
            found.append((prefix, module, method))
    return found


def _eager_method(module: nn.Module, method: str):
    """The class's own ``method`` bound to ``module``: what a copy or an unpickled module
    gets in place of a compiled method."""
    return getattr(type(module), method).__get__(module)


class _CompiledMethod:
    """A module's method compiled and guarded (:func:`compile_method`), held in the module's
    ``__dict__`` over the class's method.

    - Called while Dynamo traces an outer compiled region, it runs the eager method, which
      Dynamo then inlines (the guard's bookkeeping is not traceable).
    - A deep copy (an EMA model) or an unpickled copy of the module gets the class's eager
      method bound to the copy: a compiled function belongs to the module it was made for.
      A shallow copy (``copy.copy``, ``nn.DataParallel``'s replicas) would share it: not
      supported, as for compiled modules.
    """

    def __init__(self, module: nn.Module, method: str, call) -> None:
        self.module, self.method, self.call = module, method, call

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return _eager_method(self.module, self.method)(*args, **kwargs)
        return self.call(*args, **kwargs)

    def __deepcopy__(self, memo: Dict) -> object:
        copied = memo.get(id(self.module))
        if copied is None:
            copied = copy.deepcopy(self.module, memo)
        return _eager_method(copied, self.method)

    def __reduce__(self):
        return _eager_method, (self.module, self.method)


def compile_method(path: str, module: nn.Module, method: str, compile_kwargs: Dict) -> str:
    """Compile ``module.<method>`` with ``torch.compile``, guarded as a compiled module is
    (:func:`~.compile_guard.guarded_call`: a compile error on the first call falls back to
    the eager method for good, with a warning naming ``path:method``). Returns that name."""
    eager = _eager_method(module, method)
    name = f'{path}:{method}'

    def fall_back() -> None:
        module.__dict__.pop(method, None)

    call = guarded_call(name, type(module).__name__, torch.compile(eager, **compile_kwargs),
                        eager, fall_back, bool(compile_kwargs.get('fullgraph')))
    module.__dict__[method] = _CompiledMethod(module, method, call)
    return name


def set_recompile_limit(limit: int) -> str:
    """Set Dynamo's recompile limit per code object, process-wide and for the rest of the
    process (as ``env_cfg``'s cuDNN flags are): ``recompile_limit``, or ``cache_size_limit``
    on a torch that predates that name. Returns the change, for the runner's log."""
    from torch._dynamo import config
    name = 'recompile_limit' if hasattr(config, 'recompile_limit') else 'cache_size_limit'
    before = getattr(config, name)
    setattr(config, name, limit)
    return f"torch.compile: Dynamo's {name} = {limit} (was {before}; process-wide)"


def _dotted(options: Dict, prefix: str = '') -> Dict:
    """Inductor's option names are dotted (``'triton.cudagraphs'``); mmengine's
    ``--cfg-options turbox.compile.options.triton.cudagraphs=True`` nests them instead.

    Examples:
        >>> _dotted({'triton': {'cudagraphs': True}, 'combo_kernels': True})
        {'triton.cudagraphs': True, 'combo_kernels': True}
    """
    flat = {}
    for key, value in options.items():
        if isinstance(value, dict):
            flat.update(_dotted(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


def compile_kwargs_from_options(options: Dict) -> Dict:
    """The ``torch.compile`` keyword arguments of a validated ``turbox.compile`` section.

    Raises:
        ValueError: ``mode`` and ``options`` are both set (``torch.compile`` takes one or
            the other; ``{'triton.cudagraphs': True}`` is ``reduce-overhead``'s setting).
    """
    inductor = _dotted(options.get('options') or {})
    if inductor and options['mode'] is not None:
        raise ValueError(f"turbox.compile: mode={options['mode']!r} and options="
                         f'{inductor!r} are both set; torch.compile takes one or the other '
                         "(reduce-overhead is options={'triton.cudagraphs': True})")
    kwargs = dict(backend=options['backend'], mode=options['mode'],
                  dynamic=options['dynamic'], fullgraph=options['fullgraph'],
                  options=inductor or None)
    return {k: v for k, v in kwargs.items() if v is not None}
