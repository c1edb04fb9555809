"""SparseDrive's map targets (SparsePoint3DTarget) and line loss (SparseLineLoss)."""
import itertools
import math

import pytest
import torch
from mmengine.registry import DefaultScope

from turbox_mm.models.sparsedrive.line_loss import LinesL1Loss, SparseLineLoss
from turbox_mm.models.sparsedrive.map_match_cost import (MapQueriesCost, focal_class_cost,
                                                         lines_l1_cost, normalize_lines)
from turbox_mm.models.sparsedrive.map_target import DEFAULT_ASSIGNER, SparsePoint3DTarget
from turbox_mm.registry import MODELS, TASK_UTILS

ROI = (30.0, 60.0)
P, D, O, C = 20, 40, 38, 3
PAD = 1e5  # VectorizeMap's padding orders of an open polyline


# ----------------------------------------------------------------------------------------------
# Ground truth in VectorizeMap's layout and a loop reference of the cost
# ----------------------------------------------------------------------------------------------
def _orders(points, closed):
    """``[38, 20, 2]`` orders of one polyline: a closed one's 19 rotations forward and
    backward (re-closed), an open one's two directions then 36 padding rows."""
    if not closed:
        pad = torch.full((O - 2, P, 2), PAD, dtype=points.dtype)
        return torch.cat([torch.stack([points, points.flip(0)]), pad])
    out = []
    for ring in (points[:-1], points[:-1].flip(0)):
        for shift in range(P - 1):
            rolled = ring.roll(-shift, 0)
            out.append(torch.cat([rolled, rolled[:1]]))
    return torch.stack(out)


def _instance(gen, closed):
    """A random polyline in metres inside the ROI, in its 38 orders ``[38, 20, 2]``."""
    centre = (torch.rand(2, generator=gen) - 0.5) * torch.tensor([20.0, 40.0])
    if closed:
        angle = torch.linspace(0, 2 * math.pi, P)
        angle[-1] = 0.0  # exactly closed
        radius = 1 + 3 * torch.rand(1, generator=gen)
        points = centre + radius * torch.stack([angle.cos(), angle.sin()], -1)
    else:
        steps = torch.randn(P, 2, generator=gen) * 0.5 + torch.tensor([0.2, 1.0])
        points = centre + steps.cumsum(0)
    return _orders(points, closed)


def _gts(gen, num_gt):
    """Labels ``[G]`` and points ``[G, 38, 20, 2]``, alternating open and closed lines."""
    if num_gt == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, O, P, 2)
    pts = torch.stack([_instance(gen, closed=g % 2 == 1) for g in range(num_gt)])
    return torch.randint(0, C, (num_gt, ), generator=gen), pts


def _preds(gen, pts, num_query):
    """``[M, 40]`` predictions: noisy copies of random orders of the GTs, then random lines."""
    out = (torch.rand(num_query, P, 2, generator=gen) - 0.5) * torch.tensor([30.0, 60.0])
    for q in range(min(num_query, pts.shape[0])):
        order = int(torch.randint(0, 2 if q % 2 == 0 else O, (1, ), generator=gen))
        out[q] = pts[q, order] + torch.randn(P, 2, generator=gen) * 0.05
    return out[torch.randperm(num_query, generator=gen)].flatten(1)


def _ref_pair(logits, pred, label, orders, alpha=0.25, gamma=2.0, eps=1e-12, beta=0.01):
    """Cost of one (query, instance) pair with Python loops (design doc section 4): focal cost
    at the label, plus 10 x the smallest smooth-L1 over the orders of the normalised
    coordinates, summed over the 40 numbers / 20 points. Returns ``(cost, best order)``."""
    p = 1 / (1 + math.exp(-float(logits[label])))
    pos = -math.log(p + eps) * alpha * (1 - p) ** gamma
    neg = -math.log(1 - p + eps) * (1 - alpha) * p ** gamma
    best, best_order = math.inf, -1
    for o in range(orders.shape[0]):
        total = 0.0
        for k in range(D):
            extent = ROI[k % 2]
            a = (float(pred[k]) + extent / 2) / (extent + 1e-5)
            b = (float(orders[o, k]) + extent / 2) / (extent + 1e-5)
            z = abs(a - b)
            total += 0.5 * z * z / beta if z < beta else z - 0.5 * beta
        total /= P
        if total < best:
            best, best_order = total, o
    return (pos - neg) + 10.0 * best, best_order


