"""Sparse4D v3 network blocks: DFA, asymmetric FFN, refinement, dense depth net, GridMask.

Hand-computed cases and the wiring checks of docs/design/sparse4d.md, section 5.
"""
import math
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from turbox_mm.models.sparse4d.asymmetric_ffn import AsymmetricFFN
from turbox_mm.models.sparse4d.dense_depth_net import DenseDepthNet
from turbox_mm.models.sparse4d.deformable_feature_aggregation import (
    DeformableFeatureAggregation, project_points)
from turbox_mm.models.sparse4d.grid_mask import GridMask
from turbox_mm.models.sparse4d.refinement import SparseBox3DRefinementModule
from turbox_mm.ops.deformable_aggregation import feature_maps_format
from turbox_mm.ops.deformable_aggregation import op as da_op
from turbox_mm.registry import MODELS

# ---------------------------------------------------------------------------------------------
# DeformableFeatureAggregation
# ---------------------------------------------------------------------------------------------


def intrinsics(batch, cams, fx=100., fy=100., cx=352., cy=128.):
    """A 4x4 pinhole matrix with identity extrinsics (camera frame = lidar frame), per camera."""
    k = torch.eye(4)
    k[0, 0], k[1, 1], k[0, 2], k[1, 2] = fx, fy, cx, cy
    return k.expand(batch, cams, 4, 4).clone()


def anchors_in_view(batch, queries, seed=0, behind=True):
    """Anchors 8-14 m in front of the camera (z forward), yaw 0, unit sizes; one behind."""
    gen = torch.Generator().manual_seed(seed)
    anchor = torch.zeros(batch, queries, 11)
    anchor[..., 0] = torch.rand(batch, queries, generator=gen) * 16 - 8
    anchor[..., 1] = torch.rand(batch, queries, generator=gen) * 4 - 2
    anchor[..., 2] = torch.rand(batch, queries, generator=gen) * 6 + 8
    anchor[..., 3:6] = torch.rand(batch, queries, 3, generator=gen) * 0.6 - 0.3
    anchor[..., 7] = 1.0  # cos
    if behind:
        anchor[0, 0, 2] = -5.0
    return anchor


def dfa_inputs(batch=1, queries=3, cams=6, sizes=((4, 6), (2, 3), (1, 2), (1, 1)), dims=256,
               seed=0):
    gen = torch.Generator().manual_seed(seed)
    maps = [torch.randn(batch, cams, dims, h, w, generator=gen) for h, w in sizes]
    inst = torch.randn(batch, queries, dims, generator=gen)
    embed = torch.randn(batch, queries, dims, generator=gen)
    mat = intrinsics(batch, cams)
    mat[:, :, :3, :] += 0.01 * torch.randn(batch, cams, 3, 4, generator=gen)  # distinct cams
    wh = torch.tensor([704., 256.]).expand(batch, cams, 2).clone()
    return inst, anchors_in_view(batch, queries, seed), embed, maps, mat, wh


