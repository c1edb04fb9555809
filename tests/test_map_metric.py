"""turbox_mm.MapChamferMetric: MapTR's Chamfer-distance map AP.

Hand-made cases (a perfect prediction, shifted ones crossing the 0.5 / 1.0 / 1.5 m thresholds,
duplicates, empty predictions and ground truth, short predictions) and random cases against a
straightforward reimplementation of upstream's procedure, written here with loops, shapely's
``interpolate``, one buffer test per pair and scipy's ``cdist``.
"""
import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from shapely.geometry import LineString

from turbox_mm.evaluation import MapChamferMetric
from turbox_mm.evaluation.map_chamfer import (average_precision, chamfer_score_matrix,
                                              resample_by_length)

CLASSES = ('divider', 'ped_crossing', 'boundary')


def sample(gt_lines, gt_labels, pred_lines, pred_scores, pred_labels, tensors=True):
    """A data sample as mmengine's evaluator hands it over (``to_dict`` of a data sample)."""
    pts = np.zeros((len(pred_lines), 20, 2)) if len(pred_lines) == 0 else np.stack(
        [resample_by_length(p, 20) for p in pred_lines])
    convert = torch.as_tensor if tensors else np.asarray
    return dict(pred_instances_3d=dict(pts_3d=convert(pts), scores_3d=convert(pred_scores),
                                       labels_3d=convert(np.asarray(pred_labels, np.int64))),
                eval_ann_info=dict(gt_map_polylines=[np.asarray(g, float) for g in gt_lines],
                                   gt_map_labels=np.asarray(gt_labels, np.int64)))


def evaluate(samples, **kwargs):
    metric = MapChamferMetric(**kwargs)
    metric.process({}, samples)
    return metric.compute_metrics(metric.results)


LINE = np.array([[0.0, -10.0], [0.0, 10.0]])
RING = np.array([[3.0, 3.0], [3.0, 7.0], [8.0, 7.0], [8.0, 3.0], [3.0, 3.0]])
KERB = np.array([[-9.0, -30.0], [-9.5, 0.0], [-9.0, 30.0]])


def test_perfect_prediction_scores_one():
    gts = [LINE, LINE + [3.5, 0], RING, KERB]
    labels = [0, 0, 1, 2]
    result = evaluate([sample(gts, labels, gts, [0.9, 0.8, 0.7, 0.6], labels)])
    assert result['mAP'] == 1.0
    for name in CLASSES:
        assert result[f'{name}_AP'] == 1.0
        for t in (0.5, 1.0, 1.5):
            assert result[f'{name}_AP_thr_{t}'] == 1.0
    # predictions listed backwards, and numpy inputs, change nothing
    assert evaluate([sample(gts, labels, gts[::-1], [0.6, 0.7, 0.8, 0.9], labels[::-1],
                            tensors=False)]) == result


@pytest.mark.parametrize('shift, passes', [(0.4, (1, 1, 1)), (0.7, (0, 1, 1)),
                                           (1.2, (0, 0, 1)), (3.0, (0, 0, 0)),
                                           (6.0, (0, 0, 0))])
def test_a_shifted_prediction_crosses_the_thresholds(shift, passes):
    """A straight divider moved sideways by d is d away (Chamfer); beyond 4 m the 2 m buffers
    part and the pair scores -100."""
    result = evaluate([sample([LINE], [0], [LINE + [shift, 0]], [0.5], [0])])
    assert [result[f'divider_AP_thr_{t}'] for t in (0.5, 1.0, 1.5)] == list(passes)
    assert result['divider_AP'] == pytest.approx(np.mean(passes))
    assert result['mAP'] == pytest.approx(np.mean(passes) / 3)  # the other classes: no GT
    assert chamfer_score_matrix(resample_by_length(LINE + [shift, 0])[None],
                                resample_by_length(LINE)[None])[0, 0] == pytest.approx(
                                    -shift if shift < 4 else -100)


