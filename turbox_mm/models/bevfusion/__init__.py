"""BEVFusion (mmdet3d 1.4's ``projects/BEVFusion``), mmengine-native (issue 15; in progress).

Landed so far: the detector :class:`BEVFusion`; the camera view transform
:class:`DepthLSSTransform` (with ``turbox_mm::bev_pool``) and its lidar depth images; the
camera neck :class:`GeneralizedLSSFPN`; the :class:`ConvFuser`; the :class:`TransFusionHead`
(its decoder layer, box coder and Hungarian assigner); the lidar
:class:`BEVFusionSparseEncoder`. Not yet: the transforms and the configs.
"""
from .bevfusion import BEVFusion
from .conv_fuser import ConvFuser
from .depth_lss_transform import DepthLSSTransform
from .generalized_lss_fpn import GeneralizedLSSFPN
from .lidar_depth import depth_image_batched, depth_image_stock
from .sparse_encoder import BEVFusionSparseEncoder
from .transfusion_assigner import BBoxBEVL1Cost, HungarianAssigner3D, IoU3DCost
from .transfusion_bbox_coder import TransFusionBBoxCoder
from .transfusion_head import TransFusionHead
from .transfusion_layers import TransFusionDecoderLayer

__all__ = [
    'BEVFusion', 'BEVFusionSparseEncoder', 'ConvFuser', 'DepthLSSTransform', 'GeneralizedLSSFPN',
    'depth_image_batched', 'depth_image_stock', 'BBoxBEVL1Cost', 'HungarianAssigner3D',
    'IoU3DCost', 'TransFusionBBoxCoder', 'TransFusionHead', 'TransFusionDecoderLayer'
]
