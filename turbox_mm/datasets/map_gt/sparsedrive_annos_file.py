"""SparseDrive's ``map_annos`` written into v2 info files (``tools/create_data.py
sparsedrive-map``): every sample's map ground truth cut by
:func:`~.sparsedrive_extractor.sparsedrive_map_annos` at its lidar pose, per location in a pool
of processes, each file checked before anything is cut and rewritten atomically.
"""
import os
from typing import List, Optional, Sequence, Union

from .expansion_file import MapExpansionError, load_map_expansion
from .sparsedrive_extractor import (ROI_SIZE, SparseDriveMapSource, check_roi,
                                    check_sparsedrive_map_annos, sparsedrive_map_annos)
from .task_pool import run_tasks

__all__ = ['add_sparsedrive_map_annos', 'format_results', 'command_line']

#: The fields a sample needs besides ``map_location``.
SAMPLE_FIELDS = ('token', 'ego2global', 'lidar_points.lidar2ego')
#: Where an info file records the patch its ``map_annos`` were cut with.
META_KEY = 'sparsedrive_map_annos'
CHUNK = 32  # samples per task of the pool
_WORKER = {}  # this process's prepared map: one location at a time


def command_line(info_files: Optional[Sequence[str]] = None, data_root: str = '<data_root>',
                 roi_size=ROI_SIZE, force: bool = False) -> str:
    """The proposed ``tools/create_data.py sparsedrive-map`` command line.

    Examples:
        >>> print(command_line(['a.pkl'], 'data/nuscenes'))
        python tools/create_data.py sparsedrive-map a.pkl --data-root data/nuscenes
    """
    if info_files is None:
        info_files = [os.path.join(data_root, f'nuscenes_infos_{s}.pkl') for s in ('train', 'val')]
    roi = tuple(float(v) for v in roi_size)
    return (f'python tools/create_data.py sparsedrive-map {" ".join(info_files)} --data-root '
            f'{data_root}' + (f' --roi-size {roi[0]:g} {roi[1]:g}' if roi != ROI_SIZE else '')
            + (' --force' if force else ''))


def _extract(task: tuple) -> List[tuple]:
    """``(data_root, roi, location, [(key, lidar2global)])`` -> ``[(key, map_annos)]``."""
    data_root, roi, location, samples = task
    if _WORKER.get('key') != (data_root, location):
        _WORKER.clear()  # drop the previous location's map first
        doc = load_map_expansion(data_root, location)
        _WORKER.update(key=(data_root, location), source=SparseDriveMapSource.from_expansion(doc))
    return [(key, sparsedrive_map_annos(_WORKER['source'], pose, roi)) for key, pose in samples]


def _plan(path: str, infos: dict, roi: tuple, force: bool, data_root: str) -> tuple:
    """The samples of one file to extract, and the counts of what is there already."""
    from turbox_mm.datasets.nuscenes_map_fields import command_line as map_fields_command
    stated = (infos.get('metainfo') or {}).get(META_KEY, {}).get('roi_size')
    todo, counts = [], dict(added=0, kept=0, overwritten=0)
    for index, info in enumerate(infos['data_list']):
        where = f'{path}: data_list[{index}] (token {info.get("token")!r})'
        if 'map_annos' not in info or force:
            todo.append(index)
            counts['overwritten' if 'map_annos' in info else 'added'] += 1
            if 'map_location' not in info:
                raise ValueError(f'{where} has no map_location: add the map fields first with '
                                 f'{map_fields_command([path], data_root)}')
            continue
        try:
            check_sparsedrive_map_annos(info['map_annos'], where)
        except ValueError as error:
            raise ValueError(f'{error}; pass --force (force=True) to replace them') from error
        if stated is not None and tuple(stated) != roi:
            raise ValueError(f'{path}: its map_annos were cut with roi_size {list(stated)}, not '
                             f'{list(roi)}; pass --force (force=True) to cut them again')
        counts['kept'] += 1
    return todo, counts


