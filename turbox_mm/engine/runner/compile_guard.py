"""Compile errors of turbox's compiled calls: what fails to compile runs eagerly, with one
warning naming the module, and no part of a call ever runs twice (see :func:`guarded_call`)."""
import logging
from typing import Callable, List, Optional, Tuple

from mmengine.logging import print_log
from torch import nn


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


def guarded_call(name: str, owner: str, compiled: Callable, eager: Callable,
                 fall_back: Callable[[], None], fullgraph: bool = False) -> Callable:
    """Wrap a compiled call (a module's, or a method's) so that its compile errors are handled
    and no part of a call runs twice.

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
        name (str): The module's path in the model (``path:method`` for a method), for
            messages.
        owner (str): The module's class name, for messages.
        compiled (Callable): The compiled call.
        eager (Callable): The same call, eager.
        fall_back (Callable): Makes later calls run ``eager`` without this wrapper (the
            fallback for good after a compile error on the first call).
        fullgraph (bool): Whether it was compiled with ``fullgraph=True``. Defaults to False.

    Returns:
        Callable: The call to install in place of ``compiled``.
    """
    errors = _compile_errors()
    state = {'calls': 0}  # compiled calls begun

    def warn(reason: str, where: str = '') -> None:
        print_log(f'turbox.compile: {name} ({owner}) could not be compiled '
                  f'and runs eagerly{where}: {reason}', logger='current',
                  level=logging.WARNING)

    def call_fullgraph(*args, **kwargs):
        if _forced_eager():
            return eager(*args, **kwargs)
        try:
            with _SuppressErrors(False):
                return compiled(*args, **kwargs)
        except errors as exc:
            raise RuntimeError(
                f'turbox.compile.fullgraph=True: {name} ({owner}) could not '
                f'be compiled as one graph: {_reason(exc)}') from exc

    def call(*args, **kwargs):
        if _forced_eager():  # nothing is compiled: not a compiled call (EagerWarmupHook)
            return eager(*args, **kwargs)
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
                    f'turbox.compile: {name} ({owner}) failed to compile '
                    f'after part of its call had run; it is not run again eagerly (that would '
                    f'repeat what already ran): {_reason(exc)}') from exc
            fall_back()
            warn(_reason(exc))
        finally:
            for record in suppressed:  # also where the call then raised
                frame = record.getMessage().splitlines()[0].replace("WON'T CONVERT", '')
                warn(_reason(record.exc_info[1]),
                     f' in part (Dynamo runs {frame.strip()} eagerly from now on; the rest '
                     f'stays compiled)')
        return eager(*args, **kwargs)

    return call_fullgraph if fullgraph else call


def _guard(name: str, module: nn.Module, fullgraph: bool = False) -> None:
    """:func:`guarded_call` for a module compiled with :meth:`torch.nn.Module.compile`,
    installed as its compiled call; the fallback clears it (``Module.__call__`` then runs the
    eager call)."""
    def fall_back() -> None:
        module._compiled_call_impl = None

    module._compiled_call_impl = guarded_call(name, type(module).__name__,
                                              module._compiled_call_impl, module._call_impl,
                                              fall_back, fullgraph)