def _ref_matrix(logits, preds, labels, pts):
    orders = pts.flatten(2).double()
    found = [[_ref_pair(logits[q], preds[q], int(labels[g]), orders[g])
              for g in range(labels.shape[0])] for q in range(preds.shape[0])]
    cost = torch.tensor([[c for c, _ in row] for row in found], dtype=torch.float64)
    order = torch.tensor([[o for _, o in row] for row in found])
    return cost, order


# ----------------------------------------------------------------------------------------------
# Costs
# ----------------------------------------------------------------------------------------------
def test_normalisation_is_upstreams_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    lines = (torch.rand(7, D, generator=gen) - 0.5) * 80
    upstream = lines.view(7, P, -1) - (-lines.new_tensor([ROI[0] / 2, ROI[1] / 2]))
    upstream = (upstream / (lines.new_tensor([ROI[0], ROI[1]]) + 1e-5)).flatten(-2)
    assert torch.equal(normalize_lines(lines, P, ROI), upstream)
    # x first: the ROI's far corner is just below 1, its near corner 0
    corner = torch.tensor([[-15.0, -30.0] * P, [15.0, 30.0] * P])
    out = normalize_lines(corner, P, ROI)
    assert out[0].abs().max() == 0
    assert torch.allclose(out[1], torch.tensor([30 / 30.00001, 60 / 60.00001] * P))
    assert normalize_lines(torch.zeros(0, 38, D), P, ROI).shape == (0, 38, D)
    with pytest.raises(ValueError, match='2 \\* num_sample = 40'):
        normalize_lines(torch.zeros(3, 38), P, ROI)


def test_focal_cost_equals_mmdets():
    from mmdet.models.task_modules.assigners.match_cost import FocalLossCost
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, C, generator=gen) * 3
    labels = torch.tensor([2, 0, 2, 1])
    want = FocalLossCost(weight=1.5)._focal_loss_cost(logits, labels)
    assert torch.equal(focal_class_cost(logits, labels, weight=1.5), want)
    batched = focal_class_cost(torch.stack([logits, logits]), torch.stack([labels, labels]))
    assert batched.shape == (2, 6, 4)


def test_cost_against_a_loop_reference_over_38_orders():
    gen = torch.Generator().manual_seed(2)
    labels, pts = _gts(gen, 2)  # instance 0 open (2 real orders + padding), 1 closed (38)
    preds = _preds(gen, pts, 3)
    reverse = pts[0, 1].flatten() + torch.randn(D, generator=gen) * 0.05  # the open line, back
    preds = torch.cat([preds, reverse[None]])
    logits = torch.randn(4, C, generator=gen)
    cost_fn = SparsePoint3DTarget().cost
    cost, order = cost_fn(logits, normalize_lines(preds, P, ROI), labels,
                          normalize_lines(pts.flatten(2), P, ROI))
    ref_cost, ref_order = _ref_matrix(logits, preds, labels, pts)
    assert cost.shape == order.shape == (4, 2)
    torch.testing.assert_close(cost.double(), ref_cost, rtol=1e-5, atol=1e-5)
    assert torch.equal(order, ref_order)
    assert (order[:, 0] < 2).all()  # the padding orders of the open line never win
    assert int(order[3, 0]) == 1 and order[:, 1].max() > 1  # reversed; a rotated ring


def test_l1_cost_without_beta_is_upstreams_cdist():
    gen = torch.Generator().manual_seed(3)
    lines, gt = torch.rand(5, D, generator=gen), torch.rand(4, 6, D, generator=gen)
    cost, order = lines_l1_cost(lines, gt, weight=2.0, beta=0.0)
    upstream = torch.cdist(lines, gt.flatten(0, 1), p=1) / P
    want, want_order = upstream.view(5, 4, 6).min(2)
    torch.testing.assert_close(cost, want * 2.0)
    assert torch.equal(order, want_order)


