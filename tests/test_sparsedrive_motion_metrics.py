"""turbox_mm.SparseDriveMotionMetric and SparseDrivePlanningMetric: SparseDrive's motion
(EPA, minADE, minFDE, miss rate) and planning (L2, collision) evaluation.

Hand-built scenes with known answers for every reported number, the filters (score, class
group, class range, lidar2ego), the two matching passes, the devkit-style error averaging
checked by hand and against a loop reimplementation of upstream's procedure that uses
nuscenes-devkit's own ``cummean`` and ``calc_tp``, the separating-axis box test against
shapely, the planning metric against a torch + shapely reimplementation of upstream's
``PlanningMetric`` (x negated and negated back, per-step polygons), and the errors raised
for missing keys.
"""
import math

import numpy as np
import pytest
import torch

from turbox_mm.evaluation.motion_eval import (DET_CLASSES, class_metrics, cumulative_mean,
                                              match_sample, score_order, tp_error)
from turbox_mm.evaluation.motion_metric import SparseDriveMotionMetric
from turbox_mm.evaluation.planning_eval import (ego_collisions, ego_yaw, horizon_means,
                                                rectangle_corners, rectangles_intersect)
from turbox_mm.evaluation.planning_metric import SparseDrivePlanningMetric

CAR, TRUCK, BARRIER, PED, CONE = (DET_CLASSES.index(n) for n in
                                  ('car', 'truck', 'barrier', 'pedestrian', 'traffic_cone'))
STEPS = 12
ERRS = ('min_ade_err', 'min_fde_err', 'miss_rate_err')


# --- motion: builders ---------------------------------------------------------------------------
def path(centre, velocity=(0.0, 1.0), steps=STEPS):
    """Absolute positions centre + k * velocity, k = 1 .. steps."""
    k = np.arange(1, steps + 1)[:, None]
    return np.asarray(centre, float)[None] + k * np.asarray(velocity, float)[None]


def motion_sample(preds, gts, tensors=True, **extra):
    """preds: (x, y, score, label, trajectory [12, 2] or [6, 12, 2]);
    gts: (x, y, label, offsets [12, 2], mask [12])."""
    boxes = np.array([[x, y, -1.0, 4.0, 2.0, 1.5, 0.0, 0.0, 0.0] for x, y, *_ in preds],
                     np.float32).reshape(-1, 9)
    trajs = np.array([np.broadcast_to(p[4], (6, STEPS, 2)) for p in preds],
                     np.float32).reshape(-1, 6, STEPS, 2)
    convert = torch.as_tensor if tensors else np.asarray
    pred = dict(bboxes_3d=convert(boxes),
                scores_3d=convert(np.array([p[2] for p in preds], np.float32)),
                labels_3d=convert(np.array([p[3] for p in preds], np.int64)),
                trajs_3d=convert(trajs), trajs_score=convert(np.ones((len(preds), 6))))
    gt = dict(gt_bboxes_3d=np.array([[x, y, -1.0, 4.0, 2.0, 1.5, 0.0, 0.0, 0.0]
                                     for x, y, *_ in gts], np.float32).reshape(-1, 9),
              gt_labels_3d=np.array([g[2] for g in gts], np.int64),
              gt_agent_fut_trajs=np.array([g[3] for g in gts], np.float32).reshape(-1, STEPS, 2),
              gt_agent_fut_masks=np.array([g[4] for g in gts], np.float32).reshape(-1, STEPS))
    return dict(pred_instances_3d=pred, eval_ann_info=gt, **extra)


def gt_moving(x, y, label=CAR, velocity=(0.0, 1.0), valid=STEPS):
    offsets = np.zeros((STEPS, 2))
    offsets[:valid] = velocity
    mask = (np.arange(STEPS) < valid).astype(float)
    return (x, y, label, offsets, mask)


def evaluate_motion(samples, **kwargs):
    metric = SparseDriveMotionMetric(**kwargs)
    metric.process({}, samples)
    return metric.compute_metrics(metric.results)


def car(result):
    return [result[f'car_{k}'] for k in ('EPA', ) + ERRS]


# --- motion: hand-built scenes ------------------------------------------------------------------
def test_perfect_prediction_and_keys():
    gts = [gt_moving(5.0, 10.0), gt_moving(-3.0, 4.0, PED, velocity=(0.5, 0.0))]
    preds = [(5.0, 10.0, 0.9, CAR, path((5, 10))),
             (-3.0, 4.0, 0.8, PED, path((-3, 4), (0.5, 0.0)))]
    result = evaluate_motion([motion_sample(preds, gts)])
    assert sorted(result) == sorted(f'{c}_{k}' for c in ('car', 'pedestrian')
                                    for k in ('EPA', ) + ERRS)
    assert car(result) == pytest.approx([1.0, 0.0, 0.0, 0.0])
    assert [result[f'pedestrian_{k}'] for k in ('EPA', ) + ERRS] == pytest.approx(
        [1.0, 0.0, 0.0, 0.0])


