"""Stop a training loader's worker processes when the training loop ends.

A loader with ``persistent_workers=True`` keeps its iterator, and with it its worker
processes, on the ``DataLoader`` object (``_iterator``) after the loop stops drawing from it;
turbox's cyclic samplers never exhaust it either. Those workers then outlive training and are
only reaped by torch's exit handlers, which join each worker with a timeout (and, with
``pin_memory``, a pin-memory thread that may still wait on their queue: PyTorch issue 81794,
"Dataloader hangs on exit", seen with persistent workers and pinned memory together). A run
with many workers can therefore sit for minutes after its last iteration. Shutting the
workers down as soon as training ends (the same call torch makes when an iterator is
deleted) ends them at once, and frees their memory for the test loop that may follow.
"""
from typing import Optional

from torch.utils.data import DataLoader


def shutdown_loader_workers(dataloader: Optional[DataLoader], *iterators) -> int:
    """Shut down the worker processes of ``dataloader``'s persistent iterator and of any of
    ``iterators`` (loader iterators, or wrappers holding one as ``_iterator``), each once.

    Single-process iterators and objects without workers are left alone. The loader stays
    usable: its next ``iter()`` starts fresh workers.

    Returns:
        int: How many iterators were shut down.

    Examples:
        >>> import torch
        >>> loader = DataLoader(list(range(8)), num_workers=0)
        >>> shutdown_loader_workers(loader, iter(loader))
        0
    """
    candidates = [getattr(dataloader, '_iterator', None)]
    for it in iterators:
        candidates += [it, getattr(it, '_iterator', None)]
    done, count = set(), 0
    for it in candidates:
        shutdown = getattr(it, '_shutdown_workers', None)
        if it is None or id(it) in done or shutdown is None:
            continue
        done.add(id(it))
        shutdown()
        count += 1
    if dataloader is not None and getattr(dataloader, '_iterator', None) is not None \
            and id(dataloader._iterator) in done:
        dataloader._iterator = None  # a shut-down iterator cannot be reused
    return count
