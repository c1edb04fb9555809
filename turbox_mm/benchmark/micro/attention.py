"""Micro benchmark: training attention the way mmcv's ``MultiheadAttention`` calls it, against
turbox's ``ops.fast`` attention
(:class:`~turbox_mm.engine.runner.fast_model.WeightlessMultiheadAttention`).

mmcv calls ``nn.MultiheadAttention`` with ``need_weights`` left True: torch computes the
attention explicitly and averages the weights over the heads, which mmcv discards. turbox's
module asks for no weights; in float32 on CUDA it then runs ``scaled_dot_product_attention``'s
math backend (:func:`~turbox_mm.engine.runner.fast_model.math_attention_wanted`), in half
precision torch's fused kernels. A second row per size times torch's own choice without
weights (the memory-efficient kernel in float32 on CUDA: turbox's path before the math
backend), so the table shows why. Forward + backward, training mode (dropout 0.1, as the
models configure it), float32, with TF32 matmuls as ``precision.tf32`` sets them.

Sizes (batch, queries, keys, channels, heads): BEVFusion's TransFusion cross-attention (4,
200 proposals, 180 x 180 BEV cells, 128, 8) and self-attention (4, 200, 200, 128, 8); MapTR
v1's decoder self-attention (4, 50 x 20 points, 1000, 256, 8); MapTR v2's decoupled
instance self-attention (4 x 20 points, 350 queries with the one-to-many ones, 350, 256, 8);
Sparse4D v3's decoupled self-attention over its 900 anchors and its temporal cross-attention
to the 600 cached instances (6, 900, 900 or 600, 512, 8; without the denoising queries). All
run in float32: BEVFusion trains in float32, and MapTR's and Sparse4D's (and SparseDrive's)
detectors run their heads with autocast off.
"""
import copy
from typing import Dict, List

import torch
from torch import nn

from turbox_mm.benchmark.timing import benchmark_device, time_fn
from turbox_mm.engine.runner.fast_model import WeightlessMultiheadAttention
from turbox_mm.engine.runner.precision import apply_precision

#: name, batch, queries, keys, channels, heads
SIZES = (('TransFusion cross', 4, 200, 32400, 128, 8),
         ('TransFusion self', 4, 200, 200, 128, 8),
         ('MapTR v1 decoder self', 4, 1000, 1000, 256, 8),
         ('MapTR v2 instance self', 80, 350, 350, 256, 8),
         ('Sparse4D self', 6, 900, 900, 512, 8),
         ('Sparse4D temporal', 6, 900, 600, 512, 8))
QUICK_SIZES = (('tiny cross', 2, 5, 37, 16, 4), ('tiny self', 2, 9, 9, 16, 4))


def benchmark(device: str, quick: bool = False) -> List[Dict]:
    """Time mmcv's call against turbox's and against torch's fused choice, per size.

    Args:
        device (str): ``'cuda'`` (or ``'cuda:N'``) or ``'cpu'`` (torch's choice there; the
            math backend is a CUDA rule).
        quick (bool): Tiny sizes and a few iterations, for tests. Defaults to False.

    Returns:
        list[dict]: Two rows per size, as described in :mod:`turbox_mm.benchmark.micro`.
    """
    dev = benchmark_device('attention', device)
    iters, warmup = (3, 1) if quick else (20, 5)
    timing_device = 'cuda' if dev.type == 'cuda' else 'cpu'
    before = torch.get_float32_matmul_precision()
    rows = []
    try:
        apply_precision(dict(allow_tf32=True))
        for name, batch, queries, keys, channels, heads in (QUICK_SIZES if quick else SIZES):
            torch.manual_seed(0)
            mmcv_inner = nn.MultiheadAttention(channels, heads, dropout=0.1).to(dev).train()
            turbox_inner = copy.deepcopy(mmcv_inner)
            turbox_inner.__class__ = WeightlessMultiheadAttention
            query = torch.randn(queries, batch, channels, device=dev, requires_grad=True)
            key = torch.randn(keys, batch, channels, device=dev, requires_grad=True)
            grad = torch.randn(queries, batch, channels, device=dev)

            def step(module, **kwargs):
                module(query, key, key, **kwargs)[0].backward(grad)

            def timed(fn):
                return time_fn(fn, iters=iters, warmup=warmup, device=timing_device)

            stock = timed(lambda: step(mmcv_inner))  # mmcv's call: need_weights=True
            turbox = timed(lambda: step(turbox_inner))
            fused = timed(lambda: step(mmcv_inner, need_weights=False))
            shape = (f'batch {batch}, {queries} x {keys}, {channels} channels, {heads} heads, '
                     'float32, dropout 0.1, forward + backward')
            rows += [dict(component='attention', case=f'{name}: mmcv call vs turbox',
                          stock=stock, turbox=turbox, note=shape),
                     dict(component='attention',
                          case=f"{name}: mmcv call vs torch's choice without weights",
                          stock=stock, turbox=fused, note=shape)]
    finally:
        apply_precision(dict(allow_tf32=before != 'highest'))
    return rows
