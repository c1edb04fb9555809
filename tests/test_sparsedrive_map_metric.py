"""turbox_mm.SparseDriveMapMetric: SparseDrive's (StreamMapNet's) Chamfer-distance map AP.

Hand-made cases with known APs (perfect predictions, a prediction shifted across the 0.5 /
1.0 / 1.5 m thresholds, duplicates, the nearest-or-nothing matching rule, classes without
ground truth, empty predictions, the ground-truth simplification), the Chamfer matrix against
a brute-force loop and against upstream's one-call ``torch.cdist`` formulation, and random
cases against a straightforward reimplementation of upstream's procedure (shapely's
``simplify`` and ``interpolate`` per point, one ``scipy`` cdist per pair, loops). Last, the
claim of docs/design/sparsedrive.md section 11 item 6 about MapTR's buffer test.
"""
import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from shapely.geometry import LineString

from turbox_mm.evaluation.map_chamfer import chamfer_score_matrix, resample_by_length
from turbox_mm.evaluation.sparsedrive_map_metric import SparseDriveMapMetric
from turbox_mm.evaluation.vector_map_ap import (average_precision, chamfer_distance_matrix,
                                                chamfer_lower_bound, match_nearest,
                                                resample_polylines, simplify_polyline)

CLASSES = ('ped_crossing', 'divider', 'boundary')
THRESHOLDS = (0.5, 1.0, 1.5)
PED, DIV, BND = 0, 1, 2


def sample(gt_lines, gt_labels, pred_lines, pred_scores, pred_labels, tensors=True, **meta):
    """A data sample as mmengine's evaluator hands it over (``to_dict`` of a data sample);
    predictions as 20 points, as SparseDrive's decoder gives them."""
    pts = np.zeros((0, 20, 2)) if len(pred_lines) == 0 else np.stack(
        [resample_by_length(p, 20) for p in pred_lines])
    convert = torch.as_tensor if tensors else np.asarray
    return dict(pred_map_instances=dict(pts=convert(pts),
                                        scores=convert(np.asarray(pred_scores, np.float32)),
                                        labels=convert(np.asarray(pred_labels, np.int64))),
                eval_ann_info=dict(gt_map_polylines=[np.asarray(g, float) for g in gt_lines],
                                   gt_map_labels=np.asarray(gt_labels, np.int64)), **meta)


def evaluate(samples, **kwargs):
    metric = SparseDriveMapMetric(**kwargs)
    metric.process({}, samples)
    return metric.compute_metrics(metric.results)


def per_threshold(result, name):
    return [result[f'{name}_AP@{t}'] for t in THRESHOLDS]


LINE = np.array([[0.0, -10.0], [0.0, 10.0]])
RING = np.array([[3.0, 3.0], [3.0, 7.0], [8.0, 7.0], [8.0, 3.0], [3.0, 3.0]])
KERB = np.array([[-9.0, -30.0], [-9.5, 0.0], [-9.0, 30.0]])


# --- hand-made cases ---------------------------------------------------------------------------
def test_perfect_predictions_score_one_and_keys_are_upstreams():
    gts = [LINE, LINE + [3.5, 0], RING, KERB]
    labels = [DIV, DIV, PED, BND]
    result = evaluate([sample(gts, labels, gts, [0.9, 0.8, 0.7, 0.6], labels)])
    assert sorted(result) == sorted(list(CLASSES) + ['mAP_normal'] + [
        f'{c}_AP@{t}' for c in CLASSES for t in THRESHOLDS])
    assert result['mAP_normal'] == 1.0
    for name in CLASSES:
        assert result[name] == 1.0 and per_threshold(result, name) == [1.0, 1.0, 1.0]
    # predictions listed backwards, and numpy inputs, change nothing
    assert evaluate([sample(gts, labels, gts[::-1], [0.6, 0.7, 0.8, 0.9], labels[::-1],
                            tensors=False)]) == result


@pytest.mark.parametrize('shift, passes', [(0.4, (1, 1, 1)), (0.7, (0, 1, 1)),
                                           (1.2, (0, 0, 1)), (3.0, (0, 0, 0)),
                                           (6.0, (0, 0, 0))])
