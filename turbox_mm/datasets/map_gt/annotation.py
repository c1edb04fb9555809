"""A sample's map ground truth stored in its info: ``map_annotation``.

MapTR v2 reads its map ground truth precomputed from the info file (upstream's
``tools/maptrv2/custom_nusc_map_converter.py`` writes ``info['annotation']``, a dict of class
-> list of ``[n, 2]`` arrays). turbox_mm's map-gt step (:mod:`.precompute`,
``tools/create_data.py map-gt``) writes the polylines of the reference vectoriser
(:class:`~.reference.VectorizedLocalMapReference`, upstream's ``VectorizedLocalMap``) into each
sample of an mmdet3d v2 info file, and ``LoadMapGT(impl='precomputed')`` reads them back, bit
for bit::

    info['map_annotation'] = {
        'classes': ['divider', 'ped_crossing', 'boundary'],  # the vectoriser's map_classes
        'patch_size': [60.0, 30.0],      # (patch_h, patch_w) in metres, as LoadMapGT takes it
        'labels': [0, 0, 1, 2],          # per instance: divider 0, ped_crossing 1, boundary 2
        'num_vertices': [2, 5, 5, 17],   # per instance
        'vertices': b'...',              # float64 little-endian x, y of every vertex, instance
    }                                    # after instance: 16 * sum(num_vertices) bytes

The instances are in the reference's order, in the lidar frame; a closed ring repeats its
first vertex. ``classes`` and ``patch_size`` record what the polylines were cut for, so a
transform asking for others fails instead of training on another patch. A transform asking
for some of the stored classes, in any order, gets those (:func:`select_map_classes`: each
class's instances in their stored order), as upstream's v2 dataset picks its classes out of
the converter's annotation of all four: one map-gt run with ``centerline`` serves the
``_w_centerline`` configs and the three-class ones.

Why bytes rather than arrays: the info files hold plain Python values only (they load under
numpy 1 and 2, docs/data.md), and the ~34k samples of nuScenes with tens of instances each
would take several times the memory as nested lists of Python floats while loading; bytes
keep every bit of the float64 vertices at 8 bytes a number.

Examples:
    >>> import numpy as np
    >>> line = np.array([[0.0, 1.0], [2.5, -3.0]])
    >>> annotation = encode_map_annotation([line], np.array([0]), ['divider'], (60, 30))
    >>> annotation['labels'], annotation['num_vertices'], len(annotation['vertices'])
    ([0], [2], 32)
    >>> polylines, labels = decode_map_annotation(annotation)
    >>> bool(np.array_equal(polylines[0], line)), labels.dtype.name
    (True, 'int64')
"""
from typing import Sequence, Tuple

import numpy as np

from .reference import LABEL_OF_CLASS

__all__ = ['MAP_ANNOTATION', 'MapAnnotationError', 'encode_map_annotation',
           'decode_map_annotation', 'check_map_annotation', 'select_map_classes']

#: The info key the map-gt step writes.
MAP_ANNOTATION = 'map_annotation'
#: The keys of a ``map_annotation``.
KEYS = ('classes', 'patch_size', 'labels', 'num_vertices', 'vertices')
_DTYPE = np.dtype('<f8')


class MapAnnotationError(ValueError):
    """A sample's ``map_annotation`` is malformed, or was made for other classes or another
    patch size than asked for; the message names the sample and the key."""


def encode_map_annotation(polylines: Sequence[np.ndarray], labels: np.ndarray,
                          classes: Sequence[str], patch_size: Sequence[float]) -> dict:
    """A sample's polylines (as a vectoriser returns them) as its ``map_annotation``.

    Args:
        polylines (Sequence[np.ndarray]): ``(k_i, 2)`` vertices, lidar frame.
        labels (np.ndarray): ``[N]`` labels.
        classes (Sequence[str]): The classes they were cut for, in order.
        patch_size (Sequence[float]): ``(patch_h, patch_w)`` they were cut for.

    Returns:
        dict: The annotation (module docstring), plain Python values.
    """
    labels = [int(v) for v in np.asarray(labels).reshape(-1)]
    if len(labels) != len(polylines):
        raise MapAnnotationError(f'{len(polylines)} polylines but {len(labels)} labels')
    arrays = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polylines]
    vertices = (np.concatenate(arrays) if arrays else np.zeros((0, 2))).astype(_DTYPE)
    return dict(classes=[str(c) for c in classes],
                patch_size=[float(v) for v in patch_size], labels=labels,
                num_vertices=[len(a) for a in arrays], vertices=vertices.tobytes())


