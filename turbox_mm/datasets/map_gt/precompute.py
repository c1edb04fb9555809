"""The map-gt step: every sample's map ground truth, cut once with the reference vectoriser
and stored in its info file (``tools/create_data.py map-gt``).

Upstream's MapTR v2 reads its map ground truth precomputed from the info file (its converter
``tools/maptrv2/custom_nusc_map_converter.py`` runs the same geometry code once per sample and
stores ``info['annotation']``); MapTR v1 cuts it online per sample. This step does what that
converter does for mmdet3d v2 infos: :func:`precompute_map_gt` runs
:class:`~.reference.VectorizedLocalMapReference` (upstream's ``VectorizedLocalMap``, the
polylines ``LoadMapGT(impl='reference')`` cuts) for every sample and writes them as the
sample's ``map_annotation`` (:mod:`.annotation`); ``LoadMapGT(impl='precomputed')`` then
gives the reference's outputs bit for bit without shapely per sample.

Each sample needs ``map_location`` (``tools/create_data.py map-fields`` adds it to real
nuScenes infos; the synthetic generator writes it), ``ego2global`` and
``lidar_points.lidar2ego``; its location needs ``<data_root>/maps/expansion/<location>.json``.
Everything is checked before anything is cut.

Samples that already carry a ``map_annotation`` for the same classes and patch size are kept
as they are, without cutting them again (running the step twice costs one load per file and
changes nothing); ``force=True`` cuts and rewrites every sample. A ``map_annotation`` made for
other classes or another patch size, or malformed, is an error naming the file and the sample
unless ``force=True``. The files are cut first and written afterwards, each atomically, and
only when something changed.

The samples are cut in a process pool (``workers``), grouped by location so that each worker
holds one location's map at a time (a real location's map expansion is hundreds of MB in the
devkit); the output does not depend on the number of workers.

Examples:
    >>> from turbox_mm.datasets.map_gt.precompute import precompute_map_gt
    >>> precompute_map_gt(['data/nuscenes/nuscenes_infos_train.pkl'],  # doctest: +SKIP
    ...                   'data/nuscenes', workers=8)
"""
import os
import os.path as osp
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

from .annotation import (KEYS, MAP_ANNOTATION, MapAnnotationError, check_map_annotation,
                         decode_map_annotation, encode_map_annotation)
from .expansion_file import (NUSCENES_LOCATIONS, MapExpansionError, map_expansion_path,
                             missing_map_message)
from .patch_pose import lidar2global_of
from .reference import KNOWN_MAP_CLASSES, MAP_CLASSES, VectorizedLocalMapReference
from .task_pool import run_tasks

__all__ = ['precompute_map_gt', 'format_results', 'command_line', 'DEFAULT_PATCH_SIZE']

#: MapTR's patch, ``(patch_h, patch_w)``: 60 m along the lidar's y axis, 30 m along x.
DEFAULT_PATCH_SIZE = (60.0, 30.0)
#: Samples per task of the pool.
CHUNK = 16
#: The fields a sample needs besides ``map_location``.
POSE_FIELDS = ('token', 'ego2global', 'lidar_points.lidar2ego')


def command_line(info_files: Optional[Sequence[str]] = None, data_root: str = '<data_root>',
                 classes: Sequence[str] = MAP_CLASSES,
                 patch_size: Sequence[float] = DEFAULT_PATCH_SIZE) -> str:
    """The ``tools/create_data.py map-gt`` command that writes ``map_annotation`` into
    ``info_files`` (default: the train and val infos under ``data_root``).

    Examples:
        >>> print(command_line(data_root='data/nuscenes'))
        python tools/create_data.py map-gt data/nuscenes/nuscenes_infos_train.pkl data/nuscenes/nuscenes_infos_val.pkl --data-root data/nuscenes
        >>> print(command_line(['a.pkl'], 'data/x', classes=['divider'], patch_size=(30, 30)))
        python tools/create_data.py map-gt a.pkl --data-root data/x --patch-size 30 30 --classes divider
    """  # noqa: E501
    if info_files is None:
        info_files = [osp.join(data_root, f'nuscenes_infos_{split}.pkl')
                      for split in ('train', 'val')]
    line = (f'python tools/create_data.py map-gt {" ".join(info_files)} '
            f'--data-root {data_root}')
    patch = tuple(float(v) for v in patch_size)
    if patch != DEFAULT_PATCH_SIZE:
        line += f' --patch-size {" ".join(f"{v:g}" for v in patch)}'
    if tuple(classes) != MAP_CLASSES:
        line += f' --classes {" ".join(classes)}'
    return line


