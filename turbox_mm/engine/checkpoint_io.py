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
other checkpoints, newest first, for a resume to fall back on.
"""
import os
import os.path as osp
import re
import zipfile
from typing import List, Optional

import torch

from turbox_mm.utils.atomic_files import atomic_write

#: The checkpoint names mmengine's CheckpointHook writes (``epoch_3.pth``, ``iter_800.pth``).
STEP_NAME = re.compile(r'^(epoch|iter)_(\d+)\.pth$')


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
                         before: Optional[str] = None) -> List[str]:
    """The ``epoch_N.pth`` / ``iter_N.pth`` files of ``folder``, the most recently written
    first (then the highest step).

    Args:
        folder (str): Where the checkpoint hook writes.
        exclude (str, optional): A path to leave out (the one that failed).
        before (str, optional): Only checkpoints of this one's kind (``epoch``/``iter``) with
            a smaller step; none if its name is not of that form.
    """
    if not osp.isdir(folder):
        return []
    limit = STEP_NAME.match(osp.basename(before)) if before is not None else None
    if before is not None and limit is None:
        return []
    found = []
    for name in os.listdir(folder):
        match = STEP_NAME.match(name)
        path = osp.join(folder, name)
        if not match or (exclude is not None and osp.abspath(path) == osp.abspath(exclude)):
            continue
        if limit is not None and (match.group(1) != limit.group(1)
                                  or int(match.group(2)) >= int(limit.group(2))):
            continue
        found.append((osp.getmtime(path), int(match.group(2)), path))
    return [path for _, _, path in sorted(found, reverse=True)]
