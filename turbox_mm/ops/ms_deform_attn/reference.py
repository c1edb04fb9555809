"""Multi-scale deformable attention in plain PyTorch: the specification and the CPU path.

mmcv 2.1's ``MultiScaleDeformableAttnFunction`` (``mmcv/ops/multi_scale_deform_attn.py``, CUDA
kernels in ``mmcv/ops/csrc/common/cuda/ms_deform_attn_cuda_kernel.cuh``, from Deformable DETR)
computes, for batch element ``b``, query ``q``, head ``h`` and channel ``c``::

    out[b, q, h * D + c] = sum over levels l, points p of
        attention_weights[b, q, h, l, p] *
        bilinear(level l of value[b, :, h, c], x * W_l - 0.5, y * H_l - 0.5)

with ``(x, y) = sampling_locations[b, q, h, l, p]`` normalised to ``[0, 1]`` on level ``l``
and ``(H_l, W_l) = spatial_shapes[l]``. Pixel ``(i, j)`` of level ``l`` is row
``level_start_index[l] + i * W_l + j`` of ``value[b]`` (levels flattened row-major, one after
the other). Conventions, as in mmcv's ``multi_scale_deformable_attn_pytorch``:

- Pixel coordinates are ``loc * size - 0.5``: ``F.grid_sample``'s ``align_corners=False``
  convention with ``grid = 2 * loc - 1``.
- Bilinear corners that fall off the map read zero (``padding_mode='zeros'``); a location
  far outside ``[0, 1]`` contributes nothing.
- Gradients flow to ``value``, ``sampling_locations`` and ``attention_weights``;
  ``spatial_shapes`` and ``level_start_index`` are integer tables.

mmcv's CUDA kernel skips a sample unless ``-1 < x * W - 0.5 < W`` and ``-1 < y * H - 0.5 < H``;
outside that range every corner is off the map, so it differs from ``grid_sample`` only for a
location exactly on that boundary (where the forward is zero either way, and ``grid_sample``
still gives a location gradient from the one corner at weight 0) and for non-finite locations
(skipped). turbox's kernel follows the CUDA kernel there.
"""
from typing import List

import torch
import torch.nn.functional as F


def ms_deform_attn_reference(value: torch.Tensor, spatial_shapes: torch.Tensor,
                             level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                             attention_weights: torch.Tensor) -> torch.Tensor:
    """Multi-scale deformable attention with ``F.grid_sample``, one call per level.

    The same computation as mmcv's ``multi_scale_deformable_attn_pytorch``, with each level
    read from ``level_start_index`` (mmcv's function splits ``value`` by the level sizes: the
    same rows whenever the index is the running sum of ``H_l * W_l``, as everywhere in mmcv).
    Differentiable with respect to ``value``, ``sampling_locations`` and
    ``attention_weights``. The arithmetic runs in the promoted floating type of the three
    (``grid_sample`` needs one type; mmcv's function requires them equal); the result has
    ``value``'s dtype.

    Args:
        value (Tensor): ``[bs, num_value, heads, D]``.
        spatial_shapes (Tensor): ``[levels, 2]`` integer ``(H, W)`` of each level.
        level_start_index (Tensor): ``[levels]`` integer first row of each level in ``value``.
        sampling_locations (Tensor): ``[bs, num_query, heads, levels, points, 2]``, ``(x, y)``
            normalised to ``[0, 1]`` on each level.
        attention_weights (Tensor): ``[bs, num_query, heads, levels, points]``.

    Returns:
        Tensor: ``[bs, num_query, heads * D]``.

    Raises:
        ValueError: A level's rows run past ``num_value``.

    Examples:
        >>> import torch
        >>> value = torch.arange(6.).reshape(1, 6, 1, 1)  # one 2x3 level: rows [0 1 2], [3 4 5]
        >>> shapes, start = torch.tensor([[2, 3]]), torch.tensor([0])
        >>> loc = torch.tensor([0.5, 0.5]).reshape(1, 1, 1, 1, 1, 2)  # x = 1.0 px, y = 0.5 px
        >>> ms_deform_attn_reference(value, shapes, start, loc, torch.ones(1, 1, 1, 1, 1))
        tensor([[[2.5000]]])
    """
    bs, num_value, heads, dims = value.shape
    _, num_query, _, levels, points, _ = sampling_locations.shape
    dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype),
                                attention_weights.dtype)
    val = value.to(dtype)
    grids = 2 * sampling_locations.to(dtype) - 1
    shapes: List[List[int]] = spatial_shapes.tolist()
    starts: List[int] = level_start_index.tolist()
    sampled = []
    for lvl, (height, width) in enumerate(shapes):
        start = starts[lvl]
        if start < 0 or start + height * width > num_value:
            raise ValueError(f'ms_deform_attn: level {lvl} ({height}x{width} from row {start}) '
                             f'runs past num_value = {num_value}')
        # [bs, H*W, heads, D] -> [bs * heads, D, H, W]
        val_l = val[:, start:start + height * width].flatten(2).transpose(1, 2).reshape(
            bs * heads, dims, height, width)
        # [bs, num_query, heads, points, 2] -> [bs * heads, num_query, points, 2]
        grid_l = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(val_l, grid_l, mode='bilinear', padding_mode='zeros',
                                     align_corners=False))  # [bs * heads, D, num_query, points]
    # [bs, num_query, heads, levels, points] -> [bs * heads, 1, num_query, levels * points]
    weights = attention_weights.to(dtype).transpose(1, 2).reshape(bs * heads, 1, num_query,
                                                                  levels * points)
    if sampled:
        stacked = torch.stack(sampled, dim=-2).flatten(-2)  # [bs * heads, D, q, levels * pts]
        out = (stacked * weights).sum(-1)
    else:
        out = val.new_zeros(bs * heads, dims, num_query)
    out = out.view(bs, heads * dims, num_query).transpose(1, 2)
    return out.contiguous().to(value.dtype)


def multi_scale_deformable_attn_pytorch(value: torch.Tensor, value_spatial_shapes: torch.Tensor,
                                        sampling_locations: torch.Tensor,
                                        attention_weights: torch.Tensor) -> torch.Tensor:
    """mmcv's ``multi_scale_deformable_attn_pytorch``, same signature and result.

    The levels follow one another in ``value`` (start rows are the running sum of
    ``H_l * W_l``). See :func:`ms_deform_attn_reference`.
    """
    counts = value_spatial_shapes[:, 0] * value_spatial_shapes[:, 1]
    level_start_index = counts.cumsum(0) - counts
    return ms_deform_attn_reference(value, value_spatial_shapes, level_start_index,
                                    sampling_locations, attention_weights)
