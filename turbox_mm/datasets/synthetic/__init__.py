"""A synthetic driving dataset in nuScenes' own format, generated in minutes without a network.

It is laid out and described exactly as nuScenes is for mmdet3d 1.x (``samples/``,
``sweeps/``, ``v1.0-*/`` tables, v2 info files), so the loaders that read nuScenes read it
unchanged; its info files add the temporal, map and planning fields of the models turbox_mm
accelerates. ``tools/create_data.py synthetic`` is its command line; ``docs/data.md`` its
reference.

Examples:
    >>> from turbox_mm.datasets.synthetic import check_infos, generate, ALL_FIELDS
    >>> summary = generate('data/nuscenes_synth', scenes=2, frames=3, image_size=(400, 225),
    ...                    points=4000, sweeps=2, progress=False)
    >>> infos = check_infos(summary['info_files']['train'], ALL_FIELDS)
"""
from .generator import Options, format_summary, generate, scene_names
from .gt_database import create_gt_database
from .validate import (ALL_FIELDS, MAP_FIELDS, MMDET3D_FIELDS, PLANNING_FIELDS, SWEEP_FIELDS,
                       TEMPORAL_FIELDS, InfoFileError, check_infos)

__all__ = [
    'generate', 'Options', 'format_summary', 'scene_names', 'create_gt_database', 'check_infos',
    'InfoFileError', 'MMDET3D_FIELDS', 'SWEEP_FIELDS', 'TEMPORAL_FIELDS', 'MAP_FIELDS',
    'PLANNING_FIELDS', 'ALL_FIELDS'
]
