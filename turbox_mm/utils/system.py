"""Small helpers shared by the modules that read the machine (affinity, huge pages, sysinfo)."""
import logging
from typing import Optional

from mmengine.logging import print_log

_warned = set()


def warn_once(key: str, msg: str) -> None:
    """Log ``msg`` as a warning the first time ``key`` is seen in this process."""
    if key in _warned:
        return
    _warned.add(key)
    print_log(msg, logger='current', level=logging.WARNING)


def read_text(path: str, strip: bool = False) -> Optional[str]:
    """The text of a (sysfs, procfs, cgroup) file, or None where it cannot be read.

    Args:
        path (str): The file.
        strip (bool): Strip surrounding whitespace. Defaults to False.
    """
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    return text.strip() if strip else text
