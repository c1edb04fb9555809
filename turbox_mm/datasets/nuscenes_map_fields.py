"""MapTR's per-sample fields for nuScenes v2 info files: ``scene_token``, ``map_location``
and ``can_bus``, from the nuScenes tables and the CAN bus expansion.

mmdet3d 1.4's converter writes none of them; MapTR's own converters
(hustvl/MapTR ``tools/data_converter/nuscenes_converter.py`` and
``tools/maptrv2/custom_nusc_map_converter.py``) write all three into their v1 infos.
:func:`add_map_fields` adds them to mmdet3d's v2 infos with the same values:

- ``scene_token``: the sample's ``scene_token`` in ``sample.json`` (the MapTR detector's
  ``video_test_mode`` and the metas read it);
- ``map_location``: the ``location`` of the scene's log (``sample`` -> ``scene.log_token``
  -> ``log.location``, e.g. ``'boston-seaport'``), the map expansion
  :class:`~turbox_mm.datasets.transforms.LoadMapGT` cuts the ground truth from;
- ``can_bus``: 18 numbers from the scene's ``<scene name>_pose.json`` of the CAN bus
  expansion, written only when the expansion is there (:func:`can_bus_from_poses`).

``can_bus`` follows upstream's ``_get_can_bus_info`` (the same function in both converters),
including its slip: of the pose messages, the last one at or before the sample time
gives the position (3) and the orientation (4), but the acceleration, rotation rate and
velocity (9) are read from the loop variable left over by the search, which is the first
message *after* the sample time (the last message if none is after it; the first one if all
are). Then two zeros. The motion keys go in the order the position message lists them in
the file (``accel``, ``rotation_rate``, ``vel`` in nuScenes' files).
:class:`~turbox_mm.datasets.transforms.NuScenesMapTRAdaptor` overwrites ``[:7]`` and the
two last numbers from ``ego2global`` as upstream's dataset does, so only the 9 motion numbers
reach the model, each from the message after the sample.

Scenes without CAN data get 18 zeros, as upstream: scenes on nuscenes-devkit's
``NuScenesCanBus.can_blacklist`` (:data:`CAN_BLACKLIST`; the devkit raises for them and
upstream catches it), scenes without a pose file (upstream's comment: the test split's scenes
have none) and names that are not ``scene-NNNN``. Without the expansion at all (upstream's
converter stops) ``can_bus`` is not written and a warning names the folders looked at: the
adaptor then fills ``[:7]`` and the yaw from ``ego2global`` and leaves the 9 motion numbers
at zero.

Only ``sample.json``, ``scene.json`` and ``log.json`` of ``<root>/<version>/`` and the
``*_pose.json`` files are read, as plain JSON (the reading equals the devkit's
``NuScenesCanBus.get_messages(scene, 'pose')``; ``tests/test_nuscenes_map_fields.py`` checks
it). Values already present and equal are kept (running the step twice changes nothing); a
different one is an error unless ``force=True`` overwrites it. Info files are checked before
any is written, and rewritten atomically, only when a value changes.

Examples:
    >>> from turbox_mm.datasets.nuscenes_map_fields import add_map_fields
    >>> add_map_fields(['data/nuscenes/nuscenes_infos_train.pkl'],  # doctest: +SKIP
    ...                'data/nuscenes', 'v1.0-trainval')
"""
import os.path as osp
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .can_bus_files import CAN_BLACKLIST, find_can_bus, is_number, load_messages, scene_file
from .nuscenes_tables import (NuScenesTableError, check_version, load_info_files, read_table,
                              step_command, write_info_file)

__all__ = ['FIELDS', 'TABLES', 'CAN_BLACKLIST', 'MapFieldsError', 'SceneTables',
           'load_scene_tables', 'find_can_bus', 'CanBusPoses', 'can_bus_from_poses',
           'map_fields_of', 'add_map_fields', 'format_results', 'command_line']

#: The fields the step writes.
FIELDS = ('scene_token', 'map_location', 'can_bus')
#: The tables read, and the keys read from their rows.
TABLES = {'sample': ('token', 'scene_token'), 'scene': ('token', 'log_token'),
          'log': ('token', 'location')}
