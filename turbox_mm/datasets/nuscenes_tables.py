"""The nuScenes tables as plain JSON, and the v2 info files the data steps rewrite.

One reader for every place that needs a few nuScenes tables without the devkit (whose
``NuScenes`` loads all 13 tables and indexes them): the instance-ids step
(:mod:`~turbox_mm.datasets.nuscenes_instance_ids`), the map-fields step
(:mod:`~turbox_mm.datasets.nuscenes_map_fields`) and the tracking evaluation's split lookup
(:mod:`~turbox_mm.evaluation.nuscenes_tracking`). Each problem is an error naming the file,
and where it applies the row and the key; each caller picks the exception class its users
catch.

Also the two halves those steps share around the tables: loading v2 info files with their
``metainfo.version`` checked against the tables' (:func:`load_info_files`), and writing an
info file back whole or not at all (:func:`write_info_file`).

Examples:
    >>> import json, os, tempfile
    >>> root = tempfile.mkdtemp(); os.makedirs(f'{root}/v1.0-mini')
    >>> with open(f'{root}/v1.0-mini/log.json', 'w') as f:
    ...     json.dump([dict(token='l0', location='boston-seaport')], f)
    >>> read_table(root, 'v1.0-mini', 'log', ('token', 'location'))[0]['location']
    'boston-seaport'
"""
import json
import os.path as osp
import pickle
from typing import List, Optional, Sequence, Tuple, Type

from turbox_mm.utils.atomic_files import atomic_write

from .synthetic.validate import check_infos

__all__ = ['VERSIONS', 'NuScenesTableError', 'MissingTableError', 'check_version',
           'load_json_list', 'read_table', 'load_info_files', 'write_info_file']

#: nuScenes versions (the folders of the tables under the data root).
VERSIONS = ('v1.0-trainval', 'v1.0-test', 'v1.0-mini')


class NuScenesTableError(ValueError):
    """A nuScenes table or an info file is missing, unreadable or inconsistent; the message
    names the file and the key."""


class MissingTableError(NuScenesTableError, FileNotFoundError):
    """A nuScenes table file is missing (both a :class:`NuScenesTableError` and a
    ``FileNotFoundError``)."""


def step_command(step: str, info_files: Sequence[str], root: str,
                 version: Optional[str] = None) -> str:
    """The ``tools/create_data.py <step>`` command line of an info-rewriting step that reads
    the nuScenes tables (``instance-ids``, ``map-fields``).

    Examples:
        >>> step_command('map-fields', ['a.pkl', 'b.pkl'], 'data/nuscenes', 'v1.0-mini')
        'python tools/create_data.py map-fields a.pkl b.pkl --root-path data/nuscenes --version v1.0-mini'
    """  # noqa: E501
    line = f'python tools/create_data.py {step} {" ".join(info_files)} --root-path {root}'
    return line + (f' --version {version}' if version else '')


def check_version(version: str, error: Type[Exception] = NuScenesTableError) -> str:
    """``version`` if it is one of :data:`VERSIONS`, else ``error`` naming them."""
    if version not in VERSIONS:
        raise error(f'version {version!r}: not a nuScenes version ({", ".join(VERSIONS)})')
    return version


def load_json_list(path: str, error: Type[Exception], kind: str, not_list: str) -> list:
    """The list a JSON file holds.

    Args:
        path (str): The file.
        error (type): The exception raised.
        kind (str): What the file is, for the message of one that is not JSON (``'table'``:
            ``PATH: not a JSON table (...)``).
        not_list (str): The message for JSON that is not a list (``PATH: <not_list>, got a
            dict``).

    Raises:
        error: The file is not JSON, or not a list; the file named.
    """
    try:
        with open(path, 'rb') as f:
            value = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise error(f'{path}: not a JSON {kind} ({exc})') from exc
    if not isinstance(value, list):
        raise error(f'{path}: {not_list}, got a {type(value).__name__}')
    return value