def add_sparsedrive_map_annos(info_paths: Union[str, Sequence[str]], data_root: str,
                              force: bool = False, workers: int = 1, progress: bool = True,
                              roi_size=ROI_SIZE) -> List[dict]:
    """Write every sample's ``map_annos`` (:func:`sparsedrive_map_annos` at its lidar pose)
    into v2 info files, as SparseDrive's converter stores them.

    Samples that carry ``map_annos`` in this format already are kept (running twice changes
    nothing); ``force`` cuts every sample again. Every file is checked before anything is
    cut, and rewritten atomically (``metainfo['sparsedrive_map_annos']`` records the
    ``roi_size``), only when something changed. The output does not depend on ``workers``.

    Args:
        info_paths (str | Sequence[str]): v2 info files (rewritten in place).
        data_root (str): The root holding ``maps/expansion/<location>.json``.
        force (bool): Replace present ``map_annos``. Defaults to False.
        workers (int): Processes (0: every CPU; 1: this process). Defaults to 1.
        progress (bool): Show a progress bar. Defaults to True.
        roi_size (tuple[float, float]): ``(x extent, y extent)``. Defaults to (30, 60).

    Returns:
        list[dict]: Per file: ``path``, ``samples``, ``added``, ``kept``, ``overwritten``,
        ``instances`` (polylines of the samples cut), ``written``.

    Raises:
        ValueError: A sample without ``map_location`` (the map-fields command named), or
            present ``map_annos`` of another format or ``roi_size`` without ``force``.
        MapExpansionError: A location without its map-expansion file (named).
        InfoFileError: Not a v2 info file, or samples without the pose fields.
    """
    from turbox_mm.datasets.nuscenes_tables import write_info_file
    from turbox_mm.datasets.synthetic import check_infos

    from .expansion_file import map_expansion_path, missing_map_message
    from .patch_pose import lidar2global_of
    paths = [info_paths] if isinstance(info_paths, str) else list(info_paths)
    roi = check_roi(roi_size)
    loaded = [(path, check_infos(path, SAMPLE_FIELDS, name=path)) for path in paths]
    plans = [_plan(path, infos, roi, force, data_root) for path, infos in loaded]
    groups = {}  # location -> [(key, lidar2global)]
    for file_index, ((path, infos), (todo, _)) in enumerate(zip(loaded, plans)):
        for index in todo:
            info = infos['data_list'][index]
            groups.setdefault(info['map_location'], []).append(
                ((file_index, index), lidar2global_of(info)))
    for location, samples in sorted(groups.items()):
        if not os.path.isfile(map_expansion_path(data_root, location)):
            raise MapExpansionError(f'{missing_map_message(data_root, location)} '
                                    f'({len(samples)} samples to cut use it)')
    tasks = [(data_root, roi, location, samples[start:start + CHUNK])
             for location, samples in sorted(groups.items())
             for start in range(0, len(samples), CHUNK)]
    workers = workers or os.cpu_count() or 1
    cut = run_tasks(_extract, tasks, min(workers, len(tasks)) if len(tasks) > 1 else 1,
                    progress, sum(len(t[-1]) for t in tasks), 'sparsedrive-map', _WORKER)
    results = []
    for file_index, ((path, infos), (todo, counts)) in enumerate(zip(loaded, plans)):
        for index in todo:
            infos['data_list'][index]['map_annos'] = cut[(file_index, index)]
        instances = sum(len(v) for i in todo for v in cut[(file_index, i)].values())
        if todo:
            infos.setdefault('metainfo', {})[META_KEY] = dict(roi_size=list(roi))
            write_info_file(path, infos)
        results.append(dict(path=path, samples=len(infos['data_list']), **counts,
                            instances=instances, written=bool(todo)))
    return results


def format_results(results: List[dict]) -> str:
    """One line per file of :func:`add_sparsedrive_map_annos`'s results."""
    return '\n'.join(
        f"{r['path']}: {r['samples']} samples: map_annos {r['added']} added, {r['kept']} "
        f"kept, {r['overwritten']} overwritten, {r['instances']} polylines cut "
        f"({'written' if r['written'] else 'unchanged'})" for r in results)
