"""SparseDrive's planning fields for nuScenes v2 info files, from the nuScenes tables and the
CAN bus expansion.

mmdet3d 1.4's converter writes none of them; SparseDrive's own (swc-17/SparseDrive
``tools/data_converter/nuscenes_converter.py``, ``_fill_trainval_infos``) writes them into its
v1 infos. :func:`add_planning_fields` adds upstream's values to v2 infos, under the names and
in the layout of our synthetic generator (``synthetic/infos.py``), which
:class:`~turbox_mm.datasets.SparseDriveNuScenesDataset` reads:

- ``instances[k]['fut_traj']`` (12 x [x, y]), ``['fut_mask']`` (12), upstream's
  ``gt_agent_fut_trajs`` / ``_masks``: the instance's next annotations along the
  ``sample_annotation.next`` chain as nuscenes-devkit's ``PredictHelper.get_future_for_agent(
  seconds=6)`` gives them (at most 12, each less than 6.15 s after the sample, the chain
  followed across keyframes where the object was not annotated), moved into the current lidar
  frame as upstream does: into the global box's agent frame, then back with the lidar-frame
  box, both by yaw alone (devkit ``quaternion_yaw``). So a point ``p`` lands at ``c_l +
  R(yaw_l - yaw_g) (p - c_g)`` in xy (box centre ``c`` and yaw in the global (g) and lidar (l)
  frames): the exact 3-D move up to the roll and pitch of the ego pose and the lidar mount.
  Step 0 is the first position minus the centre, step ``k`` position ``k`` minus ``k - 1``;
  mask 1 for the steps found, then 0 (offsets 0).
- ``gt_ego_fut_trajs`` (6 x [x, y]), ``gt_ego_fut_masks`` (6), ``gt_ego_fut_cmd`` (3): the
  lidar origin's global position (keyframe ego pose @ LIDAR_TOP calibration) at the sample and
  its next 6 along ``sample.next``, the last one repeated with mask 0 past the scene's end,
  moved into the current lidar frame (3-D), differenced, xy kept. The command is one-hot
  ``[right, left, straight]`` by the x of the last entry: ``>= 2`` m right, ``<= -2`` m left.
- ``ego_status`` (10): ``accel`` (3), ``rotation_rate`` (3), ``vel`` (3) of the scene's
  ``pose`` CAN message nearest in time to the sample (:func:`locate_message`), and ``value``
  (steering, positive left) of the nearest ``steeranglefeedback`` message.

Upstream turns every failure of the CAN bus reading into ten zeros. Here scenes without CAN
data (no expansion, not ``scene-NNNN``, on the devkit's blacklist, a missing or empty file)
are a :class:`MissingCanBusError` naming them, unless ``allow_missing_can_bus=True`` writes
the zeros and warns, naming them; a malformed file is always an error.

Values are plain Python floats (float64), as the generator writes them; upstream casts to
float32, as the dataset does on reading. Fields a sample or instance carries are kept (not
recomputed: running the step twice changes nothing) unless ``force=True``; part of a group
(e.g. ``gt_ego_fut_trajs`` without ``gt_ego_fut_cmd``) is an error without ``force``. Every
file is computed before any is written, each rewritten atomically when a value changes. The
tables of :data:`TABLES` are read as plain JSON.

Examples:
    >>> from turbox_mm.datasets.nuscenes_planning_fields import add_planning_fields
    >>> add_planning_fields(['data/nuscenes/nuscenes_infos_train.pkl'],  # doctest: +SKIP
    ...                     'data/nuscenes', 'v1.0-trainval', can_bus_root='data')
"""
import math
import os.path as osp
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from .can_bus_files import CAN_MESSAGES, CanBusMessages, find_can_bus, locate_message
from .nuscenes_tables import (NuScenesTableError, check_version, load_info_files, read_table,
                              step_command, write_info_file)
from .synthetic.geometry import apply, invert, matrix_from_quaternion

__all__ = ['GROUPS', 'TABLES', 'CAN_MESSAGES', 'PlanningFieldsError', 'MissingCanBusError',
           'PlanningTables', 'load_planning_tables', 'agent_future', 'ego_future', 'locate_message',
           'CanBusMessages', 'add_planning_fields', 'format_results', 'command_line']

