"""Metrics and evaluators."""
from .ordered_evaluator import OrderedEvaluator, gather_in_rank_order

__all__ = ['OrderedEvaluator', 'gather_in_rank_order']
