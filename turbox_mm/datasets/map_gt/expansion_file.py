"""Finding and reading nuScenes map-expansion files, with errors that say what is wrong.

nuscenes-devkit's ``NuScenesMap(dataroot, map_name)`` opens
``<dataroot>/maps/expansion/<map_name>.json``; a sample's ``map_location`` (the ``location``
of its scene's ``log`` row) names the file. Real nuScenes ships these files in the separate
"map expansion" download (v1.3); turbox_mm's synthetic generator writes them since it
records ``metainfo['map_expansion']`` in its info files (older synthetic sets have neither,
and their samples' ``map_location`` is ``'synthetic-town'``).
"""
import json
import os.path as osp
import pickle
from typing import Iterable, Optional, Union

#: The four locations nuScenes (and the devkit) know.
NUSCENES_LOCATIONS = ('boston-seaport', 'singapore-hollandvillage', 'singapore-onenorth',
                      'singapore-queenstown')
#: The location the synthetic generator wrote before it wrote map expansions.
OLD_SYNTHETIC_LOCATION = 'synthetic-town'


class MapExpansionError(FileNotFoundError):
    """A map-expansion file is missing or unreadable, or a sample names no usable location."""


def map_expansion_path(data_root: str, location: str) -> str:
    """``<data_root>/maps/expansion/<location>.json``, where the devkit reads a location."""
    return osp.join(data_root, 'maps', 'expansion', f'{location}.json')


def missing_map_message(data_root: str, location: str) -> str:
    """Why the map of ``location`` cannot be found under ``data_root``, and what to do."""
    path = map_expansion_path(data_root, location)
    if location == OLD_SYNTHETIC_LOCATION:
        return (f'map location {location!r} has no map expansion ({path} does not exist): '
                'this synthetic dataset was generated before the generator wrote '
                'maps/expansion/ (its info files lack metainfo.map_expansion). Regenerate it '
                'with tools/create_data.py synthetic.')
    hint = ('download the nuScenes map expansion (v1.3) and unpack it into '
            f'{osp.join(data_root, "maps")}/' if location in NUSCENES_LOCATIONS else
            f'{location!r} is not one of nuScenes\' locations {NUSCENES_LOCATIONS}')
    return (f'no map expansion for map location {location!r}: {path} does not exist; {hint}. '
            'See docs/data.md, "Map ground truth".')


def load_map_expansion(data_root: str, location: str) -> dict:
    """Read the map-expansion JSON of a location.

    Args:
        data_root (str): The nuScenes data root.
        location (str): The location (a sample's ``map_location``).

    Returns:
        dict: The document (layers by name).

    Raises:
        MapExpansionError: The file is missing (the message names it, the location and what
            to do) or is not a map-expansion JSON.
    """
    path = map_expansion_path(data_root, location)
    if not osp.isfile(path):
        raise MapExpansionError(missing_map_message(data_root, location))
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as error:
        raise MapExpansionError(f'cannot read the map expansion of {location!r} from {path}: '
                                f'{error}') from error
    missing = [k for k in ('node', 'line', 'polygon', 'canvas_edge') if k not in doc]
    if not isinstance(doc, dict) or missing:
        raise MapExpansionError(f'{path} (map location {location!r}) is not a nuScenes map '
                                f'expansion: it lacks {missing or "its layers"}')
    return doc


def check_map_expansion(infos: Union[str, dict], data_root: str,
                        locations: Optional[Iterable[str]] = None) -> list:
    """Check that every location the samples name has its map-expansion file.

    Args:
        infos (str | dict): An info file (``.pkl``) or its contents.
        data_root (str): The data root holding ``maps/expansion/``.
        locations (Iterable[str], optional): Check these instead of the samples'.

    Returns:
        list[str]: The locations checked, sorted.

    Raises:
        MapExpansionError: A sample has no ``map_location``, or a location's file is missing
            (the first one, named, with the number of samples that use it).

    Examples:
        >>> import tempfile
        >>> infos = dict(metainfo={}, data_list=[dict(token='a', map_location='synthetic-town')])
        >>> try:
        ...     check_map_expansion(infos, tempfile.mkdtemp())
        ... except MapExpansionError as error:
        ...     print('Regenerate it' in str(error))
        True
    """
    if not isinstance(infos, dict):
        with open(infos, 'rb') as f:
            infos = pickle.load(f)
    samples = infos.get('data_list', [])
    if locations is None:
        counts = {}
        for index, sample in enumerate(samples):
            if 'map_location' not in sample:
                raise MapExpansionError(
                    f'sample {index} (token {sample.get("token")}) has no map_location: the '
                    'info file comes from a converter that does not record it (mmdet3d\'s '
                    'writes no map fields; MapTR\'s converter and turbox_mm\'s synthetic '
                    'generator do)')
            counts[sample['map_location']] = counts.get(sample['map_location'], 0) + 1
    else:
        counts = {location: 0 for location in locations}
    for location in sorted(counts):
        if not osp.isfile(map_expansion_path(data_root, location)):
            used = f' ({counts[location]} samples use it)' if counts[location] else ''
            raise MapExpansionError(missing_map_message(data_root, location) + used)
    return sorted(counts)
