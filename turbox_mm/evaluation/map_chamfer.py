"""MapTR's Chamfer-distance average precision of vectorised map elements.

The procedure of upstream hustvl/MapTR ``projects/mmdet3d_plugin/datasets/map_utils/``
(``mean_ap.py``, ``tpfp.py``, ``tpfp_chamfer.py``, commit 67cadd8) and the dataset's
``_evaluate_single``, per class and sample:

1. every ground-truth polyline (its own vertices) and every predicted one with at least two
   points is resampled to 100 points evenly spaced by length (``interpolate``; predictions
   only with ``eval_use_same_gt_sample_num_flag``, True in MapTR's configs);
2. score matrix: both sets buffered by 2 m (flat caps, mitre joins); a prediction and a
   ground truth whose buffers intersect score ``-(mean over the prediction's points of the
   distance to the nearest ground-truth point + the same the other way) / 2``; other pairs
   score -100;
3. at a threshold ``t`` (0.5, 1.0, 1.5 m): predictions by descending score each take their
   best-scoring ground truth; a true positive if that score is ``>= -t`` and the ground truth
   is not yet taken, else a false positive (no second choice); without ground truth, all are
   false positives;
4. AP: all samples' predictions sorted by score (``np.argsort(-scores)``, as upstream, so ties
   fall the same way), cumulative TP and FP, recall ``tp / num_gts``, precision
   ``tp / (tp + fp)`` (float32 counts, guarded by float32 eps), VOC "area" AP (the precision
   envelope summed over recall steps, kept as float32). A class without ground truth scores
   0.

Reported: ``{class}_AP_thr_{t}``, ``{class}_AP`` (mean over thresholds) and ``mAP`` (mean over
classes and thresholds, classes without ground truth included as 0, as upstream's
``NuscMap_chamfer/mAP``).
"""
from typing import Sequence

import numpy as np

THRESHOLDS = (0.5, 1.0, 1.5)
NUM_SAMPLE_POINTS = 100
LINE_WIDTH = 2.0
NO_OVERLAP_SCORE = -100.0


def resample_by_length(points: np.ndarray, num: int = NUM_SAMPLE_POINTS) -> np.ndarray:
    """``num`` points at ``linspace(0, length, num)`` along a polyline (shapely's
    ``LineString.interpolate``), float64.

    Examples:
        >>> resample_by_length(np.array([[0., 0.], [0., 4.]]), 5)[:, 1].tolist()
        [0.0, 1.0, 2.0, 3.0, 4.0]
    """
    points = np.asarray(points, np.float64).reshape(-1, 2)
    steps = np.sqrt(np.sum(np.diff(points, axis=0) ** 2, axis=1))
    s = np.concatenate([[0.0], np.cumsum(steps)])
    if s[-1] == 0:
        return np.repeat(points[:1], num, axis=0)
    keep = np.concatenate([[True], steps > 0])
    s, points = s[keep], points[keep]
    at = np.linspace(0, s[-1], num)
    return np.stack([np.interp(at, s, points[:, 0]), np.interp(at, s, points[:, 1])], axis=1)


def chamfer_score_matrix(preds: np.ndarray, gts: np.ndarray,
                         linewidth: float = LINE_WIDTH) -> np.ndarray:
    """Upstream's ``custom_polyline_score`` (metric ``'chamfer'``).

    Args:
        preds (np.ndarray): ``[P, n, 2]`` predicted polylines.
        gts (np.ndarray): ``[G, m, 2]`` ground-truth polylines.
        linewidth (float): Buffer distance of the overlap test. Defaults to 2.0.

    Returns:
        np.ndarray: ``[P, G]`` float64: minus the mean of the two directed mean nearest-point
        distances where the buffers intersect, -100 elsewhere.
    """
    import shapely
    from shapely.strtree import STRtree

    preds, gts = np.asarray(preds, np.float64), np.asarray(gts, np.float64)
    scores = np.full((len(preds), len(gts)), NO_OVERLAP_SCORE)
    if len(preds) == 0 or len(gts) == 0:
        return scores
    buffers = [shapely.buffer(shapely.linestrings(lines), linewidth, cap_style='flat',
                              join_style='mitre') for lines in (preds, gts)]
    gt_index, pred_index = STRtree(buffers[0]).query(buffers[1], predicate='intersects')
    for start in range(0, len(gt_index), 256):
        p, g = pred_index[start:start + 256], gt_index[start:start + 256]
        dist = np.sqrt(np.sum((preds[p][:, :, None] - gts[g][:, None]) ** 2, axis=-1))
        scores[p, g] = -(dist.min(2).mean(1) + dist.min(1).mean(1)) / 2
    return scores