# ----------------------------------------------------------------------------------------------
# Assignment and targets
# ----------------------------------------------------------------------------------------------
def test_assignment_is_optimal_against_brute_force_and_targets_follow_it():
    gen = torch.Generator().manual_seed(4)
    target = SparsePoint3DTarget()
    for _ in range(3):
        labels, pts = _gts(gen, 3)
        preds = _preds(gen, pts, 4)
        logits = torch.randn(4, C, generator=gen)
        cls, box, weights = target.sample(logits[None], preds[None], [labels], [pts])
        ref_cost, ref_order = _ref_matrix(logits, preds, labels, pts)
        best = min(sum(float(ref_cost[q, g]) for g, q in enumerate(qs))
                   for qs in itertools.permutations(range(4), 3))
        query, gt_idx = target.indices[0]
        assert query.tolist() == sorted(query.tolist()) and len(query) == 3
        assert math.isclose(float(ref_cost[query, gt_idx].sum()), best, rel_tol=1e-6)
        for q, g in zip(query.tolist(), gt_idx.tolist()):
            assert int(cls[0, q]) == int(labels[g])
            assert torch.equal(box[0, q], pts[g, int(ref_order[q, g])].flatten())
        unmatched = torch.ones(4, dtype=torch.bool)
        unmatched[query] = False
        assert (cls[0, unmatched] == C).all()  # background = num_cls
        assert box[0, unmatched].abs().sum() == 0
        assert torch.equal(weights[0], (~unmatched).float()[:, None].expand(4, D))


def test_sample_without_ground_truth_and_batch_of_one():
    target = SparsePoint3DTarget()
    gen = torch.Generator().manual_seed(5)
    labels, pts = _gts(gen, 2)
    cls, box, weights = target.sample(torch.zeros(2, 5, C), torch.zeros(2, 5, D),
                                      [labels, labels[:0]], [pts, torch.zeros(0, O, P, 2)])
    assert cls.dtype == torch.long and box.shape == weights.shape == (2, 5, D)
    assert (cls[1] == C).all() and box[1].abs().sum() == 0 and weights[1].abs().sum() == 0
    assert int((cls[0] < C).sum()) == 2 and int(weights[0].sum()) == 2 * D
    assert [len(q) for q, _ in target.indices] == [2, 0]
    assert target.indices[1][0].dtype == torch.long
    # [G, 38, 40] ground truth gives the same
    again = target.sample(torch.zeros(2, 5, C), torch.zeros(2, 5, D), [labels, labels[:0]],
                          [pts.flatten(2), torch.zeros(0, O, D)])
    assert all(torch.equal(a, b) for a, b in zip(again, (cls, box, weights)))


def _layer_case(seed, num_gts, layers=3, num_query=6):
    gen = torch.Generator().manual_seed(seed)
    gts = [_gts(gen, n) for n in num_gts]
    cls = [torch.randn(len(num_gts), num_query, C, generator=gen) for _ in range(layers)]
    pts = [torch.stack([_preds(gen, p, num_query) for _, p in gts]) for _ in range(layers)]
    return cls, pts, [g[0] for g in gts], [g[1] for g in gts]


@pytest.mark.parametrize('num_gts', [[3, 0], [0, 2], [5, 0, 2], [8, 1], [0, 0]])
def test_sample_layers_is_sample_layer_by_layer(num_gts):
    """One transfer for all layers and samples gives sample()'s targets exactly, G = 0
    samples and more instances than queries (8 > 6) included."""
    cls, pts, labels, gt = _layer_case(sum(num_gts) + len(num_gts), num_gts)
    target = SparsePoint3DTarget()
    got = target.sample_layers(cls, pts, labels, gt)
    batched_indices = target.indices
    assert len(got) == len(cls)
    for layer, (c, p) in enumerate(zip(cls, pts)):
        want = target.sample(c, p, labels, gt)
        for a, b in zip(got[layer], want):
            assert a.dtype == b.dtype and torch.equal(a, b)
    # indices after sample_layers: the last layer's (sample() was last called on it)
    assert len(batched_indices) == len(num_gts)
    for (q1, g1), (q2, g2), n in zip(batched_indices, target.indices, num_gts):
        assert torch.equal(q1, q2) and torch.equal(g1, g2) and len(q1) == min(6, n)


