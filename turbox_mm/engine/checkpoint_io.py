"""Checkpoint files that a crash cannot take away: atomic, durable writes and a checked resume.

mmengine writes a checkpoint in place (``open('wb')`` after ``torch.save`` into memory), and
``last_checkpoint`` too; a crash or a full disk in the middle leaves a truncated file under the
real name. Here both go through :func:`turbox_mm.utils.atomic_files.atomic_write` with
``durable=True``: a temporary name in the folder, flushed and ``fsync``-ed, renamed over the
real name (``os.replace``: atomic on POSIX), the folder ``fsync``-ed; the real name holds the
old file or the whole new one, never a part. A failure at any step removes the temporary file
and raises.

:func:`readable_checkpoint` tells a whole checkpoint from a damaged one without unpickling it
(torch's zip format carries a CRC per entry); :func:`previous_checkpoints` lists a folder's
other checkpoints, newest first, for a resume to fall back on (mmengine's default names, and
those of a checkpoint hook's own ``filename_tmpl``: :func:`name_patterns`);
:func:`decided_on_rank0` makes a resume decision once, on rank 0, for every rank.
"""
import os
import os.path as osp
import re
import zipfile
from typing import Callable, List, Optional, Sequence, Tuple, TypeVar

import torch

from turbox_mm.utils.atomic_files import atomic_write

#: ``(kind, name pattern with the step as its one group)`` of the names mmengine's
#: CheckpointHook writes by default (``epoch_3.pth``, ``iter_800.pth``).
DEFAULT_PATTERNS = (('epoch', re.compile(r'^epoch_(\d+)\.pth$')),
                    ('iter', re.compile(r'^iter_(\d+)\.pth$')))
Patterns = Sequence[Tuple[str, 're.Pattern']]
T = TypeVar('T')


def name_patterns(filename_tmpl: Optional[str] = None, by_epoch: bool = True) -> Patterns:
    """The checkpoint names to look for: mmengine's defaults and, if given, the names a
    checkpoint hook's ``filename_tmpl`` (one ``{}`` for the step, e.g. ``'ckpt_e{}.pth'``)
    makes, of kind ``'epoch'`` or ``'iter'`` as the hook's ``by_epoch`` says.

    Examples:
        >>> kind, pattern = name_patterns('ckpt_e{}.pth')[0]
        >>> kind, pattern.match('ckpt_e7.pth').group(1)
        ('epoch', '7')
    """
    if filename_tmpl is None or filename_tmpl.count('{}') != 1:
        return DEFAULT_PATTERNS
    head, tail = filename_tmpl.split('{}')
    custom = re.compile('^' + re.escape(head) + r'(\d+)' + re.escape(tail) + '$')
    return ((('epoch' if by_epoch else 'iter'), custom), ) + DEFAULT_PATTERNS


def _step_name(name: str, patterns: Patterns) -> Optional[Tuple[str, int]]:
    for kind, pattern in patterns:
        match = pattern.match(name)
        if match:
            return kind, int(match.group(1))
    return None


def decided_on_rank0(decide: Callable[[], T]) -> T:
    """``decide()`` run on rank 0 only, its result (or its error) given to every rank.

    A resume's choices (which checkpoint is whole, which to fall back on) read the files; run
    on every rank, each would read the whole checkpoint and could decide differently where
    ranks see different disks. In a single process (or without an initialised process group)
    this is just ``decide()``. On other ranks an error of rank 0's comes back as a
    ``RuntimeError`` with its message.
    """
    from mmengine.dist import broadcast_object_list, get_rank, get_world_size
    if get_world_size() == 1:
        return decide()
    box: list = [None]
    error: Optional[BaseException] = None
    if get_rank() == 0:
        try:
            box = [('ok', decide())]
        except Exception as exc:  # given to the other ranks, then raised here as it is
            error = exc
            box = [('error', f'{type(exc).__name__}: {exc}')]
    broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    status, value = box[0]
    if status == 'error':
        raise RuntimeError(f'rank 0 failed to decide the checkpoint to resume: {value}')
    return value


def is_local_path(filename: str) -> bool:
    """Whether ``filename`` is a plain file system path (not ``s3://``, ``pavi://``, ...)."""
    return '://' not in str(filename)


def save_checkpoint_atomically(checkpoint: dict, filename: str, file_client_args=None,
                               backend_args=None) -> None:
    """mmengine's ``save_checkpoint`` with the same arguments, atomic for local paths.

    Other backends (``s3://``, ``pavi://``, a ``backend_args`` backend) go to mmengine's
    function unchanged.
    """
    if not is_local_path(filename) or file_client_args is not None or \
            (backend_args is not None and backend_args.get('backend', 'local') != 'local'):
        from mmengine.runner.checkpoint import save_checkpoint
        return save_checkpoint(checkpoint, filename, file_client_args=file_client_args,
                               backend_args=backend_args)
    atomic_write(filename, lambda f: torch.save(checkpoint, f), durable=True)


def readable_checkpoint(path: str) -> Optional[str]:
    """None if ``path`` is a whole checkpoint; else why not (missing, truncated, bad CRC).

    Checks torch's zip container entry by entry (every CRC) without unpickling anything.
    Legacy (non-zip) files are only checked for being non-empty.
    """
    if not osp.isfile(path):
        return 'the file does not exist'
    if osp.getsize(path) == 0:
        return 'the file is empty'
    if not zipfile.is_zipfile(path):
        with open(path, 'rb') as f:
            head = f.read(4)
        if head == b'PK\x03\x04':
            return 'damaged: truncated (the zip directory at its end is missing)'
        return None if head[:1] == b'\x80' else 'not a torch checkpoint (no zip, no pickle)'
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f'damaged: {error}'
    return None if bad is None else f'damaged: entry {bad!r} fails its CRC'


def previous_checkpoints(folder: str, exclude: Optional[str] = None,
                         before: Optional[str] = None,
                         patterns: Patterns = DEFAULT_PATTERNS) -> List[str]:
    """The checkpoints of ``folder`` (``epoch_N.pth`` / ``iter_N.pth``, or the names of
    ``patterns``), the most recently written first (then the highest step).

    Args:
        folder (str): Where the checkpoint hook writes.
        exclude (str, optional): A path to leave out (the one that failed).
        before (str, optional): Only checkpoints of this one's kind (``epoch``/``iter``) with
            a smaller step; none if its name is not of a known form.
        patterns: :func:`name_patterns`. Defaults to mmengine's names.
    """
    if not osp.isdir(folder):
        return []
    limit = _step_name(osp.basename(before), patterns) if before is not None else None
    if before is not None and limit is None:
        return []
    found = []
    for name in os.listdir(folder):
        step = _step_name(name, patterns)
        path = osp.join(folder, name)
        if step is None or (exclude is not None and osp.abspath(path) == osp.abspath(exclude)):
            continue
        if limit is not None and (step[0] != limit[0] or step[1] >= limit[1]):
            continue
        found.append((osp.getmtime(path), step[1], path))
    return [path for _, _, path in sorted(found, reverse=True)]