def randomise_weights_fc(dfa, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # Moderate logits: no softmax weight underflows to exactly zero.
        dfa.weights_fc.weight.copy_(
            0.05 * torch.randn(dfa.weights_fc.weight.shape, generator=gen))
        dfa.weights_fc.bias.copy_(torch.randn(dfa.weights_fc.bias.shape, generator=gen))


def test_dfa_stock_shapes_cat_residual_and_init():
    dfa = DeformableFeatureAggregation().eval()
    assert dfa.num_pts == 13
    assert dfa.weights_fc.out_features == 416 and dfa.weights_fc.in_features == 256
    assert (dfa.weights_fc.weight == 0).all() and (dfa.weights_fc.bias == 0).all()
    kinds = [type(m) for m in dfa.camera_encoder]
    assert kinds == [nn.Linear, nn.ReLU, nn.LayerNorm, nn.Linear, nn.ReLU, nn.LayerNorm]
    assert dfa.camera_encoder[0].in_features == 12
    bound = math.sqrt(6 / 512)  # xavier-uniform of a 256x256 Linear
    assert dfa.output_proj.weight.abs().max() <= bound and dfa.output_proj.weight.std() > 0.01
    inst, anchor, embed, maps, mat, wh = dfa_inputs()
    out = dfa(inst, anchor, embed, feature_maps_format(maps), mat, wh)
    assert out.shape == (1, 3, 512) and out.dtype == torch.float32
    assert torch.equal(out[..., 256:], inst)
    assert out[..., :256].abs().sum() > 0
    # The list of maps is formatted on the fly, with the same result.
    torch.testing.assert_close(dfa(inst, anchor, embed, maps, mat, wh), out)


def test_dfa_residual_modes():
    inst, anchor, embed, maps, mat, wh = dfa_inputs()
    cat = DeformableFeatureAggregation().eval()
    add = DeformableFeatureAggregation(residual_mode='add').eval()
    plain = DeformableFeatureAggregation(residual_mode=None).eval()
    add.load_state_dict(cat.state_dict())
    plain.load_state_dict(cat.state_dict())
    want = cat(inst, anchor, embed, maps, mat, wh)[..., :256]
    torch.testing.assert_close(plain(inst, anchor, embed, maps, mat, wh), want)
    torch.testing.assert_close(add(inst, anchor, embed, maps, mat, wh), want + inst)


def test_dfa_rejects_bad_arguments():
    with pytest.raises(ValueError, match="'stock' or 'turbox'"):
        DeformableFeatureAggregation(op_impl='cuda')
    with pytest.raises(ValueError, match='residual_mode'):
        DeformableFeatureAggregation(residual_mode='sum')
    with pytest.raises(ValueError, match='multiple of num_groups'):
        DeformableFeatureAggregation(embed_dims=20, num_groups=8)
    dfa = DeformableFeatureAggregation()
    inst, anchor, embed, maps, mat, wh = dfa_inputs()
    with pytest.raises(ValueError, match='projection_mat'):
        dfa(inst, anchor, embed, maps, mat[:, :5], wh)
    with pytest.raises(ValueError, match='spatial_shape'):
        dfa(inst, anchor, embed, maps[:3], mat, wh)
    with pytest.raises(ValueError, match='image_wh'):
        dfa(inst, anchor, embed, maps, mat, wh[..., :1])


def test_dfa_weights_softmax_per_group_and_channel_order():
    dfa = DeformableFeatureAggregation().eval()
    inst, _, embed, _, mat, _ = dfa_inputs(batch=1, queries=4)
    mat = torch.cat([mat, mat * 1.1])  # the second sample's cameras differ
    randomise_weights_fc(dfa)
    w = dfa.get_weights(inst.repeat(2, 1, 1), embed.repeat(2, 1, 1), mat)
    assert w.shape == (2, 4, 6, 4, 13, 8)
    torch.testing.assert_close(w.sum(dim=(2, 3, 4)), torch.ones(2, 4, 8))
    # The 416 outputs are ordered (level, point, group): one big bias wins its (l, p) for g.
    nn.init.zeros_(dfa.weights_fc.weight)
    nn.init.zeros_(dfa.weights_fc.bias)
    level, point, group = 2, 9, 5
    with torch.no_grad():
        dfa.weights_fc.bias[(level * 13 + point) * 8 + group] = 50.0
    w = dfa.get_weights(inst, embed, mat[:1])
    torch.testing.assert_close(w[0, :, :, level, point, group], torch.full((4, 6), 1 / 6))
    assert w[0, :, :, :, :, group].sum().item() == pytest.approx(4.0)  # all else of group 5 ~ 0
    torch.testing.assert_close(w[..., 0], torch.full_like(w[..., 0], 1 / (6 * 4 * 13)))


def test_dfa_weights_without_camera_embed():
    dfa = DeformableFeatureAggregation(use_camera_embed=False).eval()
    assert dfa.camera_encoder is None and dfa.weights_fc.out_features == 416 * 6
    randomise_weights_fc(dfa)
    inst, _, embed, _, mat, _ = dfa_inputs()
    w = dfa.get_weights(inst, embed, mat)
    torch.testing.assert_close(w.sum(dim=(2, 3, 4)), torch.ones(1, 3, 8))


def test_dfa_attn_drop_zeros_whole_camera_point_blocks():
    dfa = DeformableFeatureAggregation(attn_drop=0.5)
    randomise_weights_fc(dfa)
    inst, _, embed, _, mat, _ = dfa_inputs(queries=20)
    want = dfa.eval().get_weights(inst, embed, mat)
    torch.manual_seed(0)
    got = dfa.train().get_weights(inst, embed, mat)
    assert (want > 0).all()
    dropped = got == 0  # [B, Q, N, L, P, G]
    block = dropped[:, :, :, :1, :, :1]
    assert torch.equal(dropped, block.expand_as(dropped))  # constant over levels and groups
    frac = block.float().mean().item()
    assert 0.4 < frac < 0.6
    torch.testing.assert_close(got[~dropped], want[~dropped] / 0.5)  # kept: scaled, no renorm


def test_dfa_camera_encoder_input_is_row_major():
    dfa = DeformableFeatureAggregation().eval()
    seen = []

    class Record(nn.Module):

        def forward(self, x):
            seen.append(x.clone())
            return torch.zeros(*x.shape[:2], 256)

    dfa.camera_encoder = Record()
    inst, anchor, embed, maps, _, wh = dfa_inputs()
    mat = torch.arange(6 * 16, dtype=torch.float32).reshape(1, 6, 4, 4)
    dfa.get_weights(inst, embed, mat)
    assert seen[0].shape == (1, 6, 12)
    torch.testing.assert_close(seen[0][0, 2], torch.arange(32., 44.))  # rows 0..2 of camera 2
    assert seen[0][0, 1, 4] == mat[0, 1, 1, 0]


def test_project_points_hand_case():
    mat = intrinsics(1, 2)
    mat[0, 1, 0, 3] = 100.0  # camera 1: shifted by 1 m along x (t_x * fx)
    pts = torch.tensor([[[[0., 0., 10.], [1., -2., 10.], [0., 0., -5.]]]])  # [1, 1, 3, 3]
    wh = torch.tensor([[[704., 256.], [704., 256.]]])
    uv = project_points(pts, mat, wh)
    assert uv.shape == (1, 2, 1, 3, 2)
    torch.testing.assert_close(uv[0, 0, 0, 0], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(uv[0, 0, 0, 1], torch.tensor([362 / 704, 108 / 256]))
    torch.testing.assert_close(uv[0, 1, 0, 0], torch.tensor([(352 + 10) / 704, 0.5]))
    # Behind the camera: depth -5 clamps to 1e-5, the point lands far outside the image.
    torch.testing.assert_close(uv[0, 0, 0, 2], torch.tensor([-5 * 352 / 1e-5 / 704,
                                                             -5 * 128 / 1e-5 / 256]))
    torch.testing.assert_close(project_points(pts, mat)[0, 0, 0, 0], torch.tensor([352., 128.]))


def run_dfa(dfa, args):
    inst, anchor, embed, maps, mat, wh = args
    leaves = [t.detach().clone().requires_grad_() for t in (inst, anchor, embed)]
    feats = [m.detach().clone().requires_grad_() for m in maps]
    out = dfa(leaves[0], leaves[1], leaves[2], feats, mat, wh)
    (out * torch.linspace(-1, 1, out.shape[-1], device=out.device)).sum().backward()
    grads = [t.grad for t in leaves + feats] + [p.grad for p in dfa.parameters()]
    return out.detach(), grads


def pair(**kwargs):
    stock = DeformableFeatureAggregation(op_impl='stock', **kwargs).train()
    turbox = DeformableFeatureAggregation(op_impl='turbox', **kwargs).train()
    randomise_weights_fc(stock)
    turbox.load_state_dict(stock.state_dict())
    return stock, turbox


def test_dfa_stock_and_turbox_equal_outputs_and_grads():
    stock, turbox = pair()
    args = dfa_inputs(queries=4)
    want, want_grads = run_dfa(stock, args)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the op's one-time CPU fallback warning
        got, got_grads = run_dfa(turbox, args)
    torch.testing.assert_close(got, want)
    assert len(got_grads) == len(want_grads)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)
    assert want_grads[1].abs().sum() > 0  # the anchor gets a gradient (through the points)


@pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1',
                    reason='the Triton kernels run on CPU tensors only in the interpreter')
