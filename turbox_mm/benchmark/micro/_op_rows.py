"""Rows of the op micro benchmarks (``deformable_aggregation``, ``ms_deform_attn``,
``geometric_kernel_attn``): each case timed forward (under ``no_grad``) and forward +
backward, stock then turbox, with :func:`turbox_mm.benchmark.timing.time_fn`.

Not a benchmark itself (the leading underscore keeps it out of
:func:`turbox_mm.benchmark.micro.available`).
"""
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

import torch

from turbox_mm.benchmark.timing import time_fn

#: The two rows of every case, in order.
LABELS = ('fwd', 'fwd+bwd')


def dtype_name(dtype: torch.dtype) -> str:
    """``'float32'`` for ``torch.float32``."""
    return str(dtype).replace('torch.', '')


def case_name(name: str, dtype: torch.dtype, label: str) -> str:
    """A row's ``case``: ``'<name> <dtype> <label>'``."""
    return f'{name} {dtype_name(dtype)} {label}'


def plan(cases: Mapping[str, Dict],
         half_cases: Sequence[str]) -> List[Tuple[str, Dict, torch.dtype]]:
    """``(name, size, dtype)``: every case in float32, then those of ``half_cases`` present
    in ``cases`` in float16."""
    return ([(name, size, torch.float32) for name, size in cases.items()] +
            [(name, cases[name], torch.float16) for name in half_cases if name in cases])


def skipped_rows(component: str, planned: Sequence[Tuple[str, Dict, torch.dtype]],
                 note: Callable[[Dict], str]) -> List[Dict]:
    """The rows of ``planned`` (see :func:`plan`), not timed (``stock`` and ``turbox`` None),
    each with ``note(size)``."""
    return [dict(component=component, case=case_name(name, dtype, label), stock=None,
                 turbox=None, note=note(size))
            for name, size, dtype in planned for label in LABELS]


def max_abs_diff(turbox: Callable, stock: Callable, args: Sequence[torch.Tensor]) -> float:
    """``max |turbox(*args) - stock(*args)|`` in float64, without autograd."""
    with torch.no_grad():
        return (turbox(*args).double() - stock(*args).double()).abs().max().item()


def timed_rows(component: str, case: str, stock: Callable, turbox: Callable,
               args: Sequence[torch.Tensor], grad_positions: Sequence[int], grad: torch.Tensor,
               device: torch.device, iters: int, warmup: int, note: str) -> List[Dict]:
    """Two rows, ``'<case> fwd'`` and ``'<case> fwd+bwd'``, timing ``stock(*args)`` and
    ``turbox(*args)``.

    The forward runs under ``no_grad``; the forward + backward takes copies of the tensors at
    ``grad_positions`` as leaves (their gradients cleared before each step) and back-propagates
    ``grad`` from the output.
    """
    leaves = {i: args[i].detach().clone().requires_grad_() for i in grad_positions}
    with_leaves = tuple(leaves.get(i, t) for i, t in enumerate(args))

    def forward(fn):

        def step():
            with torch.no_grad():
                fn(*args)

        return step

    def forward_backward(fn):

        def step():
            fn(*with_leaves).backward(grad)

        return step

    def zero_grads():
        for t in leaves.values():
            t.grad = None

    rows = []
    for label, wrap, setup in zip(LABELS, (forward, forward_backward), (None, zero_grads)):
        timed = [time_fn(wrap(fn), iters=iters, warmup=warmup, device=device.type, setup=setup)
                 for fn in (stock, turbox)]
        rows.append(dict(component=component, case=f'{case} {label}', stock=timed[0],
                         turbox=timed[1], note=note))
    return rows
