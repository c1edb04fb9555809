"""SparseDrive's Chamfer-distance average precision of vectorised map elements.

The procedure of upstream swc-17/SparseDrive (commit ffebeb4),
``projects/mmdet3d_plugin/datasets/evaluation/map/{vector_eval.py, AP.py, distance.py}``
(``VectorEvaluate``, StreamMapNet's evaluation), with the ground truth of its eval pipeline
(``VectorizeMap(simplify=True)``), per class and sample:

1. ground truth: each polyline simplified with a 0.2 m tolerance, topology preserved
   (shapely's ``simplify(0.2, preserve_topology=True)``), nothing else;
2. predictions with fewer than two points are dropped (``format_map_results``);
3. every prediction and ground truth is resampled to 200 points evenly spaced by length
   (``interp_fixed_num``, shapely's ``interpolate``);
4. distance of every pair, no overlap test: the Chamfer distance ``(sum over the prediction's
   points of the distance to the nearest ground-truth point + the same the other way) /
   (2 * 200)``, float64, with ``torch.cdist`` (``chamfer_distance_batch``);
5. at a threshold ``t`` (0.5, 1.0, 1.5 m): predictions by descending score each look at their
   nearest ground truth (the first on ties); a true positive if that distance is ``<= t``
   and the ground truth is not yet taken, else a false positive. There is no second choice:
   a prediction whose nearest ground truth is taken is a false positive even when another
   free ground truth lies within ``t``; a prediction beyond ``t`` takes nothing. Without
   ground truth, all are false positives (``instance_match``);
6. AP: all samples' predictions sorted by ``np.argsort(-scores)`` (float64 scores, as
   upstream's after its JSON round trip, so ties fall the same way), cumulative TP and FP in
   float64, recall ``tp / num_gts``, precision ``tp / (tp + fp)`` (guarded by float32 eps),
   VOC "area" AP in float64. A class without ground truth scores 0.

Reported (``VectorEvaluate.evaluate``): per class the mean AP over thresholds under the class
name, and ``mAP_normal``, the mean of the class-by-threshold APs.

What differs from MapTR's procedure (:mod:`turbox_mm.evaluation.map_chamfer`): 200 points
instead of 100, simplified ground truth, no 2 m buffer test (MapTR scores pairs whose
flat-capped buffers do not meet -100), and the AP kept in float64 (MapTR's
``average_precision`` stores it as float32), so this module has its own
:func:`average_precision`. The matching rule (nearest, no second choice) is the same in both
once the buffer test is gone. :func:`~turbox_mm.evaluation.map_chamfer.resample_by_length`
is MapTR's and upstream's ``interpolate`` alike (equal to shapely's within 1e-13 m), so it is
reused.
"""
from typing import Optional, Sequence

import numpy as np
import torch

from .map_chamfer import resample_by_length

MAP_CLASSES = ('ped_crossing', 'divider', 'boundary')
THRESHOLDS = (0.5, 1.0, 1.5)
NUM_SAMPLE_POINTS = 200
SIMPLIFY_TOLERANCE = 0.2
# A pruned pair's true Chamfer distance exceeds ``max_distance`` by at least this much, far
# more than torch.cdist's float64 rounding (about 1e-6 m at worst, for coincident points).
PRUNE_MARGIN = 1e-3
PAIRS_PER_CHUNK = 64  # pairs a batch: 64 x 200 x 200 float64 = 20 MB


def simplify_polyline(points: np.ndarray,
                      tolerance: Optional[float] = SIMPLIFY_TOLERANCE) -> np.ndarray:
    """Douglas-Peucker simplification that keeps the topology (shapely's
    ``simplify(tolerance, preserve_topology=True)``, upstream's eval ``VectorizeMap``).

    Args:
        points (np.ndarray): ``[k, 2]`` (or ``[k, 3]``: the height is dropped, as upstream's
            ``coords_dim=2``; GEOS simplifies in the plane either way) vertices, k >= 2.
        tolerance (float, optional): Tolerance in metres; None or 0 returns the vertices
            unchanged. Defaults to 0.2.

    Returns:
        np.ndarray: ``[k', 2]`` float64 vertices, k' >= 2, end points kept.

    Examples:
        >>> simplify_polyline(np.array([[0., 0.], [5., 0.1], [10., 0.]])).tolist()
        [[0.0, 0.0], [10.0, 0.0]]
    """
    import shapely

    points = np.asarray(points, np.float64)[:, :2]
    if not tolerance:
        return points
    line = shapely.simplify(shapely.linestrings(points), tolerance, preserve_topology=True)
    return shapely.get_coordinates(line)


def resample_polylines(lines: Sequence[np.ndarray],
                       num: int = NUM_SAMPLE_POINTS) -> np.ndarray:
    """``[L, num, 2]`` float64: each polyline at ``num`` points evenly spaced by length
    (``[0, num, 2]`` for none)."""
    if len(lines) == 0:
        return np.zeros((0, num, 2))
    return np.stack([resample_by_length(line, num) for line in lines])


