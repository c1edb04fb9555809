"""``GeometryKernelAttention``: MapTR v1's attention of BEV queries to one camera's features.

Upstream ``maptr/modules/geometry_kernel_attention.py`` @ 67cadd8 (docs/design/maptr.md,
sections 3.1 and 8.2). A query comes with the projections of its pillar's ``D`` anchors into
the camera (``reference_points [bs, q, D, 2]``, normalised ``(u, v)``); **head ``h`` reads
around anchor ``h``** (so ``num_heads`` must equal ``D``: 4 heads = 4 anchors in
``maptr_tiny_r50_24e``). Around each anchor's pixel ``(u W_l, v H_l)`` (no ``-0.5``) on level
``l`` it reads the fixed ``kernel_size = (kh, kw)`` window of offsets ``dx`` in
``-(kw // 2) .. kw // 2``, ``dy`` in ``-(kh // 2) .. kh // 2`` (times ``dilation``), ordered
``dx``-major, ``dy``-minor (upstream's ``meshgrid(x, y)``), rounds the locations half to even
(``round()``) to integer pixels, and sums the pixels' projected values (``value_proj``, nearest
pixel, clamped to the border) with weights that are a softmax over ``levels x kh x kw`` per head
of ``attention_weights(query)``. There are no sampling offsets, no output projection and no
residual inside; the caller (:class:`.GeometrySptialCrossAttention`) adds them.

``op_impl`` picks the op: ``'stock'`` runs turbox_mm's PyTorch reference of the op
(:func:`turbox_mm.ops.geometric_kernel_attn.geometric_kernel_attn_reference`: upstream compiles
its own CUDA extension, which no package ships and which does not build on current PyTorch),
``'turbox'`` the op :func:`turbox_mm.ops.geometric_kernel_attn.geometric_kernel_attn` (Triton
kernels on CUDA, the same reference elsewhere). The like-for-like stock row of a benchmark is
therefore "stock + turbox op": a stock encoder whose ``attention`` sets ``op_impl='turbox'``.

The forward is split into :meth:`weights`, :meth:`locations`, :meth:`project_value` and
:meth:`sample` so that the turbox spatial cross-attention can compute a query's weights once
for every camera.
"""
import warnings
from typing import Optional, Sequence

import torch
from mmengine.model import BaseModule
from torch import Tensor, nn

from turbox_mm.ops.dispatch import check_op_impl
from turbox_mm.ops.geometric_kernel_attn import (geometric_kernel_attn,
                                                 geometric_kernel_attn_reference)
from turbox_mm.registry import MODELS


