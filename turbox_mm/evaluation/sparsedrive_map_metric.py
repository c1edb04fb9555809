"""``SparseDriveMapMetric``: SparseDrive's Chamfer-distance map AP, as an mmengine metric."""
from typing import Optional, Sequence

import numpy as np
from mmengine.evaluator import BaseMetric
from mmengine.logging import MMLogger

from turbox_mm.registry import METRICS
from .vector_map_ap import (MAP_CLASSES, NUM_SAMPLE_POINTS, SIMPLIFY_TOLERANCE, THRESHOLDS,
                            chamfer_distance_matrix, class_average_precision, match_nearest,
                            resample_polylines, simplify_polyline)


def _array(value) -> np.ndarray:
    if hasattr(value, 'detach'):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _name(sample: dict, index: int) -> str:
    ids = [f'{key}={sample[key]}' for key in ('sample_idx', 'token') if key in sample]
    return f'data sample {index} of the batch' + (f' ({", ".join(ids)})' if ids else '')


@METRICS.register_module()
class SparseDriveMapMetric(BaseMetric):
    """SparseDrive's map evaluation (upstream's ``VectorEvaluate``, StreamMapNet's): Chamfer
    AP per class at 0.5, 1.0 and 1.5 m.

    The procedure of :mod:`turbox_mm.evaluation.vector_map_ap`: ground truth simplified
    (0.2 m, topology kept, as upstream's eval pipeline ``VectorizeMap(simplify=True)``),
    predictions with fewer than two points dropped, both resampled to 200 points by length,
    the Chamfer distance of every pair (no buffer test), each prediction by descending score
    claiming its nearest ground truth (a true positive if within the threshold and still free;
    no second choice), VOC "area" AP over all samples.

    Reported, under ``prefix`` (``SparseDriveMap/...`` by default), upstream's keys:

    - ``ped_crossing``, ``divider``, ``boundary`` (the class names): the class AP, mean over
      thresholds;
    - ``mAP_normal``: the mean of the class-by-threshold APs (upstream divides their sum by
      a literal 9; the same for three classes and three thresholds);

    and, which upstream prints in its table but does not return, ``{class}_AP@{t}`` for each
    threshold (``ped_crossing_AP@0.5``, ...). Upstream's unreturned ``mAP`` (mean of the class
    APs) equals ``mAP_normal`` and is left out.

    Each data sample carries:

    - ``pred_map_instances`` with ``pts`` ``[V, P, 2]`` (or ``[V, 2 P]``; metres, lidar
      frame), ``scores`` ``[V]`` and ``labels`` ``[V]`` in ``classes``' order (tensors or
      arrays); every prediction counts (no score threshold, as upstream's
      ``SparsePoint3DDecoder`` without ``score_threshold``);
    - ``eval_ann_info`` with ``gt_map_polylines`` (list of ``[k, 2]`` vertices, k >= 2, not
      yet simplified) and ``gt_map_labels`` ``[N]`` in ``classes``' order (SparseDrive's:
      ped_crossing 0, divider 1, boundary 2, unlike MapTR's).

    Args:
        classes (Sequence[str]): Class names, by label. Defaults to
            ``('ped_crossing', 'divider', 'boundary')``.
        thresholds (Sequence[float]): Chamfer thresholds in metres. Defaults to
            (0.5, 1.0, 1.5).
        num_sample_points (int): Points each polyline is resampled to. Defaults to 200.
        simplify_tolerance (float, optional): Ground-truth simplification tolerance (m);
            None or 0 keeps the vertices as given. Defaults to 0.2.
        prune (bool): Skip the pairs that a cheap lower bound puts beyond the largest
            threshold (:func:`~turbox_mm.evaluation.vector_map_ap.chamfer_distance_matrix`);
            the APs are unchanged. Defaults to True.
        chamfer_device (str): Device of the Chamfer computation (``'cuda'`` is much faster;
            float64 either way). Defaults to 'cpu'.
        collect_device (str): ``'cpu'`` or ``'gpu'``. Defaults to 'cpu'.
        prefix (str, optional): Key prefix. Defaults to ``'SparseDriveMap'``.

    Examples:
        >>> val_evaluator = dict(type='turbox_mm.SparseDriveMapMetric')
    """
    default_prefix = 'SparseDriveMap'

    def __init__(self, classes: Sequence[str] = MAP_CLASSES,
                 thresholds: Sequence[float] = THRESHOLDS,
                 num_sample_points: int = NUM_SAMPLE_POINTS,
                 simplify_tolerance: Optional[float] = SIMPLIFY_TOLERANCE,
                 prune: bool = True, chamfer_device: str = 'cpu', collect_device: str = 'cpu',
                 prefix: Optional[str] = None):
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.classes = tuple(classes)
        self.thresholds = tuple(float(t) for t in thresholds)
        if not self.classes or not self.thresholds:
            raise ValueError('SparseDriveMapMetric: classes and thresholds must not be empty')
        self.num_sample_points = int(num_sample_points)
        self.simplify_tolerance = simplify_tolerance
        self.prune = prune
        self.chamfer_device = chamfer_device

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        """Match each sample's predictions with its ground truth, per class and threshold.

        Appends per sample ``{class: (scores [M] float64, true positives [T, M] bool,
        number of ground truths)}``.

        Raises:
            KeyError: If a data sample lacks ``pred_map_instances`` (or its ``pts``,
                ``scores``, ``labels``) or ``eval_ann_info`` (or its ``gt_map_polylines``,
                ``gt_map_labels``).
            ValueError: If shapes, lengths or labels are inconsistent.
        """
        unpacked = [self._unpack(sample, index) for index, sample in enumerate(data_samples)]
        for pred, gt in unpacked:  # all checked first: a bad sample adds nothing
            per_class = {}
            for label, name in enumerate(self.classes):
                mine = np.flatnonzero(pred['labels'] == label)
                mine = [i for i in mine if len(pred['pts'][i]) >= 2]
                lines = resample_polylines([pred['pts'][i] for i in mine],
                                           self.num_sample_points)
                scores = pred['scores'][mine].astype(np.float64)
                truth = resample_polylines(
                    [simplify_polyline(p, self.simplify_tolerance)
                     for p, lab in zip(gt['polylines'], gt['labels']) if lab == label],
                    self.num_sample_points)
                distances = chamfer_distance_matrix(
                    lines, truth, max(self.thresholds) if self.prune else None,
                    self.chamfer_device)
                per_class[name] = (scores, match_nearest(distances, scores, self.thresholds),
                                   len(truth))
            self.results.append(per_class)

    def _unpack(self, sample: dict, index: int) -> tuple:
        where = _name(sample, index)
        pred = sample.get('pred_map_instances')
        if not isinstance(pred, dict):
            raise KeyError(f'SparseDriveMapMetric: {where} has no pred_map_instances (the '
                           f'decoded map: pts, scores, labels); found keys {sorted(sample)}')
        for key in ('pts', 'scores', 'labels'):
            if key not in pred:
                raise KeyError(f'SparseDriveMapMetric: {where}: pred_map_instances has no '
                               f'{key!r}; found {sorted(pred)}')
        gt = sample.get('eval_ann_info')
        if not isinstance(gt, dict):
            raise KeyError(f'SparseDriveMapMetric: {where} has no eval_ann_info (mmdet3d puts '
                           'it in test mode; the map transform must fill gt_map_polylines and '
                           f'gt_map_labels); found keys {sorted(sample)}')
        for key in ('gt_map_polylines', 'gt_map_labels'):
            if key not in gt:
                raise KeyError(f'SparseDriveMapMetric: {where}: eval_ann_info has no {key!r}; '
                               f'found {sorted(gt)}')
        num_classes = len(self.classes)
        pts = pred['pts']
        if isinstance(pts, (list, tuple)):  # polylines of their own lengths
            pts = [_array(p).reshape(-1, 2).astype(np.float64) for p in pts]
        else:
            pts = _array(pts).astype(np.float64)
            if pts.ndim == 2:  # [V, 2 P]: flat points
                pts = pts.reshape(len(pts), -1, 2)
            if pts.ndim != 3 or pts.shape[-1] != 2:
                raise ValueError(f'SparseDriveMapMetric: {where}: pred_map_instances.pts must '
                                 f'be [V, P, 2] or [V, 2 P]; got {pts.shape}')
        scores = _array(pred['scores']).reshape(-1)
        labels = _array(pred['labels']).reshape(-1).astype(np.int64)
        if not len(pts) == len(scores) == len(labels):
            raise ValueError(f'SparseDriveMapMetric: {where}: pred_map_instances has '
                             f'{len(pts)} pts, {len(scores)} scores, {len(labels)} labels')
        polylines = [np.asarray(_array(p), np.float64) for p in gt['gt_map_polylines']]
        gt_labels = _array(gt['gt_map_labels']).reshape(-1).astype(np.int64)
        if len(polylines) != len(gt_labels):
            raise ValueError(f'SparseDriveMapMetric: {where}: {len(polylines)} '
                             f'gt_map_polylines but {len(gt_labels)} gt_map_labels')
        for i, line in enumerate(polylines):
            if line.ndim != 2 or line.shape[0] < 2 or line.shape[1] not in (2, 3):
                raise ValueError(f'SparseDriveMapMetric: {where}: gt_map_polylines[{i}] must '
                                 f'be [k >= 2, 2]; got {line.shape}')
        for key, values in (('pred_map_instances.labels', labels),
                            ('eval_ann_info.gt_map_labels', gt_labels)):
            if len(values) and (values.min() < 0 or values.max() >= num_classes):
                raise ValueError(f'SparseDriveMapMetric: {where}: {key} must lie in '
                                 f'[0, {num_classes}) ({self.classes}); got '
                                 f'{sorted(set(values.tolist()))}')
        return (dict(pts=pts, scores=scores, labels=labels),
                dict(polylines=polylines, labels=gt_labels))

    def compute_metrics(self, results: list) -> dict:
        """AP per class and threshold over all samples; upstream's keys (see the class)."""
        aps = np.zeros((len(self.classes), len(self.thresholds)))
        counts = {}
        for row, name in enumerate(self.classes):
            scores = [sample[name][0] for sample in results]
            tps = [sample[name][1] for sample in results]
            num_gts = sum(sample[name][2] for sample in results)
            aps[row] = class_average_precision(scores, tps, num_gts, len(self.thresholds))
            counts[name] = (sum(len(s) for s in scores), num_gts)
        metrics = {name: float(aps[row].mean()) for row, name in enumerate(self.classes)}
        metrics['mAP_normal'] = float(aps.mean())
        for row, name in enumerate(self.classes):
            for col, threshold in enumerate(self.thresholds):
                metrics[f'{name}_AP@{threshold}'] = float(aps[row, col])
        rows = [f'{"category":<14}{"num_preds":>10}{"num_gts":>9}' +
                ''.join(f'{"AP@" + str(t):>10}' for t in self.thresholds) + f'{"AP":>8}']
        for row, name in enumerate(self.classes):
            rows.append(f'{name:<14}{counts[name][0]:>10}{counts[name][1]:>9}' +
                        ''.join(f'{ap:>10.4f}' for ap in aps[row]) + f'{metrics[name]:>8.4f}')
        rows.append(f'mAP_normal = {metrics["mAP_normal"]:.4f}')
        MMLogger.get_current_instance().info('SparseDrive map Chamfer AP\n' + '\n'.join(rows))
        return metrics