#: The keys read in addition when ``can_bus`` is written.
CAN_BUS_KEYS = {'sample': ('timestamp', ), 'scene': ('name', )}
#: The length of ``can_bus``.
CAN_BUS_SIZE = 18
#: The keys of a pose message that are not the 9 motion numbers.
_POSE_KEYS = ('utime', 'pos', 'orientation')


class MapFieldsError(NuScenesTableError):
    """A table, a pose file or an info file does not allow the map fields; the message names
    the file and the key."""


def command_line(info_files: Sequence[str] = ('<data_root>/nuscenes_infos_train.pkl',
                                              '<data_root>/nuscenes_infos_val.pkl'),
                 root: str = '<data_root>', version: Optional[str] = None) -> str:
    """The ``tools/create_data.py map-fields`` command that adds the fields to ``info_files``.

    Examples:
        >>> print(command_line(['data/nuscenes/nuscenes_infos_val.pkl'], 'data/nuscenes'))
        python tools/create_data.py map-fields data/nuscenes/nuscenes_infos_val.pkl --root-path data/nuscenes
    """  # noqa: E501
    return step_command('map-fields', info_files, root, version)


@dataclass
class SceneTables:
    """What the fields come from, per sample.

    Attributes:
        folder (str): ``<root>/<version>``.
        version (str): The nuScenes version.
        samples (dict[str, tuple[str, int | None]]): Sample token -> its scene token and
            its ``timestamp`` (microseconds; None when not read).
        scenes (dict[str, tuple[str, str | None]]): Scene token -> its log's location and
            its ``name`` (None when not read).
    """
    folder: str
    version: str
    samples: Dict[str, Tuple[str, Optional[int]]]
    scenes: Dict[str, Tuple[str, Optional[str]]]


def load_scene_tables(root: str, version: str, can_bus: bool = False) -> SceneTables:
    """Read ``sample.json``, ``scene.json`` and ``log.json`` of ``<root>/<version>/``.

    Args:
        root (str): The nuScenes data root.
        version (str): One of :data:`~turbox_mm.datasets.nuscenes_tables.VERSIONS`.
        can_bus (bool): Also read what ``can_bus`` needs (sample ``timestamp``, scene
            ``name``). Defaults to False.

    Returns:
        SceneTables: The scene and location of every sample.

    Raises:
        MapFieldsError: A table is missing, unreadable, lacks a key, or a row names a scene
            or log its tables do not hold (the file, row and key named).
    """
    check_version(version, MapFieldsError)
    folder = osp.join(root, version)

    def rows(name):
        keys = TABLES[name] + (CAN_BUS_KEYS.get(name, ()) if can_bus else ())
        return read_table(root, version, name, keys, needed=tuple(TABLES),
                          purpose='the map-fields step', error=MapFieldsError)

    samples, scenes, logs = rows('sample'), rows('scene'), rows('log')
    location = {row['token']: row['location'] for row in logs}
    _check_links(folder, 'scene', scenes, 'log_token', location, 'log')
    scene_of = {row['token']: (location[row['log_token']], row.get('name')) for row in scenes}
    _check_links(folder, 'sample', samples, 'scene_token', scene_of, 'scene')
    sample_of = {row['token']: (row['scene_token'], row.get('timestamp')) for row in samples}
    return SceneTables(folder, version, sample_of, scene_of)


def _check_links(folder: str, table: str, rows: list, key: str, targets: dict,
                 target_table: str) -> None:
    """Every row's ``key`` names a row of ``target_table`` (``targets``), else an error naming
    the file, the row and the token."""
    for index, row in enumerate(rows):
        if row[key] not in targets:
            raise MapFieldsError(f'{osp.join(folder, table + ".json")}: row {index} (token '
                                 f'{row["token"]!r}) has {key} {row[key]!r}, which '
                                 f'{target_table}.json does not hold')


