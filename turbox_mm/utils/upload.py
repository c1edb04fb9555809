"""Host data to a device without making the host wait for it.

``tensor.to('cuda')`` from pageable host memory copies synchronously: the host waits until the
device has caught up with everything queued before (a host-device sync in the step). Through
pinned memory with ``non_blocking=True`` the copy is queued like a kernel and the host goes on.
:func:`device_constant` does that once for a model's constants (ranges, loss weights) and keeps
the device tensor.
"""
import functools
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor


def upload(x: Union[Tensor, np.ndarray], device: Union[torch.device, str],
           dtype: Optional[torch.dtype] = None) -> Tensor:
    """``x`` (a tensor or an array) on ``device`` and in ``dtype``, without a host wait.

    A host tensor bound for a CUDA device goes through pinned memory, non-blocking; anything
    else (already on a device, or bound for the CPU) is a plain ``.to``.

    Examples:
        >>> upload(np.arange(3), 'cpu', torch.float32).tolist()
        [0.0, 1.0, 2.0]
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    device = torch.device(device)
    if x.device.type != 'cpu' or device.type != 'cuda':
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def device_constant(values: Union[float, Sequence], like: Tensor) -> Tensor:
    """``values`` (a number or nested sequences of numbers) as a tensor of ``like``'s dtype on
    ``like``'s device: uploaded through :func:`upload` on first use and cached, so that a
    constant costs no host-to-device copy per call (``like.new_tensor(values)`` copies, and
    waits, every time). The same values give the same result as ``new_tensor``.

    The tensor is shared between callers: never modify it in place.

    Examples:
        >>> w = device_constant([1.0, 0.5], torch.zeros(1, dtype=torch.float64))
        >>> w.dtype, w.tolist(), w is device_constant((1, 0.5), torch.zeros(1, dtype=w.dtype))
        (torch.float64, [1.0, 0.5], True)
    """
    return _device_constant(_frozen(values), like.device, like.dtype)


def _frozen(values):
    if isinstance(values, (list, tuple)):
        return tuple(_frozen(v) for v in values)
    return float(values)


@functools.lru_cache(maxsize=256)
def _device_constant(values, device: torch.device, dtype: torch.dtype) -> Tensor:
    # a normal tensor even when first asked for under inference mode (it may meet autograd)
    with torch.inference_mode(False):
        return upload(torch.tensor(values, dtype=dtype), device)
