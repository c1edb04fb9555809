"""``MapChamferMetric``: MapTR's Chamfer-distance mAP of vectorised maps, as an mmengine metric."""
from typing import Optional, Sequence

import numpy as np
from mmengine.evaluator import BaseMetric
from mmengine.logging import MMLogger

from turbox_mm.registry import METRICS
from .map_chamfer import (LINE_WIDTH, NUM_SAMPLE_POINTS, THRESHOLDS, chamfer_map,
                          chamfer_score_matrix, resample_by_length)

MAP_CLASSES = ('divider', 'ped_crossing', 'boundary')


def _array(value) -> np.ndarray:
    if hasattr(value, 'detach'):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _stack(lines: list) -> np.ndarray:
    if not lines:
        return np.zeros((0, 2, 2))
    return np.stack([np.asarray(p, np.float64) for p in lines])


@METRICS.register_module()
class MapChamferMetric(BaseMetric):
    """MapTR's map evaluation: Chamfer-distance AP per class at 0.5, 1.0 and 1.5 m.

    The procedure of upstream's ``NuScenesMapDataset._evaluate_single`` with
    ``metric='chamfer'`` (see :mod:`turbox_mm.evaluation.map_chamfer`): ground truth and
    predictions resampled to 100 points by length, a 2 m buffer overlap test, greedy matching
    by score, VOC "area" AP. Reported as ``NuscMap_chamfer/mAP``,
    ``NuscMap_chamfer/{class}_AP`` and ``NuscMap_chamfer/{class}_AP_thr_{t}``, upstream's
    keys.

    Each data sample carries:

    - ``pred_instances_3d`` with ``pts_3d`` ``[V, P, 2]`` (metres, lidar frame),
      ``scores_3d`` ``[V]`` and ``labels_3d`` ``[V]`` (MapTR's decoded output; tensors or
      arrays); every prediction counts (no score threshold, as upstream);
    - ``eval_ann_info`` with ``gt_map_polylines`` (list of ``[k, 2]`` vertices) and
      ``gt_map_labels`` ``[N]``, as :class:`~turbox_mm.datasets.transforms.LoadMapGT` puts
      them in mmdet3d's test mode.

    Args:
        classes (Sequence[str]): Class names, by label. Defaults to
            ``('divider', 'ped_crossing', 'boundary')``.
        thresholds (Sequence[float]): Chamfer thresholds in metres. Defaults to
            (0.5, 1.0, 1.5).
        num_sample_points (int): Points each polyline is resampled to. Defaults to 100.
        resample_predictions (bool): Resample predictions too (upstream's
            ``eval_use_same_gt_sample_num_flag``, True in MapTR's configs); False compares
            the predicted points as they are. Defaults to True.
        linewidth (float): Buffer distance of the overlap test. Defaults to 2.0.
        collect_device (str): ``'cpu'`` or ``'gpu'``. Defaults to 'cpu'.
        prefix (str, optional): Key prefix. Defaults to ``'NuscMap_chamfer'``.

    Examples:
        >>> val_evaluator = dict(type='turbox_mm.MapChamferMetric')
    """
    default_prefix = 'NuscMap_chamfer'

    def __init__(self, classes: Sequence[str] = MAP_CLASSES,
                 thresholds: Sequence[float] = THRESHOLDS,
                 num_sample_points: int = NUM_SAMPLE_POINTS, resample_predictions: bool = True,
                 linewidth: float = LINE_WIDTH, collect_device: str = 'cpu',
                 prefix: Optional[str] = None):
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.classes = tuple(classes)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.num_sample_points = int(num_sample_points)
        self.resample_predictions = resample_predictions
        self.linewidth = float(linewidth)

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        """Score each sample's predictions against its ground truth, per class."""
        for index, sample in enumerate(data_samples):
            pred, gt = self._unpack(sample, index)
            per_class = {}
            for label, name in enumerate(self.classes):
                mine = np.flatnonzero(pred['labels'] == label)
                lines = [pred['pts'][i] for i in mine if len(pred['pts'][i]) >= 2]
                scores = np.array([pred['scores'][i] for i in mine
                                   if len(pred['pts'][i]) >= 2], np.float64)
                if self.resample_predictions:
                    lines = [resample_by_length(p, self.num_sample_points) for p in lines]
                truth = [resample_by_length(p, self.num_sample_points)
                         for p, lab in zip(gt['polylines'], gt['labels']) if lab == label]
                matrix = chamfer_score_matrix(_stack(lines), _stack(truth), self.linewidth)
                per_class[name] = (matrix, scores)
            self.results.append(per_class)

    def _unpack(self, sample: dict, index: int) -> tuple:
        pred = sample.get('pred_instances_3d')
        need = ('pts_3d', 'scores_3d', 'labels_3d')
        if pred is None or any(k not in pred for k in need):
            found = sorted(pred) if isinstance(pred, dict) else sorted(sample)
            raise KeyError(f'MapChamferMetric: data sample {index} needs pred_instances_3d with '
                           f'{need} (MapTR\'s decoded map); found {found}')
        gt = sample.get('eval_ann_info') or {}
        if 'gt_map_polylines' not in gt or 'gt_map_labels' not in gt:
            raise KeyError(f'MapChamferMetric: data sample {index} needs eval_ann_info with '
                           'gt_map_polylines and gt_map_labels: add turbox_mm.LoadMapGT to '
                           'the test pipeline (mmdet3d puts eval_ann_info in test mode)')
        pts = _array(pred['pts_3d'])
        if pts.ndim != 3:  # [V, P * 2]: flat points
            pts = pts.reshape(len(pts), -1, 2) if pts.size else np.zeros((len(pts), 0, 2))
        pts = pts[..., :2]
        return (dict(pts=pts, scores=_array(pred['scores_3d']).reshape(-1),
                     labels=_array(pred['labels_3d']).reshape(-1)),
                dict(polylines=[np.asarray(p, np.float64).reshape(-1, 2)
                                for p in gt['gt_map_polylines']],
                     labels=_array(gt['gt_map_labels']).reshape(-1)))

    def compute_metrics(self, results: list) -> dict:
        """AP per class and threshold over all samples, and their means."""
        metrics, details = chamfer_map(results, self.classes, self.thresholds)
        logger = MMLogger.get_current_instance()
        rows = [f'{"class":<14}{"gts":>7}{"dets":>7}' +
                ''.join(f'{"AP@" + str(t):>10}' for t in self.thresholds) + f'{"AP":>8}']
        for name in self.classes:
            first = details[(name, self.thresholds[0])]
            rows.append(f'{name:<14}{first["num_gts"]:>7}{first["num_dets"]:>7}' +
                        ''.join(f'{details[(name, t)]["ap"]:>10.4f}' for t in self.thresholds) +
                        f'{metrics[name + "_AP"]:>8.4f}')
        rows.append(f'{"mAP":<28}{metrics["mAP"]:>{10 * len(self.thresholds) + 8}.4f}')
        logger.info('Map Chamfer AP\n' + '\n'.join(rows))
        return metrics