@dataclass
class CanBusPoses:
    """The pose messages of the scenes, read once per scene.

    Attributes:
        folder (str): The CAN bus expansion (``.../can_bus``).
        missing (dict[str, str]): Scene name -> why it has no CAN data (filled by
            :meth:`can_bus`).
    """
    folder: str
    missing: Dict[str, str] = field(default_factory=dict)
    _cache: Dict[str, Optional[list]] = field(default_factory=dict, repr=False)

    def messages(self, scene: str) -> Tuple[Optional[list], Optional[str]]:
        """The scene's pose messages, as ``NuScenesCanBus.get_messages(scene, 'pose')``
        gives them, or ``(None, why)`` for a scene without CAN data.

        Raises:
            MapFieldsError: A pose file that is not JSON, not a non-empty list of messages,
                or a message without ``utime`` / ``pos`` / ``orientation`` (the file, the
                message and the key named; upstream's bare ``except`` would have turned an
                unreadable file into zeros).
        """
        path, why = scene_file(self.folder, scene, 'pose')
        if path is None:
            return None, why
        if scene not in self._cache:
            self._cache[scene] = _read_poses(path)
        return self._cache[scene], None

    def can_bus(self, scene: str, timestamp: int) -> List[float]:
        """The sample's ``can_bus``: :func:`can_bus_from_poses` of the scene's messages, or
        18 zeros (upstream's value) for a scene without CAN data."""
        messages, why = self.messages(scene)
        if messages is None:
            self.missing[scene] = why
            return [0.0] * CAN_BUS_SIZE
        return can_bus_from_poses(messages, timestamp,
                                  osp.join(self.folder, f'{scene}_pose.json'))


def _read_poses(path: str) -> list:
    messages = load_messages(path, MapFieldsError, 'pose messages')
    if not messages:
        raise MapFieldsError(f'{path}: not a list of pose messages, got no message')
    for index, message in enumerate(messages):
        absent = [k for k in _POSE_KEYS if not isinstance(message, dict) or k not in message]
        if absent:
            raise MapFieldsError(f'{path}: message {index} has no {absent[0]!r}')
        utime = message['utime']
        if not is_number(utime):
            raise MapFieldsError(f'{path}: message {index} has utime {utime!r}, not a number '
                                 '(microseconds)')
    return messages


def can_bus_from_poses(messages: list, timestamp: int, source: str = '<pose messages>'
                       ) -> List[float]:
    """A sample's 18 ``can_bus`` numbers from its scene's pose messages, as upstream's
    converter computes them (the module docstring describes the procedure and its slip).

    Args:
        messages (list[dict]): The scene's pose messages in file order, each with ``utime``
            (microseconds), ``pos`` (3), ``orientation`` (4, w x y z) and the motion keys.
        timestamp (int): The sample's ``timestamp`` in ``sample.json`` (microseconds).
        source (str): The pose file, for messages.

    Returns:
        list[float]: ``pos`` and ``orientation`` of the last message at or before
        ``timestamp`` (the first message if none is), the motion keys of the first message
        after it (the last message if none is), in the order of the former's keys, then
        ``0.0, 0.0``.

    Raises:
        MapFieldsError: The message read for the motion lacks a key of the other, or the
            numbers are not 18.

    Examples:
        >>> poses = [dict(utime=t, pos=[t, 0, 0], orientation=[1, 0, 0, 0], accel=[t, 0, 0],
        ...               rotation_rate=[0, 0, t], vel=[t, 0, 0]) for t in (10, 20, 30)]
        >>> bus = can_bus_from_poses(poses, 25)
        >>> bus[:3], bus[7:10], bus[10:13], bus[13:16]  # position at 20, motion from 30
        ([20.0, 0.0, 0.0], [30.0, 0.0, 0.0], [0.0, 0.0, 30.0], [30.0, 0.0, 0.0])
    """
    after = next((i for i, m in enumerate(messages) if m['utime'] > timestamp), None)
    if after is None:
        chosen = motion = len(messages) - 1
    else:
        chosen, motion = max(after - 1, 0), after
    values = []
    for key in ('pos', 'orientation', *(k for k in messages[chosen] if k not in _POSE_KEYS)):
        index = chosen if key in _POSE_KEYS else motion
        value = messages[index].get(key)
        if not isinstance(value, list):
            raise MapFieldsError(
                f'{source}: message {index} has no list {key!r}' + (
                    '' if index == chosen else f' (message {chosen} has the key; the motion '
                    'numbers are read from the message after the sample time)'))
        values.extend(value)
    values.extend([0.0, 0.0])
    if len(values) != CAN_BUS_SIZE:
        keys = [k for k in messages[chosen] if k not in _POSE_KEYS]
        raise MapFieldsError(
            f'{source}: messages {chosen} and {motion} give {len(values)} can_bus numbers, not '
            f'{CAN_BUS_SIZE} (pos 3, orientation 4, {", ".join(keys) or "no motion key"}, '
            'then 2 zeros; nuScenes pose messages have accel, rotation_rate and vel of 3)')
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise MapFieldsError(f'{source}: messages {chosen} and {motion} hold a value that is '
                             f'not a number ({exc})') from exc