def test_off_by_three_metres_at_the_last_step_is_a_miss():
    traj = path((5, 10))
    traj[-1, 0] += 3.0  # every mode: 3 m off at step 12 only
    result = evaluate_motion([motion_sample([(5.0, 10.0, 0.9, CAR, traj)],
                                            [gt_moving(5.0, 10.0)])])
    # ADE 3 / 12, FDE 3, missed; EPA 0 (no second-pass match, no false positive).
    assert car(result) == pytest.approx([0.0, 0.25, 3.0, 1.0])


def test_best_mode_counts():
    good = path((5, 10))
    modes = np.stack([good + [4.0, 0.0]] * 5 + [good + [0.0, 1.0]])  # mode 5: 1 m off
    result = evaluate_motion([motion_sample([(5.0, 10.0, 0.9, CAR, modes)],
                                            [gt_moving(5.0, 10.0)])])
    assert car(result) == pytest.approx([1.0, 1.0, 1.0, 0.0])


def test_false_positive_lowers_epa():
    preds = [(5.0, 10.0, 0.9, CAR, path((5, 10))),
             (20.0, 10.0, 0.5, TRUCK, path((20, 10)))]  # a truck is a car for motion
    result = evaluate_motion([motion_sample(preds, [gt_moving(5.0, 10.0)])])
    assert car(result) == pytest.approx([0.5, 0.0, 0.0, 0.0])


def test_error_average_over_the_recall_grid_by_hand():
    """Two cars; matches with ADE 1 (score 0.9) and 3 (score 0.8). Recall 0.5 then 1; the
    interpolated confidence is 0.9 up to recall 0.5, then falls linearly to 0.8; the running
    mean ADE is 1 up to recall 0.5 and 2 r beyond; the mean over grid points 11 .. 100 is
    (40 + 2 * (51 + ... + 100) / 100) / 90."""
    preds = [(0.0, 10.0, 0.9, CAR, path((0, 10)) + [1.0, 0.0]),
             (8.0, 10.0, 0.8, CAR, path((8, 10)) + [3.0, 0.0])]
    gts = [gt_moving(0.0, 10.0), gt_moving(8.0, 10.0)]
    result = evaluate_motion([motion_sample(preds, gts)])
    want_ade = (40 + 2 * sum(range(51, 101)) / 100) / 90
    assert result['car_min_ade_err'] == pytest.approx(want_ade)
    assert result['car_min_fde_err'] == pytest.approx(want_ade)
    # Miss 0 then 1: running means 0 and 0.5, interpolated through the confidence: 0 up to
    # recall 0.5, r - 0.5 beyond.
    want_mr = sum(i / 100 - 0.5 for i in range(51, 101)) / 90
    assert result['car_miss_rate_err'] == pytest.approx(want_mr)
    assert result['car_EPA'] == pytest.approx(0.5)  # one trajectory within 2 m


def test_low_recall_gives_error_one():
    """One match out of 20 cars: recall 0.05 < 0.1, so the devkit's calc_tp gives 1."""
    gts = [gt_moving(3.0 * i - 30, 20.0) for i in range(20)]
    result = evaluate_motion([motion_sample([(-30.0, 20.0, 0.9, CAR, path((-30, 20)))], gts)])
    assert car(result) == pytest.approx([1 / 20, 1.0, 1.0, 1.0])


def test_second_pass_leaves_a_bad_trajectory_s_truth_free():
    """The higher-scored prediction takes the truth in the first pass (the lower one is a
    false positive) but fails the trajectory test in the second, where the lower one
    matches: EPA (1 - 0.5) / 1."""
    preds = [(5.0, 10.0, 0.9, CAR, path((5, 10)) + [0.0, 5.0]),
             (5.5, 10.0, 0.6, CAR, path((5.5, 10)))]
    result = evaluate_motion([motion_sample(preds, [gt_moving(5.0, 10.0)])])
    assert result['car_EPA'] == pytest.approx(0.5)
    assert result['car_min_fde_err'] == pytest.approx(5.0)


