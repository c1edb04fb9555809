"""SparseDrive map-head point-set modules: encoder, keypoints (and anchor projection),
refinement, decoder, and the deformable aggregation with the point keypoints
(docs/design/sparsedrive.md, section 4)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import no_matrix_products

from turbox_mm.models.sparse4d.deformable_feature_aggregation import \
    DeformableFeatureAggregation
from turbox_mm.models.sparsedrive.point_decoder import SparsePoint3DDecoder
from turbox_mm.models.sparsedrive.point_encoder import SparsePoint3DEncoder
from turbox_mm.models.sparsedrive.point_keypoints import (MAP_KEYPOINTS,
                                                          SparsePoint3DKeyPointsGenerator)
from turbox_mm.models.sparsedrive.point_refinement import SparsePoint3DRefinementModule
from turbox_mm.registry import MODELS, TASK_UTILS

GROUND = -1.84023
HEIGHTS = (0, 0.5, -0.5, 1, -1)


def polylines(batch, queries, num_sample=20, seed=0, dtype=torch.float32):
    """Polyline anchors ``[B, M, 2 * num_sample]``: x in [-3, 3], y 8-14 m ahead, a short
    random walk per point."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.stack([torch.rand(batch, queries, generator=gen) * 6 - 3,
                         torch.rand(batch, queries, generator=gen) * 6 + 8], dim=-1)
    steps = 0.1 * torch.randn(batch, queries, num_sample, 2, generator=gen)
    pts = start[:, :, None] + steps.cumsum(dim=2)
    return pts.reshape(batch, queries, 2 * num_sample).to(dtype)


def map_keypoints(**kwargs):
    return SparsePoint3DKeyPointsGenerator(**{**MAP_KEYPOINTS, **kwargs})


# ---------------------------------------------------------------------------------------------
# SparsePoint3DEncoder
# ---------------------------------------------------------------------------------------------


def test_encoder_structure_and_value_against_functional():
    enc = SparsePoint3DEncoder()
    kinds = [type(m) for m in enc.pos_fc]
    assert kinds == [nn.Linear, nn.ReLU, nn.LayerNorm, nn.Linear, nn.ReLU, nn.LayerNorm]
    assert enc.pos_fc[0].in_features == 40 and enc.pos_fc[0].out_features == 256
    assert enc.pos_fc[3].in_features == 256 and enc.embed_dims == 256
    anchor = polylines(2, 3)
    out = enc(anchor)
    assert out.shape == (2, 3, 256)
    lin1, ln1, lin2, ln2 = enc.pos_fc[0], enc.pos_fc[2], enc.pos_fc[3], enc.pos_fc[5]
    h = F.layer_norm(F.relu(F.linear(anchor, lin1.weight, lin1.bias)), (256, ), ln1.weight,
                     ln1.bias)
    want = F.layer_norm(F.relu(F.linear(h, lin2.weight, lin2.bias)), (256, ), ln2.weight,
                        ln2.bias)
    torch.testing.assert_close(out, want)


def test_encoder_gradients_and_bad_input():
    enc = SparsePoint3DEncoder(embed_dims=16, num_sample=4)
    anchor = polylines(1, 5, num_sample=4).requires_grad_()
    enc(anchor).sum().backward()
    assert anchor.grad.abs().sum() > 0
    assert all(p.grad is not None for p in enc.parameters())
    with pytest.raises(ValueError, match=r'anchor must be \[\.\.\., 8\]'):
        enc(torch.zeros(1, 5, 11))


# ---------------------------------------------------------------------------------------------
# SparsePoint3DKeyPointsGenerator
# ---------------------------------------------------------------------------------------------


def test_keypoints_config_sizes_and_init():
    gen = map_keypoints()
    assert gen.num_pts == 300
    assert gen.learnable_fc.in_features == 256 and gen.learnable_fc.out_features == 600
    bound = math.sqrt(6 / (256 + 600))  # xavier-uniform, gain 1
    w = gen.learnable_fc.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert (gen.learnable_fc.bias == 0).all()
    # Heights are not in the state dict (upstream: a numpy array); only learnable_fc is.
    assert sorted(gen.state_dict()) == ['learnable_fc.bias', 'learnable_fc.weight']
    # Upstream's defaults (the instance bank's anchor handler): no parameters, forward refused.
    handler = SparsePoint3DKeyPointsGenerator()
    assert handler.num_pts == 0 and len(list(handler.parameters())) == 0
    with pytest.raises(ValueError, match='num_learnable_pts >= 1'):
        handler(torch.zeros(1, 2, 40), torch.zeros(1, 2, 256))


