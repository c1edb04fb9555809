"""Metrics and evaluators."""
from .nuscenes_tracking_metric import NuScenesTrackingMetric
from .ordered_evaluator import OrderedEvaluator, gather_in_rank_order

__all__ = ['NuScenesTrackingMetric', 'OrderedEvaluator', 'gather_in_rank_order']
