"""SparseDrive (issue 19): the map head's point-set modules, targets and losses, the joint head
and the detector, on the Sparse4D v3 components (docs/design/sparsedrive.md)."""
from .instance_queue import InstanceQueue
from .line_loss import LinesL1Loss, SparseLineLoss
from .map_target import SparsePoint3DTarget
from .motion_blocks import MotionPlanningRefinementModule
from .motion_decoder import SparseBox3DMotionDecoder
from .motion_planning_head import MotionPlanningHead
from .motion_target import MotionTarget
from .planning_decoder import HierarchicalPlanningDecoder
from .planning_target import PlanningTarget
from .point_decoder import SparsePoint3DDecoder
from .point_encoder import SparsePoint3DEncoder
from .point_keypoints import SparsePoint3DKeyPointsGenerator
from .point_refinement import SparsePoint3DRefinementModule
from .sparsedrive import SparseDrive
from .sparsedrive_head import SparseDriveHead

__all__ = [
    'LinesL1Loss', 'SparseLineLoss', 'SparsePoint3DTarget', 'SparsePoint3DDecoder',
    'SparsePoint3DEncoder', 'SparsePoint3DKeyPointsGenerator', 'SparsePoint3DRefinementModule',
    'SparseDrive', 'SparseDriveHead', 'InstanceQueue', 'MotionPlanningRefinementModule',
    'SparseBox3DMotionDecoder', 'MotionPlanningHead', 'MotionTarget', 'HierarchicalPlanningDecoder',
    'PlanningTarget'
]
