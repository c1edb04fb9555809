"""MapTR v2's LSSTransform and DepthNet: shapes, geometry against a per-point projection, the
BEV layout against upstream's literal procedure, stock vs turbox (pooling, depth loss), errors.

The Triton pooling kernel runs in the interpreter on CPU tensors (conftest sets
``TRITON_INTERPRET=1``) inside ``dispatch.kernel_on_cpu``; outside it the op falls back to its
PyTorch reference on the CPU.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import no_matrix_products
from turbox_mm.models.maptr import DepthNet, LSSTransform
from turbox_mm.ops import dispatch
from turbox_mm.ops.bev_pool import bev_pool, cell_indices, fallback_reason
from turbox_mm.registry import MODELS

IMAGE, DS = (32, 48), 8
FEAT = (IMAGE[0] // DS, IMAGE[1] // DS)
TINY = dict(in_channels=16, out_channels=8, feat_down_sample=DS,
            pc_range=[-6.0, -12.0, -10.0, 6.0, 12.0, 10.0], voxel_size=[0.5, 0.5, 20.0],
            dbound=[1.0, 13.0, 1.0], downsample=2,
            depthnet_cfg=dict(use_dcn=False, with_cp=False, aspp_mid_channels=4))
D = 12
#: MapTR v2's values (projects/configs/maptrv2/maptrv2_nusc_r50_24ep.py @ 69ab751).
V2 = dict(in_channels=256, out_channels=256, feat_down_sample=32,
          pc_range=[-15.0, -30.0, -10.0, 15.0, 30.0, 10.0], voxel_size=[0.15, 0.15, 20.0],
          dbound=[1.0, 35.0, 0.5], downsample=2, loss_depth_weight=3.0,
          depthnet_cfg=dict(use_dcn=False, with_cp=False, aspp_mid_channels=96),
          grid_config={'x': [-30.0, -30.0, 0.15], 'y': [-15.0, -15.0, 0.15],
                       'z': [-10, 10, 20], 'depth': [1.0, 35.0, 0.5]})


def _rot_z(angle):
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def rig(batch=2, cams=3, seed=0, image=IMAGE, crop=(1.5, -0.5)):
    """Cameras looking outwards around the car, a rescale-rotate-crop image augmentation and
    a lidar rotated and shifted from the ego: the metainfo of NuScenesMapTRAdaptor plus
    RandomScaleMultiViewImage, with ``lidar2img = A K ego2cam lidar2ego``. The augmentation
    acts on pixels (upstream's geometry undoes it after the division by depth), so the 4 x 4
    ``lidar2img`` is a projection only without a crop (MapTR's pipeline only rescales)."""
    rng = np.random.default_rng(seed)
    metas = []
    for b in range(batch):
        lidar2ego = np.eye(4)
        lidar2ego[:3, :3] = _rot_z(rng.uniform(-0.3, 0.3))
        lidar2ego[:3, 3] = [0.9, 0.1, 1.8] + rng.uniform(-0.2, 0.2, 3)
        keys = dict(camera2ego=[], camera_intrinsics=[], img_aug_matrix=[], lidar2img=[])
        for n in range(cams):
            theta = 2 * math.pi * n / cams + 0.2 * b
            forward = [math.cos(theta), math.sin(theta), 0.0]
            right = [math.sin(theta), -math.cos(theta), 0.0]
            cam2ego = np.eye(4)
            cam2ego[:3, :3] = np.stack([right, [0.0, 0.0, -1.0], forward], 1)
            cam2ego[:3, :3] = _rot_z(rng.uniform(-0.1, 0.1)) @ cam2ego[:3, :3]
            cam2ego[:3, 3] = [1.0, 0.2, 1.5] + rng.uniform(-0.3, 0.3, 3)
            k = np.eye(4)
            k[:3, :3] = [[60.0, 0, 48], [0, 60.0, 32], [0, 0, 1]]
            aug = np.eye(4)
            angle = rng.uniform(-0.05, 0.05)
            aug[:2, :2] = 0.5 * np.array([[math.cos(angle), math.sin(angle)],
                                          [-math.sin(angle), math.cos(angle)]])
            aug[:2, 3] = crop
            keys['camera2ego'].append(cam2ego)
            keys['camera_intrinsics'].append(k)
            keys['img_aug_matrix'].append(aug)
            keys['lidar2img'].append(aug @ k @ np.linalg.inv(cam2ego) @ lidar2ego)
        metas.append(dict(keys, lidar2ego=lidar2ego, img_shape=[(*image, 3)] * cams))
    return metas


def features(batch=2, cams=3, channels=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cams, channels, *FEAT, generator=gen)


def sparse_gt_depth(batch=2, cams=3, seed=2, image=IMAGE, fill=0.01, low=0.3, high=14.0):
    """Lidar depth images: a few pixels hit (some below the first bin, some past the last)."""
    gen = torch.Generator().manual_seed(seed)
    depth = torch.rand(batch, cams, *image, generator=gen) * (high - low) + low
    return torch.where(torch.rand(batch, cams, *image, generator=gen) < fill, depth,
                       torch.zeros(()))


def build(seed=0, **kwargs):
    torch.manual_seed(seed)
    return LSSTransform(**dict(TINY, **kwargs))


# -- construction --------------------------------------------------------------------------------


def test_upstream_v2_config_builds_with_upstreams_grid_and_bins():
    vt = MODELS.build(dict(type='turbox_mm.LSSTransform', **V2))
    assert (vt.D, vt.C, vt._cells, vt.bev_h, vt.bev_w) == (68, 256, [200, 400, 1], 200, 100)
    assert vt.depth_net.depth_conv[-1].out_channels == 68
    assert vt.depth_net.context_conv.out_channels == 256
    assert vt.depth_net.depth_conv[3].aspp1.atrous_conv.out_channels == 96
    assert float(vt.get_downsampled_gt_depth(torch.full((1, 1, 32, 32), 1.2)).argmax()) == 0


def test_state_dict_has_upstreams_names_and_no_grid_or_frustum():
    keys = set(build().state_dict())
    for key in ('depth_net.reduce_conv.0.weight', 'depth_net.reduce_conv.1.running_mean',
                'depth_net.bn.weight', 'depth_net.context_mlp.fc1.weight',
                'depth_net.context_se.conv_reduce.weight', 'depth_net.context_conv.bias',
                'depth_net.depth_mlp.fc2.weight', 'depth_net.depth_se.conv_expand.bias',
                'depth_net.depth_conv.0.conv1.weight', 'depth_net.depth_conv.2.bn2.weight',
                'depth_net.depth_conv.3.aspp4.atrous_conv.weight',
                'depth_net.depth_conv.3.global_avg_pool.1.weight',
                'depth_net.depth_conv.3.bn1.bias', 'depth_net.depth_conv.4.weight',
                'downsample.0.weight', 'downsample.4.running_var', 'downsample.6.weight'):
        assert key in keys, key
    assert not any(k.split('.')[0] in ('dx', 'bx', 'nx', 'frustum') for k in keys)
    assert LSSTransform.upstream_key('pts_bbox_head.transformer.encoder.downsample.0.weight') \
        == 'downsample.0.weight'
    for theirs in ('pts_bbox_head.transformer.encoder.dx', 'pts_bbox_head.transformer.'
                   'can_bus_mlp.0.weight', 'pts_bbox_head.transformer.level_embeds'):
        assert LSSTransform.upstream_key(theirs) is None


def test_dcn_layer_sits_between_the_aspp_and_the_last_convolution():
    from mmcv.ops import DeformConv2dPack
    net = DepthNet(16, 16, 8, 5, use_dcn=True, aspp_mid_channels=4)
    assert isinstance(net.depth_conv[4], DeformConv2dPack) and net.depth_conv[4].groups == 4
    assert net.depth_conv[5].out_channels == 5


def _has_node(out, name):
    """Whether ``out``'s autograd graph holds a node whose name starts with ``name``."""
    todo, seen = [out.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__.startswith(name):
            return True
        todo.extend(n for n, _ in node.next_functions)
    return False


def test_aspp_broadcast_pool_equals_the_interpolated_one():
    """The turbox path's ASPP broadcasts the global average where upstream interpolates the
    1x1 map (bilinear, align_corners): bit-identical forward, the same gradients (a sum
    instead of atomic adds); LSSTransform sets it with op_impl='turbox' only, depthnet_cfg
    can say otherwise."""
    from turbox_mm.models.maptr.depth_net import ASPP
    torch.manual_seed(0)
    plain, broadcast = ASPP(8, 4).eval(), ASPP(8, 4, broadcast_pool=True).eval()
    broadcast.load_state_dict(plain.state_dict())
    x = torch.randn(3, 8, 5, 7)
    outs, grads = [], []
    for net in (plain, broadcast):
        xi = x.clone().requires_grad_()
        out = net(xi)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out)
        grads.append([xi.grad] + [p.grad for p in net.parameters()])
    assert torch.equal(outs[0], outs[1])
    assert [_has_node(o, 'UpsampleBilinear') for o in outs] == [True, False]
    for g, w in zip(grads[1], grads[0]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    aspp = [m for m in build(op_impl='turbox').modules() if isinstance(m, ASPP)]
    assert aspp and all(m.broadcast_pool for m in aspp)
    assert not any(m.broadcast_pool for m in build().modules() if isinstance(m, ASPP))
    cfg = dict(TINY['depthnet_cfg'], aspp_broadcast_pool=False)
    assert not any(m.broadcast_pool for m in build(op_impl='turbox', depthnet_cfg=cfg).modules()
                   if isinstance(m, ASPP))


def test_init_weights_makes_every_matrix_xavier_and_keeps_norms():
    vt = build()
    vt.init_weights()
    for name, p in vt.named_parameters():
        if p.dim() > 1:
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(p)
            assert float(p.detach().abs().max()) <= math.sqrt(6.0 / (fan_in + fan_out)) + 1e-6, name
    assert torch.equal(vt.depth_net.bn.weight, torch.ones(22))


# -- geometry ------------------------------------------------------------------------------------


def _geometry(vt, metas):
    mats = vt.matrices(metas, 3, torch.zeros(()))
    frustum = vt.frustum(metas, FEAT, torch.device('cpu'))
    return frustum, vt.get_geometry(frustum, mats['camera2ego'], mats['camera_intrinsics'],
                                    mats['img_aug_matrix'], mats['lidar2ego'])


@pytest.mark.parametrize('op_impl', ['stock', 'turbox'])
def test_geometry_projects_back_onto_its_pixel_and_depth(op_impl):
    vt = build(op_impl=op_impl)
    # MapTR's augmentation (rescale, here with a rotation too): through lidar2img
    metas = rig(crop=(0.0, 0.0))
    frustum, geom = _geometry(vt, metas)
    assert geom.shape == (2, 3, D, *FEAT, 3) and geom.dtype == torch.float32
    want = frustum.double().numpy()
    pts = np.concatenate([geom.double().numpy(), np.ones((*geom.shape[:-1], 1))], -1)
    for b, meta in enumerate(metas):
        for n, lidar2img in enumerate(meta['lidar2img']):
            img = pts[b, n] @ np.asarray(lidar2img).T  # [D, fH, fW, 4]
            uvd = np.concatenate([img[..., :2] / img[..., 2:3], img[..., 2:3]], -1)
            np.testing.assert_allclose(uvd, want, rtol=1e-5, atol=2e-3)
    # with a crop: lidar -> ego -> camera -> K, divide by depth, then the pixel augmentation
    metas = rig(crop=(1.5, -0.5))
    frustum, geom = _geometry(vt, metas)
    pts = np.concatenate([geom.double().numpy(), np.ones((*geom.shape[:-1], 1))], -1)
    for b, meta in enumerate(metas):
        for n in range(3):
            cam = pts[b, n] @ (np.linalg.inv(meta['camera2ego'][n]) @ meta['lidar2ego']).T
            pix = cam[..., :3] @ np.asarray(meta['camera_intrinsics'][n])[:3, :3].T
            uv = pix[..., :2] / pix[..., 2:3]
            aug = np.asarray(meta['img_aug_matrix'][n])
            uv = uv @ aug[:2, :2].T + aug[:2, 3]
            uvd = np.concatenate([uv, cam[..., 2:3]], -1)
            np.testing.assert_allclose(uvd, want, rtol=1e-5, atol=2e-3)
    # the frustum spans the padded image: u in [0, W - 1], v in [0, H - 1], d = arange(dbound)
    assert frustum[..., 0].max() == IMAGE[1] - 1 and frustum[..., 1].max() == IMAGE[0] - 1
    assert frustum[:, 0, 0, 2].tolist() == list(np.arange(1.0, 13.0, 1.0))


def test_turbox_matrices_equal_stocks_exactly_and_geometry_within_rounding():
    stock, turbox = build(), build(op_impl='turbox')
    metas = rig()
    a = stock.matrices(metas, 3, torch.zeros(()))
    b = turbox.matrices(metas, 3, torch.zeros(()))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype == torch.float32 and torch.equal(a[key], b[key]), key
    frustum = stock.frustum(metas, FEAT, torch.device('cpu'))
    geoms = [vt.get_geometry(frustum, m['camera2ego'], m['camera_intrinsics'],
                             m['img_aug_matrix'], m['lidar2ego'])
             for vt, m in ((stock, a), (turbox, b))]
    # the turbox path rotates by multiply-adds, not matmul: the same sums, rounded in
    # another order (a few float32 ulps of the largest coordinate)
    bound = 8 * torch.finfo(torch.float32).eps * float(geoms[0].abs().max())
    assert float((geoms[1] - geoms[0]).abs().max()) <= bound
    with no_matrix_products():  # the multiply-adds ran, TF32 cannot round them
        turbox.get_geometry(frustum, b['camera2ego'], b['camera_intrinsics'],
                            b['img_aug_matrix'], b['lidar2ego'])


def test_frustum_is_cached_per_image_size():
    vt = build()
    f1 = vt.frustum(rig(), FEAT, torch.device('cpu'))
    assert vt.frustum(rig(seed=3), FEAT, torch.device('cpu')) is f1
    f2 = vt.frustum(rig(image=(40, 56)), (5, 7), torch.device('cpu'))
    assert f2.shape == (D, 5, 7, 3) and len(vt._frusta) == 2


# -- forward -------------------------------------------------------------------------------------


def test_forward_shapes_and_depth_probabilities():
    vt = build().train()
    bev, depth = vt([features()], rig())
    assert bev.shape == (2, vt.bev_h * vt.bev_w, 8) == (2, 24 * 12, 8)
    assert bev.dtype == depth.dtype == torch.float32 and bev.is_contiguous()
    assert depth.shape == (2, 3, D, *FEAT)
    torch.testing.assert_close(depth.sum(2), torch.ones(2, 3, *FEAT))
    # the last level is lifted by default; another with feat_down_sample_indice
    vt0 = build(feat_down_sample_indice=0).eval()
    out = vt0([features(), torch.randn(2, 3, 16, 2, 3)], rig())
    assert out[0].shape == (2, 288, 8)


def _upstream_literal_bev(vt, net, geom, batch, cams):
    """Upstream's get_cam_feats, BaseTransform.bev_pool (its gen_dx_bx tensors, .long(), the
    kept filter, a scatter into [B, C, Z, X, Y], z collapsed), its permute(0, 1, 3, 2) and
    lss_bev_encode's flattening, written out independently."""
    c = vt.C
    depth = net[:, :D].softmax(dim=1)
    x = depth.unsqueeze(1) * net[:, D:D + c].unsqueeze(2)
    x = x.view(batch, cams, c, D, *FEAT).permute(0, 1, 3, 4, 5, 2).reshape(-1, c)
    rows = [vt.xbound, vt.ybound, vt.zbound]
    dx = torch.Tensor([r[2] for r in rows])
    bx = torch.Tensor([r[0] + r[2] / 2.0 for r in rows])
    nx = [int((r[1] - r[0]) / r[2]) for r in rows]
    cell = ((geom - (bx - dx / 2.0)) / dx).long().view(-1, 3)
    bidx = torch.arange(batch).repeat_interleave(cell.shape[0] // batch)
    kept = ((cell[:, 0] >= 0) & (cell[:, 0] < nx[0]) & (cell[:, 1] >= 0) &
            (cell[:, 1] < nx[1]) & (cell[:, 2] >= 0) & (cell[:, 2] < nx[2]))
    acc = torch.zeros(batch, nx[2], nx[0], nx[1], c)
    acc.index_put_((bidx[kept], cell[kept, 2], cell[kept, 0], cell[kept, 1]), x[kept],
                   accumulate=True)
    final = torch.cat(acc.permute(0, 4, 1, 2, 3).unbind(dim=2), 1)  # [B, Z*C, X, Y]
    final = final.permute(0, 1, 3, 2).contiguous()
    return final.view(batch, c, -1).permute(0, 2, 1), depth


def test_stock_forward_equals_upstreams_literal_procedure():
    vt = build(downsample=1).eval()
    metas = rig()
    captured = {}
    vt.depth_net.register_forward_hook(lambda mod, inp, out: captured.setdefault('net', out))
    bev, depth = vt([features()], metas)
    mats = vt.matrices(metas, 3, torch.zeros(()))
    geom = vt.get_geometry(vt.frustum(metas, FEAT, torch.device('cpu')), mats['camera2ego'],
                           mats['camera_intrinsics'], mats['img_aug_matrix'],
                           mats['lidar2ego'])
    want, want_depth = _upstream_literal_bev(vt, captured['net'], geom, 2, 3)
    assert bev.shape == want.shape == (2, 48 * 24, 8)
    assert float(want.abs().sum()) > 0 and int((want.abs().sum(-1) > 0).sum()) > 50
    torch.testing.assert_close(bev, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(depth, want_depth.view(2, 3, D, *FEAT))


@pytest.mark.parametrize('impl', ['stock', 'turbox'])
def test_bev_rows_run_along_y_from_its_lower_bound(impl):
    vt = build(downsample=1, bev_pool_impl=impl)
    logits = torch.zeros(1, 1, D, 1, 1)
    context = torch.ones(1, 1, 8, 1, 1)
    geom = torch.tensor([-5.9, 11.9, 0.0]).expand(1, 1, D, 1, 1, 3)  # x cell 0, y cell 47
    bev = vt.pool(logits, logits.softmax(2), context, geom)
    assert bev.shape == (1, 8, 48, 24)
    hot = bev.sum(1)[0].nonzero().tolist()
    assert hot == [[47, 0]]  # row = y cell, column = x cell
    query = bev.flatten(2).transpose(1, 2)[0].sum(-1).nonzero().flatten().tolist()
    assert query == [47 * 24 + 0]
    torch.testing.assert_close(bev[0, :, 47, 0], torch.ones(8))


def _pair(**kwargs):
    stock = build(**kwargs).eval()
    turbox = build(op_impl='turbox', **kwargs).eval()
    turbox.load_state_dict(stock.state_dict())
    return stock, turbox


def _run(vt, feats, metas, gt):
    x = feats.clone().requires_grad_(True)
    bev, depth = vt([x], metas)
    loss = bev.square().sum() + vt.get_depth_loss(gt, depth)
    vt.zero_grad()
    loss.backward()
    return bev, depth, x.grad, {n: p.grad.clone() for n, p in vt.named_parameters()}


@pytest.mark.parametrize('kernel', [False, True])
def test_stock_and_turbox_give_the_same_bev_depth_and_gradients(kernel):
    stock, turbox = _pair()
    metas, feats, gt = rig(), features(), sparse_gt_depth(fill=0.05)
    want = _run(stock, feats, metas, gt)
    if kernel:
        with dispatch.kernel_on_cpu():
            got = _run(turbox, feats, metas, gt)
    else:
        got = _run(turbox, feats, metas, gt)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2], want[2], rtol=1e-3, atol=1e-5)
    for name, grad in want[3].items():
        torch.testing.assert_close(got[3][name], grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize('kernel', [False, True])
def test_pooling_alone_stock_equals_turbox_forward_and_backward(kernel):
    stock = build(downsample=1)
    turbox = build(downsample=1, bev_pool_impl='turbox')
    assert turbox.op_impl == 'stock' and turbox.bev_pool_impl == 'turbox'
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, D, *FEAT, generator=gen)
    context = torch.randn(2, 3, 8, *FEAT, generator=gen)
    geom = (torch.rand(2, 3, D, *FEAT, 3, generator=gen) * 2 - 1) * torch.tensor([7., 13, 9])
    grads = []
    for vt in (stock, turbox):
        lg, cx = logits.clone().requires_grad_(True), context.clone().requires_grad_(True)
        if kernel and vt is turbox:
            with dispatch.kernel_on_cpu():
                out = vt.pool(lg, lg.softmax(2), cx, geom)
                (out * torch.arange(out.numel()).view(out.shape).sin()).sum().backward()
        else:
            out = vt.pool(lg, lg.softmax(2), cx, geom)
            (out * torch.arange(out.numel()).view(out.shape).sin()).sum().backward()
        grads.append((out.detach(), lg.grad, cx.grad))
    assert grads[0][0].shape == (2, 8, 48, 24) and float(grads[0][0].abs().sum()) > 0
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_turbox_cells_are_upstreams_on_maptr_v2_grid():
    """trunc((p - (bx - dx/2)) / dx) in float32, filtered to [0, n): the op (reference and
    kernel) against upstream's expression at cell boundaries (exact and one ulp either side),
    below the lower bound (-1 < v < 0: cell 0, kept) and on the upper bound (dropped)."""
    vt = LSSTransform(**dict(V2, in_channels=8, out_channels=4))
    lower = torch.tensor(vt._lower)
    step = torch.tensor(vt._cell)
    k = torch.arange(-2, 203, dtype=torch.float32)
    xs = lower[0] + k * step[0]
    xs = torch.cat([xs, torch.nextafter(xs, xs + 1), torch.nextafter(xs, xs - 1),
                    torch.tensor([-15.1, -15.149, -15.0, 15.0, 14.99])])
    gen = torch.Generator().manual_seed(0)
    ys = lower[1] + torch.randint(-2, 403, xs.shape, generator=gen).float() * step[1]
    ys = torch.nextafter(ys, ys + torch.randint(-1, 2, xs.shape, generator=gen).float())
    zs = torch.tensor([-10.5, -10.0, 0.0, 9.99, 10.0, 10.01])[torch.arange(xs.numel()) % 6]
    geom = torch.stack([xs, ys, zs], -1)
    count = geom.shape[0]
    # upstream's expression
    dx = torch.Tensor([0.15, 0.15, 20.0])
    bx = torch.Tensor([-15 + 0.075, -30 + 0.075, -10 + 10.0])
    cell = ((geom - (bx - dx / 2.0)) / dx).long()
    kept = ((cell >= 0) & (cell < torch.tensor([200, 400, 1]))).all(-1)
    assert 0 < int(kept.sum()) < count
    got, got_kept = cell_indices(geom.view(1, 1, 1, 1, count, 3), vt._lower, vt._cell,
                                 vt._cells)
    assert torch.equal(got_kept.flatten(), kept)
    flat = (cell[:, 0] * 400 + cell[:, 1]) * 1 + cell[:, 2]
    assert torch.equal(got.flatten()[kept], flat[kept])
    # the pooled op, kernel and reference, with (1, point index) features: the same cells
    feats = torch.stack([torch.ones(count), torch.arange(count, dtype=torch.float32)])
    feats = feats.view(1, 1, 2, 1, count)
    ones = torch.ones(1, 1, 1, 1, count)
    want = torch.zeros(200 * 400, 2)
    want.index_add_(0, flat[kept], feats[0, 0, :, 0].t()[kept])
    for on_kernel in (False, True):
        if on_kernel:
            with dispatch.kernel_on_cpu():
                out = bev_pool(ones, feats, geom.view(1, 1, 1, 1, count, 3), vt._lower,
                               vt._cell, vt._cells)
        else:
            out = bev_pool(ones, feats, geom.view(1, 1, 1, 1, count, 3), vt._lower,
                           vt._cell, vt._cells)
        torch.testing.assert_close(out.permute(0, 2, 3, 1).reshape(-1, 2), want, rtol=0,
                                   atol=0)


def test_turbox_on_the_cpu_falls_back_to_the_reference_and_trains():
    vt = build(op_impl='turbox').train()
    feats = features().requires_grad_(True)
    assert fallback_reason(feats) is not None  # no CUDA: the op's reference runs
    bev, depth = vt([feats], rig())
    loss = bev.mean() + vt.get_depth_loss(sparse_gt_depth(), depth)
    loss.backward()
    assert torch.isfinite(loss) and feats.grad.abs().sum() > 0
    assert all(p.grad is not None for p in vt.depth_net.parameters())


def test_with_cp_gives_the_same_values_and_gradients():
    plain = build().train()
    cp = build(depthnet_cfg=dict(TINY['depthnet_cfg'], with_cp=True)).train()
    cp.load_state_dict(plain.state_dict())
    outs = []
    for vt in (plain, cp):
        torch.manual_seed(7)  # the ASPP's dropout
        outs.append(_run(vt, features(), rig(), sparse_gt_depth()))
    torch.testing.assert_close(outs[1][0], outs[0][0])
    torch.testing.assert_close(outs[1][2], outs[0][2])


# -- depth loss ----------------------------------------------------------------------------------


def plain_depth_loss(gt, depth, ds, depth_cfg, bins, weight):
    """docs/design/maptr.md 3.2, one patch at a time: the smallest non-zero depth, bin
    k = trunc((d - (min - step)) / step) when 0 <= . < bins + 1 (else 0), no label for k = 0;
    -log p(bin k - 1) (log clamped at -100) summed over labelled patches / max(1, count)."""
    low, _, step = depth_cfg
    total, count = 0.0, 0
    batch, cams, height, width = gt.shape
    for b in range(batch):
        for n in range(cams):
            for i in range(height // ds):
                for j in range(width // ds):
                    patch = gt[b, n, i * ds:(i + 1) * ds, j * ds:(j + 1) * ds]
                    hits = patch[patch != 0]
                    if hits.numel() == 0:
                        continue
                    v = float((hits.min() - (low - step)) / step)  # float32, as upstream
                    k = int(v) if 0 <= v < bins + 1 else 0
                    if k == 0:
                        continue
                    total += -max(math.log(float(depth[b, n, k - 1, i, j])), -100.0)
                    count += 1
    return weight * total / max(1, count), count


def _loss_pair(dbound):
    stock = build(dbound=dbound)
    turbox = build(dbound=dbound, op_impl='turbox')
    return stock, turbox


def _probs(bins, batch=2, cams=3, seed=4):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, cams, bins, *FEAT, generator=gen) * 2).softmax(2)


def _loss_and_grad(vt, gt, probs):
    p = probs.clone().requires_grad_(True)
    loss = vt.get_depth_loss(gt, p)
    loss.backward()
    return loss.detach(), p.grad


@pytest.mark.parametrize('dbound', [[1.0, 13.0, 1.0], [1.0, 35.0, 0.5]])
@pytest.mark.parametrize('case', ['random', 'partly_empty', 'empty', 'edges'])
def test_depth_loss_stock_equals_turbox_and_the_plain_definition(dbound, case):
    stock, turbox = _loss_pair(dbound)
    bins = stock.D
    top = dbound[1]
    gt = sparse_gt_depth(fill=0.03, high=top + 2.0)
    if case == 'partly_empty':
        gt[0, 1] = 0  # a camera without points
        gt[1, :, :DS] = 0.7  # a patch row below the first bin: label 0, dropped
        gt[1, :, DS:2 * DS] = top + 5.0  # past the last bin: dropped
    elif case == 'empty':
        gt = torch.zeros_like(gt)
    elif case == 'edges':  # bin edges and the ends of the range
        gt = torch.zeros_like(gt)
        edges = [dbound[0], dbound[0] + dbound[2], top - dbound[2], top - 1e-3, top,
                 dbound[0] - 1e-3, 0.5 * dbound[0]]
        for idx in range(2 * 3 * FEAT[0] * FEAT[1]):
            b, rest = divmod(idx, 3 * FEAT[0] * FEAT[1])
            n, rest = divmod(rest, FEAT[0] * FEAT[1])
            i, j = divmod(rest, FEAT[1])
            gt[b, n, i * DS + idx % DS, j * DS + (idx * 3) % DS] = edges[idx % len(edges)]
    probs = _probs(bins)
    want, count = plain_depth_loss(gt, probs, DS, dbound, bins, 3.0)
    loss_s, grad_s = _loss_and_grad(stock, gt, probs)
    loss_t, grad_t = _loss_and_grad(turbox, gt, probs)
    assert loss_s.dtype == loss_t.dtype == torch.float32 and loss_t.dim() == 0
    torch.testing.assert_close(loss_t, loss_s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_t, grad_s, rtol=1e-5, atol=1e-7)
    assert float(loss_s) == pytest.approx(want, rel=1e-5, abs=1e-6)
    if case == 'empty':
        assert count == 0 and float(loss_s) == 0.0 and float(loss_t) == 0.0
        assert not grad_s.any() and not grad_t.any()
    else:
        assert count > 5 and float(loss_s) > 0
        # the gradient reaches only the labelled patches' true bins
        assert int((grad_s != 0).sum()) == count


def test_depth_loss_with_a_zero_probability_on_the_true_bin():
    stock, turbox = _loss_pair(TINY['dbound'])
    gt = torch.zeros(2, 3, *IMAGE)
    gt[0, 0, 0, 0] = 3.5  # bin column 2 of pixel (0, 0)
    gt[1, 2, 9, 17] = 7.2  # column 6 of pixel (1, 2)
    probs = _probs(D)
    probs[0, 0, :, 0, 0] = torch.nn.functional.one_hot(torch.tensor(0), D).float()
    loss_s, grad_s = _loss_and_grad(stock, gt, probs)
    loss_t, grad_t = _loss_and_grad(turbox, gt, probs)
    assert float(loss_s) == pytest.approx(3.0 * (100.0 - math.log(float(probs[1, 2, 6, 1, 2])))
                                          / 2)
    torch.testing.assert_close(loss_t, loss_s)
    assert torch.isfinite(grad_t).all() and torch.isfinite(grad_s).all()
    torch.testing.assert_close(grad_t, grad_s)


def test_depth_loss_accepts_flattened_depth_and_runs_in_float32_under_autocast():
    stock, turbox = _loss_pair(TINY['dbound'])
    gt, probs = sparse_gt_depth(), _probs(D)
    want = stock.get_depth_loss(gt, probs)
    for vt in (stock, turbox):
        torch.testing.assert_close(vt.get_depth_loss(gt, probs.flatten(0, 1)), want)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss = vt.get_depth_loss(gt.bfloat16(), probs)
        assert loss.dtype == torch.float32
    assert float(stock.get_depth_loss(gt, None)) == 0.0


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize('op_impl', ['stock', 'turbox'])
def test_features_that_do_not_match_img_shape_are_named(op_impl):
    vt = build(op_impl=op_impl)
    with pytest.raises(ValueError, match=r'img_shape 40 x 48 // feat_down_sample 8 is 5 x 6'):
        vt([features()], rig(image=(40, 48)))
    with pytest.raises(ValueError, match='img_shape 32 x 64'):
        vt([features()], rig(image=(32, 64)))


def test_bad_metas_and_depth_inputs_are_named():
    vt = build()
    metas = rig()
    del metas[1]['lidar2ego']
    with pytest.raises(KeyError, match="sample 1 lacks 'lidar2ego'"):
        vt([features()], metas)
    metas = rig()
    metas[0]['camera2ego'] = metas[0]['camera2ego'][:2]
    with pytest.raises(ValueError, match=r'camera2ego must be \(3, 4, 4\)'):
        vt([features()], metas)
    with pytest.raises(ValueError, match='img_metas for a batch'):
        vt([features()], rig(batch=1))
    with pytest.raises(ValueError, match='multiple of feat_down_sample'):
        vt.get_depth_loss(torch.zeros(2, 3, 30, 48), _probs(D))
    with pytest.raises(ValueError, match='depth must be'):
        vt.get_depth_loss(torch.zeros(2, 3, *IMAGE), _probs(D)[:, :, :5])
    with pytest.raises(ValueError, match='gt_depth gives'):
        vt.get_depth_loss(torch.zeros(2, 3, *IMAGE), _probs(D, batch=1))


@pytest.mark.parametrize('change, match', [
    (dict(downsample=3), 'downsample must be 1 or 2'),
    (dict(op_impl='fast'), "op_impl must be 'stock' or 'turbox'"),
    (dict(bev_pool_impl='cuda'), "op_impl must be 'stock' or 'turbox'"),
    (dict(dbound=[1.0, 13.5, 1.0]), 'gives 13 depth bins'),
    (dict(grid_config=dict(x=[0, 1, 1])), "grid_config needs 'depth'"),
    (dict(voxel_size=[0.5, 0.5, 5.0]), 'needs one z cell')])
def test_bad_arguments_are_named(change, match):
    with pytest.raises(ValueError, match=match):
        LSSTransform(**dict(TINY, **change))


# -- CUDA ----------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_on_cuda_turbox_equals_stock_and_its_depth_loss_waits_for_nothing():
    """On the GPU: the compiled pooling kernel, the pinned upload and the sync-free inverses
    give stock's BEV, depth and gradients; the turbox depth loss runs under CUDA's sync debug
    mode set to 'error' (stock's boolean indexing would raise there)."""
    stock, turbox = _pair()
    stock, turbox = stock.cuda(), turbox.cuda()
    metas, feats, gt = rig(), features().cuda(), sparse_gt_depth(fill=0.05).cuda()
    out_stock, out_turbox = _run(stock, feats, metas, gt), _run(turbox, feats, metas, gt)
    for name, a, b in zip(('bev', 'depth', 'grad'), out_stock[:3], out_turbox[:3]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=name)
    for name, grad in out_stock[3].items():
        torch.testing.assert_close(out_turbox[3][name], grad, rtol=1e-3, atol=1e-4, msg=name)
    probs = _probs(D).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        loss = turbox.get_depth_loss(gt, probs)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(loss, stock.get_depth_loss(gt, probs), rtol=1e-5, atol=1e-6)
