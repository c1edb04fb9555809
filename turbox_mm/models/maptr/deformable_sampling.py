"""What MapTR's two deformable attentions (:class:`.TemporalSelfAttention` and
:class:`.CustomMSDeformableAttention`) share: the sampling op chosen by ``op_impl`` and the
initial sampling offsets (mmcv's, BEVFormer's).

``op_impl='turbox'`` on CUDA runs turbox_mm's MSDA op where it pays and mmcv's CUDA op below
:data:`TURBOX_MIN_SAMPLES` sampling points a call. Measured on the H200 (docs/benchmarks.md,
"Ops", MapTR, commit c7af3f1), forward + backward: at MapTR's decoder sizes the calls are
host-bound and turbox's takes longer to launch (0.59 ms of host time against mmcv's 0.36):
0.825 against 0.399 ms at 4 x 1000 queries (128k samples), 0.816 against 0.723 ms at 4 x 7000
(896k); from the TSA and encoder sizes (5.1M samples) up the GPU time dominates and turbox's
is 2.1x faster. Under ``torch.compile`` the turbox path always runs turbox_mm's op: it traces
through its fake, where mmcv's extension call would break the graph in every layer (under
autocast it then samples in the inputs' dtype where the eager small calls run mmcv's in
float32: the compiled numbers differ in rounding; not measured yet).
"""
import math

import torch
from mmcv.ops.multi_scale_deform_attn import (MultiScaleDeformableAttnFunction,
                                              multi_scale_deformable_attn_pytorch)
from torch import Tensor, nn

from turbox_mm.ops.ms_deform_attn import ms_deform_attn

#: Sampling points a call (batch x queries x heads x levels x points) from which the turbox
#: path runs turbox_mm's MSDA op on CUDA; below, mmcv's CUDA op (module docstring).
TURBOX_MIN_SAMPLES = 1 << 20


def turbox_op_pays(value: Tensor, locations: Tensor) -> bool:
    """Whether the turbox path runs turbox_mm's op for ``locations`` ``[bs, q, heads, levels,
    points, 2]`` on ``value``: off CUDA always (mmcv has no CPU kernel), on CUDA from
    :data:`TURBOX_MIN_SAMPLES` sampling points or while ``torch.compile`` traces (mmcv's op
    would break the graph).

    Examples:
        >>> turbox_op_pays(torch.zeros(4, 20000, 8, 32), torch.zeros(4, 1000, 8, 1, 4, 2))  # CPU
        True
    """
    # is_compiling first: under dynamic shapes the size test would add a guard
    return (torch.compiler.is_compiling() or not value.is_cuda
            or locations[..., 0].numel() >= TURBOX_MIN_SAMPLES)


def deformable_attention(op_impl: str, value: Tensor, spatial_shapes: Tensor,
                         level_start_index: Tensor, locations: Tensor, weights: Tensor,
                         im2col_step: int = 64) -> Tensor:
    """Multi-scale deformable attention ``[bs, q, C]``, mmcv's argument order and layout.

    ``'turbox'``: :func:`turbox_mm.ops.ms_deform_attn.ms_deform_attn` (mmcv's CUDA op for
    small calls, :func:`turbox_op_pays`; the output in ``value``'s dtype); ``'stock'``: mmcv's
    CUDA ``MultiScaleDeformableAttnFunction`` on float32 inputs (BEVFormer's ``_fp32``
    variant; the output stays float32) on CUDA, mmcv's PyTorch function elsewhere.
    """
    if op_impl == 'turbox' and turbox_op_pays(value, locations):
        return ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights,
                              im2col_step)
    if op_impl == 'turbox' or value.is_cuda:  # turbox's small calls (on CUDA) too
        out = MultiScaleDeformableAttnFunction.apply(value.float(), spatial_shapes,
                                                     level_start_index, locations.float(),
                                                     weights.float(), im2col_step)
        return out.to(value.dtype) if op_impl == 'turbox' else out
    return multi_scale_deformable_attn_pytorch(value, spatial_shapes, locations, weights)


def init_sampling(sampling_offsets: nn.Linear, attention_weights: nn.Linear,
                  projections, num_heads: int, num_groups: int, num_points: int) -> None:
    """mmcv's (and BEVFormer's) initialisation: zero offset weights with a bias pointing head
    ``h`` along the angle ``2 pi h / heads`` (scaled to a unit max-norm) ``p + 1`` cells for
    point ``p``, the same for each of the ``num_groups`` (levels, or queue entries x levels);
    zero attention weights (uniform attention); Xavier-uniform ``projections`` with zero
    bias.

    Examples:
        >>> offsets, weights = nn.Linear(4, 2 * 1 * 2 * 2), nn.Linear(4, 2 * 1 * 2)
        >>> init_sampling(offsets, weights, [], num_heads=2, num_groups=1, num_points=2)
        >>> offsets.bias.view(2, 2, 2)[..., 0].tolist()  # head, point; x (y is about 0)
        [[1.0, 2.0], [-1.0, -2.0]]
    """
    nn.init.constant_(sampling_offsets.weight, 0.0)
    thetas = torch.arange(num_heads, dtype=torch.float32) * (2.0 * math.pi / num_heads)
    grid = torch.stack([thetas.cos(), thetas.sin()], -1)
    grid = grid / grid.abs().max(-1, keepdim=True)[0]
    grid = grid.view(num_heads, 1, 1, 2).repeat(1, num_groups, num_points, 1)
    grid = grid * torch.arange(1, num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
    with torch.no_grad():
        sampling_offsets.bias.copy_(grid.view(-1))
    nn.init.constant_(attention_weights.weight, 0.0)
    nn.init.constant_(attention_weights.bias, 0.0)
    for proj in projections:
        nn.init.xavier_uniform_(proj.weight)
        nn.init.constant_(proj.bias, 0.0)