def test_keypoints_zero_offsets_are_the_points_at_fixed_heights():
    gen = map_keypoints(embed_dims=8)
    nn.init.zeros_(gen.learnable_fc.weight)
    anchor = polylines(2, 3)
    kps = gen(anchor, torch.randn(2, 3, 8))
    assert kps.shape == (2, 3, 300, 3)
    pts = anchor.reshape(2, 3, 20, 2)
    for s in (0, 7, 19):
        for h, height in enumerate(HEIGHTS):
            for slot in range(3):
                row = kps[:, :, s * 15 + h * 3 + slot]  # (point, height, slot) order
                torch.testing.assert_close(row[..., :2], pts[:, :, s], rtol=0, atol=0)
                z = torch.tensor(GROUND) + torch.tensor(float(height))  # float32, upstream order
                assert (row[..., 2] == z).all()
    # The five heights, hand-computed.
    torch.testing.assert_close(kps[0, 0, :15:3, 2],
                               torch.tensor([-1.84023, -1.34023, -2.34023, -0.84023, -2.84023]))


def test_keypoints_learned_offsets_add_to_their_point():
    gen = map_keypoints(embed_dims=8)
    nn.init.zeros_(gen.learnable_fc.weight)
    offsets = torch.randn(600, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        gen.learnable_fc.bias.copy_(offsets)
    anchor = polylines(1, 2)
    kps = gen(anchor, torch.randn(1, 2, 8))
    off = offsets.reshape(20, 5, 3, 2)
    pts = anchor.reshape(1, 2, 20, 2)
    for s, h, slot in ((0, 0, 0), (3, 4, 2), (19, 2, 1), (10, 1, 0)):
        got = kps[0, :, s * 15 + h * 3 + slot, :2]
        torch.testing.assert_close(got, pts[0, :, s] + off[s, h, slot])


def reference_keypoints(gen, anchor, feature):
    """The keypoint formula by explicit loops (tiny sizes only)."""
    bs, num_anchor = anchor.shape[:2]
    offsets = F.linear(feature, gen.learnable_fc.weight, gen.learnable_fc.bias)
    out = torch.zeros(bs, num_anchor, gen.num_pts, 3, dtype=anchor.dtype)
    heights = gen.fix_height.tolist()
    i = 0
    for s in range(gen.num_sample):
        for h, height in enumerate(heights):
            for slot in range(gen.num_learnable_pts):
                j = ((s * len(heights) + h) * gen.num_learnable_pts + slot) * 2
                out[:, :, i, 0] = anchor[:, :, 2 * s] + offsets[:, :, j]
                out[:, :, i, 1] = anchor[:, :, 2 * s + 1] + offsets[:, :, j + 1]
                out[:, :, i, 2] = gen.ground_height + height
                i += 1
    return out


@pytest.mark.parametrize('batch', [1, 2])
def test_keypoints_against_loop_reference_and_gradients(batch):
    gen = SparsePoint3DKeyPointsGenerator(embed_dims=6, num_sample=3, num_learnable_pts=2,
                                          fix_height=(0.25, -1.5), ground_height=0.5)
    anchor = polylines(batch, 4, num_sample=3).requires_grad_()
    feature = torch.randn(batch, 4, 6, requires_grad=True)
    kps = gen(anchor, feature)
    assert kps.shape == (batch, 4, 12, 3)
    torch.testing.assert_close(kps, reference_keypoints(gen, anchor, feature))
    kps.sum().backward()
    # Every point's (x, y) feeds 2 heights x 2 slots keypoints.
    torch.testing.assert_close(anchor.grad, torch.full_like(anchor, 4.0))
    assert feature.grad.abs().sum() > 0 and gen.learnable_fc.weight.grad.abs().sum() > 0


def test_keypoints_bad_input():
    gen = map_keypoints(embed_dims=8)
    with pytest.raises(ValueError, match=r'anchor must be \[B, M, 40\]'):
        gen(torch.zeros(1, 2, 11), torch.zeros(1, 2, 8))
    with pytest.raises(ValueError, match='instance_feature must be'):
        gen(torch.zeros(1, 2, 40))
    with pytest.raises(ValueError, match='instance_feature must be'):
        gen(torch.zeros(1, 2, 40), torch.zeros(1, 2, 9))


def rigid(yaw, tx, ty, dtype=torch.float64):
    """A 4x4 transform: rotation about z by ``yaw``, translation (tx, ty, 7); the z row and
    column hold values the 2-D projection must ignore."""
    c, s = math.cos(yaw), math.sin(yaw)
    return torch.tensor([[c, -s, 0.3, tx], [s, c, -0.2, ty], [0.1, 0.4, 1.0, 7.0],
                         [0., 0., 0., 1.]], dtype=dtype)


def test_anchor_projection_float64_hand_built():
    gen = SparsePoint3DKeyPointsGenerator()  # the bank's handler: upstream's defaults
    anchor = polylines(2, 3, dtype=torch.float64)
    T = torch.stack([rigid(0.3, 1.5, -2.0), rigid(-1.2, -4.0, 0.5)])
    with no_matrix_products():  # multiply-adds, which TF32 cannot round
        out = gen.anchor_projection(anchor, T, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert out.shape == (2, 3, 40) and out.dtype == torch.float64
    pts = anchor.reshape(2, 3, 20, 2)
    for b, (yaw, tx, ty) in enumerate(((0.3, 1.5, -2.0), (-1.2, -4.0, 0.5))):
        x, y = pts[b, ..., 0], pts[b, ..., 1]
        want = torch.stack([math.cos(yaw) * x - math.sin(yaw) * y + tx,
                            math.sin(yaw) * x + math.cos(yaw) * y + ty], dim=-1)
        torch.testing.assert_close(out[b].reshape(3, 20, 2), want, rtol=1e-12, atol=1e-12)
    # time_interval plays no part; identity leaves the anchors as they are.
    torch.testing.assert_close(gen.anchor_projection(anchor, T), out, rtol=0, atol=0)
    eye = torch.eye(4, dtype=torch.float64).expand(2, 4, 4)
    torch.testing.assert_close(gen.anchor_projection(anchor, eye), anchor, rtol=0, atol=0)


def test_anchor_projection_keeps_anchor_dtype_and_lengths():
    gen = SparsePoint3DKeyPointsGenerator()
    anchor = polylines(1, 4)
    T = rigid(2.0, 10.0, -3.0)[None]  # float64 transform, float32 anchors
    out = gen.anchor_projection(anchor, T)
    assert out.dtype == torch.float32
    want = gen.anchor_projection(anchor.double(), T)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-4)
    # A rigid motion keeps segment lengths.
    seg = lambda a: a.reshape(1, 4, 20, 2).diff(dim=2).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(seg(out), seg(anchor), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='T_temp2cur must be'):
        gen.anchor_projection(anchor, torch.eye(4).expand(2, 4, 4))
    with pytest.raises(ValueError, match=r'anchor must be \[B, M, 40\]'):
        gen.anchor_projection(torch.zeros(1, 4, 11), T)


# ---------------------------------------------------------------------------------------------
# SparsePoint3DRefinementModule
# ---------------------------------------------------------------------------------------------


def refine_inputs(batch=2, queries=5, dims=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, queries, dims, generator=gen), polylines(batch, queries, seed=seed),
            torch.randn(batch, queries, dims, generator=gen))


