"""Where an op has no kernel (CPU tensors), its Python entry point runs the reference under
plain autograd: one forward. Through the registered op, the backward ran the reference's
forward a second time (``torch.func.vjp``), which made turbox's Sparse4D step slower than
stock's on the CPU (issue 16: 96 ``grid_sampler_2d`` calls a step against stock's 48)."""
import importlib
from unittest import mock

import pytest
import torch

from turbox_mm.ops import deformable_aggregation as da
from turbox_mm.ops import geometric_kernel_attn as gka
from turbox_mm.ops import ms_deform_attn as msda


def _deformable_aggregation():
    torch.manual_seed(0)
    maps = [torch.randn(2, 3, 8, 6, 10), torch.randn(2, 3, 8, 3, 5)]
    feat, shape, start = da.feature_maps_format(maps)
    loc, weights = torch.rand(2, 7, 4, 3, 2), torch.rand(2, 7, 4, 3, 2, 2)
    return (da.deformable_aggregation, da.deformable_aggregation_reference,
            da.op.deformable_aggregation_op, (feat, shape, start, loc, weights), (0, 3, 4))


def _ms_deform_attn():
    torch.manual_seed(0)
    shapes, start = torch.tensor([[6, 8], [3, 4]]), torch.tensor([0, 48])
    value = torch.randn(2, 60, 2, 4)
    loc, weights = torch.rand(2, 9, 2, 2, 3, 2), torch.rand(2, 9, 2, 2, 3).softmax(-1)
    return (msda.ms_deform_attn, msda.ms_deform_attn_reference, msda.op.ms_deform_attn_op,
            (value, shapes, start, loc, weights), (0, 3, 4))


def _geometric_kernel_attn():
    torch.manual_seed(0)
    shapes, start = torch.tensor([[5, 7]]), torch.tensor([0])
    value = torch.randn(2, 35, 2, 4)
    loc = torch.randint(-1, 8, (2, 9, 2, 1, 6, 2))
    weights = torch.rand(2, 9, 2, 1, 6).softmax(-1)
    return (gka.geometric_kernel_attn, gka.geometric_kernel_attn_reference,
            gka.op.geometric_kernel_attn_op, (value, shapes, start, loc, weights), (0, 4))


CASES = {'deformable_aggregation': _deformable_aggregation, 'ms_deform_attn': _ms_deform_attn,
         'geometric_kernel_attn': _geometric_kernel_attn}


def _run(name, fn, inputs, differentiable):
    """Forward and backward of ``fn``: the output, the gradients, and how many times the
    op's reference ran (counted where the entry point and the registered op call it)."""
    reference = getattr(importlib.import_module(f'turbox_mm.ops.{name}.reference'),
                        f'{name}_reference')
    calls = []

    def counted(*args):
        calls.append(1)
        return reference(*args)

    inputs = [x.detach().clone().requires_grad_(i in differentiable) for i, x in
              enumerate(inputs)]
    with mock.patch(f'turbox_mm.ops.{name}.{name}_reference', counted), \
            mock.patch(f'turbox_mm.ops.{name}.op.{name}_reference', counted):
        out = fn(*inputs)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    return out.detach(), [inputs[i].grad for i in differentiable], len(calls)


@pytest.mark.filterwarnings('ignore:turbox_mm.ops')
@pytest.mark.parametrize('name', list(CASES))
def test_without_a_kernel_the_entry_point_is_the_reference_under_plain_autograd(name):
    entry, reference, registered, inputs, differentiable = CASES[name]()
    out, grads, calls = _run(name, entry, inputs, differentiable)
    op_out, op_grads, op_calls = _run(name, registered, inputs, differentiable)
    ref_out, ref_grads, _ = _run(name, reference, inputs, differentiable)
    # the same numbers as the reference and as the registered op (its CPU path) ...
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(out, op_out, rtol=1e-6, atol=1e-6)
    for grad, ref_grad, op_grad in zip(grads, ref_grads, op_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)
        torch.testing.assert_close(grad, op_grad, rtol=1e-5, atol=1e-6)
    # ... with the reference's forward run once; the registered op runs it again to backward
    assert (calls, op_calls) == (1, 2)


@pytest.mark.parametrize('name', list(CASES))
def test_bad_inputs_are_named_on_the_eager_path_too(name):
    entry, _, _, inputs, _ = CASES[name]()
    bad = list(inputs)
    bad[4] = bad[4][:, :1]  # weights for one query
    with pytest.raises(ValueError, match=name):
        entry(*bad)


@pytest.mark.filterwarnings('ignore:turbox_mm.ops')
@pytest.mark.parametrize('name', list(CASES))
def test_with_the_kernel_on_the_cpu_the_registered_op_runs(name):
    pytest.importorskip('triton')
    module = {'deformable_aggregation': da, 'ms_deform_attn': msda,
              'geometric_kernel_attn': gka}[name]
    value = CASES[name]()[3][0]
    assert module.op.reference_in_eager(value)  # CPU tensors: the reference
    with module.op.kernel_on_cpu():
        assert not module.op.reference_in_eager(value)
