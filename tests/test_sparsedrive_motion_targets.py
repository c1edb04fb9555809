"""SparseDrive stage 2's targets (MotionTarget, PlanningTarget) and decoders
(SparseBox3DMotionDecoder, HierarchicalPlanningDecoder), against readable references of
upstream's procedures (docs/design/sparsedrive.md sections 6.4, 6.5, 9, 10.2)."""
import math

import numpy as np
import pytest
import torch

from turbox_mm.models.sparse4d.box3d import decode_boxes
from turbox_mm.models.sparse4d.decoder import SparseBox3DDecoder
from turbox_mm.models.sparsedrive.motion_decoder import SparseBox3DMotionDecoder
from turbox_mm.models.sparsedrive.motion_target import MotionTarget, best_mode
from turbox_mm.models.sparsedrive.planning_decoder import (HierarchicalPlanningDecoder,
                                                           trajectory_yaw)
from turbox_mm.models.sparsedrive.planning_target import PlanningTarget
from turbox_mm.registry import TASK_UTILS

K, F = 6, 12  # agent modes and steps
KP, T = 6, 6  # plan modes per command and steps


# ----------------------------------------------------------------------------------------------
# MotionTarget
# ----------------------------------------------------------------------------------------------
def _loop_motion_target(reg_pred, trajs, masks, indices):
    """Upstream's procedure written out with Python loops and scalars: place matched futures,
    count matched GTs, pick per query the mode with the smallest mean (over all steps) of the
    masked Euclidean distance between cumulative sums; ties to the lowest mode."""
    batch, num_query, modes, steps, _ = reg_pred.shape
    pred = reg_pred.tolist()
    target = [[[[0.0, 0.0] for _ in range(steps)] for _ in range(num_query)]
              for _ in range(batch)]
    weight = [[[0.0] * steps for _ in range(num_query)] for _ in range(batch)]
    num_pos = 0
    for i, pairs in enumerate(indices):
        if pairs is None or len(trajs[i]) == 0:
            continue
        for q, g in zip(pairs[0].tolist(), pairs[1].tolist()):
            target[i][q] = trajs[i][g].tolist()
            weight[i][q] = [float(m) for m in masks[i][g].tolist()]
        num_pos += len(pairs[0])

    def cum(xy):
        out, x, y = [], 0.0, 0.0
        for dx, dy in xy:
            x, y = x + dx, y + dy
            out.append([x, y])
        return out

    cls, cls_w, best, tgt = [], [], [], []
    for b in range(batch):
        for q in range(num_query):
            g = cum(target[b][q])
            dists = []
            for m in range(modes):
                p = cum(pred[b][q][m])
                dists.append(sum(math.hypot(p[t][0] - g[t][0], p[t][1] - g[t][1])
                                 * weight[b][q][t] for t in range(steps)) / steps)
            mode = min(range(modes), key=lambda m: (dists[m], m))
            cls.append(mode)
            cls_w.append(float(any(w != 0 for w in weight[b][q])))
            best.append(cum(pred[b][q][mode]))
            tgt.append(g)
    shape = (batch, num_query)
    return (torch.tensor(cls).view(shape), torch.tensor(cls_w).view(shape),
            torch.tensor(best, dtype=torch.float64).view(shape + (steps, 2)),
            torch.tensor(tgt, dtype=torch.float64).view(shape + (steps, 2)),
            torch.tensor(weight).view(shape + (steps, )), max(num_pos, 1))