def tp_fp(scores_matrix: np.ndarray, pred_scores: np.ndarray, threshold: float) -> tuple:
    """Upstream's ``custom_tpfp_gen``: greedy matching by descending prediction score.

    Args:
        scores_matrix (np.ndarray): ``[P, G]`` from :func:`chamfer_score_matrix`.
        pred_scores (np.ndarray): ``[P]`` confidences.
        threshold (float): Chamfer distance threshold in metres (positive).

    Returns:
        tuple[np.ndarray, np.ndarray]: ``tp`` and ``fp``, ``[P]`` float32 of 0 and 1, in the
        predictions' order.
    """
    num_preds, num_gts = scores_matrix.shape
    tp = np.zeros(num_preds, np.float32)
    fp = np.zeros(num_preds, np.float32)
    if num_gts == 0:
        fp[...] = 1
        return tp, fp
    if num_preds == 0:
        return tp, fp
    best = scores_matrix.max(axis=1)
    best_gt = scores_matrix.argmax(axis=1)
    taken = np.zeros(num_gts, bool)
    for i in np.argsort(-np.asarray(pred_scores)):
        if best[i] >= -threshold and not taken[best_gt[i]]:
            taken[best_gt[i]] = True
            tp[i] = 1
        else:
            fp[i] = 1
    return tp, fp


def average_precision(recalls: np.ndarray, precisions: np.ndarray) -> float:
    """VOC "area" AP: the area under the precision envelope over recall, in the inputs'
    dtype and stored as float32 (as upstream's ``average_precision``)."""
    recalls, precisions = np.asarray(recalls), np.asarray(precisions)
    zero, one = np.zeros(1, recalls.dtype), np.ones(1, recalls.dtype)
    mrec = np.concatenate([zero, recalls, one])
    mpre = np.concatenate([zero, precisions, zero])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.float32(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1])))


def class_ap(samples: Sequence[tuple], threshold: float) -> dict:
    """AP of one class at one threshold over a dataset.

    Args:
        samples (Sequence[tuple]): Per sample ``(scores_matrix [P, G], pred_scores [P])``.
        threshold (float): Chamfer threshold (m).

    Returns:
        dict: ``ap``, ``num_gts``, ``num_dets``, ``recall`` (final), ``precision`` (final).
    """
    tps, fps, confidences, num_gts = [], [], [], 0
    for matrix, scores in samples:
        tp, fp = tp_fp(matrix, scores, threshold)
        tps.append(tp)
        fps.append(fp)
        confidences.append(np.asarray(scores, np.float64).reshape(-1))
        num_gts += matrix.shape[1]
    confidences = np.concatenate(confidences) if confidences else np.zeros(0)
    order = np.argsort(-confidences)
    tp = np.cumsum(np.concatenate(tps)[order] if tps else np.zeros(0))
    fp = np.cumsum(np.concatenate(fps)[order] if fps else np.zeros(0))
    eps = np.finfo(np.float32).eps
    recalls = tp / np.maximum(num_gts, eps)
    precisions = tp / np.maximum(tp + fp, eps)
    return dict(ap=average_precision(recalls, precisions), num_gts=num_gts,
                num_dets=len(confidences),
                recall=float(recalls[-1]) if len(recalls) else 0.0,
                precision=float(precisions[-1]) if len(precisions) else 0.0)


def chamfer_map(per_sample: Sequence[dict], classes: Sequence[str],
                thresholds: Sequence[float] = THRESHOLDS) -> tuple:
    """Chamfer AP of every class and threshold.

    Args:
        per_sample (Sequence[dict]): Per sample and class name, ``(scores_matrix,
            pred_scores)``.
        classes (Sequence[str]): Class names.
        thresholds (Sequence[float]): Thresholds (m). Defaults to (0.5, 1.0, 1.5).

    Returns:
        tuple[dict, dict]: The metrics (``{class}_AP_thr_{t}``, ``{class}_AP``, ``mAP``) and
        the details per ``(class, threshold)`` (:func:`class_ap`).
    """
    aps = np.zeros((len(thresholds), len(classes)))
    details = {}
    for i, threshold in enumerate(thresholds):
        for j, name in enumerate(classes):
            details[(name, threshold)] = class_ap([sample[name] for sample in per_sample],
                                                  threshold)
            aps[i, j] = details[(name, threshold)]['ap']
    metrics = {}
    for j, name in enumerate(classes):
        metrics[f'{name}_AP'] = float(aps[:, j].mean())
    metrics['mAP'] = float(aps.mean())
    for j, name in enumerate(classes):
        for i, threshold in enumerate(thresholds):
            metrics[f'{name}_AP_thr_{threshold}'] = float(aps[i, j])
    return metrics, details
