"""SparseDrive stage 2's motion-planning head, its instance queue and blocks
(docs/design/sparsedrive.md, sections 6.1 to 6.4), at tiny sizes: embed 64, 4 heads, 32 det
queries, 8 map queries, 12 agent steps and 6 modes, 6 ego steps and 6 modes per command.

The real motion/planning targets and decoders come from another module; the loss and
post-processing tests use the small stubs defined here, which follow upstream's contracts.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

from turbox_mm.models.sparse4d.anchor_encoder import SparseBox3DEncoder
from turbox_mm.models.sparse4d.box3d import COS_YAW, SIN_YAW, VY
from turbox_mm.models.sparse4d.instance_bank import project_anchors
from turbox_mm.models.sparsedrive.instance_queue import (EGO_ANCHOR, InstanceQueue,
                                                         ego_feature_map, gather_rows,
                                                         match_previous)
from turbox_mm.models.sparsedrive.motion_blocks import (MotionPlanningRefinementModule,
                                                        agent_to_lidar, sine_position_embedding)
from turbox_mm.models.sparsedrive.motion_planning_head import MotionPlanningHead
from turbox_mm.ops.deformable_aggregation import feature_maps_format
from turbox_mm.registry import MODELS

C, HEADS, A, M, NUM_CLS, CAMS = 64, 4, 32, 8, 10, 2
FUT_TS, FUT_MODE, EGO_TS, EGO_MODE = 12, 6, 6, 6
SCALE = (4, 6)  # the coarsest level's (h, w)
LEVELS = [(16, 24), (8, 12), SCALE]
ORDER = ['temp_gnn', 'gnn', 'norm', 'cross_gnn', 'norm', 'ffn', 'norm'] * 3 + ['refine']


def head_cfg(**overrides):
    rng = np.random.default_rng(0)
    attn = dict(type='turbox_mm.MultiheadFlashAttention', embed_dims=2 * C, num_heads=HEADS,
                batch_first=True, dropout=0.0)
    cfg = dict(
        fut_ts=FUT_TS, fut_mode=FUT_MODE, ego_fut_ts=EGO_TS, ego_fut_mode=EGO_MODE,
        motion_anchor=(rng.normal(size=(NUM_CLS, FUT_MODE, FUT_TS, 2)) * 5).astype(np.float32),
        plan_anchor=(rng.normal(size=(3, EGO_MODE, EGO_TS, 2)) * 5).astype(np.float32),
        embed_dims=C, decouple_attn=True,
        instance_queue=dict(type='turbox_mm.InstanceQueue', embed_dims=C, queue_length=4,
                            tracking_threshold=0.2, feature_map_scale=SCALE),
        operation_order=ORDER, temp_graph_model=attn, graph_model=attn,
        cross_graph_model=dict(attn, embed_dims=C),
        norm_layer=dict(type='LN', normalized_shape=C),
        ffn=dict(type='turbox_mm.AsymmetricFFN', in_channels=C, pre_norm=dict(type='LN'),
                 embed_dims=C, feedforward_channels=2 * C, num_fcs=2, ffn_drop=0.0,
                 act_cfg=dict(type='ReLU', inplace=True)),
        refine_layer=dict(type='turbox_mm.MotionPlanningRefinementModule', embed_dims=C,
                          fut_ts=FUT_TS, fut_mode=FUT_MODE, ego_fut_ts=EGO_TS,
                          ego_fut_mode=EGO_MODE),
        motion_loss_cls=dict(type='mmdet.FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25,
                             loss_weight=0.2),
        motion_loss_reg=dict(type='mmdet.L1Loss', loss_weight=0.2),
        plan_loss_cls=dict(type='mmdet.FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25,
                           loss_weight=0.5),
        plan_loss_reg=dict(type='mmdet.L1Loss', loss_weight=1.0),
        plan_loss_status=dict(type='mmdet.L1Loss', loss_weight=1.0),
        num_det=8, num_map=4)
    cfg.update(overrides)
    return cfg


def make_head(**overrides):
    torch.manual_seed(0)
    head = MotionPlanningHead(**head_cfg(**overrides))
    head.init_weights()
    return head


def encoder():
    torch.manual_seed(1)
    return SparseBox3DEncoder(embed_dims=(32, 8, 8, 16))


def pose(t, batch):
    """Lidar-to-global ``[B, 4, 4]`` float64 of frame ``t`` (yaw and position change)."""
    out = torch.zeros(batch, 4, 4, dtype=torch.float64)
    for b in range(batch):
        yaw = 0.3 * t + 0.5 * b
        out[b, :2, :2] = torch.tensor([[math.cos(yaw), -math.sin(yaw)],
                                       [math.sin(yaw), math.cos(yaw)]], dtype=torch.float64)
        out[b, 2, 2] = out[b, 3, 3] = 1
        out[b, :3, 3] = torch.tensor([2.0 * t + b, 1.0 * t, 0.1 * t], dtype=torch.float64)
    return out


def boxes(batch, num, gen):
    yaw = torch.rand(batch, num, generator=gen) * 2 * math.pi
    return torch.cat([torch.rand(batch, num, 2, generator=gen) * 40 - 20,
                      torch.randn(batch, num, 1, generator=gen) * 0.3,
                      torch.rand(batch, num, 3, generator=gen) + 0.3,
                      yaw.sin()[..., None], yaw.cos()[..., None],
                      torch.randn(batch, num, 3, generator=gen)], dim=-1)


def frame(t, ids, batch=2, seed=None, triple=True):
    """One frame's head inputs: det and map outputs (leaf tensors with gradients), features
    and metas."""
    gen = torch.Generator().manual_seed(100 + t if seed is None else seed)
    det = dict(
        instance_feature=torch.randn(batch, A, C, generator=gen).requires_grad_(),
        anchor_embed=torch.randn(batch, A, C, generator=gen).requires_grad_(),
        classification=[torch.randn(batch, A, NUM_CLS, generator=gen) * 2],
        prediction=[boxes(batch, A, gen)],
        quality=[torch.randn(batch, A, 2, generator=gen)],
        instance_id=ids.clone())
    map_out = dict(
        instance_feature=torch.randn(batch, M, C, generator=gen).requires_grad_(),
        anchor_embed=torch.randn(batch, M, C, generator=gen).requires_grad_(),
        classification=[torch.randn(batch, M, 3, generator=gen)],
        prediction=[torch.randn(batch, M, 40, generator=gen)])
    levels = [torch.randn(batch, CAMS, C, h, w, generator=gen).requires_grad_()
              for h, w in LEVELS]
    T = pose(t, batch)
    metas = dict(T_global=T, T_global_inv=torch.linalg.inv(T))
    return det, map_out, (feature_maps_format(levels) if triple else levels), metas, levels


def ids_of(*rows):
    return torch.stack([torch.as_tensor(r, dtype=torch.long) for r in rows])


# ---------------------------------------------------------------------------------------------
# blocks
# ---------------------------------------------------------------------------------------------


def test_sine_embedding_against_formula_and_upstream_layout():
    pos = torch.tensor([[1.5, -0.25], [0.0, 3.0]])
    got = sine_position_embedding(pos, 8)
    # by hand: 4 features per axis, periods 10000 ** (2 * (k // 2) / 4) = 1, 1, 100, 100
    for n, (x, y) in enumerate(pos.tolist()):
        want = []
        for v in (y, x):  # y first
            for k in range(4):
                arg = v * 2 * math.pi / 10000 ** (2 * (k // 2) / 4)
                want.append(math.sin(arg) if k % 2 == 0 else math.cos(arg))
        torch.testing.assert_close(got[n], torch.tensor(want))
    # at 256 features: the interleaved stack of sin(even) and cos(odd) per axis (DAB-DETR)
    pos = torch.randn(3, 5, 2) * 20
    half = 128
    dim_t = 10000 ** (2 * (torch.arange(half, dtype=torch.float32) // 2) / half)

    def axis(v):
        p = (v * 2 * math.pi)[..., None] / dim_t
        return torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=-1).flatten(-2)

    want = torch.cat([axis(pos[..., 1]), axis(pos[..., 0])], dim=-1)
    torch.testing.assert_close(sine_position_embedding(pos), want)
    with pytest.raises(ValueError, match='even'):
        sine_position_embedding(pos, 7)


def test_agent_to_lidar_rotates_by_the_box_yaw():
    box = torch.zeros(1, 2, 11)
    box[0, 0, SIN_YAW], box[0, 0, COS_YAW] = 1.0, 0.0  # heading +y
    box[0, 1, SIN_YAW], box[0, 1, COS_YAW] = 0.0, -2.0  # heading -x, not normalised
    traj = torch.tensor([1.0, 0.0]).expand(1, 2, 1, 1, 2)
    out = agent_to_lidar(traj, box)
    torch.testing.assert_close(out[0, 0, 0, 0], torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0, 1, 0, 0], torch.tensor([-1.0, 0.0]), atol=1e-6, rtol=0)
    # against the rotation written as upstream's einsum with R^T per box
    box = torch.randn(2, 3, 11)
    traj = torch.randn(2, 3, 4, 5, 2)
    yaw = torch.atan2(box[..., SIN_YAW], box[..., COS_YAW])
    rot_t = torch.stack([torch.stack([yaw.cos(), yaw.sin()]),
                         torch.stack([-yaw.sin(), yaw.cos()])])
    torch.testing.assert_close(agent_to_lidar(traj, box),
                               torch.einsum('abcij,jkab->abcik', traj, rot_t))


def test_refinement_shapes_bias_and_errors():
    ref = MotionPlanningRefinementModule(C, FUT_TS, FUT_MODE, EGO_TS, EGO_MODE)
    outs = ref(torch.randn(2, A, FUT_MODE, C), torch.randn(2, 1, 3 * EGO_MODE, C),
               torch.randn(2, 1, C), torch.randn(2, 1, C))
    assert [tuple(o.shape) for o in outs] == [
        (2, A, FUT_MODE), (2, A, FUT_MODE, FUT_TS, 2), (2, 1, 3 * EGO_MODE),
        (2, 1, 3 * EGO_MODE, EGO_TS, 2), (2, 1, 10)]
    assert torch.allclose(ref.motion_cls_branch[-1].bias, torch.tensor(-math.log(99)))
    assert torch.allclose(ref.plan_cls_branch[-1].bias, torch.tensor(-math.log(99)))
    # upstream's module indices (checkpoints load by name)
    assert [type(m) for m in ref.motion_cls_branch] == [nn.Linear, nn.ReLU, nn.LayerNorm] * 2 + [
        nn.Linear]
    assert isinstance(ref.plan_status_branch[4], nn.Linear)
    with pytest.raises(ValueError, match='plan_query'):
        ref(torch.randn(2, A, FUT_MODE, C), torch.randn(2, 1, EGO_MODE, C),
            torch.randn(2, 1, C), torch.randn(2, 1, C))


# ---------------------------------------------------------------------------------------------
# instance queue
# ---------------------------------------------------------------------------------------------


def dense_reorder(x, instance_id, prev_id, prev_conf, threshold):
    """Upstream's re-ordering: the match-weighted sum over every previous query."""
    match = instance_id[..., None] == prev_id[:, None]
    if threshold > 0:
        match = match & (prev_conf > threshold)[:, None]
    m = match.to(x.dtype) if x.is_floating_point() else match.long()
    return (m.reshape(*m.shape, *([1] * (x.dim() - 2))) * x[:, None]).sum(dim=2)