def test_a_shifted_prediction_crosses_the_thresholds(shift, passes):
    """A straight divider moved sideways by d is d away (Chamfer)."""
    result = evaluate([sample([LINE], [DIV], [LINE + [shift, 0]], [0.5], [DIV])])
    assert per_threshold(result, 'divider') == list(passes)
    assert result['divider'] == pytest.approx(np.mean(passes))
    assert result['mAP_normal'] == pytest.approx(np.mean(passes) / 3)  # no GT elsewhere: 0
    distance = chamfer_distance_matrix(resample_polylines([LINE + [shift, 0]]),
                                       resample_polylines([LINE]))
    assert distance[0, 0] == pytest.approx(shift, abs=1e-6)


def test_duplicates_are_false_positives():
    # two exact copies: the second is a false positive, ranked below the true one: AP 1
    assert evaluate([sample([LINE], [DIV], [LINE, LINE], [0.9, 0.8], [DIV, DIV])])[
        'divider'] == 1.0
    # ranked above it, the false positive halves the precision at recall 1
    result = evaluate([sample([LINE], [DIV], [LINE + [0.3, 0], LINE], [0.9, 0.8],
                              [DIV, DIV])])
    assert per_threshold(result, 'divider') == [1.0, 1.0, 1.0]  # the first takes it
    # with a second ground truth far away, recall stops at 1/2
    result = evaluate([sample([LINE, LINE + [10, 0]], [DIV, DIV], [LINE, LINE], [0.9, 0.8],
                              [DIV, DIV])])
    assert per_threshold(result, 'divider') == [0.5, 0.5, 0.5]


def test_a_prediction_whose_nearest_is_taken_gets_no_second_choice():
    """Upstream's rule: each prediction looks only at its nearest ground truth. B (0.7 m from
    GT0, 0.9 m from GT1) loses GT0 to A and stays a false positive at 1.0 and 1.5 m although
    GT1 is free and within the threshold (a Hungarian or second-choice matching would give
    AP 1 there)."""
    gts = [LINE, LINE + [1.6, 0]]
    preds = [LINE + [0.3, 0], LINE + [0.7, 0]]
    result = evaluate([sample(gts, [DIV, DIV], preds, [0.9, 0.8], [DIV, DIV])])
    assert per_threshold(result, 'divider') == [0.5, 0.5, 0.5]
    distances = chamfer_distance_matrix(resample_polylines(preds), resample_polylines(gts))
    np.testing.assert_allclose(distances, [[0.3, 1.3], [0.7, 0.9]], atol=1e-6)
    assert match_nearest(distances, np.array([0.9, 0.8])).tolist() == [[True, False]] * 3


def test_a_prediction_beyond_the_threshold_claims_nothing():
    # A (0.9) is 0.7 m off: at 0.5 m it does not take the ground truth, B (exact) does
    result = evaluate([sample([LINE], [DIV], [LINE + [0.7, 0], LINE], [0.9, 0.3],
                              [DIV, DIV])])
    assert per_threshold(result, 'divider') == [0.5, 1.0, 1.0]


def test_collinear_neighbours_match_without_a_buffer_test():
    """A 1 m divider continued 0.1 m past the end of another is 0.6 m away: a match at 1.0 m
    here, while MapTR's flat-capped buffers do not meet (score -100)."""
    gt, pred = np.array([[0.0, 0.0], [1.0, 0.0]]), np.array([[1.1, 0.0], [2.1, 0.0]])
    result = evaluate([sample([gt], [DIV], [pred], [0.5], [DIV])])
    assert per_threshold(result, 'divider') == [0.0, 1.0, 1.0]
    assert chamfer_score_matrix(resample_by_length(pred)[None],
                                resample_by_length(gt)[None])[0, 0] == -100


