"""Files written whole or not at all: a temporary name in the same folder, then a rename.

Readers (and a resumed run) see the old file or the complete new one, never a part: a crash,
a kill or a full disk in the middle leaves at most a hidden temporary file, and a failure that
Python sees removes it. ``durable=True`` also ``fsync``-s the file before the rename and the
folder after it, so the new file survives a power loss once the call returns (checkpoints);
the many files of a generated dataset skip that cost.
"""
import os
import os.path as osp
from typing import BinaryIO, Callable


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles: nothing more to make durable
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[BinaryIO], None], durable: bool = False) -> None:
    """Write ``path`` through ``write(file)``, atomically.

    Args:
        path (str): The destination; its folder is created if missing.
        write (callable): Writes the content into the open binary file it is given.
        durable (bool): ``fsync`` the file and its folder. Defaults to False.

    Raises:
        Whatever ``write``, the flush, ``fsync`` or the rename raise; the temporary file is
        removed first and ``path`` is left as it was.

    Examples:
        >>> import tempfile
        >>> path = osp.join(tempfile.mkdtemp(), 'a.txt')
        >>> atomic_write(path, lambda f: f.write(b'hello'))
        >>> open(path).read()
        'hello'
    """
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = osp.join(folder, f'.{osp.basename(path)}.tmp-{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise
    if durable:
        _fsync_dir(folder)


def atomic_write_bytes(path: str, data: bytes, durable: bool = False) -> None:
    """:func:`atomic_write` of ``data``."""
    atomic_write(path, lambda f: f.write(data), durable)


def atomic_write_text(path: str, text: str, durable: bool = False) -> None:
    """:func:`atomic_write` of ``text`` in UTF-8."""
    atomic_write(path, lambda f: f.write(text.encode('utf-8')), durable)
