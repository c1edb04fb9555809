"""MapTR v1's BEV encoder on tiny sizes (BEV 20 x 10, two cameras, 64 x 128 images): reference
points and their projection against a hand projection, the visibility mask, the temporal
self-attention without history against the design doc's description, the kernel attention
against a direct computation, the spatial cross-attention's turbox path against upstream's
rebatching (outputs and gradients, sample 0's mask), the ops of both paths, and the encoder
end to end."""
import copy
import sys
import types
from unittest import mock

import numpy as np
import pytest
import torch
from mmcv.ops.multi_scale_deform_attn import multi_scale_deformable_attn_pytorch
from mmengine.registry import DefaultScope
from torch import nn

from conftest import no_matrix_products
from turbox_mm.models.maptr import (BEVFormerLayer, GeometryKernelAttention,
                                    GeometrySptialCrossAttention, MapTRPerceptionTransformer,
                                    TemporalSelfAttention, point_sampling, reference_points_2d,
                                    reference_points_3d)
from turbox_mm.models.maptr.geometry_kernel_attention import kernel_offsets
from turbox_mm.ops import dispatch
from turbox_mm.ops import geometric_kernel_attn as gka
from turbox_mm.ops import ms_deform_attn as msda
from turbox_mm.registry import MODELS

DIMS, BEV_H, BEV_W, CAMS = 16, 20, 10, 2
IMG_H, IMG_W, FEAT_H, FEAT_W = 64, 128, 4, 8
PC = [-15.0, -30.0, -2.0, 15.0, 30.0, 2.0]
SHAPES, START = torch.tensor([[FEAT_H, FEAT_W]]), torch.tensor([0])
BEV_SHAPES = torch.tensor([[BEV_H, BEV_W]])


def camera(yaw, backward=False, focal=40.0):
    """``lidar2img`` of a pinhole camera 1 m ahead of (behind) the lidar, 1.5 m up, looking
    along lidar ``+y`` (``-y``) turned by ``yaw``; 128 x 64 pixels."""
    sign = -1.0 if backward else 1.0
    forward = sign * np.array([np.sin(yaw), np.cos(yaw), 0.0])
    right = sign * np.array([np.cos(yaw), -np.sin(yaw), 0.0])
    down = np.array([0.0, 0.0, -1.0])
    rot = np.stack([right, down, forward])
    centre = np.array([0.0, sign, 1.5])
    intrinsics = np.array([[focal, 0, IMG_W / 2], [0, focal, IMG_H / 2], [0, 0, 1]])
    out = np.eye(4)
    out[:3] = intrinsics @ np.concatenate([rot, -rot @ centre[:, None]], 1)
    return out


def rig(batch=2):
    """``[B, 2, 4, 4]``: a front and a back camera, turned by 0.3 rad more each sample (so
    the samples see different BEV cells)."""
    return np.stack([np.stack([camera(0.3 * b), camera(-0.3 * b, backward=True)])
                     for b in range(batch)])


def can_bus(seed):
    values = np.random.default_rng(seed).normal(size=18)
    values[:3] = 0
    values[-1] = 0
    return values


def metas(batch=2):
    return [dict(lidar2img=list(rig(batch)[b]), img_shape=[(IMG_H, IMG_W, 3)] * CAMS,
                 can_bus=can_bus(b)) for b in range(batch)]


def projection(batch=2):
    ref = reference_points_3d(BEV_H, BEV_W, PC[5] - PC[2], 4, batch)
    return point_sampling(ref, PC, torch.from_numpy(rig(batch)), (IMG_H, IMG_W))


def randomize(module, seed, std=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * std)
    return module


def randn(*shape, seed=0, grad=False):
    out = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return out.requires_grad_(grad)


def grads(module, *tensors):
    return [t.grad for t in tensors] + [p.grad for p in module.parameters()]


def assert_close_all(first, second, atol=1e-5, rtol=1e-5):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# -- reference points and projection -------------------------------------------------------------


def test_reference_points_are_cell_centres_row_major():
    ref3 = reference_points_3d(BEV_H, BEV_W, 4.0, 4, batch=2)
    ref2 = reference_points_2d(BEV_H, BEV_W, batch=2)
    assert ref3.shape == (2, 4, BEV_H * BEV_W, 3) and ref2.shape == (2, BEV_H * BEV_W, 1, 2)
    row, col = 7, 3
    q = row * BEV_W + col
    expected = torch.tensor([(col + 0.5) / BEV_W, (row + 0.5) / BEV_H])
    torch.testing.assert_close(ref2[1, q, 0], expected)
    torch.testing.assert_close(ref3[1, :, q, :2], expected.expand(4, 2))
    metric_z = ref3[0, :, q, 2] * (PC[5] - PC[2]) + PC[2]
    torch.testing.assert_close(metric_z, torch.tensor([-1.5, -0.5, 0.5, 1.5]))


