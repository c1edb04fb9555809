"""The TransFusion head's decoder layer and its learned position encoding."""
from typing import Optional

from mmdet.models.layers import DetrTransformerDecoderLayer
from torch import Tensor, nn

from turbox_mm.registry import MODELS


class PositionEncodingLearned(nn.Module):
    """``[B, P, D]`` positions -> ``[B, F, P]`` embeddings: Conv1d(D, F) -> BN1d -> ReLU ->
    Conv1d(F, F) (``position_embedding_head``, upstream's parameter names)."""

    def __init__(self, input_channel: int, num_pos_feats: int = 288) -> None:
        super().__init__()
        self.position_embedding_head = nn.Sequential(
            nn.Conv1d(input_channel, num_pos_feats, kernel_size=1),
            nn.BatchNorm1d(num_pos_feats), nn.ReLU(inplace=True),
            nn.Conv1d(num_pos_feats, num_pos_feats, kernel_size=1))

    def forward(self, xyz: Tensor) -> Tensor:
        return self.position_embedding_head(xyz.transpose(1, 2).contiguous())


@MODELS.register_module()
class TransFusionDecoderLayer(DetrTransformerDecoderLayer):
    """mmdet's DETR decoder layer (self attention, cross attention, FFN, each followed by its
    LayerNorm) with TransFusion's two changes: learned position encodings of the query and key
    positions (``self_posembed``, ``cross_posembed``), and attention *values* that carry the
    position too (the query plus its encoding in self attention, the key plus its encoding in
    cross attention). The cross attention's query takes the query's own (self) encoding.

    Args:
        pos_encoding_cfg (dict): ``input_channel`` (2: BEV x, y) and ``num_pos_feats``.
        **kwargs: ``DetrTransformerDecoderLayer``'s (``self_attn_cfg``, ``cross_attn_cfg``,
            ``ffn_cfg``, ``norm_cfg``).
    """

    def __init__(self, pos_encoding_cfg: dict = dict(input_channel=2, num_pos_feats=128),
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.self_posembed = PositionEncodingLearned(**pos_encoding_cfg)
        self.cross_posembed = PositionEncodingLearned(**pos_encoding_cfg)

    def forward(self, query: Tensor, key: Tensor, query_pos: Tensor, key_pos: Tensor,
                key_padding_mask: Optional[Tensor] = None, **kwargs) -> Tensor:
        """``query [B, C, P]``, ``key [B, C, HW]``, positions ``[B, P, 2]`` and ``[B, HW, 2]``
        -> ``[B, C, P]``."""
        query_embed = self.self_posembed(query_pos).transpose(1, 2)
        key_embed = self.cross_posembed(key_pos).transpose(1, 2)
        query = query.transpose(1, 2)
        key = key.transpose(1, 2)
        query = self.self_attn(query=query, key=query, value=query + query_embed,
                               query_pos=query_embed, key_pos=query_embed, **kwargs)
        query = self.norms[0](query)
        query = self.cross_attn(query=query, key=key, value=key + key_embed,
                                query_pos=query_embed, key_pos=key_embed,
                                key_padding_mask=key_padding_mask, **kwargs)
        query = self.norms[1](query)
        query = self.norms[2](self.ffn(query))
        return query.transpose(1, 2)
