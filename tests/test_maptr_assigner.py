"""MapTR's assignment over equivalent point orders: costs, the best order, the batched turbox
path against upstream's per-sample path, and the point losses."""
from unittest import mock

import numpy as np
import pytest
import torch
from mmdet.structures.bbox import bbox_overlaps, bbox_xyxy_to_cxcywh

from turbox_mm.models.maptr import (MapTRAssigner, OrderedPtsL1Cost, PtsDirCosLoss, PtsL1Loss,
                                    assign_batched, build_targets, denormalize_2d_bbox,
                                    normalize_2d_bbox, normalize_2d_pts, pad_ground_truth)
from turbox_mm.models.maptr import maptr_targets

PC = [-15.0, -30.0, -2.0, 15.0, 30.0, 2.0]
NUM_ORDERS, NUM_PTS = 4, 5


def ring_orders(corners):
    """The rotations of a closed ring sampled at its corners (4 orders of 5 points)."""
    ring = np.asarray(corners, np.float32)
    return np.stack([np.concatenate([np.roll(ring, -k, 0), np.roll(ring, -k, 0)[:1]])
                     for k in range(4)])


def line_orders(points):
    """An open line: forward, reversed, then padding orders at -10000."""
    line = np.asarray(points, np.float32)
    out = np.full((NUM_ORDERS, NUM_PTS, 2), -10000, np.float32)
    out[0], out[1] = line, line[::-1]
    return out


def random_gt(count, generator):
    shifts = torch.rand(count, NUM_ORDERS, NUM_PTS, 2, generator=generator)
    shifts = shifts * torch.tensor([30.0, 60.0]) - torch.tensor([15.0, 30.0])
    shifts[:, 2:] = -10000  # two real orders, two padding ones
    first = shifts[:, 0]
    bboxes = torch.cat([first.min(1)[0], first.max(1)[0]], -1)
    labels = torch.randint(0, 3, (count, ), generator=generator)
    return labels, bboxes, shifts


def random_preds(layers, batch, queries, generator, classes=3):
    cls = torch.randn(layers, batch, queries, classes, generator=generator)
    pts = torch.rand(layers, batch, queries, NUM_PTS, 2, generator=generator)
    low, high = pts.min(-2)[0], pts.max(-2)[0]
    bbox = bbox_xyxy_to_cxcywh(torch.cat([low, high], -1))
    return cls, bbox, pts


def test_ordered_pts_l1_cost_is_l1_over_every_order_and_batches():
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(6, NUM_PTS, 2, generator=gen)
    gt = torch.rand(3, NUM_ORDERS, NUM_PTS, 2, generator=gen)
    cost = OrderedPtsL1Cost(weight=5.0)(pred, gt)
    expected = (pred[:, None, None] - gt[None]).abs().sum((-1, -2)).view(6, -1) * 5.0
    torch.testing.assert_close(cost, expected)
    batched = OrderedPtsL1Cost(weight=5.0)(torch.stack([pred, pred.flip(0)]), gt[None])
    torch.testing.assert_close(batched[0], cost)
    torch.testing.assert_close(batched[1], cost.flip(0))


def test_assignment_picks_the_equivalent_order_with_zero_points_cost():
    divider = line_orders([[-10, 0], [-5, 5], [0, 10], [5, 15], [10, 20]])
    crossing = ring_orders([[0, -10], [4, -10], [4, -6], [0, -6]])
    shifts = torch.from_numpy(np.stack([divider, crossing]))
    labels = torch.tensor([0, 1])
    bboxes = torch.tensor([[-10.0, 0, 10, 20], [0, -10, 4, -6]])
    pts = torch.rand(5, NUM_PTS, 2, generator=torch.Generator().manual_seed(1)) * 0.05
    pts[3] = normalize_2d_pts(shifts[0, 1], PC)  # the divider reversed
    pts[1] = normalize_2d_pts(shifts[1, 2], PC)  # the crossing started at its third corner
    cls = torch.zeros(5, 3)
    assigner = MapTRAssigner(pc_range=PC)
    result, order = assigner.assign(torch.rand(5, 4), cls, pts, bboxes, labels, shifts)
    assert result.gt_inds.tolist() == [0, 2, 0, 1, 0]
    assert result.labels.tolist() == [-1, 1, -1, 0, -1]
    assert order[3, 0] == 1 and order[1, 1] == 2
    cost, _ = assigner.cost(torch.rand(5, 4), cls, pts, bboxes, labels, shifts)
    cls_only = assigner.cls_cost._focal_loss_cost(cls, labels)  # weight included
    assert float(cost[3, 0] - cls_only[3, 0]) == pytest.approx(0.0, abs=1e-5)
    assert float(cost[1, 1] - cls_only[1, 1]) == pytest.approx(0.0, abs=1e-5)
    # the padding orders of the divider (at -10000 m) never win
    _, order = assigner.cost(torch.rand(5, 4), cls, pts, bboxes, labels, shifts)
    assert int(order[:, 0].max()) <= 1