AGENT_FUTURE_STEPS = 12  # upstream's fut_ts (6 s at 2 Hz)
EGO_FUTURE_STEPS = 6  # upstream's ego_fut_ts (3 s)
TIME_BUFFER = 0.15  # s, nuscenes-devkit PredictHelper's BUFFER
COMMAND_THRESHOLD = 2.0  # m sideways (lidar x) for a turn command
LIDAR = 'LIDAR_TOP'
#: The fields, in groups written together: per sample, and per instance.
GROUPS = {'ego_status': ('ego_status', ),
          'ego_future': ('gt_ego_fut_trajs', 'gt_ego_fut_masks', 'gt_ego_fut_cmd'),
          'agent_future': ('fut_traj', 'fut_mask')}
#: The tables read, and the keys read from their rows.
TABLES = {'sample': ('token', 'timestamp', 'scene_token', 'next'),
          'sample_data': ('token', 'sample_token', 'ego_pose_token', 'calibrated_sensor_token',
                          'is_key_frame'),
          'ego_pose': ('token', 'translation', 'rotation'),
          'calibrated_sensor': ('token', 'sensor_token', 'translation', 'rotation'),
          'sensor': ('token', 'channel'),
          'sample_annotation': ('token', 'sample_token', 'translation', 'rotation', 'next'),
          'scene': ('token', 'name')}
_CENTRE_TOLERANCE = 0.01  # m between an instance's bbox_3d and its annotation


class PlanningFieldsError(NuScenesTableError):
    """A table, a CAN bus file or an info file does not allow the planning fields; the
    message names the file and the key."""


class MissingCanBusError(PlanningFieldsError):
    """Scenes without CAN bus data, for samples that need ``ego_status``; the message names
    them (``allow_missing_can_bus=True`` writes upstream's zeros instead)."""


def command_line(info_files: Sequence[str] = ('<data_root>/nuscenes_infos_train.pkl',
                                              '<data_root>/nuscenes_infos_val.pkl'),
                 root: str = '<data_root>', version: Optional[str] = None) -> str:
    """The ``tools/create_data.py planning`` command that adds the fields to ``info_files``.

    Examples:
        >>> print(command_line(['data/nuscenes/nuscenes_infos_val.pkl'], 'data/nuscenes'))
        python tools/create_data.py planning data/nuscenes/nuscenes_infos_val.pkl --root-path data/nuscenes
    """  # noqa: E501
    return step_command('planning', info_files, root, version)


@dataclass
class PlanningTables:
    """What the fields come from.

    Attributes:
        folder (str): ``<root>/<version>``.
        version (str): The nuScenes version.
        samples (dict[str, dict]): Sample token -> ``timestamp`` (us), ``scene`` (name),
            ``next`` (token or ``''``), ``lidar2global`` (4x4, keyframe LIDAR_TOP pose) and
            ``annotations`` (its ``sample_annotation`` rows in file order).
        annotations (dict[str, dict]): Annotation token -> row.
    """
    folder: str
    version: str
    samples: Dict[str, dict]
    annotations: Dict[str, dict]


def _transform(row: dict) -> np.ndarray:
    mat = np.eye(4)
    mat[:3, :3] = matrix_from_quaternion(row['rotation'])
    mat[:3, 3] = row['translation']
    return mat


