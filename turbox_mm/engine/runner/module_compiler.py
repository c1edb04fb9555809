"""``torch.compile`` for chosen submodules of a model, with a clean fallback to eager."""
import logging
from typing import Dict, List, Sequence, Union

from mmengine.logging import print_log
from torch import nn

# Submodule names that OpenMMLab detectors commonly use for their heavy, static parts; what
# ``modules='auto'`` looks for. Heads are left out: their target assignment is full of
# data-dependent control flow that would only cause graph breaks and recompiles.
AUTO_MODULES = ('backbone', 'neck', 'img_backbone', 'img_neck', 'pts_backbone', 'pts_neck')


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


def _compile_errors() -> tuple:
    """The exceptions that mean "this code could not be compiled", raised before the compiled
    graph runs: Dynamo's tracing limits and its backend's (Inductor's) failures."""
    import torch._dynamo.exc as dynamo_exc
    errors = [dynamo_exc.Unsupported, dynamo_exc.BackendCompilerFailed,
              dynamo_exc.InternalTorchDynamoError]
    try:
        from torch._inductor.exc import InductorError
        errors.append(InductorError)
    except ImportError:  # older torch
        pass
    return tuple(errors)


def _guard(name: str, module: nn.Module, fullgraph: bool = False) -> None:
    """Fall back to eager, with one warning, where compiling ``module`` fails.

    Only compile errors (:func:`_compile_errors`, raised while Dynamo traces or the backend
    compiles, before anything of the call has run) fall back: the module runs eagerly from
    then on. With ``fullgraph=True`` they are raised instead, naming the module. Every other
    error (the inputs', out of memory, a failing kernel) propagates unchanged and nothing is
    run twice.
    """
    compiled = module._compiled_call_impl
    errors = _compile_errors()

    def call(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except errors as exc:
            first = str(exc).splitlines()[0] if str(exc) else ''
            if fullgraph:
                raise RuntimeError(
                    f'turbox.compile.fullgraph=True: {name} ({type(module).__name__}) could not '
                    f'be compiled as one graph: {type(exc).__name__}: {first}') from exc
            module._compiled_call_impl = None
            print_log(f'turbox.compile: {name} ({type(module).__name__}) could not be compiled '
                      f'and runs eagerly: {type(exc).__name__}: {first}', logger='current',
                      level=logging.WARNING)
            return module._call_impl(*args, **kwargs)

    module._compiled_call_impl = call


def compile_submodules(model: nn.Module,
                       modules: Union[str, Sequence[str]] = 'auto',
                       **compile_kwargs) -> List[str]:
    """Compile submodules of ``model`` in place with ``torch.compile``.

    Each module is compiled with :meth:`torch.nn.Module.compile`, so parameter names,
    ``state_dict`` keys and hooks are unchanged and checkpoints stay interchangeable with
    eager runs. Compilation happens on first use; a module that fails to compile then runs
    eagerly with one warning, or, with ``fullgraph=True``, raises (see :func:`_guard`).
    Compiled graphs are cached by Inductor (``TORCHINDUCTOR_CACHE_DIR``, by default under the
    system temp dir), so a second run starts faster.

    Args:
        model (nn.Module): The unwrapped model.
        modules (str | Sequence[str]): Dotted paths of submodules (a ``*`` part stands for
            each child: ``'head.layers.*'``), or ``'auto'`` for those of
            :data:`AUTO_MODULES` that the model has. Defaults to ``'auto'``.
        **compile_kwargs: Passed to ``torch.compile`` (``mode``, ``dynamic``, ``backend``,
            ``fullgraph``, ``options``).

    Returns:
        list[str]: The paths compiled (``*`` expanded).

    Raises:
        KeyError: An explicit path names no submodule; the message lists what exists.

    Examples:
        >>> from torch import nn
        >>> model = nn.Module()
        >>> model.backbone = nn.Linear(4, 4)
        >>> compile_submodules(model, 'auto')
        ['backbone']
    """
    if modules == 'auto':
        names = [n for n in AUTO_MODULES if isinstance(getattr(model, n, None), nn.Module)]
    elif isinstance(modules, str):
        raise ValueError(f"turbox.compile.modules: expected 'auto' or a list of submodule "
                         f'paths, got {modules!r}')
    else:  # in order, each module once
        names = list(dict.fromkeys(name for path in modules
                                   for name in expand_paths(model, path)))
    for name in names:
        module = _resolve(model, name)
        module.compile(**compile_kwargs)
        _guard(name, module, bool(compile_kwargs.get('fullgraph')))
    return names


def compile_kwargs_from_options(options: Dict) -> Dict:
    """The ``torch.compile`` keyword arguments of a validated ``turbox.compile`` section."""
    kwargs = dict(backend=options['backend'], mode=options['mode'],
                  dynamic=options['dynamic'], fullgraph=options['fullgraph'])
    return {k: v for k, v in kwargs.items() if v is not None}