def _motion_case(seed, gts=(3, 0, 2, 0), num_query=7, steps=5):
    """A batch: per sample ``gts[i]`` agents with partial masks, matched to a random subset of
    queries (sample 1 with ``None`` pairs, sample 3 with empty pairs)."""
    gen = torch.Generator().manual_seed(seed)
    reg = torch.randn(len(gts), num_query, K, steps, 2, generator=gen, dtype=torch.float64)
    trajs, masks, indices = [], [], []
    for i, n in enumerate(gts):
        trajs.append(torch.randn(n, steps, 2, generator=gen, dtype=torch.float64))
        mask = (torch.rand(n, steps, generator=gen) > 0.3).float()
        if n:
            mask[0] = 0.0  # a matched GT without any valid step: weight 0, still counted
            mask[-1, steps // 2:] = 0.0  # partial
        masks.append(mask)
        queries = torch.randperm(num_query, generator=gen)[:n]
        pairs = (queries, torch.randperm(n, generator=gen))
        indices.append(None if i == 1 else pairs)
    return reg, trajs, masks, indices


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_motion_target_matches_loop_reference(seed):
    reg, trajs, masks, indices = _motion_case(seed)
    got = MotionTarget().sample(reg, trajs, masks, indices)
    want = _loop_motion_target(reg, trajs, masks, indices)
    cls, cls_w, best, target, weight, num_pos = got
    assert cls.dtype == torch.long and cls.shape == (4, 7)
    assert torch.equal(cls, want[0])
    assert torch.equal(cls_w, want[1].to(cls_w.dtype))
    torch.testing.assert_close(best, want[2])
    torch.testing.assert_close(target, want[3])
    torch.testing.assert_close(weight, want[4].double())
    assert num_pos.dim() == 0 and float(num_pos) == want[5] == 5
    # unmatched queries and samples without GT: zero targets, mode 0, weight 0
    matched = torch.zeros(4, 7, dtype=torch.bool)
    for i, pairs in enumerate(indices):
        if pairs is not None:
            matched[i, pairs[0]] = True
    assert not cls[~matched].any() and not cls_w[~matched].any()
    assert not target[~matched].any() and not weight[1].any() and not weight[3].any()


def test_motion_target_norm_and_cumsum_and_gradient():
    """The distance is the Euclidean norm of position (cumulative sum) errors: a mode closer in
    offsets, or under an L1 norm, loses."""
    gt = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])  # positions x = 1, 2, 3
    reg = torch.zeros(1, 2, 4, 3, 2, dtype=torch.float64)
    reg[0, 0, 1] = torch.tensor([[1.5, 0.0], [0.5, 0.0], [1.0, 0.0]])  # positions 1.5, 2, 3
    reg[0, 0, 2] = torch.tensor([[1.3, 0.0], [1.0, 0.0], [1.0, 0.0]])  # offsets closer
    reg[0, 1, :, :, :] = torch.tensor([1.0, 3.0])  # modes 1, 2 far off
    reg[0, 1, [0, 3]] = torch.tensor([1.0, 0.0], dtype=reg.dtype)
    reg[0, 1, 0, 0] = torch.tensor([1.9, 0.0])  # errors (0.9, 0): L2 0.9, L1 0.9 at every step
    reg[0, 1, 3, 0] = torch.tensor([1.6, 0.6])  # errors (0.6, 0.6): L2 0.85, L1 1.2
    reg.requires_grad_(True)
    pairs = [(torch.tensor([0, 1]), torch.tensor([0, 0]))]
    gts = [torch.cat([gt, gt]).double()]
    cls, cls_w, best, target, weight, num_pos = MotionTarget().sample(
        reg, gts, [torch.ones(2, 3)], dict(indices=pairs))
    assert cls.tolist() == [[1, 3]] and cls_w.tolist() == [[1.0, 1.0]]
    torch.testing.assert_close(target[0, 0, :, 0], torch.tensor([1.0, 2, 3], dtype=reg.dtype))
    assert float(num_pos) == 2
    best.sum().backward()
    grad_modes = reg.grad.abs().sum(dim=(-1, -2))  # only the best modes get gradient
    assert grad_modes[0, 0].nonzero().flatten().tolist() == [1]
    assert grad_modes[0, 1].nonzero().flatten().tolist() == [3]


def test_motion_target_no_gt_anywhere_and_errors():
    reg = torch.randn(2, 4, K, F, 2)
    empty = [torch.zeros(0, F, 2), torch.zeros(0, F, 2)]
    out = MotionTarget().sample(reg, empty, [torch.zeros(0, F)] * 2, [None, None])
    assert float(out[5]) == 1.0 and not out[1].any() and not out[0].any()
    assert out[2].shape == (2, 4, F, 2) and out[4].shape == (2, 4, F)
    with pytest.raises(ValueError, match=r'reg_pred must be \[B, A, K, T, 2\]'):
        MotionTarget().sample(reg[0], empty, [torch.zeros(0, F)] * 2, [None, None])
    with pytest.raises(ValueError, match='gt_agent_fut_trajs has 1 samples'):
        MotionTarget().sample(reg, empty[:1], [torch.zeros(0, F)] * 2, [None, None])
    with pytest.raises(ValueError, match=r'gt_agent_fut_masks\[1\] must be'):
        MotionTarget().sample(reg, empty, [torch.zeros(0, F), torch.zeros(0, 3)], [None, None])
    with pytest.raises(ValueError, match=r'indices\[0\] has 1 pairs for 0'):
        MotionTarget().sample(reg, empty, [torch.zeros(0, F)] * 2,
                              [(torch.tensor([0]), torch.tensor([0])), None])
    with pytest.raises(ValueError, match="no 'indices'"):
        MotionTarget().sample(reg, empty, [torch.zeros(0, F)] * 2, dict(pairs=None))