def load_planning_tables(root: str, version: str) -> PlanningTables:
    """Read the seven tables of ``<root>/<version>/`` and index them by sample.

    Args:
        root (str): The nuScenes data root.
        version (str): One of :data:`~turbox_mm.datasets.nuscenes_tables.VERSIONS`.

    Returns:
        PlanningTables: Per sample its time, scene, successor, lidar pose and annotations.

    Raises:
        PlanningFieldsError: A table is missing, unreadable, lacks a key, or a row names a
            row its tables do not hold; a sample without a LIDAR_TOP keyframe.
    """
    check_version(version, PlanningFieldsError)
    folder = osp.join(root, version)

    def rows(name):
        return read_table(root, version, name, TABLES[name], needed=tuple(TABLES),
                          purpose='the planning step', error=PlanningFieldsError)

    def link(table, index, row, key, targets, target):
        if row[key] not in targets:
            raise PlanningFieldsError(f'{osp.join(folder, table + ".json")}: row {index} '
                                      f'(token {row["token"]!r}) has {key} {row[key]!r}, which '
                                      f'{target}.json does not hold')

    lidar = {row['token'] for row in rows('sensor') if row['channel'] == LIDAR}
    calibration = {row['token']: row for row in rows('calibrated_sensor')}
    samples = rows('sample')
    sample_tokens = {row['token'] for row in samples}
    keyframe = {}  # sample token -> its LIDAR_TOP keyframe row (the devkit: the last one)
    for index, row in enumerate(rows('sample_data')):
        link('sample_data', index, row, 'calibrated_sensor_token', calibration,
             'calibrated_sensor')
        if row['is_key_frame'] and calibration[row['calibrated_sensor_token']][
                'sensor_token'] in lidar:
            link('sample_data', index, row, 'sample_token', sample_tokens, 'sample')
            keyframe[row['sample_token']] = row
    needed = {row['ego_pose_token'] for row in keyframe.values()}
    poses = {row['token']: row for row in rows('ego_pose') if row['token'] in needed}
    scenes = {row['token']: row['name'] for row in rows('scene')}
    out = {}
    for index, row in enumerate(samples):
        link('sample', index, row, 'scene_token', scenes, 'scene')
        if row['next']:
            link('sample', index, row, 'next', sample_tokens, 'sample')
        lidar_row = keyframe.get(row['token'])
        if lidar_row is None:
            raise PlanningFieldsError(f'{osp.join(folder, "sample.json")}: sample '
                                      f'{row["token"]!r} (row {index}) has no {LIDAR} keyframe '
                                      'in sample_data.json')
        if lidar_row['ego_pose_token'] not in poses:
            raise PlanningFieldsError(
                f'{osp.join(folder, "sample_data.json")}: {LIDAR} keyframe '
                f'{lidar_row["token"]!r} has ego_pose_token {lidar_row["ego_pose_token"]!r}, '
                'which ego_pose.json does not hold')
        pose = _transform(poses[lidar_row['ego_pose_token']])
        mount = _transform(calibration[lidar_row['calibrated_sensor_token']])
        out[row['token']] = dict(timestamp=row['timestamp'], scene=scenes[row['scene_token']],
                                 next=row['next'], lidar2global=pose @ mount, annotations=[])
    annotations = {}
    for index, row in enumerate(rows('sample_annotation')):
        link('sample_annotation', index, row, 'sample_token', out, 'sample')
        out[row['sample_token']]['annotations'].append(row)
        annotations[row['token']] = row
    for index, row in enumerate(annotations.values()):
        if row['next']:
            link('sample_annotation', index, row, 'next', annotations, 'sample_annotation')
    return PlanningTables(folder, version, out, annotations)


def _yaw(rotation: np.ndarray) -> float:
    """nuscenes-devkit's ``quaternion_yaw``: the heading of the rotated x axis."""
    return math.atan2(rotation[1, 0], rotation[0, 0])


