"""MapTR v1 and v2 (issue 18), mmengine-native: the head side (in progress).

Landed: the assignment over equivalent point orders (:class:`MapTRAssigner`,
:class:`OrderedPtsL1Cost`, the batched turbox path in :mod:`.maptr_targets`) and the losses
:class:`PtsL1Loss` and :class:`PtsDirCosLoss`. Not yet: the decoder, the heads, the BEV
encoders, the detectors, the configs. docs/design/maptr.md is the engineering reference.
"""
from .geometry import (denormalize_2d_bbox, denormalize_2d_pts, normalize_2d_bbox,
                       normalize_2d_pts, pts_to_bbox)
from .maptr_assigner import MapTRAssigner
from .maptr_targets import assign_batched, build_targets, pad_ground_truth
from .ordered_pts_l1_cost import OrderedPtsL1Cost
from .pts_dir_cos_loss import PtsDirCosLoss
from .pts_l1_loss import PtsL1Loss

__all__ = [
    'denormalize_2d_bbox', 'denormalize_2d_pts', 'normalize_2d_bbox', 'normalize_2d_pts',
    'pts_to_bbox', 'MapTRAssigner', 'assign_batched', 'build_targets', 'pad_ground_truth',
    'OrderedPtsL1Cost', 'PtsDirCosLoss', 'PtsL1Loss'
]
