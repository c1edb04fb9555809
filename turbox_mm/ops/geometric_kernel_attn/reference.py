"""Geometric kernel attention in plain PyTorch: the specification and the CPU path.

MapTR's ``GeometricKernelAttentionFunc`` (hustvl/MapTR @ 67cadd8,
``projects/mmdet3d_plugin/maptr/modules/ops/geometric_kernel_attn/``, a CUDA extension of its
own) computes, for batch element ``b``, query ``q``, head ``h`` and channel ``c``::

    out[b, q, h * D + c] = sum over levels l, points p of
        attn_weight[b, q, h, l, p] *
        value[b, start_l + clamp(y, 0, H_l - 1) * W_l + clamp(x, 0, W_l - 1), h, c]

with ``(x, y) = sampling_loc[b, q, h, l, p]`` **integer** pixel coordinates (column, row) on
level ``l``, ``(H_l, W_l) = spatial_shapes[l]`` and ``start_l = level_start_index[l]``: a
nearest-pixel gather (the caller has already rounded the locations) with the locations clamped
to the level's border, never zero padding. MapTR's ``GeometryKernelAttention`` samples a fixed
3 x 5 pixel window around each projected reference point this way; the points near or off the
image edge read the edge pixels.

Gradients, as upstream's backward kernel: ``value`` (each sample adds ``w * grad_out`` to the
pixel it read) and ``attn_weight`` (``sum over c of grad_out * value`` at the pixel).
``sampling_loc`` is an integer tensor and gets none; ``spatial_shapes`` and
``level_start_index`` are integer tables.

Where this differs from the CUDA extension (on inputs MapTR never produces):

- A level whose pixels run past ``num_value`` is an error here; upstream reads past the level
  (turbox's kernel reads zero for that level, see :mod:`.triton_kernels`). A level with no
  pixels (``H_l * W_l = 0``) contributes nothing; upstream's clamp then reads pixel -1.
- The clamp is done in int64; upstream first truncates the int64 locations to 32-bit ``int``,
  which only matters beyond 2**31.
"""
from typing import List

import torch


def geometric_kernel_attn_reference(value: torch.Tensor, spatial_shapes: torch.Tensor,
                                    level_start_index: torch.Tensor, sampling_loc: torch.Tensor,
                                    attn_weight: torch.Tensor) -> torch.Tensor:
    """Geometric kernel attention by indexing: clamp, flatten to a row of ``value``, gather.

    Differentiable with respect to ``value`` and ``attn_weight``. The arithmetic runs in the
    promoted floating type of the two (the CUDA extension requires them equal); the result
    has ``value``'s dtype.

    Args:
        value (Tensor): ``[bs, num_value, heads, D]``, the levels' pixels one after the other,
            each level row-major.
        spatial_shapes (Tensor): ``[levels, 2]`` integer ``(H, W)`` of each level.
        level_start_index (Tensor): ``[levels]`` integer first row of each level in ``value``.
        sampling_loc (Tensor): ``[bs, num_query, heads, levels, points, 2]`` integer
            ``(x, y)`` pixel coordinates on each level.
        attn_weight (Tensor): ``[bs, num_query, heads, levels, points]``.

    Returns:
        Tensor: ``[bs, num_query, heads * D]``.

    Raises:
        ValueError: A level's pixels run past ``num_value``.

    Examples:
        >>> import torch
        >>> value = torch.arange(6.).reshape(1, 6, 1, 1)  # one 2x3 level: rows [0 1 2], [3 4 5]
        >>> shapes, start = torch.tensor([[2, 3]]), torch.tensor([0])
        >>> # Two points: (x, y) = (2, 1), and (7, -4), clamped to (2, 0).
        >>> loc = torch.tensor([[2, 1], [7, -4]]).reshape(1, 1, 1, 1, 2, 2)
        >>> w = torch.tensor([1., 10.]).reshape(1, 1, 1, 1, 2)
        >>> geometric_kernel_attn_reference(value, shapes, start, loc, w)  # 1 * 5 + 10 * 2
        tensor([[[25.]]])
    """
    bs, num_value, heads, dims = value.shape
    num_query = sampling_loc.shape[1]
    dtype = torch.promote_types(value.dtype, attn_weight.dtype)
    shapes: List[List[int]] = spatial_shapes.tolist()
    starts: List[int] = level_start_index.tolist()
    val = value.to(dtype)
    weights = attn_weight.to(dtype)
    batch = torch.arange(bs, device=value.device).view(bs, 1, 1, 1)
    head = torch.arange(heads, device=value.device).view(1, 1, heads, 1)
    out = val.new_zeros(bs, num_query, heads, dims)
    for lvl, (height, width) in enumerate(shapes):
        start = starts[lvl]
        if start < 0 or start + height * width > num_value:
            raise ValueError(f'geometric_kernel_attn: level {lvl} ({height}x{width} from row '
                             f'{start}) runs past num_value = {num_value}')
        if height * width == 0:  # no pixel to read
            continue
        x = sampling_loc[:, :, :, lvl, :, 0].long().clamp(0, width - 1)
        y = sampling_loc[:, :, :, lvl, :, 1].long().clamp(0, height - 1)
        rows = start + y * width + x  # [bs, num_query, heads, points]: rows of value[b]
        sampled = val[batch, rows, head]  # [bs, num_query, heads, points, D]
        out = out + (sampled * weights[:, :, :, lvl, :, None]).sum(dim=3)
    return out.reshape(bs, num_query, heads * dims).to(value.dtype)