def agent_future(start: dict, tables: PlanningTables, global2lidar: np.ndarray,
                 steps: int = AGENT_FUTURE_STEPS, stop_at_gap: bool = False) -> tuple:
    """An annotation's future as upstream computes it (the module docstring describes it).

    Args:
        start (dict): The ``sample_annotation`` row at the current sample.
        tables (PlanningTables): The tables.
        global2lidar (np.ndarray): 4x4, global to the current keyframe's lidar frame.
        steps (int): Future steps. Defaults to 12 (6 s: the time limit is ``steps / 2 +
            0.15`` s).
        stop_at_gap (bool): Stop where the next annotation is not in the next sample (the
            synthetic generator's rule) instead of following the chain past the samples
            where the object was not annotated (upstream's devkit). Defaults to False.

    Returns:
        tuple[list, list]: ``fut_traj`` (``steps`` x [x, y]) and ``fut_mask`` (``steps``).
    """
    samples = tables.samples
    start_time = samples[start['sample_token']]['timestamp']
    limit = steps / 2 + TIME_BUFFER
    chain, row = [], start
    while len(chain) < steps and row['next']:
        following = tables.annotations[row['next']]
        if stop_at_gap and following['sample_token'] != samples[row['sample_token']]['next']:
            break
        # the devkit keeps annotations less than seconds + BUFFER after the sample and, its
        # times increasing along the chain, finds none after the first one that is not
        if abs(samples[following['sample_token']]['timestamp'] - start_time) / 1e6 >= limit:
            break
        chain.append(following)
        row = following
    traj = np.zeros((steps, 2))
    mask = np.zeros(steps)
    if chain:
        rotation = matrix_from_quaternion(start['rotation'])
        turn = _yaw(global2lidar[:3, :3] @ rotation) - _yaw(rotation)
        cos, sin = math.cos(turn), math.sin(turn)
        offsets = np.array([r['translation'][:2] for r in chain]) - start['translation'][:2]
        offsets = offsets @ np.array([[cos, sin], [-sin, cos]])  # rows rotated by `turn`
        traj[:len(chain)] = np.diff(offsets, axis=0, prepend=np.zeros((1, 2)))
        mask[:len(chain)] = 1.0
    return traj.tolist(), mask.tolist()


def ego_future(token: str, tables: PlanningTables, steps: int = EGO_FUTURE_STEPS) -> tuple:
    """A sample's ego future and command as upstream computes them (module docstring).

    Args:
        token (str): The sample.
        tables (PlanningTables): The tables.
        steps (int): Future steps. Defaults to 6.

    Returns:
        tuple[list, list, list]: ``gt_ego_fut_trajs`` (``steps`` x [x, y]),
        ``gt_ego_fut_masks`` (``steps``) and ``gt_ego_fut_cmd`` (3).
    """
    sample = tables.samples[token]
    global2lidar = invert(sample['lidar2global'])
    origins, mask = [sample['lidar2global'][:3, 3]], []
    for _ in range(steps):
        if sample['next']:
            sample = tables.samples[sample['next']]
            origins.append(sample['lidar2global'][:3, 3])
            mask.append(1.0)
        else:
            origins.append(origins[-1])
            mask.append(0.0)
    local = apply(global2lidar, np.array(origins))
    sideways = local[-1, 0]
    command = ([1.0, 0.0, 0.0] if sideways >= COMMAND_THRESHOLD else
               [0.0, 1.0, 0.0] if sideways <= -COMMAND_THRESHOLD else [0.0, 0.0, 1.0])
    return np.diff(local[:, :2], axis=0).tolist(), mask, command


def _present(node: dict, group: str, where: str, force: bool) -> bool:
    """Whether ``node`` carries the whole group (False: none of it, or ``force``)."""
    have = [key for key in GROUPS[group] if key in node]
    if force or not have:
        return False
    if len(have) < len(GROUPS[group]):
        lacking = [key for key in GROUPS[group] if key not in node]
        raise PlanningFieldsError(f'{where} has {", ".join(have)} but not '
                                  f'{", ".join(lacking)}; pass --force (force=True) to write '
                                  'the whole group again')
    return True