def test_equal_scores_later_prediction_first():
    """Upstream sorts (score, index) pairs and reverses them: of two equal scores the later
    prediction claims the truth first (here the one with the 1 m error)."""
    preds = [(6.5, 10.0, 0.9, CAR, path((5, 10))),
             (5.5, 10.0, 0.9, CAR, path((5, 10)) + [0.0, 1.0])]
    result = evaluate_motion([motion_sample(preds, [gt_moving(5.0, 10.0)])])
    assert car(result) == pytest.approx([0.5, 1.0, 1.0, 0.0])


def test_truth_without_future():
    """Counted as a perfect unmissed match (upstream's 0, 0, 0) but never an EPA match."""
    result = evaluate_motion([motion_sample([(5.0, 10.0, 0.9, CAR, path((9, 9)))],
                                            [gt_moving(5.0, 10.0, valid=0)])])
    assert car(result) == pytest.approx([0.0, 0.0, 0.0, 0.0])


def test_partial_future_uses_the_valid_prefix():
    traj = path((5, 10))
    traj[4:] += [10.0, 0.0]  # wrong after the 4 valid steps only
    result = evaluate_motion([motion_sample([(5.0, 10.0, 0.9, CAR, traj)],
                                            [gt_moving(5.0, 10.0, valid=4)])])
    assert car(result) == pytest.approx([1.0, 0.0, 0.0, 0.0])


def test_filters_score_group_and_range():
    gts = [gt_moving(0.0, 49.9), gt_moving(0.0, 50.1), gt_moving(39.0, 0.0, PED),
           gt_moving(40.5, 0.0, PED), gt_moving(10.0, 0.0, BARRIER), gt_moving(12.0, 0.0, -1),
           gt_moving(20.0, 0.0)]
    preds = [(0.0, 49.9, 0.9, CAR, path((0, 49.9))),
             (20.0, 0.0, 0.8, CAR, path((20, 0))),
             (0.0, 50.1, 0.9, CAR, path((0, 50.1))),      # out of range: neither TP nor FP
             (39.0, 0.0, 0.9, PED, path((39, 0))),
             (40.5, 0.0, 0.9, PED, path((40.5, 0))),
             (10.0, 0.0, 0.9, CONE, path((10, 0))),       # barrier group: not evaluated
             (-10.0, 0.0, 0.19, CAR, path((-10, 0))),     # below the score threshold
             (-10.0, 5.0, 0.2, CAR, path((0, 0)))]        # at the threshold: a false positive
    result = evaluate_motion([motion_sample(preds, gts)])
    assert car(result) == pytest.approx([(2 - 0.5) / 2, 0.0, 0.0, 0.0])
    assert result['pedestrian_EPA'] == pytest.approx(1.0)
    # Measured from the ego origin, 1 m behind the lidar: the car at 49.9 m is now at 50.9
    # and leaves with its prediction; the false positive stays.
    lidar2ego = np.eye(4)
    lidar2ego[1, 3] = 1.0
    shifted = evaluate_motion([motion_sample(preds, gts, lidar2ego=lidar2ego)])
    assert car(shifted) == pytest.approx([(1 - 0.5) / 1, 0.0, 0.0, 0.0])
    assert shifted['pedestrian_EPA'] == pytest.approx(1.0)  # (39, 1): 39.01 m


def test_greedy_matching_takes_the_nearest_free_truth():
    """The higher score takes the truth nearer to it; the other prediction then has only
    the far truth (2.5 m: a false positive)."""
    gts = [gt_moving(0.0, 10.0), gt_moving(3.0, 10.0)]
    preds = [(1.0, 10.0, 0.9, CAR, path((0, 10))), (0.5, 10.0, 0.8, CAR, path((3, 10)))]
    out = match_sample(*unpack(preds, gts))
    assert out['tp'].tolist() == [True, False] and out['traj_matched'] == 1


def unpack(preds, gts):
    sample = motion_sample(preds, gts)
    metric = SparseDriveMotionMetric()
    pred, gt = metric._unpack(sample, 0)
    return pred['centres'], pred['scores'], pred['trajs'], gt['centres'], gt['trajs'], gt['steps']


def test_no_truth_and_no_match():
    only_fp = evaluate_motion([motion_sample([(5.0, 10.0, 0.9, CAR, path((5, 10)))],
                                             [gt_moving(20.0, 10.0)])])
    assert car(only_fp) == pytest.approx([-0.5, 1.0, 1.0, 1.0])
    empty = evaluate_motion([motion_sample([], [])])
    assert car(empty) == pytest.approx([0.0, 1.0, 1.0, 1.0])