def test_classes_without_ground_truth_and_empty_predictions():
    nothing = evaluate([sample([], [], [], [], [])])
    assert all(v == 0.0 for v in nothing.values())
    # predictions without ground truth: all false positives; the class counts 0 in the mean
    only_fp = evaluate([sample([LINE], [DIV], [LINE, RING], [0.9, 0.8], [DIV, PED])])
    assert only_fp['divider'] == 1.0 and only_fp['ped_crossing'] == 0.0
    assert only_fp['mAP_normal'] == pytest.approx(1 / 3)
    # ground truth without predictions: recall 0
    assert evaluate([sample([LINE], [DIV], [], [], [])])['divider'] == 0.0
    # a sample without anything next to a perfect one leaves AP at 1
    both = evaluate([sample([LINE], [DIV], [LINE], [0.9], [DIV]), sample([], [], [], [], [])])
    assert both['divider'] == 1.0
    # no samples at all
    metric = SparseDriveMapMetric()
    assert all(v == 0.0 for v in metric.compute_metrics([]).values())


def test_predictions_of_fewer_than_two_points_are_dropped():
    one_point = dict(pts=np.zeros((2, 1, 2)), scores=np.array([0.9, 0.8]),
                     labels=np.array([DIV, DIV]))
    data = dict(pred_map_instances=one_point,
                eval_ann_info=dict(gt_map_polylines=[LINE], gt_map_labels=np.array([DIV])))
    metric = SparseDriveMapMetric()
    metric.process({}, [data])
    scores, tp, num_gts = metric.results[0]['divider']
    assert scores.shape == (0,) and tp.shape == (3, 0) and num_gts == 1
    # polylines of their own lengths: the one-point one is dropped, the other counts
    ragged = dict(pts=[np.zeros((1, 2)), resample_by_length(LINE, 7)],
                  scores=np.array([0.9, 0.8]), labels=np.array([DIV, DIV]))
    result = evaluate([dict(data, pred_map_instances=ragged)])
    assert result['divider'] == 1.0


def test_ground_truth_is_simplified():
    """A 0.15 m kink in the ground truth vanishes with the 0.2 m simplification; kept, it puts
    a straight prediction about 0.07 m away."""
    kinked = np.array([[0.0, -10.0], [0.15, 0.0], [0.0, 10.0]])
    np.testing.assert_array_equal(simplify_polyline(kinked), LINE)
    np.testing.assert_array_equal(simplify_polyline(kinked, None), kinked)
    data = [sample([kinked], [DIV], [LINE], [0.9], [DIV])]
    assert evaluate(data, thresholds=(0.01,))['divider'] == 1.0
    assert evaluate(data, thresholds=(0.01,), simplify_tolerance=None)['divider'] == 0.0
    # topology kept: a small closed ring is not collapsed (plain Douglas-Peucker would)
    ring = np.array([[0, 0], [0.15, 0], [0.15, 0.15], [0, 0.15], [0, 0]], float)
    np.testing.assert_array_equal(simplify_polyline(ring), ring)
    assert len(LineString(ring).simplify(0.2, preserve_topology=False).coords) < 5


def test_resampling_to_200_points_by_length():
    assert SparseDriveMapMetric().num_sample_points == 200
    lines = resample_polylines([KERB, np.array([[0.0, 0.0], [0.0, 0.0]])])
    assert lines.shape == (2, 200, 2)
    steps = np.linalg.norm(np.diff(lines[0], axis=0), axis=1)
    length = LineString(KERB).length
    np.testing.assert_allclose(steps, length / 199, rtol=1e-3)  # even, but for the corner
    ref = [LineString(KERB).interpolate(d).coords[0] for d in np.linspace(0, length, 200)]
    np.testing.assert_allclose(lines[0], ref, atol=1e-12)  # upstream's interp_fixed_num
    assert (lines[1] == 0).all()
    # the option is honoured: 2 points put a 10 m line 5 m from a 20 m one, 200 about 1.25 m
    short, long = np.array([[0.0, 0.0], [10.0, 0.0]]), np.array([[0.0, 0.0], [20.0, 0.0]])
    data = [sample([long], [DIV], [short], [0.9], [DIV])]
    assert per_threshold(evaluate(data), 'divider') == [0.0, 0.0, 1.0]
    assert per_threshold(evaluate(data, num_sample_points=2), 'divider') == [0.0, 0.0, 0.0]


def test_average_precision_by_hand():
    # recall 0.5 at precision 1, then recall 1 at precision 2/3: area 0.5 * 1 + 0.5 * 2/3
    assert average_precision(np.array([0.5, 0.5, 1.0]),
                             np.array([1.0, 0.5, 2 / 3])) == pytest.approx(0.5 + 1 / 3)
    assert average_precision(np.zeros(0), np.zeros(0)) == 0.0