def test_refinement_structure_and_init():
    ref = SparsePoint3DRefinementModule()
    kinds = [type(m) for m in ref.layers]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.LayerNorm] * 2 + [nn.Linear]
    assert ref.layers[-1].out_features == 40 and torch.equal(ref.scale, torch.ones(40))
    assert [type(m) for m in ref.cls_layers] == [nn.Linear, nn.ReLU, nn.LayerNorm] * 2 + [
        nn.Linear]
    assert ref.cls_layers[-1].out_features == 3
    torch.testing.assert_close(ref.cls_layers[-1].bias, torch.full((3, ), -4.59512),
                               rtol=0, atol=1e-5)


def test_refinement_is_anchor_plus_scaled_delta():
    ref = SparsePoint3DRefinementModule()
    inst, anchor, embed = refine_inputs()
    nn.init.zeros_(ref.layers[-1].weight)
    nn.init.zeros_(ref.layers[-1].bias)
    pts, cls, qt = ref(inst, anchor, embed, torch.tensor([0.5, 0.3]))
    torch.testing.assert_close(pts, anchor)
    assert cls.shape == (2, 5, 3) and qt is None
    delta = torch.linspace(-2, 2, 40)
    with torch.no_grad():
        ref.layers[-1].bias.copy_(delta)
        ref.scale[3] = 2.5
    want = anchor + delta * torch.cat([torch.ones(3), torch.tensor([2.5]), torch.ones(36)])
    torch.testing.assert_close(ref(inst, anchor, embed)[0], want)
    # time_interval plays no part (absolute update in metres, no velocity).
    torch.testing.assert_close(ref(inst, anchor, embed, 0.1)[0], want)


