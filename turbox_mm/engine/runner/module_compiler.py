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


def _guard(name: str, module: nn.Module) -> None:
    """Fall back to eager, with one warning, if compiling ``module`` fails on first use.

    The compiled call is tried; if it raises, the eager call is tried on the same inputs. If
    eager works, compilation was at fault: the module stays eager from then on. If eager
    raises too, its error is the user's and propagates unchanged.
    """
    compiled = module._compiled_call_impl

    def call(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure of the compiled path
            out = module._call_impl(*args, **kwargs)  # raises if the inputs are at fault
            module._compiled_call_impl = None
            print_log(f'turbox.compile: {name} ({type(module).__name__}) could not be compiled '
                      f'and runs eagerly: {type(exc).__name__}: {str(exc).splitlines()[0]}',
                      logger='current', level=logging.WARNING)
            return out

    module._compiled_call_impl = call


def compile_submodules(model: nn.Module,
                       modules: Union[str, Sequence[str]] = 'auto',
                       **compile_kwargs) -> List[str]:
    """Compile submodules of ``model`` in place with ``torch.compile``.

    Each module is compiled with :meth:`torch.nn.Module.compile`, so parameter names,
    ``state_dict`` keys and hooks are unchanged and checkpoints stay interchangeable with
    eager runs. Compilation happens on first use; a module that fails to compile then runs
    eagerly with one warning (see :func:`_guard`). Compiled graphs are cached by Inductor
    (``TORCHINDUCTOR_CACHE_DIR``, by default under the system temp dir), so a second run
    starts faster.

    Args:
        model (nn.Module): The unwrapped model.
        modules (str | Sequence[str]): Dotted paths of submodules, or ``'auto'`` for those of
            :data:`AUTO_MODULES` that the model has. Defaults to ``'auto'``.
        **compile_kwargs: Passed to ``torch.compile`` (``mode``, ``dynamic``, ``backend``,
            ``fullgraph``, ``options``).

    Returns:
        list[str]: The paths compiled.

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
    else:
        names = list(modules)
    for name in names:
        module = _resolve(model, name)
        module.compile(**compile_kwargs)
        _guard(name, module)
    return names


def compile_kwargs_from_options(options: Dict) -> Dict:
    """The ``torch.compile`` keyword arguments of a validated ``turbox.compile`` section."""
    kwargs = dict(backend=options['backend'], mode=options['mode'],
                  dynamic=options['dynamic'], fullgraph=options['fullgraph'])
    return {k: v for k, v in kwargs.items() if v is not None}
