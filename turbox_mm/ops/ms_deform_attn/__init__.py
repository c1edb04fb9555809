"""Multi-scale deformable attention: mmcv's ``MultiScaleDeformableAttnFunction``.

Each query samples every level of a multi-scale value map at a few learned points per head,
bilinearly, and sums the samples with its attention weights: ``(value [bs, num_value, heads,
D], spatial_shapes [levels, 2], level_start_index [levels], sampling_locations [bs, num_query,
heads, levels, points, 2], attention_weights [bs, num_query, heads, levels, points]) ->
[bs, num_query, heads * D]``, the signature and the numbers of mmcv 2.1's op (Deformable DETR,
BEVFormer's spatial cross-attention and temporal self-attention, MapTR's decoder).

- :mod:`.reference`: the specification in plain PyTorch (``grid_sample`` per level, mmcv's
  ``multi_scale_deformable_attn_pytorch``).
- :mod:`.triton_kernels`: the forward and backward kernels.
- :mod:`.op`: ``torch.ops.turbox_mm.ms_deform_attn`` with its fake implementation and
  autograd, and the dispatch: CUDA tensors with Triton -> kernels; otherwise -> reference,
  with one warning. ``TURBOX_OPS_REFERENCE=1`` forces the reference.
"""
from torch import Tensor

from .op import ENV_FORCE_REFERENCE, fallback_reason, ms_deform_attn_call
from .reference import ms_deform_attn_reference, multi_scale_deformable_attn_pytorch

__all__ = [
    'ms_deform_attn', 'MultiScaleDeformableAttnFunction', 'ms_deform_attn_reference',
    'multi_scale_deformable_attn_pytorch', 'fallback_reason', 'ENV_FORCE_REFERENCE'
]


def ms_deform_attn(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                   sampling_locations: Tensor, attention_weights: Tensor,
                   im2col_step: int = 64) -> Tensor:
    """Multi-scale deformable attention; mmcv's ``MultiScaleDeformableAttnFunction.apply``.

    ``out[b, q, h * D + c] = sum over levels l, points p of w[b, q, h, l, p] *
    bilinear(level l of value[b, :, h, c] at (x * W_l - 0.5, y * H_l - 0.5))`` with
    ``(x, y) = sampling_locations[b, q, h, l, p]``; corners off the map read zero (details in
    :mod:`.reference`). Differentiable in ``value``, ``sampling_locations`` and
    ``attention_weights``; traceable by ``torch.compile`` without a graph break.

    The kernel accumulates in float32 and accepts float16/bfloat16, also mixed (e.g. a 16-bit
    value with float32 locations and weights, as under autocast); the result has ``value``'s
    dtype, each gradient its input's dtype (mmcv casts the locations and weights to
    ``value``'s dtype and computes in it).

    Args:
        value (Tensor): ``[bs, num_value, heads, D]``, the levels' pixels one after the other,
            each level row-major.
        spatial_shapes (Tensor): ``[levels, 2]`` integer ``(H, W)`` of each level.
        level_start_index (Tensor): ``[levels]`` integer first row of each level in ``value``.
        sampling_locations (Tensor): ``[bs, num_query, heads, levels, points, 2]``, ``(x, y)``
            normalised to ``[0, 1]`` on each level.
        attention_weights (Tensor): ``[bs, num_query, heads, levels, points]``.
        im2col_step (int): mmcv's batch chunk of its CUDA op; taken for the signature and
            ignored (every batch element runs in one launch here). Defaults to 64.

    Returns:
        Tensor: ``[bs, num_query, heads * D]``.

    Examples:
        >>> import torch
        >>> shapes = torch.tensor([[8, 10], [4, 5]])
        >>> start = torch.tensor([0, 80])
        >>> value = torch.randn(2, 100, 8, 32)
        >>> loc = torch.rand(2, 30, 8, 2, 4, 2)
        >>> weights = torch.rand(2, 30, 8, 2, 4).softmax(-1)
        >>> ms_deform_attn(value, shapes, start, loc, weights).shape
        torch.Size([2, 30, 256])
    """
    return ms_deform_attn_call(value, spatial_shapes, level_start_index, sampling_locations,
                               attention_weights)


class MultiScaleDeformableAttnFunction:
    """A drop-in for mmcv's ``MultiScaleDeformableAttnFunction`` where it is only applied.

    ``MultiScaleDeformableAttnFunction.apply(value, value_spatial_shapes,
    value_level_start_index, sampling_locations, attention_weights, im2col_step)`` is
    :func:`ms_deform_attn` (mmcv's argument order; ``im2col_step`` ignored), so that
    swapping the import swaps the op. Unlike mmcv's, it also runs on the CPU (the reference).

    Examples:
        >>> import torch
        >>> value = torch.randn(1, 12, 2, 4)
        >>> shapes, start = torch.tensor([[3, 4]]), torch.tensor([0])
        >>> loc, w = torch.rand(1, 5, 2, 1, 3, 2), torch.rand(1, 5, 2, 1, 3)
        >>> MultiScaleDeformableAttnFunction.apply(value, shapes, start, loc, w, 64).shape
        torch.Size([1, 5, 8])
    """

    apply = staticmethod(ms_deform_attn)