def test_greedy_matching_and_duplicates():
    # predictions 0.8 m off (score 0.9) and exact (0.3). At 1.0 m the higher-scored one takes
    # the ground truth and the exact one is a false positive (no second choice): recall 1 at
    # precision 1. At 0.5 m the first misses without taking it, the second matches: recall 1
    # at precision 1/2.
    result = evaluate([sample([LINE], [0], [LINE + [0.8, 0], LINE], [0.9, 0.3], [0, 0])])
    assert result['divider_AP_thr_1.0'] == 1.0
    assert result['divider_AP_thr_0.5'] == 0.5
    # with a second, unmatched ground truth, recall stops at 1/2
    result = evaluate([sample([LINE, LINE + [10, 0]], [0, 0], [LINE + [0.8, 0], LINE],
                              [0.9, 0.3], [0, 0])])
    assert result['divider_AP_thr_1.0'] == 0.5
    assert result['divider_AP_thr_0.5'] == 0.25


def test_empty_predictions_and_ground_truth():
    nothing = evaluate([sample([], [], [], [], [])])
    assert nothing['mAP'] == 0.0 and all(v == 0.0 for v in nothing.values())
    # predictions without ground truth: all false positives
    assert evaluate([sample([], [], [LINE], [0.9], [0])])['divider_AP'] == 0.0
    # ground truth without predictions: recall 0
    assert evaluate([sample([LINE], [0], [], [], [])])['divider_AP'] == 0.0
    # a sample without anything next to a perfect one leaves AP at 1
    both = evaluate([sample([LINE], [0], [LINE], [0.9], [0]), sample([], [], [], [], [])])
    assert both['divider_AP'] == 1.0


def test_predictions_of_fewer_than_two_points_are_skipped():
    one_point = dict(pts_3d=np.zeros((1, 1, 2)), scores_3d=np.array([0.9]),
                     labels_3d=np.array([0]))
    data = dict(pred_instances_3d=one_point,
                eval_ann_info=dict(gt_map_polylines=[LINE], gt_map_labels=np.array([0])))
    metric = MapChamferMetric()
    metric.process({}, [data])
    assert metric.results[0]['divider'][0].shape == (0, 1)
    assert metric.compute_metrics(metric.results)['divider_AP'] == 0.0


def test_missing_keys_are_named():
    metric = MapChamferMetric()
    with pytest.raises(KeyError, match='pred_instances_3d'):
        metric.process({}, [dict(eval_ann_info={})])
    good = sample([LINE], [0], [LINE], [0.9], [0])
    with pytest.raises(KeyError, match='LoadMapGT'):
        metric.process({}, [dict(good, eval_ann_info=None)])


def test_evaluator_with_data_samples():
    """Through mmengine's Evaluator, with mmdet3d data samples (to_dict, prefix)."""
    from mmdet3d.structures import Det3DDataSample
    from mmengine.evaluator import Evaluator
    from mmengine.structures import InstanceData

    data_samples = []
    for offset in (0.0, 0.7):
        ds = Det3DDataSample()
        ds.pred_instances_3d = InstanceData(
            pts_3d=torch.tensor(resample_by_length(LINE + [offset, 0], 20)[None]),
            scores_3d=torch.tensor([0.5]), labels_3d=torch.tensor([0]))
        ds.eval_ann_info = dict(gt_map_polylines=[LINE], gt_map_labels=np.array([0]))
        data_samples.append(ds)
    evaluator = Evaluator(dict(type='turbox_mm.MapChamferMetric'))
    evaluator.process(data_samples)
    result = evaluator.evaluate(2)
    assert result['NuscMap_chamfer/divider_AP_thr_0.5'] == 0.5
    assert result['NuscMap_chamfer/divider_AP_thr_1.0'] == 1.0
    assert result['NuscMap_chamfer/mAP'] == pytest.approx((0.5 + 1 + 1) / 9)


# --- a straightforward reimplementation ------------------------------------------------------
def plain_resample(points, num=100):
    line = LineString(points)
    return np.array([line.interpolate(d).coords[0] for d in np.linspace(0, line.length, num)])


def plain_score(pred, gt):
    a = LineString(pred).buffer(2.0, cap_style=2, join_style=2)  # flat caps, mitre joins
    b = LineString(gt).buffer(2.0, cap_style=2, join_style=2)
    if not a.intersects(b):
        return -100.0
    dist = cdist(pred, gt, 'euclidean')
    return -(dist.min(1).mean() + dist.min(0).mean()) / 2


