"""The BEVFusion detector on the CPU: voxelization (stock vs turbox), a lidar-only training
step and prediction at tiny sizes."""
import copy

import pytest
import torch
from mmdet3d.structures import Det3DDataSample, LiDARInstance3DBoxes

from test_bevfusion_head import PCR, gt_boxes, head_cfg
from turbox_mm.registry import MODELS

VOXEL = [0.8, 0.8, 0.2]


def lidar_only(op_impl='stock'):
    return dict(
        type='turbox_mm.BEVFusion', op_impl=op_impl,
        data_preprocessor=dict(
            type='mmdet3d.Det3DDataPreprocessor', pad_size_divisor=32,
            voxelize_cfg=dict(max_num_points=10, point_cloud_range=PCR, voxel_size=VOXEL,
                              max_voxels=[3000, 4000], voxelize_reduce=True)),
        pts_voxel_encoder=dict(type='mmdet3d.HardSimpleVFE', num_features=5),
        pts_middle_encoder=dict(
            type='turbox_mm.BEVFusionSparseEncoder', in_channels=5, sparse_shape=[64, 64, 41],
            order=('conv', 'norm', 'act'), norm_cfg=dict(type='BN1d', eps=1e-3, momentum=0.01),
            encoder_channels=((8, 8, 16), (16, 16, 32), (32, 32, 64), (64, 64)),
            encoder_paddings=((0, 0, 1), (0, 0, 1), (0, 0, (1, 1, 0)), (0, 0)),
            output_channels=64, base_channels=8, block_type='basicblock'),
        pts_backbone=dict(type='mmdet3d.SECOND', in_channels=128, out_channels=[32, 64],
                          layer_nums=[1, 1], layer_strides=[1, 2],
                          norm_cfg=dict(type='BN', eps=1e-3, momentum=0.01),
                          conv_cfg=dict(type='Conv2d', bias=False)),
        pts_neck=dict(type='mmdet3d.SECONDFPN', in_channels=[32, 64], out_channels=[32, 32],
                      upsample_strides=[1, 2], norm_cfg=dict(type='BN', eps=1e-3, momentum=0.01),
                      upsample_cfg=dict(type='deconv', bias=False), use_conv_for_no_stride=True),
        bbox_head=head_cfg(in_channels=64))


def clouds(batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in range(batch):
        pts = torch.rand(3000 + 500 * b, 5, generator=gen)
        pts[:, :3] = pts[:, :3] * torch.tensor([56.0, 56.0, 9.0]) - torch.tensor([28, 28, 5.5])
        out.append(pts)
    return out


def samples(batch=2):
    out = []
    for b in range(batch):
        sample = Det3DDataSample(metainfo=dict(box_type_3d=LiDARInstance3DBoxes, sample_idx=b))
        sample.gt_instances_3d = gt_boxes(3, seed=b)
        out.append(sample)
    return out


def test_turbox_voxelization_equals_the_per_sample_stock_one():
    torch.manual_seed(0)
    stock = MODELS.build(lidar_only('stock'))
    turbox = MODELS.build(lidar_only('turbox'))
    pts = clouds()
    for training in (True, False):
        stock.train(training)
        turbox.train(training)
        got, want = turbox.voxelize(pts), stock.voxelize(pts)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    feats, coords, sizes = want
    assert coords[:, 0].tolist() == sorted(coords[:, 0].tolist())  # (batch, x, y, z)
    x_index = ((pts[0][:, 0] - PCR[0]) / VOXEL[0]).floor()
    assert int(coords[coords[:, 0] == 0, 1].max()) <= int(x_index.max())


@pytest.mark.parametrize('op_impl', ['stock', 'turbox'])
def test_a_lidar_only_training_step_and_prediction(op_impl):
    torch.manual_seed(0)
    model = MODELS.build(lidar_only(op_impl))
    model.init_weights()
    model.train()
    inputs = dict(points=clouds())
    losses = model.loss(inputs, samples())
    total, log = model.parse_losses(losses)
    assert 'matched_ious' in log and torch.isfinite(total)
    total.backward()
    model.eval()
    with torch.no_grad():
        results = model.predict(inputs, samples())
    assert len(results) == 2
    assert isinstance(results[0].pred_instances_3d.bboxes_3d, LiDARInstance3DBoxes)


def test_stock_and_turbox_models_give_the_same_losses():
    torch.manual_seed(0)
    stock = MODELS.build(lidar_only('stock'))
    turbox = MODELS.build(lidar_only('turbox'))
    turbox.load_state_dict(stock.state_dict())
    stock.eval()  # no dropout; BN in eval for an exact comparison
    turbox.eval()
    inputs = dict(points=clouds(seed=1))
    want = stock.loss(copy.deepcopy(inputs), samples())
    got = turbox.loss(copy.deepcopy(inputs), samples())
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)


