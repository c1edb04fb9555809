"""Metrics and evaluators."""
from .map_chamfer_metric import MapChamferMetric  # noqa: F401
from .nuscenes_tracking_metric import NuScenesTrackingMetric
from .ordered_evaluator import OrderedEvaluator, gather_in_rank_order

__all__ = ['NuScenesTrackingMetric', 'OrderedEvaluator', 'gather_in_rank_order']
