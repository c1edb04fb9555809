"""Checks shared by the tests of the sampling ops (deformable_aggregation, ms_deform_attn,
geometric_kernel_attn): each test keeps its name and inputs in its own file and calls these.

Imported as ``from op_checks import ...``, as the tests import conftest's helpers. The kernels
run on CPU tensors in Triton's interpreter (conftest sets ``TRITON_INTERPRET=1``) inside
:func:`turbox_mm.ops.dispatch.kernel_on_cpu`.
"""
import contextlib
import warnings
from typing import Callable, Sequence

import pytest
import torch

from turbox_mm.ops import dispatch


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def grad_out_for(args, seed=1, dtype=None):
    """A random output gradient ``[bs, num_query, heads * D]`` for ``args`` in mmcv's
    multi-scale layout (value ``[bs, num_value, heads, D]``, locations ``[bs, num_query,
    ...]``)."""
    value, _, _, loc, _ = args
    bs, _, heads, dims = value.shape
    gen = torch.Generator().manual_seed(seed)
    out = torch.randn(bs, loc.shape[1], heads * dims, generator=gen)
    return out.to(value.device, dtype or value.dtype)


def with_grad(args):
    """``args`` with every floating tensor set to require gradients (in place)."""
    return tuple(t.requires_grad_() if t.is_floating_point() else t for t in args)


@contextlib.contextmanager
def quiet_on_path(path: str):
    """Run the block on ``path``, warnings silenced: 'kernel' (the Triton kernels on CPU
    tensors) or 'reference'."""
    ctx = dispatch.kernel_on_cpu() if path == 'kernel' else warnings.catch_warnings()
    with ctx:
        warnings.simplefilter('ignore')
        yield


def assert_dispatch_warns_once_and_env_forces_reference(monkeypatch, op: Callable, package,
                                                        reference: Callable, kernels,
                                                        kernel_forward: str, args) -> None:
    """CPU tensors run ``reference`` with one warning per process; inside ``kernel_on_cpu`` the
    kernel runs, unless ``TURBOX_OPS_REFERENCE=1``, which forces the reference (the kernel
    module's ``kernel_forward`` is removed to prove it is not called)."""
    monkeypatch.setattr(dispatch, '_warned', set())
    assert 'cpu' in package.fallback_reason(args[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        out = op(*args)
        op(*args)
    assert len([w for w in caught if 'reference' in str(w.message)]) == 1
    torch.testing.assert_close(out, reference(*args))
    with dispatch.kernel_on_cpu():
        assert package.fallback_reason(args[0]) is None
        monkeypatch.setenv(package.ENV_FORCE_REFERENCE, '1')
        assert package.ENV_FORCE_REFERENCE in package.fallback_reason(args[0])
        monkeypatch.setattr(kernels, kernel_forward, None)  # would fail if called
        torch.testing.assert_close(op(*args), out)


def assert_op_empty_on_both_paths(op: Callable, args, grad_positions: Sequence[int],
                                  out_shape) -> None:
    """The op (kernel path, then reference path) returns ``out_shape`` for empty ``args`` and
    zero gradients for the inputs at ``grad_positions``."""
    for path in ('kernel', 'reference'):
        with quiet_on_path(path):
            leaves = {i: args[i].detach().requires_grad_() for i in grad_positions}
            out = op(*(leaves.get(i, t) for i, t in enumerate(args)))
            out.sum().backward()
        assert out.shape == out_shape
        assert all((t.grad == 0).all() for t in leaves.values())


def assert_gradcheck(op: Callable, args, path: str) -> None:
    """``gradcheck`` in float64 on ``path`` ('reference', or 'kernel' in the interpreter, in
    fast mode)."""
    args = with_grad(args)
    with quiet_on_path(path):
        assert torch.autograd.gradcheck(op, args, fast_mode=path == 'kernel')


def assert_opcheck(op, args) -> None:
    """``torch.library.opcheck`` passes every check (floating ``args`` require gradients)."""
    result = torch.library.opcheck(op, with_grad(args))
    assert all(v == 'SUCCESS' for v in result.values()), result


def assert_compile_matches_eager(block: Callable, args, grad_positions: Sequence[int]) -> None:
    """``torch.compile(block, fullgraph=True)`` (aot_eager) traces without a graph break and
    gives eager's loss and the gradients of ``args[i]`` (float64 leaves) at
    ``grad_positions``."""

    def inputs():
        return [t.detach().double().requires_grad_() if i in grad_positions else t
                for i, t in enumerate(args)]

    compiled = torch.compile(block, fullgraph=True, backend='aot_eager')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        leaves = inputs()
        loss = compiled(*leaves)
        loss.backward()
        eager = inputs()
        want = block(*eager)
        want.backward()
    torch.testing.assert_close(loss, want)
    for i in grad_positions:
        torch.testing.assert_close(leaves[i].grad, eager[i].grad)


def assert_benchmark_skips_without_cuda(name: str, note: str) -> None:
    """Micro benchmark ``name`` is listed as an op's and, on the CPU, returns only skipped rows
    whose note says ``note``, fwd then fwd+bwd."""
    from turbox_mm.benchmark.micro import available, get
    assert name in available('op')
    for quick in (True, False):
        rows = get(name)('cpu', quick=quick)
        assert rows and all(r['stock'] is None and r['turbox'] is None for r in rows)
        assert all(note in r['note'] for r in rows)
    assert [r['case'].split()[-1] for r in rows[:2]] == ['fwd', 'fwd+bwd']


def assert_benchmark_cli_without_cuda(name: str, case: str, note: str, tmp_path,
                                      capsys) -> None:
    """``tools/benchmark.py --ops name`` on the CPU prints ``case`` with ``note`` and no
    failure."""
    if torch.cuda.is_available():
        pytest.skip('checks the CPU-only report')
    from tools.benchmark import main
    assert main(['--ops', name, '--out', str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert case in printed and note in printed
    assert 'FAILED' not in printed
