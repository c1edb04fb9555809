"""Pure functions of SparseDrive's motion evaluation (UniAD's procedure on nuScenes-devkit
machinery: upstream's ``motion_eval_uniad.py`` and ``motion_utils.py``, swc-17/SparseDrive
@ ffebeb4).

The procedure (``docs/design/sparsedrive.md`` section 8, "Motion"):

1. Classes are grouped (:data:`MOTION_NAME_MAPPING`): vehicles and cycles are ``car``,
   pedestrians ``pedestrian``, barriers and cones ``barrier``; ``car`` and ``pedestrian``
   are evaluated.
2. Per sample and class, predictions by descending score each take the nearest free ground
   truth by BEV centre distance; a true positive when that distance is below 2 m
   (:func:`match_sample`). For a true positive, over the ``v`` valid steps of the ground
   truth's future: minADE, minFDE and miss (:func:`trajectory_errors`).
3. Over all samples (:func:`class_metrics`): nuScenes' precision / recall accumulation, the
   errors' cumulative means re-sampled on the 101-point recall grid through the confidences
   and averaged from recall 0.1 to the highest recall reached (the devkit's ``calc_tp``);
   EPA from a second matching pass that also requires the min-over-modes error at the last
   valid step below 2 m: ``(second-pass matches - 0.5 x first-pass false positives) / GT``.
"""
from typing import Dict, Sequence, Tuple

import numpy as np

#: Sparse4D's detection classes, by label.
DET_CLASSES = ('car', 'truck', 'construction_vehicle', 'bus', 'trailer', 'barrier',
               'motorcycle', 'bicycle', 'pedestrian', 'traffic_cone')
#: Detection class -> motion class (upstream's ``motion_name_mapping``).
MOTION_NAME_MAPPING = {
    'car': 'car', 'truck': 'car', 'construction_vehicle': 'car', 'bus': 'car',
    'trailer': 'car', 'motorcycle': 'car', 'bicycle': 'car', 'pedestrian': 'pedestrian',
    'traffic_cone': 'barrier', 'barrier': 'barrier'}
#: BEV evaluation range per motion class (m): nuScenes ``detection_cvpr_2019``'s
#: ``class_range`` looked up with the mapped names (so motorcycles and bicycles get the car's
#: 50 m, not their own 40 m, as upstream).
CLASS_RANGE = {'car': 50.0, 'pedestrian': 40.0, 'barrier': 30.0}
#: The evaluated motion classes.
EVAL_CLASSES = ('car', 'pedestrian')
#: Centre distance below which a prediction matches a ground truth (m).
MATCH_DISTANCE = 2.0
#: Miss and EPA trajectory threshold (m).
MISS_THRESHOLD = 2.0
#: Lowest recall of the TP-error average (``detection_cvpr_2019``'s ``min_recall``).
MIN_RECALL = 0.1
#: Points of the recall grid (the devkit's ``DetectionMetricData.nelem``).
NUM_RECALL_POINTS = 101
#: The trajectory errors, in this order in :func:`match_sample`'s ``errors``.
TP_METRICS = ('min_ade_err', 'min_fde_err', 'miss_rate_err')


