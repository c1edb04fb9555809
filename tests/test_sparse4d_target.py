"""Sparse4D v3 targets (Hungarian matching, denoising, temporal denoising) and the box loss."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from turbox_mm.models.sparse4d.losses import SparseBox3DLoss
from turbox_mm.models.sparse4d.target import SparseBox3DTarget

CONE, BARRIER, CAR = 9, 5, 0
CONE_WEIGHTS = [2., 2., 2., 1., 1., 1., 0., 0., 1., 1.]
COST_REG_WEIGHTS = [2., 2., 2., .5, .5, .5, 0., 0., 0., 0.]
V3_NOISE = [2.0] * 3 + [0.5] * 7


def _gt(*rows):
    """GT boxes ``[n, 9]`` from ``(x, y, z, yaw)`` rows, sizes (4, 2, 1.5), velocity (1, -1)."""
    return torch.tensor([[x, y, z, 4., 2., 1.5, yaw, 1., -1.] for x, y, z, yaw in rows])


def _enc(box):
    """Plain reference encoding of one GT row (9 numbers) to 10."""
    x, y, z, l, w, h, yaw, vx, vy = [float(v) for v in box]
    return torch.tensor([x, y, z, math.log(l), math.log(w), math.log(h), math.sin(yaw),
                         math.cos(yaw), vx, vy])


def _v3_target(**kwargs):
    cfg = dict(num_dn_groups=5, num_temp_dn_groups=3, dn_noise_scale=V3_NOISE, max_dn_gt=32,
               cls_wise_reg_weights={CONE: CONE_WEIGHTS})
    cfg.update(kwargs)
    return SparseBox3DTarget(**cfg)


# ----------------------------------------------------------------------------------------------
# Encoding and matching
# ----------------------------------------------------------------------------------------------
def test_encode_reg_target_layout_and_nan_velocity():
    box = torch.tensor([[1., 2., 3., 4., 2., 1.5, 0.3, float('nan'), 2.]])
    out = SparseBox3DTarget().encode_reg_target([box, torch.zeros(0, 9)])
    expected = _enc(box[0].nan_to_num(0.0))
    torch.testing.assert_close(out[0][0], expected)
    assert out[0][0, 8] == 0 and out[1].shape == (0, 10)
    with pytest.raises(ValueError, match=r'box_target\[0\]'):
        SparseBox3DTarget().encode_reg_target([torch.zeros(2, 8)])


def test_the_batch_encoding_equals_the_per_sample_one():
    """The targets encode the batch's padded boxes at once: the same values as encoding each
    sample, zero targets and no finite entry in padded slots (cos 0 = 1 would leak there), [n, 7]
    boxes with zero velocity beside [n, 9] ones, an empty sample, float64 promoting the batch,
    and the shape error naming the sample."""
    target = SparseBox3DTarget()
    box9 = torch.tensor([[1., 2., 3., 4., 2., 1.5, 0.3, float('nan'), 2.],
                         [0., -1., 0.5, 1., 1., 1., -2.0, 0.5, 0.5]])
    box7 = torch.tensor([[5., 5., 0., 2., 2., 2., 1.0]])
    boxes = [box9, box7, torch.zeros(0, 9)]
    out, finite = target._encode_padded(boxes, 3, torch.device('cpu'))
    assert out.shape == finite.shape == (3, 3, 10) and out.dtype == torch.float32
    for b, box in enumerate(boxes):
        enc, fin = target._encode_one(box, b)
        n = box.shape[0]
        assert torch.equal(out[b, :n], enc) and torch.equal(finite[b, :n], fin)
        assert (out[b, n:] == 0).all() and not finite[b, n:].any()
    out64, _ = target._encode_padded([box9.double(), box7], 2, torch.device('cpu'))
    assert out64.dtype == torch.float64
    with pytest.raises(ValueError, match=r'box_target\[1\]'):
        target._encode_padded([box9, torch.zeros(2, 8)], 2, torch.device('cpu'))


def _toy_case():
    # GT 0: a car at (10, 0, 0); GT 1: a traffic cone at (-10, 5, 0).
    gt_box = _gt((10., 0., 0., 0.3), (-10., 5., 0., -1.0))
    gt_cls = torch.tensor([CAR, CONE])
    enc = torch.stack([_enc(b) for b in gt_box])
    box_pred = torch.zeros(3, 10)
    box_pred[0] = enc[1] + 0.1       # near the cone
    box_pred[1, :3] = 100.           # far from both
    box_pred[2] = enc[0] - 0.1       # near the car
    return gt_cls, gt_box, box_pred


def test_hungarian_toy_assignment_defaults_and_cone_weights():
    target = _v3_target()
    gt_cls, gt_box, box_pred = _toy_case()
    cls_pred = torch.zeros(2, 3, 10)
    cls, box, weights = target.sample(cls_pred, torch.stack([box_pred, box_pred]),
                                      [gt_cls, gt_cls[:0]], [gt_box, gt_box[:0]])
    assert cls.dtype == torch.long and cls.shape == (2, 3)
    assert box.shape == weights.shape == (2, 3, 10)
    assert cls[0].tolist() == [CONE, 10, CAR]
    torch.testing.assert_close(box[0, 0], _enc(gt_box[1]))
    torch.testing.assert_close(box[0, 2], _enc(gt_box[0]))
    assert box[0, 1].abs().sum() == 0 and weights[0, 1].abs().sum() == 0
    assert weights[0, 0].tolist() == CONE_WEIGHTS
    assert weights[0, 2].tolist() == [1.0] * 10
    # The sample without GTs keeps the defaults.
    assert cls[1].tolist() == [10, 10, 10]
    assert box[1].abs().sum() == 0 and weights[1].abs().sum() == 0


def test_hungarian_batch_of_one_and_low_precision_predictions():
    target = _v3_target()
    gt_cls, gt_box, box_pred = _toy_case()
    ref = target.sample(torch.zeros(1, 3, 10), box_pred[None], [gt_cls], [gt_box])
    for dtype in (torch.float16, torch.bfloat16):
        out = target.sample(torch.zeros(1, 3, 10, dtype=dtype), box_pred[None].to(dtype),
                            [gt_cls], [gt_box])
        assert torch.equal(out[0], ref[0])
        assert out[1].dtype == torch.float32
        torch.testing.assert_close(out[1], ref[1])


def test_hungarian_nan_prediction_is_never_preferred_and_cone_weights_enter_the_cost():
    gt_cls, gt_box, box_pred = _toy_case()
    box_pred = box_pred.clone()
    box_pred[0] = float('nan')  # its cost becomes 1e8: the two others share the GTs
    # Plain weights: far query -> cone (cost 152.8) + near query -> car (0.2) beats
    # far -> car (145.3) + near -> cone (12.6).
    cls, _, _ = SparseBox3DTarget().sample(torch.zeros(1, 3, 10), box_pred[None], [gt_cls],
                                           [gt_box])
    assert cls[0].tolist() == [10, CONE, CAR]
    # The cone's class-wise weights double its centre cost, which flips the optimum.
    cls, _, _ = _v3_target().sample(torch.zeros(1, 3, 10), box_pred[None], [gt_cls], [gt_box])
    assert cls[0].tolist() == [10, CAR, CONE]


def _reference_cost(cls_logit, box_pred, label, gt_enc, gt_w, alpha=0.25, gamma=2.0, eps=1e-12):
    """Plain-python cost of one (prediction, GT) pair, design doc 2.10.2."""
    p = 1 / (1 + math.exp(-float(cls_logit[label])))
    pos = -math.log(p + eps) * alpha * (1 - p) ** gamma
    neg = -math.log(1 - p + eps) * (1 - alpha) * p ** gamma
    box = sum(abs(float(box_pred[k]) - float(gt_enc[k])) * gt_w[k] * COST_REG_WEIGHTS[k]
              for k in range(10))
    return 2.0 * (pos - neg) + 0.25 * box


def test_cost_value_matches_hand_computation():
    target = _v3_target()
    cls_logit = torch.tensor([[0.5, -1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    box_pred = torch.tensor([[1., 2., 3., .1, .2, .3, .5, .5, 1., 1.]])
    gt = _gt((1.5, 1., 2.5, 0.2))
    gt_enc = _enc(gt[0])
    cost = target._cls_cost(cls_logit, torch.tensor([2])) + target._box_cost(
        box_pred, gt_enc[None], torch.ones(1, 10))
    # By hand: p = sigmoid(2) = 0.880797; pos = -ln(p) * .25 * (1 - p)^2 = 4.509e-4,
    # neg = -ln(1 - p) * .75 * p^2 = 1.237559; box = .25 * (2 * (.5 + 1 + .5)
    #   + .5 * (|.1 - ln 4| + |.2 - ln 2| + |.3 - ln 1.5|)) = 1.235613; yaw and velocity do
    # not count. Total: 2 * (pos - neg) + box = -1.238602.
    p = 1 / (1 + math.exp(-2.0))
    by_hand = 2 * (-math.log(p) * .25 * (1 - p) ** 2 + math.log(1 - p) * .75 * p ** 2) + .25 * (
        2 * 2.0 + .5 * (abs(.1 - math.log(4)) + abs(.2 - math.log(2)) + abs(.3 - math.log(1.5))))
    assert cost.shape == (1, 1)
    assert math.isclose(by_hand, -1.238602, abs_tol=1e-6)
    assert math.isclose(float(cost), by_hand, rel_tol=1e-5)
    assert math.isclose(by_hand, _reference_cost(cls_logit[0], box_pred[0], 2, gt_enc, [1] * 10),
                        rel_tol=1e-6)


def test_hungarian_is_optimal_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    target = _v3_target()
    for _ in range(5):
        cls_pred = torch.randn(1, 4, 10, generator=gen)
        box_pred = torch.randn(1, 4, 10, generator=gen) * 3
        gt_box = torch.cat([torch.randn(3, 3, generator=gen) * 3,
                            torch.rand(3, 3, generator=gen) + .5,
                            torch.randn(3, 3, generator=gen)], dim=1)
        gt_cls = torch.tensor([1, CONE, 4])
        cls, box, _ = target.sample(cls_pred, box_pred, [gt_cls], [gt_box])
        enc = torch.stack([_enc(b) for b in gt_box])
        weights = [CONE_WEIGHTS if c == CONE else [1.] * 10 for c in gt_cls.tolist()]
        cost = [[_reference_cost(cls_pred[0, i], box_pred[0, i], int(gt_cls[j]), enc[j],
                                 weights[j]) for j in range(3)] for i in range(4)]
        best = min(sum(cost[perm[j]][j] for j in range(3))
                   for perm in itertools.permutations(range(4), 3))
        chosen = {}
        for i in range(4):
            for j in range(3):
                if cls[0, i] == gt_cls[j] and torch.allclose(box[0, i], enc[j]):
                    chosen[j] = i
        assert len(chosen) == 3
        assert math.isclose(sum(cost[chosen[j]][j] for j in range(3)), best, rel_tol=1e-5)


def test_sample_rejects_bad_input():
    target = _v3_target()
    with pytest.raises(ValueError, match='cls_target'):
        target.sample(torch.zeros(2, 3, 10), torch.zeros(2, 3, 10), [torch.tensor([0])],
                      [_gt((0., 0., 0., 0.))])
    with pytest.raises(ValueError, match='labels outside'):
        target.sample(torch.zeros(1, 3, 10), torch.zeros(1, 3, 10), [torch.tensor([10])],
                      [_gt((0., 0., 0., 0.))])
    with pytest.raises(ValueError, match='reg_weights'):
        SparseBox3DTarget(reg_weights=[1.0] * 9)


# ----------------------------------------------------------------------------------------------
# Denoising
# ----------------------------------------------------------------------------------------------
def _dn_batch():
    gt_box = [_gt((20., 0., 0., 0.3), (0., 20., 1., -2.0), (-20., -20., 0., 1.0)),
              _gt((15., 15., 0., 0.5))]
    gt_cls = [torch.tensor([CAR, BARRIER, CONE]), torch.tensor([3])]
    gt_ids = [torch.tensor([11, 12, 13]), torch.tensor([21])]
    return gt_cls, gt_box, gt_ids


def test_dn_anchors_layout_mask_labels_and_noise():
    gt_cls, gt_box, gt_ids = _dn_batch()
    target = _v3_target()
    torch.manual_seed(3)
    out = target.get_dn_anchors(gt_cls, gt_box, gt_ids)
    anchor, reg, cls, mask, valid, ids = out
    M, G, n = 3, 5, 6
    assert anchor.shape == (2, 30, 11) and reg.shape == (2, 30, 10)
    assert cls.shape == valid.shape == ids.shape == (2, 30)
    assert cls.dtype == ids.dtype == torch.long and valid.dtype == mask.dtype == torch.bool
    assert (anchor[..., 10] == 0).all()
    # Five open 6x6 diagonal blocks, everything else blocked.
    expected_mask = torch.ones(30, 30, dtype=torch.bool)
    for g in range(G):
        expected_mask[g * n:(g + 1) * n, g * n:(g + 1) * n] = False
    assert torch.equal(mask, expected_mask) and int((~mask).sum()) == 5 * 36

    scale = torch.tensor(V3_NOISE)
    for b in range(2):
        num_real = len(gt_cls[b])
        enc = torch.zeros(M, 10)
        enc[:num_real] = torch.stack([_enc(x) for x in gt_box[b]])
        for g in range(G):
            sl = slice(g * n, (g + 1) * n)
            c, r, v, i, a = cls[b, sl], reg[b, sl], valid[b, sl], ids[b, sl], anchor[b, sl, :10]
            assert set(c.tolist()) <= set(gt_cls[b].tolist()) | {-3, -1}
            # Exactly one positive per real GT, carrying its target, label and id; here (GTs far
            # apart and from the origin) it is the GT's own positive copy.
            for j in range(num_real):
                hits = [k for k in range(n)
                        if c[k] == gt_cls[b][j] and torch.allclose(r[k], enc[j])]
                assert hits == [j]
                assert i[j] == gt_ids[b][j]
            # Padded GT slots: two anchors labelled -1 in the one-GT sample, all invalid, as are
            # the anchors drawn from padded slots.
            assert int((c == -1).sum()) == M - num_real
            assert not v[c == -1].any()
            padded_sources = [k for k in range(n) if k % M >= num_real]
            assert not v[padded_sources].any()
            assert int(v.sum()) == 2 * num_real  # its positive and its (unmatched) negative
            assert (c[v] != -1).all() and (i[c < 0] == -1).all()
            assert (r[c < 0] == 0).all()
            # Noise: positives within +-scale, negatives in [scale, 2 scale] in magnitude.
            pos_noise = (a[:M] - enc).abs()
            neg_noise = (a[M:] - enc).abs()
            assert (pos_noise <= scale + 1e-5).all()
            assert (neg_noise >= scale - 1e-5).all() and (neg_noise <= 2 * scale + 1e-5).all()

    torch.manual_seed(3)
    again = target.get_dn_anchors(gt_cls, gt_box, gt_ids)
    assert all(torch.equal(x, y) for x, y in zip(out, again))
    torch.manual_seed(4)
    assert not torch.equal(target.get_dn_anchors(gt_cls, gt_box, gt_ids)[0], out[0])


def test_dn_matching_is_optimal_against_brute_force():
    gt_cls, gt_box, gt_ids = _dn_batch()
    target = _v3_target(dn_noise_scale=8.0)  # large noise: assignments are no longer trivial
    torch.manual_seed(0)
    anchor, reg, cls, _, _, _ = target.get_dn_anchors(gt_cls, gt_box, gt_ids)
    enc = torch.stack([_enc(x) for x in gt_box[0]])
    for g in range(5):
        a, r = anchor[0, g * 6:(g + 1) * 6, :10], reg[0, g * 6:(g + 1) * 6]
        cost = [[0.25 * float(((a[k] - enc[j]).abs() * torch.tensor(COST_REG_WEIGHTS)).sum())
                 for j in range(3)] for k in range(6)]
        best = min(sum(cost[p[j]][j] for j in range(3))
                   for p in itertools.permutations(range(6), 3))
        chosen = [next(k for k in range(6)
                       if torch.allclose(r[k], enc[j]) and cls[0, g * 6 + k] >= 0)
                  for j in range(3)]
        assert math.isclose(sum(cost[chosen[j]][j] for j in range(3)), best, rel_tol=1e-5)


def test_dn_anchor_variants_and_empty_batches():
    gt_cls, gt_box, gt_ids = _dn_batch()
    assert SparseBox3DTarget().get_dn_anchors(gt_cls, gt_box, gt_ids) is None  # no dn groups
    assert _v3_target().get_dn_anchors([torch.zeros(0, dtype=torch.long)] * 2,
                                       [torch.zeros(0, 9)] * 2) is None
    # No temporal groups: ids are dropped.
    assert _v3_target(num_temp_dn_groups=0).get_dn_anchors(gt_cls, gt_box, gt_ids)[5] is None
    # max_dn_gt keeps the first GTs: M = 2, K = 5 * 4.
    out = _v3_target(max_dn_gt=2).get_dn_anchors(gt_cls, gt_box, gt_ids)
    assert out[0].shape == (2, 20, 11) and out[3].shape == (20, 20)
    assert CONE not in out[2].tolist()[0]
    # Without negatives: K = 5 * M, every real GT matched, only padding is invalid.
    anchor, _, cls, mask, valid, _ = _v3_target(add_neg_dn=False).get_dn_anchors(
        gt_cls, gt_box, gt_ids)
    assert anchor.shape == (2, 15, 11) and mask.shape == (15, 15)
    assert -3 not in cls.tolist()[0] + cls.tolist()[1]
    assert int(valid[0].sum()) == 15 and int(valid[1].sum()) == 5


# ----------------------------------------------------------------------------------------------
# Temporal denoising
# ----------------------------------------------------------------------------------------------
def _metas(ids, cls, per_feature=4):
    """Hand-made cache for one temporal group: ids/cls ``[B, n_prev]``."""
    ids, cls = torch.tensor(ids), torch.tensor(cls)
    batch, n_prev = ids.shape
    return dict(
        dn_instance_feature=torch.arange(batch * n_prev * per_feature, dtype=torch.float32)
        .reshape(batch, 1, n_prev, per_feature) + 100,
        dn_anchor=torch.full((batch, 1, n_prev, 11), 50.0),
        dn_cls_target=cls[:, None],
        valid_mask=torch.ones(batch, 1, n_prev, dtype=torch.bool),
        dn_id_target=ids[:, None])


def _current(batch=2, normal=3, groups=2, per_group=2, c=4):
    k = groups * per_group
    feature = torch.randn(batch, normal + k, c)
    anchor = torch.randn(batch, normal + k, 11)
    reg = torch.arange(batch * k * 10, dtype=torch.float32).reshape(batch, k, 10)
    cls = (torch.arange(k) % 2 + 1).repeat(batch, 1)
    valid = torch.ones(batch, k, dtype=torch.bool)
    ids = torch.tensor([7, 9] * k)[:k].repeat(batch, 1)
    return feature, anchor, reg, cls, valid, ids


def test_update_dn_matches_by_id_and_chooses_per_sample():
    target = SparseBox3DTarget(num_dn_groups=2, num_temp_dn_groups=1)
    target.dn_metas = _metas([[7, -1], [7, -1]], [[3, -3], [3, -3]])
    feature, anchor, reg, cls, valid, ids = _current()
    out = target.update_dn(feature, anchor, reg, cls, valid, ids, 3, torch.tensor([True, False]))
    o_feat, o_anchor, o_reg, o_cls, o_valid, o_ids = out
    assert o_feat.shape == feature.shape and o_anchor.shape == anchor.shape
    assert o_reg.shape == reg.shape and o_cls.shape == cls.shape and o_ids.shape == ids.shape
    # Normal queries untouched.
    assert torch.equal(o_feat[:, :3], feature[:, :3])
    assert torch.equal(o_anchor[:, :3], anchor[:, :3])
    # Sample 0 takes the cached group 0: id 7 follows the current target of id 7; id -1 has no
    # partner among [7, 9]: zero target, label -1.
    assert torch.equal(o_feat[0, 3:5], target.dn_metas['dn_instance_feature'][0, 0])
    assert (o_anchor[0, 3:5] == 50).all()
    assert torch.equal(o_reg[0, 0], reg[0, 0]) and (o_reg[0, 1] == 0).all()
    assert o_cls[0, :2].tolist() == [3, -1] and o_ids[0, :2].tolist() == [7, -1]
    # Its second group is the current one.
    assert torch.equal(o_reg[0, 2:], reg[0, 2:]) and o_cls[0, 2:].tolist() == [1, 2]
    assert torch.equal(o_feat[0, 5:], feature[0, 5:])
    # Sample 1 (mask False) keeps everything current.
    for got, cur in zip(out, (feature, anchor, reg, cls, valid, ids)):
        assert torch.equal(got[1], cur[1])


def test_update_dn_unknown_ids_match_nothing():
    """Ground truth without instance ids (-1, as from mmdet3d's converter) must not sum every
    id-less target of the group into each cached query (upstream's -1 == -1 match)."""
    target = SparseBox3DTarget(num_dn_groups=2, num_temp_dn_groups=1)
    target.dn_metas = _metas([[-1, -1], [-1, -1]], [[3, 4], [3, 4]])
    feature, anchor, reg, cls, valid, ids = _current()
    ids = torch.full_like(ids, -1)
    assert (reg[:, :2] != 0).any()
    _, _, o_reg, o_cls, _, _ = target.update_dn(feature, anchor, reg, cls, valid, ids, 3,
                                                torch.tensor([True, True]))
    assert (o_reg[:, :2] == 0).all() and (o_cls[:, :2] == -1).all()


def test_update_dn_pads_and_truncates_the_cache():
    target = SparseBox3DTarget(num_dn_groups=2, num_temp_dn_groups=1)
    mask = torch.tensor([True, True])
    # Cache shorter than the current groups: zero features, label -1, invalid, id -1.
    target.dn_metas = _metas([[7, 9], [9, 7]], [[3, 4], [4, 3]])
    feature, anchor, reg, cls, valid, ids = _current(per_group=3)
    ids = torch.tensor([[7, 9, 5, 7, 9, 5]] * 2)
    o_feat, _, o_reg, o_cls, o_valid, o_ids = target.update_dn(feature, anchor, reg, cls, valid,
                                                               ids, 3, mask)
    assert (o_feat[:, 5] == 0).all() and o_cls[:, 2].tolist() == [-1, -1]
    assert not o_valid[:, 2].any() and o_ids[:, 2].tolist() == [-1, -1]
    assert torch.equal(o_reg[1, 0], reg[1, 1]) and torch.equal(o_reg[1, 1], reg[1, 0])
    # Cache longer than the current groups: cut.
    target.dn_metas = _metas([[7, 9, 5], [7, 9, 5]], [[3, 4, 5], [3, 4, 5]])
    feature, anchor, reg, cls, valid, ids = _current(per_group=2)
    o_feat, _, _, o_cls, _, _ = target.update_dn(feature, anchor, reg, cls, valid, ids, 3, mask)
    assert o_feat.shape == feature.shape and o_cls[:, :2].tolist() == [[3, 4], [3, 4]]


def test_update_dn_passes_through():
    target = SparseBox3DTarget(num_dn_groups=2, num_temp_dn_groups=1)
    current = _current()
    feature, anchor, reg, cls, valid, ids = current
    mask = torch.tensor([True, True])
    assert target.update_dn(*current, 3, mask) == current  # nothing cached
    target.dn_metas = _metas([[7, -1]], [[3, -3]])  # batch 1 against batch 2
    assert target.update_dn(*current, 3, mask) == current
    target.dn_metas = _metas([[7, -1], [7, -1]], [[3, -3], [3, -3]])
    normal_only = feature[:, :3]
    assert target.update_dn(normal_only, anchor[:, :3], reg, cls, valid, ids, 3,
                            mask)[0] is normal_only  # no dn queries: unchanged
    assert target.update_dn(feature, anchor, reg, cls, valid, None, 3, mask)[0] is feature
    assert target.update_dn(*current, 3, None) == current and target.dn_metas is None


def test_cache_dn_picks_groups_detached_and_project():
    target = _v3_target()
    batch, k, c = 2, 5 * 4, 3
    feature = torch.randn(batch, k, c, requires_grad=True)
    anchor = torch.randn(batch, k, 11, requires_grad=True)
    cls = torch.arange(k).repeat(batch, 1)
    valid = torch.ones(batch, k, dtype=torch.bool)
    ids = torch.arange(k).repeat(batch, 1) + 100
    torch.manual_seed(0)
    target.cache_dn(feature, anchor, cls, valid, ids)
    metas = target.dn_metas
    assert metas['dn_instance_feature'].shape == (batch, 3, 4, c)
    assert metas['dn_anchor'].shape == (batch, 3, 4, 11)
    assert metas['dn_cls_target'].shape == metas['valid_mask'].shape == (batch, 3, 4)
    assert not metas['dn_instance_feature'].requires_grad and not metas['dn_anchor'].requires_grad
    groups = (metas['dn_cls_target'][0, :, 0] // 4).tolist()
    assert len(set(groups)) == 3 and groups == sorted(groups)  # one draw, the same for all
    assert torch.equal(metas['dn_cls_target'][0], metas['dn_cls_target'][1])
    for slot, g in enumerate(groups):
        assert torch.equal(metas['dn_instance_feature'][:, slot], feature[:, g * 4:(g + 1) * 4])
        assert torch.equal(metas['dn_id_target'][:, slot], ids[:, g * 4:(g + 1) * 4])
    before = metas['dn_anchor'].clone()
    target.project_dn_anchors(lambda a: a + 1)
    torch.testing.assert_close(target.dn_metas['dn_anchor'], before + 1)
    # No-ops.
    target.cache_dn(feature, anchor, cls, valid, None)
    assert target.dn_metas is metas
    off = _v3_target(num_temp_dn_groups=0)
    off.cache_dn(feature, anchor, cls, valid, ids)
    assert off.dn_metas is None


def test_temporal_dn_round_trip_follows_instance_ids():
    target = _v3_target()
    gt_cls, gt_box, gt_ids = _dn_batch()
    torch.manual_seed(1)
    anchor, reg, cls, _, valid, ids = target.get_dn_anchors(gt_cls, gt_box, gt_ids)
    target.cache_dn(torch.randn(2, 30, 8), anchor, cls, valid, ids)
    # Next frame: sample 0 lost instance 12 and moved the others; sample 1 gained instance 22.
    gt_box2 = [_gt((22., 0., 0., 0.3), (-18., -20., 0., 1.0)),
               _gt((15., 16., 0., 0.5), (-15., 16., 0., 0.))]
    gt_cls2 = [torch.tensor([CAR, CONE]), torch.tensor([3, 1])]
    gt_ids2 = [torch.tensor([11, 13]), torch.tensor([21, 22])]
    anchor2, reg2, cls2, _, valid2, ids2 = target.get_dn_anchors(gt_cls2, gt_box2, gt_ids2)
    k = anchor2.shape[1]
    assert k == 5 * 4
    feature = torch.randn(2, 10 + k, 8)
    full_anchor = torch.cat([torch.randn(2, 10, 11), anchor2], dim=1)
    out = target.update_dn(feature, full_anchor, reg2, cls2, valid2, ids2, 10,
                           torch.tensor([True, True]))
    _, _, o_reg, o_cls, o_valid, o_ids = out
    targets = {11: _enc(gt_box2[0][0]), 13: _enc(gt_box2[0][1]), 21: _enc(gt_box2[1][0])}
    for b in range(2):
        for q in range(3 * 4):  # the three temporal groups
            inst = int(o_ids[b, q])
            if inst == 12:  # gone: no target, no class
                assert o_cls[b, q] == -1 and (o_reg[b, q] == 0).all()
            elif inst in targets:
                torch.testing.assert_close(o_reg[b, q], targets[inst])
                assert o_cls[b, q] >= 0
    assert 12 in o_ids[0, :12].tolist() and 11 in o_ids[0, :12].tolist()
    # The last two groups are the current frame's.
    assert torch.equal(o_reg[:, 12:], reg2[:, 12:]) and torch.equal(o_ids[:, 12:], ids2[:, 12:])


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------
def _yaw_box(x, y, z, yaw, dx=0.0):
    return torch.tensor([x + dx, y, z, 1., .5, .3, math.sin(yaw), math.cos(yaw), 1., 0.])


def test_yaw_similarity_has_the_cosine_similaritys_sign_and_no_gradient():
    gen = torch.Generator().manual_seed(0)
    box = torch.randn(500, 10, generator=gen, requires_grad=True)
    target = torch.randn(500, 10, generator=gen)
    target[:5, 6:8] = 0  # zero vectors: cosine 0, dot 0 (neither sign)
    target[5:10, 6:8] = torch.stack([-box[5:10, 7], box[5:10, 6]], -1).detach()  # perpendicular
    dot = SparseBox3DLoss._yaw_similarity(target, box)
    cos = F.cosine_similarity(target[:, 6:8], box[:, 6:8], dim=-1)
    assert not dot.requires_grad
    assert (dot[:10] == 0).all() and (cos[:5] == 0).all()  # cos[5:10]: rounding decides
    assert torch.equal(dot[10:] > 0, cos[10:] > 0) and torch.equal(dot[10:] < 0, cos[10:] < 0)
    assert 100 < int((dot < 0).sum()) < 400  # both signs present: not vacuous


def test_box_loss_toy_batch_against_plain_formulas():
    loss = SparseBox3DLoss(cls_allow_reverse=[BARRIER])
    # Row 0: barrier, target heading opposite to the prediction -> flipped target.
    # Row 1: barrier, same heading -> kept. Row 2: car, opposite heading -> kept (no flip).
    box = torch.stack([_yaw_box(1., 2., 0., 0.2), _yaw_box(0., 0., 1., 1.0),
                       _yaw_box(5., 5., 0., 0.0)])
    target = torch.stack([_yaw_box(1., 2., 0., 0.2 + math.pi, dx=1.0),
                          _yaw_box(0., 0., 1., 1.3, dx=0.5), _yaw_box(5., 5., 0., math.pi)])
    target[:, 2] += torch.tensor([0.0, 0.0, 2.0])
    weight = torch.ones(3, 10)
    weight[:, 3:6] = 0.0
    weight[2] *= 2.0
    quality = torch.tensor([[0.3, -0.2], [1.0, 0.5], [-0.5, 2.0]])
    cls_target = torch.tensor([BARRIER, BARRIER, CAR])
    target_before = target.clone()
    out = loss(box, target, weight, avg_factor=3.0, quality=quality, cls_target=cls_target)
    assert torch.equal(target, target_before)  # not modified in place
    assert sorted(out) == ['loss_box', 'loss_cns', 'loss_yns']

    flipped = target.clone()
    flipped[0, 6:8] = -flipped[0, 6:8]
    box_ref = 0.25 * ((box - flipped).abs() * weight).sum() / 3.0
    dist = torch.tensor([1.0, 0.5, 2.0])  # centre offsets built in above
    t_cns = torch.exp(-dist)
    x = quality[:, 0]
    cns_ref = (-(t_cns * F.logsigmoid(x) + (1 - t_cns) * F.logsigmoid(-x))).sum() / 3.0
    t_yns = torch.tensor([1.0, 1.0, 0.0])  # after the flip, row 0 agrees with its prediction
    p = quality[:, 1].sigmoid()
    yns_ref = torch.where(t_yns > 0, -p.log() * (1 - p) ** 2, -(1 - p).log() * p ** 2).sum() / 3.0
    torch.testing.assert_close(out['loss_box'], box_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out['loss_cns'], cns_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out['loss_yns'], yns_ref, rtol=1e-5, atol=1e-7)

    # Without cls_allow_reverse, row 0 is not flipped: larger box loss, yawness target 0.
    plain = SparseBox3DLoss()(box, target, weight, avg_factor=3.0, quality=quality,
                              cls_target=cls_target)
    unflipped = 0.25 * ((box - target).abs() * weight).sum() / 3.0
    torch.testing.assert_close(plain['loss_box'], unflipped, rtol=1e-5, atol=1e-7)
    assert plain['loss_yns'] != out['loss_yns']


def test_box_loss_suffix_no_quality_empty_and_gradients():
    loss = SparseBox3DLoss(cls_allow_reverse=[BARRIER])
    box = torch.randn(4, 11, requires_grad=True)  # vz is cut off
    quality = torch.randn(4, 2, requires_grad=True)
    target = torch.randn(4, 10)
    out = loss(box, target, torch.ones(4, 10), avg_factor=4, suffix='_dn')
    assert list(out) == ['loss_box_dn']
    out = loss(box, target, None, avg_factor=4, suffix='_2', quality=quality,
               cls_target=torch.tensor([5, 5, 0, 1]))
    assert sorted(out) == ['loss_box_2', 'loss_cns_2', 'loss_yns_2']
    sum(out.values()).backward()
    assert box.grad[:, :10].abs().sum() > 0 and (box.grad[:, 10] == 0).all()
    assert (quality.grad != 0).all()

    empty_box = torch.zeros(0, 10, requires_grad=True)
    empty_q = torch.zeros(0, 2, requires_grad=True)
    out = loss(empty_box, torch.zeros(0, 10), torch.zeros(0, 10), avg_factor=1.0,
               quality=empty_q, cls_target=torch.zeros(0, dtype=torch.long))
    assert sorted(out) == ['loss_box', 'loss_cns', 'loss_yns']
    assert all(float(v) == 0 and v.requires_grad for v in out.values())
    sum(out.values()).backward()
    assert empty_box.grad.shape == (0, 10) and empty_q.grad.shape == (0, 2)
    with pytest.raises(ValueError, match='weight'):
        loss(box, target, torch.ones(4, 9))


@pytest.mark.parametrize('box_weight', [0.25, 0.3])
def test_box_loss_of_stacked_layers_equals_a_call_per_layer(box_weight):
    """``layers=L`` on L blocks of rows (each with its own normaliser, a block whose rows are
    all weighted out, reversed barriers) gives each block's own call: values and gradients."""
    gen = torch.Generator().manual_seed(11)
    layers, rows = 3, 5
    loss = SparseBox3DLoss(loss_box=dict(type='mmdet.L1Loss', loss_weight=box_weight),
                           cls_allow_reverse=[BARRIER])
    box = torch.randn(layers * rows, 11, generator=gen).requires_grad_()
    quality = torch.randn(layers * rows, 2, generator=gen).requires_grad_()
    target = torch.randn(layers * rows, 10, generator=gen)
    weight = torch.rand(layers * rows, 10, generator=gen)
    cls_target = torch.randint(0, 10, (layers * rows, ), generator=gen)
    cls_target[::2] = BARRIER
    row_weight = (torch.rand(layers * rows, generator=gen) > 0.4).float()
    row_weight[rows:2 * rows] = 0  # the second layer matched nothing
    avg = torch.tensor([3.0, 1.0, 4.0])
    for with_quality in (True, False):
        q = quality if with_quality else None
        stacked = loss(box, target, weight, avg_factor=avg, quality=q, cls_target=cls_target,
                       row_weight=row_weight, layers=layers)
        assert list(stacked) == (['loss_box', 'loss_cns', 'loss_yns'] if with_quality
                                 else ['loss_box'])
        assert all(v.shape == (layers, ) for v in stacked.values())
        blocks = [slice(i * rows, (i + 1) * rows) for i in range(layers)]
        per_layer = [loss(box[b], target[b], weight[b], avg_factor=avg[i],
                          quality=None if q is None else q[b], cls_target=cls_target[b],
                          row_weight=row_weight[b]) for i, b in enumerate(blocks)]
        inputs = (box, quality) if with_quality else (box, )
        for key, values in stacked.items():
            want = torch.stack([out[key] for out in per_layer])
            torch.testing.assert_close(values, want, rtol=1e-6, atol=1e-8, msg=key)
            mix = torch.tensor([1.0, -2.0, 0.5])  # each layer's gradient counts
            got = torch.autograd.grad((values * mix).sum(), inputs, retain_graph=True,
                                      allow_unused=True)
            ref = torch.autograd.grad((want * mix).sum(), inputs, retain_graph=True,
                                      allow_unused=True)
            for g, r in zip(got, ref):
                assert (g is None) == (r is None), key
                if r is not None:
                    torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-8, msg=key)
    assert float(stacked['loss_box'][1]) == 0  # the empty layer


def test_box_loss_stacked_layers_edge_cases_and_errors():
    loss = SparseBox3DLoss()
    assert loss.stacks_layers()
    empty = torch.zeros(0, 10, requires_grad=True)
    out = loss(empty, torch.zeros(0, 10), avg_factor=torch.ones(2), quality=torch.zeros(0, 2),
               layers=2)
    assert all(v.shape == (2, ) and v.requires_grad for v in out.values())
    with pytest.raises(ValueError, match=r'\[2\] avg_factor'):
        loss(torch.zeros(4, 10), torch.zeros(4, 10), avg_factor=torch.tensor(2.0), layers=2)
    with pytest.raises(ValueError, match='divisible'):
        loss(torch.zeros(5, 10), torch.zeros(5, 10), avg_factor=torch.ones(2), layers=2)
    summed = SparseBox3DLoss(loss_box=dict(type='mmdet.L1Loss', reduction='sum'))
    assert not summed.stacks_layers()
    with pytest.raises(ValueError, match="reduce by 'mean'"):
        summed(torch.zeros(4, 10), torch.zeros(4, 10), avg_factor=torch.ones(2), layers=2)


def test_box_loss_stacked_layers_with_smooth_l1_and_no_kept_row():
    """mmdet's L1 / smooth-L1 modules return one zero scalar when every weight is 0; with
    ``layers > 1`` each layer gets that zero (the loop's value), row-weighted or not."""
    loss = SparseBox3DLoss(loss_box=dict(type='mmdet.SmoothL1Loss', beta=0.5))
    box = torch.randn(6, 10, requires_grad=True)
    target, avg = torch.randn(6, 10), torch.tensor([2.0, 1.0])
    for kwargs in (dict(row_weight=torch.zeros(6)), dict(weight=torch.zeros(6, 10))):
        out = loss(box, target, avg_factor=avg, layers=2, **kwargs)['loss_box']
        assert out.shape == (2, ) and (out == 0).all()
        out.sum().backward()
    kept = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    stacked = loss(box, target, avg_factor=avg, row_weight=kept, layers=2)['loss_box']
    want = torch.stack([loss(box[:3], target[:3], avg_factor=avg[0], row_weight=kept[:3])[
        'loss_box'], loss(box[3:], target[3:], avg_factor=avg[1], row_weight=kept[3:])[
        'loss_box']])
    torch.testing.assert_close(stacked, want, rtol=1e-6, atol=1e-8)
    assert float(want[0]) > 0


def test_layer_means_is_mmdets_mean_per_block():
    from mmdet.models.losses.utils import weight_reduce_loss

    from turbox_mm.models.losses import layer_means
    elements = torch.rand(6, 4)
    avg = torch.tensor([2.0, 0.0])  # 0: mmdet's eps keeps the division finite
    got = layer_means(elements, 2, avg)
    want = torch.stack([weight_reduce_loss(elements[:3], None, 'mean', avg[0]),
                        weight_reduce_loss(elements[3:], None, 'mean', avg[1])])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match='do not split'):
        layer_means(elements, 4, torch.ones(4))
    with pytest.raises(ValueError, match='one per layer'):
        layer_means(elements, 2, torch.ones(3))


def test_registered_and_built_from_config():
    from turbox_mm.registry import MODELS, TASK_UTILS
    loss = MODELS.build(dict(type='turbox_mm.SparseBox3DLoss', cls_allow_reverse=[BARRIER]))
    assert type(loss.loss_box).__name__ == 'L1Loss' and loss.loss_box.loss_weight == 0.25
    assert type(loss.loss_cns).__name__ == 'CrossEntropyLoss' and loss.loss_cns.use_sigmoid
    assert type(loss.loss_yns).__name__ == 'GaussianFocalLoss'
    target = TASK_UTILS.build(dict(type='turbox_mm.SparseBox3DTarget', num_dn_groups=5,
                                   num_temp_dn_groups=3, dn_noise_scale=V3_NOISE))
    assert isinstance(target, SparseBox3DTarget) and target.dn_metas is None
    assert target.reg_weights == COST_REG_WEIGHTS


@pytest.mark.cuda
def test_cuda_targets_and_loss():
    target = _v3_target()
    gt_cls, gt_box, box_pred = _toy_case()
    dev = torch.device('cuda')
    cls, box, weights = target.sample(torch.zeros(1, 3, 10, device=dev, dtype=torch.float16),
                                      box_pred[None].to(dev, torch.float16),
                                      [gt_cls.to(dev)], [gt_box.to(dev)])
    assert cls.device.type == 'cuda' and cls[0].tolist() == [CONE, 10, CAR]
    gt_cls, gt_box, gt_ids = _dn_batch()
    out = target.get_dn_anchors([c.to(dev) for c in gt_cls], [b.to(dev) for b in gt_box],
                                [i.to(dev) for i in gt_ids])
    assert all(x.device.type == 'cuda' for x in out)
    target.cache_dn(torch.randn(2, 30, 8, device=dev), out[0], out[2], out[4], out[5])
    res = target.update_dn(torch.randn(2, 40, 8, device=dev), torch.cat(
        [torch.randn(2, 10, 11, device=dev), out[0]], 1), out[1], out[2], out[4], out[5], 10,
        torch.tensor([True, False], device=dev))
    assert res[0].shape == (2, 40, 8) and res[5].device.type == 'cuda'
    loss = SparseBox3DLoss(cls_allow_reverse=[BARRIER]).to(dev)
    vals = loss(box[0], box[0], weights[0], avg_factor=2.0,
                quality=torch.zeros(3, 2, device=dev), cls_target=cls[0])
    assert all(torch.isfinite(v) for v in vals.values())


def _layer_case(seed=0, layers=3, queries=12):
    gen = torch.Generator().manual_seed(seed)
    gt_cls = [torch.tensor([CONE, CAR, 3, 7]), torch.zeros(0, dtype=torch.long),
              torch.tensor([BARRIER, CONE])]
    gt_box = [_gt(*[(float(i), -float(i), 1., 0.3 * i) for i in range(len(c))]) if len(c)
              else torch.zeros(0, 9) for c in gt_cls]
    cls_preds = [torch.randn(3, queries, 10, generator=gen) for _ in range(layers)]
    box_preds = [torch.randn(3, queries, 11, generator=gen) * 2 for _ in range(layers)]
    return cls_preds, box_preds, gt_cls, gt_box


def _cuda_layer_case():
    """:func:`_layer_case` at Sparse4D's size (6 layers, 900 queries), on the GPU."""
    return tuple([t.cuda() for t in part] for part in _layer_case(layers=6, queries=900))


def test_sample_layers_equals_one_scipy_solve_per_layer_and_sample():
    """All layers and samples in one transfer give the matches of solving each matrix alone,
    the way the step did before (one host copy per layer and sample)."""
    from scipy.optimize import linear_sum_assignment
    target = _v3_target()
    cls_preds, box_preds, gt_cls, gt_box = _layer_case()
    got = target.sample_layers(cls_preds, box_preds, gt_cls, gt_box)
    assert len(got) == 3
    for layer, (cls_pred, box_pred) in enumerate(zip(cls_preds, box_preds)):
        want_cls = torch.full((3, 12), 10)
        for b, (labels, boxes) in enumerate(zip(gt_cls, gt_box)):
            if labels.numel() == 0:
                continue
            enc = torch.stack([_enc(row) for row in boxes])
            weights = target._gt_weights(labels, torch.ones_like(enc, dtype=torch.bool))
            cost = target._cls_cost(cls_pred[b], labels) + target._box_cost(
                box_pred[b], enc, weights)
            rows, cols = linear_sum_assignment(cost.double().numpy())
            want_cls[b, torch.from_numpy(rows)] = labels[torch.from_numpy(cols)]
            torch.testing.assert_close(got[layer][1][b, torch.from_numpy(rows)],
                                       enc[torch.from_numpy(cols)])
        assert torch.equal(got[layer][0], want_cls)
        single = target.sample(cls_pred, box_pred, gt_cls, gt_box)
        for a, w in zip(single, got[layer]):
            assert torch.equal(a, w)


def test_sample_layers_checks_shapes_and_labels():
    target = _v3_target()
    cls_preds, box_preds, gt_cls, gt_box = _layer_case(layers=2)
    with pytest.raises(ValueError, match=r'layer 1 has shape \(3, 5, 10\)'):
        target.sample_layers([cls_preds[0], cls_preds[1][:, :5]],
                             [box_preds[0], box_preds[1][:, :5]], gt_cls, gt_box)
    with pytest.raises(ValueError, match='need one or more'):
        target.sample_layers([], [], gt_cls, gt_box)
    with pytest.raises(ValueError, match=r'layer 1 has dtypes torch.float64 / torch.float32'):
        target.sample_layers([cls_preds[0], cls_preds[1].double()], box_preds, gt_cls, gt_box)
    with pytest.raises(ValueError, match=r'layer 1 has dtypes torch.float32 / torch.float64'):
        target.sample_layers(cls_preds, [box_preds[0], box_preds[1].double()], gt_cls, gt_box)
    bad = [gt_cls[0], gt_cls[1], torch.tensor([BARRIER, 12])]
    with pytest.raises(ValueError, match=r'cls_target\[2\] holds labels outside \[0, 10\): '
                                         r'\[5, 12\]'):
        target.sample_layers(cls_preds, box_preds, bad, gt_box)
    with pytest.raises(ValueError, match=r'cls_target\[0\] holds labels outside'):
        target.get_dn_anchors([torch.tensor([-2, 1, 1, 1]), gt_cls[1], gt_cls[2]], gt_box)


def test_device_matcher_gives_the_host_matches_and_defers_the_label_check():
    """matcher='device' (turbox_mm::lsap, its kernel in Triton's interpreter here): the targets,
    indices and denoising queries of the host path; a bad label still raises its named error,
    at the next call once its flags have arrived (on CPU tensors: at once)."""
    from turbox_mm.ops import dispatch
    cls_preds, box_preds, gt_cls, gt_box = _layer_case(layers=2)
    host, device = _v3_target(matcher='host'), _v3_target(matcher='device')
    with pytest.raises(ValueError, match="matcher must be 'host', 'device' or None"):
        _v3_target(matcher='gpu')
    want = host.sample_layers(cls_preds, box_preds, gt_cls, gt_box)
    with dispatch.kernel_on_cpu():
        got = device.sample_layers(cls_preds, box_preds, gt_cls, gt_box)
        for g, w in zip(got, want):
            assert all(torch.equal(a, b) for a, b in zip(g, w))
        for (q, g), (wq, wg) in zip(device.indices, host.indices):
            assert torch.equal(q, wq) and torch.equal(g, wg)
        torch.manual_seed(3)
        dn_got = device.get_dn_anchors(gt_cls, gt_box)
        torch.manual_seed(3)
        dn_want = host.get_dn_anchors(gt_cls, gt_box)
        assert all(torch.equal(a, b) for a, b in zip(dn_got[:5], dn_want[:5]))
        bad = [gt_cls[0], gt_cls[1], torch.tensor([BARRIER, 12])]
        with pytest.raises(ValueError, match=r'cls_target\[2\] holds labels outside'):
            device.sample_layers(cls_preds, box_preds, bad, gt_box)


@pytest.mark.parametrize('impl, matcher, want', [
    ('stock', None, 'host'), ('turbox', None, 'device'), ('turbox', 'host', 'host'),
    ('stock', 'device', 'device')])
def test_the_head_picks_the_matcher_from_its_op_impl(impl, matcher, want):
    """The tiny config's head: a sampler that leaves the matcher open gets the device one
    under op_impl='turbox', the host one under 'stock'; a sampler's own choice stands."""
    import copy

    from mmengine.config import Config

    import turbox_mm.models  # noqa: F401  (registers the models)
    from turbox_mm.registry import MODELS
    head = copy.deepcopy(Config.fromfile('configs/sparse4d/sparse4dv3_tiny_stock.py').model.head)
    head.op_impl = impl
    head.sampler.matcher = matcher
    head.instance_bank.anchor = [[0.0] * 11] * head.instance_bank.num_anchor  # no anchor file
    assert MODELS.build(head).sampler.matcher == want


@pytest.mark.cuda
def test_cuda_device_matcher_takes_no_host_sync():
    """With matcher='device', sample_layers and get_dn_anchors do not wait for the device; the
    matches are the host path's."""
    from turbox_mm.benchmark.syncs import SyncCounter
    host, device = _v3_target(matcher='host'), _v3_target(matcher='device')
    cls_preds, box_preds, gt_cls, gt_box = _cuda_layer_case()
    want = host.sample_layers(cls_preds, box_preds, gt_cls, gt_box)
    device.sample_layers(cls_preds, box_preds, gt_cls, gt_box)  # warm-up: kernel compiled
    device.get_dn_anchors(gt_cls, gt_box)
    torch.cuda.synchronize()
    with SyncCounter() as syncs:
        got = device.sample_layers(cls_preds, box_preds, gt_cls, gt_box)
        device.get_dn_anchors(gt_cls, gt_box)
    assert syncs.total == 0, syncs.top()
    for g, w in zip(got, want):
        assert all(torch.equal(a, b) for a, b in zip(g, w))


@pytest.mark.cuda
def test_cuda_targets_take_one_host_sync_per_step_part():
    """sample_layers (all layers) and get_dn_anchors wait for the device once each; the
    temporal denoising steps not at all."""
    from turbox_mm.benchmark.syncs import SyncCounter
    target = _v3_target()
    cls_preds, box_preds, gt_cls, gt_box = _cuda_layer_case()
    dev = torch.device('cuda')
    ids = [torch.arange(c.numel(), device=dev) for c in gt_cls]
    want = [target.sample(c, b, gt_cls, gt_box) for c, b in zip(cls_preds, box_preds)]
    want_indices = target.indices  # the last layer's
    target.get_dn_anchors(gt_cls, gt_box, ids)  # warm-up: constants uploaded once
    torch.cuda.synchronize()
    with SyncCounter() as syncs:
        got = target.sample_layers(cls_preds, box_preds, gt_cls, gt_box)
    assert syncs.total == 1, syncs.top()
    for g, w in zip(got, want):
        assert all(torch.equal(a, b) for a, b in zip(g, w))
    for (q, g), (wq, wg) in zip(target.indices, want_indices):
        assert q.is_cuda and torch.equal(q, wq) and torch.equal(g, wg)
    with SyncCounter() as syncs:
        out = target.get_dn_anchors(gt_cls, gt_box, ids)
    assert syncs.total == 1, syncs.top()
    with SyncCounter() as syncs:
        target.cache_dn(torch.randn(3, out[0].shape[1], 8, device=dev), out[0], out[2], out[4],
                        out[5])
        target.update_dn(torch.randn(3, 10 + out[0].shape[1], 8, device=dev),
                         torch.cat([torch.randn(3, 10, 11, device=dev), out[0]], 1), out[1],
                         out[2], out[4], out[5], 10, torch.ones(3, dtype=torch.bool, device=dev))
    assert syncs.total == 0, syncs.top()


@pytest.mark.parametrize('all_out', [False, True])
def test_row_weights_equal_indexing_the_rows_away(all_out):
    """The step keeps rows in or out of the box loss by 0/1 weights (no host wait); values and
    gradients equal those of the indexed subset, also when no row is left."""
    gen = torch.Generator().manual_seed(3)
    box = torch.randn(40, 11, generator=gen).requires_grad_()
    target = torch.randn(40, 10, generator=gen)
    weight = torch.rand(40, 10, generator=gen)
    quality = torch.randn(40, 2, generator=gen).requires_grad_()
    cls = torch.randint(0, 10, (40, ), generator=gen)
    keep = torch.zeros(40, dtype=torch.bool) if all_out else torch.rand(40, generator=gen) > 0.4
    loss = SparseBox3DLoss(cls_allow_reverse=[BARRIER])
    got = loss(box, target, weight=weight, avg_factor=7.0, quality=quality, cls_target=cls,
               row_weight=keep.float())
    grads = torch.autograd.grad(sum(got.values()), (box, quality))
    want = loss(box[keep], target[keep], weight=weight[keep], avg_factor=7.0,
                quality=quality[keep], cls_target=cls[keep])
    want_grads = torch.autograd.grad(sum(want.values()), (box, quality), allow_unused=True)
    assert sorted(got) == sorted(want)
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, torch.zeros_like(g) if w is None else w, rtol=1e-6,
                                   atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Stored matches (SparseDrive's motion loss reads them)
# ----------------------------------------------------------------------------------------------
def _random_case(sizes, queries, layers=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gt_cls = [torch.randint(0, 10, (n, ), generator=gen) for n in sizes]
    gt_box = [torch.cat([torch.randn(n, 3, generator=gen) * 3,
                         torch.rand(n, 3, generator=gen) * 3 + 0.5,
                         torch.randn(n, 3, generator=gen)], 1) for n in sizes]
    cls_preds = [torch.randn(len(sizes), queries, 10, generator=gen) for _ in range(layers)]
    box_preds = [torch.randn(len(sizes), queries, 11, generator=gen) * 2 for _ in range(layers)]
    return cls_preds, box_preds, gt_cls, gt_box


def _scipy_pairs(target, cls_pred, box_pred, labels, boxes):
    """The reference: one scipy solve on the cost written out with the plain encoding."""
    from scipy.optimize import linear_sum_assignment
    if labels.numel() == 0:
        return [], []
    enc = torch.stack([_enc(row) for row in boxes])
    weights = target._gt_weights(labels, torch.ones_like(enc, dtype=torch.bool))
    cost = target._cls_cost(cls_pred, labels) + target._box_cost(box_pred, enc, weights)
    rows, cols = linear_sum_assignment(cost.double().numpy())
    return rows.tolist(), cols.tolist()


@pytest.mark.parametrize('sizes, queries', [([3, 0], 8), ([6, 2], 4), ([0, 5], 5), ([7], 3),
                                            ([0, 0], 4)])
def test_indices_of_sample_and_last_layer_agree_and_reproduce_targets(sizes, queries):
    """B = 1 and 2, a sample without GT, more GT than queries, a batch without GT: sample() on
    the last layer and sample_layers() store the same pairs, those of scipy on the last layer's
    cost, and the pairs index the returned targets."""
    target = _v3_target()
    assert target.indices is None
    cls_preds, box_preds, gt_cls, gt_box = _random_case(sizes, queries)
    got = target.sample_layers(cls_preds, box_preds, gt_cls, gt_box)
    layered = target.indices
    single = target.sample(cls_preds[-1], box_preds[-1], gt_cls, gt_box)
    assert len(layered) == len(target.indices) == len(sizes)
    for b, n in enumerate(sizes):
        want_q, want_g = _scipy_pairs(target, cls_preds[-1][b], box_preds[-1][b], gt_cls[b],
                                      gt_box[b])
        assert len(want_q) == min(queries, n)
        for q, g in (layered[b], target.indices[b]):
            assert q.dtype == g.dtype == torch.long and q.shape == g.shape == (min(queries, n), )
            assert q.tolist() == want_q and g.tolist() == want_g
        q, g = layered[b]
        enc = SparseBox3DTarget().encode_reg_target([gt_box[b]])[0]
        for cls, box, _ in (got[-1], single):
            assert torch.equal(cls[b, q], gt_cls[b][g])
            torch.testing.assert_close(box[b, q], enc[g], rtol=0, atol=0)
            rest = torch.ones(queries, dtype=torch.bool)
            rest[q] = False
            assert (cls[b, rest] == 10).all() and (box[b, rest] == 0).all()


def test_indices_are_the_last_layers_and_follow_the_last_call():
    target = _v3_target()
    cls_preds, box_preds, gt_cls, gt_box = _random_case([5, 4], 6, layers=2, seed=4)
    firsts = []
    for c, b in zip(cls_preds, box_preds):
        target.sample(c, b, gt_cls, gt_box)
        firsts.append(target.indices)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(*firsts))  # the layers differ
    target.sample_layers(cls_preds, box_preds, gt_cls, gt_box)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(target.indices, firsts[1]))
    target.sample_layers(cls_preds[:1], box_preds[:1], gt_cls, gt_box)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(target.indices, firsts[0]))
    target.sample(cls_preds[0], box_preds[0], [gt_cls[0][:0], gt_cls[1]],
                  [gt_box[0][:0], gt_box[1]])
    assert target.indices[0][0].numel() == 0 and target.indices[1][0].numel() == 4


def test_storing_indices_adds_no_host_sync():
    """CPU stand-in for CUDA's sync count: sample_layers() still only has solve_batched's two
    copies (costs and the label check riding along), sample() five per sample with GT (label
    check, cost copy, two index uploads), none for the sample without GT."""
    from turbox_mm.benchmark.sync_prone import SyncProneOps
    target = _v3_target()
    cls_preds, box_preds, gt_cls, gt_box = _layer_case(layers=4)
    target.sample_layers(cls_preds, box_preds, gt_cls, gt_box)  # warm-up: constants uploaded
    with SyncProneOps(backward_sources=False) as found:
        target.sample_layers(cls_preds, box_preds, gt_cls, gt_box)
    assert found.total == 2, found.table()
    assert {f.file.replace('\\', '/').rsplit('/', 1)[-1] for f in found.findings} == {
        'matching.py'}, found.table()
    with SyncProneOps(backward_sources=False) as stock:
        target.sample(cls_preds[0], box_preds[0], gt_cls, gt_box)
    assert stock.total == 5 * 2, stock.table()
