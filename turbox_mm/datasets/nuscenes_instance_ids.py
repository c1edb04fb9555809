"""Instance ids for nuScenes v2 info files, from the nuScenes tables.

mmdet3d 1.4's converter writes no instance ids. Its ``nuscenes_converter.py`` builds a sample's
boxes from ``sample['anns']`` in order (``gt_boxes``, ``gt_names``, ... one row per
annotation), and ``update_infos_to_v2.py`` turns row ``k`` into ``instances[k]``, ignored
classes included (label -1): one instance per annotation, in order. The devkit fills
``sample['anns']`` by walking ``sample_annotation.json`` in file order
(``NuScenes.__make_reverse_index__``). So instance ``k`` of a sample is the ``k``-th row of
``sample_annotation.json`` with that ``sample_token``, and :func:`add_instance_ids` writes

    ``instances[k]['instance_id']`` = the row of its ``instance_token`` in ``instance.json``,

the field and meaning of the synthetic generator (``turbox_mm/datasets/synthetic/infos.py``):
one number per tracked object, the same in every keyframe and in every split of a version,
as upstream Sparse4D's ``instance_inds``. Sparse4D's dataset reads it as ``instance_id``; the
temporal denoising and the tracking ids need it.

Only ``sample.json``, ``sample_annotation.json`` and ``instance.json`` of
``<root>/<version>/`` are read, as plain JSON (the devkit's ``NuScenes`` would load all 13
tables). Info files are rewritten atomically, and only when an id changes.

Ids already present: equal ones are kept (running the step twice changes nothing); a
different one is an error unless ``force=True`` overwrites it.

Examples:
    >>> from turbox_mm.datasets.nuscenes_instance_ids import add_instance_ids
    >>> add_instance_ids(['data/nuscenes/nuscenes_infos_train.pkl'],  # doctest: +SKIP
    ...                  'data/nuscenes', 'v1.0-trainval')
"""
import os.path as osp
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from .nuscenes_tables import (VERSIONS, check_version, load_info_files, read_table,
                              step_command, write_info_file)

__all__ = ['VERSIONS', 'TABLES', 'InstanceIdError', 'AnnotationTables', 'load_tables',
           'instance_ids_of', 'add_instance_ids', 'format_results', 'command_line']

#: The tables read, and the keys read from their rows.
TABLES = {'sample': ('token', ), 'sample_annotation': ('token', 'sample_token', 'instance_token'),
          'instance': ('token', )}


class InstanceIdError(ValueError):
    """A table or an info file does not allow instance ids; the message names the file and
    the key."""


def command_line(info_files: Sequence[str] = ('<data_root>/nuscenes_infos_train.pkl',
                                              '<data_root>/nuscenes_infos_val.pkl'),
                 root: str = '<data_root>', version: Optional[str] = None) -> str:
    """The ``tools/create_data.py instance-ids`` command that adds ids to ``info_files``.

    Examples:
        >>> print(command_line(['data/nuscenes/nuscenes_infos_train.pkl'], 'data/nuscenes'))
        python tools/create_data.py instance-ids data/nuscenes/nuscenes_infos_train.pkl --root-path data/nuscenes
    """  # noqa: E501
    return step_command('instance-ids', info_files, root, version)


@dataclass
class AnnotationTables:
    """What the ids come from, per sample.

    Attributes:
        folder (str): ``<root>/<version>``.
        version (str): The nuScenes version.
        ids (dict[str, list[int]]): Sample token -> the ``instance.json`` row of each of its
            annotations, in ``sample_annotation.json`` order (every sample of ``sample.json``,
            ``[]`` for one without annotations).
        num_instances (int): Rows of ``instance.json``.
    """
    folder: str
    version: str
    ids: Dict[str, List[int]]
    num_instances: int


def _read_table(folder: str, name: str, version: str) -> list:
    return read_table(osp.dirname(folder), version, name, TABLES[name], needed=tuple(TABLES),
                      purpose='the instance-ids step', error=InstanceIdError)


def load_tables(root: str, version: str) -> AnnotationTables:
    """Read the three tables of ``<root>/<version>/`` and index annotations by sample.

    Args:
        root (str): The nuScenes data root.
        version (str): One of :data:`VERSIONS`.

    Returns:
        AnnotationTables: The ids of every sample's annotations.

    Raises:
        InstanceIdError: A table is missing, unreadable, lacks a key, or an annotation names
            a sample or instance its tables do not hold (the file, row and key named).
    """
    check_version(version, InstanceIdError)
    folder = osp.join(root, version)
    samples = _read_table(folder, 'sample', version)
    annotations = _read_table(folder, 'sample_annotation', version)
    instances = _read_table(folder, 'instance', version)
    row_of = {row['token']: index for index, row in enumerate(instances)}
    ids = {row['token']: [] for row in samples}
    path = osp.join(folder, 'sample_annotation.json')
    for index, row in enumerate(annotations):
        sample = ids.get(row['sample_token'])
        if sample is None:
            raise InstanceIdError(f'{path}: row {index} (token {row["token"]!r}) has '
                                  f'sample_token {row["sample_token"]!r}, which sample.json '
                                  'does not hold')
        instance = row_of.get(row['instance_token'])
        if instance is None:
            raise InstanceIdError(f'{path}: row {index} (token {row["token"]!r}) has '
                                  f'instance_token {row["instance_token"]!r}, which '
                                  'instance.json does not hold')
        sample.append(instance)
    return AnnotationTables(folder, version, ids, len(instances))