def test_sample_layers_takes_flat_gt_and_unequal_order_counts():
    cls, pts, labels, gt = _layer_case(11, [2, 3])
    target = SparsePoint3DTarget()
    want = target.sample_layers(cls, pts, labels, gt)
    got = target.sample_layers(cls, pts, labels, [gt[0].flatten(2), gt[1]])
    assert all(torch.equal(a, b) for w, g in zip(want, got) for a, b in zip(w, g))
    # a sample with fewer orders is padded with copies of its first: same as sample()
    short = [gt[0][:, :2], gt[1]]
    got = target.sample_layers(cls, pts, labels, short)
    for layer, (c, p) in enumerate(zip(cls, pts)):
        assert all(torch.equal(a, b) for a, b in zip(got[layer],
                                                     target.sample(c, p, labels, short)))


@pytest.mark.parametrize('num_gts', [[3, 0], [8, 1], [0, 0]])
def test_device_matcher_gives_the_host_targets(num_gts):
    """matcher='device' (turbox_mm::lsap in Triton's interpreter here): the host path's
    targets and indices; a bad label still raises its named error (CPU flags: at once)."""
    from turbox_mm.ops import dispatch
    cls, pts, labels, gt = _layer_case(sum(num_gts) + 40, num_gts)
    host, device = SparsePoint3DTarget(matcher='host'), SparsePoint3DTarget(matcher='device')
    want = host.sample_layers(cls, pts, labels, gt)
    with dispatch.kernel_on_cpu():
        got = device.sample_layers(cls, pts, labels, gt)
        if sum(num_gts):
            bad = [torch.full_like(labels[0], 3), *labels[1:]] if num_gts[0] else None
            if bad is not None:
                with pytest.raises(ValueError, match=r'gt labels\[0\] hold values outside'):
                    device.sample_layers(cls, pts, bad, gt)
    assert all(torch.equal(a, b) for w, g in zip(want, got) for a, b in zip(w, g))
    for (q1, g1), (q2, g2) in zip(device.indices, host.indices):
        assert torch.equal(q1, q2) and torch.equal(g1, g2)
    with pytest.raises(ValueError, match="matcher must be 'host', 'device' or None"):
        SparsePoint3DTarget(matcher='gpu')


def test_sample_layers_needs_one_host_copy():
    """The CPU stand-in for CUDA's sync count: only solve_batched's copies of the costs (and
    of the label check riding along, non-blocking on CUDA); sample() copies per sample and
    layer."""
    from turbox_mm.benchmark.sync_prone import SyncProneOps
    cls, pts, labels, gt = _layer_case(12, [3, 0, 2], layers=4)
    target = SparsePoint3DTarget()
    target.sample_layers(cls, pts, labels, gt)  # warm-up: constants uploaded once
    with SyncProneOps(backward_sources=False) as found:
        target.sample_layers(cls, pts, labels, gt)
    assert 1 <= found.total <= 2, found.table()
    assert {f.file.replace('\\', '/').rsplit('/', 1)[-1] for f in found.findings} == {
        'matching.py'}, found.table()
    with SyncProneOps(backward_sources=False) as stock:
        for c, p in zip(cls, pts):
            target.sample(c, p, labels, gt)
    assert stock.total >= 4 * 2, stock.table()


@pytest.mark.cuda
def test_cuda_sample_layers_one_sync_and_equal_to_sample():
    """At the map head's sizes (6 layers, 100 queries, 38 orders): one host sync for all
    layers, and sample()'s targets exactly (the device sums must not depend on the batch)."""
    from turbox_mm.benchmark.syncs import SyncCounter
    dev = torch.device('cuda')
    cls, pts, labels, gt = _layer_case(14, [30, 0, 7], layers=6, num_query=100)
    cls, pts = [c.to(dev) for c in cls], [p.to(dev) for p in pts]
    labels, gt = [c.to(dev) for c in labels], [g.to(dev) for g in gt]
    target = SparsePoint3DTarget()
    want = [target.sample(c, p, labels, gt) for c, p in zip(cls, pts)]
    torch.cuda.synchronize()
    with SyncCounter() as syncs:
        got = target.sample_layers(cls, pts, labels, gt)
    assert syncs.total == 1, syncs.sources
    for g, w in zip(got, want):
        assert all(torch.equal(a, b) for a, b in zip(g, w))


