"""Stage the next batch on the GPU while the current training step runs."""
import contextlib
import logging
import time
from typing import Any, Callable, ContextManager, Iterator, Optional, Tuple

import torch
from mmengine.logging import print_log
from mmengine.model import BaseModel, is_model_wrapper
from mmengine.structures import BaseDataElement


class PreprocessedBatch:
    """The output of a data preprocessor, marked so that the preprocessor passes it through.

    :class:`BatchPrefetcher` runs the model's data preprocessor ahead of time; the model's
    ``train_step`` calls the preprocessor again on what it is given, and the patched
    preprocessor returns ``data`` unchanged when it receives this wrapper.

    Args:
        data: What the data preprocessor returned.
    """

    __slots__ = ('data', )

    def __init__(self, data: Any) -> None:
        self.data = data


def _record_stream(obj: Any, stream: torch.cuda.Stream) -> None:
    """Mark every CUDA tensor inside ``obj`` as used on ``stream``.

    Tensors made on the prefetch stream and consumed on the main stream must not have their
    memory handed back to the prefetch stream until the main stream's work on them is done.
    """
    if isinstance(obj, torch.Tensor):
        if obj.is_cuda:
            obj.record_stream(stream)
    elif isinstance(obj, dict):
        for value in obj.values():
            _record_stream(value, stream)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _record_stream(value, stream)
    elif isinstance(obj, BaseDataElement):
        for value in obj.values():
            _record_stream(value, stream)
    elif isinstance(getattr(obj, 'tensor', None), torch.Tensor):
        # mmdet3d's box and point structures keep their data in ``.tensor``.
        _record_stream(obj.tensor, stream)


def has_stock_train_step(model: torch.nn.Module) -> bool:
    """Whether ``model`` trains through mmengine's own ``train_step`` (the only one known to
    call the data preprocessor first and nothing else on the data before it)."""
    module = model.module if is_model_wrapper(model) else model
    wrapper_step = getattr(type(model), 'train_step', None)
    wrapper_ok = not is_model_wrapper(model) or (
        wrapper_step is not None and wrapper_step.__module__.startswith('mmengine.'))
    # A plain nn.Module has no train_step at all: not mmengine's.
    return wrapper_ok and getattr(type(module), 'train_step', None) is BaseModel.train_step