def test_lidar_boxes_and_arrays_give_the_same_result():
    from mmdet3d.structures import LiDARInstance3DBoxes
    preds = [(5.0, 10.0, 0.9, CAR, path((5, 10)) + 0.3), (9.0, 1.0, 0.4, PED, path((9, 1)))]
    gts = [gt_moving(5.2, 10.0), gt_moving(9.0, 1.0, PED, valid=7)]
    plain = motion_sample(preds, gts, tensors=False)
    boxed = motion_sample(preds, gts)
    boxed['pred_instances_3d']['bboxes_3d'] = LiDARInstance3DBoxes(
        boxed['pred_instances_3d']['bboxes_3d'], box_dim=9)
    boxed['eval_ann_info']['gt_bboxes_3d'] = LiDARInstance3DBoxes(
        torch.as_tensor(boxed['eval_ann_info']['gt_bboxes_3d']), box_dim=9)
    assert evaluate_motion([boxed]) == pytest.approx(evaluate_motion([plain]))


@pytest.mark.parametrize('where, key', [
    ('pred_instances_3d', 'trajs_3d'), ('pred_instances_3d', 'scores_3d'),
    ('eval_ann_info', 'gt_agent_fut_masks'), ('eval_ann_info', 'gt_bboxes_3d'),
    (None, 'pred_instances_3d'), (None, 'eval_ann_info')])
def test_motion_missing_key(where, key):
    good = motion_sample([(5.0, 10.0, 0.9, CAR, path((5, 10)))], [gt_moving(5.0, 10.0)])
    bad = motion_sample([(5.0, 10.0, 0.9, CAR, path((5, 10)))], [gt_moving(5.0, 10.0)],
                        sample_idx=7)
    del (bad if where is None else bad[where])[key]
    metric = SparseDriveMotionMetric()
    with pytest.raises(KeyError, match=f'data sample 1 .*sample_idx=7.*{key}'):
        metric.process({}, [good, bad])
    assert metric.results == []


def test_motion_bad_shapes():
    sample = motion_sample([(5.0, 10.0, 0.9, CAR, path((5, 10)))], [gt_moving(5.0, 10.0)])
    sample['pred_instances_3d']['trajs_3d'] = sample['pred_instances_3d']['trajs_3d'][:, :, :6]
    with pytest.raises(ValueError, match='6 steps'):
        SparseDriveMotionMetric().process({}, [sample])
    sample = motion_sample([(5.0, 10.0, 0.9, 10, path((5, 10)))], [])
    with pytest.raises(ValueError, match='labels_3d'):
        SparseDriveMotionMetric().process({}, [sample])
    with pytest.raises(ValueError, match='motion group'):
        SparseDriveMotionMetric(classes=('car', 'tram'))


# --- motion: pieces -----------------------------------------------------------------------------
def test_pieces_against_the_devkit():
    devkit = pytest.importorskip('nuscenes.eval.common.utils')
    values = np.array([np.nan, 2.0, np.nan, 4.0, 1.0])
    np.testing.assert_allclose(cumulative_mean(values), devkit.cummean(values))
    np.testing.assert_allclose(cumulative_mean(np.full(3, np.nan)), np.ones(3))
    assert score_order(np.array([0.3, 0.9, 0.3, 0.1])).tolist() == [1, 2, 0, 3]
    assert tp_error(np.arange(101.0), np.r_[np.ones(11), np.zeros(90)]) == 1.0  # last 10
    assert tp_error(np.arange(101.0), np.r_[np.ones(12), np.zeros(89)]) == 11.0