def test_config_errors_and_registry():
    target = TASK_UTILS.build(dict(type='turbox_mm.SparsePoint3DTarget', assigner=DEFAULT_ASSIGNER,
                                   num_cls=3, num_sample=20, roi_size=(30, 60)))
    assert isinstance(target, SparsePoint3DTarget) and isinstance(target.cost, MapQueriesCost)
    assert (target.num_dn_groups, target.num_temp_dn_groups, target.dn_metas) == (0, 0, None)
    assert target.get_dn_anchors([], []) is None
    cost = target.cost
    assert (cost.cls_weight, cost.alpha, cost.gamma, cost.eps) == (1.0, 0.25, 2.0, 1e-12)
    assert (cost.reg_weight, cost.beta, cost.permute) == (10.0, 0.01, True)
    scoped = dict(DEFAULT_ASSIGNER, cost=dict(DEFAULT_ASSIGNER['cost'],
                                              cls_cost=dict(type='mmdet.FocalLossCost')))
    assert SparsePoint3DTarget(assigner=scoped).cost.cls_weight == 1.0

    def with_cost(**kw):
        return dict(DEFAULT_ASSIGNER, cost=dict(DEFAULT_ASSIGNER['cost'], **kw))

    with pytest.raises(ValueError, match='HungarianLinesAssigner'):
        SparsePoint3DTarget(assigner=dict(DEFAULT_ASSIGNER, type='HungarianAssigner'))
    with pytest.raises(ValueError, match='iou_cost'):
        SparsePoint3DTarget(assigner=with_cost(iou_cost=dict(type='IoUCost')))
    with pytest.raises(ValueError, match='FocalLossCost'):
        SparsePoint3DTarget(assigner=with_cost(cls_cost=dict(type='ClassificationCost')))
    with pytest.raises(ValueError, match="does not take \\['sigma'\\]"):
        SparsePoint3DTarget(assigner=with_cost(reg_cost=dict(type='LinesL1Cost', sigma=1)))
    with pytest.raises(ValueError, match='denoising'):
        SparsePoint3DTarget(num_dn_groups=2)


def test_permute_off_uses_the_single_order():
    assigner = dict(DEFAULT_ASSIGNER, cost=dict(
        DEFAULT_ASSIGNER['cost'], reg_cost=dict(type='LinesL1Cost', weight=10.0, beta=0.01)))
    target = SparsePoint3DTarget(assigner=assigner)
    gen = torch.Generator().manual_seed(6)
    labels, pts = _gts(gen, 2)
    preds = _preds(gen, pts, 4)[None]
    cls, box, _ = target.sample(torch.zeros(1, 4, C), preds, [labels], [pts[:, 0]])
    query, gt_idx = target.indices[0]
    assert torch.equal(box[0, query], pts[gt_idx, 0].flatten(1))
    with pytest.raises(ValueError, match=r'\[G, num_sample, 2\]'):
        target.sample(torch.zeros(1, 4, C), preds, [labels], [pts])


def test_bad_input_is_named():
    target = SparsePoint3DTarget()
    cls, pts, labels, gt = _layer_case(13, [2, 1], layers=2)
    bad = [labels[0], torch.tensor([3])]
    with pytest.raises(ValueError, match=r'gt labels\[1\] hold values outside \[0, 3\): \[3\]'):
        target.sample(cls[0], pts[0], bad, gt)
    with pytest.raises(ValueError, match=r'gt labels\[1\] hold values outside \[0, 3\): \[3\]'):
        target.sample_layers(cls, pts, bad, gt)
    with pytest.raises(ValueError, match='num_cls=3'):
        target.sample(torch.zeros(2, 6, 4), pts[0], labels, gt)
    with pytest.raises(ValueError, match='40 numbers per query'):
        target.sample(cls[0], pts[0][..., :38], labels, gt)
    with pytest.raises(ValueError, match=r'gt points\[0\] must be'):
        target.sample(cls[0], pts[0], labels, [gt[0][..., :1], gt[1]])
    with pytest.raises(ValueError, match=r'gt labels\[1\] must be \[G\] with G = 1'):
        target.sample(cls[0], pts[0], [labels[0], labels[0]], gt)
    with pytest.raises(ValueError, match='layer 1 has shape'):
        target.sample_layers([cls[0], cls[1][:, :3]], [pts[0], pts[1][:, :3]], labels, gt)
    with pytest.raises(ValueError, match='need one or more'):
        target.sample_layers([], [], labels, gt)