def test_dfa_stock_and_turbox_kernel_on_cpu_tiny():
    pytest.importorskip('triton')
    pytest.importorskip('turbox_mm.ops.deformable_aggregation.triton_kernels')
    kwargs = dict(embed_dims=16, num_groups=2, num_levels=2, num_cams=2,
                  kps_generator=dict(type='turbox_mm.SparseBox3DKeyPointsGenerator',
                                     num_learnable_pts=1))
    stock, turbox = pair(**kwargs)
    args = dfa_inputs(queries=3, cams=2, sizes=((5, 7), (2, 3)), dims=16)
    want, want_grads = run_dfa(stock, args)
    with da_op.kernel_on_cpu():
        assert da_op.fallback_reason(args[0]) is None
        got, got_grads = run_dfa(turbox, args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_dfa_stock_and_turbox_equal_on_cuda():
    """The compiled Triton kernel against the grid_sample spec, through the module, on CUDA."""
    stock, turbox = pair()
    stock, turbox = stock.cuda(), turbox.cuda()
    args = [t.cuda() if torch.is_tensor(t) else [m.cuda() for m in t]
            for t in dfa_inputs(batch=2, queries=50, sizes=((16, 44), (8, 22), (4, 11), (2, 6)))]
    want, want_grads = run_dfa(stock, args)
    got, got_grads = run_dfa(turbox, args)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-3)
    with torch.autocast('cuda', dtype=torch.float16):
        out = turbox(*args)
    assert torch.isfinite(out).all()
    gm = GridMask(prob=1.0).train()
    img = torch.ones(2, 3, 32, 88, device='cuda')
    assert gm(img).device == img.device
    net = DenseDepthNet(embed_dims=256).cuda()
    depths = net(args[3], torch.full((2, 6), 100.0, device='cuda'))
    assert depths[0].device.type == 'cuda' and depths[0].dtype == torch.float32


