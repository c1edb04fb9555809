"""Compile Triton kernels for the H200's sm_90 without a GPU (tests of the GPU build).

Triton's interpreter runs the kernels as Python on the CPU: a kernel can pass every CPU test
and still fail to compile for the GPU (a statement after an early return is compiled too; an
int argument equal to 1 becomes a constant). :func:`compile_variants` compiles each given
variant ahead of time and reports every failure.
"""
import inspect
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

#: A variant: the kernel, its constexpr values, the int arguments set to 1 (Triton
#: specialises those), and the pointer types of its pointer arguments.
Variant = Tuple[object, Dict[str, object], Sequence[str], Dict[str, str]]


def compile_for_sm90(kernel, constexprs: Dict[str, object], ones: Sequence[str],
                     pointers: Dict[str, str], floats: Sequence[str] = ('threshold', )) -> None:
    """Compile ``kernel`` (a ``triton.jit`` function) for sm_90; raise what Triton raises.

    Args:
        kernel: The jitted kernel.
        constexprs (dict): Values of its ``tl.constexpr`` arguments.
        ones (Sequence[str]): Int arguments specialised to 1.
        pointers (dict): Argument name to Triton pointer type (``'*fp32'``, ``'*i64'``, ...).
        floats (Sequence[str]): Scalar arguments that are float32 (the rest are int32).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature, values = {}, {}
    for i, name in enumerate(inspect.signature(kernel.fn).parameters):
        if name in pointers:
            signature[name] = pointers[name]
        elif name in constexprs or name in ones:
            signature[name] = 'constexpr'
            values[(i, )] = constexprs.get(name, 1)
        else:
            signature[name] = 'fp32' if name in floats else 'i32'
    triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=values),
                   target=GPUTarget('cuda', 90, 32))


def compile_variants(variants: Iterable[Variant],
                     floats: Optional[Sequence[str]] = None) -> List[str]:
    """Compile every variant; one line per failure (empty when all compiled)."""
    failures = []
    for kernel, constexprs, ones, pointers in variants:
        try:
            compile_for_sm90(kernel, constexprs, ones, pointers,
                             **({} if floats is None else dict(floats=floats)))
        except Exception as error:  # report every failing variant
            failures.append(f'{kernel.fn.__name__} {constexprs} ones={tuple(ones)}: '
                            f'{str(error).splitlines()[-1] if str(error) else error!r}')
    return failures
