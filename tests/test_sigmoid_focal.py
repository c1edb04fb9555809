"""turbox_mm::sigmoid_focal: the Triton kernels (in Triton's interpreter here) against the
reference, the reference against mmdet's formula, and the op's registration (fake, autograd,
torch.compile, sm_90 compile of the kernels); on a GPU, against mmcv's kernel."""
import warnings

import pytest
import torch

from op_checks import (assert_benchmark_skips_without_cuda, assert_compile_matches_eager,
                       max_err, quiet_on_path)
from turbox_mm.ops import dispatch
from turbox_mm.ops.sigmoid_focal import (check_inputs, sigmoid_focal,
                                         sigmoid_focal_backward_reference,
                                         sigmoid_focal_reference)


def _inputs(rows=37, classes=10, dtype=torch.float32, seed=0, scale=4.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, classes, generator=gen) * scale).to(dtype)
    # labels in [-1, C + 1]: -1, C and C + 1 are background rows
    target = torch.randint(-1, classes + 2, (rows, ), generator=gen)
    return logits, target


def _run(path, logits, target, grad_out, gamma=2.0, alpha=0.25):
    with quiet_on_path(path):
        leaf = logits.detach().requires_grad_()
        out = sigmoid_focal(leaf, target, gamma, alpha)
        grad, = torch.autograd.grad(out, leaf, grad_out)
    return out, grad


