"""``SparseDriveMotionMetric``: SparseDrive's motion forecasting metrics (EPA, minADE, minFDE,
miss rate), as an mmengine metric."""
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
from mmengine.evaluator import BaseMetric
from mmengine.logging import MMLogger

from turbox_mm.registry import METRICS
from .motion_eval import (CLASS_RANGE, DET_CLASSES, EVAL_CLASSES, MATCH_DISTANCE, MIN_RECALL,
                          MISS_THRESHOLD, MOTION_NAME_MAPPING, TP_METRICS, class_metrics,
                          match_sample)


def _array(value) -> np.ndarray:
    if hasattr(value, 'detach'):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _name(sample: dict, index: int) -> str:
    ids = [f'{key}={sample[key]}' for key in ('sample_idx', 'token') if key in sample]
    return f'data sample {index} of the batch' + (f' ({", ".join(ids)})' if ids else '')


def _as_dict(value):
    return value.to_dict() if hasattr(value, 'to_dict') else value


def _centres(boxes, where: str, key: str) -> np.ndarray:
    """Gravity centres ``[K, 3]`` of mmdet3d LiDAR boxes or of a bottom-centre tensor."""
    if hasattr(boxes, 'gravity_center'):
        return _array(boxes.gravity_center).astype(np.float64).reshape(-1, 3)
    boxes = _array(getattr(boxes, 'tensor', boxes)).astype(np.float64)
    if boxes.ndim != 2 or boxes.shape[1] < 6:
        raise ValueError(f'SparseDriveMotionMetric: {where}: {key} must be LiDAR boxes or a '
                         f'[K, >= 7] tensor (bottom centre, l, w, h, yaw, ...); got shape '
                         f'{boxes.shape}')
    centres = boxes[:, :3].copy()
    centres[:, 2] += boxes[:, 5] / 2
    return centres


