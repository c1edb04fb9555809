"""The deformable-aggregation calls of a training step, recorded to check the op inside a model.

A parity test that runs the turbox model with the Triton kernel and compares its parameter
gradients with the stock model's (``grid_sample``) compares two networks whose forward values
differ by float32 rounding. That is not a sound test of gradients: wherever a pre-activation
lies within that rounding of a ReLU's kink, the two runs take different one-sided derivatives
and every gradient behind it moves by far more than rounding. Measured on the tiny SparseDrive
stage 1 (batch of numpy seed 0): one of the map head's classification-branch pre-activations
was 3.6e-5 in one run and -7.9e-6 in the other; the map head's gradients then differed by
2-6% per tensor while the kernel, on each call's own inputs, matched the reference to 4e-7.

:class:`AggregationCalls` checks the kernel where it enters the step instead. While a step
runs inside :meth:`AggregationCalls.record`, every call of the op that
``DeformableFeatureAggregation`` makes is kept: its inputs (the very tensors, layouts and
dtypes the model produces), its output and the gradients that the op's backward gave its
inputs for the gradient that came back. :meth:`AggregationCalls.assert_match_reference` then
runs the PyTorch reference on each call's inputs and output gradient and compares.
"""
import contextlib
from typing import Dict, List

_MODULE = 'turbox_mm.models.sparse4d.deformable_feature_aggregation'
#: The op's inputs that carry gradients, by position in its signature.
_GRAD_INPUTS = {0: 'mc_ms_feat', 3: 'sampling_location', 4: 'weights'}


class AggregationCalls:
    """Record the op's calls in one step, then check each against the reference.

    Attributes:
        calls (list[dict]): Per call: ``inputs`` (detached copies of the five arguments),
            ``output``, ``grad_output``, ``grads`` (input name -> the op's gradient),
            ``needs`` (the inputs that require a gradient) and ``kernel`` (whether the kernel,
            not the reference, served the call).
    """

    def __init__(self) -> None:
        self.calls: List[Dict] = []

    @contextlib.contextmanager
    def record(self):
        """Run a step inside: the module's op calls go through a recording wrapper."""
        import importlib
        from unittest import mock
        from turbox_mm.ops.deformable_aggregation import fallback_reason
        module = importlib.import_module(_MODULE)
        op = module.deformable_aggregation

        def recording_op(*args):
            # whether the kernel serves this call (kernel_on_cpu does not force it: with
            # TURBOX_OPS_REFERENCE set or no Triton, the reference would run, and the check
            # would compare the reference with itself)
            call = dict(inputs=[a.detach().clone() for a in args], grads={},
                        kernel=fallback_reason(args[0]) is None,
                        needs={name for index, name in _GRAD_INPUTS.items()
                               if args[index].requires_grad})
            args = list(args)
            for index, name in _GRAD_INPUTS.items():
                if args[index].requires_grad:
                    # an alias per call, so that the hook sees this call's gradient only
                    # (the feature maps feed every call)
                    args[index] = args[index].view_as(args[index])
                    args[index].register_hook(
                        lambda grad, name=name: call['grads'].__setitem__(name, grad.clone()))
            out = op(*args)
            call['output'] = out.detach().clone()
            if out.requires_grad:
                out.register_hook(lambda grad: call.__setitem__('grad_output', grad.clone()))
            self.calls.append(call)
            return out

        with mock.patch.object(module, 'deformable_aggregation', recording_op):
            yield self

    def assert_match_reference(self, rtol: float = 1e-4) -> None:
        """Each call's output and input gradients agree with the reference's on the same
        inputs and output gradient, within ``rtol`` as a relative norm of the difference.

        Measured on the tiny Sparse4D and SparseDrive models under Triton's interpreter: below
        5e-7 for every call and tensor. A wrong kernel, layout or stride gives errors of
        order 1; a sampling point within rounding of a pixel boundary moves one point's
        gradient, a small part of the norm.
        """
        from turbox_mm.ops.deformable_aggregation import deformable_aggregation_reference
        assert self.calls, 'no deformable-aggregation call was recorded'
        for index, call in enumerate(self.calls):
            assert call['kernel'], f'call {index}: the reference ran, not the kernel'
            assert 'grad_output' in call and call['needs'], (
                f'call {index}: no gradient reached the op')
            assert call['grads'].keys() == call['needs'], (
                f'call {index}: the op gave gradients to {sorted(call["grads"])}, its inputs '
                f'need {sorted(call["needs"])}')
            inputs = [t.clone().requires_grad_(_GRAD_INPUTS.get(i) in call['grads'])
                      for i, t in enumerate(call['inputs'])]
            out = deformable_aggregation_reference(*inputs)
            out.backward(call['grad_output'])
            expected = dict(output=out.detach())
            for i, name in _GRAD_INPUTS.items():
                if name in call['grads']:
                    expected[name] = inputs[i].grad
            got = dict(output=call['output'], **call['grads'])
            for name, ref in expected.items():
                error = float((got[name].float() - ref.float()).norm()
                              / ref.float().norm().clamp_min(1e-30))
                assert error <= rtol, (
                    f'call {index} ({tuple(call["inputs"][3].shape)} sampling locations): '
                    f'{name} {error:.3g} from the reference, bound {rtol}')


def assert_kernel_step_agrees(model, batch, pins, losses, num_calls: int) -> None:
    """One training step of ``model`` with the aggregation's Triton kernel (on the CPU, under
    its interpreter) and ``pins`` replayed: its losses agree with ``losses`` (rtol 1e-4, atol
    1e-5: losses are continuous in the forward values), it calls the op ``num_calls`` times,
    and each call agrees with the reference (:meth:`AggregationCalls.assert_match_reference`).
    """
    import torch

    from conftest import first_step
    from turbox_mm.ops.dispatch import kernel_on_cpu
    calls = AggregationCalls()
    with kernel_on_cpu(), pins.replay(), calls.record():
        kernel_losses, _ = first_step(model, batch)
    assert kernel_losses.keys() == losses.keys()
    for key in losses:
        torch.testing.assert_close(kernel_losses[key], losses[key], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, key=key: f'{key} with the kernel: {m}')
    assert len(calls.calls) == num_calls, len(calls.calls)
    calls.assert_match_reference()