def test_bad_input_is_named():
    metric = SparseDriveMapMetric()
    good = sample([LINE], [DIV], [LINE], [0.9], [DIV], sample_idx=7)
    with pytest.raises(KeyError, match=r'sample 0 of the batch \(sample_idx=7\) has no '
                                       'pred_map_instances'):
        metric.process({}, [dict(eval_ann_info={}, sample_idx=7)])
    with pytest.raises(KeyError, match="sample_idx=7.*'scores'"):
        no_scores = dict(pts=np.zeros((0, 20, 2)), labels=np.zeros(0))
        metric.process({}, [dict(good, pred_map_instances=no_scores)])
    with pytest.raises(KeyError, match='data sample 1 of the batch.*eval_ann_info'):
        metric.process({}, [good, dict(good, eval_ann_info=None)])
    with pytest.raises(KeyError, match="'gt_map_labels'"):
        metric.process({}, [dict(good, eval_ann_info=dict(gt_map_polylines=[LINE]))])
    with pytest.raises(ValueError, match=r'labels must lie in \[0, 3\)'):
        metric.process({}, [sample([LINE], [3], [], [], [])])
    with pytest.raises(ValueError, match=r'gt_map_polylines\[0\]'):
        metric.process({}, [sample([LINE[:1]], [DIV], [], [], [])])
    with pytest.raises(ValueError, match='1 pts, 2 scores'):
        metric.process({}, [dict(good, pred_map_instances=dict(
            pts=np.zeros((1, 20, 2)), scores=np.zeros(2), labels=np.zeros(1)))])
    assert metric.results == []


def test_evaluator_with_data_samples():
    """Through mmengine's Evaluator and registry, with mmdet3d data samples."""
    from mmdet3d.structures import Det3DDataSample
    from mmengine.evaluator import Evaluator
    from mmengine.structures import InstanceData

    data_samples = []
    for offset in (0.0, 0.7):
        ds = Det3DDataSample(metainfo=dict(sample_idx=int(offset * 10)))
        ds.pred_map_instances = InstanceData(
            pts=torch.tensor(resample_by_length(LINE + [offset, 0], 20)[None]),
            scores=torch.tensor([0.5]), labels=torch.tensor([DIV]))
        ds.eval_ann_info = dict(gt_map_polylines=[LINE], gt_map_labels=np.array([DIV]))
        data_samples.append(ds)
    evaluator = Evaluator(dict(type='turbox_mm.SparseDriveMapMetric'))
    evaluator.process(data_samples)
    result = evaluator.evaluate(2)
    assert result['SparseDriveMap/divider_AP@0.5'] == 0.5
    assert result['SparseDriveMap/divider_AP@1.0'] == 1.0
    assert result['SparseDriveMap/divider'] == pytest.approx(2.5 / 3)
    assert result['SparseDriveMap/mAP_normal'] == pytest.approx(2.5 / 9)


# --- the Chamfer matrix ------------------------------------------------------------------------
def brute_force_chamfer(preds, gts):
    out = np.zeros((len(preds), len(gts)))
    for i, p in enumerate(preds):
        for j, g in enumerate(gts):
            to_gt = [min(np.hypot(*(a - b)) for b in g) for a in p]
            to_pred = [min(np.hypot(*(a - b)) for a in p) for b in g]
            out[i, j] = (sum(to_gt) + sum(to_pred)) / (2 * len(p))
    return out


def upstream_style_chamfer(preds, gts):
    """Upstream's formulation: one torch.cdist over all points, then split per pair."""
    n = preds.shape[1]
    dist = torch.cdist(torch.tensor(preds).view(-1, 2), torch.tensor(gts).view(-1, 2))
    dist = dist.view(len(preds), n, len(gts), n).permute(0, 2, 1, 3)  # [M, N, n, n]
    return ((dist.amin(3).sum(2) + dist.amin(2).sum(2)) / (2 * n)).numpy()


def random_lines(rng, count, n):
    starts = rng.uniform(-10, 10, (count, 1, 2))
    return resample_polylines(list(starts + np.cumsum(rng.normal(0, 2, (count, 4, 2)), 1)), n)


