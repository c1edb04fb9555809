"""MapTR v2's decoder layer with decoupled self-attention.

Upstream's ``DecoupledDetrTransformerDecoderLayer`` (``modules/decoder.py`` @ baf0798),
``operation_order=('self_attn', 'norm', 'self_attn', 'norm', 'cross_attn', 'norm', 'ffn',
'norm')``: the ``V x P`` point queries first attend across instances (for each point index
``p``, the ``V`` queries of that index form one sequence, with the ``[V, V]`` mask that keeps
the one-to-one and one-to-many groups apart), then within each instance (its ``P`` queries
form one sequence, no mask); then cross-attention and the FFN as in v1. Upstream lays the
sequences out as ``[V, P * B, C]`` and ``[P, V * B, C]``; here they are ``[B * P, V, C]`` and
``[B * V, P, C]`` (batch-first): every sequence is the same, only the order of the
independent sequences in the batch differs.
"""
from typing import Optional

from torch import Tensor

from turbox_mm.registry import MODELS
from .maptr_decoder_layer import MapTRDecoderLayer


@MODELS.register_module()
class DecoupledMapTRDecoderLayer(MapTRDecoderLayer):
    """MapTR v2's decoder layer (module docstring); arguments as
    :class:`MapTRDecoderLayer` (both self-attentions share ``self_attn_cfg``).

    Examples:
        >>> import torch
        >>> layer = DecoupledMapTRDecoderLayer(
        ...     self_attn_cfg=dict(embed_dims=16, num_heads=2),
        ...     cross_attn_cfg=dict(embed_dims=16, num_heads=2, num_points=2),
        ...     ffn_cfg=dict(embed_dims=16, feedforward_channels=32))
        >>> query, pos, bev = torch.randn(2, 6, 16), torch.randn(2, 6, 16), torch.randn(2, 12, 16)
        >>> ref = torch.rand(2, 6, 1, 2)
        >>> layer(query, pos, bev, ref, torch.tensor([[3, 4]]), torch.tensor([0]),
        ...       num_vec=3, num_pts_per_vec=2).shape
        torch.Size([2, 6, 16])
    """

    num_self_attn = 2

    def self_attention(self, query: Tensor, query_pos: Optional[Tensor],
                       self_attn_mask: Optional[Tensor] = None, num_vec: Optional[int] = None,
                       num_pts_per_vec: Optional[int] = None, **kwargs) -> Tensor:
        """Across instances (masked), norm, within instances, norm.

        Args:
            query (Tensor): ``[B, V * P, C]``, instance-major.
            query_pos (Tensor): ``[B, V * P, C]``.
            self_attn_mask (Tensor, optional): ``[V, V]`` bool, True = blocked.
            num_vec (int): V.
            num_pts_per_vec (int): P.
        """
        if num_vec is None or num_pts_per_vec is None:
            raise ValueError('DecoupledMapTRDecoderLayer needs num_vec and num_pts_per_vec')
        batch, num_query, dims = query.shape
        if num_query != num_vec * num_pts_per_vec:
            raise ValueError(f'DecoupledMapTRDecoderLayer: {num_query} queries are not '
                             f'num_vec x num_pts_per_vec = {num_vec} x {num_pts_per_vec}')

        def across(x: Tensor) -> Tensor:  # [B, V*P, C] -> [B*P, V, C]
            return x.view(batch, num_vec, num_pts_per_vec, dims).transpose(1, 2).reshape(
                batch * num_pts_per_vec, num_vec, dims)

        pos = across(query_pos)
        query = self.attentions[0](across(query), query_pos=pos, key_pos=pos,
                                   attn_mask=self_attn_mask)
        query = query.view(batch, num_pts_per_vec, num_vec, dims).transpose(1, 2).reshape(
            batch, num_query, dims)
        query = self.norms[0](query)
        pos = query_pos.reshape(batch * num_vec, num_pts_per_vec, dims)
        query = self.attentions[1](query.reshape(batch * num_vec, num_pts_per_vec, dims),
                                   query_pos=pos, key_pos=pos)
        return self.norms[1](query.view(batch, num_query, dims))