def test_dfa_autocast_keeps_dtype_and_runs():
    dfa = DeformableFeatureAggregation(embed_dims=16, num_groups=2, num_levels=2,
                                       num_cams=2).eval()
    inst, anchor, embed, maps, mat, wh = dfa_inputs(cams=2, sizes=((5, 7), (2, 3)), dims=16)
    want = dfa(inst, anchor, embed, maps, mat, wh)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = dfa(inst, anchor, embed, maps, mat, wh)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)


def test_dfa_builds_from_registry():
    dfa = MODELS.build(dict(type='turbox_mm.DeformableFeatureAggregation', embed_dims=32,
                            num_groups=4, kps_generator=dict(
                                type='turbox_mm.SparseBox3DKeyPointsGenerator',
                                num_learnable_pts=2)))
    assert dfa.kps_generator.learnable_fc.in_features == 32 and dfa.num_pts == 9
    assert dfa.weights_fc.out_features == 4 * 4 * 9


# ---------------------------------------------------------------------------------------------
# AsymmetricFFN
# ---------------------------------------------------------------------------------------------


def test_ffn_structure_and_identity_after_pre_norm():
    ffn = AsymmetricFFN().eval()
    assert isinstance(ffn.pre_norm, nn.LayerNorm) and ffn.pre_norm.normalized_shape == (512, )
    assert isinstance(ffn.identity_fc, nn.Linear)
    assert (ffn.identity_fc.in_features, ffn.identity_fc.out_features) == (512, 256)
    linears = [m for m in ffn.layers if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 1024), (1024, 256)]
    assert [m.p for m in ffn.layers if isinstance(m, nn.Dropout)] == [0.1, 0.1]
    x = torch.randn(2, 5, 512) * 3 + 1
    out = ffn(x)
    assert out.shape == (2, 5, 256)
    nn.init.zeros_(linears[-1].weight)
    nn.init.zeros_(linears[-1].bias)
    normed = ffn.pre_norm(x)
    torch.testing.assert_close(ffn(x), ffn.identity_fc(normed))
    assert not torch.allclose(ffn(x), ffn.identity_fc(x), atol=1e-3)