@METRICS.register_module()
class SparseDriveMotionMetric(BaseMetric):
    """SparseDrive's motion evaluation (upstream's UniAD-style ``MotionEval``):
    ``{car, pedestrian}_{EPA, min_ade_err, min_fde_err, miss_rate_err}``.

    Predictions: boxes whose ``scores_3d`` reach ``score_threshold`` (upstream's
    ``motion_threshhold`` 0.2), classes grouped by :data:`MOTION_NAME_MAPPING`, kept within
    the group's BEV range (car 50 m, pedestrian 40 m, barrier 30 m; strictly below). Ground
    truth: ``eval_ann_info``'s boxes with a known label, grouped and range-filtered the same
    way; their futures are the box centre plus the cumulative per-step offsets over the valid
    prefix of the mask. Matching, errors and EPA: :mod:`turbox_mm.evaluation.motion_eval`.

    Where this differs from upstream (whose ground truth comes from nuscenes-devkit's tables):

    - The ground-truth futures come from the infos (``gt_agent_fut_trajs`` / ``_masks``, the
      converter's ``PredictHelper.get_future_for_agent`` at 6 s, same convention) instead of
      calling ``PredictHelper`` at evaluation time.
    - Zero-point rule: the dataset keeps boxes with lidar points (``num_lidar_pts > 0`` or
      the valid flag); upstream's devkit filter drops boxes with no lidar **and** no radar
      points, so boxes seen by radar only are ground truth upstream and not here. The
      devkit's bike-rack rule does not apply upstream either (it tests the names
      ``bicycle`` / ``motorcycle``, which the grouping has renamed ``car``).
    - Class range: upstream measures it from the ego vehicle (global translation minus the
      ego pose). Here it is measured in the ego frame when the data sample carries
      ``lidar2ego`` (4x4, e.g. as a meta key), else from the lidar origin (on nuScenes
      ~0.94 m ahead of the ego origin; only boxes at the range edge are affected).
    - Centre distances and trajectory errors are taken in the lidar frame (upstream: centre
      distances in the global frame, trajectories in the lidar frame); equal up to the
      small roll and pitch of the poses.
    - Where upstream crashes (a class without ground truth, or without a single match), the
      errors are 1.0 and EPA is ``-0.5 x false positives / ground truths`` (0.0 without
      ground truth); see :func:`~turbox_mm.evaluation.motion_eval.class_metrics`.

    Each data sample carries:

    - ``pred_instances_3d`` with ``bboxes_3d`` (LiDAR boxes, or ``[K, >= 7]`` bottom centre,
      l, w, h, yaw, ...), ``scores_3d`` ``[K]``, ``labels_3d`` ``[K]`` (``classes`` order)
      and ``trajs_3d`` ``[K, M, T, 2]`` (absolute lidar-frame xy of each mode and step);
    - ``eval_ann_info`` with ``gt_bboxes_3d``, ``gt_labels_3d`` ``[N]`` (-1: not a class),
      ``gt_agent_fut_trajs`` ``[N, T_gt, 2]`` (per-step offsets) and ``gt_agent_fut_masks``
      ``[N, T_gt]``;
    - optionally ``lidar2ego`` ``[4, 4]``.

    Args:
        classes (Sequence[str]): Detection class names by label. Defaults to Sparse4D's.
        eval_classes (Sequence[str]): Motion classes reported. Defaults to
            ``('car', 'pedestrian')``.
        score_threshold (float): Minimum ``scores_3d``. Defaults to 0.2.
        class_range (Mapping[str, float], optional): BEV range per motion class. Defaults
            to :data:`~turbox_mm.evaluation.motion_eval.CLASS_RANGE`.
        match_distance (float): Centre-distance threshold. Defaults to 2.0.
        miss_threshold (float): Miss / EPA threshold. Defaults to 2.0.
        min_recall (float): Lowest recall of the error average. Defaults to 0.1.
        collect_device (str): ``'cpu'`` or ``'gpu'``. Defaults to 'cpu'.
        prefix (str, optional): Key prefix. Defaults to ``'SparseDriveMotion'``.

    Examples:
        >>> val_evaluator = dict(type='turbox_mm.SparseDriveMotionMetric')
    """
    default_prefix = 'SparseDriveMotion'

    def __init__(self, classes: Sequence[str] = DET_CLASSES,
                 eval_classes: Sequence[str] = EVAL_CLASSES, score_threshold: float = 0.2,
                 class_range: Optional[Mapping[str, float]] = None,
                 match_distance: float = MATCH_DISTANCE, miss_threshold: float = MISS_THRESHOLD,
                 min_recall: float = MIN_RECALL, collect_device: str = 'cpu',
                 prefix: Optional[str] = None) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.classes = tuple(classes)
        unknown = [name for name in self.classes if name not in MOTION_NAME_MAPPING]
        if unknown:
            raise ValueError(f'SparseDriveMotionMetric: classes {unknown} have no motion '
                             f'group; known: {sorted(MOTION_NAME_MAPPING)}')
        self.class_range = dict(CLASS_RANGE if class_range is None else class_range)
        self.eval_classes = tuple(eval_classes)
        missing = [name for name in self.eval_classes if name not in self.class_range]
        if not self.eval_classes or missing:
            raise ValueError(f'SparseDriveMotionMetric: eval_classes {self.eval_classes} '
                             f'must be non-empty keys of class_range {self.class_range}')
        self.score_threshold = float(score_threshold)
        self.match_distance = float(match_distance)
        self.miss_threshold = float(miss_threshold)
        self.min_recall = float(min_recall)
        self._groups = np.array([MOTION_NAME_MAPPING[name] for name in self.classes] + [''])

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        """Match each sample's predictions with its ground truth, per evaluated class.

        Appends per sample ``{class: dict(scores, tp, errors, traj_matched, num_gt)}``
        (see :func:`~turbox_mm.evaluation.motion_eval.match_sample`).

        Raises:
            KeyError: If a data sample lacks ``pred_instances_3d`` (or ``bboxes_3d``,
                ``scores_3d``, ``labels_3d``, ``trajs_3d``) or ``eval_ann_info`` (or
                ``gt_bboxes_3d``, ``gt_labels_3d``, ``gt_agent_fut_trajs``,
                ``gt_agent_fut_masks``); the message names the key and the sample.
            ValueError: If shapes, lengths or labels are inconsistent.
        """
        unpacked = [self._unpack(sample, index) for index, sample in enumerate(data_samples)]
        for pred, gt in unpacked:  # all checked first: a bad batch adds nothing
            per_class = {}
            for name in self.eval_classes:
                mine = pred['group'] == name
                truth = gt['group'] == name
                out = match_sample(pred['centres'][mine], pred['scores'][mine],
                                   pred['trajs'][mine], gt['centres'][truth],
                                   gt['trajs'][truth], gt['steps'][truth],
                                   self.match_distance, self.miss_threshold)
                per_class[name] = dict(out, scores=pred['scores'][mine],
                                       num_gt=int(truth.sum()))
            self.results.append(per_class)

    def _in_range(self, centres: np.ndarray, group: np.ndarray,
                  lidar2ego: Optional[np.ndarray]) -> np.ndarray:
        if lidar2ego is not None:
            centres = centres @ lidar2ego[:3, :3].T + lidar2ego[:3, 3]
        radius = np.linalg.norm(centres[:, :2], axis=-1)
        limit = np.array([self.class_range.get(g, -np.inf) for g in group.tolist()])
        return radius < limit

    def _group(self, labels: np.ndarray, where: str, key: str) -> np.ndarray:
        bad = (labels < -1) | (labels >= len(self.classes))
        if bad.any():
            raise ValueError(f'SparseDriveMotionMetric: {where}: {key} must lie in '
                             f'[-1, {len(self.classes)}) ({self.classes}); got '
                             f'{sorted(set(labels[bad].tolist()))}')
        return self._groups[labels]  # label -1 -> '' (not evaluated)

    def _unpack(self, sample: dict, index: int) -> tuple:
        where = _name(sample, index)
        pred = _as_dict(sample.get('pred_instances_3d'))
        if not isinstance(pred, dict):
            raise KeyError(f'SparseDriveMotionMetric: {where} has no pred_instances_3d (boxes, '
                           f'scores, labels and trajs_3d); found keys {sorted(sample)}')
        for key in ('bboxes_3d', 'scores_3d', 'labels_3d', 'trajs_3d'):
            if key not in pred:
                raise KeyError(f'SparseDriveMotionMetric: {where}: pred_instances_3d has no '
                               f'{key!r}; found {sorted(pred)}')
        gt = _as_dict(sample.get('eval_ann_info'))
        if not isinstance(gt, dict):
            raise KeyError(f'SparseDriveMotionMetric: {where} has no eval_ann_info (the '
                           'dataset fills it in test mode with load_eval_anns=True); found '
                           f'keys {sorted(sample)}')
        for key in ('gt_bboxes_3d', 'gt_labels_3d', 'gt_agent_fut_trajs',
                    'gt_agent_fut_masks'):
            if key not in gt:
                raise KeyError(f'SparseDriveMotionMetric: {where}: eval_ann_info has no '
                               f'{key!r}; found {sorted(gt)}')
        lidar2ego = sample.get('lidar2ego')
        if lidar2ego is not None:
            lidar2ego = _array(lidar2ego).astype(np.float64)
            if lidar2ego.shape != (4, 4):
                raise ValueError(f'SparseDriveMotionMetric: {where}: lidar2ego must be 4x4; '
                                 f'got {lidar2ego.shape}')

        centres = _centres(pred['bboxes_3d'], where, 'pred_instances_3d.bboxes_3d')
        scores = _array(pred['scores_3d']).astype(np.float64).reshape(-1)
        labels = _array(pred['labels_3d']).astype(np.int64).reshape(-1)
        trajs = _array(pred['trajs_3d']).astype(np.float64)
        if trajs.ndim != 4 or trajs.shape[-1] != 2 or not (
                len(centres) == len(scores) == len(labels) == len(trajs)):
            raise ValueError(f'SparseDriveMotionMetric: {where}: pred_instances_3d needs '
                             f'bboxes_3d [K], scores_3d [K], labels_3d [K] and trajs_3d '
                             f'[K, modes, steps, 2]; got {len(centres)} boxes, scores '
                             f'{scores.shape}, labels {labels.shape}, trajs_3d {trajs.shape}')
        group = self._group(labels, where, 'pred_instances_3d.labels_3d')
        keep = scores >= self.score_threshold
        keep &= self._in_range(centres, group, lidar2ego)

        gt_centres = _centres(gt['gt_bboxes_3d'], where, 'eval_ann_info.gt_bboxes_3d')
        gt_labels = _array(gt['gt_labels_3d']).astype(np.int64).reshape(-1)
        offsets = _array(gt['gt_agent_fut_trajs']).astype(np.float64)
        masks = _array(gt['gt_agent_fut_masks']).astype(np.float64)
        num = len(gt_centres)
        if len(gt_labels) != num or offsets.ndim != 3 or offsets.shape[0] != num \
                or offsets.shape[2] != 2 or masks.shape != offsets.shape[:2]:
            raise ValueError(f'SparseDriveMotionMetric: {where}: eval_ann_info needs '
                             f'gt_bboxes_3d [N], gt_labels_3d [N], gt_agent_fut_trajs '
                             f'[N, T, 2] and gt_agent_fut_masks [N, T]; got {num} boxes, '
                             f'labels {gt_labels.shape}, trajs {offsets.shape}, masks '
                             f'{masks.shape}')
        steps = np.cumprod(masks > 0, axis=1).sum(axis=1)  # the valid prefix
        if num and steps.max() > trajs.shape[2]:
            raise ValueError(f'SparseDriveMotionMetric: {where}: trajs_3d has '
                             f'{trajs.shape[2]} steps but a ground truth has {steps.max()} '
                             'valid future steps')
        gt_group = self._group(gt_labels, where, 'eval_ann_info.gt_labels_3d')
        gt_keep = self._in_range(gt_centres, gt_group, lidar2ego)
        gt_trajs = gt_centres[:, None, :2] + np.cumsum(offsets, axis=1)
        return (dict(centres=centres[keep, :2], scores=scores[keep], trajs=trajs[keep],
                     group=group[keep]),
                dict(centres=gt_centres[gt_keep, :2], trajs=gt_trajs[gt_keep],
                     steps=steps[gt_keep], group=gt_group[gt_keep]))

    def compute_metrics(self, results: list) -> Dict[str, float]:
        """EPA and the trajectory errors per evaluated class over all samples."""
        metrics = {}
        rows = [f'{"class":<12}{"preds":>8}{"gts":>8}{"EPA":>9}' +
                ''.join(f'{name:>15}' for name in TP_METRICS)]
        for name in self.eval_classes:
            parts = [sample[name] for sample in results]
            values = class_metrics([p['scores'] for p in parts], [p['tp'] for p in parts],
                                   [p['errors'] for p in parts],
                                   sum(p['num_gt'] for p in parts),
                                   sum(p['traj_matched'] for p in parts), self.min_recall)
            for key in ('EPA', ) + TP_METRICS:
                metrics[f'{name}_{key}'] = float(values[key])
            rows.append(f'{name:<12}{sum(len(p["scores"]) for p in parts):>8}'
                        f'{sum(p["num_gt"] for p in parts):>8}{values["EPA"]:>9.4f}' +
                        ''.join(f'{values[key]:>15.4f}' for key in TP_METRICS))
        MMLogger.get_current_instance().info('SparseDrive motion\n' + '\n'.join(rows))
        return metrics