def chamfer_lower_bound(preds: np.ndarray, gts: np.ndarray) -> np.ndarray:
    """A lower bound of :func:`chamfer_distance_matrix`, cheap: each point's distance to the
    other polyline's bounding box instead of to its nearest point.

    Args:
        preds (np.ndarray): ``[M, n, 2]`` resampled predictions.
        gts (np.ndarray): ``[N, n, 2]`` resampled ground truth.

    Returns:
        np.ndarray: ``[M, N]`` float64, at most the Chamfer distance of each pair.
    """
    def mean_to_boxes(points, others):  # [A, n, 2], [B, n, 2] -> [A, B]
        low, high = others.min(1), others.max(1)  # [B, 2]
        gap = np.maximum(low[None, None] - points[:, :, None],
                         points[:, :, None] - high[None, None]).clip(min=0)  # [A, n, B, 2]
        return np.sqrt(np.sum(gap ** 2, axis=-1)).mean(1)

    return (mean_to_boxes(preds, gts) + mean_to_boxes(gts, preds).T) / 2


def _squared_distances(preds: torch.Tensor, gts: torch.Tensor, use_mm: bool) -> torch.Tensor:
    """``[B, n, n]`` squared point distances of ``B`` pairs, as ``torch.cdist`` computes them
    before its square root: with ``use_mm``, its matrix-product formula (ATen's
    ``_euclidean_dist``: ``[-2 p, |p|^2, 1] @ [g, 1, |g|^2]^T``, unclamped), else the
    coordinate differences."""
    if not use_mm:
        return (preds[:, :, None] - gts[:, None]).pow(2).sum(-1)
    pred_norm, gt_norm = preds.pow(2).sum(-1, keepdim=True), gts.pow(2).sum(-1, keepdim=True)
    left = torch.cat([preds.mul(-2), pred_norm, torch.ones_like(pred_norm)], -1)
    right = torch.cat([gts, torch.ones_like(gt_norm), gt_norm], -1)
    return left.matmul(right.mT)


def chamfer_distance_matrix(preds: np.ndarray, gts: np.ndarray,
                            max_distance: Optional[float] = None,
                            device: str = 'cpu') -> np.ndarray:
    """Chamfer distance of every prediction and ground-truth pair (upstream's
    ``chamfer_distance_batch``): ``(sum_a min_b d(p_a, g_b) + sum_b min_a d(p_a, g_b)) /
    (2 n)`` in float64, with the point distances of ``torch.cdist``.

    ``torch.cdist`` computes through a matrix product when either side has more than 25
    points in all (always, with 200 points), as in upstream's one call over all pairs; this
    function takes the same formula for the same sizes, but batched over pairs and with the
    minima taken on squared distances before the clamp at 0 and the square root (both
    monotone, so the values are those of cdist; the test checks against it). Without the
    8 n^2 square roots a pair, and with numpy's minima on the CPU, it is several times faster.

    Args:
        preds (np.ndarray): ``[M, n, 2]`` resampled predictions.
        gts (np.ndarray): ``[N, n, 2]`` resampled ground truth (same ``n``).
        max_distance (float, optional): Skip the pairs whose :func:`chamfer_lower_bound`
            exceeds it by more than 1 mm; they read ``inf``. Matching at thresholds up to
            ``max_distance`` is unchanged: a skipped pair is farther than every threshold,
            so it is never a row's nearest where the nearest lies within one. None computes
            every pair. Defaults to None.
        device (str): Where to compute the squared distances (``'cuda'`` is much faster than
            the CPU). Defaults to 'cpu'.

    Returns:
        np.ndarray: ``[M, N]`` float64 (``inf`` for skipped pairs).

    Raises:
        ValueError: If the shapes are not ``[M, n, 2]`` and ``[N, n, 2]``.
    """
    preds, gts = np.asarray(preds, np.float64), np.asarray(gts, np.float64)
    if preds.ndim != 3 or gts.ndim != 3 or preds.shape[1:] != gts.shape[1:] \
            or preds.shape[-1] != 2:
        raise ValueError('chamfer_distance_matrix: preds and gts must be [M, n, 2] and '
                         f'[N, n, 2]; got {preds.shape} and {gts.shape}')
    num_preds, num_points, _ = preds.shape
    out = np.full((num_preds, len(gts)), np.inf)
    if num_preds == 0 or len(gts) == 0:
        return out
    if max_distance is None:
        pred_index, gt_index = np.nonzero(np.ones(out.shape, bool))
    else:
        keep = chamfer_lower_bound(preds, gts) <= max_distance + PRUNE_MARGIN
        pred_index, gt_index = np.nonzero(keep)
    use_mm = max(num_preds, len(gts)) * num_points > 25  # cdist's rule, on upstream's sizes
    pred_t = torch.from_numpy(preds).to(device)
    gt_t = torch.from_numpy(gts).to(device)
    for start in range(0, len(pred_index), PAIRS_PER_CHUNK):
        p = pred_index[start:start + PAIRS_PER_CHUNK]
        g = gt_index[start:start + PAIRS_PER_CHUNK]
        squared = _squared_distances(pred_t[torch.from_numpy(p).to(device)],
                                     gt_t[torch.from_numpy(g).to(device)], use_mm)
        if squared.is_cuda:
            to_gt, to_pred = squared.amin(2).cpu().numpy(), squared.amin(1).cpu().numpy()
        else:  # numpy's minima are several times faster than torch's on the CPU
            squared = squared.numpy()
            to_gt, to_pred = squared.min(2), squared.min(1)
        to_gt, to_pred = np.sqrt(to_gt.clip(min=0)), np.sqrt(to_pred.clip(min=0))
        out[p, g] = (to_gt.sum(1) + to_pred.sum(1)) / (2 * num_points)
    return out


