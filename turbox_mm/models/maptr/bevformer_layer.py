"""``BEVFormerLayer``: one layer of MapTR v1's BEV encoder (upstream ``BEVFormerLayer`` on
``MyCustomBaseTransformerLayer``, ``bevformer/modules/encoder.py`` and
``custom_base_transformer_layer.py`` @ 67cadd8).

Order (post-norm): temporal self-attention (with the BEV positional embedding), LayerNorm,
spatial cross-attention to the cameras (no positional embedding), LayerNorm, FFN
(``C -> feedforward_channels -> C``, ReLU, dropout, residual), LayerNorm. The submodules keep
upstream's names (``attentions.0`` / ``attentions.1``, ``ffns.0``, ``norms.0-2``) so upstream
checkpoints map key for key. The arguments are upstream's (``attn_cfgs``,
``feedforward_channels``, ``ffn_dropout``, ``operation_order``), so MapTR's config reads as
upstream's.
"""
from typing import Optional, Sequence

from mmcv.cnn import build_norm_layer
from mmcv.cnn.bricks.transformer import FFN
from mmengine.model import BaseModule
from torch import Tensor, nn

from turbox_mm.registry import MODELS
from .scoped_build import build_scoped

#: The only order upstream's ``BEVFormerLayer`` is used with (it asserts six operations).
OPERATION_ORDER = ('self_attn', 'norm', 'cross_attn', 'norm', 'ffn', 'norm')
#: MapTR v1's attentions (``maptr_tiny_r50_24e``; ``embed_dims`` the classes' default, 256).
ATTN_CFGS = (dict(type='turbox_mm.TemporalSelfAttention', num_levels=1),
             dict(type='turbox_mm.GeometrySptialCrossAttention',
                  attention=dict(type='turbox_mm.GeometryKernelAttention', num_heads=4,
                                 dilation=1, kernel_size=(3, 5), num_levels=1)))


@MODELS.register_module()
class BEVFormerLayer(BaseModule):
    """One BEV encoder layer (module docstring). Batch-first tensors.

    Args:
        attn_cfgs (list[dict]): The temporal self-attention and the spatial cross-attention
            (:class:`.TemporalSelfAttention`, :class:`.GeometrySptialCrossAttention`); plain
            type names are looked up in turbox_mm first. Their ``op_impl`` defaults to this
            layer's. Defaults to MapTR v1's (:data:`ATTN_CFGS`).
        feedforward_channels (int): FFN hidden channels. Defaults to 512 (MapTR's config).
        ffn_dropout (float): FFN dropout. Defaults to 0.1 (MapTR's config; upstream's class
            default is 0).
        operation_order (tuple[str]): Only :data:`OPERATION_ORDER`.
        act_cfg (dict): FFN activation. Defaults to ReLU (upstream passes it on to a base
            class that drops it, so upstream's FFN is always ReLU).
        norm_cfg (dict): The norms. Defaults to LayerNorm.
        ffn_num_fcs (int): FFN layers. Defaults to 2.
        batch_first (bool): Only True. Defaults to True.
        op_impl (str, optional): Default ``op_impl`` of the attentions. Defaults to None
            (theirs).
        init_cfg (dict, optional): mmengine's init config. Defaults to None.
    """

    def __init__(self, attn_cfgs: Optional[Sequence[dict]] = None,
                 feedforward_channels: int = 512, ffn_dropout: float = 0.1,
                 operation_order: Sequence[str] = OPERATION_ORDER,
                 act_cfg: dict = dict(type='ReLU', inplace=True),
                 norm_cfg: dict = dict(type='LN'), ffn_num_fcs: int = 2,
                 batch_first: bool = True, op_impl: Optional[str] = None,
                 init_cfg: Optional[dict] = None, **kwargs) -> None:
        super().__init__(init_cfg)
        name = type(self).__name__
        if tuple(operation_order) != OPERATION_ORDER:
            raise NotImplementedError(f'{name}: only operation_order={OPERATION_ORDER} (MapTR\'s '
                                      f'and BEVFormer\'s), got {tuple(operation_order)}')
        if not batch_first:
            raise ValueError(f'{name}: only batch_first=True is supported')
        cfgs = list(ATTN_CFGS if attn_cfgs is None else attn_cfgs)
        if isinstance(attn_cfgs, dict) or len(cfgs) != 2:
            raise ValueError(f'{name}: attn_cfgs must list the self- and the cross-attention')
        attentions = []
        for cfg, default in zip(cfgs, ('TemporalSelfAttention', 'GeometrySptialCrossAttention')):
            cfg = dict(cfg)
            cfg.pop('batch_first', None)
            if op_impl is not None:
                cfg.setdefault('op_impl', op_impl)
            attentions.append(build_scoped(cfg, f'turbox_mm.{default}'))
        self.attentions = nn.ModuleList(attentions)
        self.embed_dims = self.attentions[0].embed_dims
        self.ffns = nn.ModuleList([FFN(embed_dims=self.embed_dims,
                                       feedforward_channels=feedforward_channels,
                                       num_fcs=ffn_num_fcs, ffn_drop=ffn_dropout,
                                       act_cfg=act_cfg)])
        self.norms = nn.ModuleList(build_norm_layer(norm_cfg, self.embed_dims)[1]
                                   for _ in range(3))

    def forward(self, query: Tensor, value: Tensor, bev_pos: Optional[Tensor], ref_2d: Tensor,
                bev_spatial_shapes: Tensor, bev_level_start_index: Tensor,
                reference_points_cam: Tensor, bev_mask: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, prev_bev: Optional[Tensor] = None) -> Tensor:
        """Temporal self-attention, norm, spatial cross-attention, norm, FFN, norm.

        Args:
            query (Tensor): ``[B, Q, C]`` BEV queries.
            value (Tensor): ``[B, N, L, C]`` camera features.
            bev_pos (Tensor, optional): ``[B, Q, C]``, for the self-attention only.
            ref_2d (Tensor): ``[2B, Q, 1, 2]`` the queue's 2D reference points, interleaved.
            bev_spatial_shapes (Tensor): ``[[H, W]]`` of the BEV.
            bev_level_start_index (Tensor): ``[0]``.
            reference_points_cam (Tensor): ``[N, B, Q, D, 2]``.
            bev_mask (Tensor): ``[N, B, Q, D]`` bool.
            spatial_shapes (Tensor): ``[levels, 2]`` of the camera features.
            level_start_index (Tensor): ``[levels]``.
            prev_bev (Tensor, optional): ``[2B, Q, C]`` previous and current BEV interleaved;
                None without history.

        Returns:
            Tensor: ``[B, Q, C]``.
        """
        query = self.attentions[0](query, prev_bev, query_pos=bev_pos, reference_points=ref_2d,
                                   spatial_shapes=bev_spatial_shapes,
                                   level_start_index=bev_level_start_index)
        query = self.norms[0](query)
        query = self.attentions[1](query, value, reference_points_cam, bev_mask, spatial_shapes,
                                   level_start_index)
        query = self.norms[1](query)
        query = self.ffns[0](query)
        return self.norms[2](query)