def kernel_offsets(kernel_size: Sequence[int], dilation: int = 1) -> Tensor:
    """``[kh * kw, 2]`` int64 ``(dx, dy)`` pixel offsets of the window, ``dx``-major.

    Examples:
        >>> kernel_offsets((3, 5))[:4].tolist()
        [[-2, -1], [-2, 0], [-2, 1], [-1, -1]]
    """
    grid_h, grid_w = kernel_size
    dy = (torch.arange(grid_h) - grid_h // 2) * dilation
    dx = (torch.arange(grid_w) - grid_w // 2) * dilation
    grid = torch.stack(torch.meshgrid(dx, dy, indexing='ij'), -1)  # [kw, kh, 2]
    return grid.reshape(grid_h * grid_w, 2)


@MODELS.register_module()
class GeometryKernelAttention(BaseModule):
    """Geometric kernel attention (module docstring). Batch-first tensors.

    Args:
        embed_dims (int): Channels C. Defaults to 256.
        num_heads (int): Heads, one per pillar anchor. Defaults to 4 (MapTR's config;
            upstream's class default is 8).
        num_levels (int): Feature levels. Defaults to 1 (MapTR's config; upstream's 4).
        num_points (int): Ignored, as upstream (the points are the window's ``kh * kw``).
            Defaults to 4.
        kernel_size (tuple[int, int]): ``(kh, kw)``. Defaults to (3, 5) (MapTR's config;
            upstream's class default is (3, 3)).
        dilation (int): Window step in pixels. Defaults to 1.
        im2col_step (int): Upstream's op batch chunk (ignored by both ops). Defaults to 64.
        dropout (float): Ignored, as upstream (no dropout layer). Defaults to 0.1.
        batch_first (bool): Only True (how the encoder calls it). Defaults to True.
        norm_cfg (dict, optional): Ignored, as upstream. Defaults to None.
        op_impl (str): ``'stock'`` or ``'turbox'`` (module docstring). Defaults to 'stock'.
        init_cfg (dict, optional): mmengine's init config. Defaults to None.

    Examples:
        >>> attn = GeometryKernelAttention(embed_dims=16, num_heads=4)
        >>> query, value = torch.randn(2, 7, 16), torch.randn(2, 12, 16)
        >>> ref = torch.rand(2, 7, 4, 2)  # (u, v) of 4 anchors
        >>> attn(query, value, ref, torch.tensor([[3, 4]]), torch.tensor([0])).shape
        torch.Size([2, 7, 16])
    """

    def __init__(self, embed_dims: int = 256, num_heads: int = 4, num_levels: int = 1,
                 num_points: int = 4, kernel_size: Sequence[int] = (3, 5), dilation: int = 1,
                 im2col_step: int = 64, dropout: float = 0.1, batch_first: bool = True,
                 norm_cfg: Optional[dict] = None, op_impl: str = 'stock',
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg)
        name = type(self).__name__
        if embed_dims % num_heads != 0:
            raise ValueError(f'{name}: embed_dims ({embed_dims}) must be divisible by '
                             f'num_heads ({num_heads})')
        if not batch_first:
            raise ValueError(f'{name}: only batch_first=True is supported')
        dims = embed_dims // num_heads
        if dims & (dims - 1):
            warnings.warn(f'{name}: {dims} channels per head; a power of 2 suits the kernels '
                          'best')
        self.op_impl = check_op_impl(name, op_impl)
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.kernel_size = tuple(kernel_size)
        self.num_points = self.kernel_size[0] * self.kernel_size[1]
        self.im2col_step = im2col_step
        self.batch_first = batch_first
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * self.num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.register_buffer('grid_offsets', kernel_offsets(self.kernel_size, dilation),
                             persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        """Upstream's: zero attention weights (uniform attention), Xavier-uniform value
        projection with zero bias. (MapTR's transformer init later makes the attention weight
        matrix Xavier-uniform too: see :class:`.MapTRPerceptionTransformer`.)"""
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        self._is_init = True

    # -- pieces ---------------------------------------------------------------------------------

    def weights(self, query: Tensor) -> Tensor:
        """``[..., q, heads, levels, kh * kw]``: the softmax over each head's
        ``levels * kh * kw`` weights of ``query`` ``[..., q, C]``."""
        lead = query.shape[:-1]
        weights = self.attention_weights(query).view(*lead, self.num_heads,
                                                     self.num_levels * self.num_points)
        return weights.softmax(-1).view(*lead, self.num_heads, self.num_levels,
                                        self.num_points)

    def locations(self, reference_points: Tensor, spatial_shapes: Tensor,
                  dtype: torch.dtype = torch.int64) -> Tensor:
        """``[..., q, heads, levels, kh * kw, 2]`` integer ``(x, y)`` pixels: anchor ``h``'s
        ``(u W_l, v H_l)`` plus the window's offsets, rounded half to even.

        Args:
            reference_points (Tensor): ``[..., q, heads, 2]`` normalised ``(u, v)``.
            spatial_shapes (Tensor): ``[levels, 2]`` ``(H, W)``.
            dtype (torch.dtype): int64 (upstream's) or int32 (the same pixels for any
                location within 2**31; half the memory). Defaults to int64.
        """
        if reference_points.shape[-2] != self.num_heads or reference_points.shape[-1] != 2:
            raise ValueError(f'{type(self).__name__}: reference_points must be [..., q, '
                             f'{self.num_heads} (one anchor a head), 2], got '
                             f'{tuple(reference_points.shape)}')
        with torch.no_grad():
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
            pixels = reference_points[..., None, :] * normalizer  # [..., q, heads, levels, 2]
            return (pixels[..., None, :] + self.grid_offsets).round().to(dtype)

    def project_value(self, value: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """``[bs, num_value, heads, C / heads]`` from ``value`` ``[bs, num_value, C]``;
        rows where ``key_padding_mask`` is True are zeroed."""
        value = self.value_proj(value)
        if key_padding_mask is not None:
            value = value.masked_fill(key_padding_mask[..., None], 0.0)
        return value.view(*value.shape[:2], self.num_heads, -1)

    def sample(self, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
               locations: Tensor, weights: Tensor) -> Tensor:
        """The op of ``op_impl``: ``[bs, q, C]``."""
        if self.op_impl == 'turbox':
            return geometric_kernel_attn(value, spatial_shapes, level_start_index, locations,
                                         weights, self.im2col_step)
        return geometric_kernel_attn_reference(value, spatial_shapes, level_start_index,
                                               locations.contiguous(), weights)

    # -- forward --------------------------------------------------------------------------------

    def forward(self, query: Tensor, value: Optional[Tensor], reference_points: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor,
                query_pos: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """Attend from ``query`` to ``value`` around the projected anchors.

        Args:
            query (Tensor): ``[bs, q, C]``.
            value (Tensor, optional): ``[bs, num_value, C]``, the levels' pixels one after the
                other (row-major); None means ``query``.
            reference_points (Tensor): ``[bs, q, heads, 2]`` normalised ``(u, v)`` of each
                head's anchor.
            spatial_shapes (Tensor): ``[levels, 2]`` ``(H, W)``.
            level_start_index (Tensor): ``[levels]``.
            query_pos (Tensor, optional): Added to the query.
            key_padding_mask (Tensor, optional): ``[bs, num_value]`` bool, True = zeroed.

        Returns:
            Tensor: ``[bs, q, C]`` (no projection, no residual).
        """
        if value is None:
            value = query
        if query_pos is not None:
            query = query + query_pos
        return self.sample(self.project_value(value, key_padding_mask), spatial_shapes,
                           level_start_index, self.locations(reference_points, spatial_shapes),
                           self.weights(query))