@pytest.mark.parametrize('dtype, tol', [(torch.float32, 2e-6), (torch.float16, 2e-3),
                                        (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize('rows, classes', [(37, 10), (5, 1), (1, 3), (130, 37)])
@pytest.mark.parametrize('gamma', [2.0, 0.0, 1.5])
def test_kernel_equals_reference(dtype, tol, rows, classes, gamma):
    logits, target = _inputs(rows, classes, dtype)
    grad_out = torch.randn(rows, classes, generator=torch.Generator().manual_seed(3)).to(dtype)
    out_k, grad_k = _run('kernel', logits, target, grad_out, gamma)
    want = sigmoid_focal_reference(logits, target, gamma, 0.25)
    grad_want = sigmoid_focal_backward_reference(grad_out, logits, target, gamma, 0.25)
    assert out_k.dtype == grad_k.dtype == dtype and out_k.shape == (rows, classes)
    scale = max(want.abs().max().item(), 1.0)
    assert max_err(out_k, want) <= tol * scale
    assert max_err(grad_k, grad_want) <= tol * max(grad_want.abs().max().item(), 1.0)
    # and the op's reference path (autograd through the registered backward) is the reference
    out_r, grad_r = _run('reference', logits, target, grad_out, gamma)
    assert torch.equal(out_r, want) and torch.equal(grad_r, grad_want)


def test_non_contiguous_logits_and_gradients():
    logits, target = _inputs(40, 12)
    wide = torch.randn(12, 40).t()  # column-major [40, 12]
    strided = logits.t().contiguous().t()
    grad_out = wide * 1.0
    assert not strided.is_contiguous() and not grad_out.is_contiguous()
    out, grad = _run('kernel', strided, target, grad_out)
    torch.testing.assert_close(out, sigmoid_focal_reference(logits, target, 2.0, 0.25))
    torch.testing.assert_close(
        grad, sigmoid_focal_backward_reference(grad_out, logits, target, 2.0, 0.25))
    assert out.is_contiguous()


def test_strided_targets_and_a_broadcast_gradient():
    """A label column sliced from a wider tensor, and the stride-0 gradient of ``.sum()``."""
    logits, target = _inputs(40, 5)
    wide = torch.stack([target.flip(0), target], 1)  # [40, 2]: the labels are column 1
    strided = wide[:, 1]
    assert strided.stride(0) == 2
    grad_out = torch.ones(()).expand(40, 5)
    out, grad = _run('kernel', logits, strided, grad_out)
    torch.testing.assert_close(out, sigmoid_focal_reference(logits, target, 2.0, 0.25))
    torch.testing.assert_close(
        grad, sigmoid_focal_backward_reference(torch.ones(40, 5), logits, target, 2.0, 0.25))


@pytest.mark.parametrize('label_dtype', [torch.int32, torch.int16, torch.uint8])
def test_narrow_label_dtypes(label_dtype):
    logits, target = _inputs(30, 6)
    target = target.clamp(0, 6)
    out, _ = _run('kernel', logits, target.to(label_dtype), torch.ones(30, 6))
    torch.testing.assert_close(out, sigmoid_focal_reference(logits, target, 2.0, 0.25))


@pytest.mark.parametrize('gamma', [2.0, 0.5, 0.0])
def test_extreme_and_non_finite_logits(gamma):
    """Saturated, infinite and NaN logits: the kernel as the reference (NaN where it is NaN,
    for the loss and the gradient; a NaN logit is never hidden as a finite loss)."""
    values = torch.tensor([100.0, -100.0, 88.0, -88.0, -89.0, 16.0, -16.0, float('inf'),
                           float('-inf'), float('nan')])
    logits = values.view(-1, 1).expand(10, 2).contiguous()
    target = torch.tensor([0, 1] * 5)
    out, grad = _run('kernel', logits, target, torch.ones(10, 2), gamma)
    want = sigmoid_focal_reference(logits, target, gamma, 0.25)
    grad_want = sigmoid_focal_backward_reference(torch.ones(10, 2), logits, target, gamma, 0.25)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(grad, grad_want, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert out[-1].isnan().all() and grad[-1].isnan().all()


def test_float64_logits_get_float32_precision_from_the_kernel():
    logits, target = _inputs(20, 4, dtype=torch.float64)
    out, grad = _run('kernel', logits, target, torch.ones(20, 4, dtype=torch.float64))
    assert out.dtype == grad.dtype == torch.float64
    # the float32 result (the reference computes float64 in float64: it differs where 1 - p
    # cancels, up to 2e-4 relative at these logits)
    want = sigmoid_focal_reference(logits.float(), target, 2.0, 0.25).double()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_reference_is_mmdets_focal_loss_and_its_gradient():
    """mmdet's CPU formula (one-hot, BCE with logits) is the same maths (moderate logits: both
    take log(1 - p) in float32, see test_focal_loss.py)."""
    from mmdet.models.losses.focal_loss import py_sigmoid_focal_loss
    logits, target = _inputs(60, 10, scale=1.5)
    target = target.clamp(0, 10)
    logits.requires_grad_()
    one_hot = torch.nn.functional.one_hot(target, 11)[:, :10]
    want = py_sigmoid_focal_loss(logits, one_hot, gamma=2.0, alpha=0.25, reduction='none')
    grad_want, = torch.autograd.grad(want.sum(), logits)
    out, grad = _run('kernel', logits.detach(), target, torch.ones(60, 10))
    torch.testing.assert_close(out, want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_want, rtol=1e-4, atol=1e-6)


def test_empty_inputs_on_both_paths():
    for path in ('kernel', 'reference'):
        for rows, classes in ((0, 10), (4, 0)):
            logits, target = _inputs(rows, classes)
            out, grad = _run(path, logits, target, torch.ones(rows, classes))
            assert out.shape == grad.shape == (rows, classes)


def test_bad_inputs_are_named_errors():
    logits, target = _inputs()
    with pytest.raises(ValueError, match=r'sigmoid_focal: expected logits \[N, C\] and target '
                                         r'\[N\], got logits of shape \(37, 10\) and target of '
                                         r'shape \(36,\)'):
        check_inputs(logits, target[:36])
    with pytest.raises(ValueError, match='sigmoid_focal: target must be an integer tensor'):
        sigmoid_focal(logits, target.float())
    with pytest.raises(ValueError, match='sigmoid_focal: logits must be float16'):
        sigmoid_focal(logits.long(), target)
    with pytest.raises(ValueError, match=r'expected logits \[N, C\]'):
        sigmoid_focal(logits[None], target)
    from turbox_mm.ops.sigmoid_focal.op import sigmoid_focal_backward_op
    with pytest.raises(ValueError, match=r'expected logits \[N, C\] and target \[N\]'):
        sigmoid_focal_backward_op(torch.ones(37, 10), logits, target[:3], 2.0, 0.25)
    with pytest.raises(ValueError, match=r'grad of shape \(37, 9\) on cpu does not match'):
        sigmoid_focal_backward_op(torch.ones(37, 9), logits, target, 2.0, 0.25)


def test_dispatch_warns_once_on_the_cpu(monkeypatch):
    import turbox_mm.ops.sigmoid_focal as package
    from turbox_mm.ops.sigmoid_focal import op
    monkeypatch.setattr(dispatch, '_warned', set())
    logits, target = _inputs()
    assert 'cpu' in package.fallback_reason(logits)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        sigmoid_focal(logits, target)
        sigmoid_focal(logits, target)
    assert len([w for w in caught if 'sigmoid_focal runs the PyTorch reference' in
                str(w.message)]) == 1
    with dispatch.kernel_on_cpu():
        monkeypatch.setenv(dispatch.ENV_FORCE_REFERENCE, '1')
        monkeypatch.setattr(op, 'triton_kernels', None)  # would fail if called
        torch.testing.assert_close(sigmoid_focal(logits, target),
                                   sigmoid_focal_reference(logits, target, 2.0, 0.25))


def test_registration_fake_autograd_and_compile():
    from turbox_mm.ops.sigmoid_focal import sigmoid_focal_op
    logits, target = _inputs(9, 4, dtype=torch.float64, scale=1.0)
    result = torch.library.opcheck(sigmoid_focal_op,
                                   (logits.clone().requires_grad_(), target, 2.0, 0.25))
    assert all(v == 'SUCCESS' for v in result.values()), result
    from turbox_mm.ops.sigmoid_focal.op import sigmoid_focal_backward_op
    column_major = logits.t().contiguous().t()  # the fake's strides hold for any input's
    result = torch.library.opcheck(sigmoid_focal_backward_op,
                                   (column_major * 1.0, column_major, target, 2.0, 0.25),
                                   test_utils=('test_schema', 'test_faketensor'))
    assert all(v == 'SUCCESS' for v in result.values()), result
    with quiet_on_path('reference'):
        assert torch.autograd.gradcheck(lambda x: sigmoid_focal(x, target),
                                        (logits.clone().requires_grad_(), ))
    assert_compile_matches_eager(lambda x, t: sigmoid_focal(x * 2, t).sum(), (logits, target),
                                 grad_positions=(0, ))


def test_benchmark_is_listed_and_skips_on_the_cpu():
    if torch.cuda.is_available():
        pytest.skip('checks the CPU-only rows')
    assert_benchmark_skips_without_cuda('sigmoid_focal', "needs CUDA")


# -- sm_90 compile of the kernels at the launch's specialisation --------------------------------

COMPILE_SCRIPT = r'''
import sys
from turbox_mm.ops.sigmoid_focal import triton_kernels as tk
from turbox_mm.testing.triton_aot import compile_variants

variants = []
for dtype in ('*fp32', '*fp16', '*bf16'):
    for backward in (False, True):
        pointers = dict(x_ptr=dtype, t_ptr='*i64', g_ptr=dtype, out_ptr=dtype)
        # strides of contiguous logits (sx_c = 1), and a launch's multiples of 16
        for ones, divisible in (((), ()), (('sx_c', 'sg_c'), ('total', 'C', 'sx_n', 'sg_n'))):
            variants.append((tk._focal_kernel, dict(BACKWARD=backward, BLOCK=tk.BLOCK), ones,
                             pointers, dict(divisible=divisible)))
failures = compile_variants(variants, floats=('gamma', 'alpha'))
print('\n'.join(failures) or 'all compiled')
sys.exit(1 if failures else 0)
'''


@pytest.mark.slow
def test_kernels_compile_for_sm90(tmp_path):
    """Both kernels compile for the H200's sm_90 for every dtype, as a launch specialises them
    (contiguous strides at 1, sizes multiples of 16)."""
    from conftest import compile_for_sm90_in_subprocess
    compile_for_sm90_in_subprocess(COMPILE_SCRIPT, tmp_path)


# -- on a GPU ------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_cuda_kernel_equals_mmcvs_kernel_without_syncs(dtype):
    from mmcv.ops import sigmoid_focal_loss

    from turbox_mm.benchmark.syncs import SyncCounter
    # moderate logits: with large ones, 1 - p cancels and both kernels' float32 rounding
    # (Triton's fast exp here) shows; mmcv in float16 computes in half precision and
    # overflows above about 8.3, so its float32 run is the float16 reference
    logits, target = _inputs(5400, 10, dtype, scale=1.5)
    logits, target = logits.cuda().requires_grad_(), target.clamp(0, 10).cuda()
    ref_logits = logits.detach().float().requires_grad_()
    want = sigmoid_focal_loss(ref_logits, target, 2.0, 0.25, None, 'none')
    grad_out = torch.rand_like(want)
    grad_want, = torch.autograd.grad(want, ref_logits, grad_out)
    want, grad_want, grad_out = want.to(dtype), grad_want.to(dtype), grad_out.to(dtype)
    sigmoid_focal(logits, target)  # compile the kernels
    torch.cuda.synchronize()
    with SyncCounter() as syncs:
        got = sigmoid_focal(logits, target)
        grad_got, = torch.autograd.grad(got, logits, grad_out)
    assert syncs.total == 0, syncs.top()
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(grad_got, grad_want, **tol)