# -- the cutting, in this process or a worker ------------------------------------------------
_WORKER = {}  # this process's vectoriser: one location's map at a time


def _vector_map(data_root: str, patch_size: tuple, classes: tuple,
                location: str) -> VectorizedLocalMapReference:
    key = (data_root, patch_size, classes, location)
    if _WORKER.get('key') != key:
        _WORKER.clear()  # drop the previous location's map before loading the next
        _WORKER.update(key=key, map=VectorizedLocalMapReference(data_root, patch_size, classes))
    return _WORKER['map']


def _cut(task: tuple) -> List[tuple]:
    """One task: ``(data_root, patch_size, classes, location, [(key, where, lidar2global)])``
    -> ``[(key, map_annotation)]``."""
    data_root, patch_size, classes, location, samples = task
    vector_map = _vector_map(data_root, patch_size, classes, location)
    out = []
    for key, where, lidar2global in samples:
        try:
            polylines, labels = vector_map(location, lidar2global)
        except MapExpansionError as error:  # the file went or is unreadable: name the sample
            raise MapExpansionError(f'{where}: {error}') from error
        out.append((key, encode_map_annotation(polylines, labels, classes, patch_size)))
    return out


# -- the step ----------------------------------------------------------------------------------
def _where(path: str, index: int, info: dict) -> str:
    return f'{path}: data_list[{index}] (token {info.get("token")!r})'


def _plan(path: str, infos: dict, classes: tuple, patch_size: tuple, force: bool,
          data_root: str) -> Tuple[List[int], Dict[str, int]]:
    """The samples of one file to cut, and the counts of what is already there."""
    from turbox_mm.datasets.nuscenes_map_fields import command_line as map_fields_command
    samples = infos['data_list']
    todo, counts = [], dict(added=0, kept=0, overwritten=0)
    for index, info in enumerate(samples):
        if MAP_ANNOTATION not in info:
            todo.append(index)
            counts['added'] += 1
        elif force:
            todo.append(index)
            counts['overwritten'] += 1
        else:
            where = _where(path, index, info)
            check_map_annotation(info[MAP_ANNOTATION], classes, patch_size, where)
            decode_map_annotation(info[MAP_ANNOTATION], where)
            counts['kept'] += 1
    lacking = [i for i in todo if 'map_location' not in samples[i]]
    if lacking:
        first = lacking[0]
        raise MapAnnotationError(
            f'{_where(path, first, samples[first])} has no map_location ({len(lacking)} of '
            f'{len(samples)} samples lack it): the map-gt step needs the map fields; add them '
            f'with {map_fields_command([path], data_root)} (tools/create_data.py map-fields, '
            'docs/data.md "Map fields (MapTR)")')
    return todo, counts


def _check_locations(todo: List[List[int]], loaded: List[tuple], data_root: str) -> None:
    """Every location to cut has its map-expansion file (else named, with a sample)."""
    uses = {}  # location -> the samples to cut there, named
    for (path, infos), indices in zip(loaded, todo):
        for index in indices:
            info = infos['data_list'][index]
            uses.setdefault(info['map_location'], []).append(_where(path, index, info))
    for location in sorted(uses):
        path = map_expansion_path(data_root, location)
        if location in NUSCENES_LOCATIONS and osp.isfile(path):
            continue
        raise MapExpansionError(f'{missing_map_message(data_root, location)} '
                                f'({len(uses[location])} samples to cut use it, e.g. '
                                f'{uses[location][0]})')


