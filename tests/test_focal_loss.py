"""The host-sync-free sigmoid focal loss against mmdet's FocalLoss (mmcv's CUDA kernel)."""
import pytest
import torch

from turbox_mm.models.losses import focal_loss_like_mmdet
from turbox_mm.ops.sigmoid_focal import sigmoid_focal_reference

mmdet_losses = pytest.importorskip('mmdet.models.losses')


def _case(seed=0, rows=50, classes=10, scale=4.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, classes, generator=gen) * scale).requires_grad_()
    target = torch.randint(0, classes + 1, (rows, ), generator=gen)  # classes: background
    weight = (torch.rand(rows, generator=gen) > 0.3).float()
    return logits, target, weight


def test_elementwise_loss_and_gradient_equal_mmdets_pytorch_focal_loss():
    """mmdet's CPU formula (one-hot, BCE with logits) is the same maths as mmcv's kernel. Both
    kernels take log(1 - p) in float32, which loses digits for large logits (|x| > 5), so the
    comparison with the exact BCE form stays at moderate ones; the cuda test compares with
    mmcv's kernel at any size."""
    from mmdet.models.losses.focal_loss import py_sigmoid_focal_loss
    logits, target, _ = _case(scale=1.5)
    one_hot = torch.nn.functional.one_hot(target, 11)[:, :10]
    want = py_sigmoid_focal_loss(logits, one_hot, gamma=2.0, alpha=0.25, reduction='none')
    got = sigmoid_focal_reference(logits.detach(), target, 2.0, 0.25)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    grad_want, = torch.autograd.grad(want.sum(), logits)
    from turbox_mm.ops.sigmoid_focal import sigmoid_focal_backward_reference
    grad_got = sigmoid_focal_backward_reference(torch.ones_like(got), logits.detach(), target,
                                                2.0, 0.25)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-4, atol=1e-6)


def test_other_losses_and_cpu_tensors_go_through_the_module():
    calls = []

    class Spy(torch.nn.Module):
        def forward(self, pred, target, weight=None, avg_factor=None):
            calls.append((pred.shape, avg_factor))
            return pred.sum()

    logits, target, weight = _case()
    focal_loss_like_mmdet(Spy(), logits, target, weight, avg_factor=3.0)
    loss = mmdet_losses.FocalLoss(use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=2.0)
    torch.testing.assert_close(focal_loss_like_mmdet(loss, logits, target, weight, 7.0),
                               loss(logits, target, weight=weight, avg_factor=7.0))
    assert calls == [((50, 10), 3.0)]


@pytest.mark.parametrize('weight_kind', ['rows', 'elements', 'flat', 'none'])
def test_wrapper_reduces_as_mmdets_focal_loss(monkeypatch, weight_kind):
    """The GPU branch's weighting, avg_factor and loss_weight, run on the CPU (the branch is
    chosen by device; patched here) against mmdet's FocalLoss on the CPU."""
    from turbox_mm.models.losses import focal_loss as fl
    monkeypatch.setattr(fl, '_on_gpu', lambda pred: True)
    loss = mmdet_losses.FocalLoss(use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=2.0)
    logits, target, weight = _case(scale=1.5)
    if weight_kind in ('elements', 'flat'):
        weight = torch.rand(50, 10, generator=torch.Generator().manual_seed(1))
        if weight_kind == 'flat':  # [N * C], which mmdet views as [N, C]
            weight = weight.flatten()
    elif weight_kind == 'none':
        weight = None
    got = focal_loss_like_mmdet(loss, logits, target, weight, avg_factor=17.0)
    want = loss(logits, target, weight=weight, avg_factor=17.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    g_got, = torch.autograd.grad(got, logits)
    g_want, = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match=r'weight of shape \(7,\) fits neither'):
        focal_loss_like_mmdet(loss, logits, target, torch.ones(7), avg_factor=1.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_cuda_equals_mmcv_kernel_without_host_syncs():
    from turbox_mm.benchmark.syncs import SyncCounter
    loss = mmdet_losses.FocalLoss(use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=2.0)
    logits, target, weight = _case(rows=7000)
    logits = logits.detach().cuda().requires_grad_()
    target, weight = target.cuda(), weight.cuda()
    avg = torch.tensor(123.0, device='cuda')
    want = loss(logits, target, weight=weight, avg_factor=avg)
    grad_want, = torch.autograd.grad(want, logits)
    focal_loss_like_mmdet(loss, logits, target, weight, avg)  # warm-up
    torch.cuda.synchronize()
    with SyncCounter() as syncs:
        got = focal_loss_like_mmdet(loss, logits, target, weight, avg)
        grad_got, = torch.autograd.grad(got, logits)
    assert syncs.total == 0, syncs.top()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-4, atol=1e-7)
