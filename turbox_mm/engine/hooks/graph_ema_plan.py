"""What one update of :class:`~.graph_ema.GraphExponentialMovingAverage` touches.

``_Plan`` pairs each averaged tensor with its source tensor the way mmengine's
``update_parameters`` does and groups the pairs by device and dtype (``_group``) so that one
``torch._foreach_lerp_`` or ``torch._foreach_copy_`` call takes each group; ``_Watch`` records
the object identities and data pointers a captured CUDA graph depends on, so that the graph
EMA can tell, before every replay, whether the graph is stale.
"""
import operator
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

if TYPE_CHECKING:  # the plan is built by the EMA, which imports this module
    from .graph_ema import GraphExponentialMovingAverage

# The update kinds that are captured: 'lerp' averages (and copies buffers), 'copy' only copies
# the buffers (calls between two averaging steps when interval > 1).
_LERP, _COPY = 'lerp', 'copy'


def _group(pairs: List[Tuple[Tensor, Tensor]]) -> List[Tuple[List[Tensor], List[Tensor]]]:
    """Split (averaged, source) pairs into lists that one foreach call can take.

    A foreach kernel takes one device and one dtype, so pairs are grouped by the device and
    dtype of both sides. A tensor that appears more than once (a tied weight listed under two
    state-dict keys) goes to a later group each time it repeats, so no foreach call writes the
    same memory twice and repeated updates apply in order, as mmengine's loop does. Empty
    tensors are left out.
    """
    seen: Dict[int, int] = {}
    groups: Dict[tuple, Tuple[List[Tensor], List[Tensor]]] = {}
    for avg, src in pairs:
        if avg.numel() == 0:
            continue
        ptr = avg.data_ptr()
        rank = seen.get(ptr, 0)
        seen[ptr] = rank + 1
        key = (rank, avg.device, avg.dtype, src.device, src.dtype)
        avg_list, src_list = groups.setdefault(key, ([], []))
        avg_list.append(avg)
        src_list.append(src)
    return [groups[k] for k in sorted(groups, key=lambda k: k[0])]


class _Watch:
    """Object identities and data pointers that a captured update depends on.

    ``slots`` are ``(dict, key, object)`` triples: a module's ``_parameters``, ``_buffers`` or
    ``_modules`` dict and the object it held when the update was planned. ``tensors`` are the
    tensors whose storage the update reads or writes.
    """

    def __init__(self) -> None:
        self.dicts: List[dict] = []
        self.keys: List[str] = []
        self.objects: List[object] = []
        self.tensors: List[Tensor] = []
        self.ptrs: List[int] = []

    def slot(self, owner: dict, key: str) -> None:
        self.dicts.append(owner)
        self.keys.append(key)
        self.objects.append(owner[key])

    def watch_module_tree(self, root: nn.Module) -> None:
        """Watch every submodule edge, so replacing a submodule is noticed."""
        for module in root.modules():
            for name, child in module._modules.items():
                if child is not None:
                    self.slot(module._modules, name)

    def freeze(self, tensors: List[Tensor]) -> None:
        self.tensors = list(tensors)
        self.ptrs = list(map(Tensor.data_ptr, self.tensors))

    def valid(self) -> bool:
        """Whether every watched slot holds the same object and every tensor the same storage."""
        current = map(dict.get, self.dicts, self.keys)
        if not all(map(operator.is_, current, self.objects)):
            return False
        return list(map(Tensor.data_ptr, self.tensors)) == self.ptrs


def _tensor_slot(root: nn.Module, name: str) -> Optional[Tuple[dict, str]]:
    """The ``(module._parameters or module._buffers, key)`` that holds tensor ``name``."""
    prefix, _, key = name.rpartition('.')
    try:
        owner = root.get_submodule(prefix) if prefix else root
    except AttributeError:
        return None
    for table in (owner._parameters, owner._buffers):
        if table.get(key) is not None:
            return table, key
    return None


class _Plan:
    """The tensor pairs of one update between an averaged model and one source model.

    Built from the same walks that mmengine's ``update_parameters`` makes, so the pairing is
    mmengine's: ``avg_parameters`` keys looked up in the source by name, and buffers paired in
    ``buffers()`` order when buffers are not averaged. The foreach calls get ``.data`` aliases;
    the watch keeps the tensors themselves, whose storage ``p.data = ...`` would move.
    """

    def __init__(self, ema: 'GraphExponentialMovingAverage', model: nn.Module) -> None:
        self.model = model
        self.ok = False
        self.missing = ''
        watch = _Watch()
        if ema.update_buffers:
            src_named = dict(model.named_parameters(remove_duplicate=False))
            src_named.update(model.named_buffers(remove_duplicate=False))
        else:
            src_named = dict(model.named_parameters())
        watched: List[Tensor] = []
        state_pairs = []
        for name, avg in ema.avg_parameters.items():
            src = src_named.get(name)
            slot = _tensor_slot(model, name)
            if src is None or slot is None:
                self.missing = name
                return
            watch.slot(*slot)
            watched += [avg, src]
            state_pairs.append((avg.data, src.data))
        buffer_pairs = []
        if not ema.update_buffers:
            # mmengine pairs buffers by position in buffers(); the names only serve to watch
            # the dicts that hold them.
            avg_bufs = list(ema.module.named_buffers())
            src_bufs = list(model.named_buffers())
            for (avg_name, avg), (src_name, src) in zip(avg_bufs, src_bufs):
                for root, name in ((ema.module, avg_name), (model, src_name)):
                    slot = _tensor_slot(root, name)
                    if slot is not None:
                        watch.slot(*slot)
                watched += [avg, src]
                buffer_pairs.append((avg.data, src.data))
        watch.watch_module_tree(model)
        watch.watch_module_tree(ema.module)
        watch.freeze(watched)
        self.watch = watch
        self.lerp_groups = _group([(a, s) for a, s in state_pairs if a.dtype.is_floating_point])
        self.copy_groups = _group(buffer_pairs)
        self.all_copy_groups = _group(state_pairs + buffer_pairs)
        devices = {t.device for t in watched}
        self.device = next(iter(devices)) if len(devices) == 1 else None
        if not devices:
            self.why_eager = 'the model has no tensors'
        elif self.device is None:
            self.why_eager = ('the averaged and source tensors are on several devices: '
                              + ', '.join(sorted(str(d) for d in devices)))
        elif self.device.type != 'cuda':
            self.why_eager = f'the tensors are on {self.device.type}'
        else:
            self.why_eager = None
        self.ok = True

    def run(self, kind: str, momentum: float) -> None:
        """Enqueue one update of ``kind`` (``'lerp'`` or ``'copy'``)."""
        if kind == _LERP:
            for avg, src in self.lerp_groups:
                torch._foreach_lerp_(avg, _on_device(src, avg[0].device), momentum)
        for avg, src in self.copy_groups:
            torch._foreach_copy_(avg, _on_device(src, avg[0].device))

    def copy_all(self) -> None:
        """Copy every planned source tensor into its averaged tensor (mmengine's step 0)."""
        for avg, src in self.all_copy_groups:
            torch._foreach_copy_(avg, _on_device(src, avg[0].device))


def _on_device(tensors: List[Tensor], device: torch.device) -> List[Tensor]:
    """``tensors`` moved to ``device`` (one group shares a device), as mmengine's ``.to``."""
    if tensors[0].device == device:
        return tensors
    return [t.to(device) for t in tensors]