@pytest.mark.parametrize('batch', [1, 2])
def test_gather_reorder_equals_the_dense_match_product(batch):
    gen = torch.Generator().manual_seed(3)
    num = 40
    prev_id = torch.stack([torch.randperm(200, generator=gen)[:num] for _ in range(batch)])
    cur_id = torch.stack([torch.randperm(200, generator=gen)[:num] for _ in range(batch)])
    cur_id[:, :15] = prev_id[:, torch.randperm(num, generator=gen)[:15]]  # many matches
    conf = torch.rand(batch, num, generator=gen)
    feat = torch.randn(batch, num, 16, generator=gen)
    box = torch.randn(batch, num, 11, generator=gen)
    period = torch.randint(0, 5, (batch, num), generator=gen)
    for threshold in (0.0, 0.4):
        found, src = match_previous(cur_id, prev_id, conf, threshold)
        assert found.sum() > 0 and (~found).sum() > 0
        for x in (feat, box, period):
            got = gather_rows(x, src, found)
            want = dense_reorder(x, cur_id, prev_id, conf, threshold)
            assert got.dtype == x.dtype
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_negative_ids_never_match():
    found, _ = match_previous(torch.tensor([[-1, 4]]), torch.tensor([[-1, 4]]))
    assert found.tolist() == [[False, True]]