def instance_ids_of(infos: dict, tables: AnnotationTables, name: str) -> List[List[int]]:
    """The instance ids of every sample of an info file, aligned with its ``instances``.

    Args:
        infos (dict): The loaded v2 info file.
        tables (AnnotationTables): From :func:`load_tables`.
        name (str): The info file, for messages.

    Returns:
        list[list[int]]: Per sample of ``data_list``; ``[]`` for a sample without
        ``instances`` (the test split).

    Raises:
        InstanceIdError: A sample token the tables do not hold (infos of another version),
            or a sample whose instance count differs from its annotations.
    """
    unknown = [(i, info.get('token')) for i, info in enumerate(infos['data_list'])
               if info.get('token') not in tables.ids]
    if unknown:
        index, token = unknown[0]
        stated = (infos.get('metainfo') or {}).get('version')
        raise InstanceIdError(
            f'{name}: data_list[{index}].token {token!r} is not a sample of '
            f'{osp.join(tables.folder, "sample.json")} ({len(unknown)} of '
            f'{len(infos["data_list"])} samples are not); infos of another nuScenes version '
            f'or dataset? (metainfo.version: {stated!r}, tables: {tables.version})')
    out = []
    for index, info in enumerate(infos['data_list']):
        ids = tables.ids[info['token']]
        instances = info.get('instances')
        if instances is None:
            out.append([])
            continue
        if len(instances) != len(ids):
            raise InstanceIdError(
                f'{name}: data_list[{index}].instances has {len(instances)} entries but '
                f'{osp.join(tables.folder, "sample_annotation.json")} has {len(ids)} '
                f'annotations of sample {info["token"]!r}; instance ids need the instances '
                "as mmdet3d's converter writes them (one per annotation, in table order, "
                'none filtered out)')
        out.append(list(ids))
    return out


def _apply(infos: dict, ids: List[List[int]], name: str, force: bool) -> Dict[str, int]:
    """Write ``ids`` into ``infos`` in place; the counts of what changed."""
    counts = dict(added=0, kept=0, overwritten=0)
    for index, (info, sample_ids) in enumerate(zip(infos['data_list'], ids)):
        for k, (instance, new) in enumerate(zip(info.get('instances') or (), sample_ids)):
            old = instance.get('instance_id')
            if old is None:
                counts['added'] += 1
            elif int(old) == new:
                counts['kept'] += 1
                continue
            elif not force:
                raise InstanceIdError(
                    f'{name}: data_list[{index}].instances[{k}].instance_id is {old} but the '
                    f'tables give {new} (sample {info["token"]!r}); the infos already carry '
                    'other instance ids: pass --force (force=True) to overwrite them')
            else:
                counts['overwritten'] += 1
            instance['instance_id'] = int(new)
    return counts


def add_instance_ids(info_files: Sequence[str], root: str, version: Optional[str] = None,
                     force: bool = False) -> List[dict]:
    """Add ``instances[k]['instance_id']`` to v2 info files, from the nuScenes tables.

    Every file is checked before any is written; a file whose ids are all there already is
    left as it is.

    Args:
        info_files (list[str]): v2 info files (``nuscenes_infos_{train,val}.pkl``).
        root (str): The nuScenes data root, holding ``<version>/``.
        version (str, optional): The tables' version. Defaults to the files'
            ``metainfo.version`` (mmdet3d's converter writes it); a different one given here
            is an error.
        force (bool): Overwrite ids that differ from the tables'. Defaults to False (an
            error).

    Returns:
        list[dict]: Per file: ``path``, ``samples``, ``instances``, ``added``, ``kept``,
        ``overwritten``, ``written`` (bool).

    Raises:
        InstanceIdError: See :func:`load_tables` and :func:`instance_ids_of`; also a file
            with no or another ``metainfo.version``, and ids that differ without ``force``.
        InfoFileError: A file that is not a v2 info file (from ``check_infos``).
    """
    loaded, version = load_info_files(
        info_files, version, error=InstanceIdError,
        why='ids index the instance table of the version the infos were made from')
    tables = load_tables(root, version) if loaded else None
    results = []
    for path, infos in loaded:
        ids = instance_ids_of(infos, tables, path)
        counts = _apply(infos, ids, path, force)
        results.append(dict(path=path, samples=len(infos['data_list']),
                            instances=sum(map(len, ids)), **counts))
    for (path, infos), result in zip(loaded, results):
        result['written'] = bool(result['added'] or result['overwritten'])
        if result['written']:
            write_info_file(path, infos)
    return results


def format_results(results: List[dict]) -> str:
    """One line per file of :func:`add_instance_ids`'s results."""
    lines = []
    for r in results:
        state = 'written' if r['written'] else 'unchanged'
        lines.append(f"{r['path']}: {r['samples']} samples, {r['instances']} instances: "
                     f"{r['added']} ids added, {r['kept']} kept, {r['overwritten']} "
                     f'overwritten ({state})')
    return '\n'.join(lines)