def test_refinement_return_cls_and_feature_inputs():
    ref = SparsePoint3DRefinementModule(embed_dims=32, num_sample=4, num_cls=2)
    inst, anchor, embed = refine_inputs(dims=32)
    anchor = anchor[..., :8].contiguous()
    pts1, cls1, _ = ref(inst, anchor, embed)
    pts2, cls2, _ = ref(inst, anchor, embed + 1)
    torch.testing.assert_close(cls1, cls2)  # class from the instance feature alone
    assert not torch.allclose(pts1, pts2)
    pts3, cls3, qt3 = ref(inst, anchor, embed, return_cls=False)
    assert cls3 is None and qt3 is None
    torch.testing.assert_close(pts3, pts1)
    no_cls = SparsePoint3DRefinementModule(embed_dims=32, num_sample=4, with_cls_branch=False)
    assert no_cls.cls_layers is None
    assert no_cls(inst, anchor, embed, return_cls=False)[1] is None
    with pytest.raises(ValueError, match='with_cls_branch'):
        no_cls(inst, anchor, embed)
    with pytest.raises(ValueError, match=r'anchor must be \[B, M, 8\]'):
        ref(inst, torch.zeros(2, 5, 11), embed)


def test_refinement_gradients_flow():
    ref = SparsePoint3DRefinementModule(embed_dims=32)
    inst, anchor, embed = [t.requires_grad_() for t in refine_inputs(dims=32)]
    pts, cls, _ = ref(inst, anchor, embed)
    (pts.sum() + cls.sum()).backward()
    torch.testing.assert_close(anchor.grad, torch.ones_like(anchor))
    assert inst.grad.abs().sum() > 0 and embed.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ref.parameters())


# ---------------------------------------------------------------------------------------------
# SparsePoint3DDecoder
# ---------------------------------------------------------------------------------------------


def logit(p):
    p = torch.as_tensor(p, dtype=torch.float64)
    return (p / (1 - p)).log().float()


def test_decoder_hand_made_table():
    # Scores [B=2, M=3, C=3]; flattened index = anchor * 3 + class.
    probs = torch.tensor([[[0.10, 0.90, 0.20], [0.80, 0.05, 0.30], [0.40, 0.70, 0.60]],
                          [[0.01, 0.02, 0.03], [0.50, 0.04, 0.95], [0.06, 0.07, 0.08]]])
    pts = torch.arange(2 * 3 * 40, dtype=torch.float32).reshape(2, 3, 40)
    out = SparsePoint3DDecoder(num_output=4).decode(logit(probs), pts)
    assert len(out) == 2
    # Sample 0: 0.90 (a0 c1), 0.80 (a1 c0), 0.70 (a2 c1), 0.60 (a2 c2).
    torch.testing.assert_close(out[0]['scores'], torch.tensor([0.9, 0.8, 0.7, 0.6]))
    assert out[0]['labels'].tolist() == [1, 0, 1, 2]
    assert out[0]['indices'].tolist() == [0, 1, 2, 2]
    assert out[0]['vectors'].shape == (4, 20, 2)
    torch.testing.assert_close(out[0]['vectors'][2], pts[0, 2].reshape(20, 2))
    torch.testing.assert_close(out[0]['vectors'][3], pts[0, 2].reshape(20, 2))
    # Sample 1: 0.95 (a1 c2), 0.50 (a1 c0), 0.08 (a2 c2), 0.07 (a2 c1).
    assert out[1]['labels'].tolist() == [2, 0, 2, 1]
    assert out[1]['indices'].tolist() == [1, 1, 2, 2]
    torch.testing.assert_close(out[1]['vectors'][0], pts[1, 1].reshape(20, 2))
    for r in out:
        assert all(v.device.type == 'cpu' for v in r.values())
        assert r['scores'].dtype == torch.float32 and r['labels'].dtype == torch.int64
        assert r['vectors'].dtype == torch.float32
    # score_threshold drops after the top-k.
    dec = SparsePoint3DDecoder(num_output=4, score_threshold=0.65)
    kept = dec.decode(logit(probs), pts)
    assert kept[0]['labels'].tolist() == [1, 0, 1] and kept[1]['labels'].tolist() == [2]
    assert kept[1]['vectors'].shape == (1, 20, 2)
    assert SparsePoint3DDecoder(score_threshold=0.99).decode(logit(probs), pts)[0][
        'vectors'].shape == (0, 20, 2)