def score_order(scores: np.ndarray) -> np.ndarray:
    """Indices by descending score; among equal scores the later index first (upstream sorts
    ``(score, index)`` pairs and reverses them).

    Args:
        scores (np.ndarray): ``[K]``.

    Returns:
        np.ndarray: int64 ``[K]``.

    Examples:
        >>> score_order(np.array([0.5, 0.9, 0.5])).tolist()
        [1, 2, 0]
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    return np.lexsort((np.arange(len(scores)), scores))[::-1]


def trajectory_errors(pred_trajs: np.ndarray, gt_traj: np.ndarray,
                      miss_threshold: float = MISS_THRESHOLD) -> Tuple[float, float, float]:
    """minADE, minFDE and miss of one matched prediction over the valid steps of its truth.

    Args:
        pred_trajs (np.ndarray): ``[M, T, 2]`` absolute positions of the M modes.
        gt_traj (np.ndarray): ``[v, 2]`` the valid future positions, ``v <= T``.
        miss_threshold (float): A miss when the smallest (over modes) largest (over steps)
            error exceeds it. Defaults to 2.0.

    Returns:
        tuple[float, float, float]: ``(min over modes of the mean error, min over modes of
        the error at step v, 1.0 if missed else 0.0)``; ``(0, 0, 0)`` when ``v = 0``
        (upstream counts a truth without future as a perfect, unmissed match).

    Examples:
        >>> trajectory_errors(np.zeros((1, 12, 2)), np.array([[0.0, 3.0]]))
        (3.0, 3.0, 1.0)
    """
    steps = len(gt_traj)
    if steps == 0:
        return 0.0, 0.0, 0.0
    dist = np.linalg.norm(pred_trajs[:, :steps] - gt_traj[None], axis=-1)
    return (float(dist.mean(axis=1).min()), float(dist[:, -1].min()),
            float(dist.max(axis=1).min() > miss_threshold))


def match_sample(pred_centres: np.ndarray, pred_scores: np.ndarray, pred_trajs: np.ndarray,
                 gt_centres: np.ndarray, gt_trajs: np.ndarray, gt_steps: np.ndarray,
                 match_distance: float = MATCH_DISTANCE,
                 miss_threshold: float = MISS_THRESHOLD) -> Dict[str, object]:
    """Both matching passes of one sample and one class.

    Predictions go by :func:`score_order`; each takes the nearest ground truth not yet taken
    in this pass (the first of equally near ones). First pass: a true positive when that
    distance is below ``match_distance``, with its :func:`trajectory_errors`. Second pass
    (EPA): a match when the distance is below ``match_distance`` **and** the min-over-modes
    error at the truth's last valid step is below ``miss_threshold`` (a truth without future
    never matches); a prediction failing the second test leaves the truth free.

    Args:
        pred_centres (np.ndarray): ``[K, 2]`` BEV centres.
        pred_scores (np.ndarray): ``[K]``.
        pred_trajs (np.ndarray): ``[K, M, T, 2]`` absolute positions.
        gt_centres (np.ndarray): ``[N, 2]``.
        gt_trajs (np.ndarray): ``[N, T_gt, 2]`` absolute positions (valid prefix first).
        gt_steps (np.ndarray): ``[N]`` valid steps of each truth, ``<= min(T, T_gt)``.
        match_distance (float): Centre-distance threshold. Defaults to 2.0.
        miss_threshold (float): Miss / EPA trajectory threshold. Defaults to 2.0.

    Returns:
        dict: ``tp`` bool ``[K]``, ``errors`` float64 ``[K, 3]`` (:data:`TP_METRICS`, NaN
        for false positives), ``traj_matched`` (int, second-pass matches), all in the
        predictions' given order.

    Examples:
        >>> out = match_sample(np.zeros((1, 2)), np.ones(1), np.zeros((1, 6, 12, 2)),
        ...                    np.zeros((1, 2)), np.zeros((1, 12, 2)), np.array([12]))
        >>> out['tp'].tolist(), out['errors'].tolist(), out['traj_matched']
        ([True], [[0.0, 0.0, 0.0]], 1)
    """
    num_pred, num_gt = len(pred_centres), len(gt_centres)
    tp = np.zeros(num_pred, dtype=bool)
    errors = np.full((num_pred, len(TP_METRICS)), np.nan)
    if num_pred == 0:
        return dict(tp=tp, errors=errors, traj_matched=0)
    dist = np.linalg.norm(pred_centres[:, None, :2] - gt_centres[None, :, :2], axis=-1)
    final = np.full((num_pred, num_gt), np.inf)  # min-over-modes error at the last step
    for j in np.flatnonzero(gt_steps > 0):
        last = int(gt_steps[j]) - 1
        final[:, j] = np.linalg.norm(pred_trajs[:, :, last] - gt_trajs[j, last], axis=-1).min(1)
    order = score_order(pred_scores)
    taken = np.zeros(num_gt, dtype=bool)
    for i in order:
        free = np.where(taken, np.inf, dist[i])
        if num_gt and free.min() < match_distance:
            j = int(np.argmin(free))
            taken[j] = True
            tp[i] = True
            errors[i] = trajectory_errors(pred_trajs[i], gt_trajs[j, :int(gt_steps[j])],
                                          miss_threshold)
    taken[:] = False
    traj_matched = 0
    for i in order:
        free = np.where(taken, np.inf, dist[i])
        if num_gt and free.min() < match_distance:
            j = int(np.argmin(free))
            if final[i, j] < miss_threshold:
                taken[j] = True
                traj_matched += 1
    return dict(tp=tp, errors=errors, traj_matched=traj_matched)


def cumulative_mean(values: np.ndarray) -> np.ndarray:
    """Running mean ignoring NaNs (the devkit's ``cummean``): ones if every value is NaN, 0
    before the first non-NaN value.

    Args:
        values (np.ndarray): ``[L]``.

    Returns:
        np.ndarray: float64 ``[L]``.

    Examples:
        >>> cumulative_mean(np.array([1.0, np.nan, 3.0])).tolist()
        [1.0, 1.0, 2.0]
    """
    values = np.asarray(values, dtype=np.float64)
    valid = ~np.isnan(values)
    if not valid.any():
        return np.ones(len(values))
    total = np.cumsum(np.where(valid, values, 0.0))
    count = np.cumsum(valid)
    return np.divide(total, count, out=np.zeros_like(total), where=count != 0)


def tp_error(curve: np.ndarray, confidence: np.ndarray, min_recall: float = MIN_RECALL) -> float:
    """The devkit's ``calc_tp``: mean of an error curve on the recall grid from just above
    ``min_recall`` to the highest recall reached (the last non-zero confidence), or 1.0 when
    that recall is not above ``min_recall``.

    Args:
        curve (np.ndarray): ``[101]`` error per recall point.
        confidence (np.ndarray): ``[101]`` confidence per recall point (0 beyond the
            highest recall).
        min_recall (float): Defaults to 0.1.

    Returns:
        float: The error.

    Examples:
        >>> tp_error(np.full(101, 2.0), np.r_[np.ones(51), np.zeros(50)])
        2.0
    """
    first = round(100 * min_recall) + 1
    nonzero = np.flatnonzero(confidence)
    last = int(nonzero[-1]) if len(nonzero) else 0
    if last < first:
        return 1.0
    return float(np.mean(curve[first:last + 1]))


def class_metrics(scores: Sequence[np.ndarray], tps: Sequence[np.ndarray],
                  errors: Sequence[np.ndarray], num_gt: int, traj_matched: int,
                  min_recall: float = MIN_RECALL) -> Dict[str, float]:
    """EPA and the three trajectory errors of one class over all samples.

    Args:
        scores (Sequence[np.ndarray]): Per sample ``[K_s]`` prediction scores, in sample
            order (ties between samples go to the later prediction, as upstream).
        tps (Sequence[np.ndarray]): Per sample bool ``[K_s]`` (first pass).
        errors (Sequence[np.ndarray]): Per sample ``[K_s, 3]`` (NaN for false positives).
        num_gt (int): Ground truths of the class over all samples.
        traj_matched (int): Second-pass matches over all samples.
        min_recall (float): Defaults to 0.1.

    Returns:
        dict: ``EPA`` and :data:`TP_METRICS`. Where upstream crashes (no ground truth of
        the class: a 2-tuple unpacked as 3; no true positive: one object unpacked as 3), the
        errors are 1.0 (the devkit's value for "no predictions") and EPA is
        ``-0.5 x false positives / num_gt``, or 0.0 without ground truth.

    Examples:
        >>> m = class_metrics([np.array([0.9])], [np.array([True])],
        ...                   [np.zeros((1, 3))], num_gt=1, traj_matched=1)
        >>> m['EPA'], m['min_ade_err']
        (1.0, 0.0)
    """
    scores = np.concatenate([np.asarray(s, np.float64).reshape(-1) for s in scores] + [[]])
    tp = np.concatenate([np.asarray(t, bool).reshape(-1) for t in tps] + [np.zeros(0, bool)])
    errs = np.concatenate([np.asarray(e, np.float64).reshape(-1, len(TP_METRICS))
                           for e in errors] + [np.zeros((0, len(TP_METRICS)))])
    num_fp = int((~tp).sum())
    out = {name: 1.0 for name in TP_METRICS}
    out['EPA'] = (traj_matched - 0.5 * num_fp) / num_gt if num_gt > 0 else 0.0
    if num_gt == 0 or not tp.any():
        return out
    order = score_order(scores)
    scores, tp, errs = scores[order], tp[order], errs[order]
    recall = np.cumsum(tp).astype(np.float64) / float(num_gt)  # (precision is not reported)
    grid = np.linspace(0, 1, NUM_RECALL_POINTS)
    confidence = np.interp(grid, recall, scores, right=0)
    matched_conf = scores[tp]
    for col, name in enumerate(TP_METRICS):
        running = cumulative_mean(errs[tp, col])
        # np.interp needs increasing x: both confidence axes reversed, and the result back.
        curve = np.interp(confidence[::-1], matched_conf[::-1], running[::-1])[::-1]
        out[name] = tp_error(curve, confidence, min_recall)
    return out


__all__ = ['CLASS_RANGE', 'DET_CLASSES', 'EVAL_CLASSES', 'MATCH_DISTANCE', 'MIN_RECALL',
           'MISS_THRESHOLD', 'MOTION_NAME_MAPPING', 'NUM_RECALL_POINTS', 'TP_METRICS',
           'class_metrics', 'cumulative_mean', 'match_sample', 'score_order', 'tp_error',
           'trajectory_errors']
