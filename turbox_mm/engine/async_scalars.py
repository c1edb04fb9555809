"""Scalars computed on the GPU, delivered to mmengine's message hub without host syncs.

mmengine's ``MessageHub.update_scalar`` reads every tensor with ``.item()``: a host-device
synchronisation per logged value and iteration (the loss terms, the gradient norm). Here the
values of one push are stacked on their device, copied (``non_blocking=True``) into one row of
a pinned host ring buffer, and a CUDA event is recorded after the copy. Completed rows are
pushed to the message hub in order on every :meth:`AsyncScalars.push` and
:meth:`AsyncScalars.poll`; the host waits only when ``capacity`` rows are still in flight, or
when :meth:`AsyncScalars.flush` asks for everything (before a logger reads the values).

Values arrive as mmengine would store them: each tensor's value as a Python float (through
float64, exact for 16-, 32- and 64-bit floats), in push order for every key. Host values
(floats, CPU tensors) queued behind a pending row wait for it, so the order holds.
"""
from collections import deque
from typing import Deque, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from mmengine.logging import MessageHub

Scalar = Union[torch.Tensor, float, int]


class AsyncScalars:
    """Ring-buffered, event-tracked delivery of scalar dicts to a message hub.

    Args:
        message_hub (MessageHub): Where the values go.
        capacity (int): The most rows in flight.

    Examples:
        >>> import torch
        >>> from mmengine.logging import MessageHub
        >>> hub = MessageHub.get_instance('async_scalars_example')
        >>> log = AsyncScalars(hub, capacity=4)
        >>> log.push({'train/loss': torch.tensor(2.5), 'train/acc': 0.5})  # CPU: at once
        >>> hub.get_scalar('train/loss').current(), hub.get_scalar('train/acc').current()
        (2.5, 0.5)
    """

    #: Device types whose values are copied asynchronously and pushed when ready.
    ASYNC_DEVICES = ('cuda', )

    def __init__(self, message_hub: MessageHub, capacity: int):
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(f'{type(self).__name__}: capacity must be a positive int, got '
                             f'{capacity!r}')
        self.message_hub = message_hub
        self.capacity = capacity
        self._host: Optional[torch.Tensor] = None
        self._host_view: Optional[np.ndarray] = None
        # (slot or None, event or None, device keys, host (key, value) pairs)
        self._pending: Deque[Tuple[Optional[int], object, List[str],
                                   List[Tuple[str, float]]]] = deque()
        self._next_slot = 0

    @property
    def num_pending(self) -> int:
        """Rows copied or being copied but not yet pushed."""
        return len(self._pending)

    def push(self, values: Dict[str, Scalar]) -> None:
        """Send ``values`` (key -> 0-d tensor or number) to the message hub, waiting for no
        device."""
        by_device: Dict[torch.device, Tuple[List[str], List[torch.Tensor]]] = {}
        host: List[Tuple[str, float]] = []
        for key, value in values.items():
            if torch.is_tensor(value) and value.device.type in self.ASYNC_DEVICES:
                keys, tensors = by_device.setdefault(value.device, ([], []))
                keys.append(key)
                tensors.append(value.detach().reshape(()))
            elif torch.is_tensor(value):
                # No event API to rely on elsewhere: read it as mmengine does.
                host.append((key, float(value.detach().double().cpu().numpy())
                             if value.device.type == 'cpu' else float(value)))
            else:
                host.append((key, float(value)))
        if by_device:  # one row per device (model parallel outputs); host values last
            rows = list(by_device.values())
            for i, (keys, tensors) in enumerate(rows):
                self._push_async(keys, tensors, host if i == len(rows) - 1 else [])
        elif self._pending:
            self._pending.append((None, None, [], host))  # waits for the rows before it
        else:
            self._update(host)
        self.poll()

    def poll(self) -> None:
        """Push every row whose copy has completed, oldest first; never waits."""
        while self._pending and (self._pending[0][1] is None or self._pending[0][1].query()):
            self._pop()

    def flush(self) -> None:
        """Wait for every copy in flight and push all values (a host sync if any are pending)."""
        while self._pending:
            if self._pending[0][1] is not None:
                self._pending[0][1].synchronize()
            self._pop()

    def _push_async(self, keys: List[str], values: List[torch.Tensor],
                    host: List[Tuple[str, float]]) -> None:
        if self._host is None or self._host.shape[1] < len(values):
            self.flush()  # every row read before the buffer changes
            self._host = self._allocate_host(max(len(values), 1))
            self._host_view = self._host.numpy()
        if len(self._pending) >= self.capacity:
            # The GPU is `capacity` rows behind: wait for the oldest so its slot frees up.
            if self._pending[0][1] is not None:
                self._pending[0][1].synchronize()
            self._pop()
        slot = self._next_slot
        self._next_slot = (slot + 1) % self.capacity
        dtypes = {v.dtype for v in values}
        stacked = torch.stack(values) if len(dtypes) == 1 else torch.stack(
            [v.double() for v in values])
        self._host[slot, :len(values)].copy_(stacked.double(), non_blocking=True)
        self._pending.append((slot, self._record_event(values[0].device), keys, host))

    def _allocate_host(self, width: int) -> torch.Tensor:
        return torch.empty(self.capacity, width, dtype=torch.float64, pin_memory=True)

    def _record_event(self, device: torch.device):
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return event

    def _pop(self) -> None:
        slot, _, keys, host = self._pending.popleft()
        if slot is not None:
            # Read the host buffer through numpy: plain memory, no tensor op.
            row = self._host_view[slot]
            self._update([(key, float(row[i])) for i, key in enumerate(keys)])
        self._update(host)

    def _update(self, pairs: List[Tuple[str, float]]) -> None:
        for key, value in pairs:
            self.message_hub.update_scalar(key, value)


class AsyncScalarLog(AsyncScalars):
    """One key's scalars (the gradient norm), delivered as :class:`AsyncScalars` delivers them.

    Args:
        message_hub (MessageHub): Where the values go.
        key (str): The message hub key, e.g. ``'train/grad_norm'``.
        capacity (int): The most values in flight.

    Examples:
        >>> import torch
        >>> from mmengine.logging import MessageHub
        >>> hub = MessageHub.get_instance('async_scalar_log_example')
        >>> log = AsyncScalarLog(hub, 'train/grad_norm', capacity=4)
        >>> log.push(torch.tensor(3.0))  # a CPU tensor is pushed at once
        >>> hub.get_scalar('train/grad_norm').current()
        3.0
    """

    def __init__(self, message_hub: MessageHub, key: str, capacity: int):
        super().__init__(message_hub, capacity)
        self.key = key

    def push(self, value: Scalar) -> None:  # type: ignore[override]
        """Send the 0-d tensor ``value`` to the message hub without waiting for its device."""
        super().push({self.key: value})
