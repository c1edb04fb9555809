"""Host data to a device without making the host wait for it.

``tensor.to('cuda')`` from pageable host memory copies synchronously: the host waits until the
device has caught up with everything queued before (a host-device sync in the step). Through
pinned memory with ``non_blocking=True`` the copy is queued like a kernel and the host goes on.
"""
from typing import Optional, Union

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