def get_data_preprocessor(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The data preprocessor of a (possibly wrapped) mmengine model, or None."""
    module = model.module if is_model_wrapper(model) else model
    return getattr(module, 'data_preprocessor', None)


class BatchPrefetcher:
    """Iterate over a DataLoader with the next batch already copied (and preprocessed) on the GPU.

    :meth:`prefetch` takes the next batch from the loader and, on a side CUDA stream, copies it
    to the device without blocking (from pinned memory where the loader pins) and, with
    ``preprocess=True``, runs the model's data preprocessor on it (normalisation, padding,
    voxelisation, batch augmentations). The training loop calls it right after it has queued
    the current step's kernels, so the copy and the preprocessing overlap that step on the GPU
    and the wait for loader workers overlaps it on the host. :meth:`pop` makes the main stream
    wait for the side stream and hands the batch over.

    What differs from the stock loop, and what is done about it: batch ``i + 1`` is
    preprocessed during step ``i``, before step ``i``'s ``after_train_iter`` hooks (and, at the
    end of an epoch, before validation and the next ``before_train_epoch``). The loops run it
    under the optim wrapper's context (autocast under AMP, as ``train_step`` does) with the
    message hub's ``iter`` set to ``i + 1``, so iteration-driven batch augmentations (mmdet's
    ``BatchSyncRandomResize``) see the iteration they would in the stock loop. Random draws
    made by hooks between the steps come in a different order relative to the preprocessor's,
    and a ``before_train_iter`` hook that edits ``data_batch`` no longer reaches the model:
    switch ``preprocess`` off (``turbox.loop.preprocess_ahead=False``) for such setups; only
    the copy is then done ahead. Models with their own ``train_step`` get only the copy too.
    Without CUDA, batches are passed through untouched: the model's own ``train_step`` copies
    and preprocesses them, as in the stock loop. An error while staging (a loader worker's or
    the preprocessor's) is raised by :meth:`pop`, when the batch is due, as in the stock loop.

    Args:
        iterator (Iterator): A DataLoader iterator.
        model (nn.Module): The model (possibly DDP-wrapped) whose data preprocessor is used.
        preprocess (bool): Run the data preprocessor ahead too, not only the copy.
            Defaults to True.
        preprocess_context (callable, optional): Returns the context to preprocess in.
            Defaults to None (none).

    Examples:
        >>> prefetcher = BatchPrefetcher(iter(loader), model)  # doctest: +SKIP
        >>> prefetcher.prefetch()  # doctest: +SKIP
        >>> raw, ready = prefetcher.pop()  # doctest: +SKIP
        >>> model.train_step(ready, optim_wrapper)  # doctest: +SKIP
    """

    def __init__(self,
                 iterator: Iterator,
                 model: torch.nn.Module,
                 preprocess: bool = True,
                 preprocess_context: Optional[Callable[[], ContextManager]] = None) -> None:
        self.iterator = iterator
        self.preprocess_context = preprocess_context or contextlib.nullcontext
        self.preprocessor = get_data_preprocessor(model)
        device = getattr(self.preprocessor, 'device', None)
        self.use_cuda = (self.preprocessor is not None and device is not None
                         and torch.device(device).type == 'cuda' and torch.cuda.is_available())
        self.stream = torch.cuda.Stream(device=device) if self.use_cuda else None
        self.preprocess = preprocess and self.use_cuda
        if self.preprocess and not has_stock_train_step(model):
            print_log(f'turbox.loop.preprocess_ahead: {type(model).__name__} has its own '
                      'train_step; only the copy to the GPU is done ahead',
                      logger='current', level=logging.INFO)
            self.preprocess = False
        self._pending: Optional[Tuple[Any, Any, Any]] = None
        self._error: Optional[BaseException] = None
        self._exhausted = False
        self._patched = False
        #: Host seconds spent waiting for the loader in :meth:`prefetch`, summed; a reader
        #: (the benchmark) may reset it.
        self.fetch_seconds = 0.0
        if self.preprocess:
            self._patch_preprocessor()

    def _patch_preprocessor(self) -> None:
        preprocessor = self.preprocessor
        original = preprocessor.forward
        # Another wrapper may sit on the instance already (e.g. the benchmark's timer).
        self._instance_forward = preprocessor.__dict__.get('forward')

        def forward(data, *args, **kwargs):
            if isinstance(data, PreprocessedBatch):
                return data.data
            return original(data, *args, **kwargs)

        preprocessor.forward = forward
        self._patched = True

    def close(self) -> None:
        """Undo the data preprocessor patch and drop any staged batch."""
        if self._patched:
            if self._instance_forward is None:
                del self.preprocessor.forward  # the class's forward shows again
            else:
                self.preprocessor.forward = self._instance_forward
            self._patched = False
        self._pending = None

    def prefetch(self) -> bool:
        """Fetch the next batch and start staging it.

        Returns:
            bool: False when the loader is exhausted.
        """
        if self._pending is not None or self._error is not None:
            raise RuntimeError('BatchPrefetcher.prefetch: a batch is already staged; pop() it '
                               'first')
        start = time.perf_counter()
        try:
            raw = next(self.iterator)
        except StopIteration:
            self._exhausted = True
            return False
        except Exception as exc:  # noqa: BLE001 - raised by pop(), when the batch is due
            self._error = exc
            return True
        finally:
            # the loader wait, which the pipelined loops spend inside an iteration
            self.fetch_seconds += time.perf_counter() - start
        if not self.use_cuda:
            self._pending = (raw, raw, None)
            return True
        try:
            with torch.cuda.stream(self.stream):
                ready = self._cast(raw)
                if self.preprocess:
                    with self.preprocess_context():
                        ready = PreprocessedBatch(self.preprocessor(ready, True))
                event = torch.cuda.Event()
                event.record(self.stream)
        except Exception as exc:  # noqa: BLE001
            self._error = exc
            return True
        self._pending = (raw, ready, event)
        return True

    def _cast(self, raw: Any) -> Any:
        preprocessor = self.preprocessor
        saved = getattr(preprocessor, '_non_blocking', False)
        preprocessor._non_blocking = True
        try:
            return preprocessor.cast_data(raw)
        finally:
            preprocessor._non_blocking = saved

    def pop(self) -> Tuple[Any, Any]:
        """The staged batch: ``(raw, ready)``.

        ``raw`` is what the loader gave (hooks receive it, as in the stock loop); ``ready`` is
        what goes to ``model.train_step``: on the device, possibly preprocessed.

        Raises:
            StopIteration: Nothing is staged because the loader is exhausted.
        """
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._pending is None:
            if self._exhausted or not self.prefetch():
                raise StopIteration
            if self._error is not None:
                error, self._error = self._error, None
                raise error
        raw, ready, event = self._pending
        self._pending = None
        if event is not None:
            current = torch.cuda.current_stream(self.stream.device)
            current.wait_event(event)
            _record_stream(ready.data if isinstance(ready, PreprocessedBatch) else ready,
                           current)
        return raw, ready


def ahead_context(runner, loop) -> Callable[[], ContextManager]:
    """The context a train loop preprocesses its next batch in, ahead of time.

    The optim wrapper's context (autocast under AMP), as in ``train_step``, and the message
    hub's ``iter`` set to the iteration the batch belongs to.

    Args:
        runner (Runner): The runner.
        loop (BaseLoop): The train loop; ``loop.iter`` is the current iteration.

    Returns:
        callable: A factory of the context manager.
    """

    @contextlib.contextmanager
    def context():
        hub = runner.message_hub
        previous = hub.get_info('iter')
        hub.update_info('iter', loop.iter + 1)
        try:
            try:
                optim = runner.optim_wrapper.optim_context(runner.model)
            except (AttributeError, NotImplementedError):  # e.g. OptimWrapperDict
                optim = contextlib.nullcontext()
            with optim:
                yield
        finally:
            hub.update_info('iter', previous)

    return context


def flush_grad_norm(runner) -> None:
    """Deliver grad norms still on their way to the log (sync-free clipping), if any."""
    flush = getattr(getattr(runner, 'optim_wrapper', None), 'flush_grad_norm', None)
    if callable(flush):
        flush()