@pytest.mark.parametrize('n', [5, 30])  # 5: below cdist's matrix-product size, 30: above
def test_chamfer_matrix_equals_a_brute_force_loop(n):
    rng = np.random.default_rng(n)
    preds, gts = random_lines(rng, 4, n), random_lines(rng, 3, n)
    if n == 30:
        preds[0] = gts[1]  # coincident points: the matrix-product formula's worst case
    ours, brute = chamfer_distance_matrix(preds, gts), brute_force_chamfer(preds, gts)
    np.testing.assert_allclose(ours, brute, rtol=1e-10, atol=1e-6)
    # Upstream's formula to the last bits, except at coincident lines: there both are the
    # square roots of rounding noise (about 1e-9 here), whose value depends on the order of
    # the matrix product's sums (the BLAS build and threads), not on the code
    upstream = upstream_style_chamfer(preds, gts)
    apart = brute > 1e-3
    np.testing.assert_allclose(ours[apart], upstream[apart], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours, upstream, rtol=0, atol=1e-6)
    assert chamfer_distance_matrix(preds[:0], gts).shape == (0, 3)
    assert chamfer_distance_matrix(preds, gts[:0]).shape == (4, 0)
    with pytest.raises(ValueError, match=r'\[M, n, 2\]'):
        chamfer_distance_matrix(preds[:, :3], gts)


def test_pruning_changes_no_match():
    rng = np.random.default_rng(3)
    gts = random_lines(rng, 12, 200)
    preds = np.concatenate([gts + rng.normal(0, 0.4, gts.shape), random_lines(rng, 30, 200)])
    scores = rng.uniform(0, 1, len(preds))
    full = chamfer_distance_matrix(preds, gts)
    pruned = chamfer_distance_matrix(preds, gts, max_distance=1.5)
    kept = np.isfinite(pruned)
    assert 0.02 < kept.mean() < 0.5  # the test prunes something, and not everything
    np.testing.assert_array_equal(pruned[kept], full[kept])
    assert (full[~kept] > 1.5).all()
    assert (chamfer_lower_bound(preds, gts) <= full + 1e-9).all()
    np.testing.assert_array_equal(match_nearest(pruned, scores), match_nearest(full, scores))
    assert match_nearest(full, scores).any()


# --- against a straightforward reimplementation of upstream ------------------------------------
def plain_resample(points, num=200):
    line = LineString(points)
    return np.array([line.interpolate(d).coords[0] for d in np.linspace(0, line.length, num)])


def plain_distance(pred, gt):
    dist = cdist(pred, gt, 'euclidean')
    return (dist.min(1).sum() / len(pred) + dist.min(0).sum() / len(gt)) / 2


def plain_ap(flags, num_gts):
    """VOC area AP of true-positive flags in score order, float64 as upstream's."""
    tp, fp = np.cumsum(flags), np.cumsum(1 - flags)
    eps = np.finfo(np.float32).eps
    recall, precision = tp / max(num_gts, eps), tp / np.maximum(tp + fp, eps)
    ap, previous = 0.0, 0.0
    for i in range(len(recall)):
        if recall[i] != previous:
            ap += (recall[i] - previous) * max(precision[i:])
            previous = recall[i]
    return ap


def plain_map(samples):
    aps = np.zeros((len(CLASSES), len(THRESHOLDS)))
    for label in range(len(CLASSES)):
        per_sample, num_gts = [], 0  # (scores, distance rows) per sample
        for gts, gt_labels, preds, scores, labels in samples:
            truth = [plain_resample(LineString(g).simplify(0.2, preserve_topology=True).coords)
                     for g, lab in zip(gts, gt_labels) if lab == label]
            mine = [(plain_resample(p), float(s)) for p, s, lab in zip(preds, scores, labels)
                    if lab == label]
            num_gts += len(truth)
            per_sample.append(([s for _, s in mine],
                               [[plain_distance(p, g) for g in truth] for p, _ in mine]))
        for i, t in enumerate(THRESHOLDS):
            scores_all, tp_all = [], []
            for scores, rows in per_sample:
                taken, tp = [False] * (len(rows[0]) if rows else 0), [0.0] * len(scores)
                for k in np.argsort([-s for s in scores]):
                    if not taken:  # no ground truth: all false positives
                        break
                    nearest = int(np.argmin(rows[k]))
                    if rows[k][nearest] <= t and not taken[nearest]:
                        taken[nearest], tp[k] = True, 1.0
                scores_all += scores
                tp_all += tp
            order = np.argsort(-np.array(scores_all, float))
            aps[label, i] = plain_ap(np.array(tp_all)[order], num_gts)
    return aps


