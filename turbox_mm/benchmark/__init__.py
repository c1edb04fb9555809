"""Benchmarks: stock vs turbox configs end to end (``tools/benchmark.py``)."""
from .e2e import PHASES, measure_config
from .report import (format_round_summary, format_table, machine_info, machine_line,
                     reduction_percent, round_summary, summarize, write_chart)

__all__ = ['PHASES', 'measure_config', 'format_round_summary', 'format_table', 'machine_info',
           'machine_line', 'reduction_percent', 'round_summary', 'summarize', 'write_chart']
