# The smoke stock config plus mmengine's EMAHook, as many detection configs have: the baseline
# of the turbox ablation below (tools/benchmark.py, docs/benchmarks.md).
_base_ = ['../smoke_stock.py']

custom_hooks = [dict(type='EMAHook', ema_type='ExponentialMovingAverage', momentum=0.0002,
                     update_buffers=True, priority=49)]
