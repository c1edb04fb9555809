"""Benchmarks: stock vs turbox configs end to end (``tools/benchmark.py``)."""
from .e2e import PHASES, measure_config
from .report import format_table, machine_info, reduction_percent, summarize, write_chart

__all__ = ['PHASES', 'measure_config', 'format_table', 'machine_info', 'reduction_percent',
           'summarize', 'write_chart']