def run_queue_frame(queue, t, ids, mask, batch=2, status=None):
    det, _, fmaps, metas, levels = frame(t, ids, batch)
    out = queue.get(det, fmaps, metas, batch, mask)
    decoded_ego = torch.randn(batch, 1, C)
    status = torch.randn(batch, 1, 10) if status is None else status
    queue.cache_motion(None, det, metas)
    queue.cache_planning(decoded_ego, status)
    return det, metas, levels, out, decoded_ego, status


def test_queue_over_frames_periods_matching_scene_change_and_reset():
    torch.manual_seed(0)
    queue = InstanceQueue(C, queue_length=4, tracking_threshold=0.2, feature_map_scale=SCALE)
    ids0 = ids_of(range(A), range(A))
    det0, metas0, _, out0, ego0, status0 = run_queue_frame(queue, 0, ids0, None)
    ego_feature, ego_anchor, temp_f, temp_a, temp_mask = out0
    assert ego_feature.shape == (2, 1, C) and ego_anchor.shape == (2, 1, 11)
    assert temp_f.shape == (2, A + 1, 1, C) and temp_a.shape == (2, A + 1, 1, 11)
    assert not temp_mask.any()
    torch.testing.assert_close(ego_anchor, torch.tensor(EGO_ANCHOR).expand(2, 1, 11))
    assert queue.period.tolist() == [[1] * A] * 2

    # frame 1: queries 0..19 continue previous ids (shuffled), the rest are new; previous
    # query 5 (id 5) falls below the tracking threshold
    gen = torch.Generator().manual_seed(7)
    perm = torch.randperm(A, generator=gen)
    ids1 = torch.arange(100, 100 + A).repeat(2, 1)
    ids1[:, :20] = perm[:20]
    queue.prev_confidence[:, 5] = 0.1
    same_scene = torch.tensor([True, True])
    det1, metas1, _, out1, ego1, status1 = run_queue_frame(queue, 1, ids1, same_scene)
    _, ego_anchor, temp_f, temp_a, temp_mask = out1
    assert temp_f.shape == (2, A + 1, 2, C)
    T10 = (metas1['T_global_inv'] @ metas0['T_global']).float()
    moved0 = project_anchors(det0['prediction'][-1], T10, torch.zeros(2))
    matched = [i for i in range(20) if perm[i] != 5]
    for b in range(2):
        for i in range(A):
            src = int(perm[i]) if i in matched else None
            if src is None:
                assert not temp_f[b, i, 0].any() and not temp_a[b, i, 0].any()
                assert temp_mask[b, i].tolist() == [True, False]
            else:
                torch.testing.assert_close(temp_f[b, i, 0], det0['instance_feature'][b, src])
                torch.testing.assert_close(temp_a[b, i, 0], moved0[b, src])
                assert temp_mask[b, i].tolist() == [False, False]
    torch.testing.assert_close(temp_f[:, :A, 1], det1['instance_feature'].detach())
    # ego: the decoded feature of frame 0, its anchor moved, vy = predicted forward speed
    torch.testing.assert_close(temp_f[:, A, 0], ego0[:, 0])
    ego_prev = torch.tensor(EGO_ANCHOR).expand(2, 1, 11)
    torch.testing.assert_close(temp_a[:, A:, 0], project_anchors(ego_prev, T10, torch.zeros(2)))
    torch.testing.assert_close(ego_anchor[:, 0, VY], status0[:, 0, 6])
    assert temp_mask[:, A].tolist() == [[False, False]] * 2

    # frame 2: every query keeps its id; sample 1 changes scene (bank mask False, new ids)
    ids2 = ids1.clone()
    ids2[1] = torch.arange(500, 500 + A)
    _, _, _, out2, _, _ = run_queue_frame(queue, 2, ids2, torch.tensor([True, False]))
    _, ego_anchor, temp_f, temp_a, temp_mask = out2
    want0 = [3 if i in matched else 2 for i in range(A)]
    assert queue.period[0].tolist() == want0 and queue.period[1].tolist() == [1] * A
    assert queue.ego_period.tolist() == [[3], [1]]
    assert temp_mask[0, A].tolist() == [False] * 3
    assert temp_mask[1, A].tolist() == [True, True, False]
    assert not temp_f[1, :A, :2].any()  # the new scene's agents have no history
    torch.testing.assert_close(ego_anchor[0, 0, VY], status1[0, 0, 6])
    assert ego_anchor[1, 0, VY] == 0

    # frames 3, 4: the queue holds 4 entries, periods stop at 4
    for t in (3, 4):
        _, _, _, out, _, _ = run_queue_frame(queue, t, ids2, torch.tensor([True, True]))
    assert out[2].shape == (2, A + 1, 4, C) and len(queue.anchor_queue) == 4
    assert queue.period[0, matched[0]] == 4 and queue.ego_period.tolist() == [[4], [3]]
    assert out[4][1, A].tolist() == [True, False, False, False]

    # a batch of another size starts afresh
    _, _, _, out, _, _ = run_queue_frame(queue, 5, ids_of(range(A)), torch.tensor([True]), 1)
    assert out[2].shape == (1, A + 1, 1, C) and queue.period.tolist() == [[1] * A]
    assert queue.ego_period.tolist() == [[1]]
    assert out[1][0, 0, VY] == 0


