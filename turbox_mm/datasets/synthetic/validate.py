"""Check that an info file has the format and the fields a dataset needs, before training.

A model that reads ``can_bus`` should not fail at iteration 3000 with a ``KeyError`` because
its info file came from mmdet3d's plain converter; :func:`check_infos` fails at once and names
the file, the fields and the samples that lack them.

Field paths are dotted; ``*`` stands for every element of a list or every value of a dict, so
``'images.*.cam2img'`` asks every camera of every sample for its intrinsics. A list under
``*`` may be empty (a sample without instances lacks nothing).
"""
import os.path as osp
import pickle
from typing import Iterable, Optional, Union

# What mmdet3d 1.x's NuScenesDataset and its loading transforms read.
MMDET3D_FIELDS = (
    'token', 'timestamp', 'ego2global', 'lidar_points.lidar_path', 'lidar_points.num_pts_feats',
    'lidar_points.lidar2ego', 'images.*.img_path', 'images.*.cam2img', 'images.*.lidar2cam',
    'images.*.cam2ego', 'instances.*.bbox_3d', 'instances.*.bbox_label_3d',
    'instances.*.velocity', 'instances.*.num_lidar_pts')
SWEEP_FIELDS = ('lidar_sweeps.*.timestamp', 'lidar_sweeps.*.lidar_points.lidar_path',
                'lidar_sweeps.*.lidar_points.lidar2sensor')
TEMPORAL_FIELDS = ('scene_token', 'frame_idx', 'prev', 'next', 'can_bus')
MAP_FIELDS = ('map_annos',)
PLANNING_FIELDS = ('ego_status', 'gt_ego_fut_trajs', 'gt_ego_fut_masks', 'gt_ego_fut_cmd',
                   'instances.*.instance_id', 'instances.*.fut_traj', 'instances.*.fut_mask')
# Everything the synthetic generator writes that a turbox_mm model may read.
ALL_FIELDS = MMDET3D_FIELDS + TEMPORAL_FIELDS + MAP_FIELDS + PLANNING_FIELDS
_SHOWN = 3  # samples named per missing field


class InfoFileError(ValueError):
    """An info file is not in mmdet3d's v2 format or lacks required fields."""


def check_infos(infos: Union[str, dict], required: Iterable[str] = MMDET3D_FIELDS,
                name: Optional[str] = None) -> dict:
    """Check an info file's format and fields; return its contents.

    Args:
        infos (str | dict): Path of a ``.pkl`` info file, or its loaded contents.
        required (Iterable[str]): Dotted field paths every sample must have. Defaults to
            :data:`MMDET3D_FIELDS`; see also :data:`TEMPORAL_FIELDS`, :data:`MAP_FIELDS`,
            :data:`PLANNING_FIELDS` and :data:`ALL_FIELDS`.
        name (str, optional): How to call the file in messages. Defaults to its path, or
            ``'<infos>'`` for a dict.

    Returns:
        dict: The contents, ``{'metainfo': ..., 'data_list': [...]}``.

    Raises:
        InfoFileError: For a file in another format (v1 ``infos``), or for samples that lack
            required fields: the message names each field, how many samples lack it and the
            first ones by index and token.

    Examples:
        >>> from turbox_mm.datasets.synthetic import InfoFileError, TEMPORAL_FIELDS, check_infos
        >>> infos = {'metainfo': {}, 'data_list': [{'token': 'a'}]}
        >>> check_infos(infos, ['token'])['data_list']
        [{'token': 'a'}]
        >>> try:
        ...     check_infos(infos, TEMPORAL_FIELDS)
        ... except InfoFileError as error:
        ...     print(str(error).splitlines()[0])
        <infos>: 1 of 1 samples lack required fields (info_version unknown):
    """
    if isinstance(infos, (str, bytes)) or hasattr(infos, '__fspath__'):
        name = name or osp.basename(str(infos))
        infos = _load(infos, name)
    name = name or '<infos>'
    _check_format(infos, name)
    required = tuple(required)
    missing = {}  # field -> sample indices
    bad_samples = set()
    for index, sample in enumerate(infos['data_list']):
        for field in required:
            if not _has(sample, field.split('.')):
                missing.setdefault(field, []).append(index)
                bad_samples.add(index)
    if missing:
        data_list = infos['data_list']
        lines = []
        for field, indices in missing.items():
            shown = ', '.join(f'{i} ({_token(data_list[i])})' for i in indices[:_SHOWN])
            more = f' and {len(indices) - _SHOWN} more' if len(indices) > _SHOWN else ''
            lines.append(f'  {field}: missing in {len(indices)} samples, e.g. {shown}{more}')
        version = infos.get('metainfo', {}).get('info_version', 'unknown')
        raise InfoFileError(
            f'{name}: {len(bad_samples)} of {len(data_list)} samples lack required fields '
            f'(info_version {version}):\n' + '\n'.join(lines) + '\n'
            'mmdet3d\'s converter writes only the detection fields; the temporal, map and '
            'planning fields come from turbox_mm\'s generator (tools/create_data.py '
            'synthetic) or an extended converter. See docs/data.md.')
    return infos


def _load(path, name: str) -> dict:
    if not osp.isfile(path):
        raise InfoFileError(f'{name}: info file not found at {path}')
    with open(path, 'rb') as f:
        try:
            return pickle.load(f)
        except Exception as error:  # noqa: BLE001 (any unpickling failure means a bad file)
            raise InfoFileError(f'{name}: not a readable pickle ({error})') from error


def _check_format(infos, name: str) -> None:
    if not isinstance(infos, dict):
        raise InfoFileError(f'{name}: expected a dict with metainfo and data_list, got '
                            f'{type(infos).__name__}')
    if 'data_list' not in infos:
        if 'infos' in infos:
            raise InfoFileError(
                f'{name}: a v1 info file (an \'infos\' list, from mmdet3d < 1.0 or a model '
                'repository\'s own converter); mmdet3d 1.x reads v2 files with \'metainfo\' and '
                '\'data_list\'. Convert it with mmdet3d\'s tools/dataset_converters/'
                'update_infos_to_v2.py, or regenerate it with tools/create_data.py.')
        raise InfoFileError(f'{name}: no \'data_list\' (keys: {sorted(infos)})')
    if not isinstance(infos['data_list'], list):
        raise InfoFileError(f'{name}: \'data_list\' is a {type(infos["data_list"]).__name__}, '
                            'not a list')


def _has(node, path: list) -> bool:
    if not path:
        return True
    key, rest = path[0], path[1:]
    if key == '*':
        if isinstance(node, dict):
            return all(_has(value, rest) for value in node.values())
        if isinstance(node, (list, tuple)):
            return all(_has(value, rest) for value in node)
        return False
    return isinstance(node, dict) and key in node and _has(node[key], rest)


def _token(sample) -> str:
    token = sample.get('token') if isinstance(sample, dict) else None
    return f'token {token}' if token else 'no token'
