"""BEVFusion (mmdet3d 1.4's ``projects/BEVFusion``), mmengine-native (issue 15; in progress).

Landed so far: the camera view transform :class:`DepthLSSTransform` (with
``turbox_mm::bev_pool``) and its lidar depth images, the camera neck
:class:`GeneralizedLSSFPN` and the :class:`ConvFuser`.
"""
from .conv_fuser import ConvFuser
from .depth_lss_transform import DepthLSSTransform
from .generalized_lss_fpn import GeneralizedLSSFPN
from .lidar_depth import depth_image_batched, depth_image_stock

__all__ = ['ConvFuser', 'DepthLSSTransform', 'GeneralizedLSSFPN', 'depth_image_batched',
           'depth_image_stock']