def test_queue_mask_none_with_history_restarts_the_ego():
    queue = InstanceQueue(C, queue_length=4, feature_map_scale=SCALE)
    ids = ids_of(range(A), range(A))
    run_queue_frame(queue, 0, ids, None)
    _, _, _, out, _, _ = run_queue_frame(queue, 1, ids, None)
    assert queue.ego_period.tolist() == [[1], [1]] and (out[1][..., VY] == 0).all()
    assert queue.period.tolist() == [[2] * A] * 2  # agents still match by id


def test_ego_feature_map_from_triple_and_levels():
    det, _, triple, _, levels = frame(0, ids_of(range(A), range(A)))
    want = levels[-1][:, 0]
    torch.testing.assert_close(ego_feature_map(triple, SCALE), want)
    torch.testing.assert_close(ego_feature_map(levels, SCALE), want)
    queue = InstanceQueue(C, feature_map_scale=SCALE)
    feat, anchor = queue.prepare_planning(triple, None, 2)
    assert feat.shape == (2, 1, C) and feat.requires_grad
    # at upstream's scale (8, 22): kernel (4, 11) pools the stride-2 map to one position
    q = InstanceQueue(16, feature_map_scale=(256 / 32, 704 / 32))
    assert q.ego_feature_encoder[-1].kernel_size == (4, 11)
    assert q.prepare_planning([torch.randn(1, 6, 16, 8, 22)], None, 1)[0].shape == (1, 1, 16)
    with pytest.raises(ValueError, match='feature_map_scale'):
        ego_feature_map(levels, (8, 22))
    with pytest.raises(ValueError, match='feature_map_scale'):
        InstanceQueue(C)