def reference_motion(samples, eval_class):
    """Upstream's procedure written as loops over one global prediction list (sample token,
    score, centre, modes), the devkit's ``cummean`` and ``calc_tp`` for the averaging."""
    from nuscenes.eval.common.utils import cummean
    from nuscenes.eval.detection.algo import calc_tp
    from nuscenes.eval.detection.data_classes import DetectionMetricData
    preds, truths = [], []
    for token, (pred_list, gt_list) in enumerate(samples):
        preds += [(token, s, np.array(c), np.array(t)) for c, s, t, g in pred_list
                  if g == eval_class]
        truths.append([(np.array(c), np.array(t)) for c, t, g in gt_list if g == eval_class])
    npos = sum(len(t) for t in truths)
    ranked = [i for _, i in sorted((p[1], i) for i, p in enumerate(preds))][::-1]

    def nearest(i, taken):
        token, _, centre, _ = preds[i]
        best, best_j = math.inf, None
        for j, (c, _) in enumerate(truths[token]):
            if (token, j) not in taken and math.dist(centre, c) < best:
                best, best_j = math.dist(centre, c), j
        return best, best_j

    taken, tp, conf, mconf, errs = set(), [], [], [], []
    for i in ranked:
        dist, j = nearest(i, taken)
        conf.append(preds[i][1])
        tp.append(dist < 2.0)
        if dist < 2.0:
            taken.add((preds[i][0], j))
            mconf.append(preds[i][1])
            gt = truths[preds[i][0]][j][1]
            if len(gt) == 0:
                errs.append((0.0, 0.0, 0.0))
                continue
            d = [[math.dist(m[k], gt[k]) for k in range(len(gt))] for m in preds[i][3]]
            errs.append((min(np.mean(r) for r in d), min(r[-1] for r in d),
                         float(min(max(r) for r in d) > 2.0)))
    taken, matched = set(), 0
    for i in ranked:
        dist, j = nearest(i, taken)
        if dist < 2.0:
            gt = truths[preds[i][0]][j][1]
            fde = min(math.dist(m[len(gt) - 1], gt[-1]) for m in preds[i][3]) if len(gt) \
                else math.inf
            if fde < 2.0:
                taken.add((preds[i][0], j))
                matched += 1
    out = {'EPA': (matched - 0.5 * (len(tp) - sum(tp))) / npos}
    tp_c = np.cumsum(tp).astype(float)
    rec = tp_c / npos
    grid = np.linspace(0, 1, 101)
    conf_i = np.interp(grid, rec, np.array(conf), right=0)
    prec_i = np.interp(grid, rec, tp_c / np.arange(1, len(tp) + 1), right=0)
    curves = [np.interp(conf_i[::-1], mconf[::-1], cummean(np.array(col))[::-1])[::-1]
              for col in zip(*errs)]
    md = DetectionMetricData(grid, prec_i, conf_i, *curves, curves[0], curves[0])
    for name, attr in zip(ERRS, ('trans_err', 'vel_err', 'scale_err')):
        out[name] = calc_tp(md, 0.1, attr)
    return out


def random_scenes(rng, num_samples):
    """Per sample: our data sample and the same scene for the reference (centres, scores on
    a coarse grid so that ties occur within and across samples)."""
    scenes, data = [], []
    for _ in range(num_samples):
        preds, gts, ref_preds, ref_gts = [], [], [], []
        for _ in range(rng.integers(0, 6)):
            label = int(rng.choice([CAR, TRUCK, PED]))
            centre = rng.uniform(-15, 15, 2)
            valid = int(rng.choice([0, 3, 12, 12]))
            velocity = rng.uniform(-1.5, 1.5, 2)
            gts.append(gt_moving(*centre, label, velocity, valid))
            ref_gts.append((centre, path(centre, velocity)[:valid],
                            'pedestrian' if label == PED else 'car'))
            if rng.random() < 0.8:  # a detection nearby, modes scattered around the truth
                c = centre + rng.normal(0, 1.0, 2)
                modes = path(c, velocity)[None] + rng.normal(0, 1.0, (6, STEPS, 2)).cumsum(1) / 2
                preds.append((*c, float(rng.choice([0.3, 0.5, 0.7, 0.9])), label, modes))
        for _ in range(rng.integers(0, 3)):  # false positives
            c = rng.uniform(-15, 15, 2)
            label = int(rng.choice([CAR, PED]))
            preds.append((*c, float(rng.choice([0.3, 0.5])), label, path(c)))
        for x, y, score, label, modes in preds:
            ref_preds.append(((x, y), np.float32(score).item(),
                              np.broadcast_to(np.float32(modes), (6, STEPS, 2)),
                              'pedestrian' if label == PED else 'car'))
        data.append(motion_sample(preds, gts))
        scenes.append((ref_preds, [(np.float32(c), np.float32(t), g) for c, t, g in ref_gts]))
    return data, scenes


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_random_scenes_against_a_loop_reference(seed):
    pytest.importorskip('nuscenes')
    data, scenes = random_scenes(np.random.default_rng(seed), 12)
    metric = SparseDriveMotionMetric()
    metric.process({}, data[:5])
    metric.process({}, data[5:])
    result = metric.compute_metrics(metric.results)
    for name in ('car', 'pedestrian'):
        want = reference_motion(scenes, name)
        for key, value in want.items():
            assert result[f'{name}_{key}'] == pytest.approx(value, abs=1e-5), (name, key)


def test_class_metrics_concatenates_samples():
    one = class_metrics([np.array([0.9, 0.5])], [np.array([True, False])],
                        [np.array([[1.0, 2.0, 0.0], [np.nan] * 3])], 2, 1)
    two = class_metrics([np.array([0.9]), np.array([0.5])], [np.array([True]), np.array([False])],
                        [np.array([[1.0, 2.0, 0.0]]), np.full((1, 3), np.nan)], 2, 1)
    assert one == two and one['EPA'] == pytest.approx(0.25)