def map_fields_of(infos: dict, tables: SceneTables, name: str,
                  poses: Optional[CanBusPoses] = None) -> List[dict]:
    """The fields of every sample of an info file.

    Args:
        infos (dict): The loaded v2 info file.
        tables (SceneTables): From :func:`load_scene_tables` (with ``can_bus=True`` when
            ``poses`` is given).
        name (str): The info file, for messages.
        poses (CanBusPoses, optional): The CAN bus expansion; without it no ``can_bus``.

    Returns:
        list[dict]: Per sample of ``data_list``: ``scene_token``, ``map_location`` and, with
        ``poses``, ``can_bus``.

    Raises:
        MapFieldsError: A sample token the tables do not hold (infos of another version or
            dataset); see also :meth:`CanBusPoses.messages` and :func:`can_bus_from_poses`.
    """
    unknown = [(i, info.get('token')) for i, info in enumerate(infos['data_list'])
               if info.get('token') not in tables.samples]
    if unknown:
        index, token = unknown[0]
        stated = (infos.get('metainfo') or {}).get('version')
        raise MapFieldsError(
            f'{name}: data_list[{index}].token {token!r} is not a sample of '
            f'{osp.join(tables.folder, "sample.json")} ({len(unknown)} of '
            f'{len(infos["data_list"])} samples are not); infos of another nuScenes version '
            f'or dataset? (metainfo.version: {stated!r}, tables: {tables.version})')
    out = []
    for info in infos['data_list']:
        scene_token, timestamp = tables.samples[info['token']]
        location, scene = tables.scenes[scene_token]
        fields = dict(scene_token=scene_token, map_location=location)
        if poses is not None:
            fields['can_bus'] = poses.can_bus(scene, timestamp)
        out.append(fields)
    return out


def _same(old, new) -> bool:
    if isinstance(new, str):
        return old == new
    old = np.asarray(old, dtype=np.float64)
    return old.shape == (len(new), ) and bool(np.array_equal(old, np.asarray(new)))


def _shown(value) -> str:
    if isinstance(value, str):
        return repr(value)
    return repr(np.round(np.asarray(value, dtype=np.float64), 4).tolist())


def _apply(infos: dict, fields: List[dict], name: str, force: bool) -> Dict[str, int]:
    """Write ``fields`` into ``infos`` in place; the counts of what changed."""
    counts = dict(added=0, kept=0, overwritten=0)
    for index, (info, sample_fields) in enumerate(zip(infos['data_list'], fields)):
        for key, new in sample_fields.items():
            if key not in info:
                counts['added'] += 1
            elif _same(info[key], new):
                counts['kept'] += 1
                continue
            elif not force:
                raise MapFieldsError(
                    f'{name}: data_list[{index}].{key} is {_shown(info[key])} but the tables '
                    f'give {_shown(new)} (sample {info["token"]!r}); the infos already carry '
                    'other values: pass --force (force=True) to overwrite them')
            else:
                counts['overwritten'] += 1
            info[key] = new
    return counts