def test_bad_configs_are_named():
    cfg = lidar_only()
    cfg['data_preprocessor'] = dict(type='mmdet3d.Det3DDataPreprocessor')
    with pytest.raises(KeyError, match='needs voxelize_cfg'):
        MODELS.build(cfg)
    cfg = lidar_only()
    cfg['img_backbone'] = dict(type='mmdet.ResNet', depth=18)
    with pytest.raises(ValueError, match='come together'):
        MODELS.build(cfg)


@pytest.mark.parametrize('op_impl, order', [
    ('turbox', ['voxels', 'camera', 'encoder']), ('stock', ['camera', 'voxels', 'encoder'])])
def test_turbox_voxelizes_before_the_camera_branch(op_impl, order):
    """The turbox step voxelizes (its one host read, the voxel count) before launching the
    camera branch, whose kernels the read would otherwise wait for; stock keeps upstream's
    order. The camera branch is a stand-in here; the fusion gets camera first either way."""

    class CameraFirst(torch.nn.Module):
        def forward(self, features):
            assert [f.shape[0] for f in features] == [1, 2]  # camera stand-in, then lidar
            return features[-1]

    model = MODELS.build(lidar_only(op_impl)).train()
    calls, real_voxels = [], model.batch_voxels
    model.batch_voxels = lambda points: calls.append('voxels') or real_voxels(points)
    model.img_backbone = torch.nn.Identity()  # not None: the camera branch runs
    model.extract_img_feat = lambda imgs, points, metas: calls.append('camera') or imgs[:1]
    model.fusion_layer = CameraFirst()
    model.pts_middle_encoder.register_forward_pre_hook(lambda *args: calls.append('encoder'))
    data = model.data_preprocessor(dict(inputs=dict(points=clouds()), data_samples=samples()),
                                   True)
    inputs = dict(data['inputs'], imgs=torch.zeros(1, 1, 3, 8, 8))
    model.extract_feat(inputs, [s.metainfo for s in data['data_samples']])
    assert calls == order


@pytest.mark.parametrize('op_impl', ['stock', 'turbox'])
def test_a_last_sample_without_points_in_range_trains_with_an_empty_bev(op_impl):
    torch.manual_seed(0)
    model = MODELS.build(lidar_only(op_impl)).train()
    pts = clouds()
    pts[1][:, 0] += 100.0  # every point of the last sample outside the range
    data = model.data_preprocessor(dict(inputs=dict(points=pts), data_samples=samples()), True)
    if op_impl == 'stock':
        with pytest.warns(UserWarning, match=r'sample\(s\) \[1\] of the batch \(of 2\) have no '
                                             r'points in the point cloud range'):
            bev = model.extract_pts_feat(data['inputs'])
    else:
        bev = model.extract_pts_feat(data['inputs'])
    assert bev.shape[0] == 2 and bev[1].abs().sum() == 0 and bev[0].abs().sum() > 0
    losses = model.loss(data['inputs'], data['data_samples'])
    assert all(torch.isfinite(v).all() for v in losses.values())


class _Camera(torch.nn.Module):
    """A camera branch stand-in with a weight: ``[B, 8, X, Y]`` from a conv over a fixed map."""

    def __init__(self, size):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.register_buffer('bev', torch.randn(2, 4, *size, generator=torch.Generator()
                                                .manual_seed(3)))

    def forward(self, imgs, points, metas):
        return self.conv(self.bev)


def with_camera(op_impl, overlap_lidar=True):
    """The tiny lidar model with a stand-in camera branch and a real ``ConvFuser``."""
    torch.manual_seed(0)
    cfg = lidar_only(op_impl)
    cfg.update(overlap_lidar=overlap_lidar,
               fusion_layer=dict(type='turbox_mm.ConvFuser', in_channels=[8, 128],
                                 out_channels=128))
    model = MODELS.build(cfg)
    model.img_backbone = torch.nn.Identity()  # not None: the camera branch runs
    model.camera = _Camera((8, 8))
    model.extract_img_feat = model.camera.forward
    return model


@pytest.mark.parametrize('op_impl, overlap, side', [
    ('turbox', True, True), ('turbox', False, False), ('stock', True, False)])