def test_ffn_square_identity_and_no_norm():
    ffn = AsymmetricFFN(in_channels=8, embed_dims=8, feedforward_channels=16, pre_norm=False,
                        ffn_drop=0.0)
    assert isinstance(ffn.identity_fc, nn.Identity) and ffn.pre_norm is None
    x = torch.randn(4, 8)
    torch.testing.assert_close(ffn(x), x + ffn.layers(x))
    nobypass = AsymmetricFFN(in_channels=8, embed_dims=4, feedforward_channels=16,
                             add_identity=False, ffn_drop=0.0)
    torch.testing.assert_close(nobypass(x), nobypass.layers(nobypass.pre_norm(x)))
    with pytest.raises(ValueError, match=r'\[\.\.\., 8\]'):
        ffn(torch.zeros(2, 7))
    with pytest.raises(ValueError, match='num_fcs'):
        AsymmetricFFN(num_fcs=1)


# ---------------------------------------------------------------------------------------------
# SparseBox3DRefinementModule
# ---------------------------------------------------------------------------------------------


def refine_inputs(batch=2, queries=5, dims=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, queries, dims, generator=gen),
            torch.randn(batch, queries, 11, generator=gen),
            torch.randn(batch, queries, dims, generator=gen))


def test_refinement_structure_and_init():
    ref = SparseBox3DRefinementModule()
    body = list(ref.layers)[:-1]
    assert sum(isinstance(m, nn.Linear) for m in body) == 4
    assert sum(isinstance(m, nn.LayerNorm) for m in body) == 2
    assert ref.layers[-1].out_features == 11 and torch.equal(ref.scale, torch.ones(11))
    assert ref.cls_layers[-1].out_features == 10 and ref.quality_layers[-1].out_features == 2
    torch.testing.assert_close(ref.cls_layers[-1].bias, torch.full((10, ), -math.log(99)))


def test_refinement_zeroed_layer_returns_anchor():
    ref = SparseBox3DRefinementModule()
    nn.init.zeros_(ref.layers[-1].weight)
    nn.init.zeros_(ref.layers[-1].bias)
    inst, anchor, embed = refine_inputs()
    box, cls, qt = ref(inst, anchor, embed, torch.tensor([0.5, 0.3]))
    torch.testing.assert_close(box, anchor)
    assert cls.shape == (2, 5, 10) and qt.shape == (2, 5, 2)


def test_refinement_velocity_is_displacement_over_time_interval():
    ref = SparseBox3DRefinementModule()
    nn.init.zeros_(ref.layers[-1].weight)
    d = torch.tensor([0.3, -0.2, 0.1])
    with torch.no_grad():
        ref.layers[-1].bias.zero_()
        ref.layers[-1].bias[8:] = d
        ref.layers[-1].bias[0] = 1.0
        ref.scale[0] = 2.0  # the learnable per-dim scale multiplies the head's output
    inst, anchor, embed = refine_inputs()
    box = ref(inst, anchor, embed, 0.5)[0]
    torch.testing.assert_close(box[..., 8:], anchor[..., 8:] + 2 * d)
    torch.testing.assert_close(box[..., 0], anchor[..., 0] + 2.0)
    torch.testing.assert_close(box[..., 1:8], anchor[..., 1:8])
    per_sample = ref(inst, anchor, embed, torch.tensor([0.5, 0.25]))[0]
    torch.testing.assert_close(per_sample[0, :, 8:], anchor[0, :, 8:] + 2 * d)
    torch.testing.assert_close(per_sample[1, :, 8:], anchor[1, :, 8:] + 4 * d)
    with pytest.raises(ValueError, match='time_interval'):
        ref(inst, anchor, embed, torch.ones(3))


