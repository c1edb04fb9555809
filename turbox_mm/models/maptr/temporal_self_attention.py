"""``TemporalSelfAttention``: BEVFormer's deformable self-attention of the BEV queries over the
previous and the current BEV, as MapTR v1's encoder uses it.

hustvl/MapTR's copy (``bevformer/modules/temporal_self_attention.py``) is not in the search
index; its forks ``kvlton/MapTR`` @ 37891f7 and ``Simon-ying/MapTR`` @ 8132f1a carry the same
code as ``fundamentalvision/BEVFormer`` @ 68e6af5 (the version with batched history), and
MapTR's ``BEVFormerEncoder`` (@ 67cadd8) stacks the history interleaved as that version
expects (docs/design/maptr.md, section 3.1).

The value is a queue of ``num_bev_queue = 2`` BEV maps per sample, interleaved
``[prev_0, cur_0, prev_1, cur_1, ...]`` (``[2B, H * W, C]``); without history it is the query
itself twice. Each query predicts, from ``[value[:B] | query + pos]`` (``2C`` channels), per
head, queue entry, level and point an offset (in cells) and a weight (softmax over levels x
points per head and queue entry); each queue entry's BEV is sampled with multi-scale deformable
attention around the query's 2D reference point, the two results are averaged, projected,
passed through dropout and added to the query.

Upstream quirk kept: the "previous" half of the offset input is ``value[:B]``, the first
``B`` rows of the **interleaved** queue, i.e. sample ``b`` reads row ``b`` = (sample ``b // 2``,
entry ``b % 2``). With ``B = 1`` that is the previous BEV, as intended; with ``B > 1`` and no
history, sample ``b`` reads the query of sample ``b // 2``.

``op_impl`` picks the sampling op: ``'stock'`` runs mmcv's ``MultiScaleDeformableAttnFunction``
on CUDA, fed float32 (BEVFormer's ``MultiScaleDeformableAttnFunction_fp32``), and mmcv's
``multi_scale_deformable_attn_pytorch`` elsewhere; ``'turbox'`` runs
:func:`turbox_mm.ops.ms_deform_attn.ms_deform_attn`. Without history, turbox also does the
same maths in one pass instead of two: both queue entries are the same projected value, so
the value is projected once (``[B, H * W, C]`` instead of ``[2B, H * W, C]``) and the two
entries' points become ``2 x points`` points of one deformable attention with the weights
halved (the average folded into the weighted sum).
"""
from typing import Optional

import torch
from mmengine.model import BaseModule
from torch import Tensor, nn

from turbox_mm.ops.dispatch import check_op_impl
from turbox_mm.registry import MODELS
from .deformable_sampling import deformable_attention, init_sampling


