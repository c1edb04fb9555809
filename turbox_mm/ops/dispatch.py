"""How every turbox op picks its Triton kernel or its PyTorch reference.

An op runs its kernel for CUDA tensors when Triton imports. Otherwise (CPU tensors, no Triton,
or ``TURBOX_OPS_REFERENCE=1`` in the environment) it runs its reference and says so once per
process. Tests run the kernels on CPU tensors, in Triton's interpreter, inside
:func:`kernel_on_cpu`.
"""
import contextlib
import os
import warnings
from typing import Callable, Iterator, Optional, Set

from torch import Tensor

#: Set to 1 to run every op's PyTorch reference, on any device.
ENV_FORCE_REFERENCE = 'TURBOX_OPS_REFERENCE'
_state = dict(kernel_on_cpu=False)
_warned: Set[str] = set()


@contextlib.contextmanager
def kernel_on_cpu() -> Iterator[None]:
    """Within the block the ops run their Triton kernels on CPU tensors too (tests only).

    The kernels then run in Triton's interpreter, which needs ``TRITON_INTERPRET=1`` in the
    environment before Triton is first imported.
    """
    previous, _state['kernel_on_cpu'] = _state['kernel_on_cpu'], True
    try:
        yield
    finally:
        _state['kernel_on_cpu'] = previous


def fallback_reason(tensor: Tensor, kernels_imported: bool) -> Optional[str]:
    """Why an op would run its reference for ``tensor`` rather than its kernel; None if not.

    Args:
        tensor (Tensor): The op's main input.
        kernels_imported (bool): Whether the op's Triton module imported.
    """
    if os.environ.get(ENV_FORCE_REFERENCE, '') not in ('', '0'):
        return f'{ENV_FORCE_REFERENCE} is set'
    if not kernels_imported:
        return 'Triton is not importable'
    if tensor.device.type != 'cuda' and not _state['kernel_on_cpu']:
        return f'the tensors are on {tensor.device.type}, the kernel needs CUDA'
    return None


def use_kernel(op_name: str, tensor: Tensor, kernels_imported: bool, reference: str) -> bool:
    """True to run the kernel; else warn once per op that ``reference`` runs instead."""
    reason = fallback_reason(tensor, kernels_imported)
    if reason is None:
        return True
    if op_name not in _warned:
        _warned.add(op_name)
        warnings.warn(f'turbox_mm.ops.{op_name} runs the PyTorch reference ({reference}): '
                      f'{reason}.', stacklevel=3)
    return False


class OpDispatch:
    """One op's :func:`fallback_reason` and :func:`use_kernel`, bound to its name, to whether
    its Triton module imported and to what its reference runs (for the warning).

    Examples:
        >>> import torch
        >>> choose = OpDispatch('my_op', kernels=None, reference='a loop')
        >>> choose.fallback_reason(torch.zeros(1))
        'Triton is not importable'
    """

    def __init__(self, op_name: str, kernels: object, reference: str):
        self.op_name = op_name
        self.kernels_imported = kernels is not None
        self.reference = reference

    def fallback_reason(self, tensor: Tensor) -> Optional[str]:
        """Why the op would run the reference for ``tensor`` rather than the kernel; None if
        not."""
        return fallback_reason(tensor, self.kernels_imported)

    def use_kernel(self, tensor: Tensor) -> bool:
        """True to run the kernel; else warn once that the reference runs instead."""
        return use_kernel(self.op_name, tensor, self.kernels_imported, self.reference)

    def reference_in_eager(self, tensor: Tensor) -> bool:
        """True where the op would run its reference for ``tensor`` and no ``torch.compile``
        traces the call (warning once, as :meth:`use_kernel`): the op's Python entry point
        then calls the reference itself, under plain autograd. Through the registered op the
        reference's backward runs its forward a second time (``torch.func.vjp``): on the CPU
        that made a turbox step slower than stock's (issue 16). Under ``torch.compile`` the
        registered op stays, as the references read host values that cannot be traced."""
        import torch
        if torch.compiler.is_compiling():
            return False
        return not self.use_kernel(tensor)

    def run(self, registered: Callable[..., Tensor], impl: Callable[..., Tensor],
            *args: Tensor) -> Tensor:
        """The op for a Python call on ``args``: ``registered(*args)`` (the ``torch.library``
        op), or where :meth:`reference_in_eager` holds for ``args[0]``, ``impl(*args)``, the
        op's own implementation (its checks, then the reference), under plain autograd."""
        if self.reference_in_eager(args[0]):
            return impl(*args)
        return registered(*args)


#: The values of a module's ``op_impl`` argument: the stock config's op, or turbox_mm's kernel.
OP_IMPLS = ('stock', 'turbox')


def check_op_impl(owner: str, op_impl: str) -> str:
    """``op_impl`` if it is one of :data:`OP_IMPLS`; else ``ValueError`` naming ``owner``."""
    if op_impl not in OP_IMPLS:
        raise ValueError(f"{owner}: op_impl must be 'stock' or 'turbox', got {op_impl!r}")
    return op_impl
