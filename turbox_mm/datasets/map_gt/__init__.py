"""Map ground truth for MapTR: vectorised map elements around each sample, from the nuScenes
map expansion.

Two implementations with one interface, ``vector_map(location, lidar2global) -> (polylines,
labels)``:

- :class:`VectorizedLocalMapReference` (stock): upstream MapTR's ``VectorizedLocalMap``
  through nuscenes-devkit and shapely, every record of the location cut per sample;
- :class:`FastVectorizedLocalMap` (turbox): each location's map prepared once in arrays, each
  sample cut in numpy (no shapely per sample); the same polylines (tests/test_map_gt.py).

:func:`map_targets` turns them into what MapTR's head reads (fixed-length points, the
equivalent orders of pattern ``'v2'``, boxes); :class:`~turbox_mm.datasets.transforms.LoadMapGT`
does both in a data pipeline. Labels: divider 0, ped_crossing 1, boundary 2, centerline 3
(MapTR v2's ``_w_centerline`` configs: :mod:`.centerline_reference`, :mod:`.centerline`).

:mod:`.precompute` (``tools/create_data.py map-gt``) stores the reference's polylines in
each sample of an info file as ``map_annotation`` (:mod:`.annotation`), which
``LoadMapGT(impl='precomputed')`` reads back bit for bit, as upstream's MapTR v2 reads its
precomputed annotations.

:func:`bev_seg_mask` and :func:`pv_seg_mask` draw MapTR v2's auxiliary segmentation targets
(:class:`~turbox_mm.datasets.transforms.RasterizeMapGT` in a pipeline).
"""
from .annotation import (MAP_ANNOTATION, MapAnnotationError, check_map_annotation,
                         decode_map_annotation, encode_map_annotation, select_map_classes)
from .expansion_file import (NUSCENES_LOCATIONS, MapExpansionError, check_map_expansion,
                             load_map_expansion, map_expansion_path)
from .fast import FastVectorizedLocalMap
from .location_geometry import LocationGeometry
from .patch_pose import PatchPose, lidar2global_of, patch_pose
from .precompute import precompute_map_gt
from .reference import (CLASS2LABEL, KNOWN_MAP_CLASSES, LABEL_OF_CLASS, MAP_CLASSES,
                        VectorizedLocalMapReference,
                        bboxes_reference, fixed_num_points_reference,
                        shift_orders_v2_reference)
from .sampling import fixed_num_points, instance_bboxes, map_targets, shift_orders_v2
from .seg_masks import bev_seg_mask, points_along, pv_seg_mask

__all__ = [
    'NUSCENES_LOCATIONS', 'MapExpansionError', 'check_map_expansion', 'load_map_expansion',
    'map_expansion_path', 'FastVectorizedLocalMap', 'LocationGeometry', 'PatchPose',
    'lidar2global_of', 'patch_pose', 'CLASS2LABEL', 'MAP_CLASSES',
    'VectorizedLocalMapReference', 'bboxes_reference', 'fixed_num_points_reference',
    'shift_orders_v2_reference', 'fixed_num_points', 'instance_bboxes', 'map_targets',
    'shift_orders_v2', 'bev_seg_mask', 'points_along', 'pv_seg_mask', 'MAP_ANNOTATION',
    'MapAnnotationError', 'check_map_annotation', 'decode_map_annotation',
    'encode_map_annotation', 'precompute_map_gt', 'KNOWN_MAP_CLASSES', 'LABEL_OF_CLASS',
    'select_map_classes'
]