def test_sample_without_ground_truth_is_all_background():
    assigner = MapTRAssigner(pc_range=PC)
    no_labels, no_shifts = torch.zeros(0, dtype=torch.long), torch.zeros(0, NUM_ORDERS, NUM_PTS, 2)
    result, order = assigner.assign(torch.rand(4, 4), torch.randn(4, 3),
                                    torch.rand(4, NUM_PTS, 2), torch.zeros(0, 4), no_labels,
                                    no_shifts)
    assert result.gt_inds.tolist() == [0, 0, 0, 0] and order is None
    assert result.labels.tolist() == [-1] * 4


def test_weight_zero_costs_are_skipped_and_nonzero_ones_follow_mmdet2():
    gen = torch.Generator().manual_seed(2)
    cls, bbox, pts = (t[0, 0] for t in random_preds(1, 1, 7, gen))
    labels, bboxes, shifts = random_gt(3, gen)
    plain = MapTRAssigner(pc_range=PC)
    with mock.patch.object(MapTRAssigner, '_l1') as l1, \
            mock.patch.object(MapTRAssigner, '_overlaps') as overlaps:
        base, _ = plain.cost(bbox, cls, pts, bboxes, labels, shifts)
    assert not l1.called and not overlaps.called
    weighted = MapTRAssigner(reg_cost=dict(type='BBoxL1Cost', weight=0.5, box_format='xywh'),
                             iou_cost=dict(type='IoUCost', iou_mode='giou', weight=0.25),
                             pc_range=PC)
    cost, _ = weighted.cost(bbox, cls, pts, bboxes, labels, shifts)
    # mmdet 2.x BBoxL1Cost('xywh') converts the already-cxcywh targets once more
    l1 = torch.cdist(bbox, bbox_xyxy_to_cxcywh(normalize_2d_bbox(bboxes, PC)), p=1)
    giou = bbox_overlaps(denormalize_2d_bbox(bbox, PC), bboxes, mode='giou')
    torch.testing.assert_close(cost, base + 0.5 * l1 - 0.25 * giou)
    # the leading-dimension (turbox) form of the same costs
    batched, _ = weighted.cost(bbox[None, None], cls[None, None], pts[None, None],
                               bboxes[None], labels[None], shifts[None])
    torch.testing.assert_close(batched[0, 0], cost)


def _stock(assigner, cls, bbox, pts, gts):
    """Upstream's loop: ``gt_inds`` and the matched orders per (layer, sample)."""
    out = {}
    for layer in range(cls.shape[0]):
        for sample, (labels, bboxes, shifts) in enumerate(gts):
            result, order = assigner.assign(bbox[layer, sample], cls[layer, sample],
                                            pts[layer, sample], bboxes, labels, shifts)
            pos = torch.nonzero(result.gt_inds > 0).squeeze(-1)
            matched = result.gt_inds[pos] - 1
            orders = order[pos, matched] if order is not None else matched
            out[layer, sample] = (result.gt_inds, orders)
    return out


def _from_pairs(pairs, order_index, layers, batch, queries):
    out = {}
    matrix, row, col = pairs
    for layer in range(layers):
        for sample in range(batch):
            gt_inds = torch.zeros(queries, dtype=torch.long)
            chosen = matrix == layer * batch + sample
            gt_inds[row[chosen]] = col[chosen] + 1
            pos = torch.nonzero(gt_inds > 0).squeeze(-1)
            if order_index is None:
                orders = pos[:0]
            else:
                orders = order_index[layer * batch + sample][pos, gt_inds[pos] - 1]
            out[layer, sample] = (gt_inds, orders)
    return out


