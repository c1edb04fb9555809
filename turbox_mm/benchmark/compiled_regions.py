"""Which of a step's operations would run inside ``torch.compile``d graphs.

:func:`~turbox_mm.benchmark.op_count.count_step_ops` runs a step eagerly. With a
:class:`CompiledRegions` its counter sets apart the operations of the modules that
``turbox.compile`` compiles (as :func:`~turbox_mm.engine.runner.module_compiler.compile_submodules`
chooses them), so what it lists is what the compiled step still dispatches one at a time:
the next thing to compile or remove in a host-bound step.

Forward operations count as compiled while one of those modules' ``forward`` runs (forward
hooks), or one of the methods that modules declare (``turbox_compile_methods``, with
``'auto'``). Backward operations count as compiled when the forward traceback of their autograd
node (anomaly mode's, which the counter records with ``backward_sources``) passes through one
of those modules' ``forward`` functions. That rule goes by the class's code: an instance of the
same class that is not compiled has its backward counted as compiled too (the heads compile
every layer of their lists, so this is rare). The forward of a torch container compiled
through turbox's own frame (an ``nn.Sequential``) is torch's code, shared by every container:
its backward operations count as eager.
"""
import inspect
import re
from typing import List, Optional, Sequence, Set, Tuple, Union

from torch import nn

_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+)')


def _code_range(function) -> Tuple[str, int, int]:
    """``(file, first line, last line)`` of a function's code (decorators unwrapped)."""
    code = inspect.unwrap(function).__code__
    lines = [line for _, _, line in code.co_lines() if line is not None]
    return code.co_filename, code.co_firstlineno, max(lines, default=code.co_firstlineno)


class CompiledRegions:
    """The modules ``turbox.compile`` would compile in ``model``, watched for a counter.

    Args:
        model (nn.Module): The built model (unwrapped).
        modules (str | Sequence[str]): ``'auto'`` or dotted paths, as ``turbox.compile.modules``.

    Attributes:
        paths (list[str]): The modules watched (torch's single layers, which compilation leaves
            eager, are not).
        depth (int): How many of them are running a forward now.
    """

    def __init__(self, model: nn.Module, modules: Union[str, Sequence[str]] = 'auto') -> None:
        from turbox_mm.engine.runner.module_compiler import (_forward_of_torch, _resolve,
                                                             auto_methods, left_eager,
                                                             selected_paths)
        self.paths: List[str] = []
        self.depth = 0
        self._code: Set[Tuple[str, int, int]] = set()
        self._handles = []
        for name in selected_paths(model, modules):
            module = _resolve(model, name)
            if left_eager(module):
                continue
            self.paths.append(name)
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._exit, always_call=True))
            if not _forward_of_torch(module):
                self._code.add(_code_range(type(module).forward))
        self._methods = []
        if modules == 'auto':  # the methods that modules declare (compile_submodules')
            for path, module, method in auto_methods(model, self.paths):
                self.paths.append(f'{path}:{method}')
                self._watch_method(module, method)

    def _watch_method(self, module: nn.Module, method: str) -> None:
        from turbox_mm.engine.runner.module_compiler import _eager_method
        bound = _eager_method(module, method)

        def watched(*args, **kwargs):
            self.depth += 1
            try:
                return bound(*args, **kwargs)
            finally:
                self.depth -= 1

        module.__dict__[method] = watched
        self._methods.append((module, method))
        self._code.add(_code_range(getattr(type(module), method)))

    def _enter(self, *_) -> None:
        self.depth += 1

    def _exit(self, *_) -> None:
        self.depth -= 1

    def recorded_inside(self, traceback: Optional[Sequence[str]]) -> bool:
        """Whether a forward traceback (anomaly mode's formatted frames) passes through one of
        the watched modules' ``forward``."""
        for entry in traceback or ():
            match = _FRAME.search(entry)
            if match is None:
                continue
            file, line = match.group('file'), int(match.group('line'))
            if any(file == f and first <= line <= last for f, first, last in self._code):
                return True
        return False

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for module, method in self._methods:
            module.__dict__.pop(method, None)
        self._methods = []