def test_refinement_cls_ignores_anchor_embed_quality_uses_it():
    ref = SparseBox3DRefinementModule()
    inst, anchor, embed = refine_inputs()
    box1, cls1, qt1 = ref(inst, anchor, embed)
    box2, cls2, qt2 = ref(inst, anchor, embed + 1)
    torch.testing.assert_close(cls1, cls2)
    assert not torch.allclose(qt1, qt2) and not torch.allclose(box1, box2)
    box3, cls3, qt3 = ref(inst, anchor, embed, return_cls=False)
    assert cls3 is None and qt3 is None
    torch.testing.assert_close(box3, box1)


def test_refinement_yaw_options():
    inst, anchor, embed = refine_inputs()
    norm = SparseBox3DRefinementModule(normalize_yaw=True, with_quality_estimation=False)
    box, _, qt = norm(inst, anchor, embed)
    assert qt is None
    torch.testing.assert_close(box[..., 6:8].norm(dim=-1), torch.ones(2, 5))
    raw = SparseBox3DRefinementModule(refine_yaw=False)
    nn.init.zeros_(raw.layers[-1].weight)
    nn.init.constant_(raw.layers[-1].bias, 0.25)
    box = raw(inst, anchor, embed, 1.0)[0]
    torch.testing.assert_close(box[..., 6:8], torch.full((2, 5, 2), 0.25))  # not refined
    torch.testing.assert_close(box[..., :6], anchor[..., :6] + 0.25)
    with pytest.raises(ValueError, match='with_cls_branch'):
        SparseBox3DRefinementModule(with_cls_branch=False)(inst, anchor, embed)


# ---------------------------------------------------------------------------------------------
# DenseDepthNet
# ---------------------------------------------------------------------------------------------