# ---------------------------------------------------------------------------------------------
# head
# ---------------------------------------------------------------------------------------------


def run_head(head, t, ids, mask, batch=2, anchor_encoder=None):
    det, map_out, fmaps, metas, levels = frame(t, ids, batch)
    enc = anchor_encoder or encoder()
    motion, planning = head(det, map_out, fmaps, metas, enc, mask)
    return det, map_out, levels, motion, planning


@pytest.mark.parametrize('batch', [1, 2])
def test_forward_shapes_and_queue(batch):
    head = make_head()
    ids = torch.arange(A).repeat(batch, 1)
    for t in range(3):
        mask = None if t == 0 else torch.ones(batch, dtype=torch.bool)
        _, _, _, motion, planning = run_head(head, t, ids, mask, batch)
    assert len(motion['classification']) == 1 and len(planning['status']) == 1
    assert motion['classification'][0].shape == (batch, A, FUT_MODE)
    assert motion['prediction'][0].shape == (batch, A, FUT_MODE, FUT_TS, 2)
    assert motion['period'].tolist() == [[3] * A] * batch
    assert len(motion['anchor_queue']) == 3
    assert motion['anchor_queue'][0].shape == (batch, A, 11)
    assert planning['classification'][0].shape == (batch, 1, 3 * EGO_MODE)
    assert planning['prediction'][0].shape == (batch, 1, 3 * EGO_MODE, EGO_TS, 2)
    assert planning['status'][0].shape == (batch, 1, 10)
    assert planning['period'].tolist() == [[3]] * batch
    assert len(planning['anchor_queue']) == 3 and planning['anchor_queue'][0].shape == (
        batch, 1, 11)
    # the outputs hold copies of the queue lists: the next frame does not change them
    queue_before = list(motion['anchor_queue'])
    run_head(head, 3, ids, torch.ones(batch, dtype=torch.bool), batch)
    assert all(a is b for a, b in zip(motion['anchor_queue'], queue_before))


def test_forward_caches_the_decoded_ego_feature_and_status():
    head = make_head()
    seen = {}
    refine = head.layers[len(ORDER) - 1]
    refine.register_forward_hook(lambda m, args, out: seen.update(ego=args[2], status=out[4]))
    ids = torch.arange(A).repeat(2, 1)
    run_head(head, 0, ids, None)
    queue = head.instance_queue
    torch.testing.assert_close(queue.ego_feature_queue[-1], seen['ego'].detach())
    torch.testing.assert_close(queue.prev_ego_status, seen['status'].detach())


