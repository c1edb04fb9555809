"""Deformable aggregation: Sparse4D's multi-camera, multi-level sampling op.

For each anchor keypoint, bilinear samples from every camera and level, weighted per group and
summed: ``(mc_ms_feat [bs, cams * sum(HW), C], spatial_shape [cams, levels, 2],
scale_start_index [cams, levels], sampling_location [bs, anchors, pts, cams, 2],
weights [bs, anchors, pts, cams, levels, groups]) -> [bs, anchors, C]``, the signature and the
numbers of upstream's ``DeformableAggregationFunction``.

- :mod:`.reference`: the specification in plain PyTorch (``grid_sample`` per camera and
  level), and :func:`feature_maps_format` (FPN outputs to the op's layout).
- :mod:`.triton_kernels`: the forward and backward kernels.
- :mod:`.op`: ``torch.ops.turbox_mm.deformable_aggregation`` with its fake implementation and
  autograd, and the dispatch: CUDA tensors with Triton -> kernels; otherwise -> reference,
  with one warning. ``TURBOX_OPS_REFERENCE=1`` forces the reference.
"""
from torch import Tensor

from .op import ENV_FORCE_REFERENCE, deformable_aggregation_call, fallback_reason
from .reference import deformable_aggregation_reference, feature_maps_format

__all__ = [
    'deformable_aggregation', 'deformable_aggregation_reference', 'feature_maps_format',
    'fallback_reason', 'ENV_FORCE_REFERENCE'
]


def deformable_aggregation(mc_ms_feat: Tensor, spatial_shape: Tensor, scale_start_index: Tensor,
                           sampling_location: Tensor, weights: Tensor) -> Tensor:
    """Sparse4D's deformable aggregation; a drop-in for upstream's
    ``deformable_aggregation_function``.

    ``out[b, a, c] = sum over points p, cameras k, levels l of weights[b, a, p, k, l, g] *
    bilinear(map(b, k, l)[c] at (x * W - 0.5, y * H - 0.5))`` with ``g = c // (C / groups)``
    and ``(x, y) = sampling_location[b, a, p, k]``; a (point, camera) pair counts only if
    ``0 < x < 1`` and ``0 < y < 1``, corners off the map read zero (details in
    :mod:`.reference`). Differentiable in ``mc_ms_feat``, ``sampling_location`` and
    ``weights``; traceable by ``torch.compile`` without a graph break.

    The kernel accumulates in float32 and accepts float16/bfloat16 (also mixed, e.g. 16-bit
    features with float32 weights, as under autocast); the result has ``mc_ms_feat``'s dtype
    (upstream's op returns float32 whatever the input).

    Args:
        mc_ms_feat (Tensor): ``[bs, num_feat, C]``, every camera's maps of every level,
            channels last (see :func:`feature_maps_format`).
        spatial_shape (Tensor): ``[cams, levels, 2]`` integer ``(H, W)`` of each map.
        scale_start_index (Tensor): ``[cams, levels]`` integer first row of each map.
        sampling_location (Tensor): ``[bs, anchors, pts, cams, 2]``, ``(x, y)`` in ``[0, 1]``.
        weights (Tensor): ``[bs, anchors, pts, cams, levels, groups]``.

    Returns:
        Tensor: ``[bs, anchors, C]``.

    Examples:
        >>> import torch
        >>> maps = [torch.randn(2, 6, 16, 8, 22), torch.randn(2, 6, 16, 4, 11)]
        >>> feat, shape, start = feature_maps_format(maps)
        >>> loc = torch.rand(2, 10, 13, 6, 2)
        >>> weights = torch.rand(2, 10, 13, 6, 2, 4)
        >>> deformable_aggregation(feat, shape, start, loc, weights).shape
        torch.Size([2, 10, 16])
    """
    return deformable_aggregation_call(mc_ms_feat, spatial_shape, scale_start_index,
                                       sampling_location, weights)