def match_nearest(distances: np.ndarray, scores: np.ndarray,
                  thresholds: Sequence[float] = THRESHOLDS) -> np.ndarray:
    """Upstream's ``instance_match``: by descending score, each prediction claims its nearest
    ground truth; a true positive if within the threshold and not claimed before.

    Args:
        distances (np.ndarray): ``[M, N]`` from :func:`chamfer_distance_matrix`.
        scores (np.ndarray): ``[M]`` confidences.
        thresholds (Sequence[float]): Distance thresholds (m). Defaults to (0.5, 1.0, 1.5).

    Returns:
        np.ndarray: ``[T, M]`` bool, True for a true positive (every other prediction is a
        false positive), in the predictions' order.

    Examples:
        >>> # both predictions' nearest is ground truth 0: the second gets nothing, though
        >>> # ground truth 1 is within 1 m of it
        >>> match_nearest(np.array([[0.1, 3.], [0.2, 0.9]]), np.array([.9, .8]), [1.]).tolist()
        [[True, False]]
    """
    distances = np.asarray(distances, np.float64)
    num_preds, num_gts = distances.shape
    tp = np.zeros((len(thresholds), num_preds), bool)
    if num_preds == 0 or num_gts == 0:
        return tp
    nearest = distances.argmin(axis=1)
    nearest_distance = distances[np.arange(num_preds), nearest]
    order = np.argsort(-np.asarray(scores, np.float64).reshape(-1))
    for row, threshold in enumerate(thresholds):
        within = order[nearest_distance[order] <= threshold]  # in claiming order
        _, first = np.unique(nearest[within], return_index=True)  # first claim of each GT
        tp[row, within[first]] = True
    return tp


def average_precision(recalls: np.ndarray, precisions: np.ndarray) -> float:
    """VOC "area" AP: the area under the precision envelope over recall, float64 (upstream's
    ``average_precision(..., 'area')``).

    Examples:
        >>> average_precision(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3]))
        0.8333333333333333
    """
    recalls = np.asarray(recalls, np.float64).reshape(-1)
    precisions = np.asarray(precisions, np.float64).reshape(-1)
    mrec = np.concatenate([[0.0], recalls, [1.0]])
    mpre = np.concatenate([[0.0], precisions, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def class_average_precision(scores: Sequence[np.ndarray], true_positives: Sequence[np.ndarray],
                            num_gts: int, num_thresholds: int = len(THRESHOLDS)) -> np.ndarray:
    """AP of one class over a dataset, at every threshold.

    Args:
        scores (Sequence[np.ndarray]): Per sample, the ``[M_s]`` prediction confidences.
        true_positives (Sequence[np.ndarray]): Per sample, ``[T, M_s]`` bool from
            :func:`match_nearest`.
        num_gts (int): Ground-truth instances of the class over the dataset.
        num_thresholds (int): T, for a dataset without samples. Defaults to 3.

    Returns:
        np.ndarray: ``[T]`` float64 APs.
    """
    if len(scores) == 0:
        return np.zeros(num_thresholds)
    confidence = np.concatenate([np.asarray(s, np.float64).reshape(-1) for s in scores])
    tp = np.concatenate([np.asarray(t, bool) for t in true_positives], axis=1)
    order = np.argsort(-confidence)
    tp_sum = np.cumsum(tp[:, order], axis=1, dtype=np.float64)
    fp_sum = np.cumsum(~tp[:, order], axis=1, dtype=np.float64)
    eps = np.finfo(np.float32).eps
    recalls = tp_sum / max(num_gts, eps)
    precisions = tp_sum / np.maximum(tp_sum + fp_sum, eps)
    return np.array([average_precision(r, p) for r, p in zip(recalls, precisions)])