def test_the_turbox_sparse_encoder_runs_on_a_side_stream_after_the_camera_branch(
        monkeypatch, op_impl, overlap, side):
    """Wiring, on the CPU (where no side stream exists, ``mark_ready`` is faked): the turbox
    model with a camera branch hands the sparse encoder to ``run_on_side_stream``, started
    from the mark made right after voxelization; stock and ``overlap_lidar=False`` do not."""
    from turbox_mm.models.bevfusion import bevfusion as module
    calls = []
    real_voxels = module.BEVFusion.batch_voxels
    monkeypatch.setattr(module.BEVFusion, 'batch_voxels',
                        lambda self, p: calls.append('voxels') or real_voxels(self, p))
    monkeypatch.setattr(module, 'mark_ready', lambda t: calls.append('mark') or 'ready')

    def side_run(region, inputs, ready):
        calls.append(('side', ready))
        return region(*inputs)

    monkeypatch.setattr(module, 'run_on_side_stream', side_run)
    model = with_camera(op_impl, overlap).train()
    model.pts_middle_encoder.register_forward_pre_hook(lambda *args: calls.append('encoder'))
    real_camera = model.extract_img_feat
    model.extract_img_feat = lambda *a: calls.append('camera') or real_camera(*a)
    data = model.data_preprocessor(dict(inputs=dict(points=clouds()), data_samples=samples()),
                                   True)
    inputs = dict(data['inputs'], imgs=torch.zeros(2, 1, 3, 8, 8))
    losses = model.loss(inputs, data['data_samples'])
    assert torch.isfinite(sum(v for k, v in losses.items() if 'loss' in k))
    if side:
        assert calls == ['voxels', 'mark', 'camera', ('side', 'ready'), 'encoder']
    else:
        assert 'mark' not in calls and not any(isinstance(c, tuple) for c in calls)
    # lidar only: nothing to overlap with, no side stream
    calls.clear()
    model.img_backbone = None
    model.fusion_layer = None  # the lidar BEV has the fuser's 128 channels: same backbone
    model.loss(dict(points=data['inputs']['points']), data['data_samples'])
    assert 'mark' not in calls


@pytest.mark.cuda
def test_on_cuda_the_side_stream_gives_the_losses_and_gradients_of_one_stream(monkeypatch):
    """The turbox model with a camera branch, in training mode, ``overlap_lidar`` on and off,
    same weights and batch. Delays make a missing wait show: the voxel features are finished
    late on the main stream after the mark's point (the encoder must wait for them), the
    encoder's output late on the side stream (the fuser must wait for it), and the gradient
    into the encoder late on the side stream (the main stream's reads of the encoder's
    gradients must wait for it). A missing wait reads unfinished memory: losses or gradients
    off by their own size.

    The bounds are those of the model's own run-to-run spread on CUDA: the tiny model is not
    deterministic in training mode (sparse convolution's backward adds in another order each
    run). On an H100 (2026-12-07) two one-stream runs differed by up to 4e-5 in a loss and
    17% (relative norm) in an encoder BatchNorm bias's gradient; a side-stream run differed
    from a one-stream run by 16% there, and by 115% in the gradient of a decoder LayerNorm
    bias of the head (a small sum over the proposals, with cancellations). What the side
    stream can get wrong is bounded where it shows: a forward read before its wait moves the
    losses by their own size (bound 1e-3), a backward read before its wait the encoder's
    gradients (bound 0.5 per encoder tensor: an unfinished gradient is off by about its own
    norm). The bound over all parameters together is loose (0.3)."""
    from test_side_stream import _LateBackward

    from conftest import assert_same_gradients
    from turbox_mm.models.bevfusion import bevfusion as module
    real_voxels = module.BEVFusion.batch_voxels

    def late_voxels(self, points):
        feats, coords, batch_size = real_voxels(self, points)
        torch.cuda._sleep(50_000_000)
        return feats * 1.0, coords, batch_size  # made after the sleep, on the main stream

    monkeypatch.setattr(module.BEVFusion, 'batch_voxels', late_voxels)
    results = []
    for overlap in (True, False):
        model = with_camera('turbox', overlap).cuda().train()
        streams = []

        def late_output(mod, args, out):
            streams.append(torch.cuda.current_stream())
            torch.cuda._sleep(50_000_000)
            return _LateBackward.apply(out)  # made after the sleep, on the encoder's stream

        model.pts_middle_encoder.register_forward_hook(late_output)
        points = [p.cuda() for p in clouds(seed=1)]
        data = model.data_preprocessor(dict(inputs=dict(points=points),
                                            data_samples=samples()), True)
        inputs = dict(data['inputs'], imgs=torch.zeros(2, 1, 3, 8, 8, device='cuda'))
        losses = model.loss(inputs, data['data_samples'])
        total = sum(v for k, v in losses.items() if 'loss' in k)
        total.backward()
        grads = {n: p.grad * 1.0 for n, p in model.named_parameters() if p.grad is not None}
        main = torch.cuda.current_stream()
        assert (streams[0] != main) == overlap
        results.append((losses, grads))
    (got, got_grads), (want, want_grads) = results
    assert any('pts_middle_encoder' in n for n in want_grads)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-3, atol=1e-5, msg=key)
    assert_same_gradients(got_grads, want_grads, total=0.3, each=float('inf'))
    encoder = [n for n in want_grads if n.startswith('pts_middle_encoder.')]
    assert_same_gradients({n: got_grads[n] for n in encoder},
                          {n: want_grads[n] for n in encoder}, total=0.3, each=0.5)
