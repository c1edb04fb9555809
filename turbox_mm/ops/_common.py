"""What the ``op.py`` of the differentiable ops share: input checks, the op registration, the
reference backward, autograd.

Used by :mod:`turbox_mm.ops.deformable_aggregation`, :mod:`turbox_mm.ops.ms_deform_attn`,
:mod:`turbox_mm.ops.geometric_kernel_attn` and :mod:`turbox_mm.ops.bev_pool`. Every check reads
only shapes, dtypes and devices (no host sync) and raises ``ValueError`` with a message that
starts with the op's name. The dispatch itself (kernel or reference, the one-time warning,
``TURBOX_OPS_REFERENCE``) is :mod:`turbox_mm.ops.dispatch`.

The ops are registered with :func:`define_op` and :func:`register_autograd` rather than
``torch.library.custom_op``: the same ``turbox_mm::`` schema, kernel, fake and autograd, but
the eager call goes through the C++ dispatcher straight to the kernel and through one
``autograd.Function``, without ``custom_op``'s Python wrappers around both (about a fifth of
the host time of a forward + backward, ``tools/op_overhead.py``).
"""
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor, _C

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: Integer dtypes, all of which :func:`check_integer_dtypes` accepts (the fast checks look for
#: these; another integer dtype takes the full checks, which accept it too).
INTEGERS = frozenset((torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8))

#: The fragment of the ``turbox_mm`` library that :func:`define_op` registers into (it must
#: live as long as the ops: dropping a ``Library`` removes its registrations).
LIBRARY = torch.library.Library('turbox_mm', 'FRAGMENT')


def check_float_dtypes(op: str, **tensors: Tensor) -> None:
    """Raise unless every one of ``tensors`` (name=tensor) is float16, bfloat16, float32 or
    float64."""
    for name, t in tensors.items():
        if t.dtype not in FLOATS:
            raise ValueError(f'{op}: {name} must be float16, bfloat16, float32 or float64, got '
                             f'{t.dtype}')


def check_integer_dtypes(op: str, **tensors: Tensor) -> None:
    """Raise unless every one of ``tensors`` (name=tensor) has an integer dtype."""
    for name, t in tensors.items():
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f'{op}: {name} must be an integer tensor, got {t.dtype}')


def check_one_device(op: str, **tensors: Tensor) -> None:
    """Raise unless ``tensors`` (name=tensor, at least two) are all on one device."""
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        names = list(tensors)
        raise ValueError(f'{op}: {", ".join(names[:-1])} and {names[-1]} must be on one device, '
                         f'got {sorted(map(str, devices))}')


def check_multi_scale_shapes(op: str, value: Tensor, spatial_shapes: Tensor,
                             level_start_index: Tensor, loc: Tuple[str, Tensor],
                             weights: Tuple[str, Tensor]) -> None:
    """Raise unless the shapes fit mmcv's multi-scale layout: ``value [bs, num_value, heads,
    dims]``, ``spatial_shapes [levels, 2]``, ``level_start_index [levels]``, the locations
    ``[bs, num_query, heads, levels, points, 2]`` and the weights ``[bs, num_query, heads,
    levels, points]`` (``loc`` and ``weights`` are (name, tensor) pairs, named as the op's
    signature names them)."""
    loc_name, loc = loc
    w_name, weights = weights
    if value.dim() != 4 or loc.dim() != 6 or weights.dim() != 5:
        raise ValueError(f'{op}: expected value [bs, num_value, heads, dims], {loc_name} [bs, '
                         f'num_query, heads, levels, points, 2] and {w_name} [bs, num_query, '
                         f'heads, levels, points], got shapes {tuple(value.shape)}, '
                         f'{tuple(loc.shape)}, {tuple(weights.shape)}')
    bs, _, heads, _ = value.shape
    _, num_query, loc_heads, levels, points, two = loc.shape
    if loc.shape[0] != bs or loc_heads != heads or two != 2 or \
            tuple(weights.shape) != (bs, num_query, heads, levels, points):
        raise ValueError(f'{op}: {loc_name} must be [bs, num_query, heads, levels, points, 2] '
                         f'and {w_name} [bs, num_query, heads, levels, points] with the bs and '
                         f'heads of value ({bs}, {heads}); got {tuple(loc.shape)} and '
                         f'{tuple(weights.shape)}')
    if tuple(spatial_shapes.shape) != (levels, 2) or \
            tuple(level_start_index.shape) != (levels, ):
        raise ValueError(f'{op}: spatial_shapes must be [levels, 2] = [{levels}, 2] and '
                         f'level_start_index [{levels}]; got {tuple(spatial_shapes.shape)} and '
                         f'{tuple(level_start_index.shape)}')