def test_depth_net_shapes_and_focal_scaling():
    net = DenseDepthNet(embed_dims=8)
    maps = [torch.randn(2, 3, 8, 8 // s, 12 // s).to(torch.bfloat16) for s in (1, 2, 4, 8)]
    depths = net(maps)
    assert [tuple(d.shape) for d in depths] == [(6, 1, 8, 12), (6, 1, 4, 6), (6, 1, 2, 3)]
    assert all(d.dtype == torch.float32 for d in depths)
    for conv in net.depth_layers:
        nn.init.zeros_(conv.weight)
        nn.init.constant_(conv.bias, math.log(2.0))
    focal = torch.tensor([[100., 200., 50.], [400., 100., 10.]])
    with torch.autocast('cpu', dtype=torch.bfloat16):
        depths = net(maps, focal)
    assert depths[0].dtype == torch.float32
    want = 2.0 * focal.reshape(6) / 100
    torch.testing.assert_close(depths[1], want[:, None, None, None].expand(6, 1, 4, 6))
    with pytest.raises(ValueError, match='feature levels'):
        net(maps[:2])
    with pytest.raises(ValueError, match='focal'):
        net(maps, focal[:, :2])


def test_depth_loss_hand_case_two_foreground_pixels():
    net = DenseDepthNet(max_depth=60, loss_weight=0.2)
    # Level 0: B=2, N=2, 2x3 maps; level 1: 1x2 maps without any target.
    pred0 = torch.full((4, 1, 2, 3), 10.0)
    pred0[3, 0, 1, 2] = 70.0  # (b=1, cam=1), clipped to 60
    pred0[1, 0, 0, 1] = 4.0  # (b=0, cam=1)
    pred0[2, 0, 0, 0] = float('nan')  # a background NaN is ignored
    pred0.requires_grad_()
    pred1 = torch.full((4, 1, 1, 2), 3.0, requires_grad=True)
    gt0 = torch.full((2, 2, 2, 3), -1.0)
    gt0[0, 0, 1, 1] = 0.0  # not a target
    gt0[1, 1, 1, 2] = 50.0
    gt0[0, 1, 0, 1] = 5.0
    gt1 = torch.zeros(2, 2, 1, 2)
    loss = net.loss([pred0, pred1], [gt0, gt1])
    want = (abs(60.0 - 50.0) + abs(4.0 - 5.0)) / (2 * 2) * 0.2
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor(want))
    loss.backward()
    grad = torch.zeros_like(pred0)
    grad[1, 0, 0, 1] = -0.2 / 4  # d|4 - 5| / dpred = -1; the clipped pixel has zero gradient
    torch.testing.assert_close(pred0.grad, grad)
    assert torch.isfinite(pred0.grad).all() and (pred1.grad == 0).all()


def test_depth_loss_without_foreground_is_connected_zero():
    net = DenseDepthNet()
    pred = torch.rand(2, 1, 3, 4, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = net.loss([pred], [torch.full((1, 2, 3, 4), -1.0)])
    assert loss.item() == 0.0 and loss.requires_grad and loss.dtype == torch.float32
    loss.backward()
    assert (pred.grad == 0).all()
    with pytest.raises(ValueError, match='does not match'):
        net.loss([pred], [torch.zeros(1, 2, 3, 5)])
    with pytest.raises(ValueError, match='ground-truth levels'):
        net.loss([pred, pred], [torch.zeros(1, 2, 3, 4)])


# ---------------------------------------------------------------------------------------------
# GridMask
# ---------------------------------------------------------------------------------------------


def grid_mask_numpy(h, w, use_h=True, use_w=True, rotate=1, ratio=0.5, mode=1):
    """The upstream algorithm in numpy (canvas loops, PIL rotation, centre crop), after the
    probability draw, drawing numbers in the same order."""
    hh, ww = int(1.5 * h), int(1.5 * w)
    d = np.random.randint(2, h)
    band = min(max(int(d * ratio + 0.5), 1), d - 1)
    canvas = np.ones((hh, ww), np.float32)
    st_h, st_w = np.random.randint(d), np.random.randint(d)
    if use_h:
        for i in range(hh // d):
            canvas[d * i + st_h:min(d * i + st_h + band, hh), :] = 0
    if use_w:
        for i in range(ww // d):
            canvas[:, d * i + st_w:min(d * i + st_w + band, ww)] = 0
    angle = np.random.randint(rotate)
    if angle:
        from PIL import Image
        canvas = np.asarray(Image.fromarray(np.uint8(canvas)).rotate(angle)).astype(np.float32)
    top, left = (hh - h) // 2, (ww - w) // 2
    mask = canvas[top:top + h, left:left + w]
    return 1 - mask if mode == 1 else mask


def test_grid_mask_eval_and_prob_zero_are_identity():
    x = torch.rand(2, 3, 16, 24)
    gm = GridMask(prob=1.0).eval()
    np.random.seed(0)
    state = np.random.get_state()[1].copy()
    assert gm(x) is x
    assert (np.random.get_state()[1] == state).all()  # eval draws nothing
    gm0 = GridMask(prob=0.0).train()
    assert all(gm0(x) is x for _ in range(20))


@pytest.mark.parametrize('mode,use_w', [(1, True), (0, True), (1, False)])
def test_grid_mask_matches_numpy_reference(mode, use_w):
    gm = GridMask(mode=mode, use_w=use_w, prob=1.0).train()
    x = torch.rand(4, 3, 32, 88)
    for seed in range(5):
        np.random.seed(seed)
        out = gm(x)
        np.random.seed(seed)
        np.random.rand()
        want = torch.from_numpy(grid_mask_numpy(32, 88, use_w=use_w, mode=mode).copy())
        torch.testing.assert_close(out, x * want, rtol=0, atol=0)


def test_grid_mask_mode1_structure():
    gm = GridMask(prob=1.0).train()
    np.random.seed(3)
    mask = gm.make_mask(64, 176)
    np.random.seed(3)
    inverted = GridMask(mode=0).make_mask(64, 176)
    assert torch.equal(mask, 1 - inverted)
    # mode 1 blanks the squares between the bands: the mask is separable, the product of a
    # row pattern and a column pattern (a cell is blanked iff its row and its column are both
    # off-band), so each row is either all ones or equal to one common pattern.
    blank = mask == 0
    rows_blank, cols_blank = blank.any(dim=1), blank.any(dim=0)
    torch.testing.assert_close(blank, rows_blank[:, None] & cols_blank[None, :], rtol=0, atol=0)
    assert 0 < blank.float().mean() < 1


def test_grid_mask_one_mask_for_batch_and_dtype_preserved():
    gm = GridMask(prob=1.0).train()
    np.random.seed(1)
    out = gm(torch.ones(3, 2, 20, 30, dtype=torch.float16))
    assert out.dtype == torch.float16 and out.shape == (3, 2, 20, 30)
    assert (out == out[0, 0]).all() and set(out.unique().tolist()) <= {0.0, 1.0}


def test_grid_mask_rotation_and_offset():
    pytest.importorskip('PIL')
    gm = GridMask(rotate=40, prob=1.0).train()
    x = torch.rand(1, 1, 48, 64)
    mismatch, rotated = 0.0, False
    for seed in range(4):
        np.random.seed(seed)
        out = gm(x)
        np.random.seed(seed)
        rotated |= not torch.equal(out, GridMask(prob=1.0).train()(x))
        np.random.seed(seed)
        np.random.rand()
        want = x * torch.from_numpy(grid_mask_numpy(48, 64, rotate=40).copy())
        mismatch = max(mismatch, (out != want).float().mean().item())
    assert rotated
    assert mismatch < 0.005  # measured 0; nearest-neighbour ties might round differently
    noisy = GridMask(offset=True, prob=1.0).train()
    np.random.seed(2)
    out = noisy(torch.full((2, 1, 16, 16), 5.0))
    np.random.seed(2)
    np.random.rand()
    kept = torch.from_numpy(grid_mask_numpy(16, 16).copy()) == 1
    assert (out[:, :, kept] == 5.0).all()
    assert (out[:, :, ~kept].abs() <= 1.0).all() and torch.equal(out[0], out[1])


def test_ffn_loads_upstreams_nested_layout():
    """Upstream's checkpoints nest the hidden block (``layers.0.0``) and put the last Linear at
    ``layers.1``: they load into the flat layout with the same outputs."""
    ffn = AsymmetricFFN(in_channels=8, embed_dims=4, feedforward_channels=16).eval()
    ours = ffn.state_dict()
    upstream = {}
    for key, value in ours.items():
        key = key.replace('layers.0.', 'layers.0.0.').replace('layers.3.', 'layers.1.')
        upstream[key] = value.clone()
    assert 'layers.0.0.weight' in upstream and 'layers.1.bias' in upstream
    loaded = AsymmetricFFN(in_channels=8, embed_dims=4, feedforward_channels=16).eval()
    loaded.load_state_dict(upstream)
    x = torch.randn(3, 8)
    torch.testing.assert_close(loaded(x), ffn(x))
    # inside a model (a prefix) too
    wrapped = torch.nn.Sequential(AsymmetricFFN(in_channels=8, embed_dims=4,
                                                feedforward_channels=16)).eval()
    wrapped.load_state_dict({f'0.{k}': v for k, v in upstream.items()})
    torch.testing.assert_close(wrapped(x), ffn(x))


def test_project_points_are_float32_multiply_adds_of_the_product():
    """The camera product by multiply-adds (no matrix product, which TF32 could round by about
    half a pixel): the float64 product's values within float32 rounding, on lidar-range
    points and nuScenes-like matrices."""
    from conftest import no_matrix_products
    gen = torch.Generator().manual_seed(0)
    mat = torch.eye(4).repeat(2, 3, 1, 1)
    mat[..., :3, :3] = torch.randn(2, 3, 3, 3, generator=gen) * 400.0 + torch.diag(
        torch.tensor([1266.0, 1266.0, 1.0]))
    mat[..., :3, 3] = torch.randn(2, 3, 3, generator=gen) * 300.0
    pts = torch.randn(2, 5, 7, 3, generator=gen) * 30.0
    with no_matrix_products():
        got = project_points(pts, mat)
    homo = torch.cat([pts, torch.ones_like(pts[..., :1])], -1).double()
    cam = torch.einsum('bnij,bqpj->bnqpi', mat.double(), homo)
    want = cam[..., :2] / cam[..., 2:3].clamp(min=1e-5)
    near = cam[..., 2] > 1.0  # in front, away from the clamp (where a ulp moves u by a lot)
    torch.testing.assert_close(got.double()[near], want[near], rtol=1e-5, atol=1e-3)
