"""MapTR v1 and v2 (issue 18), mmengine-native.

The decoder (:class:`MapTRDecoder` with reference-point refinement; its layers
:class:`MapTRDecoderLayer` for v1 and :class:`DecoupledMapTRDecoderLayer` for v2; the
deformable cross-attention :class:`CustomMSDeformableAttention` with mmcv's or turbox's op),
the heads :class:`MapTRHead` and :class:`MapTRv2Head` (one-to-many queries, auxiliary BEV and
perspective segmentation with :class:`SimpleLoss`), the assignment over equivalent point
orders (:class:`MapTRAssigner`, :class:`OrderedPtsL1Cost`, the batched turbox path in
:mod:`.maptr_targets`), the losses :class:`PtsL1Loss` and :class:`PtsDirCosLoss`, and the
:class:`MapTRNMSFreeCoder`. v1's BEV encoder (:class:`MapTRPerceptionTransformer`: the
BEVFormer layers with :class:`TemporalSelfAttention` and :class:`GeometrySptialCrossAttention`
over :class:`GeometryKernelAttention`, each with a stock and a turbox path) and detector
:class:`MapTR`; v2's LSS encoder with depth supervision (:class:`LSSTransform` with its
:class:`DepthNet`) and detector :class:`MapTRv2`. Configs in ``configs/maptr/``;
docs/design/maptr.md is the engineering reference.
"""
from .bev_points import point_sampling, reference_points_2d, reference_points_3d
from .bevformer_encoder import BEVFormerEncoder
from .bevformer_layer import BEVFormerLayer
from .custom_ms_deformable_attention import CustomMSDeformableAttention
from .decoupled_decoder_layer import DecoupledMapTRDecoderLayer
from .depth_net import ASPP, ASPPModule, DepthNet, Mlp, SELayer
from .geometry import (denormalize_2d_bbox, denormalize_2d_pts, normalize_2d_bbox,
                       normalize_2d_pts, pts_to_bbox)
from .geometry_kernel_attention import GeometryKernelAttention
from .geometry_spatial_cross_attention import GeometrySptialCrossAttention
from .lss_transform import LSSTransform
from .maptr import MapTR
from .maptr_assigner import MapTRAssigner
from .maptr_decoder import MapTRDecoder
from .maptr_decoder_layer import MapTRDecoderLayer
from .maptr_head import MapTRHead
from .maptr_nms_free_coder import MapTRNMSFreeCoder
from .maptr_perception_transformer import MapTRPerceptionTransformer
from .maptr_targets import assign_batched, build_targets, pad_ground_truth
from .maptrv2 import MapTRv2
from .maptrv2_head import MapTRv2Head
from .ordered_pts_l1_cost import OrderedPtsL1Cost
from .pts_dir_cos_loss import PtsDirCosLoss
from .pts_l1_loss import PtsL1Loss
from .simple_loss import SimpleLoss
from .temporal_self_attention import TemporalSelfAttention

__all__ = [
    'CustomMSDeformableAttention', 'DecoupledMapTRDecoderLayer', 'denormalize_2d_bbox',
    'denormalize_2d_pts', 'normalize_2d_bbox', 'normalize_2d_pts', 'pts_to_bbox',
    'MapTR',
    'BEVFormerEncoder', 'BEVFormerLayer', 'GeometryKernelAttention',
    'GeometrySptialCrossAttention', 'MapTRPerceptionTransformer', 'TemporalSelfAttention',
    'point_sampling', 'reference_points_2d', 'reference_points_3d',
    'MapTRAssigner', 'MapTRDecoder', 'MapTRDecoderLayer', 'MapTRHead', 'MapTRNMSFreeCoder',
    'assign_batched', 'build_targets', 'pad_ground_truth', 'MapTRv2', 'MapTRv2Head',
    'SimpleLoss', 'OrderedPtsL1Cost',
    'PtsDirCosLoss', 'PtsL1Loss', 'ASPP', 'ASPPModule', 'DepthNet', 'LSSTransform', 'Mlp',
    'SELayer'
]