# --- planning: builders -------------------------------------------------------------------------
STRAIGHT = np.tile([0.0, 1.0], (6, 1))  # ego offsets: 1 m ahead (+y) per step
NO_BOXES = [np.zeros((0, 7), np.float32) for _ in range(6)]


def planning_sample(plan, offsets=STRAIGHT, masks=np.ones(6), fut_boxes=NO_BOXES, **extra):
    return dict(pred_planning=dict(final_planning=torch.as_tensor(np.float32(plan))),
                eval_ann_info=dict(gt_ego_fut_trajs=np.float32(offsets),
                                   gt_ego_fut_masks=np.float32(masks),
                                   fut_boxes=[np.float32(b) for b in fut_boxes]), **extra)


def evaluate_planning(samples, **kwargs):
    metric = SparseDrivePlanningMetric(**kwargs)
    metric.process({}, samples)
    return metric.compute_metrics(metric.results)


def boxes_at(step, *rows):
    out = [np.zeros((0, 7))] * 6
    out[step] = np.array(rows, float).reshape(-1, 7)
    return out


# --- planning: hand-built scenes ----------------------------------------------------------------
def test_planning_l2_by_hand_and_keys():
    truth = np.cumsum(STRAIGHT, 0)
    plan = truth + np.stack([np.arange(1.0, 7.0), np.zeros(6)], 1)  # off by 1 .. 6 m in x
    result = evaluate_planning([planning_sample(plan), planning_sample(truth)])
    names = ('L2', 'obj_col', 'obj_box_col')
    assert sorted(result) == sorted([n for n in names] + [f'{n}_{h}' for n in names
                                                          for h in ('1s', '2s', '3s')])
    # per step over the two samples: 0.5 .. 3; horizon means 0.75, 1.25, 1.75; mean 1.25
    assert [result[f'L2_{h}'] for h in ('1s', '2s', '3s')] == pytest.approx([0.75, 1.25, 1.75])
    assert result['L2'] == pytest.approx(1.25)
    assert result['obj_col'] == result['obj_box_col'] == 0.0


def test_planned_collision_at_step_three_only():
    """A car 3 m right of the third true position: the true ego (x within +-0.925) misses
    it, the plan swerving right at step 3 hits it."""
    truth = np.cumsum(STRAIGHT, 0)
    plan = truth.copy()
    plan[2, 0] = 3.0
    fut = boxes_at(2, [3.0, 3.0, 0.0, 4.0, 1.8, 1.5, math.pi / 2])
    result = evaluate_planning([planning_sample(plan, fut_boxes=fut)])
    assert [result[f'obj_box_col_{h}'] for h in ('1s', '2s', '3s')] == pytest.approx(
        [0.0, 1 / 4, 1 / 6])
    assert result['obj_box_col'] == pytest.approx((1 / 4 + 1 / 6) / 3)
    assert result['obj_col'] == 0.0


def test_truth_collision_counts_in_obj_col_not_obj_box_col():
    truth = np.cumsum(STRAIGHT, 0)
    fut = boxes_at(3, [0.0, 6.5, 0.0, 4.0, 1.8, 1.5, math.pi / 2])  # ahead of step 4
    result = evaluate_planning([planning_sample(truth, fut_boxes=fut)])
    assert [result[f'obj_col_{h}'] for h in ('1s', '2s', '3s')] == pytest.approx(
        [0.0, 1 / 4, 1 / 6])
    assert result['obj_box_col'] == 0.0


def test_incomplete_ego_future_is_skipped():
    truth = np.cumsum(STRAIGHT, 0)
    fut = boxes_at(0, [0.0, 1.0, 0.0, 4.0, 1.8, 1.5, 0.0])
    skipped = planning_sample(truth + 50.0, masks=[1, 1, 1, 1, 1, 0], fut_boxes=fut[:5])
    result = evaluate_planning([skipped, planning_sample(truth)])
    assert result['L2'] == 0.0 and result['obj_col'] == 0.0
    metric = SparseDrivePlanningMetric()
    metric.process({}, [skipped])
    assert all(math.isnan(v) for v in metric.compute_metrics(metric.results).values())