@pytest.mark.parametrize('counts', [(3, 0, 5), (0, 0, 0), (9, 2, 1)])
def test_batched_assignment_equals_per_sample_scipy(counts):
    gen = torch.Generator().manual_seed(sum(counts))
    layers, queries = 3, 8
    cls, bbox, pts = random_preds(layers, len(counts), queries, gen)
    gts = [random_gt(c, gen) for c in counts]
    assigner = MapTRAssigner(pc_range=PC)
    padded = pad_ground_truth(gts)
    assert padded.counts == list(counts)
    with mock.patch.object(maptr_targets, 'solve_batched',
                           wraps=maptr_targets.solve_batched) as solved:
        [(pairs, order_index)] = assign_batched(assigner, [(cls, bbox, pts, padded)])
    assert solved.call_count == (1 if sum(counts) else 0)
    assert pairs.shape[1] == layers * sum(min(c, queries) for c in counts)
    stock = _stock(assigner, cls, bbox, pts, gts)
    batched = _from_pairs(pairs, order_index, layers, len(counts), queries)
    for key, (gt_inds, orders) in stock.items():
        assert torch.equal(batched[key][0], gt_inds), key
        assert torch.equal(batched[key][1], orders), key
    if sum(counts):  # each sample's block of the batched costs is its own cost matrix
        cost, _ = assigner.cost(bbox, cls, pts, padded.bboxes, padded.labels, padded.shifts)
        labels, bboxes, shifts = gts[0]
        own, _ = assigner.cost(bbox[1, 0], cls[1, 0], pts[1, 0], bboxes, labels, shifts)
        torch.testing.assert_close(cost[1, 0, :, :counts[0]], own)


def test_two_groups_share_one_transfer_and_match_per_sample():
    """v2's one-to-one and one-to-many groups: one ``solve_batched`` call, the second group
    solved from its ``extras``."""
    gen = torch.Generator().manual_seed(7)
    counts = (2, 0, 3)
    gts = [random_gt(c, gen) for c in counts]
    repeated = [(labels.repeat(3), bboxes.repeat(3, 1), shifts.repeat(3, 1, 1, 1))
                for labels, bboxes, shifts in gts]
    one2one = random_preds(2, 3, 4, gen)
    one2many = random_preds(2, 3, 12, gen)
    assigner = MapTRAssigner(pc_range=PC)
    with mock.patch.object(maptr_targets, 'solve_batched',
                           wraps=maptr_targets.solve_batched) as solved:
        results = assign_batched(assigner, [(*one2one, pad_ground_truth(gts)),
                                            (*one2many, pad_ground_truth(repeated))])
    assert solved.call_count == 1
    for (cls, bbox, pts), group_gts, (pairs, order_index) in zip(
            (one2one, one2many), (gts, repeated), results):
        stock = _stock(assigner, cls, bbox, pts, group_gts)
        batched = _from_pairs(pairs, order_index, 2, 3, cls.shape[2])
        for key, (gt_inds, orders) in stock.items():
            assert torch.equal(batched[key][0], gt_inds), key
            assert torch.equal(batched[key][1], orders), key


def test_device_matcher_gives_the_per_sample_scipy_matches():
    """matcher='device' (turbox_mm::lsap, its kernel in Triton's interpreter here): each group
    solved where it is, no ``solve_batched`` call, the same pairs as the host path."""
    from turbox_mm.ops import dispatch
    gen = torch.Generator().manual_seed(11)
    counts = (3, 0, 2)
    gts = [random_gt(c, gen) for c in counts]
    repeated = [(labels.repeat(3), bboxes.repeat(3, 1), shifts.repeat(3, 1, 1, 1))
                for labels, bboxes, shifts in gts]
    groups = [(*random_preds(2, 3, 4, gen), pad_ground_truth(gts)),
              (*random_preds(2, 3, 12, gen), pad_ground_truth(repeated))]
    assigner = MapTRAssigner(pc_range=PC)
    host = assign_batched(assigner, groups, 'host')
    with dispatch.kernel_on_cpu(), mock.patch.object(
            maptr_targets, 'solve_batched', wraps=maptr_targets.solve_batched) as solved:
        device = assign_batched(assigner, groups, 'device')
    assert solved.call_count == 0
    for (pairs, order), (want_pairs, want_order) in zip(device, host):
        assert torch.equal(pairs, want_pairs) and torch.equal(order, want_order)
    with pytest.raises(ValueError, match="matcher must be 'host' or 'device'"):
        assign_batched(assigner, groups, 'gpu')