def _same(old, new) -> bool:
    try:
        old = np.asarray(old, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return old.shape == np.shape(new) and bool(np.array_equal(old, new))


def _write(node: dict, values: dict, counts: dict) -> None:
    for key, value in values.items():
        counts['added' if key not in node else 'kept' if _same(node[key], value)
               else 'overwritten'] += 1
        node[key] = value


def _fill(infos: dict, tables: PlanningTables, name: str, can: CanBusMessages, force: bool,
          stop_at_gap: bool, bar) -> dict:
    """Compute and write the fields into ``infos`` in place; the counts."""
    counts = dict(samples=len(infos['data_list']), instances=0, added=0, kept=0,
                  overwritten=0, ego_status=0, zeros=0, zero_scenes=set())
    unknown = [(i, info.get('token')) for i, info in enumerate(infos['data_list'])
               if info.get('token') not in tables.samples]
    if unknown:
        index, token = unknown[0]
        raise PlanningFieldsError(
            f'{name}: data_list[{index}].token {token!r} is not a sample of '
            f'{osp.join(tables.folder, "sample.json")} ({len(unknown)} of '
            f'{len(infos["data_list"])} samples are not); infos of another nuScenes version '
            f'or dataset? (metainfo.version: {(infos.get("metainfo") or {}).get("version")!r},'
            f' tables: {tables.version})')
    for index, info in enumerate(infos['data_list']):
        where = f'{name}: data_list[{index}]'
        sample = tables.samples[info['token']]
        global2lidar = invert(sample['lidar2global'])
        if _present(info, 'ego_status', where, force):
            counts['kept'] += 1
        else:
            status = can.ego_status(sample['scene'], sample['timestamp'])
            counts['ego_status' if status is not None else 'zeros'] += 1
            if status is None:
                counts['zero_scenes'].add(sample['scene'])
            _write(info, dict(ego_status=status or [0.0] * 10), counts)
        if _present(info, 'ego_future', where, force):
            counts['kept'] += 3
        else:
            _write(info, dict(zip(GROUPS['ego_future'], ego_future(info['token'], tables))),
                   counts)
        instances = info.get('instances') or []
        rows = sample['annotations']
        if instances and len(instances) != len(rows):
            raise PlanningFieldsError(
                f'{where}.instances has {len(instances)} entries but '
                f'{osp.join(tables.folder, "sample_annotation.json")} has {len(rows)} '
                f'annotations of sample {info["token"]!r}; the agent futures need the instances '
                "as mmdet3d's converter writes them (one per annotation, in table order)")
        counts['instances'] += len(instances)
        for k, (instance, row) in enumerate(zip(instances, rows)):
            if _present(instance, 'agent_future', f'{where}.instances[{k}]', force):
                counts['kept'] += 2
                continue
            _check_centre(instance, row, global2lidar, f'{where}.instances[{k}]')
            _write(instance, dict(zip(GROUPS['agent_future'], agent_future(
                row, tables, global2lidar, stop_at_gap=stop_at_gap))), counts)
        if bar is not None:
            bar.update(1)
    return counts


def _check_centre(instance: dict, row: dict, global2lidar: np.ndarray, where: str) -> None:
    """The instance is its annotation: their xy centres agree (a misaligned file fails)."""
    box = instance.get('bbox_3d')
    if not isinstance(box, (list, tuple, np.ndarray)) or len(box) < 2:
        return
    centre = apply(global2lidar, np.array(row['translation'], dtype=np.float64))[:2]
    if np.abs(np.asarray(box[:2], dtype=np.float64) - centre).max() > _CENTRE_TOLERANCE:
        raise PlanningFieldsError(
            f'{where}.bbox_3d is centred at {np.round(box[:2], 3).tolist()} but annotation '
            f'{row["token"]!r} (the same position in sample_annotation.json) is at '
            f'{np.round(centre, 3).tolist()} in the lidar frame; the instances are not the '
            "sample's annotations in table order")


def add_planning_fields(infos_path: Union[str, Sequence[str]], root_path: str,
                        version: Optional[str] = None, force: bool = False,
                        can_bus_root: Optional[str] = None, allow_missing_can_bus: bool = False,
                        stop_at_gap: bool = False, progress: bool = False) -> List[dict]:
    """Add SparseDrive's planning fields to every sample of v2 info files.

    Args:
        infos_path (str | list[str]): v2 info files (``nuscenes_infos_{train,val}.pkl``).
        root_path (str): The nuScenes data root, holding ``<version>/``.
        version (str, optional): The tables' version. Defaults to the files'
            ``metainfo.version``; a different one given here is an error.
        force (bool): Recompute and overwrite fields already there. Defaults to False (kept).
        can_bus_root (str, optional): Where ``can_bus/`` is (upstream's ``--canbus``; see
            :func:`~turbox_mm.datasets.nuscenes_map_fields.find_can_bus`).
        allow_missing_can_bus (bool): Write zeros (upstream's value) as ``ego_status`` of
            scenes without CAN data, with a warning naming them. Defaults to False (an error).
        stop_at_gap (bool): Agent futures stop at the first sample where the object is not
            annotated (see :func:`agent_future`). Defaults to False (upstream).
        progress (bool): Show a progress bar. Defaults to False.

    Returns:
        list[dict]: Per file: ``path``, ``samples``, ``instances``, ``added``, ``kept``,
        ``overwritten`` (field values), ``ego_status`` (samples given CAN data), ``zeros``
        (samples given zeros), ``no_can_data`` (scene -> why), ``can_bus_folder``,
        ``written`` (bool).

    Raises:
        MissingCanBusError: Scenes without CAN data (all named) without
            ``allow_missing_can_bus``.
        PlanningFieldsError: See :func:`load_planning_tables` and
            :meth:`CanBusMessages.ego_status`; also a file with no or another
            ``metainfo.version``, a sample the tables lack, instances that are not the
            sample's annotations, a partial group without ``force``.
        InfoFileError: A file that is not a v2 info file (from ``check_infos``).
    """
    paths = [infos_path] if isinstance(infos_path, str) else list(infos_path)
    loaded, version = load_info_files(
        paths, version, error=PlanningFieldsError,
        why='the futures come from the tables of the version the infos were made from')
    if not loaded:
        return []
    tables = load_planning_tables(root_path, version)
    can = CanBusMessages(*find_can_bus(root_path, can_bus_root), error=PlanningFieldsError)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(len(infos['data_list']) for _, infos in loaded), desc='planning',
                   unit='sample')
    try:
        results = [dict(path=path, **_fill(infos, tables, path, can, force, stop_at_gap, bar))
                   for path, infos in loaded]
    finally:
        if bar is not None:
            bar.close()
    per_file = [r.pop('zero_scenes') for r in results]
    scenes = sorted(set().union(*per_file))
    if scenes:
        named = _name_scenes({scene: can.missing[scene] for scene in scenes})
        zeros = sum(r['zeros'] for r in results)
        if not allow_missing_can_bus:
            raise MissingCanBusError(
                f'no CAN bus data for {len(scenes)} scenes ({zeros} samples need ego_status): '
                f'{named}. Put the CAN bus expansion (can_bus.zip from nuscenes.org) at '
                f'{" or ".join(can.looked)} (or name its folder with --can-bus), or pass '
                '--allow-missing-can-bus (allow_missing_can_bus=True) for upstream\'s zeros')
        warnings.warn(f'ego_status is zeros (--allow-missing-can-bus, as upstream) for {zeros} '
                      f'samples of {len(scenes)} scenes without CAN bus data: {named}')
    for (path, infos), result, missing in zip(loaded, results, per_file):
        result.update(no_can_data={s: can.missing[s] for s in sorted(missing)},
                      can_bus_folder=can.folder)
        result['written'] = bool(result['added'] or result['overwritten'])
        if result['written']:
            write_info_file(path, infos)
    return results


def _name_scenes(missing: Dict[str, str], shown: int = 5) -> str:
    """Scenes grouped by why they have no CAN data, the first few of each named."""
    by_why = {}
    for scene, why in sorted(missing.items()):
        by_why.setdefault(why, []).append(scene)
    return '; '.join(', '.join(names[:shown])
                     + (f' and {len(names) - shown} more' if len(names) > shown else '')
                     + f' ({why})' for why, names in by_why.items())


def format_results(results: List[dict]) -> str:
    """Two lines per file of :func:`add_planning_fields`'s results."""
    lines = []
    for r in results:
        state = 'written' if r['written'] else 'unchanged'
        lines.append(f"{r['path']}: {r['samples']} samples, {r['instances']} instances: "
                     f"{r['added']} field values added, {r['kept']} kept, {r['overwritten']} "
                     f'overwritten ({state})')
        line = f"  ego_status from CAN bus data for {r['ego_status']} samples"
        if r['zeros']:
            line += (f", zeros (--allow-missing-can-bus) for {r['zeros']} samples of "
                     f"{len(r['no_can_data'])} scenes without CAN data: "
                     f"{_name_scenes(r['no_can_data'], 3)}")
        lines.append(line)
    return '\n'.join(lines)