# ----------------------------------------------------------------------------------------------
# PlanningTarget
# ----------------------------------------------------------------------------------------------
def test_planning_target_hand_cases():
    """Sample 0 commands left (1): its mode 4 equals the GT; command 0's mode 2 equals it too
    but is another command. Sample 1 commands straight (2) with the last 3 steps masked: mode 3
    is exact on the valid steps and wild after them, mode 1 off by 0.1 everywhere. Sample 2
    has no valid step: weight 0, mode 0."""
    gt = torch.tensor([[0.1, 1.0]] * T).expand(3, T, 2).clone()
    masks = torch.ones(3, T)
    masks[1, 3:] = 0.0
    masks[2] = 0.0
    cmd = torch.tensor([[0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.float32)
    reg = torch.full((3, 1, 3 * KP, T, 2), 5.0)
    reg[0, 0, 1 * KP + 4] = gt[0]
    reg[0, 0, 0 * KP + 2] = gt[0]
    reg[1, 0, 2 * KP + 3] = gt[1]
    reg[1, 0, 2 * KP + 3, 3:] = 50.0
    reg[1, 0, 2 * KP + 1] = gt[1] + 0.1
    cls = torch.arange(3 * 3 * KP, dtype=torch.float32).view(3, 1, 3 * KP).requires_grad_()
    reg.requires_grad_(True)
    out = PlanningTarget(ego_fut_ts=T, ego_fut_mode=KP).sample(cls, reg, gt, masks, cmd)
    sel_cls, cls_target, cls_weight, best, target, weight = out
    assert sel_cls.tolist() == [list(range(6, 12)), list(range(30, 36)), list(range(36, 42))]
    assert cls_target.tolist() == [4, 3, 0] and cls_target.dtype == torch.long
    assert cls_weight.tolist() == [1.0, 1.0, 0.0]
    assert torch.equal(best[0], gt[0]) and torch.equal(best[2], reg[2, 0, 0].detach())
    assert torch.equal(best[1, :3], gt[1, :3]) and (best[1, 3:] == 50).all()  # offsets, no cumsum
    assert torch.equal(target, gt) and torch.equal(weight, masks)
    (sel_cls.sum() + best.sum()).backward()
    assert cls.grad.view(3, 3, KP).sum(-1).tolist() == [[0, 6, 0], [0, 0, 6], [6, 0, 0]]
    assert reg.grad[1, 0, 2 * KP + 3].abs().sum() > 0 and reg.grad[1, 0, 2 * KP + 1].sum() == 0
    # upstream's data dict and flat [B, 3K] inputs are accepted
    again = PlanningTarget(T, KP).sample(cls.view(3, -1), reg, gt, masks,
                                         dict(gt_ego_fut_cmd=cmd))
    assert torch.equal(again[1], cls_target)


def test_planning_target_errors():
    target = PlanningTarget()
    cls, reg = torch.zeros(2, 1, 18), torch.zeros(2, 1, 18, 6, 2)
    good = (torch.zeros(2, 6, 2), torch.ones(2, 6), torch.eye(3)[:2])
    with pytest.raises(ValueError, match=r'cls_pred must be \[B, 1, 18\]'):
        target.sample(torch.zeros(2, 1, 12), reg, *good)
    with pytest.raises(ValueError, match=r'reg_pred must be'):
        target.sample(cls, torch.zeros(2, 1, 18, 5, 2), *good)
    with pytest.raises(ValueError, match=r'gt_ego_fut_masks must be \[2, 6\]'):
        target.sample(cls, reg, good[0], torch.ones(2, 5), good[2])
    with pytest.raises(ValueError, match='gt_ego_fut_cmd'):
        target.sample(cls, reg, good[0], good[1], torch.eye(3))
    with pytest.raises(ValueError, match='positive'):
        PlanningTarget(0, 6)


def test_targets_have_no_sync_prone_ops():
    from turbox_mm.benchmark.sync_prone import SyncProneOps
    reg, trajs, masks, indices = _motion_case(3)
    reg = reg.float().requires_grad_()
    MotionTarget().sample(reg, trajs, masks, indices)  # warm-up (imports)
    planner = PlanningTarget()
    plan = (torch.randn(2, 1, 18, requires_grad=True), torch.randn(2, 1, 18, 6, 2),
            torch.randn(2, 6, 2), (torch.rand(2, 6) > 0.3).float(), torch.eye(3)[[2, 0]])
    with SyncProneOps(backward_sources=False) as found:
        out = MotionTarget().sample(reg, trajs, masks, indices)
        (out[2].sum() * out[1].sum() / out[5]).backward()
        planned = planner.sample(*plan)
        planned[0].sum().backward()
    assert found.total == 0, found.table()


def test_best_mode_ties_pick_first():
    pred = torch.zeros(2, 3, 4, 2)
    assert best_mode(pred, torch.zeros(2, 4, 2), torch.ones(2, 4)).tolist() == [0, 0]


# ----------------------------------------------------------------------------------------------
# SparseBox3DMotionDecoder
# ----------------------------------------------------------------------------------------------
def _det_motion_outputs(seed, batch=2, num_query=20, queue_len=3):
    gen = torch.Generator().manual_seed(seed)
    cls = torch.randn(batch, num_query, 10, generator=gen)
    box = torch.randn(batch, num_query, 11, generator=gen)
    quality = torch.randn(batch, num_query, 2, generator=gen)
    ids = torch.randperm(batch * num_query, generator=gen).view(batch, num_query)
    motion = dict(
        classification=[torch.randn(batch, num_query, K, generator=gen)],
        prediction=[torch.randn(batch, num_query, K, F, 2, generator=gen)],
        anchor_queue=[torch.randn(batch, num_query, 11, generator=gen)
                      for _ in range(queue_len)],
        period=torch.randint(0, 5, (batch, num_query), generator=gen))
    return cls, box, quality, ids, motion


@pytest.mark.parametrize('threshold', [None, 0.6])
def test_motion_decoder_fields_and_order(threshold):
    cls, box, quality, ids, motion = _det_motion_outputs(0)
    decoder = SparseBox3DMotionDecoder(num_output=8, score_threshold=threshold)
    out = decoder.decode([cls * 0, cls], [box * 0, box], ids, [None, quality], motion)
    det = SparseBox3DDecoder(num_output=8, score_threshold=threshold).decode(
        cls, box, quality, instance_id=ids)
    queue = torch.stack(motion['anchor_queue'], dim=2)
    assert len(out) == 2
    for b, (res, ref) in enumerate(zip(out, det)):
        for key, value in ref.items():  # the detection decoder's fields, unchanged
            assert torch.equal(res[key], value), key
        idx = res['indices']
        n = idx.shape[0]
        assert n == (8 if threshold is None else int((ref['cls_scores'] >= 0.6).sum()))
        assert res['trajs_3d'].shape == (n, K, F, 2) and res['trajs_score'].shape == (n, K)
        assert res['anchor_queue'].shape == (n, 3, 10) and res['period'].shape == (n, )
        assert (res['scores_3d'][:-1] >= res['scores_3d'][1:]).all()
        for j, q in enumerate(idx.tolist()):
            want = motion['prediction'][0][b, q].cumsum(dim=-2) + ref['boxes_3d'][j, :2]
            torch.testing.assert_close(res['trajs_3d'][j], want)
            torch.testing.assert_close(res['trajs_score'][j],
                                       motion['classification'][0][b, q].sigmoid())
            torch.testing.assert_close(res['anchor_queue'][j], decode_boxes(queue[b, q]))
            assert res['period'][j] == motion['period'][b, q]
    # tensors instead of per-layer lists, and a pre-stacked queue, give the same
    again = decoder.decode(cls, box, ids, quality, {**motion, 'anchor_queue': queue})
    assert all(torch.equal(again[0][k], out[0][k]) for k in out[0])


def test_motion_decoder_one_host_copy_per_field_and_errors():
    from turbox_mm.benchmark.sync_prone import SyncProneOps
    cls, box, quality, ids, motion = _det_motion_outputs(1)
    decoder = SparseBox3DMotionDecoder(num_output=5)
    with SyncProneOps(backward_sources=False) as found:
        out = decoder.decode([cls], [box], ids, [quality], motion)
    assert {f.kind for f in found.findings} == {'d2h'}, found.table()
    assert found.total == len(out[0]) == 10, found.table()
    no_quality = decoder.decode([cls], [box], None, None, motion)
    assert 'instance_ids' not in no_quality[0]
    assert torch.equal(no_quality[0]['scores_3d'], no_quality[0]['cls_scores'])
    with pytest.raises(ValueError, match='motion_output is required'):
        decoder.decode([cls], [box], ids, [quality])
    bad = {**motion, 'period': motion['period'][:, :3]}
    with pytest.raises(ValueError, match=r"motion_output\['period'\]"):
        decoder.decode([cls], [box], ids, [quality], bad)
    assert isinstance(TASK_UTILS.build(dict(type='turbox_mm.SparseBox3DMotionDecoder')),
                      SparseBox3DMotionDecoder)


# ----------------------------------------------------------------------------------------------
# HierarchicalPlanningDecoder: a numpy reference of upstream's re-scoring
# ----------------------------------------------------------------------------------------------
def _np_corners(box):
    """Upstream's ``box3d_to_corners`` ([N, 7] -> [N, 8, 3]), numpy."""
    unit = np.stack(np.unravel_index(np.arange(8), [2] * 3), axis=1)[[0, 1, 3, 2, 4, 5, 7, 6]]
    corners = box[:, None, 3:6] * (unit - 0.5)[None]
    rot = np.tile(np.eye(3)[None], (box.shape[0], 1, 1))
    cos, sin = np.cos(box[:, 6]), np.sin(box[:, 6])
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = cos, -sin, sin, cos
    return (rot[:, None] @ corners[..., None])[..., 0] + box[:, None, :3]


def _np_corners_in_box(box1, box2):
    """Whether a bottom corner of ``box2`` lies in ``box1`` (both moved into box1's frame)."""
    box1, box2 = box1.copy(), box2.copy()
    yaw, loc = box1[:, 6].copy(), box1[:, :3].copy()
    cos, sin = np.cos(-yaw), np.sin(-yaw)
    rot_t = np.stack([np.stack([cos, sin]), np.stack([-sin, cos])])  # [2, 2, N]
    for box in (box1, box2):
        box[:, :3] -= loc
        box[:, :2] = np.einsum('ij,jki->ik', box[:, :2], rot_t)
        box[:, 6] -= yaw
    corners = _np_corners(box2)[:, [0, 3, 7, 4], :2]
    half_l, half_w = box1[:, [3]] / 2, box1[:, [4]] / 2
    inside = ((corners[..., 0] <= half_l) & (corners[..., 0] >= -half_l) &
              (corners[..., 1] <= half_w) & (corners[..., 1] >= -half_w))
    return inside.any(-1)


def _np_yaw(points, start, static=0.5):
    yaw = np.zeros(points.shape[:-1], np.float32)
    yaw[..., 1:-1] = np.arctan2(points[..., 2:, 1] - points[..., :-2, 1],
                                points[..., 2:, 0] - points[..., :-2, 0])
    yaw[..., -1] = np.arctan2(points[..., -1, 1] - points[..., -2, 1],
                              points[..., -1, 0] - points[..., -2, 0])
    yaw[..., 0] = start
    still = np.linalg.norm(points[..., -1, :] - points[..., 0, :], axis=-1) < static
    return np.where(still[..., None], yaw[..., :1], yaw)


def _np_rescore(plan_cls, plan_reg, motion_cls, motion_reg, anchors, conf, fix=False):
    """Upstream's ``rescore``, step by step in numpy (float32 where upstream runs torch)."""
    plan_cls, plan_reg, motion_reg, anchors = (np.asarray(x, np.float32) for x in (
        plan_cls, plan_reg, motion_reg, anchors))
    batch, modes, steps, _ = plan_reg.shape
    num_agent = anchors.shape[1]
    with_zero = lambda x: np.concatenate([np.zeros(x.shape[:-2] + (1, 2), x.dtype), x], -2)  # noqa
    plan = with_zero(plan_reg)
    ego = np.zeros((batch, modes, steps + 1, 7), np.float32)
    ego[..., :2] = plan
    ego[..., 3:6] = np.float32([4.08, 1.73, 1.56]) * np.float32(1.1)
    ego[..., 6] = _np_yaw(plan, np.pi / 2)
    motion = with_zero(motion_reg[..., :steps, :].cumsum(-2)) + anchors[:, :, None, None, :2]
    best = np.asarray(motion_cls).argmax(-1)  # top-1 mode
    motion = np.take_along_axis(motion, best[:, :, None, None, None], axis=2)  # [B, A, 1, S, 2]
    agent = np.zeros(motion.shape[:-1] + (7, ), np.float32)
    agent[..., :2] = motion
    agent[..., 3:6] = np.exp(anchors[:, :, None, None, 3:6])
    agent[..., 6] = _np_yaw(motion, np.arctan2(anchors[..., 6], anchors[..., 7])[:, :, None])
    agent[np.asarray(conf) < 0.5] = 1e6
    ego, agent = ego[..., 1:, :], agent[..., 1:, :]
    shape = (batch, num_agent, 1, modes, steps, 7)
    ego = np.broadcast_to(ego[:, None, None], shape).reshape(-1, 7).copy()
    agent = np.broadcast_to(agent[:, :, :, None], shape).reshape(-1, 7).copy()
    if fix:
        ego[:, 0] += 0.5 * np.cos(ego[:, 6])
        ego[:, 1] += 0.5 * np.sin(ego[:, 6])
    else:  # upstream as written: rows, not columns
        ego[0] += 0.5 * np.cos(ego[6])
        ego[1] += 0.5 * np.sin(ego[6])
    col = _np_corners_in_box(ego, agent) | _np_corners_in_box(agent, ego)
    col = col.reshape(batch, num_agent, 1, modes, steps).transpose(0, 3, 1, 2, 4)
    col = col.reshape(batch, modes, -1).any(-1)
    col[col.all(-1)] = False
    return plan_cls + col.astype(np.float32) * -999


def _logit(p):
    return math.log(p / (1 - p))


def _scene(agents, plans, batch_cmd=2):
    """Outputs for one sample from hand-made agents ``(x, y, length, width, yaw, conf)``
    (static) and ``plans`` ``[K, T, 2]`` positions for the commanded row ``batch_cmd``."""
    num_agent = len(agents)
    det_cls = torch.full((1, num_agent, 10), -10.0)
    anchors = torch.zeros(1, num_agent, 11)
    for a, (x, y, length, width, yaw, conf) in enumerate(agents):
        det_cls[0, a, 0] = _logit(conf)
        anchors[0, a, :8] = torch.tensor([x, y, 0.0, math.log(length), math.log(width), 0.0,
                                          math.sin(yaw), math.cos(yaw)])
    offsets = torch.diff(plans, dim=1, prepend=torch.zeros(KP, 1, 2))
    reg = torch.zeros(1, 3, KP, T, 2)
    reg[0, batch_cmd] = offsets
    cls = torch.linspace(1.0, 0.0, KP).repeat(1, 3, 1)  # mode 0 scores highest
    det = dict(classification=[det_cls], prediction=[anchors])
    motion = dict(classification=[torch.zeros(1, num_agent, K)],
                  prediction=[torch.zeros(1, num_agent, K, F, 2)])
    planning = dict(classification=[cls.view(1, 1, -1)], prediction=[reg.view(1, 1, -1, T, 2)],
                    anchor_queue=[torch.zeros(1, 1, 11)] * 2, period=torch.ones(1, 1))
    cmd = torch.zeros(1, 3)
    cmd[0, batch_cmd] = 1.0
    return det, motion, planning, dict(gt_ego_fut_cmd=cmd)


def _hits(decoder, scene):
    """Which commanded modes the decoder penalised (and its logit row)."""
    det, motion, planning, data = scene
    out = decoder.decode(det, motion, planning, data)[0]
    logits = torch.logit(out['planning_score'][2].double())
    return (logits < -500).tolist(), out


def _steps(vx, vy):
    return torch.stack([torch.arange(1, T + 1) * vx, torch.arange(1, T + 1) * vy], -1).float()


FAR = (50.0, 50.0, 1.0, 1.0, 0.0, 0.9)  # agent 0 of the hand cases: absorbs upstream's rows
RIGHT = [_steps(1.0 + 0.2 * k, 0.1) for k in range(1, KP)]  # modes 1..5 veer right


def test_rescore_hand_built_collision_cases():
    through = torch.stack([_steps(0.0, 2.0)] + RIGHT)  # mode 0 drives through (0, 8)
    parked = (0.0, 8.0, 4.0, 2.0, 0.0, 0.9)
    decoder = HierarchicalPlanningDecoder()
    hits, out = _hits(decoder, _scene([FAR, parked], through))
    assert hits == [True] + [False] * 5
    assert out['final_planning'].tolist() == RIGHT[0].tolist()  # mode 1, the next best
    assert out['planning_score'][0].tolist() == out['planning_score'][1].tolist()  # untouched
    quiet, out = _hits(decoder, _scene([FAR, parked[:5] + (0.3, )], through))
    assert quiet == [False] * 6 and out['final_planning'].tolist() == through[0].tolist()
    every = torch.stack([_steps(0.0, 1.5 + 0.1 * k) for k in range(KP)])
    none, out = _hits(decoder, _scene([FAR, parked], every))
    assert none == [False] * 6  # all collide: no re-scoring
    assert out['final_planning'].tolist() == every[0].tolist()
    no_rescore = HierarchicalPlanningDecoder(use_rescore=False)
    assert _hits(no_rescore, _scene([FAR, parked], through))[0] == [False] * 6
    for scene in (_scene([FAR, parked], through), _scene([FAR, parked], every)):
        want = _np_rescore(*_rescore_inputs(scene))
        assert ((want < -500)[0].tolist() == _hits(decoder, scene)[0])


def test_fix_ego_offset_both_ways():
    """Forward gap of 0.25 m to a car ahead of mode 0's last box: only the intended 0.5 m
    shift closes it. Upstream's mis-indexed shift instead perturbs mode 0's first box against
    agent 0 (here placed where only the perturbed box reaches it)."""
    gentle = torch.stack([_steps(0.0, 1.0)] + RIGHT)  # mode 0 ends at (0, 6), front y 8.244
    ahead = (0.0, 9.494, 4.0, 2.0, 0.0, 0.9)  # rear edge y 8.494
    bug, fixed = HierarchicalPlanningDecoder(), HierarchicalPlanningDecoder(fix_ego_offset=True)
    assert _hits(bug, _scene([FAR, ahead], gentle))[0][0] is False
    assert _hits(fixed, _scene([FAR, ahead], gentle))[0][0] is True
    beside = (-1.9, 3.0, 1.0, 1.0, 0.0, 0.9)  # left of mode 0, clear of every unperturbed box
    assert _hits(bug, _scene([beside, FAR], gentle))[0][0] is True
    assert _hits(fixed, _scene([beside, FAR], gentle))[0][0] is False
    assert _hits(bug, _scene([FAR, beside], gentle))[0][0] is False  # not agent 0: unaffected
    for scene in (_scene([FAR, ahead], gentle), _scene([beside, FAR], gentle)):
        for decoder, fix in ((bug, False), (fixed, True)):
            want = _np_rescore(*_rescore_inputs(scene), fix=fix)
            assert (want < -500)[0].tolist() == _hits(decoder, scene)[0]


def _rescore_inputs(scene, cmd_row=2):
    det, motion, planning, _ = scene
    cls = planning['classification'][0].view(-1, 3, KP)[:, cmd_row]
    reg = planning['prediction'][0].view(-1, 3, KP, T, 2)[:, cmd_row].cumsum(-2)
    return (cls.numpy(), reg.numpy(), motion['classification'][0].sigmoid().numpy(),
            motion['prediction'][0].numpy(), det['prediction'][0].numpy(),
            det['classification'][0].sigmoid().max(-1).values.numpy())


def _random_scene(seed, batch=2, num_agent=16):
    gen = torch.Generator().manual_seed(seed)
    heading = torch.rand(batch, KP, 1, generator=gen) * math.pi
    speed = torch.rand(batch, KP, 1, generator=gen) * 3.0
    speed[:, -1] = 0.05  # a static plan: heading pi/2 throughout
    wiggle = torch.randn(batch, KP, T, 2, generator=gen) * 0.3
    plan_off = torch.stack([heading.cos(), heading.sin()], -1) * speed[..., None] + wiggle
    plan_off[:, -1] = 0.05 * torch.randn(batch, T, 2, generator=gen)
    plan_off[:, -2] = plan_off[:, -2] * torch.tensor([1.0, 1, 1, -1, -1, -1])[:, None]  # back
    anchors = torch.zeros(batch, num_agent, 11)
    anchors[..., 0] = (torch.rand(batch, num_agent, generator=gen) - 0.5) * 24
    anchors[..., 1] = torch.rand(batch, num_agent, generator=gen) * 20 - 4
    anchors[..., 3:5] = torch.rand(batch, num_agent, 2, generator=gen) * 1.5
    yaw = torch.rand(batch, num_agent, generator=gen) * 2 * math.pi
    anchors[..., 6], anchors[..., 7] = yaw.sin() * 1.3, yaw.cos() * 1.3  # unnormalised
    motion_reg = torch.randn(batch, num_agent, K, F, 2, generator=gen) * 0.8
    motion_reg[:, ::5] *= 0.01  # static agents
    det_cls = torch.full((batch, num_agent, 10), -6.0)
    det_cls[..., 3] = torch.randn(batch, num_agent, generator=gen) * 2  # about half confident
    det = dict(classification=[det_cls], prediction=[anchors])
    motion = dict(classification=[torch.randn(batch, num_agent, K, generator=gen)],
                  prediction=[motion_reg])
    cls = torch.randn(batch, 1, 3 * KP, generator=gen)
    reg = torch.zeros(batch, 1, 3 * KP, T, 2)
    reg.view(batch, 3, KP, T, 2)[:, 0] = plan_off
    reg.view(batch, 3, KP, T, 2)[:, 1] = plan_off * 0.5
    reg.view(batch, 3, KP, T, 2)[:, 2] = plan_off.flip(1)
    planning = dict(classification=[cls], prediction=[reg],
                    anchor_queue=[torch.randn(batch, 1, 11, generator=gen) for _ in range(3)],
                    period=torch.randint(0, 4, (batch, 1), generator=gen))
    cmd = torch.eye(3)[torch.randint(0, 3, (batch, ), generator=gen)]
    return det, motion, planning, dict(gt_ego_fut_cmd=cmd)


@pytest.mark.parametrize('fix', [False, True])
def test_rescore_matches_numpy_reference_on_random_scenes(fix):
    decoder = HierarchicalPlanningDecoder(fix_ego_offset=fix)
    penalised = total = 0
    for seed in range(6):
        det, motion, planning, data = _random_scene(seed)
        cmd = data['gt_ego_fut_cmd'].argmax(-1)
        cls = planning['classification'][0].view(-1, 3, KP)[torch.arange(2), cmd]
        reg = planning['prediction'][0].view(-1, 3, KP, T, 2)[torch.arange(2), cmd].cumsum(-2)
        got = decoder.rescore(cls, reg, motion['classification'][0].sigmoid(),
                              motion['prediction'][0], det['prediction'][0],
                              det['classification'][0].sigmoid().max(-1).values)
        want = _np_rescore(cls.numpy(), reg.numpy(), motion['classification'][0].sigmoid(),
                           motion['prediction'][0].numpy(), det['prediction'][0].numpy(),
                           det['classification'][0].sigmoid().max(-1).values.numpy(), fix=fix)
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-4)
        penalised += int((want < -500).sum())
        total += want.size
        out = decoder.decode(det, motion, planning, data)
        for b, res in enumerate(out):
            assert res['planning_score'].shape == (3, KP)
            assert res['planning'].shape == (3, KP, T, 2)
            assert res['ego_anchor_queue'].shape == (1, 3, 10)
            assert res['ego_period'].shape == (1, )
            plans = planning['prediction'][0].view(-1, 3, KP, T, 2)[b].cumsum(-2)
            torch.testing.assert_close(res['planning'], plans)
            scores = torch.sigmoid(planning['classification'][0].view(-1, 3, KP)[b])
            rows = [r for r in range(3) if r != int(cmd[b])]
            torch.testing.assert_close(res['planning_score'][rows], scores[rows])
            torch.testing.assert_close(res['planning_score'][int(cmd[b])],
                                       torch.sigmoid(got[b]))
            best = int(got[b].argmax())
            assert torch.equal(res['final_planning'], plans[int(cmd[b]), best])
    assert 0 < penalised < total  # the scenes exercise both outcomes


def test_trajectory_yaw_central_differences_and_static():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [1.0, 3.0]])
    yaw = trajectory_yaw(points, torch.tensor(0.3), 0.5)
    torch.testing.assert_close(yaw, torch.tensor([0.3, math.pi / 4, math.atan2(3, 0),
                                                  math.pi / 2]))
    still = trajectory_yaw(points * 0.1, torch.tensor(0.3), 0.5)
    torch.testing.assert_close(still, torch.full((4, ), 0.3))
    there_and_back = torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 0.0], [2.0, 0.0], [0.3, 0.0]])
    torch.testing.assert_close(trajectory_yaw(there_and_back, torch.tensor(-1.0), 0.5),
                               torch.full((5, ), -1.0))  # end near the start: static