def test_temp_gnn_sees_the_queue_mask_and_mode_queries_use_anchors():
    head = make_head()
    calls = []
    temp = head.layers[0]
    temp.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(kwargs['key_padding_mask'].clone()),
        with_kwargs=True)
    ids = torch.arange(A).repeat(2, 1)
    run_head(head, 0, ids, None)
    new_ids = ids.clone()
    new_ids[:, A // 2:] += 1000  # half of the agents are new
    run_head(head, 1, new_ids, torch.tensor([True, False]))
    mask = calls[-1].reshape(2, A + 1, 2)
    assert mask[:, :A // 2].eq(torch.tensor([False, False])).all()
    assert mask[:, A // 2:A].eq(torch.tensor([True, False])).all()
    assert mask[:, A].tolist() == [[False, False], [True, False]]  # ego: scene change in 1
    # motion anchors: each query's best class, rotated by its box yaw
    det, *_ = frame(2, ids)
    got = head.motion_anchors(det['classification'][-1].sigmoid(), det['prediction'][-1])
    cls = det['classification'][-1].argmax(-1)
    want = agent_to_lidar(head.motion_anchor[cls], det['prediction'][-1])
    torch.testing.assert_close(got, want)


def test_gradients_reach_det_map_and_image_features():
    head = make_head()
    ids = torch.arange(A).repeat(2, 1)
    run_head(head, 0, ids, None)
    enc = encoder()
    det, map_out, levels, motion, planning = run_head(head, 1, ids, torch.tensor([True, True]),
                                                      anchor_encoder=enc)
    total = (motion['classification'][0].sum() + motion['prediction'][0].sum() +
             planning['classification'][0].sum() + planning['prediction'][0].sum() +
             planning['status'][0].sum())
    total.backward()
    for name, x in (('det feature', det['instance_feature']), ('det embed', det['anchor_embed']),
                    ('map feature', map_out['instance_feature']),
                    ('map embed', map_out['anchor_embed']), ('front camera', levels[-1])):
        assert x.grad is not None and x.grad.abs().sum() > 0, name
    assert levels[-1].grad[:, 1:].abs().sum() == 0  # only camera 0 feeds the ego feature
    assert head.instance_queue.ego_feature_encoder[0].weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    # the boxes only orient the motion anchors (detached, as upstream)
    assert not det['prediction'][-1].requires_grad
    names = dict(head.named_parameters())
    assert 'motion_anchor' not in names and 'plan_anchor' not in names
    assert {'motion_anchor', 'plan_anchor', 'instance_queue.ego_anchor'} <= set(
        head.state_dict())


def test_forward_has_no_host_syncs():
    from turbox_mm.benchmark.sync_prone import SyncProneOps
    head = make_head(op_impl='turbox')
    ids = torch.arange(A).repeat(2, 1)
    run_head(head, 0, ids, None)
    enc = encoder()
    inputs = frame(1, ids)[:4]
    mask = torch.tensor([True, False])
    with SyncProneOps(backward_sources=False) as found:
        motion, planning = head(*inputs, enc, mask)
        (motion['prediction'][0].sum() + planning['status'][0].sum()).backward()
    assert found.total == 0, found.table()


def test_init_weights_xavier_except_refine():
    head = MotionPlanningHead(**head_cfg())
    refine = head.layers[len(ORDER) - 1]
    before = {k: v.clone() for k, v in refine.state_dict().items()}
    torch.manual_seed(5)
    head.init_weights()
    for k, v in refine.state_dict().items():
        torch.testing.assert_close(v, before[k])  # refine keeps its own init
    out_proj = head.layers[0].attn.out_proj.weight  # nn.Linear default would be +-1/sqrt(128)
    bound = math.sqrt(6 / (2 * 2 * C))
    assert out_proj.abs().max() <= bound and out_proj.abs().max() > 1 / math.sqrt(2 * C)


def test_config_errors():
    with pytest.raises(ValueError, match='motion_anchor'):
        MotionPlanningHead(**head_cfg(motion_anchor=None))
    with pytest.raises(ValueError, match='plan_anchor'):
        MotionPlanningHead(**head_cfg(plan_anchor=np.zeros((3, 2, EGO_TS, 2), np.float32)))
    with pytest.raises(ValueError, match='unknown operations'):
        MotionPlanningHead(**head_cfg(operation_order=['deformable', 'refine']))
    with pytest.raises(ValueError, match='without a layer config'):
        MotionPlanningHead(**head_cfg(cross_graph_model=None))
    with pytest.raises(ValueError, match="op_impl"):
        MotionPlanningHead(**head_cfg(op_impl='fast'))
    head = make_head(num_det=A + 1)
    with pytest.raises(ValueError, match='num_det'):
        run_head(head, 0, torch.arange(A).repeat(2, 1), None)
    det, map_out, fmaps, metas, _ = frame(0, torch.arange(A).repeat(2, 1))
    del det['instance_id']
    with pytest.raises(KeyError, match='instance_id'):
        make_head()(det, map_out, fmaps, metas, encoder(), None)
    built = MODELS.build(dict(type='turbox_mm.MotionPlanningHead', **head_cfg()))
    assert isinstance(built.instance_queue, InstanceQueue)


# ---------------------------------------------------------------------------------------------
# loss and post-processing (stub targets and decoders with upstream's contracts)
# ---------------------------------------------------------------------------------------------


def _best(reg, target, weight):
    dist = torch.linalg.norm(target.cumsum(-2).unsqueeze(-3) - reg.cumsum(-2), dim=-1)
    mode = (dist * weight.unsqueeze(-2)).mean(-1).argmin(-1)
    index = mode[..., None, None, None].expand(*mode.shape, 1, *reg.shape[-2:])
    return mode, reg.gather(-3, index).squeeze(-3)


class StubMotionTarget:
    """turbox_mm.MotionTarget's contract: matched GT on their queries, the best mode, both
    cumulated into positions; the count at least 1."""

    def sample(self, reg_pred, trajs, masks, indices):
        batch, num, _, steps, _ = reg_pred.shape
        target = reg_pred.new_zeros(batch, num, steps, 2)
        weight = reg_pred.new_zeros(batch, num, steps)
        count = 0
        for b, (query, gt) in enumerate(indices):
            target[b, query] = trajs[b][gt]
            weight[b, query] = masks[b][gt]
            count += query.shape[0]
        mode, best = _best(reg_pred, target, weight)
        num_pos = torch.full((), max(float(count), 1.0))
        return (mode, weight.any(-1).float(), best.cumsum(-2), target.cumsum(-2), weight,
                num_pos)


class StubPlanningTarget:
    """Upstream's PlanningTarget (without the unit dimension): the command's modes."""

    def sample(self, cls, reg, trajs, masks, cmd):
        batch = cls.shape[0]
        command = cmd.argmax(-1)
        cls = cls.reshape(batch, 3, EGO_MODE)[torch.arange(batch), command]
        reg = reg.reshape(batch, 3, EGO_MODE, EGO_TS, 2)[torch.arange(batch), command]
        mode, best = _best(reg, trajs, masks)
        return cls, mode, masks.any(-1).float(), best, trajs, masks


def focal(x, label, alpha=0.25, gamma=2.0):
    """Element-wise sigmoid focal loss ``[N, K]`` against one-hot ``label`` ``[N]``."""
    p = x.sigmoid()
    t = nn.functional.one_hot(label, x.shape[-1]).bool()
    pt = torch.where(t, p, 1 - p)
    return -torch.where(t, torch.full_like(p, alpha), torch.full_like(p, 1 - alpha)) * (
        1 - pt).pow(gamma) * pt.log()


def loss_case(batch=2):
    gen = torch.Generator().manual_seed(11)
    motion = dict(classification=[torch.randn(batch, A, FUT_MODE, generator=gen)],
                  prediction=[torch.randn(batch, A, FUT_MODE, FUT_TS, 2, generator=gen)])
    planning = dict(classification=[torch.randn(batch, 1, 3 * EGO_MODE, generator=gen)],
                    prediction=[torch.randn(batch, 1, 3 * EGO_MODE, EGO_TS, 2, generator=gen)],
                    status=[torch.randn(batch, 1, 10, generator=gen)])
    counts = [3, 0, 5][:batch]
    trajs = [torch.randn(n, FUT_TS, 2, generator=gen) for n in counts]
    masks = [(torch.rand(n, FUT_TS, generator=gen) > 0.3).float() for n in counts]
    indices = [(torch.randperm(A, generator=gen)[:n], torch.randperm(n, generator=gen))
               for n in counts]
    ego_masks = torch.ones(batch, EGO_TS)
    ego_masks[0, 4:] = 0
    metas = dict(gt_agent_fut_trajs=trajs, gt_agent_fut_masks=masks,
                 gt_ego_fut_trajs=torch.randn(batch, EGO_TS, 2, generator=gen),
                 gt_ego_fut_masks=ego_masks,
                 gt_ego_fut_cmd=nn.functional.one_hot(torch.tensor([2, 0, 1][:batch]), 3).float(),
                 ego_status=torch.randn(batch, 10, generator=gen))
    return motion, planning, metas, indices


def expected_losses(motion, planning, metas, indices):
    m_t = StubMotionTarget().sample(motion['prediction'][0], metas['gt_agent_fut_trajs'],
                                    metas['gt_agent_fut_masks'], indices)
    mode, cls_w, best, target, weight, count = m_t
    num_pos = float(count)
    cls = motion['classification'][0]
    want = {}
    want['motion_loss_cls_0'] = 0.2 * (focal(cls.flatten(0, 1), mode.flatten()) *
                                       cls_w.flatten()[:, None]).sum() / num_pos
    want['motion_loss_reg_0'] = 0.2 * ((best - target).abs() *
                                       weight[..., None]).sum() / num_pos
    p_cls, p_mode, p_w, p_best, p_target, p_weight = StubPlanningTarget().sample(
        planning['classification'][0], planning['prediction'][0], metas['gt_ego_fut_trajs'],
        metas['gt_ego_fut_masks'], metas['gt_ego_fut_cmd'])
    want['planning_loss_cls_0'] = 0.5 * (focal(p_cls, p_mode) * p_w[:, None]).mean()
    want['planning_loss_reg_0'] = ((p_best - p_target).abs() * p_weight[..., None]).mean()
    want['planning_loss_status_0'] = (planning['status'][0][:, 0] -
                                      metas['ego_status']).abs().mean()
    return want


@pytest.mark.parametrize('op_impl', ['stock', 'turbox'])
@pytest.mark.parametrize('batch', [1, 2])
def test_loss_values_and_keys(op_impl, batch):
    head = make_head(op_impl=op_impl)
    head.motion_sampler, head.planning_sampler = StubMotionTarget(), StubPlanningTarget()
    motion, planning, metas, indices = loss_case(batch)
    losses = head.loss(motion, planning, metas, indices)
    want = expected_losses(motion, planning, metas, indices)
    assert set(losses) == set(want)
    for key in want:
        torch.testing.assert_close(losses[key], want[key], rtol=1e-5, atol=1e-6, msg=key)


def test_loss_without_any_gt_agent_is_zero_and_finite():
    head = make_head(op_impl='turbox')
    head.motion_sampler, head.planning_sampler = StubMotionTarget(), StubPlanningTarget()
    motion, planning, metas, _ = loss_case(2)
    metas['gt_agent_fut_trajs'] = [torch.zeros(0, FUT_TS, 2)] * 2
    metas['gt_agent_fut_masks'] = [torch.zeros(0, FUT_TS)] * 2
    empty = [(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))] * 2
    losses = head.loss(motion, planning, metas, empty)
    assert losses['motion_loss_cls_0'] == 0 and losses['motion_loss_reg_0'] == 0
    assert all(torch.isfinite(v) for v in losses.values())


def test_turbox_loss_has_no_host_syncs(monkeypatch):
    from turbox_mm.benchmark.sync_prone import SyncProneOps
    import turbox_mm.models.losses.focal_loss as focal_module
    monkeypatch.setattr(focal_module, '_on_gpu', lambda pred: True)  # mmcv's path on CUDA
    found = {}
    for impl in ('stock', 'turbox'):
        head = make_head(op_impl=impl)
        head.motion_sampler, head.planning_sampler = StubMotionTarget(), StubPlanningTarget()
        motion, planning, metas, indices = loss_case(2)
        with SyncProneOps(backward_sources=False) as found[impl]:
            head.loss(motion, planning, metas, indices)
    assert found['turbox'].total == 0, found['turbox'].table()
    assert found['stock'].total > 0  # mmdet's L1Loss tests its weights on the host


def test_loss_needs_samplers_and_gt():
    head = make_head()
    motion, planning, metas, indices = loss_case(2)
    with pytest.raises(RuntimeError, match='sampler'):
        head.loss(motion, planning, metas, indices)
    head.motion_sampler, head.planning_sampler = StubMotionTarget(), StubPlanningTarget()
    del metas['ego_status']
    with pytest.raises(KeyError, match='ego_status'):
        head.loss(motion, planning, metas, indices)


class StubMotionDecoder:
    def decode(self, cls_scores, box_preds, instance_id=None, quality=None, motion_output=None):
        self.args = (cls_scores, box_preds, instance_id, quality, motion_output)
        return [dict(trajs_3d=motion_output['prediction'][-1][b]) for b in
                range(box_preds[-1].shape[0])]


class StubPlanningDecoder:
    def __init__(self, key='final_planning'):
        self.key = key

    def decode(self, det_output, motion_output, planning_output, metas):
        self.args = (det_output, motion_output, planning_output, metas)
        cmd = metas['gt_ego_fut_cmd'].argmax(-1)
        return [{self.key: planning_output['prediction'][-1][b, 0, cmd[b] * EGO_MODE]}
                for b in range(cmd.shape[0])]


def test_post_process_merges_both_decoders_per_sample():
    head = make_head()
    head.motion_decoder, head.planning_decoder = StubMotionDecoder(), StubPlanningDecoder()
    ids = torch.arange(A).repeat(2, 1)
    det, _, _, motion, planning = run_head(head, 0, ids, None)
    metas = dict(gt_ego_fut_cmd=torch.tensor([[0., 0., 1.], [1., 0., 0.]]))
    results = head.post_process(det, motion, planning, metas)
    assert len(results) == 2 and results[0] is not results[1]
    for b in range(2):
        assert set(results[b]) == {'trajs_3d', 'final_planning'}
        torch.testing.assert_close(results[b]['trajs_3d'], motion['prediction'][0][b])
    torch.testing.assert_close(results[1]['final_planning'], planning['prediction'][0][1, 0, 0])
    cls, box, instance_id, quality, motion_arg = head.motion_decoder.args
    assert cls is det['classification'] and box is det['prediction'] and quality is det[
        'quality']
    assert instance_id is det['instance_id'] and motion_arg is motion
    assert head.planning_decoder.args[3] is metas
    head.planning_decoder = StubPlanningDecoder(key='trajs_3d')
    with pytest.raises(ValueError, match='trajs_3d'):
        head.post_process(det, motion, planning, metas)
    head.motion_decoder = None
    with pytest.raises(RuntimeError, match='decoder'):
        head.post_process(det, motion, planning, metas)