def precompute_map_gt(infos_path: Union[str, Sequence[str]], data_root: str,
                      patch_size: Sequence[float] = DEFAULT_PATCH_SIZE,
                      classes: Sequence[str] = MAP_CLASSES, force: bool = False,
                      workers: int = 0, progress: bool = False) -> List[dict]:
    """Write every sample's ``map_annotation`` (the reference vectoriser's polylines) into
    v2 info files.

    Args:
        infos_path (str | list[str]): v2 info files (rewritten in place).
        data_root (str): The nuScenes root holding ``maps/expansion/<location>.json``.
        patch_size (Sequence[float]): ``(patch_h, patch_w)``, as ``LoadMapGT`` takes it.
            Defaults to (60, 30).
        classes (Sequence[str]): The map classes, in order, as ``LoadMapGT``'s
            ``map_classes``, some of ``('divider', 'ped_crossing', 'boundary',
            'centerline')``. Defaults to ``('divider', 'ped_crossing', 'boundary')``.
        force (bool): Cut and rewrite every sample, also those that carry a
            ``map_annotation`` already. Defaults to False (keep those made for the same
            classes and patch size; others are an error).
        workers (int): Worker processes; 0 uses every CPU, 1 cuts in this process.
            Defaults to 0.
        progress (bool): Show a progress bar. Defaults to False.

    Returns:
        list[dict]: Per file: ``path``, ``samples``, ``added``, ``kept``, ``overwritten``
        (samples), ``instances`` (of the samples cut), ``written`` (bool); and, in the first
        entry, ``seconds`` and ``workers`` of the cut.

    Raises:
        MapAnnotationError: A sample without ``map_location`` (the map-fields command is
            named), or a present ``map_annotation`` of other classes, another patch size or
            malformed, without ``force``.
        MapExpansionError: A location without its map-expansion file (named, with the
            number of samples that use it).
        InfoFileError: A file that is not a v2 info file, or samples without the pose
            fields.
    """
    from turbox_mm.datasets.nuscenes_tables import write_info_file
    from turbox_mm.datasets.synthetic import check_infos

    paths = [infos_path] if isinstance(infos_path, str) else list(infos_path)
    patch_size = tuple(float(v) for v in patch_size)
    classes = tuple(classes)
    unknown = [c for c in classes if c not in KNOWN_MAP_CLASSES]
    if unknown or not classes:
        raise MapAnnotationError(f'map classes {list(classes)}: expected some of '
                                 f'{list(KNOWN_MAP_CLASSES)}')
    if len(patch_size) != 2 or min(patch_size) <= 0:
        raise MapAnnotationError(f'patch_size {list(patch_size)}: expected (patch_h, patch_w) '
                                 'in metres, both > 0')
    loaded = [(path, check_infos(path, POSE_FIELDS, name=path)) for path in paths]
    todo, results = [], []  # per file: the samples to cut, the counts
    for path, infos in loaded:
        indices, counts = _plan(path, infos, classes, patch_size, force, data_root)
        todo.append(indices)
        results.append(dict(path=path, samples=len(infos['data_list']), **counts))
    _check_locations(todo, loaded, data_root)

    groups = {}  # location -> [(key, where, lidar2global)] in file and sample order
    for file_index, (path, infos) in enumerate(loaded):
        for index in todo[file_index]:
            info = infos['data_list'][index]
            groups.setdefault(info['map_location'], []).append(
                ((file_index, index), _where(path, index, info), lidar2global_of(info)))
    tasks = [(data_root, patch_size, classes, location, samples[start:start + CHUNK])
             for location, samples in sorted(groups.items())
             for start in range(0, len(samples), CHUNK)]
    workers = workers or os.cpu_count() or 1
    workers = min(workers, len(tasks)) if workers > 1 and len(tasks) > 1 else 1
    started = time.perf_counter()
    cut = run_tasks(_cut, tasks, workers, progress, sum(len(t[-1]) for t in tasks), 'map-gt',
                    _WORKER)
    seconds = time.perf_counter() - started

    for file_index, ((path, infos), result) in enumerate(zip(loaded, results)):
        result['instances'] = 0
        # this process's keys, and one classes and one patch_size object per file: each
        # pickled once, so the file has the same bytes whichever process cut a sample
        shared = dict(classes=list(classes), patch_size=list(patch_size))
        for index in todo[file_index]:
            annotation = {key: cut[(file_index, index)][key] for key in KEYS}
            annotation.update(shared)
            infos['data_list'][index][MAP_ANNOTATION] = annotation
            result['instances'] += len(annotation['labels'])
    for (path, infos), result, indices in zip(loaded, results, todo):
        result['written'] = bool(indices)
        if result['written']:
            write_info_file(path, infos)
    if results:
        results[0].update(seconds=seconds, workers=workers)
    return results


def format_results(results: List[dict]) -> str:
    """One line per file of :func:`precompute_map_gt`'s results, and one for the cut."""
    lines = []
    for r in results:
        state = 'written' if r['written'] else 'unchanged'
        lines.append(f"{r['path']}: {r['samples']} samples: {r['added']} map annotations "
                     f"added, {r['kept']} kept, {r['overwritten']} overwritten ({state})")
    cut = sum(r['added'] + r['overwritten'] for r in results)
    if results and cut:
        lines.append(f"  cut {cut} samples ({sum(r['instances'] for r in results)} instances) "
                     "with the reference vectoriser (upstream's VectorizedLocalMap) in "
                     f"{results[0]['seconds']:.1f} s with {results[0]['workers']} workers")
    return '\n'.join(lines)
