"""Metrics and evaluators."""
from .map_chamfer_metric import MapChamferMetric  # noqa: F401
from .nuscenes_tracking_metric import NuScenesTrackingMetric
from .motion_metric import SparseDriveMotionMetric  # noqa: F401
from .planning_metric import SparseDrivePlanningMetric  # noqa: F401
from .sparsedrive_map_metric import SparseDriveMapMetric  # noqa: F401
from .ordered_evaluator import OrderedEvaluator, gather_in_rank_order

__all__ = ['NuScenesTrackingMetric', 'OrderedEvaluator', 'gather_in_rank_order']