def numpy_decode(cls, pts, k):
    """Upstream's procedure, per sample, in numpy: flattened sigmoid, argsort, idx % C."""
    out = []
    scores = 1 / (1 + np.exp(-cls.double().numpy()))
    for b in range(cls.shape[0]):
        flat = scores[b].reshape(-1)
        order = np.argsort(-flat, kind='stable')[:k]
        out.append((flat[order], order % cls.shape[2],
                    pts[b].numpy().reshape(cls.shape[1], -1, 2)[order // cls.shape[2]]))
    return out


@pytest.mark.parametrize('batch', [1, 2])
def test_decoder_matches_numpy_reference_and_defaults(batch):
    gen = torch.Generator().manual_seed(batch)
    cls = torch.randn(batch, 100, 3, generator=gen)
    pts = torch.randn(batch, 100, 40, generator=gen)
    dec = TASK_UTILS.build(dict(type='turbox_mm.SparsePoint3DDecoder'))
    assert dec.num_output == 100 and dec.score_threshold is None
    got = dec.decode(cls, pts, quality=None, instance_id=None)
    for r, (scores, labels, vectors) in zip(got, numpy_decode(cls, pts, 100)):
        np.testing.assert_allclose(r['scores'].numpy(), scores, rtol=1e-6)
        assert (r['labels'].numpy() == labels).all()
        np.testing.assert_allclose(r['vectors'].numpy(), vectors)
        assert (r['scores'][:-1] >= r['scores'][1:]).all()
    # None keeps M (upstream's rule); more than M * C is clamped.
    assert SparsePoint3DDecoder(num_output=None).decode(cls[:, :7], pts[:, :7])[0][
        'scores'].shape == (7, )
    assert SparsePoint3DDecoder(num_output=50).decode(cls[:, :7], pts[:, :7])[0][
        'scores'].shape == (21, )


def test_decoder_bad_input_and_instance_data():
    dec = SparsePoint3DDecoder(num_output=3)
    with pytest.raises(ValueError, match='must agree'):
        dec.decode(torch.zeros(1, 4, 3), torch.zeros(1, 5, 40))
    with pytest.raises(ValueError, match='must agree'):
        dec.decode(torch.zeros(1, 4, 3), torch.zeros(1, 4, 41))
    with pytest.raises(ValueError, match='num_output'):
        SparsePoint3DDecoder(num_output=-1)
    cls = torch.randn(1, 4, 3, requires_grad=True)
    result = dec.decode(cls, torch.randn(1, 4, 40, requires_grad=True))[0]
    assert not any(v.requires_grad for v in result.values())
    inst = dec.to_instance_data(result)
    assert set(inst.keys()) == {'pts', 'scores', 'labels'}
    assert inst.pts.shape == (3, 20, 2) and len(inst) == 3
    assert torch.equal(inst.labels, result['labels'])
    assert torch.equal(inst.scores, result['scores'])


# ---------------------------------------------------------------------------------------------
# DeformableFeatureAggregation with the point keypoints
# ---------------------------------------------------------------------------------------------


def forward_cameras(batch, cams, seed=0):
    """Pinhole cameras at the lidar origin looking along +y (x right, z up in the lidar frame;
    camera x right, y down, z forward), slightly perturbed so that the cameras differ."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.eye(4)
    k[0, 0], k[1, 1], k[0, 2], k[1, 2] = 100., 100., 352., 128.
    r = torch.eye(4)
    r[:3, :3] = torch.tensor([[1., 0., 0.], [0., 0., -1.], [0., 1., 0.]])
    mat = (k @ r).expand(batch, cams, 4, 4).clone()
    mat[:, :, :3, :] += 0.01 * torch.randn(batch, cams, 3, 4, generator=gen)
    return mat


def test_dfa_with_point_keypoints_full_config(batch=2):
    dfa = DeformableFeatureAggregation(
        embed_dims=256, num_groups=8, num_levels=4, num_cams=6, attn_drop=0.15,
        kps_generator=dict(type='turbox_mm.SparsePoint3DKeyPointsGenerator', **MAP_KEYPOINTS))
    assert isinstance(dfa.kps_generator, SparsePoint3DKeyPointsGenerator)
    assert dfa.num_pts == 300 and dfa.kps_generator.learnable_fc.in_features == 256
    assert dfa.weights_fc.out_features == 8 * 4 * 300  # 9600, as upstream
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        dfa.weights_fc.weight.copy_(0.05 * torch.randn(dfa.weights_fc.weight.shape,
                                                       generator=gen))
    sizes = ((4, 6), (2, 3), (1, 2), (1, 1))
    maps = [torch.randn(batch, 6, 256, h, w, generator=gen, requires_grad=True)
            for h, w in sizes]
    inst = torch.randn(batch, 2, 256, generator=gen, requires_grad=True)
    embed = torch.randn(batch, 2, 256, generator=gen)
    anchor = polylines(batch, 2).requires_grad_()
    mat = forward_cameras(batch, 6)
    wh = torch.tensor([704., 256.]).expand(batch, 6, 2)
    # The keypoints land in the image of the forward camera (points 8-14 m ahead).
    uv = mat[0, 0, :3] @ torch.cat([dfa.kps_generator(anchor, inst)[0].reshape(-1, 3).detach(),
                                    torch.ones(600, 1)], dim=-1).T
    u, v = uv[0] / uv[2] / 704, uv[1] / uv[2] / 256
    assert ((u > 0) & (u < 1) & (v > 0) & (v < 1)).float().mean() > 0.9
    out = dfa.train()(inst, anchor, embed, maps, mat, wh)
    assert out.shape == (batch, 2, 512) and torch.isfinite(out).all()
    torch.testing.assert_close(out[..., 256:], inst)  # residual 'cat'
    (out[..., :256] * torch.linspace(-1, 1, 256)).sum().backward()
    # The anchor reaches the output only through the keypoints.
    assert anchor.grad.abs().sum() > 0
    assert dfa.kps_generator.learnable_fc.weight.grad.abs().sum() > 0
    assert all(m.grad.abs().sum() > 0 for m in maps)
    dfa.eval()
    with torch.no_grad():
        assert torch.equal(dfa(inst, anchor, embed, maps, mat, wh),
                           dfa(inst, anchor, embed, maps, mat, wh))


# ---------------------------------------------------------------------------------------------
# Config build
# ---------------------------------------------------------------------------------------------


def test_build_from_registries():
    enc = MODELS.build(dict(type='turbox_mm.SparsePoint3DEncoder', embed_dims=256,
                            num_sample=20))
    kps = MODELS.build(dict(type='turbox_mm.SparsePoint3DKeyPointsGenerator', embed_dims=256,
                            num_sample=20, num_learnable_pts=3, fix_height=(0, 0.5, -0.5, 1, -1),
                            ground_height=-1.84023))
    handler = MODELS.build(dict(type='turbox_mm.SparsePoint3DKeyPointsGenerator'))
    ref = MODELS.build(dict(type='turbox_mm.SparsePoint3DRefinementModule', embed_dims=256,
                            num_sample=20, num_cls=3))
    dec = TASK_UTILS.build(dict(type='turbox_mm.SparsePoint3DDecoder'))
    dfa = MODELS.build(dict(type='turbox_mm.DeformableFeatureAggregation', embed_dims=32,
                            num_groups=4, kps_generator=dict(
                                type='turbox_mm.SparsePoint3DKeyPointsGenerator', num_sample=4,
                                num_learnable_pts=1, fix_height=(0, 1))))
    assert isinstance(enc, SparsePoint3DEncoder) and isinstance(ref, SparsePoint3DRefinementModule)
    assert isinstance(kps, SparsePoint3DKeyPointsGenerator) and kps.num_pts == 300
    assert isinstance(handler, SparsePoint3DKeyPointsGenerator) and handler.num_pts == 0
    assert isinstance(dec, SparsePoint3DDecoder)
    assert dfa.num_pts == 8 and dfa.kps_generator.learnable_fc.in_features == 32
    assert dfa.weights_fc.out_features == 4 * 4 * 8
    # The modules chain as the head drives them: encode, sample, refine, decode.
    anchor = polylines(1, 6)
    feature = torch.randn(1, 6, 256)
    embed = enc(anchor)
    assert kps(anchor, feature).shape == (1, 6, 300, 3)
    pts, cls, qt = ref(feature, anchor, embed)
    result = dec.decode(cls, pts, qt)[0]
    assert result['vectors'].shape == (18, 20, 2)  # min(100, 6 * 3)
