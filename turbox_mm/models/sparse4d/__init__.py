"""Sparse4D v3 on mmengine (issue 5): box state, anchors; the model lands piece by piece."""
from .anchor_encoder import SparseBox3DEncoder, linear_relu_ln
from .anchors import gather_boxes, kmeans_anchors
from .box3d import decode_boxes, encode_boxes, to_lidar_boxes
from .decoder import SparseBox3DDecoder
from .instance_bank import InstanceBank, project_anchors
from .keypoints import FIXED_KEYPOINTS_V3, SparseBox3DKeyPointsGenerator

__all__ = ['gather_boxes', 'kmeans_anchors', 'decode_boxes', 'encode_boxes', 'to_lidar_boxes',
           'FIXED_KEYPOINTS_V3', 'SparseBox3DKeyPointsGenerator', 'SparseBox3DEncoder',
           'linear_relu_ln', 'SparseBox3DDecoder', 'InstanceBank', 'project_anchors']
