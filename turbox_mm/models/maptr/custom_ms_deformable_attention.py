"""``CustomMSDeformableAttention``: the decoder's cross-attention of MapTR over the BEV.

BEVFormer's decoder attention, which MapTR imports (``bevformer/modules/decoder.py``): the
maths of mmcv's ``MultiScaleDeformableAttention`` with a 2D reference point per query. Each
query (plus its positional embedding) predicts, per head, level and point, an offset in cells
of the level and an attention weight (softmax over levels x points); the value (the BEV
embedding, projected) is sampled bilinearly at reference + offset / (W, H), the samples are
summed with the weights, projected and added to the query through dropout.

``op_impl`` picks the sampling op: ``'stock'`` runs mmcv's ``MultiScaleDeformableAttnFunction``
on CUDA (fed float32, as BEVFormer's ``MultiScaleDeformableAttnFunction_fp32`` that MapTR
calls) and mmcv's ``multi_scale_deformable_attn_pytorch`` elsewhere; ``'turbox'`` runs
:func:`turbox_mm.ops.ms_deform_attn.ms_deform_attn` (Triton kernels on CUDA, its reference on
the CPU), with the inputs' own dtypes.
"""
from typing import Optional

import torch
from mmengine.model import BaseModule
from torch import Tensor, nn

from turbox_mm.ops.dispatch import check_op_impl
from turbox_mm.registry import MODELS
from .deformable_sampling import deformable_attention, init_sampling


@MODELS.register_module()
class CustomMSDeformableAttention(BaseModule):
    """Deformable cross-attention from queries with 2D reference points (module docstring).

    Tensors are batch-first: query ``[B, Nq, C]``, value ``[B, Nv, C]``.

    Args:
        embed_dims (int): Channels C. Defaults to 256.
        num_heads (int): Heads (C divisible by it). Defaults to 8.
        num_levels (int): Levels of the value map. Defaults to 1 (MapTR's BEV; the class
            default upstream is 4).
        num_points (int): Sampling points per head and level. Defaults to 4.
        im2col_step (int): mmcv's CUDA batch chunk. Defaults to 64.
        dropout (float): Dropout on the output before the residual. Defaults to 0.1.
        op_impl (str): ``'stock'`` or ``'turbox'`` (module docstring). Defaults to 'stock'.
        init_cfg (dict, optional): mmengine's init config. Defaults to None.

    Examples:
        >>> attn = CustomMSDeformableAttention(embed_dims=16, num_heads=2, num_points=2)
        >>> query, value = torch.randn(1, 5, 16), torch.randn(1, 12, 16)
        >>> ref = torch.rand(1, 5, 1, 2)
        >>> shapes, start = torch.tensor([[3, 4]]), torch.tensor([0])
        >>> attn(query, value, ref, shapes, start).shape
        torch.Size([1, 5, 16])
    """

    def __init__(self, embed_dims: int = 256, num_heads: int = 8, num_levels: int = 1,
                 num_points: int = 4, im2col_step: int = 64, dropout: float = 0.1,
                 op_impl: str = 'stock', init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg)
        if embed_dims % num_heads != 0:
            raise ValueError(f'CustomMSDeformableAttention: embed_dims ({embed_dims}) must be '
                             f'divisible by num_heads ({num_heads})')
        self.op_impl = check_op_impl('CustomMSDeformableAttention', op_impl)
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.im2col_step = im2col_step
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.dropout = nn.Dropout(dropout)
        self.init_weights()

    def init_weights(self) -> None:
        """mmcv's (and BEVFormer's) init: zero offset weights with a bias pointing head ``h``
        along the angle ``2 pi h / heads`` (scaled to a unit max-norm) ``p + 1`` cells for
        point ``p``; zero attention weights (uniform attention); Xavier-uniform projections
        with zero bias."""
        init_sampling(self.sampling_offsets, self.attention_weights,
                      (self.value_proj, self.output_proj), self.num_heads, self.num_levels,
                      self.num_points)
        self._is_init = True

    def forward(self, query: Tensor, value: Tensor, reference_points: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor,
                query_pos: Optional[Tensor] = None, identity: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """Attend from ``query`` to ``value`` around ``reference_points``.

        Args:
            query (Tensor): ``[B, Nq, C]``.
            value (Tensor): ``[B, Nv, C]``, the levels' cells one after the other (row-major).
            reference_points (Tensor): ``[B, Nq, levels, 2]`` normalised ``(x, y)``.
            spatial_shapes (Tensor): ``[levels, 2]`` integer ``(H, W)``.
            level_start_index (Tensor): ``[levels]`` first row of each level in ``value``.
            query_pos (Tensor, optional): Added to the query (not to the identity).
            identity (Tensor, optional): The residual; defaults to ``query``.
            key_padding_mask (Tensor, optional): ``[B, Nv]`` bool, True = value row zeroed.

        Returns:
            Tensor: ``[B, Nq, C]``.
        """
        if reference_points.shape[-1] != 2:
            raise ValueError('CustomMSDeformableAttention: reference_points must end in 2 '
                             f'(x, y), got shape {tuple(reference_points.shape)}')
        if identity is None:
            identity = query
        if query_pos is not None:
            query = query + query_pos
        bs, num_query, _ = query.shape
        num_value = value.shape[1]
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value)
        if key_padding_mask is not None:
            value = value.masked_fill(key_padding_mask[..., None], 0.0)
        value = value.view(bs, num_value, heads, -1)
        offsets = self.sampling_offsets(query).view(bs, num_query, heads, levels, points, 2)
        weights = self.attention_weights(query).view(bs, num_query, heads, levels * points)
        weights = weights.softmax(-1).view(bs, num_query, heads, levels, points)
        normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
        locations = (reference_points[:, :, None, :, None, :] +
                     offsets / normalizer[None, None, None, :, None, :])
        output = self.sample(value, spatial_shapes, level_start_index, locations, weights)
        return self.dropout(self.output_proj(output)) + identity

    def sample(self, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
               locations: Tensor, weights: Tensor) -> Tensor:
        """The multi-scale deformable attention op of ``op_impl``: ``[B, Nq, C]``."""
        out = deformable_attention(self.op_impl, value, spatial_shapes, level_start_index,
                                   locations, weights, self.im2col_step)
        return out.to(value.dtype)