def plain_ap(tp, fp, num_gts):
    """VOC area AP with upstream's dtypes: float32 TP/FP counts, a float32 result."""
    tp, fp = np.cumsum(np.float32(tp)), np.cumsum(np.float32(fp))
    eps = np.finfo(np.float32).eps
    recall = tp / max(num_gts, eps)
    precision = tp / np.maximum(tp + fp, eps)
    ap, previous = 0.0, 0.0
    for i in range(len(recall)):
        if recall[i] != previous:
            ap += (recall[i] - previous) * max(precision[i:])
            previous = recall[i]
    return np.float32(ap)


def plain_map(samples, thresholds=(0.5, 1.0, 1.5)):
    aps = np.zeros((len(thresholds), len(CLASSES)))
    for i, t in enumerate(thresholds):
        for label in range(len(CLASSES)):
            scores_all, tp_all, fp_all, num_gts = [], [], [], 0
            for gts, gt_labels, preds, scores, labels in samples:
                truth = [plain_resample(g) for g, lab in zip(gts, gt_labels) if lab == label]
                mine = [(plain_resample(p), s) for p, s, lab in zip(preds, scores, labels)
                        if lab == label]
                num_gts += len(truth)
                taken = [False] * len(truth)
                tp, fp = [0.0] * len(mine), [0.0] * len(mine)
                for k in np.argsort([-s for _, s in mine]):
                    row = [plain_score(mine[k][0], g) for g in truth]
                    if row and max(row) >= -t and not taken[int(np.argmax(row))]:
                        taken[int(np.argmax(row))] = True
                        tp[k] = 1.0
                    else:
                        fp[k] = 1.0
                scores_all += [s for _, s in mine]
                tp_all += tp
                fp_all += fp
            order = np.argsort(-np.array(scores_all, float))
            aps[i, label] = plain_ap(np.array(tp_all)[order], np.array(fp_all)[order], num_gts)
    return aps


def random_polyline(rng):
    start = rng.uniform([-14, -29], [14, 29])
    steps = rng.normal(0, 4, (int(rng.integers(1, 5)), 2))
    return np.clip(start + np.concatenate([[[0, 0]], np.cumsum(steps, 0)]), [-15, -30],
                   [15, 30])


def test_against_a_straightforward_reimplementation():
    rng = np.random.default_rng(0)
    cases = []
    for _ in range(12):
        gts = [random_polyline(rng) for _ in range(int(rng.integers(0, 6)))]
        gt_labels = rng.integers(0, 3, len(gts)).tolist()
        preds, labels = [], []
        for g, lab in zip(gts, gt_labels):  # noisy copies, sometimes twice
            for _ in range(int(rng.integers(0, 3))):
                preds.append(g + rng.normal(0, rng.choice([0.1, 0.5, 1.0]), g.shape))
                labels.append(lab if rng.random() < 0.8 else int(rng.integers(0, 3)))
        for _ in range(int(rng.integers(0, 4))):  # and clutter
            preds.append(random_polyline(rng))
            labels.append(int(rng.integers(0, 3)))
        scores = np.round(rng.uniform(0, 1, len(preds)), 2)  # rounded: some ties
        preds20 = [resample_by_length(p, 20) for p in preds]
        cases.append((gts, gt_labels, preds20, scores, labels))
    result = evaluate([sample(g, gl, p, s, lab, tensors=False) for g, gl, p, s, lab in cases])
    expected = plain_map(cases)
    for j, name in enumerate(CLASSES):
        for i, t in enumerate((0.5, 1.0, 1.5)):
            assert result[f'{name}_AP_thr_{t}'] == pytest.approx(expected[i, j], abs=1e-9)
    assert result['mAP'] == pytest.approx(expected.mean(), abs=1e-9)
    assert 0.2 < result['mAP'] < 0.95  # neither trivial nor perfect


def test_average_precision_by_hand():
    # recall 0.5 at precision 1, then recall 1 at precision 2/3: area 0.5 * 1 + 0.5 * 2/3
    assert average_precision(np.array([0.5, 0.5, 1.0]),
                             np.array([1.0, 0.5, 2 / 3])) == pytest.approx(0.5 + 1 / 3)
    assert average_precision(np.zeros(0), np.zeros(0)) == 0.0
