"""The nuScenes CAN bus expansion's files, read as plain JSON: where the expansion lies, which
scenes have data, and the messages of one scene and type (``<folder>/scene-NNNN_<kind>.json``,
what nuscenes-devkit's ``NuScenesCanBus.get_messages(scene, kind)`` returns).

Two info steps read them: ``create_data.py map-fields`` (MapTR's ``can_bus`` from the pose
messages, :class:`~turbox_mm.datasets.nuscenes_map_fields.CanBusPoses`) and
``create_data.py planning`` (SparseDrive's ``ego_status`` from the nearest pose and steering
messages, :class:`CanBusMessages`). A scene has no data when its name is not ``scene-NNNN``,
when it is on the devkit's blacklist, or when its file is absent; a file that exists but is
not a JSON list of messages is an error naming it.
"""
import bisect
import os.path as osp
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Type

from .nuscenes_tables import NuScenesTableError, load_json_list

__all__ = ['CAN_BLACKLIST', 'CAN_MESSAGES', 'find_can_bus', 'scene_file', 'load_messages',
           'is_number', 'locate_message', 'CanBusMessages']

#: Scene numbers without CAN bus data: nuscenes-devkit 1.2.0's
#: ``NuScenesCanBus.can_blacklist`` (``get_messages`` raises for them).
CAN_BLACKLIST = frozenset((161, 162, 163, 164, 165, 166, 167, 168, 170, 171, 172, 173, 174, 175,
                           176, 309, 310, 311, 312, 313, 314))
#: SparseDrive's ``ego_status``: per CAN bus message type read, the keys of the nearest
#: message and their lengths (None: a number).
CAN_MESSAGES = {'pose': (('accel', 3), ('rotation_rate', 3), ('vel', 3)),
                'steeranglefeedback': (('value', None), )}
_SCENE_NAME = re.compile(r'^scene-\d\d\d\d$')


def find_can_bus(root: str, can_bus_root: Optional[str] = None) -> Tuple[Optional[str], list]:
    """The CAN bus expansion's folder, and the folders looked at.

    Args:
        root (str): The nuScenes data root.
        can_bus_root (str, optional): The folder holding ``can_bus/`` (upstream's
            ``--canbus``, the devkit's ``NuScenesCanBus(dataroot)``), or ``can_bus/`` itself.
            Defaults to looking at ``<root>/can_bus`` and then at ``can_bus`` next to
            ``<root>`` (upstream's layout: ``data/can_bus`` beside ``data/nuscenes``).

    Returns:
        tuple[str | None, list[str]]: The first folder that exists (None if none does), and
        the folders looked at.
    """
    if can_bus_root is not None:
        looked = [osp.join(can_bus_root, 'can_bus')]
        if osp.basename(osp.normpath(can_bus_root)) == 'can_bus':
            looked.append(can_bus_root)
    else:
        looked = [osp.join(root, 'can_bus'),
                  osp.join(osp.dirname(osp.abspath(root)), 'can_bus')]
    for folder in looked:
        if osp.isdir(folder):
            return folder, looked
    return None, looked


def scene_file(folder: str, scene: str, kind: str) -> Tuple[Optional[str], Optional[str]]:
    """The scene's message file of type ``kind``: ``(path, None)``, or ``(None, why)`` for a
    scene without CAN data (as the devkit: a name that is not ``scene-NNNN``, a blacklisted
    scene, no file).

    Examples:
        >>> scene_file('can_bus', 'scene-0161', 'pose')
        (None, "on nuscenes-devkit's CAN bus blacklist")
        >>> scene_file('can_bus', 'my-scene', 'pose')[1]
        'not a nuScenes scene name (scene-NNNN)'
    """
    if not _SCENE_NAME.match(scene):
        return None, 'not a nuScenes scene name (scene-NNNN)'
    if int(scene[-4:]) in CAN_BLACKLIST:
        return None, "on nuscenes-devkit's CAN bus blacklist"
    path = osp.join(folder, f'{scene}_{kind}.json')
    if not osp.isfile(path):
        return None, f'no {osp.basename(path)}'
    return path, None