# ----------------------------------------------------------------------------------------------
# Line loss
# ----------------------------------------------------------------------------------------------
def test_line_loss_hand_computed():
    loss = SparseLineLoss()
    pred = torch.zeros(2, D)
    target = torch.stack([torch.tensor([3.0, 6.0] * P), torch.tensor([0.15, 0.3] * P)])
    out = loss(pred, target, avg_factor=torch.tensor(2.0), suffix='_3')
    # Row 0: normalised offsets 3 / 30.00001 and 6 / 60.00001 (both 0.1 - 3e-8 > beta):
    #   20 x (0.0999999667 - 0.005) + 20 x (0.0999999833 - 0.005) = 3.7999990.
    # Row 1: 0.15 / 30.00001 and 0.3 / 60.00001 (~0.005 < beta): 0.5 d^2 / 0.01 each,
    #   40 x 0.00124999937 = 0.0499999750.
    # Sum 3.8499990 / (2 + float32 eps) / 20 points x 10 = 0.96249969.
    assert list(out) == ['loss_line_3']
    assert math.isclose(float(out['loss_line_3']), 0.96249969, rel_tol=1e-6)
    d = [3 / 30.00001, 6 / 60.00001, 0.15 / 30.00001, 0.3 / 60.00001]
    rows = 20 * sum(z - 0.005 if z >= 0.01 else 50 * z * z for z in d)
    assert math.isclose(float(out['loss_line_3']), rows / 2 / 20 * 10, rel_tol=1e-6)


def test_line_loss_row_weight_equals_indexing():
    gen = torch.Generator().manual_seed(7)
    loss = MODELS.build(dict(type='turbox_mm.SparseLineLoss',
                             loss_line=dict(type='LinesL1Loss', loss_weight=10.0, beta=0.01)))
    line = ((torch.rand(9, D, generator=gen) - 0.5) * 40).requires_grad_()
    target = (torch.rand(9, D, generator=gen) - 0.5) * 40
    weight = torch.rand(9, D, generator=gen)
    keep = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 0], dtype=torch.bool)
    for avg in (torch.tensor(4.0), None):
        full = loss(line, target, weight=weight, avg_factor=avg, row_weight=keep.float(),
                    quality=torch.randn(9, 2), cls_target=torch.zeros(9, dtype=torch.long))
        grad_full, = torch.autograd.grad(full['loss_line'], line)
        kept = loss(line[keep], target[keep], weight=weight[keep], avg_factor=avg)
        grad_kept, = torch.autograd.grad(kept['loss_line'], line)
        torch.testing.assert_close(full['loss_line'], kept['loss_line'], rtol=1e-6, atol=0)
        torch.testing.assert_close(grad_full, grad_kept, rtol=1e-6, atol=1e-9)
        assert grad_full[~keep].abs().sum() == 0 and grad_full[keep].abs().sum() > 0