@MODELS.register_module()
class TemporalSelfAttention(BaseModule):
    """BEVFormer's temporal self-attention (module docstring). Batch-first tensors.

    Args:
        embed_dims (int): Channels C. Defaults to 256.
        num_heads (int): Heads. Defaults to 8.
        num_levels (int): Levels of the BEV value. Defaults to 1 (MapTR's config; upstream's
            class default is 4).
        num_points (int): Sampling points per head, queue entry and level. Defaults to 4.
        num_bev_queue (int): BEV maps in the value per sample; only 2 (upstream asserts it).
            Defaults to 2.
        im2col_step (int): mmcv's CUDA batch chunk. Defaults to 64.
        dropout (float): Dropout on the output before the residual. Defaults to 0.1.
        batch_first (bool): Only True (how BEVFormer's encoder calls it). Defaults to True.
        norm_cfg (dict, optional): Ignored, as upstream. Defaults to None.
        op_impl (str): ``'stock'`` or ``'turbox'`` (module docstring). Defaults to 'stock'.
        init_cfg (dict, optional): mmengine's init config. Defaults to None.

    Examples:
        >>> tsa = TemporalSelfAttention(embed_dims=16, num_heads=2, num_points=2)
        >>> query, pos = torch.randn(1, 12, 16), torch.randn(1, 12, 16)
        >>> ref = torch.rand(2, 12, 1, 2)  # the queue's two entries
        >>> shapes, start = torch.tensor([[3, 4]]), torch.tensor([0])
        >>> tsa(query, None, query_pos=pos, reference_points=ref, spatial_shapes=shapes,
        ...     level_start_index=start).shape
        torch.Size([1, 12, 16])
    """

    def __init__(self, embed_dims: int = 256, num_heads: int = 8, num_levels: int = 1,
                 num_points: int = 4, num_bev_queue: int = 2, im2col_step: int = 64,
                 dropout: float = 0.1, batch_first: bool = True, norm_cfg: Optional[dict] = None,
                 op_impl: str = 'stock', init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg)
        name = type(self).__name__
        if embed_dims % num_heads != 0:
            raise ValueError(f'{name}: embed_dims ({embed_dims}) must be divisible by '
                             f'num_heads ({num_heads})')
        if num_bev_queue != 2:
            raise ValueError(f'{name}: num_bev_queue must be 2 (the previous and the current '
                             f'BEV), got {num_bev_queue}')
        if not batch_first:
            raise ValueError(f'{name}: only batch_first=True is supported')
        self.op_impl = check_op_impl(name, op_impl)
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.num_bev_queue = num_bev_queue
        self.im2col_step = im2col_step
        self.batch_first = batch_first
        samples = num_bev_queue * num_heads * num_levels * num_points
        self.sampling_offsets = nn.Linear(embed_dims * num_bev_queue, samples * 2)
        self.attention_weights = nn.Linear(embed_dims * num_bev_queue, samples)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.dropout = nn.Dropout(dropout)
        self.init_weights()

    def init_weights(self) -> None:
        """Upstream's: zero offset weights with a bias pointing head ``h`` along the angle
        ``2 pi h / heads`` (scaled to a unit max-norm) ``p + 1`` cells for point ``p``, the same
        for every queue entry and level; zero attention weights; Xavier-uniform projections
        with zero bias."""
        init_sampling(self.sampling_offsets, self.attention_weights,
                      (self.value_proj, self.output_proj), self.num_heads,
                      self.num_levels * self.num_bev_queue, self.num_points)
        self._is_init = True

    def forward(self, query: Tensor, value: Optional[Tensor] = None,
                identity: Optional[Tensor] = None, query_pos: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None,
                reference_points: Optional[Tensor] = None,
                spatial_shapes: Optional[Tensor] = None,
                level_start_index: Optional[Tensor] = None) -> Tensor:
        """Self-attention of the BEV queries over the BEV queue.

        Args:
            query (Tensor): ``[B, Q, C]``.
            value (Tensor, optional): ``[2B, Q, C]``, previous and current BEV interleaved per
                sample; None (no history) means the query twice.
            identity (Tensor, optional): The residual; defaults to ``query``.
            query_pos (Tensor, optional): ``[B, Q, C]``, added to the query (not the value,
                not the residual).
            key_padding_mask (Tensor, optional): ``[2B, Q]`` bool, True = value row zeroed.
            reference_points (Tensor): ``[2B, Q, levels, 2]`` normalised ``(x, y)`` per queue
                entry (interleaved as the value), or ``[..., 4]`` boxes.
            spatial_shapes (Tensor): ``[levels, 2]`` ``(H, W)`` of the BEV.
            level_start_index (Tensor): ``[levels]``.

        Returns:
            Tensor: ``[B, Q, C]``.
        """
        if identity is None:
            identity = query
        if (value is None and key_padding_mask is None and self.op_impl == 'turbox'
                and reference_points.shape[-1] == 2):
            output = self._single_frame(query, query_pos, reference_points, spatial_shapes,
                                        level_start_index)
        else:
            output = self._queue(query, value, query_pos, key_padding_mask, reference_points,
                                 spatial_shapes, level_start_index)
        return self.dropout(self.output_proj(output)) + identity

    def _offsets_and_weights(self, query: Tensor):
        """``[B, Q, heads, queue, levels, points, 2]`` offsets and the softmaxed weights
        ``[B, Q, heads, queue, levels, points]`` of the ``2C``-channel query."""
        bs, num_query, _ = query.shape
        heads, queue = self.num_heads, self.num_bev_queue
        levels, points = self.num_levels, self.num_points
        offsets = self.sampling_offsets(query).view(bs, num_query, heads, queue, levels, points,
                                                    2)
        weights = self.attention_weights(query).view(bs, num_query, heads, queue,
                                                     levels * points)
        weights = weights.softmax(-1).view(bs, num_query, heads, queue, levels, points)
        return offsets, weights

    def _queue(self, query: Tensor, value: Optional[Tensor], query_pos: Optional[Tensor],
               key_padding_mask: Optional[Tensor], reference_points: Tensor,
               spatial_shapes: Tensor, level_start_index: Tensor) -> Tensor:
        """Upstream's procedure: ``[B, Q, C]`` before the output projection."""
        if value is None:
            bs, len_bev, channels = query.shape
            value = torch.stack([query, query], 1).reshape(bs * 2, len_bev, channels)
        if query_pos is not None:
            query = query + query_pos
        bs, num_query, embed_dims = query.shape
        num_value = value.shape[1]
        heads, queue = self.num_heads, self.num_bev_queue
        levels, points = self.num_levels, self.num_points
        query = torch.cat([value[:bs], query], -1)
        value = self.value_proj(value)
        if key_padding_mask is not None:
            value = value.masked_fill(key_padding_mask[..., None], 0.0)
        value = value.reshape(bs * queue, num_value, heads, -1)
        offsets, weights = self._offsets_and_weights(query)
        weights = weights.permute(0, 3, 1, 2, 4, 5).reshape(bs * queue, num_query, heads,
                                                            levels, points).contiguous()
        offsets = offsets.permute(0, 3, 1, 2, 4, 5, 6).reshape(bs * queue, num_query, heads,
                                                               levels, points, 2)
        locations = self._locations(reference_points, offsets, spatial_shapes)
        output = deformable_attention(self.op_impl, value, spatial_shapes, level_start_index,
                                      locations, weights, self.im2col_step)
        output = output.permute(1, 2, 0).reshape(num_query, embed_dims, bs, queue).mean(-1)
        return output.permute(2, 0, 1)

    def _locations(self, reference_points: Tensor, offsets: Tensor,
                   spatial_shapes: Tensor) -> Tensor:
        """Sampling locations ``[n, Q, heads, levels, points, 2]`` of offsets ``[n, Q,
        heads, levels, points, 2]`` around ``reference_points`` ``[n, Q, levels, 2 or 4]``."""
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
            return (reference_points[:, :, None, :, None, :] +
                    offsets / normalizer[None, None, None, :, None, :])
        if reference_points.shape[-1] == 4:
            return (reference_points[:, :, None, :, None, :2] + offsets / self.num_points *
                    reference_points[:, :, None, :, None, 2:] * 0.5)
        raise ValueError(f'{type(self).__name__}: reference_points must end in 2 or 4, got '
                         f'shape {tuple(reference_points.shape)}')

    def _single_frame(self, query: Tensor, query_pos: Optional[Tensor],
                      reference_points: Tensor, spatial_shapes: Tensor,
                      level_start_index: Tensor) -> Tensor:
        """Turbox without history: both queue entries in one deformable attention over the
        once-projected query (module docstring)."""
        bs, num_query, _ = query.shape
        heads, queue = self.num_heads, self.num_bev_queue
        levels, points = self.num_levels, self.num_points
        # value[:bs] of upstream's interleaved [q_0, q_0, q_1, q_1, ...] is q_{b // 2}.
        previous = query[torch.arange(bs, device=query.device) // queue]
        current = query if query_pos is None else query + query_pos
        offsets, weights = self._offsets_and_weights(torch.cat([previous, current], -1))
        value = self.value_proj(query).view(bs, query.shape[1], heads, -1)
        reference = reference_points.view(bs, queue, num_query, levels, 2)
        normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
        # [B, Q, heads, queue, levels, points, 2], then the queue folded into the points
        locations = (reference.permute(0, 2, 1, 3, 4)[:, :, None, :, :, None, :] +
                     offsets / normalizer[:, None, :])
        locations = locations.permute(0, 1, 2, 4, 3, 5, 6).reshape(bs, num_query, heads, levels,
                                                                   queue * points, 2)
        weights = (weights / queue).permute(0, 1, 2, 4, 3, 5).reshape(bs, num_query, heads,
                                                                      levels, queue * points)
        return deformable_attention(self.op_impl, value, spatial_shapes, level_start_index,
                                    locations, weights, self.im2col_step)