def random_polyline(rng):
    """A polyline in the 30 m x 60 m patch with jittered extra vertices, which the 0.2 m
    simplification partly removes."""
    start = rng.uniform([-14, -29], [14, 29])
    corners = start + np.concatenate([[[0, 0]], np.cumsum(rng.normal(0, 4, (
        int(rng.integers(1, 4)), 2)), 0)])
    dense = [corners[0]]
    for a, b in zip(corners[:-1], corners[1:]):
        for f in np.linspace(0, 1, 5)[1:]:
            dense.append(a + f * (b - a) + rng.normal(0, 0.1, 2) * (f < 1))
    return np.clip(np.array(dense), [-15, -30], [15, 30])


def test_against_a_straightforward_reimplementation():
    rng = np.random.default_rng(0)
    cases = []
    for _ in range(10):
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
        scores = np.round(rng.uniform(0, 1, len(preds)), 2).astype(np.float32)  # some ties
        preds20 = [resample_by_length(p, 20) for p in preds]
        cases.append((gts, gt_labels, preds20, scores, labels))
    result = evaluate([sample(g, gl, p, s, lab, tensors=False) for g, gl, p, s, lab in cases])
    expected = plain_map(cases)
    for j, name in enumerate(CLASSES):
        assert per_threshold(result, name) == pytest.approx(expected[j], abs=1e-12)
        assert result[name] == pytest.approx(expected[j].mean(), abs=1e-12)
    assert result['mAP_normal'] == pytest.approx(expected.sum() / 9, abs=1e-12)
    assert 0.2 < result['mAP_normal'] < 0.95  # neither trivial nor perfect
    # without pruning, the same
    assert evaluate([sample(*case, tensors=False) for case in cases], prune=False) == result


# --- docs/design/sparsedrive.md section 11 item 6 ----------------------------------------------
def test_maptr_buffer_test_can_reject_pairs_within_1_5_m():
    """The claim "MapTR's 2 m flat-cap buffer test never rejects a pair within 1.5 m Chamfer
    distance" is false: flat caps end the buffer at a polyline's end points, so a short
    element that continues another past its end, end to end, has buffers that never meet
    however close the two are. With MapTR's own functions (100 points):"""
    def maptr_chamfer(a, b):  # MapTR's distance without the buffer test
        dist = cdist(a, b)
        return (dist.min(1).mean() + dist.min(0).mean()) / 2

    # 1. by hand: a 1 m divider and another 0.1 m past its end, 0.6 m apart
    gt, pred = resample_by_length([[0.0, 0.0], [1.0, 0.0]]), resample_by_length(
        [[1.1, 0.0], [2.1, 0.0]])
    assert maptr_chamfer(pred, gt) == pytest.approx(0.6)
    assert chamfer_score_matrix(pred[None], gt[None])[0, 0] == -100  # rejected

    # 2. random polylines: a short random polyline and one starting near its last vertex
    rng = np.random.default_rng(0)
    close, rejected = 0, []
    for _ in range(300):
        gt = np.cumsum(rng.normal(0, 1.0, (int(rng.integers(2, 4)), 2)), 0)
        pred = gt[-1] + rng.normal(0, 0.5, 2) + np.cumsum(
            rng.normal(0, 1.0, (int(rng.integers(2, 4)), 2)), 0)
        a, b = resample_by_length(pred), resample_by_length(gt)
        distance = maptr_chamfer(a, b)
        if distance <= 1.5:
            close += 1
            if chamfer_score_matrix(a[None], b[None])[0, 0] == -100:
                rejected.append(distance)
    assert close > 100 and 1 <= len(rejected) < close / 10  # rare, but there
    assert min(rejected) < 1.5