def multi_scale_inputs_fit(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                           loc: Tensor, weights: Tensor, loc_dtypes) -> bool:
    """True when a multi-scale op's inputs pass its checks: float ``value`` and ``weights``,
    ``loc`` of one of ``loc_dtypes``, integer level tables, the layout of
    :func:`check_multi_scale_shapes` and one device for ``value``, ``loc`` and ``weights``.

    One expression, for the ops' every call; False only means that the checks must run (they
    raise with the reason), so it may say False where they pass, never True where they fail.
    """
    vshape, lshape = value.shape, loc.shape
    return (len(vshape) == 4 and len(lshape) == 6 and lshape[5] == 2
            and lshape[0] == vshape[0] and lshape[2] == vshape[2]
            and weights.shape == lshape[:5] and spatial_shapes.shape == (lshape[3], 2)
            and level_start_index.shape == (lshape[3], )
            and value.dtype in FLOATS and weights.dtype in FLOATS and loc.dtype in loc_dtypes
            and spatial_shapes.dtype in INTEGERS and level_start_index.dtype in INTEGERS
            and value.device == loc.device == weights.device)


def reference_vjp(forward: Callable[..., Tensor], primals: Sequence[Tensor],
                  grad_output: Tensor) -> Tuple[Tensor, ...]:
    """Gradients of ``forward(*primals)`` for ``grad_output`` (cast to ``primals[0]``'s dtype),
    contiguous: an op's backward on the reference path.

    Autograd does not record inside an op's implementation; functorch's vjp does.
    """
    _, vjp = torch.func.vjp(forward, *primals)
    grads = vjp(grad_output.to(primals[0].dtype))
    return tuple(g.contiguous() for g in grads)


def define_op(name: str, impl: Callable, fake: Callable) -> torch._ops.OpOverload:
    """Define ``turbox_mm::<name>``: schema, kernel and fake, no autograd.

    The schema is inferred from ``impl``'s annotations (no argument is mutated), as
    ``torch.library.custom_op`` infers it; ``impl`` serves every device
    (``CompositeExplicitAutograd``) and ``fake`` computes the output shapes for
    ``torch.compile`` and fake tensors.

    Args:
        name (str): The op's name in the ``turbox_mm`` namespace.
        impl (Callable): The kernel, type-annotated.
        fake (Callable): Its fake (shape-only) implementation, same arguments.

    Returns:
        OpOverload: ``torch.ops.turbox_mm.<name>.default``.

    Examples:
        >>> import torch
        >>> def twice(x: torch.Tensor) -> torch.Tensor:
        ...     return x * 2
        >>> op = define_op('_doc_twice', twice, lambda x: torch.empty_like(x))
        >>> op(torch.ones(2)).tolist()
        [2.0, 2.0]
    """
    LIBRARY.define(name + torch.library.infer_schema(impl, mutates_args=()))
    LIBRARY.impl(name, impl, 'CompositeExplicitAutograd')
    torch.library.register_fake(f'turbox_mm::{name}', fake, lib=LIBRARY)
    return getattr(torch.ops.turbox_mm, name).default


def register_autograd(op: torch._ops.OpOverload, backward_op: Callable,
                      differentiable: Sequence[int], num_tensors: Optional[int] = None) -> None:
    """Make ``op`` (from :func:`define_op`) differentiable with ``backward_op``.

    ``backward_op(grad_output, *inputs)`` returns the gradients of the inputs at positions
    ``differentiable``, in that order; the other inputs get none. The first ``num_tensors``
    inputs (all of them by default) are tensors, saved for the backward; the rest are saved
    as they are.

    The autograd kernel sits at the dispatcher's ``Autograd`` key, so that
    ``torch.ops.turbox_mm.<name>`` is differentiable wherever it is called (eager,
    ``torch.compile``, ``opcheck``). Without gradients to record it calls the kernel below
    autograd; otherwise one ``autograd.Function`` does. The backward op itself has no autograd
    (no double backward, as before).
    """
    differentiable = tuple(differentiable)
    num_inputs = len(op._schema.arguments)
    split = num_inputs if num_tensors is None else num_tensors
    below = _C._after_autograd_keyset

    def forward(ctx, keyset, *inputs):
        with _C._AutoDispatchBelowAutograd():
            out = op.redispatch(keyset & below, *inputs)
        ctx.save_for_backward(*inputs[:split])
        ctx.constants = inputs[split:]
        return out

    def backward(ctx, grad_output):
        grads = [None] * (num_inputs + 1)  # the keyset first
        for i, grad in zip(differentiable,
                           backward_op(grad_output, *ctx.saved_tensors, *ctx.constants)):
            grads[i + 1] = grad
        return tuple(grads)

    # Named after the op, so that its outputs' grad_fn reads '<op>Backward'.
    function = type(op._opname, (torch.autograd.Function, ),
                    dict(forward=staticmethod(forward), backward=staticmethod(backward)))

    def autograd_kernel(keyset, *inputs):
        if _C.is_grad_enabled() and _C._any_requires_grad(*inputs):
            return function.apply(keyset, *inputs)
        with _C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & below, *inputs)

    LIBRARY.impl(op._opname, autograd_kernel, 'Autograd', with_keyset=True)