def is_number(value) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_messages(path: str, error: Type[Exception] = NuScenesTableError,
                  what: str = 'messages') -> list:
    """A message file's list (maybe empty).

    Raises:
        error: The file is not JSON, or not a list; the file named.
    """
    return load_json_list(path, error, 'CAN bus file', f'not a list of {what}')


def locate_message(utimes: Sequence[int], utime: int) -> int:
    """Index of the message nearest to ``utime`` in sorted ``utimes`` (upstream's rule: the
    earlier one only when strictly nearer).

    Examples:
        >>> locate_message([10, 20, 30], 15), locate_message([10, 20, 30], 14)
        (1, 0)
        >>> locate_message([10, 20, 30], 5), locate_message([10, 20, 30], 99)
        (0, 2)
    """
    i = bisect.bisect_left(utimes, utime)
    if i == len(utimes) or (i > 0 and utime - utimes[i - 1] < utimes[i] - utime):
        i -= 1
    return i


def _timed_messages(path: str, error: Type[Exception]) -> tuple:
    """A message file's list and its ``utime`` column, checked numeric and in time order."""
    messages = load_messages(path, error)
    utimes = []
    for index, message in enumerate(messages):
        utime = message.get('utime') if isinstance(message, dict) else None
        if not is_number(utime):
            raise error(f'{path}: message {index} has no numeric utime (microseconds), got '
                        f'{utime!r}')
        if utimes and utime < utimes[-1]:
            raise error(f'{path}: message {index} has utime {utime} before the previous '
                        f"message's {utimes[-1]} (the search for the nearest message needs "
                        'them in time order)')
        utimes.append(utime)
    return messages, utimes


@dataclass
class CanBusMessages:
    """The CAN bus messages SparseDrive reads, one file read once per scene and type.

    Attributes:
        folder (str | None): The expansion (``.../can_bus``); None where there is none.
        looked (list[str]): The folders looked at.
        error (type): The exception raised for a bad file (the calling step's).
        missing (dict[str, str]): Scene name -> why it has no CAN data (filled by
            :meth:`ego_status`).
    """
    folder: Optional[str]
    looked: List[str]
    error: Type[Exception] = NuScenesTableError
    missing: Dict[str, str] = field(default_factory=dict)
    _cache: Dict[tuple, tuple] = field(default_factory=dict, repr=False)

    def _messages(self, scene: str, kind: str) -> Tuple[Optional[tuple], Optional[str]]:
        if self.folder is None:
            return None, f'no CAN bus expansion at {" or ".join(self.looked)}'
        path, why = scene_file(self.folder, scene, kind)
        if path is None:
            return None, why
        if (scene, kind) not in self._cache:
            self._cache[scene, kind] = _timed_messages(path, self.error)
        messages, utimes = self._cache[scene, kind]
        if not messages:
            return None, f'{osp.basename(path)} holds no message'
        return (messages, utimes, path), None

    def ego_status(self, scene: str, timestamp: int) -> Optional[List[float]]:
        """The sample's 10 numbers, or None (the reason kept in :attr:`missing`) for a scene
        without CAN data.

        Raises:
            error: A file that is not a JSON list of messages with increasing numeric
                ``utime``, or a nearest message without a key of :data:`CAN_MESSAGES` (or
                with a wrong length); the file, the message and the key named.
        """
        values = []
        for kind, keys in CAN_MESSAGES.items():
            found, why = self._messages(scene, kind)
            if found is None:
                self.missing[scene] = why
                return None
            messages, utimes, path = found
            index = locate_message(utimes, timestamp)
            for key, size in keys:
                value = messages[index].get(key)
                numbers = value if size else [value]
                if (not isinstance(numbers, list) or (size and len(numbers) != size)
                        or not all(is_number(v) for v in numbers)):
                    shape = f'a list of {size} numbers' if size else 'a number'
                    raise self.error(f'{path}: message {index} has {key} {value!r}, not '
                                     f'{shape}')
                values.extend(float(v) for v in numbers)
        return values
