"""Sparse4D v3 on mmengine / mmdet3d 1.x (issue 5): detector, head, blocks, targets, losses.

docs/design/sparse4d.md is the engineering reference (shapes, values, upstream quirks).
"""
from .anchor_encoder import SparseBox3DEncoder, linear_relu_ln
from .anchors import gather_boxes, kmeans_anchors
from .asymmetric_ffn import AsymmetricFFN
from .box3d import decode_boxes, encode_boxes, to_lidar_boxes
from .decoder import SparseBox3DDecoder
from .deformable_feature_aggregation import DeformableFeatureAggregation, project_points
from .dense_depth_net import DenseDepthNet
from .grid_mask import GridMask
from .instance_bank import InstanceBank, project_anchors
from .keypoints import FIXED_KEYPOINTS_V3, SparseBox3DKeyPointsGenerator
from .losses import SparseBox3DLoss
from .refinement import SparseBox3DRefinementModule
from .sparse4d import Sparse4D
from .sparse4d_head import Sparse4DHead, default_operation_order
from .target import SparseBox3DTarget

__all__ = ['gather_boxes', 'kmeans_anchors', 'decode_boxes', 'encode_boxes', 'to_lidar_boxes',
           'FIXED_KEYPOINTS_V3', 'SparseBox3DKeyPointsGenerator', 'SparseBox3DEncoder',
           'linear_relu_ln', 'SparseBox3DDecoder', 'InstanceBank', 'project_anchors',
           'AsymmetricFFN', 'DeformableFeatureAggregation', 'project_points', 'DenseDepthNet',
           'GridMask', 'SparseBox3DLoss', 'SparseBox3DRefinementModule', 'Sparse4D',
           'Sparse4DHead', 'default_operation_order', 'SparseBox3DTarget']
