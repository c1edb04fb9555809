"""Geometric kernel attention: MapTR's ``GeometricKernelAttentionFunc``.

Each query reads a fixed window of pixels around its projected reference point on every
level of a multi-scale value map, per head, and sums them with its attention weights:
``(value [bs, num_value, heads, D], spatial_shapes [levels, 2], level_start_index [levels],
sampling_loc [bs, num_query, heads, levels, points, 2] int64, attn_weight [bs, num_query,
heads, levels, points]) -> [bs, num_query, heads * D]``, the signature and the numbers of the
CUDA extension MapTR v1 compiles for its spatial cross-attention (``GeometryKernelAttention``,
docs/design/maptr.md sections 3.1 and 8.2). No package ships that extension.

- :mod:`.reference`: the specification in plain PyTorch (clamp, index, weighted sum).
- :mod:`.triton_kernels`: the forward and backward kernels.
- :mod:`.op`: ``torch.ops.turbox_mm.geometric_kernel_attn`` with its fake implementation and
  autograd, and the dispatch: CUDA tensors with Triton -> kernels; otherwise -> reference,
  with one warning. ``TURBOX_OPS_REFERENCE=1`` forces the reference.
"""
from torch import Tensor

from .op import ENV_FORCE_REFERENCE, fallback_reason, geometric_kernel_attn_call
from .reference import geometric_kernel_attn_reference

__all__ = [
    'geometric_kernel_attn', 'GeometricKernelAttentionFunc', 'geometric_kernel_attn_reference',
    'fallback_reason', 'ENV_FORCE_REFERENCE'
]


def geometric_kernel_attn(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                          sampling_loc: Tensor, attn_weight: Tensor,
                          im2col_step: int = 64) -> Tensor:
    """Geometric kernel attention; MapTR's ``GeometricKernelAttentionFunc.apply``.

    ``out[b, q, h * D + c] = sum over levels l, points p of w[b, q, h, l, p] *
    value[b, start_l + clamp(y, 0, H_l - 1) * W_l + clamp(x, 0, W_l - 1), h, c]`` with
    ``(x, y) = sampling_loc[b, q, h, l, p]``: a nearest-pixel gather, clamped to the level's
    border (details in :mod:`.reference`). Differentiable in ``value`` and ``attn_weight``
    (``sampling_loc`` is integer); traceable by ``torch.compile`` without a graph break.

    The kernel accumulates in float32 and accepts float16/bfloat16 (upstream: float32 and
    float64 only), also mixed (a 16-bit value with float32 weights, as under autocast); the
    result has ``value``'s dtype, each gradient its input's dtype.

    Args:
        value (Tensor): ``[bs, num_value, heads, D]``, the levels' pixels one after the other,
            each level row-major.
        spatial_shapes (Tensor): ``[levels, 2]`` integer ``(H, W)`` of each level.
        level_start_index (Tensor): ``[levels]`` integer first row of each level in ``value``.
        sampling_loc (Tensor): ``[bs, num_query, heads, levels, points, 2]`` int64 (or int32)
            ``(x, y)`` pixel coordinates on each level.
        attn_weight (Tensor): ``[bs, num_query, heads, levels, points]``.
        im2col_step (int): upstream's batch chunk of its CUDA op; taken for the signature and
            ignored (every batch element runs in one launch here, and ``bs`` need not be a
            multiple of it). Defaults to 64.

    Returns:
        Tensor: ``[bs, num_query, heads * D]``.

    Examples:
        >>> import torch
        >>> value = torch.randn(2, 375, 4, 64)  # one 15x25 level
        >>> shapes, start = torch.tensor([[15, 25]]), torch.tensor([0])
        >>> loc = torch.randint(-3, 28, (2, 100, 4, 1, 15, 2))
        >>> weights = torch.rand(2, 100, 4, 1, 15).softmax(-1)
        >>> geometric_kernel_attn(value, shapes, start, loc, weights).shape
        torch.Size([2, 100, 256])
    """
    return geometric_kernel_attn_call(value, spatial_shapes, level_start_index, sampling_loc,
                                      attn_weight)


class GeometricKernelAttentionFunc:
    """A drop-in for MapTR's ``GeometricKernelAttentionFunc`` where it is only applied.

    ``GeometricKernelAttentionFunc.apply(value, value_spatial_shapes,
    value_level_start_index, sampling_locations, attention_weights, im2col_step)`` is
    :func:`geometric_kernel_attn` (upstream's argument order; ``im2col_step`` ignored), so that
    swapping the import swaps the op. Unlike upstream's, it also runs on the CPU (the
    reference) and takes non-contiguous and 16-bit inputs.

    Examples:
        >>> import torch
        >>> value = torch.randn(1, 12, 2, 4)
        >>> shapes, start = torch.tensor([[3, 4]]), torch.tensor([0])
        >>> loc, w = torch.randint(0, 4, (1, 5, 2, 1, 3, 2)), torch.rand(1, 5, 2, 1, 3)
        >>> GeometricKernelAttentionFunc.apply(value, shapes, start, loc, w, 64).shape
        torch.Size([1, 5, 8])
    """

    apply = staticmethod(geometric_kernel_attn)