def test_point_sampling_matches_a_hand_projection_and_the_mask_rule():
    batch = 2
    cam, mask = projection(batch)
    assert cam.shape == (CAMS, batch, BEV_H * BEV_W, 4, 2) and cam.dtype == torch.float32
    assert mask.shape == (CAMS, batch, BEV_H * BEV_W, 4) and mask.dtype == torch.bool
    ref = reference_points_3d(BEV_H, BEV_W, 4.0, 4, batch).double().numpy()
    lidar2img = rig(batch)
    low, high = np.array(PC[:3]), np.array(PC[3:])
    metric = ref * (high - low) + low  # [B, D, Q, 3]
    homo = np.concatenate([metric, np.ones_like(metric[..., :1])], -1)
    pix = np.einsum('bnij,bdqj->nbqdi', lidar2img, homo)
    depth = pix[..., 2]
    u = pix[..., 0] / np.maximum(depth, 1e-5) / IMG_W
    v = pix[..., 1] / np.maximum(depth, 1e-5) / IMG_H
    rule = (depth > 1e-5) & (u > 0) & (u < 1) & (v > 0) & (v < 1)
    near = (depth > 0.5)
    np.testing.assert_allclose(cam[..., 0].numpy()[near], u[near], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cam[..., 1].numpy()[near], v[near], rtol=1e-4, atol=1e-5)
    edge = (np.abs(u) < 1e-4) | (np.abs(u - 1) < 1e-4) | (np.abs(v) < 1e-4) | \
        (np.abs(v - 1) < 1e-4) | (np.abs(depth) < 1e-4)
    np.testing.assert_array_equal(mask.numpy()[~edge], rule[~edge])
    # the rig leaves some anchors visible, some not, some cells unseen by every camera, and the
    # two samples see different cells
    assert mask.any() and not mask.all()
    assert (~mask.any(-1).any(0)).any()
    assert (mask[:, 0].any(-1) != mask[:, 1].any(-1)).any()
    # a point behind the front camera is masked: the cell at the back edge, x = 0
    q = 0 * BEV_W + BEV_W // 2
    assert not mask[0, 0, q].any() and depth[0, 0, q].max() < 0


def test_point_sampling_turbox_contracts_without_repeats_and_agrees():
    """The turbox projection: the same products without the ``[D, B, N, Q, 4, 4]`` repeat
    and without a matrix product (float32 multiply-adds), equal up to the last bit
    of the four-term sums; the visibility masks equal away from the open-interval edges."""
    ref = reference_points_3d(BEV_H, BEV_W, 4.0, 4, 2)
    lidar2img = torch.from_numpy(rig())
    stock = point_sampling(ref, PC, lidar2img, (IMG_H, IMG_W))
    seen = []
    real_matmul = torch.matmul

    def spy(a, b):
        seen.append(a.numel() + b.numel())
        return real_matmul(a, b)

    with mock.patch.object(torch, 'matmul', side_effect=spy):
        turbox = point_sampling(ref, PC, lidar2img, (IMG_H, IMG_W), op_impl='turbox')
    assert not seen  # no repeated batched matmul
    with no_matrix_products():  # nor any matrix product TF32 could round
        point_sampling(ref, PC, lidar2img, (IMG_H, IMG_W), op_impl='turbox')
    # near-zero depths magnify a last-bit difference of the sum (as for the hand projection)
    torch.testing.assert_close(turbox[0], stock[0], rtol=1e-4, atol=1e-5)
    edge = (stock[0] - 0).abs().lt(1e-5).any(-1) | (stock[0] - 1).abs().lt(1e-5).any(-1)
    assert torch.equal(turbox[1][~edge], stock[1][~edge])
    assert turbox[1].any() and not turbox[1].all()


def test_point_sampling_is_float32_under_autocast():
    ref = reference_points_3d(BEV_H, BEV_W, 4.0, 4, 2)
    expected = point_sampling(ref, PC, torch.from_numpy(rig()), (IMG_H, IMG_W))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        cam, mask = point_sampling(ref.bfloat16(), PC, torch.from_numpy(rig()), (IMG_H, IMG_W))
    assert cam.dtype == torch.float32
    # the bfloat16 reference points are coarser; the projection itself is float32
    ref_cast = ref.bfloat16().float()
    torch.testing.assert_close(cam, point_sampling(ref_cast, PC, torch.from_numpy(rig()),
                                                   (IMG_H, IMG_W))[0])
    assert expected[0].dtype == torch.float32 and mask.dtype == torch.bool


