"""A region of a training step on a side CUDA stream, so that the host waits it makes (a library
that reads a count back, such as spconv's pair generation) wait for that region's kernels only,
while the kernels already queued on the main stream keep the device busy.

Usage, with work that does not depend on the region queued between the two calls::

    ready = mark_ready(inputs)                   # after the region's inputs are made
    ...                                          # launch independent work on the main stream
    out = run_on_side_stream(region, inputs, ready)

On the CPU, or where ``ready`` is None, ``run_on_side_stream`` just calls the region.

Autograd runs each backward operation on the stream of its forward operation and joins the
streams itself, so a region may hold trainable parameters.
"""
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import Tensor

_STREAMS: Dict[torch.device, 'torch.cuda.Stream'] = {}


def side_stream(device: torch.device) -> 'torch.cuda.Stream':
    """One side stream per CUDA device, made on first use and kept for the process. It has
    a high priority: its kernels (short ones, which the host waits for) are scheduled ahead of
    the main stream's as multiprocessors free up."""
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device=device, priority=-1)
    return _STREAMS[device]


def mark_ready(tensors: Sequence[Tensor]) -> Optional['torch.cuda.Event']:
    """An event recorded on the current stream once ``tensors`` are made: the side region
    starts after it, not after whatever the main stream queues later. None where the first
    tensor is not on a CUDA device (or there is none)."""
    first = next((t for t in tensors if isinstance(t, Tensor)), None)
    if first is None or first.device.type != 'cuda':
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(first.device))
    return event


def run_on_side_stream(region: Callable[..., Tensor], inputs: Sequence,
                       ready: Optional['torch.cuda.Event']) -> Tensor:
    """``region(*inputs)`` on the device's side stream, started after ``ready``; the main
    stream waits for it (on the device, the host does not) before it uses the output.

    The tensors among ``inputs`` (not those inside containers) are marked as used on the side
    stream (so the caching allocator does not hand their memory to the main stream while the
    region still reads it), the output as used on the main stream. The main stream waits for
    the side stream also when the region raises.

    Args:
        region (callable): Returns one tensor.
        inputs (Sequence): Its arguments; tensors among them are marked as above.
        ready (torch.cuda.Event, optional): From :func:`mark_ready`; None calls ``region``
            on the current stream.

    Returns:
        Tensor: ``region``'s output.

    Raises:
        TypeError: ``region`` returned something other than a tensor (a side-stream output
            that the main stream uses must be marked, and only a tensor can be).
    """
    if ready is None:
        return region(*inputs)
    device = next(t.device for t in inputs if isinstance(t, Tensor))
    main = torch.cuda.current_stream(device)
    stream = side_stream(device)
    stream.wait_event(ready)
    for tensor in inputs:
        if isinstance(tensor, Tensor):
            tensor.record_stream(stream)
    try:
        with torch.cuda.stream(stream):
            out = region(*inputs)
    finally:
        main.wait_stream(stream)
    if not isinstance(out, Tensor):
        raise TypeError(f'run_on_side_stream: {getattr(region, "__qualname__", region)!r} '
                        f'returned {type(out).__name__}, not a tensor')
    out.record_stream(main)
    return out
