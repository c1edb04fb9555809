"""``LoadMapGT``: MapTR's vectorised map ground truth of a sample, from the map expansion
or precomputed into the info file."""
import logging
from typing import Optional, Sequence

import numpy as np
from mmcv.transforms import BaseTransform
from mmengine.logging import print_log

from turbox_mm.datasets.map_gt import (MAP_ANNOTATION, MAP_CLASSES, FastVectorizedLocalMap,
                                       MapExpansionError, VectorizedLocalMapReference,
                                       check_map_annotation, decode_map_annotation,
                                       lidar2global_of, map_targets, select_map_classes)
from turbox_mm.datasets.map_gt.precompute import command_line
from turbox_mm.registry import TRANSFORMS

IMPLEMENTATIONS = ('fast', 'reference', 'precomputed')
FALLBACKS = (None, 'reference')


@TRANSFORMS.register_module()
class LoadMapGT(BaseTransform):
    """Cut a sample's map ground truth out of the nuScenes map expansion, as MapTR does.

    The map elements within the 30 m x 60 m patch around the lidar (upstream's
    ``VectorizedLocalMap``, see :mod:`turbox_mm.datasets.map_gt`), in the lidar frame, become
    fixed-length point sets (upstream's ``LiDARInstanceLines``). Reads the sample's
    ``map_location``, ``ego2global`` and ``lidar_points.lidar2ego`` (mmdet3d v2 infos with
    MapTR's or the synthetic generator's map fields); with ``impl='precomputed'``, the
    sample's ``map_annotation`` instead (``tools/create_data.py map-gt`` writes it:
    :mod:`turbox_mm.datasets.map_gt.precompute`).

    Adds:

    - ``gt_map_labels`` (np.ndarray): ``[N]`` int64, divider 0, ped_crossing 1, boundary 2,
      centerline 3 (MapTR v2's ``_w_centerline`` configs);
    - ``gt_map_pts`` (np.ndarray): ``[N, fixed_num, 2]`` float32, evenly spaced by length,
      clamped to the patch (``fixed_num_sampled_points``);
    - ``gt_map_shifts`` (np.ndarray): ``[N, fixed_num - 1, fixed_num, 2]`` float32, the
      equivalent orders of pattern ``'v2'`` padded with ``padding_value``
      (``shift_fixed_num_sampled_points_v2``), if ``with_shifts``;
    - ``gt_map_bboxes`` (np.ndarray): ``[N, 4]`` float32 clamped bounds (``bbox``);
    - ``gt_map_polylines`` (list[np.ndarray]): the instances' own vertices, float64, what
      upstream's evaluation compares with; also put in ``eval_ann_info`` (with
      ``gt_map_labels``) when the sample has one (mmdet3d's test mode), for
      :class:`~turbox_mm.evaluation.MapChamferMetric`.

    A patch without map elements gives ``N = 0`` arrays of these shapes, or, with
    ``drop_empty=True``, drops the sample (the transform returns None and mmengine's dataset
    draws another one in training, as upstream's ``filter_empty_gt``).

    Args:
        data_root (str): The nuScenes root holding ``maps/expansion/<location>.json``.
        impl (str): ``'fast'`` (turbox: arrays prepared once per location, numpy per
            sample), ``'reference'`` (stock: upstream's shapely code through nuscenes-devkit,
            as upstream's v1 cuts it online) or ``'precomputed'`` (the reference's polylines
            read from the sample's ``map_annotation``, as upstream's v2 reads its
            precomputed annotations: the same outputs as ``'reference'``, bit for bit; an
            annotation cut for more classes serves, as upstream's v2 picks its classes).
            Defaults to 'fast'.
        patch_size (tuple[float, float]): ``(patch_h, patch_w)``: extent along the lidar's y,
            then x axis, as upstream derives it from the point-cloud range. Defaults to
            (60, 30).
        map_classes (Sequence[str]): Classes, in output order. Defaults to
            ``('divider', 'ped_crossing', 'boundary')``.
        fixed_num (int): Points per instance (``fixed_ptsnum_per_line``). Defaults to 20.
        padding_value (float): Padding of ``gt_map_shifts``. Defaults to -10000.
        with_shifts (bool): Compute ``gt_map_shifts``. Defaults to True.
        drop_empty (bool): Return None for a sample without map elements. Defaults to False.
        seed (int, optional): Seed of the generator that picks the equivalent orders kept of
            a ring with more than ``fixed_num - 1`` vertices. Defaults to None: numpy's
            global generator, as upstream (mmengine seeds it per worker).
        fallback (str, optional): With ``impl='precomputed'``: ``'reference'`` cuts a sample
            without ``map_annotation`` with the reference (a warning, once per transform
            and process, names the first such sample and the map-gt command). Defaults to
            None: such a sample is a ``KeyError`` naming it and the command.

    Raises:
        KeyError: A sample without ``map_location`` (cut online), or without
            ``map_annotation`` (``impl='precomputed'`` without ``fallback``).
        MapAnnotationError: A ``map_annotation`` that lacks one of this transform's classes,
            cut for another patch size, or malformed.

    Examples:
        >>> pipeline = [dict(type='turbox_mm.LoadMapGT', data_root='data/nuscenes/')]
        >>> stock_v2 = dict(type='turbox_mm.LoadMapGT', data_root='data/nuscenes/',
        ...                 impl='precomputed')
    """

    def __init__(self, data_root: str, impl: str = 'fast', patch_size=(60.0, 30.0),
                 map_classes: Sequence[str] = MAP_CLASSES, fixed_num: int = 20,
                 padding_value: float = -10000, with_shifts: bool = True,
                 drop_empty: bool = False, seed: Optional[int] = None,
                 fallback: Optional[str] = None):
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f'LoadMapGT: impl must be one of {IMPLEMENTATIONS}, got {impl!r}')
        if fallback not in FALLBACKS:
            raise ValueError(f'LoadMapGT: fallback must be one of {FALLBACKS}, got '
                             f'{fallback!r}')
        if fallback is not None and impl != 'precomputed':
            raise ValueError(f"LoadMapGT: fallback={fallback!r} applies to "
                             f"impl='precomputed' only, got impl={impl!r}")
        if fixed_num < 2:
            raise ValueError(f'LoadMapGT: fixed_num must be >= 2, got {fixed_num}')
        self.data_root = data_root
        self.impl = impl
        self.patch_size = tuple(float(v) for v in patch_size)
        self.map_classes = tuple(map_classes)
        self.fixed_num = int(fixed_num)
        self.padding_value = float(padding_value)
        self.with_shifts = with_shifts
        self.drop_empty = drop_empty
        self.seed = seed
        self.fallback = fallback
        self._rng = None if seed is None else np.random.default_rng(seed)
        self._vector_map = None
        self._warned = False

    @property
    def vector_map(self):
        """The map cutter, built on first use (so the transform pickles light to workers);
        the reference for ``impl='precomputed'`` (its fallback)."""
        if self._vector_map is None:
            cls = FastVectorizedLocalMap if self.impl == 'fast' else VectorizedLocalMapReference
            self._vector_map = cls(self.data_root, self.patch_size, self.map_classes)
        return self._vector_map

    def transform(self, results: dict) -> Optional[dict]:
        token = results.get('token', results.get('sample_idx'))
        if self.impl == 'precomputed' and MAP_ANNOTATION in results:
            where = f'LoadMapGT, sample {token}'
            annotation = results[MAP_ANNOTATION]
            check_map_annotation(annotation, self.map_classes, self.patch_size, where)
            polylines, labels = select_map_classes(*decode_map_annotation(annotation, where),
                                                   annotation['classes'], self.map_classes)
        elif self.impl == 'precomputed' and self.fallback is None:
            raise KeyError(f"LoadMapGT(impl='precomputed'): sample {token} has no "
                           f'{MAP_ANNOTATION} (its info file has not been through the map-gt '
                           f'step); add it with {self._command()}, or pass '
                           "fallback='reference' to cut such samples online")
        else:
            if self.impl == 'precomputed':
                self._warn_fallback(token)
            polylines, labels = self._cut(results, token)
        if self.drop_empty and len(labels) == 0:
            return None
        targets = map_targets(polylines, labels, self.fixed_num, self.patch_size,
                              self.padding_value, self.with_shifts, self._rng)
        results.update(targets)
        if isinstance(results.get('eval_ann_info'), dict):
            results['eval_ann_info']['gt_map_polylines'] = targets['gt_map_polylines']
            results['eval_ann_info']['gt_map_labels'] = targets['gt_map_labels']
        return results

    def _cut(self, results: dict, token) -> tuple:
        """The sample's polylines and labels, cut from the map expansion."""
        if 'map_location' not in results:
            raise KeyError(f'LoadMapGT: sample {token} has no map_location (its info file '
                           'comes from a converter without map fields; add them with '
                           'tools/create_data.py map-fields INFOS --root-path DATA_ROOT)')
        location = results['map_location']
        try:
            return self.vector_map(location, lidar2global_of(results))
        except MapExpansionError as error:
            raise MapExpansionError(f'LoadMapGT, sample {token}: {error}') from error

    def _command(self) -> str:
        return command_line(None, self.data_root, self.map_classes, self.patch_size)

    def _warn_fallback(self, token) -> None:
        if self._warned:
            return
        self._warned = True
        print_log(f"LoadMapGT(impl='precomputed', fallback='reference'): sample {token} has "
                  f'no {MAP_ANNOTATION} in its info file: it and every other such sample are '
                  "cut online with the reference (upstream's shapely code, slower; the same "
                  'polylines); precompute them with '
                  f'{self._command()} (not repeated by this transform in this process)',
                  logger='current', level=logging.WARNING)

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(data_root={self.data_root!r}, impl={self.impl!r}, '
                f'patch_size={self.patch_size}, map_classes={self.map_classes}, '
                f'fixed_num={self.fixed_num}, with_shifts={self.with_shifts}, '
                f'drop_empty={self.drop_empty}, fallback={self.fallback!r})')