def add_map_fields(infos_path: Union[str, Sequence[str]], root_path: str,
                   version: Optional[str] = None, force: bool = False,
                   can_bus_root: Optional[str] = None) -> List[dict]:
    """Add ``scene_token``, ``map_location`` and (with the CAN bus expansion) ``can_bus`` to
    every sample of v2 info files.

    Every file is checked before any is written; a file whose values are all there already
    is left as it is. Without the expansion, one warning names the folders looked at.

    Args:
        infos_path (str | list[str]): v2 info files (``nuscenes_infos_{train,val}.pkl``).
        root_path (str): The nuScenes data root, holding ``<version>/``.
        version (str, optional): The tables' version. Defaults to the files'
            ``metainfo.version`` (mmdet3d's converter writes it); a different one given here
            is an error.
        force (bool): Overwrite values that differ from the tables'. Defaults to False (an
            error).
        can_bus_root (str, optional): Where ``can_bus/`` is (:func:`find_can_bus`).

    Returns:
        list[dict]: Per file: ``path``, ``samples``, ``added``, ``kept``, ``overwritten``
        (field values), ``can_bus`` (samples given CAN data), ``can_bus_zeros`` (samples of
        scenes without it), ``no_can_data`` (scene name -> why), ``can_bus_folder`` (None:
        not written), ``can_bus_looked`` (the folders looked at), ``written`` (bool).

    Raises:
        MapFieldsError: See :func:`load_scene_tables` and :func:`map_fields_of`; also a file
            with no or another ``metainfo.version``, and values that differ without
            ``force``.
        InfoFileError: A file that is not a v2 info file (from ``check_infos``).
    """
    paths = [infos_path] if isinstance(infos_path, str) else list(infos_path)
    loaded, version = load_info_files(
        paths, version, error=MapFieldsError,
        why='the scene and log tables of the version the infos were made from give the fields')
    if not loaded:
        return []
    folder, looked = find_can_bus(root_path, can_bus_root)
    if folder is None:
        warnings.warn(f'no nuScenes CAN bus expansion at {" or ".join(looked)}: can_bus is not '
                      'written; NuScenesMapTRAdaptor then takes the position, orientation and '
                      'yaw from ego2global and uses zeros for the acceleration, rotation rate '
                      'and velocity (download can_bus.zip from nuscenes.org and unpack it '
                      'there to write them)')
    tables = load_scene_tables(root_path, version, can_bus=folder is not None)
    results = []
    for path, infos in loaded:
        poses = CanBusPoses(folder) if folder is not None else None
        fields = map_fields_of(infos, tables, path, poses)
        counts = _apply(infos, fields, path, force)
        zeros = set(poses.missing) if poses is not None else set()
        scene_names = [tables.scenes[f['scene_token']][1] for f in fields]
        results.append(dict(
            path=path, samples=len(infos['data_list']), **counts,
            can_bus=0 if poses is None else sum(s not in zeros for s in scene_names),
            can_bus_zeros=sum(s in zeros for s in scene_names),
            no_can_data=dict(poses.missing) if poses is not None else {},
            can_bus_folder=folder, can_bus_looked=looked))
    for (path, infos), result in zip(loaded, results):
        result['written'] = bool(result['added'] or result['overwritten'])
        if result['written']:
            write_info_file(path, infos)
    return results


def format_results(results: List[dict]) -> str:
    """Two lines per file of :func:`add_map_fields`'s results."""
    lines = []
    for r in results:
        state = 'written' if r['written'] else 'unchanged'
        lines.append(f"{r['path']}: {r['samples']} samples: {r['added']} field values added, "
                     f"{r['kept']} kept, {r['overwritten']} overwritten ({state})")
        if r['can_bus_folder'] is None:
            lines.append(f"  can_bus not written: no CAN bus expansion at "
                         f"{' or '.join(r['can_bus_looked'])} (the MapTR adaptor uses zeros "
                         'for acceleration, rotation rate and velocity)')
            continue
        line = f"  can_bus from {r['can_bus_folder']}: {r['can_bus']} samples"
        if r['can_bus_zeros']:
            shown = sorted(r['no_can_data'].items())[:3]
            line += (f", {r['can_bus_zeros']} samples zeros (as upstream) for "
                     f"{len(r['no_can_data'])} scenes without CAN data, e.g. "
                     + '; '.join(f'{scene}: {why}' for scene, why in shown))
        lines.append(line)
    return '\n'.join(lines)