def read_table(root: str, version: str, name: str, keys: Sequence[str] = (), *,
               needed: Optional[Sequence[str]] = None, purpose: str = 'this step',
               error: Type[Exception] = NuScenesTableError,
               missing: Optional[Type[Exception]] = None) -> list:
    """The rows of ``<root>/<version>/<name>.json``, each checked for ``keys``.

    Args:
        root (str): The nuScenes data root.
        version (str): The version folder.
        name (str): The table, e.g. ``'sample'``.
        keys (Sequence[str]): Keys every row must have.
        needed (Sequence[str], optional): The tables the caller reads, for the message of a
            missing one. Defaults to ``[name]``.
        purpose (str): What reads them, for that message (e.g. ``'the instance-ids
            step'``).
        error (type): The exception raised. Defaults to :class:`NuScenesTableError`.
        missing (type, optional): The exception for a missing file. Defaults to ``error``.

    Returns:
        list[dict]: The rows, in file order.

    Raises:
        error: The file is not JSON, not a list, or a row lacks a key (the file, the row and
            the key named).
        missing: The file does not exist (the message names it and the versions ``root``
            does hold).
    """
    folder = osp.join(root, version)
    path = osp.join(folder, f'{name}.json')
    if not osp.isfile(path):
        present = sorted(v for v in VERSIONS if osp.isdir(osp.join(root, v)))
        where = (f'{root} holds {", ".join(present)}' if present
                 else f'{root} holds no nuScenes version folder')
        tables = ', '.join(f'{n}.json' for n in (needed or (name, )))
        raise (missing or error)(f'{path}: missing ({purpose} reads the nuScenes tables '
                                 f'{tables} of {version} from <data root>/{version}/; {where})')
    rows = load_json_list(path, error, 'table', 'not a nuScenes table (a JSON list of rows)')
    for index, row in enumerate(rows):
        absent = [k for k in keys if not isinstance(row, dict) or k not in row]
        if absent:
            raise error(f'{path}: row {index} has no {absent[0]!r}')
    return rows


def load_info_files(info_files: Sequence[str], version: Optional[str], *,
                    error: Type[Exception] = NuScenesTableError,
                    why: str = 'the fields come from the tables of the version the infos '
                               'were made from') -> Tuple[List[tuple], Optional[str]]:
    """Load v2 info files and settle the version of the tables to read for them.

    Args:
        info_files (Sequence[str]): v2 info files.
        version (str, optional): The version asked for; defaults to the files'
            ``metainfo.version`` (mmdet3d's converter writes it).
        error (type): The exception raised. Defaults to :class:`NuScenesTableError`.
        why (str): Why the versions must agree, for the message of a mismatch.

    Returns:
        tuple[list[tuple[str, dict]], str | None]: ``(path, infos)`` per file, and the
        version (None when there is no file).

    Raises:
        error: A file without ``metainfo.version`` when none is given, a file of another
            version than the one given, files of several versions.
        InfoFileError: A file that is not a v2 info file (``check_infos``).
    """
    loaded, versions = [], []
    for path in info_files:
        infos = check_infos(path, ('token', ), name=path)
        stated = (infos.get('metainfo') or {}).get('version')
        if version is None and stated is None:
            raise error(f'{path}: metainfo.version is missing; give the version of the '
                        f'tables (--version, one of {", ".join(VERSIONS)})')
        if version is not None and stated is not None and stated != version:
            raise error(f'{path}: metainfo.version is {stated!r}, not {version!r} '
                        f'(--version); {why}')
        loaded.append((path, infos))
        versions.append(version or stated)
    if len(set(versions)) > 1:
        raise error(f'{", ".join(p for p, _ in loaded)}: infos of several versions '
                    f'({", ".join(sorted(set(versions)))}); run the step once per version')
    return loaded, (versions[0] if versions else None)


def write_info_file(path: str, infos: dict) -> None:
    """Write an info file whole or not at all: a reader never meets a truncated one, and a
    failure leaves the old file as it was."""
    atomic_write(path, lambda f: pickle.dump(infos, f, protocol=4))
