"""Compile Triton kernels for the H200's sm_90 without a GPU (tests of the GPU build).

Triton's interpreter runs the kernels as Python on the CPU: a kernel can pass every CPU test
and still fail to compile for the GPU (a statement after an early return is compiled too; an
int argument equal to 1 becomes a constant). :func:`compile_variants` compiles each given
variant ahead of time and reports every failure.

At a launch Triton also specialises on alignment: an int argument that is a multiple of 16,
and a pointer aligned to 16 bytes (every torch allocation), is marked ``tt.divisibility = 16``,
which changes the layouts the compiler picks (vector width). A kernel that compiles without
those marks can fail with them (seen: bev_pool's forward with 32 pixels, features contiguous
in w and a channel count divisible by 16, in Triton's layout pass). So the variants mark
every pointer, and the ints named in ``divisible``, as a launch at real sizes would.
"""
import inspect
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

#: A variant: the kernel, its constexpr values, the int arguments set to 1 (Triton
#: specialises those), and the pointer types of its pointer arguments; optionally a fifth
#: item, more :func:`compile_for_sm90` keywords (``divisible``, ``num_warps``).
Variant = Tuple  # (kernel, dict, Sequence[str], dict[, dict])


def compile_for_sm90(kernel, constexprs: Dict[str, object], ones: Sequence[str],
                     pointers: Dict[str, str], floats: Sequence[str] = ('threshold', ),
                     divisible: Sequence[str] = (), num_warps: int = 4) -> None:
    """Compile ``kernel`` (a ``triton.jit`` function) for sm_90; raise what Triton raises.

    Args:
        kernel: The jitted kernel.
        constexprs (dict): Values of its ``tl.constexpr`` arguments.
        ones (Sequence[str]): Int arguments specialised to 1.
        pointers (dict): Argument name to Triton pointer type (``'*fp32'``, ``'*i64'``, ...);
            each is marked 16-byte aligned, as a launch marks a torch tensor's pointer.
        floats (Sequence[str]): Scalar arguments that are float32 (the rest are int32).
        divisible (Sequence[str]): Int arguments marked multiples of 16 (a launch marks
            those whose value is).
        num_warps (int): Warps per program (the autotuning candidate's).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature, values, attrs = {}, {}, {}
    for i, name in enumerate(inspect.signature(kernel.fn).parameters):
        if name in pointers:
            signature[name] = pointers[name]
            attrs[(i, )] = [['tt.divisibility', 16]]
        elif name in constexprs or name in ones:
            signature[name] = 'constexpr'
            values[(i, )] = constexprs.get(name, 1)
        else:
            signature[name] = 'fp32' if name in floats else 'i32'
            if name in divisible:
                attrs[(i, )] = [['tt.divisibility', 16]]
    triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=values, attrs=attrs),
                   target=GPUTarget('cuda', 90, 32), options={'num_warps': num_warps})


def compile_variants(variants: Iterable[Variant],
                     floats: Optional[Sequence[str]] = None) -> List[str]:
    """Compile every variant; one line per failure (empty when all compiled)."""
    failures = []
    for kernel, constexprs, ones, pointers, *more in variants:
        options = dict(more[0]) if more else {}
        if floats is not None:
            options['floats'] = floats
        try:
            compile_for_sm90(kernel, constexprs, ones, pointers, **options)
        except Exception as error:  # report every failing variant
            failures.append(f'{kernel.fn.__name__} {constexprs} ones={tuple(ones)} '
                            f'{ {k: v for k, v in options.items() if k != "floats"} }: '
                            f'{str(error).splitlines()[-1] if str(error) else error!r}')
    return failures