def _malformed(where: str, key: str, why: str) -> MapAnnotationError:
    return MapAnnotationError(f'{where}: map_annotation.{key} {why} (a map_annotation as '
                              'tools/create_data.py map-gt writes it has keys '
                              f'{", ".join(KEYS)}; rewrite it with map-gt --force)')


def decode_map_annotation(annotation: dict, where: str = 'map_annotation'
                          ) -> Tuple[list, np.ndarray]:
    """The polylines and labels of a ``map_annotation``, as the vectoriser returned them.

    Args:
        annotation (dict): The sample's ``map_annotation``.
        where (str): The sample, for messages.

    Returns:
        tuple[list[np.ndarray], np.ndarray]: Polylines ``(k_i, 2)`` float64 (each its own
        writable array) and their labels (int64).

    Raises:
        MapAnnotationError: A missing key, or lengths that do not agree (named).
    """
    if not isinstance(annotation, dict):
        raise MapAnnotationError(f'{where}: map_annotation is a {type(annotation).__name__}, '
                                 'not a dict')
    for key in KEYS:
        if key not in annotation:
            raise _malformed(where, key, 'is missing')
    counts = np.asarray(annotation['num_vertices'], dtype=np.int64).reshape(-1)
    labels = np.asarray(annotation['labels'], dtype=np.int64).reshape(-1)
    if len(labels) != len(counts):
        raise _malformed(where, 'labels', f'has {len(labels)} entries for {len(counts)} '
                                          'instances (num_vertices)')
    data = annotation['vertices']
    if not isinstance(data, bytes) or len(data) != 2 * _DTYPE.itemsize * int(counts.sum()):
        size = len(data) if isinstance(data, bytes) else type(data).__name__
        raise _malformed(where, 'vertices', f'holds {size} bytes, not the '
                                            f'{2 * _DTYPE.itemsize * int(counts.sum())} of '
                                            f'{int(counts.sum())} float64 (x, y) vertices')
    flat = np.frombuffer(data, dtype=_DTYPE).reshape(-1, 2)
    ends = np.cumsum(counts)
    polylines = [flat[end - count:end].astype(np.float64) for count, end in zip(counts, ends)]
    return polylines, labels


def check_map_annotation(annotation: dict, classes: Sequence[str], patch_size: Sequence[float],
                         where: str = 'map_annotation') -> None:
    """Raise unless ``annotation`` was cut for ``patch_size`` and for ``classes`` (or more).

    Raises:
        MapAnnotationError: Classes that were not cut, another patch size, or either
            missing; the message names both values.
    """
    for key in ('classes', 'patch_size'):
        if not isinstance(annotation, dict) or key not in annotation:
            raise _malformed(where, key, 'is missing')
    stored_classes = tuple(annotation['classes'])
    stored_patch = tuple(float(v) for v in annotation['patch_size'])
    wanted_classes = tuple(classes)
    wanted_patch = tuple(float(v) for v in patch_size)
    if not set(wanted_classes) <= set(stored_classes):
        raise MapAnnotationError(
            f'{where}: map_annotation was cut for classes {list(stored_classes)}, not '
            f'{list(wanted_classes)}: rerun tools/create_data.py map-gt with --classes '
            f'{" ".join(wanted_classes)} --force')
    if stored_patch != wanted_patch:
        raise MapAnnotationError(
            f'{where}: map_annotation was cut for patch_size {list(stored_patch)}, not '
            f'{list(wanted_patch)}: rerun tools/create_data.py map-gt with --patch-size '
            f'{" ".join(f"{v:g}" for v in wanted_patch)} --force')


def select_map_classes(polylines: list, labels: np.ndarray, stored: Sequence[str],
                       wanted: Sequence[str]) -> Tuple[list, np.ndarray]:
    """The instances of ``wanted`` classes, class by class in that order, out of an
    annotation cut for ``stored`` (which holds them: :func:`check_map_annotation`).

    Each class's instances keep their stored order, so the result is what the vectoriser
    gives when asked for ``wanted`` (it cuts each class on its own).

    Examples:
        >>> lines = [np.zeros((2, 2)) + k for k in range(4)]
        >>> got, labels = select_map_classes(lines, np.array([0, 2, 0, 3]),
        ...                                  ['divider', 'boundary', 'centerline'],
        ...                                  ['centerline', 'divider'])
        >>> labels.tolist(), [float(p[0, 0]) for p in got]
        ([3, 0, 0], [3.0, 0.0, 2.0])
    """
    if tuple(stored) == tuple(wanted):
        return polylines, labels
    labels = np.asarray(labels, np.int64).reshape(-1)
    order = np.concatenate([np.flatnonzero(labels == LABEL_OF_CLASS[name])
                            for name in wanted] + [np.zeros(0, np.int64)])
    return [polylines[i] for i in order], labels[order]