def test_line_loss_of_stacked_layers_equals_a_call_per_layer():
    gen = torch.Generator().manual_seed(9)
    loss = MODELS.build(dict(type='turbox_mm.SparseLineLoss',
                             loss_line=dict(type='LinesL1Loss', loss_weight=10.0, beta=0.01)))
    assert loss.stacks_layers()
    layers, rows = 3, 4
    line = ((torch.rand(layers * rows, D, generator=gen) - 0.5) * 40).requires_grad_()
    target = (torch.rand(layers * rows, D, generator=gen) - 0.5) * 40
    weight = torch.rand(layers * rows, D, generator=gen)
    keep = (torch.rand(layers * rows, generator=gen) > 0.3).float()
    keep[:rows] = 0  # the first layer matched nothing
    avg = torch.tensor([1.0, 3.0, 2.0])
    stacked = loss(line, target, weight=weight, avg_factor=avg, row_weight=keep, suffix='_x',
                   layers=layers)['loss_line_x']
    want = torch.stack([loss(line[i * rows:(i + 1) * rows], target[i * rows:(i + 1) * rows],
                             weight=weight[i * rows:(i + 1) * rows], avg_factor=avg[i],
                             row_weight=keep[i * rows:(i + 1) * rows])['loss_line']
                        for i in range(layers)])
    torch.testing.assert_close(stacked, want, rtol=1e-6, atol=1e-8)
    mix = torch.tensor([0.5, 1.0, -3.0])
    got, = torch.autograd.grad((stacked * mix).sum(), line)
    ref, = torch.autograd.grad((want * mix).sum(), line)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-8)
    assert float(stacked[0]) == 0
    empty = loss(torch.zeros(0, D), torch.zeros(0, D), avg_factor=torch.ones(2), layers=2)
    assert empty['loss_line'].shape == (2, )
    with pytest.raises(ValueError, match=r'\[3\] avg_factor'):
        loss(line, target, avg_factor=torch.tensor(1.0), layers=layers)
    summed = SparseLineLoss(loss_line=dict(type='LinesL1Loss', reduction='sum'))
    assert not summed.stacks_layers()
    with pytest.raises(ValueError, match="reduces by 'mean'"):
        summed(line, target, avg_factor=avg, layers=layers)


def test_line_loss_gradients_empty_and_no_host_reads():
    from torch.autograd import gradcheck

    from turbox_mm.benchmark.sync_prone import SyncProneOps
    gen = torch.Generator().manual_seed(8)
    loss = SparseLineLoss()
    line = ((torch.rand(3, D, generator=gen, dtype=torch.float64) - 0.5) * 20).requires_grad_()
    target = (torch.rand(3, D, generator=gen, dtype=torch.float64) - 0.5) * 20
    rows = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    assert gradcheck(lambda x: loss(x, target, avg_factor=2.0, row_weight=rows)['loss_line'],
                     (line, ))
    empty = torch.zeros(0, D, requires_grad=True)
    out = loss(empty, torch.zeros(0, D), avg_factor=torch.tensor(1.0), suffix='_0',
               row_weight=torch.zeros(0))['loss_line_0']
    out.backward()
    assert float(out.detach()) == 0 and empty.grad.shape == (0, D)
    assert list(loss(line, target, prefix='map_')) == ['map_loss_line']
    x = torch.rand(5, D).requires_grad_()
    loss(x, torch.rand(5, D), avg_factor=torch.tensor(2.0), row_weight=torch.ones(5))  # warm-up
    with SyncProneOps(backward_sources=False) as found:
        out = loss(x, torch.rand(5, D), weight=torch.ones(5, D), avg_factor=torch.tensor(2.0),
                   row_weight=(torch.rand(5) > 0.5).float())['loss_line']
        out.backward()
    assert found.total == 0, found.table()
    with pytest.raises(ValueError, match=r'\[N, 40\]'):
        loss(torch.zeros(2, 38), torch.zeros(2, 38))
    with pytest.raises(ValueError, match=r'row_weight must be \[2\]'):
        loss(torch.zeros(2, D), torch.zeros(2, D), row_weight=torch.ones(3))


def test_lines_l1_loss_beta_zero_and_builds_in_any_scope():
    pred, target = torch.zeros(2, 4), torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0] * 4])
    # L1: (1 + 2 + 0.5) / (2 + eps) / 2 points x 3
    l1 = LinesL1Loss(loss_weight=3.0, beta=0.0)(pred, target, avg_factor=2.0)
    assert math.isclose(float(l1), 3.5 / 2 / 2 * 3, rel_tol=1e-6)
    assert LinesL1Loss(beta=0.0)(pred, target, reduction_override='none').shape == (2, 4)
    with DefaultScope.overwrite_default_scope('mmdet3d'):
        built = MODELS.build(dict(type='turbox_mm.SparseLineLoss',
                                  loss_line=dict(type='LinesL1Loss', loss_weight=10.0,
                                                 beta=0.01)))
    assert isinstance(built.loss_line, LinesL1Loss) and built.loss_line.beta == 0.01