def test_planning_rescore_has_no_sync_prone_ops_and_decode_copies_once_per_field():
    from turbox_mm.benchmark.sync_prone import SyncProneOps
    det, motion, planning, data = _random_scene(7)
    decoder = HierarchicalPlanningDecoder()
    cls = planning['classification'][0].view(-1, 3, KP)
    reg = planning['prediction'][0].view(-1, 3, KP, T, 2).cumsum(-2)
    with SyncProneOps(backward_sources=False) as found:
        decoder.select(det, motion, cls, reg, data)
    assert found.total == 0, found.table()
    with SyncProneOps(backward_sources=False) as found:
        out = decoder.decode(det, motion, planning, data)
    assert {f.kind for f in found.findings} == {'d2h'} and found.total == len(out[0]) == 5
    with pytest.raises(ValueError, match='gt_ego_fut_cmd must be'):
        decoder.decode(det, motion, planning, dict(gt_ego_fut_cmd=torch.eye(3)))
    with pytest.raises(ValueError, match='planning classification must be'):
        HierarchicalPlanningDecoder(ego_fut_mode=3).decode(det, motion, planning, data)
    built = TASK_UTILS.build(dict(type='turbox_mm.HierarchicalPlanningDecoder', ego_fut_ts=6,
                                  ego_fut_mode=6, use_rescore=True))
    assert built.use_rescore and not built.fix_ego_offset