def test_forward_offset_is_along_the_lidar_frame_heading():
    """Ego driving along +x (right, in the lidar frame). The box is 4.084 m long with its
    centre 0.5 m ahead: the front edge at 2.542 m ahead of the point, the rear at 1.542 m
    behind. A car whose near edge is 2.3 m ahead is hit, one 2.3 m behind is not; mirrored
    in x (upstream's transient negation left in place) both answers would swap."""
    offsets = np.tile([1.0, 0.0], (6, 1))
    truth = np.cumsum(offsets, 0)  # step 3 at (3, 0)
    ahead = [3.0 + 2.3 + 1.0, 0.0, 0.0, 2.0, 1.8, 1.5, 0.0]  # near edge at x = 5.3
    behind = [3.0 - 2.3 - 1.0, 0.0, 0.0, 2.0, 1.8, 1.5, 0.0]  # near edge at x = 0.7
    assert ego_collisions(truth, boxes_at(2, ahead)).tolist() == [0, 0, 1, 0, 0, 0]
    assert not ego_collisions(truth, boxes_at(2, behind)).any()
    assert ego_collisions(truth, boxes_at(2, behind), forward_offset=-0.5)[2]
    result = evaluate_planning([planning_sample(truth, offsets=offsets,
                                                fut_boxes=boxes_at(2, ahead))])
    assert result['obj_col_3s'] == pytest.approx(1 / 6)


def test_ego_yaw():
    traj = np.array([[0.0, 1.0], [1.0, 2.0], [1.0, 4.0], [3.0, 4.0], [3.0, 5.0], [4.0, 5.0]])
    want = [math.atan2(2, 1), math.atan2(3, 1), math.atan2(2, 2), math.atan2(1, 2),
            math.atan2(1, 1), math.atan2(0, 1)]
    np.testing.assert_allclose(ego_yaw(traj), want)
    # first to last planned point within 0.5 m, though far from the origin: all pi / 2
    loop = np.array([[5.0, 5.0], [6.0, 5.0], [6.0, 6.0], [5.0, 6.0], [5.0, 5.5], [5.2, 5.2]])
    np.testing.assert_allclose(ego_yaw(loop), np.full(6, math.pi / 2))


def test_horizon_means():
    np.testing.assert_allclose(horizon_means([0, 0, 1, 0, 0, 0]), [0, 0, 1 / 3, 1 / 4, 1 / 5,
                                                                   1 / 6])


def test_rectangle_test_equals_shapely():
    from shapely.geometry import Polygon
    rng = np.random.default_rng(0)
    a = rectangle_corners(rng.uniform(-4, 4, (60, 2)), rng.uniform(0.3, 5, 60),
                          rng.uniform(0.3, 3, 60), rng.uniform(-4, 4, 60))
    b = rectangle_corners(rng.uniform(-4, 4, (70, 2)), rng.uniform(0.3, 5, 70),
                          rng.uniform(0.3, 3, 70), rng.uniform(-4, 4, 70))
    got = rectangles_intersect(a, b)
    want = np.array([[Polygon(p).intersects(Polygon(q)) for q in b] for p in a])
    np.testing.assert_array_equal(got, want)
    assert 0.1 < got.mean() < 0.9
    # exact touching (a shared edge, a shared corner) counts, as in shapely
    unit = rectangle_corners(np.zeros((1, 2)), 2.0, 2.0, np.zeros(1))
    for shift in ([2.0, 0.0], [2.0, 2.0], [2.0, 2.0 + 1e-9]):
        other = unit + [shift]
        assert rectangles_intersect(unit, other)[0, 0] == Polygon(unit[0]).intersects(
            Polygon(other[0]))
    assert rectangles_intersect(unit, np.zeros((0, 4, 2))).shape == (1, 0)