# -- temporal self-attention ------------------------------------------------------------------


def tsa_pair(seed=0, **kw):
    cfg = dict(embed_dims=DIMS, num_heads=2, num_levels=1, num_points=2, dropout=0.0, **kw)
    stock = randomize(TemporalSelfAttention(op_impl='stock', **cfg), seed)
    turbox = TemporalSelfAttention(op_impl='turbox', **cfg)
    turbox.load_state_dict(stock.state_dict())
    return stock, turbox


def doc_tsa_without_history(tsa, query, pos, ref_2d):
    """docs/design/maptr.md 3.1, one sample at a time: the value is the query twice; offsets and
    weights from Linear(2C) of [previous half | query + pos], the previous half being upstream's
    ``value[:B]`` of the interleaved queue (sample ``b`` reads the query of sample ``b // 2``);
    mmcv's deformable attention over the BEV per queue entry around the 2D reference point;
    the two entries averaged, ``output_proj``, residual."""
    heads, points = tsa.num_heads, tsa.num_points
    outs = []
    for b in range(query.shape[0]):
        cat = torch.cat([query[b // 2], query[b] + pos[b]], -1)
        offsets = tsa.sampling_offsets(cat).view(-1, heads, 2, 1, points, 2)
        weights = tsa.attention_weights(cat).view(-1, heads, 2, points).softmax(-1)
        value = tsa.value_proj(query[b]).view(1, -1, heads, DIMS // heads)
        entries = []
        for t in range(2):
            loc = ref_2d[2 * b + t][:, None, :, None, :] + offsets[:, :, t] / torch.tensor(
                [BEV_W, BEV_H])
            entries.append(multi_scale_deformable_attn_pytorch(
                value, BEV_SHAPES, loc[None], weights[:, :, t, None][None]))
        outs.append(tsa.output_proj((entries[0] + entries[1]) / 2)[0] + query[b])
    return torch.stack(outs)


def test_tsa_without_history_is_the_docs_description():
    stock, turbox = tsa_pair()
    query, pos = randn(3, BEV_H * BEV_W, DIMS, seed=1), randn(3, BEV_H * BEV_W, DIMS, seed=2)
    ref = reference_points_2d(BEV_H, BEV_W, 3)
    ref_2d = torch.stack([ref, ref], 1).flatten(0, 1)
    expected = doc_tsa_without_history(stock, query, pos, ref_2d)
    for tsa in (stock, turbox):
        seen = []
        hook = tsa.value_proj.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
        out = tsa(query, None, query_pos=pos, reference_points=ref_2d, spatial_shapes=BEV_SHAPES,
                  level_start_index=START)
        hook.remove()
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        # stock projects the queue of 2B maps, turbox the B queries once
        assert seen == [6 if tsa is stock else 3]


@pytest.mark.parametrize('history', [False, True])
def test_tsa_stock_and_turbox_agree_with_gradients(history):
    stock, turbox = tsa_pair(seed=3)
    ref = reference_points_2d(BEV_H, BEV_W, 2)
    shifted = ref + torch.tensor([0.05, -0.1])
    ref_2d = torch.stack([shifted if history else ref, ref], 1).flatten(0, 1)
    results = []
    for tsa in (stock, turbox):
        query = randn(2, BEV_H * BEV_W, DIMS, seed=4, grad=True)
        pos = randn(2, BEV_H * BEV_W, DIMS, seed=5, grad=True)
        prev = randn(4, BEV_H * BEV_W, DIMS, seed=6, grad=True) if history else None
        out = tsa(query, prev, query_pos=pos, reference_points=ref_2d,
                  spatial_shapes=BEV_SHAPES, level_start_index=START)
        (out * randn(*out.shape, seed=7)).sum().backward()
        results.append([out] + grads(tsa, query, pos) + ([prev.grad] if history else []))
    assert_close_all(*results)


def kernels(op):
    """Run ``op``'s Triton kernels on CPU tensors (interpreter); fail if it would not."""
    pytest.importorskip('triton')
    with dispatch.kernel_on_cpu():
        if op.fallback_reason(torch.zeros(1)) is not None:
            pytest.skip(f'{op.fallback_reason(torch.zeros(1))}')
    return dispatch.kernel_on_cpu()


def test_tsa_turbox_kernels_in_the_interpreter():
    stock, turbox = tsa_pair(seed=8)
    ref = reference_points_2d(4, 5, 1)
    ref_2d = torch.stack([ref, ref], 1).flatten(0, 1)
    shapes = torch.tensor([[4, 5]])
    results = []
    for tsa, ctx in ((stock, mock.MagicMock()), (turbox, kernels(msda))):
        query = randn(1, 20, DIMS, seed=9, grad=True)
        with ctx:
            out = tsa(query, None, query_pos=randn(1, 20, DIMS, seed=10), reference_points=ref_2d,
                      spatial_shapes=shapes, level_start_index=START)
            out.square().sum().backward()
        results.append([out] + grads(tsa, query))
    assert_close_all(*results, atol=1e-4, rtol=1e-4)


# -- geometric kernel attention ------------------------------------------------------------------


def test_kernel_window_is_dx_major():
    offsets = kernel_offsets((3, 5))
    assert offsets.dtype == torch.int64 and offsets.shape == (15, 2)
    expected = [(dx, dy) for dx in range(-2, 3) for dy in range(-1, 2)]
    assert [tuple(o) for o in offsets.tolist()] == expected
    assert kernel_offsets((3, 3), dilation=2)[:2].tolist() == [[-2, -2], [-2, 0]]


def test_kernel_attention_against_a_direct_computation():
    gkt = randomize(GeometryKernelAttention(embed_dims=DIMS, num_heads=4), seed=11, std=0.5)
    query, value = randn(2, 7, DIMS, seed=12), randn(2, FEAT_H * FEAT_W, DIMS, seed=13)
    ref = randn(2, 7, 4, 2, seed=14).sigmoid() * 1.4 - 0.2  # some windows past the border
    out = gkt(query, value, ref, SHAPES, START)
    projected = gkt.value_proj(value).view(2, -1, 4, DIMS // 4)
    weights = gkt.attention_weights(query).view(2, 7, 4, 15).softmax(-1)
    window = [(dx, dy) for dx in range(-2, 3) for dy in range(-1, 2)]
    expected = torch.zeros(2, 7, 4, DIMS // 4)
    for b in range(2):
        for q in range(7):
            for h in range(4):
                u, v = ref[b, q, h].tolist()
                for k, (dx, dy) in enumerate(window):
                    x = min(max(round(np.float32(u) * np.float32(FEAT_W) + dx), 0), FEAT_W - 1)
                    y = min(max(round(np.float32(v) * np.float32(FEAT_H) + dy), 0), FEAT_H - 1)
                    expected[b, q, h] += weights[b, q, h, k] * projected[b, y * FEAT_W + x, h]
    torch.testing.assert_close(out, expected.view(2, 7, DIMS), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match='one anchor a head'):
        gkt(query, value, ref[:, :, :3], SHAPES, START)


def test_kernel_attention_ops_agree_with_gradients():
    stock = randomize(GeometryKernelAttention(embed_dims=DIMS, num_heads=4), seed=15)
    turbox = GeometryKernelAttention(embed_dims=DIMS, num_heads=4, op_impl='turbox')
    turbox.load_state_dict(stock.state_dict())
    ref = randn(2, 9, 4, 2, seed=16).sigmoid() * 1.4 - 0.2
    results = []
    for gkt, ctx in ((stock, mock.MagicMock()), (turbox, kernels(gka))):
        query = randn(2, 9, DIMS, seed=17, grad=True)
        value = randn(2, FEAT_H * FEAT_W, DIMS, seed=18, grad=True)
        with ctx:
            out = gkt(query, value, ref, SHAPES, START)
            (out * randn(*out.shape, seed=19)).sum().backward()
        results.append([out] + grads(gkt, query, value))
    assert_close_all(*results)


# -- spatial cross-attention -------------------------------------------------------------------


def sca_pair(seed=20, max_len=None, **kw):
    cfg = dict(embed_dims=DIMS, num_cams=CAMS, dropout=0.0,
               attention=dict(embed_dims=DIMS, num_heads=4), **kw)
    stock = randomize(GeometrySptialCrossAttention(op_impl='stock', **cfg), seed)
    turbox = GeometrySptialCrossAttention(op_impl='turbox', max_len=max_len, **cfg)
    turbox.load_state_dict(stock.state_dict())
    return stock, turbox


def run_sca(sca, cam, mask, seed=21, ctx=None):
    query = randn(2, BEV_H * BEV_W, DIMS, seed=seed, grad=True)
    value = randn(2, CAMS, FEAT_H * FEAT_W, DIMS, seed=seed + 1, grad=True)
    with ctx or mock.MagicMock():
        out = sca(query, value, cam, mask, SHAPES, START)
        (out * randn(*out.shape, seed=seed + 2)).sum().backward()
    return [out] + grads(sca, query, value)


@pytest.mark.parametrize('slack', [None, 0, 9])
def test_sca_stock_rebatching_and_turbox_masking_agree(slack):
    """Turbox with every query (``slack`` None) or ``max_len`` = the most queries a camera
    sees in sample 0 plus ``slack``."""
    cam, mask = projection()
    random_mask = torch.rand(mask.shape, generator=torch.Generator().manual_seed(0)) > 0.7
    assert (~mask[:, 0].any(-1)).any()  # invisible queries in every camera's sample 0 rows
    for visibility in (mask, random_mask):  # the rig's, and random anchors
        most = int(visibility[:, 0].any(-1).sum(-1).max())
        stock, turbox = sca_pair(max_len=None if slack is None else most + slack)
        assert stock.attention.op_impl == 'stock' and turbox.attention.op_impl == 'turbox'
        assert_close_all(run_sca(stock, cam, visibility), run_sca(turbox, cam, visibility))


def test_sca_turbox_max_len_too_small_is_an_error():
    cam, mask = projection()
    most = int(mask[:, 0].any(-1).sum(-1).max())
    turbox = sca_pair(max_len=most - 1)[1]
    with pytest.raises(RuntimeError, match=f'sees more than max_len={most - 1}'):
        run_sca(turbox, cam, mask)
    with pytest.raises(ValueError, match="max_len .* is for op_impl='turbox'"):
        GeometrySptialCrossAttention(max_len=100)


@pytest.mark.parametrize('max_len', [None, 140])
def test_sca_turbox_kernels_in_the_interpreter(max_len):
    cam, mask = projection()
    assert mask[:, 0].any(-1).sum(-1).max() <= 140
    stock, turbox = sca_pair(seed=22, max_len=max_len)
    assert_close_all(run_sca(stock, cam, mask), run_sca(turbox, cam, mask, ctx=kernels(gka)),
                     atol=1e-4, rtol=1e-4)


def test_sca_uses_sample_zeros_rows_for_every_sample():
    """Upstream's quirk: a cell that sample 1 sees but sample 0 does not (in any camera) gets no
    attention in sample 1: output = query + output_proj(0)."""
    cam, mask = projection()
    only_1 = ~mask[:, 0].any(-1).any(0) & mask[:, 1].any(-1).any(0)
    assert only_1.any()
    for sca in sca_pair(seed=23):
        sca.eval()
        query = randn(2, BEV_H * BEV_W, DIMS, seed=24)
        value = randn(2, CAMS, FEAT_H * FEAT_W, DIMS, seed=25)
        out = sca(query, value, cam, mask, SHAPES, START)
        torch.testing.assert_close(out[1, only_1], query[1, only_1] + sca.output_proj.bias)
        assert not torch.allclose(out[0, mask[:, 0].any(-1).any(0)],
                                  query[0, mask[:, 0].any(-1).any(0)] + sca.output_proj.bias)


def test_sca_with_no_visible_query():
    cam, mask = projection()
    mask = torch.zeros_like(mask)
    for sca in sca_pair(seed=26):
        query = randn(2, BEV_H * BEV_W, DIMS, seed=27)
        out = sca(query, randn(2, CAMS, FEAT_H * FEAT_W, DIMS), cam, mask, SHAPES, START)
        torch.testing.assert_close(out, query + sca.output_proj.bias)


def test_sca_turbox_does_not_rebatch_with_nonzero():
    cam, mask = projection()
    stock, turbox = sca_pair(seed=28)

    def refuse(*args, **kwargs):
        raise AssertionError('nonzero called')

    with mock.patch.object(torch.Tensor, 'nonzero', refuse), \
            mock.patch.object(torch, 'nonzero', refuse):
        run_sca(turbox, cam, mask)
        with pytest.raises(AssertionError, match='nonzero called'):
            run_sca(stock, cam, mask)


def test_sca_runs_in_float32_under_autocast():
    cam, mask = projection()
    stock, turbox = sca_pair(seed=29)
    query, value = randn(2, BEV_H * BEV_W, DIMS), randn(2, CAMS, FEAT_H * FEAT_W, DIMS)
    for sca in (stock, turbox):
        expected = sca(query, value, cam, mask, SHAPES, START)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = sca(query.bfloat16(), value.bfloat16(), cam, mask, SHAPES, START)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, sca(query.bfloat16().float(), value.bfloat16().float(),
                                            cam, mask, SHAPES, START))
        assert expected.dtype == torch.float32
    with pytest.raises(ValueError, match='num_cams is 2'):
        stock(query, value[:, :1], cam, mask, SHAPES, START)


# -- layer and encoder ---------------------------------------------------------------------------


def encoder_cfg(op_impl='stock', **kw):
    cfg = dict(
        type='turbox_mm.MapTRPerceptionTransformer', bev_h=BEV_H, bev_w=BEV_W, pc_range=PC,
        embed_dims=DIMS, num_cams=CAMS, op_impl=op_impl,
        positional_encoding=dict(type='LearnedPositionalEncoding', num_feats=DIMS // 2,
                                 row_num_embed=BEV_H, col_num_embed=BEV_W),
        encoder=dict(
            type='BEVFormerEncoder', num_layers=2, pc_range=PC, num_points_in_pillar=4,
            transformerlayers=dict(
                type='BEVFormerLayer', feedforward_channels=32, ffn_dropout=0.0,
                attn_cfgs=[
                    dict(type='TemporalSelfAttention', embed_dims=DIMS, num_heads=2,
                         num_points=2, num_levels=1, dropout=0.0),
                    dict(type='GeometrySptialCrossAttention', pc_range=PC, embed_dims=DIMS,
                         dropout=0.0,
                         attention=dict(type='GeometryKernelAttention', embed_dims=DIMS,
                                        num_heads=4, dilation=1, kernel_size=(3, 5),
                                        num_levels=1))],
                operation_order=('self_attn', 'norm', 'cross_attn', 'norm', 'ffn', 'norm'))))
    cfg.update(kw)
    return cfg


def build_encoders(seed=30, **kw):
    torch.manual_seed(seed)
    stock = MODELS.build(encoder_cfg('stock', **kw))
    randomize(stock.encoder, seed, std=0.2)
    turbox = MODELS.build(encoder_cfg('turbox', **kw))
    turbox.load_state_dict(stock.state_dict())
    return stock, turbox


def feats(batch=2, seed=31, grad=False):
    return [randn(batch, CAMS, DIMS, FEAT_H, FEAT_W, seed=seed, grad=grad)]


def test_config_with_upstreams_plain_names_builds_under_mmdet3ds_scope():
    with DefaultScope.overwrite_default_scope('mmdet3d'):
        stock, turbox = build_encoders()
    layer = turbox.encoder.layers[0]
    assert isinstance(layer, BEVFormerLayer) and len(turbox.encoder.layers) == 2
    assert [type(a).__name__ for a in layer.attentions] == ['TemporalSelfAttention',
                                                            'GeometrySptialCrossAttention']
    for enc, impl in ((stock, 'stock'), (turbox, 'turbox')):
        attn = enc.encoder.layers[1].attentions
        assert (attn[0].op_impl, attn[1].op_impl, attn[1].attention.op_impl) == (impl,) * 3
        assert attn[1].num_cams == CAMS
    # "stock + turbox op": the stock encoder with the kernel attention's op swapped alone
    cfg = encoder_cfg('stock')
    cfg['encoder']['transformerlayers']['attn_cfgs'][1]['attention']['op_impl'] = 'turbox'
    sca = MODELS.build(cfg).encoder.layers[0].attentions[1]
    assert (sca.op_impl, sca.attention.op_impl) == ('stock', 'turbox')


def test_default_is_maptr_tiny_with_upstreams_parameter_names():
    enc = MapTRPerceptionTransformer()
    shapes = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    layer = 'encoder.layers.0.'
    expected = {
        'bev_embedding.weight': (20000, 256), 'positional_encoding.row_embed.weight': (200, 128),
        'positional_encoding.col_embed.weight': (100, 128), 'level_embeds': (4, 256),
        'cams_embeds': (6, 256), 'can_bus_mlp.0.weight': (128, 18),
        'can_bus_mlp.2.weight': (256, 128), 'can_bus_mlp.norm.weight': (256, ),
        layer + 'attentions.0.sampling_offsets.weight': (128, 512),
        layer + 'attentions.0.attention_weights.weight': (64, 512),
        layer + 'attentions.0.value_proj.weight': (256, 256),
        layer + 'attentions.0.output_proj.weight': (256, 256),
        layer + 'attentions.1.attention.attention_weights.weight': (60, 256),
        layer + 'attentions.1.attention.value_proj.weight': (256, 256),
        layer + 'attentions.1.output_proj.weight': (256, 256),
        layer + 'ffns.0.layers.0.0.weight': (512, 256),
        layer + 'ffns.0.layers.1.weight': (256, 512),
        layer + 'norms.2.weight': (256, )}
    assert {k: shapes[k] for k in expected} == expected
    assert not any(k.startswith('encoder.layers.1.') for k in shapes)
    assert len(shapes) == 35 and 'grid_offsets' not in ' '.join(shapes)
    # upstream keys map onto every key, decoder keys onto none
    upstream = {'bev_embedding': 'pts_bbox_head.bev_embedding',
                'positional_encoding': 'pts_bbox_head.positional_encoding'}
    for key in shapes:
        head = key.split('.')[0]
        theirs = key.replace(head, upstream.get(head, f'pts_bbox_head.transformer.{head}'), 1)
        assert MapTRPerceptionTransformer.upstream_key(theirs) == key
    for key in ('pts_bbox_head.transformer.decoder.layers.0.norms.0.weight',
                'pts_bbox_head.transformer.reference_points.weight', 'img_backbone.conv1.weight'):
        assert MapTRPerceptionTransformer.upstream_key(key) is None
    # upstream's init: embeddings N(0, 1), TSA re-initialised, the kernel attention's matrix
    # Xavier, the can-bus MLP's biases PyTorch's
    sca = enc.encoder.layers[0].attentions[1]
    assert sca.attention.attention_weights.weight.abs().sum() > 0
    assert sca.attention.attention_weights.bias.abs().sum() == 0
    assert enc.encoder.layers[0].attentions[0].attention_weights.weight.abs().sum() == 0
    assert enc.can_bus_mlp[0].bias.abs().sum() > 0
    assert 0.9 < enc.bev_embedding.weight.std() < 1.1


def test_encoder_forward_backward_and_stock_equals_turbox():
    stock, turbox = build_encoders()
    results = []
    for enc in (stock, turbox):
        feat = feats(grad=True)
        out = enc(feat, metas())
        assert out.shape == (2, BEV_H * BEV_W, DIMS)
        (out * randn(*out.shape, seed=32)).sum().backward()
        for name, param in enc.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
            if not name.startswith('level_embeds'):
                assert param.grad.abs().sum() > 0, name
        assert enc.level_embeds.grad[0].abs().sum() > 0
        assert enc.level_embeds.grad[1:].abs().sum() == 0  # one feature level
        results.append([out, feat[0].grad] + [p.grad for p in enc.parameters()])
    assert_close_all(*results, atol=1e-4, rtol=1e-4)


def test_encoder_reads_the_metas_as_upstream():
    stock, turbox = build_encoders(seed=33)
    batch_metas = metas()
    out = stock(feats(), batch_metas)
    # tensors in the metas give the same numbers; the first camera's img_shape is read
    tensor_metas = [dict(m, lidar2img=torch.from_numpy(np.stack(m['lidar2img'])),
                         can_bus=torch.from_numpy(m['can_bus']), img_shape=(IMG_H, IMG_W))
                    for m in batch_metas]
    torch.testing.assert_close(turbox(feats(), tensor_metas), out, atol=1e-5, rtol=1e-5)
    # the can-bus reaches the queries
    moved = [dict(m, can_bus=m['can_bus'] + 1.0) for m in batch_metas]
    assert not torch.allclose(stock(feats(), moved), out)
    with pytest.raises(ValueError, match='num_cams is 2'):
        stock([feats()[0][:, :1]], batch_metas)
    with pytest.raises(ValueError, match='2 metas for a batch of 3'):
        stock(feats(batch=3), batch_metas)


def test_encoder_with_a_previous_bev():
    stock, turbox = build_encoders(seed=34, rotate_prev_bev=False)
    batch_metas = metas()
    for meta in batch_metas:
        meta['can_bus'][:2] = [1.0, 0.5]
    prev = randn(2, BEV_H * BEV_W, DIMS, seed=35)
    outs = [enc(feats(), batch_metas, prev_bev=prev) for enc in (stock, turbox)]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outs[0], stock(feats(), batch_metas))
    # upstream's shift: translation (1, 0.5) m, yaw can_bus[-2]; grid 0.3 m
    meta = batch_metas[0]
    angle = meta['can_bus'][-2] - np.arctan2(0.5, 1.0)
    length = np.hypot(1.0, 0.5)
    expected = [length * np.sin(angle) / (30 / BEV_W) / BEV_W,
                length * np.cos(angle) / (60 / BEV_H) / BEV_H]
    np.testing.assert_allclose(stock._shift([meta])[0], expected)


def test_previous_bev_rotation_calls_torchvisions_rotate_per_sample():
    enc = build_encoders(seed=36)[0]
    calls = []

    def rotate(img, angle, center=None):
        calls.append((tuple(img.shape), angle, center))
        return img.flip(-1)

    fake = types.ModuleType('torchvision.transforms.functional')
    fake.rotate = rotate
    modules = {'torchvision': types.ModuleType('torchvision'),
               'torchvision.transforms': types.ModuleType('torchvision.transforms'),
               'torchvision.transforms.functional': fake}
    batch_metas = metas()
    batch_metas[1]['can_bus'][-1] = 7.5
    prev = randn(2, BEV_H * BEV_W, DIMS, seed=37)
    with mock.patch.dict(sys.modules, modules):
        rotated = enc._rotate(prev, batch_metas)
        enc(feats(), batch_metas, prev_bev=prev)
    assert calls[:2] == [((DIMS, BEV_H, BEV_W), 0.0, [100, 100]),
                         ((DIMS, BEV_H, BEV_W), 7.5, [100, 100])]
    expected = prev.view(2, BEV_H, BEV_W, DIMS).flip(2).reshape(2, -1, DIMS)
    torch.testing.assert_close(rotated, expected)


def test_refusals():
    with pytest.raises(ValueError, match='decoder belongs to MapTRHead'):
        MapTRPerceptionTransformer(decoder=dict(type='MapTRDecoder'))
    with pytest.raises(NotImplementedError, match='vision'):
        MapTRPerceptionTransformer(modality='fusion')
    with pytest.raises(NotImplementedError, match='operation_order'):
        BEVFormerLayer(operation_order=('norm', 'self_attn', 'norm', 'cross_attn', 'norm', 'ffn'))
    with pytest.raises(ValueError, match='num_bev_queue must be 2'):
        TemporalSelfAttention(num_bev_queue=3)
    with pytest.raises(ValueError, match="op_impl must be 'stock' or 'turbox'"):
        GeometrySptialCrossAttention(op_impl='fast')
    cfg = copy.deepcopy(encoder_cfg())
    cfg['encoder']['transformerlayers']['attn_cfgs'][1]['attention'] = dict(
        type='TemporalSelfAttention', embed_dims=DIMS)
    with pytest.raises(TypeError, match='GeometryKernelAttention'):
        MODELS.build(cfg)


def test_encoder_output_feeds_the_head():
    enc = build_encoders(seed=38)[1]
    head = MODELS.build(dict(
        type='turbox_mm.MapTRHead', num_classes=3, embed_dims=DIMS, bev_h=BEV_H, bev_w=BEV_W,
        num_vec=4, num_pts_per_vec=5, num_pts_per_gt_vec=5, decoder=dict(
            num_layers=2, layer_cfg=dict(
                self_attn_cfg=dict(embed_dims=DIMS, num_heads=2),
                cross_attn_cfg=dict(num_heads=2, num_points=2),
                ffn_cfg=dict(embed_dims=DIMS, feedforward_channels=32)))))
    preds = head(enc(feats(), metas()))
    assert preds['all_pts_preds'].shape == (2, 2, 4, 5, 2)
    preds['all_pts_preds'].sum().backward()
    assert enc.bev_embedding.weight.grad.abs().sum() > 0


def test_layer_norm_order_is_post_norm():
    enc = build_encoders(seed=39)[0]
    layer = enc.encoder.layers[0]
    cam, mask = projection()
    ref = reference_points_2d(BEV_H, BEV_W, 2)
    ref_2d = torch.stack([ref, ref], 1).flatten(0, 1)
    query, pos = randn(2, BEV_H * BEV_W, DIMS, seed=40), randn(2, BEV_H * BEV_W, DIMS, seed=41)
    value = randn(2, CAMS, FEAT_H * FEAT_W, DIMS, seed=42)
    out = layer(query, value, pos, ref_2d, BEV_SHAPES, START, cam, mask, SHAPES, START)
    step = layer.norms[0](layer.attentions[0](query, None, query_pos=pos, reference_points=ref_2d,
                                              spatial_shapes=BEV_SHAPES,
                                              level_start_index=START))
    step = layer.norms[1](layer.attentions[1](step, value, cam, mask, SHAPES, START))
    step = layer.norms[2](layer.ffns[0](step))
    torch.testing.assert_close(out, step)
    assert isinstance(layer.ffns[0].layers[0][1], nn.ReLU)


def test_default_layers_take_the_encoders_dims_and_cameras():
    enc = MapTRPerceptionTransformer(bev_h=BEV_H, bev_w=BEV_W, embed_dims=DIMS, num_cams=CAMS,
                                     op_impl='turbox')
    tsa, sca = enc.encoder.layers[0].attentions
    assert (tsa.embed_dims, sca.embed_dims, sca.attention.embed_dims) == (DIMS, ) * 3
    assert sca.num_cams == CAMS and sca.attention.op_impl == 'turbox'
    assert enc(feats(), metas()).shape == (2, BEV_H * BEV_W, DIMS)
    assert GeometrySptialCrossAttention(embed_dims=DIMS).attention.embed_dims == DIMS
