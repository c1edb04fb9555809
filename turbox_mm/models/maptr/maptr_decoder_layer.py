"""MapTR v1's decoder layer: self-attention over every point query, then deformable
cross-attention to the BEV, then the FFN, each followed by a LayerNorm (post-norm).

Upstream builds it as mmdet 2.x's ``DetrTransformerDecoderLayer`` with ``operation_order=
('self_attn', 'norm', 'cross_attn', 'norm', 'ffn', 'norm')`` (docs/design/maptr.md, section
4). The submodules keep upstream's names (``attentions``, ``norms``, ``ffns``), so upstream
checkpoints map onto this layer key for key.
"""
import copy
from typing import Optional

from mmcv.cnn import build_norm_layer
from mmcv.cnn.bricks.transformer import FFN, MultiheadAttention
from mmengine.model import BaseModule
from torch import Tensor, nn

from turbox_mm.registry import MODELS
from .custom_ms_deformable_attention import CustomMSDeformableAttention

#: The self-attention of upstream's configs: 8 heads, mmcv 1.x's ``dropout=0.1``
#: (attention-weight dropout and output dropout 0.1).
SELF_ATTN_CFG = dict(embed_dims=256, num_heads=8, attn_drop=0.1, proj_drop=0.0,
                     dropout_layer=dict(type='Dropout', drop_prob=0.1))
#: The cross-attention of upstream's configs.
CROSS_ATTN_CFG = dict(embed_dims=256, num_heads=8, num_levels=1, num_points=4, dropout=0.1)
#: The FFN of upstream's configs: 256 -> 512 -> 256, ReLU, dropout 0.1.
FFN_CFG = dict(embed_dims=256, feedforward_channels=512, num_fcs=2, ffn_drop=0.1,
               act_cfg=dict(type='ReLU', inplace=True))


def build_self_attention(cfg: Optional[dict]) -> MultiheadAttention:
    """mmcv's batch-first ``MultiheadAttention`` from ``cfg``; mmcv 1.x's deprecated
    ``dropout=p`` is read as ``attn_drop=p`` and an output dropout ``p``, as mmcv does (without
    its edit of the shared default dict)."""
    cfg = copy.deepcopy(SELF_ATTN_CFG if cfg is None else cfg)
    cfg.pop('type', None)
    if 'dropout' in cfg:
        drop = cfg.pop('dropout')
        cfg.update(attn_drop=drop, dropout_layer=dict(type='Dropout', drop_prob=drop))
    return MultiheadAttention(batch_first=True, **cfg)


def build_cross_attention(cfg: Optional[dict]) -> CustomMSDeformableAttention:
    cfg = copy.deepcopy(CROSS_ATTN_CFG if cfg is None else cfg)
    cfg.pop('type', None)
    return CustomMSDeformableAttention(**cfg)


def build_ffn(cfg: Optional[dict]) -> FFN:
    cfg = copy.deepcopy(FFN_CFG if cfg is None else cfg)
    cfg.pop('type', None)
    return FFN(**cfg)


@MODELS.register_module()
class MapTRDecoderLayer(BaseModule):
    """One decoder layer of MapTR v1 (module docstring). Batch-first tensors.

    Args:
        self_attn_cfg (dict, optional): mmcv ``MultiheadAttention`` arguments. Defaults to
            :data:`SELF_ATTN_CFG`.
        cross_attn_cfg (dict, optional): :class:`CustomMSDeformableAttention` arguments
            (``op_impl`` among them). Defaults to :data:`CROSS_ATTN_CFG`.
        ffn_cfg (dict, optional): mmcv ``FFN`` arguments. Defaults to :data:`FFN_CFG`.
        norm_cfg (dict): The norms. Defaults to LayerNorm.
        init_cfg (dict, optional): mmengine's init config. Defaults to None.

    Examples:
        >>> import torch
        >>> layer = MapTRDecoderLayer(
        ...     self_attn_cfg=dict(embed_dims=16, num_heads=2),
        ...     cross_attn_cfg=dict(embed_dims=16, num_heads=2, num_points=2),
        ...     ffn_cfg=dict(embed_dims=16, feedforward_channels=32))
        >>> query, pos, bev = torch.randn(2, 6, 16), torch.randn(2, 6, 16), torch.randn(2, 12, 16)
        >>> ref = torch.rand(2, 6, 1, 2)
        >>> layer(query, pos, bev, ref, torch.tensor([[3, 4]]), torch.tensor([0])).shape
        torch.Size([2, 6, 16])
    """

    num_self_attn = 1

    def __init__(self, self_attn_cfg: Optional[dict] = None,
                 cross_attn_cfg: Optional[dict] = None, ffn_cfg: Optional[dict] = None,
                 norm_cfg: dict = dict(type='LN'), init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg)
        self.attentions = nn.ModuleList(
            [build_self_attention(self_attn_cfg) for _ in range(self.num_self_attn)] +
            [build_cross_attention(cross_attn_cfg)])
        self.ffns = nn.ModuleList([build_ffn(ffn_cfg)])
        self.embed_dims = self.ffns[0].embed_dims
        self.norms = nn.ModuleList(
            build_norm_layer(norm_cfg, self.embed_dims)[1]
            for _ in range(self.num_self_attn + 2))

    @property
    def cross_attn(self) -> CustomMSDeformableAttention:
        return self.attentions[-1]

    def self_attention(self, query: Tensor, query_pos: Optional[Tensor],
                       self_attn_mask: Optional[Tensor] = None, **kwargs) -> Tensor:
        """Self-attention over all ``V x P`` queries, then its norm. ``kwargs`` (the decoupled
        layer's ``num_vec``, ``num_pts_per_vec``) are not needed here."""
        query = self.attentions[0](query, query_pos=query_pos, key_pos=query_pos,
                                   attn_mask=self_attn_mask)
        return self.norms[0](query)

    def forward(self, query: Tensor, query_pos: Optional[Tensor], value: Tensor,
                reference_points: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                **kwargs) -> Tensor:
        """Self-attention, norm, cross-attention, norm, FFN, norm.

        Args:
            query (Tensor): ``[B, Q, C]``.
            query_pos (Tensor, optional): ``[B, Q, C]``, added to queries and keys of the
                attentions (not to values or residuals).
            value (Tensor): The BEV ``[B, H * W, C]``.
            reference_points (Tensor): ``[B, Q, levels, 2]`` normalised ``(x, y)``.
            spatial_shapes (Tensor): ``[[H, W]]``.
            level_start_index (Tensor): ``[0]``.
            kwargs: ``self_attn_mask`` (``[Q, Q]`` bool, True = blocked) and the decoupled
                layer's arguments.

        Returns:
            Tensor: ``[B, Q, C]``.
        """
        query = self.self_attention(query, query_pos, **kwargs)
        query = self.cross_attn(query, value, reference_points, spatial_shapes,
                                level_start_index, query_pos=query_pos)
        query = self.norms[-2](query)
        query = self.ffns[0](query)
        return self.norms[-1](query)