def reference_planning(samples):
    """Upstream's PlanningMetric as torch float32 and shapely: x negated for L2 and back for
    the collisions, the box corners from a rotation matrix, one polygon per box."""
    from shapely.geometry import Polygon
    sums = {k: torch.zeros(6) for k in ('L2', 'obj_col', 'obj_box_col')}
    total = 0

    def heading(traj):
        if torch.linalg.norm(traj[-1] - traj[0]) < 0.5:
            return torch.full((len(traj), ), math.pi / 2)
        pts = torch.cat([traj.new_zeros(1, 2), traj])  # the origin, then steps 1 .. 6
        out = []
        for k in range(1, 7):
            d = pts[k + 1] - pts[k - 1] if k < 6 else pts[6] - pts[5]
            out.append(torch.atan2(d[1], d[0]))
        return torch.stack(out)

    def poly(x, y, length, width, yaw):
        rot = np.array([[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]])
        local = np.array([[-1, -1], [-1, 1], [1, 1], [1, -1]]) * [length / 2, width / 2]
        return Polygon(local @ rot.T + [x, y])

    def collide(traj, fut):
        yaw = heading(traj)
        out = torch.zeros(6, dtype=torch.bool)
        for t in range(6):
            cx = float(traj[t, 0] + 0.5 * torch.cos(yaw[t]))
            cy = float(traj[t, 1] + 0.5 * torch.sin(yaw[t]))
            ego = poly(cx, cy, 4.084, 1.85, float(yaw[t]))
            out[t] = any(ego.intersects(poly(b[0], b[1], b[3], b[4], b[6])) for b in fut[t])
        return out

    for plan, offsets, masks, fut in samples:
        if not np.all(masks):
            continue
        pred = torch.tensor(plan, dtype=torch.float32)
        gt = torch.cumsum(torch.tensor(offsets, dtype=torch.float32), 0)
        pred[:, 0], gt[:, 0] = -pred[:, 0], -gt[:, 0]
        sums['L2'] += torch.sqrt(((pred - gt) ** 2).sum(-1))
        pred, gt = pred * torch.tensor([-1.0, 1.0]), gt * torch.tensor([-1.0, 1.0])
        gt_col = collide(gt, fut)
        sums['obj_col'] += gt_col.float()
        sums['obj_box_col'] += (collide(pred, fut) & ~gt_col).float()
        total += 1
    out = {}
    for name, value in sums.items():
        cum = [float(np.mean((value / total).numpy()[:k + 1])) for k in range(6)]
        out.update({f'{name}_1s': cum[1], f'{name}_2s': cum[3], f'{name}_3s': cum[5],
                    name: (cum[1] + cum[3] + cum[5]) / 3})
    return out


def test_random_planning_against_a_reference():
    pytest.importorskip('shapely')
    rng = np.random.default_rng(3)
    samples, raw = [], []
    for index in range(30):
        offsets = np.stack([rng.normal(0, 0.6, 6), rng.uniform(-0.2, 2.5, 6)], 1)
        if index % 7 == 3:
            offsets *= 0.05  # nearly stationary: the pi / 2 rule
        truth = np.cumsum(offsets, 0)
        plan = truth + rng.normal(0, 1.2, (6, 2)).cumsum(0) * 0.6
        masks = np.ones(6) if index % 5 else np.r_[np.ones(4), np.zeros(2)]
        fut = [np.c_[truth[t] + rng.normal(0, 3.5, (8, 2)), np.zeros(8),
                     rng.uniform(0.5, 5, 8), rng.uniform(0.5, 2.5, 8), np.full(8, 1.5),
                     rng.uniform(-4, 4, 8)].astype(np.float32) for t in range(6)]
        fut = fut[:int(masks.sum())]
        samples.append(planning_sample(plan, offsets, masks, fut))
        raw.append((np.float32(plan), np.float32(offsets), masks, fut))
    result = evaluate_planning(samples)
    want = reference_planning(raw)
    assert result == pytest.approx(want, abs=1e-5)
    assert result['obj_col'] > 0 and result['obj_box_col'] > 0


@pytest.mark.parametrize('where, key', [
    ('pred_planning', 'final_planning'), ('eval_ann_info', 'fut_boxes'),
    ('eval_ann_info', 'gt_ego_fut_masks'), ('eval_ann_info', 'gt_ego_fut_trajs'),
    (None, 'pred_planning'), (None, 'eval_ann_info')])
def test_planning_missing_key(where, key):
    good = planning_sample(np.cumsum(STRAIGHT, 0))
    bad = planning_sample(np.cumsum(STRAIGHT, 0), token='abc')
    del (bad if where is None else bad[where])[key]
    metric = SparseDrivePlanningMetric()
    with pytest.raises(KeyError, match=f"data sample 1 .*token=abc.*{key}"):
        metric.process({}, [good, bad])
    assert metric.results == []


def test_planning_bad_input():
    truth = np.cumsum(STRAIGHT, 0)
    with pytest.raises(ValueError, match='6 fut_boxes'):
        SparseDrivePlanningMetric().process({}, [planning_sample(truth, fut_boxes=NO_BOXES[:5])])
    with pytest.raises(ValueError, match='final_planning'):
        SparseDrivePlanningMetric().process({}, [planning_sample(truth[:4])])
    with pytest.raises(ValueError, match=r'fut_boxes\[2\]'):
        bad = [np.zeros((0, 7))] * 2 + [np.zeros((3, 5))] + [np.zeros((0, 7))] * 3
        SparseDrivePlanningMetric().process({}, [planning_sample(truth, fut_boxes=bad)])
