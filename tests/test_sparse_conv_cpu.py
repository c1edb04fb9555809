"""turbox_mm.ops.sparse_conv: mmcv's sparse convolution layers on the CPU, against dense
convolution."""
import pytest
import torch
import torch.nn.functional as F

import turbox_mm  # noqa: F401  (installs the CPU path)
from turbox_mm.ops.sparse_conv import cpu_path, get_indice_pairs

mmcv_ops = pytest.importorskip('mmcv.ops')


def sparse_input(batch=2, shape=(7, 9, 8), channels=3, density=0.2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    occupied = torch.rand(batch, *shape, generator=gen) < density
    indices = occupied.nonzero().int()
    features = torch.randn(indices.shape[0], channels, generator=gen)
    dense = torch.zeros(batch, channels, *shape)
    dense[indices[:, 0].long(), :, indices[:, 1].long(), indices[:, 2].long(),
          indices[:, 3].long()] = features
    return features, indices, dense, list(shape)


def densify(features, indices, batch, shape):
    out = torch.zeros(batch, features.shape[1], *shape, dtype=features.dtype)
    out[indices[:, 0].long(), :, indices[:, 1].long(), indices[:, 2].long(),
        indices[:, 3].long()] = features
    return out


@pytest.mark.parametrize('kernel, stride, padding, dilation', [
    (3, 1, 1, 1), (3, 2, 1, 1), ((1, 3, 3), (1, 2, 2), (0, 1, 1), 1), (2, 2, 0, 1),
    ((3, 1, 1), (2, 1, 1), 0, 1), (3, 1, 2, 2)])
def test_sparse_conv3d_equals_dense_conv3d(kernel, stride, padding, dilation):
    features, indices, dense, shape = sparse_input()
    torch.manual_seed(0)
    layer = mmcv_ops.SparseConv3d(3, 4, kernel, stride=stride, padding=padding,
                                  dilation=dilation, bias=True)
    x = features.clone().requires_grad_(True)
    out = layer(mmcv_ops.SparseConvTensor(x, indices, shape, 2))
    got = out.dense()
    weight = layer.weight.permute(4, 3, 0, 1, 2)  # [*k, in, out] -> [out, in, *k]
    want = F.conv3d(dense, weight, stride=stride, padding=padding, dilation=dilation)
    # dense convolution adds the bias everywhere; sparse only at its output sites
    occupied = (dense != 0).any(1, keepdim=True).float()
    reached = F.conv3d(occupied, torch.ones(1, 1, *weight.shape[2:]), stride=stride,
                       padding=padding, dilation=dilation) > 0
    want = torch.where(reached, want + layer.bias.view(1, -1, 1, 1, 1), torch.zeros_like(want))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # gradients against autograd through the dense convolution
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(1))
    got.backward(grad)
    d = dense.clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    (F.conv3d(d, w, stride=stride, padding=padding, dilation=dilation) * reached * grad).sum() \
        .backward()
    at_sites = d.grad[indices[:, 0].long(), :, indices[:, 1].long(), indices[:, 2].long(),
                      indices[:, 3].long()]
    torch.testing.assert_close(x.grad, at_sites, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad.permute(4, 3, 0, 1, 2), w.grad, rtol=1e-4,
                               atol=1e-4)


def test_submanifold_conv_keeps_the_sites_and_equals_dense_conv_there():
    features, indices, dense, shape = sparse_input(seed=2)
    torch.manual_seed(1)
    layer = mmcv_ops.SubMConv3d(3, 5, 3, padding=1, bias=False, indice_key='subm1')
    out = layer(mmcv_ops.SparseConvTensor(features, indices, shape, 2))
    assert torch.equal(out.indices, indices)
    want = F.conv3d(dense, layer.weight.permute(4, 3, 0, 1, 2), padding=1)
    at_sites = want[indices[:, 0].long(), :, indices[:, 1].long(), indices[:, 2].long(),
                    indices[:, 3].long()]
    torch.testing.assert_close(out.features, at_sites, rtol=1e-5, atol=1e-5)


def test_inverse_conv_returns_to_the_sites_of_its_couple():
    features, indices, _, shape = sparse_input(seed=3)
    down = mmcv_ops.SparseConv3d(3, 4, 3, stride=2, padding=1, indice_key='down')
    up = mmcv_ops.SparseInverseConv3d(4, 3, 3, indice_key='down')
    x = mmcv_ops.SparseConvTensor(features, indices, shape, 2)
    y = up(down(x))
    assert y.features.shape == features.shape and torch.equal(y.indices, indices)


def test_mmdet3ds_sparse_encoder_trains_on_the_cpu():
    import mmdet3d.models  # noqa: F401
    from mmdet3d.registry import MODELS
    encoder = MODELS.build(dict(
        type='mmdet3d.SparseEncoder', in_channels=5, sparse_shape=[41, 32, 32], output_channels=16,
        order=('conv', 'norm', 'act'), encoder_channels=((8, ), (8, 16), (16, 16), (16, )),
        encoder_paddings=((1, ), (1, 1), (1, 1), ((0, 1, 1), )), block_type='basicblock'))
    gen = torch.Generator().manual_seed(0)
    coords = torch.unique(torch.cat([torch.randint(0, 2, (400, 1), generator=gen),
                                     torch.randint(0, 41, (400, 1), generator=gen),
                                     torch.randint(0, 32, (400, 2), generator=gen)], 1), dim=0)
    feats = torch.randn(coords.shape[0], 5, generator=gen)
    out = encoder(feats, coords.int(), 2)
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    out.mean().backward()
    assert all(p.grad is not None for p in encoder.parameters() if p.requires_grad)


def test_empty_input_and_uninstall():
    outids, pairs, counts = get_indice_pairs(torch.zeros(0, 4, dtype=torch.int32), 1, [4, 4, 4],
                                             3, 2, 1)
    assert outids.shape == (0, 4) and int(counts.sum()) == 0
    cpu_path.uninstall()
    try:
        from mmcv.ops import sparse_ops
        with pytest.raises(RuntimeError, match='not implemented on CPU'):
            sparse_ops.get_indice_pairs(torch.zeros(1, 4, dtype=torch.int32), 1, [4, 4, 4], 3)
    finally:
        assert cpu_path.install()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('subm', [False, True])
def test_cpu_path_equals_mmcvs_cuda_layers(subm):
    """The convention check: the same layer and weights on CUDA (mmcv's kernels) and on the
    CPU (this path) give the same sites and features."""
    features, indices, _, shape = sparse_input(batch=2, shape=(21, 40, 40), density=0.05,
                                               seed=4)
    torch.manual_seed(2)
    layer = (mmcv_ops.SubMConv3d(3, 8, 3, padding=1) if subm else
             mmcv_ops.SparseConv3d(3, 8, 3, stride=2, padding=1))
    cpu = layer(mmcv_ops.SparseConvTensor(features, indices, shape, 2)).dense()
    # mmcv's CUDA kernels need contiguous indices (nonzero's are column-major)
    gpu = layer.cuda()(mmcv_ops.SparseConvTensor(features.cuda(), indices.cuda().contiguous(),
                                                 shape, 2)).dense()
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)