def test_build_targets_places_the_matched_order():
    gen = torch.Generator().manual_seed(3)
    counts = (2, 0)
    cls, bbox, pts = random_preds(2, 2, 5, gen)
    gts = [random_gt(c, gen) for c in counts]
    padded = pad_ground_truth(gts)
    [(pairs, order_index)] = assign_batched(MapTRAssigner(pc_range=PC),
                                            [(cls, bbox, pts, padded)])
    targets = build_targets(cls, padded, pairs, order_index, NUM_PTS)
    assert targets.num_pos.tolist() == [2.0, 2.0]
    assert targets.labels.shape == (2, 10) and targets.pts_targets.shape == (2, 10, NUM_PTS, 2)
    for matrix, row, col in pairs.T.tolist():
        layer, sample = divmod(matrix, 2)
        flat = sample * 5 + row
        labels, bboxes, shifts = gts[sample]
        assert targets.labels[layer, flat] == labels[col]
        order = order_index[matrix, row, col]
        torch.testing.assert_close(targets.pts_targets[layer, flat], shifts[col, order])
        torch.testing.assert_close(targets.bbox_targets[layer, flat], bboxes[col])
    assert (targets.labels == 3).sum() == 2 * 10 - 4  # background = num_classes
    assert float(targets.pts_weights.sum()) == 4 * NUM_PTS * 2


def test_pts_l1_loss_and_direction_loss_values():
    pred = torch.tensor([[[0.0, 0.0], [1.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]]])
    target = torch.tensor([[[0.5, 0.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    weight = torch.zeros(2, 2, 2)
    weight[0] = 1
    loss = PtsL1Loss(loss_weight=5.0)(pred, target, weight, avg_factor=torch.tensor(1.0))
    assert float(loss) == pytest.approx(5.0 * 1.5, rel=1e-6)
    assert float(PtsL1Loss()(pred[:0], target[:0], weight[:0], avg_factor=1)) == 0.0
    dirs = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]])
    target_dirs = torch.tensor([[[2.0, 0.0], [0.0, -1.0], [0.0, 0.0]]])
    per_edge = PtsDirCosLoss(reduction='none')(dirs, target_dirs, torch.ones(1, 3))
    torch.testing.assert_close(per_edge, torch.tensor([[0.0, 2.0, 1.0]]))
    loss = PtsDirCosLoss(loss_weight=0.005)(dirs, target_dirs, torch.tensor([[1.0, 1.0, 0.0]]),
                                            avg_factor=2)
    assert float(loss) == pytest.approx(0.005 * 2.0 / 2)
    with pytest.raises(ValueError, match='avg_factor'):
        PtsDirCosLoss()(dirs, target_dirs, torch.ones(1, 3))


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_direction_loss_equals_torchs_cosine_embedding_loss(dtype):
    """The loss's own cosine is ``F.cosine_embedding_loss`` with target 1 (upstream's call):
    the same values, and the same gradients up to rounding (in float64 the gradients at zero
    target vectors, about 1e6, differ in the 9th digit: ATen's backward multiplies in another
    order), zero vectors included."""
    import torch.nn.functional as F
    from turbox_mm.models.maptr.pts_dir_cos_loss import pts_dir_cos_loss
    torch.manual_seed(0)
    pred = torch.randn(20, 19, 2, dtype=dtype)
    target = torch.randn(20, 19, 2, dtype=dtype)
    pred[0, :3] = 0
    target[1, :2] = 0
    target[2] = pred[2] * 3  # parallel: cosine 1
    pred = pred.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # not contiguous
    ours = pts_dir_cos_loss(pred, target, reduction='none')
    grad, = torch.autograd.grad((ours * torch.arange(19, dtype=dtype)).sum(), pred)
    ref = F.cosine_embedding_loss(pred.reshape(-1, 2), target.reshape(-1, 2),
                                  target.new_ones(20 * 19), reduction='none').view(20, 19)
    ref_grad, = torch.autograd.grad((ref * torch.arange(19, dtype=dtype)).sum(), pred)
    assert torch.equal(ours, ref)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6 if dtype == torch.float32 else 1e-8,
                               atol=0)
