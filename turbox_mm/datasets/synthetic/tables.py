"""The nuScenes database as JSON tables, loadable by ``nuscenes.NuScenes``.

Writes the 13 tables of ``v1.0-*`` into ``<out_dir>/<version>/``: the rows of every scene
(:class:`~.records.SceneRecords`) plus the dataset-wide ``sensor``, ``category``,
``attribute``, ``visibility`` and ``map`` tables. The devkit, mmdet3d's converter and
``NuScenesEval`` read them as they read real nuScenes. The map table's mask (which the devkit
opens when it loads the tables) is a 1x1 placeholder: the synthetic town's map is in the info
files (``map_annos``) and in the nuScenes map expansion (``maps/expansion/<location>.json``,
:mod:`.map_expansion`), not in a raster.
"""
import json
import os
import os.path as osp

import cv2
import numpy as np

from turbox_mm.utils.atomic_files import atomic_write_text

from .records import ATTRIBUTES, CHANNELS, LIDAR, VISIBILITIES, fixed_token

# All 23 nuScenes categories; the generator uses ten of them.
CATEGORY_NAMES = (
    'human.pedestrian.adult', 'human.pedestrian.child', 'human.pedestrian.wheelchair',
    'human.pedestrian.stroller', 'human.pedestrian.personal_mobility',
    'human.pedestrian.police_officer', 'human.pedestrian.construction_worker', 'animal',
    'vehicle.car', 'vehicle.motorcycle', 'vehicle.bicycle', 'vehicle.bus.bendy',
    'vehicle.bus.rigid', 'vehicle.truck', 'vehicle.construction', 'vehicle.emergency.ambulance',
    'vehicle.emergency.police', 'vehicle.trailer', 'movable_object.barrier',
    'movable_object.trafficcone', 'movable_object.pushable_pullable', 'movable_object.debris',
    'static_object.bicycle_rack')
TABLE_NAMES = ('category', 'attribute', 'visibility', 'instance', 'sensor', 'calibrated_sensor',
               'ego_pose', 'log', 'scene', 'sample', 'sample_data', 'sample_annotation', 'map')


def build_tables(scene_records: list) -> dict:
    """All tables of a dataset, as lists of rows.

    Args:
        scene_records (list[SceneRecords]): The scenes, in dataset order.

    Returns:
        dict[str, list[dict]]: One entry per name of :data:`TABLE_NAMES`.
    """
    tables = {name: [] for name in TABLE_NAMES}
    tables['category'] = [dict(token=fixed_token('category', name), name=name,
                               description=f'nuScenes category {name}')
                          for name in CATEGORY_NAMES]
    tables['attribute'] = [dict(token=fixed_token('attribute', name), name=name,
                                description=f'nuScenes attribute {name}')
                           for name in ATTRIBUTES]
    tables['visibility'] = [dict(token=token, level=level,
                                 description=f'visibility of whole object is {level[1:]} %')
                            for token, level in VISIBILITIES]
    tables['sensor'] = [dict(token=fixed_token('sensor', channel), channel=channel,
                             modality='lidar' if channel == LIDAR else 'camera')
                        for channel in CHANNELS]
    locations = {}
    for records in scene_records:
        tables['calibrated_sensor'] += list(records.calibrated_sensor.values())
        tables['ego_pose'] += records.ego_pose
        tables['log'].append(records.log)
        tables['scene'].append(records.scene_row)
        tables['sample'] += records.samples
        tables['sample_data'] += records.sample_data
        tables['sample_annotation'] += records.annotations
        tables['instance'] += records.instances
        locations.setdefault(records.log['location'], []).append(records.log['token'])
    tables['map'] = [dict(token=fixed_token('map', location), log_tokens=logs,
                          category='semantic_prior',
                          filename=f'maps/{fixed_token("map", location)}.png')
                     for location, logs in locations.items()]
    return tables


def write_tables(out_dir: str, version: str, tables: dict) -> int:
    """Write the tables as ``<out_dir>/<version>/<table>.json``, and the map placeholders.

    Returns:
        int: Bytes written.
    """
    folder = osp.join(out_dir, version)
    os.makedirs(folder, exist_ok=True)
    written = 0
    for name, rows in tables.items():
        text = json.dumps(rows, indent=0)
        atomic_write_text(osp.join(folder, f'{name}.json'), text)
        written += len(text)
    for row in tables['map']:
        path = osp.join(out_dir, row['filename'])
        os.makedirs(osp.dirname(path), exist_ok=True)
        cv2.imwrite(path, np.zeros((1, 1), np.uint8))
        written += osp.getsize(path)
    return written
