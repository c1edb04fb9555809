"""Micro benchmark: training attention the way mmcv's ``MultiheadAttention`` calls it, against
turbox's ``ops.fast`` attention
(:class:`~turbox_mm.engine.runner.fast_model.WeightlessMultiheadAttention`).

mmcv calls ``nn.MultiheadAttention`` with ``need_weights`` left True: torch computes the
attention explicitly and averages the weights over the heads, which mmcv discards. turbox's
module asks for no weights; torch then picks a fused kernel (the memory-efficient one in
float32 on CUDA), except where :func:`~turbox_mm.engine.runner.fast_model.math_attention_wanted`
sends float32 training attention over long key sequences to the math backend. Three rows a
size, each against mmcv's call: turbox's module as the rule decides, the math backend forced,
and torch's fused choice forced (so the table shows where the rule's threshold should be).
Forward + backward, training mode (dropout 0.1, as the models configure it), float32, with
TF32 matmuls as ``precision.tf32`` sets them.

Sizes (batch, queries, keys, channels, heads): BEVFusion's TransFusion cross-attention (4,
200 proposals, 180 x 180 BEV cells, 128, 8) and self-attention (4, 200, 200, 128, 8); MapTR
v1's decoder self-attention (4, 50 x 20 points, 1000, 256, 8); MapTR v2's decoupled
instance self-attention (4 x 20 points, 350 queries with the one-to-many ones, 350, 256, 8);
Sparse4D v3's decoupled self-attention over its 900 anchors and its temporal cross-attention
to the 600 cached instances (6, 900, 900 or 600, 512, 8; without the denoising queries and
their mask). All are float32 in training: BEVFusion trains in float32, and MapTR's and
Sparse4D's detectors run their heads with autocast off. No attention mask, no peak memory.
"""
import copy
from typing import Dict, List

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from turbox_mm.benchmark.timing import benchmark_device, time_fn
from turbox_mm.engine.runner.fast_model import WeightlessMultiheadAttention

#: name, batch, queries, keys, channels, heads
SIZES = (('TransFusion cross', 4, 200, 32400, 128, 8),
         ('TransFusion self', 4, 200, 200, 128, 8),
         ('MapTR v1 decoder self', 4, 1000, 1000, 256, 8),
         ('MapTR v2 instance self', 80, 350, 350, 256, 8),
         ('Sparse4D self', 6, 900, 900, 512, 8),
         ('Sparse4D temporal', 6, 900, 600, 512, 8))
QUICK_SIZES = (('tiny cross', 2, 5, 37, 16, 4), ('tiny self', 2, 9, 9, 16, 4))


def benchmark(device: str, quick: bool = False) -> List[Dict]:
    """Time mmcv's call against turbox's, the math backend's and torch's fused choice.

    Args:
        device (str): ``'cuda'`` (or ``'cuda:N'``) or ``'cpu'`` (torch's choice there; the
            math backend is a CUDA rule).
        quick (bool): Tiny sizes and a few iterations, for tests. Defaults to False.

    Returns:
        list[dict]: Three rows per size, as described in :mod:`turbox_mm.benchmark.micro`.
    """
    dev = benchmark_device('attention', device)
    iters, warmup = (3, 1) if quick else (20, 5)
    timing_device = 'cuda' if dev.type == 'cuda' else 'cpu'
    before = torch.get_float32_matmul_precision()
    rows = []
    try:
        torch.set_float32_matmul_precision('high')  # TF32 matmuls, as precision.tf32
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

            def forced(backend):
                def call():
                    with sdpa_kernel(backend):
                        step(mmcv_inner, need_weights=False)
                return call

            stock = timed(lambda: step(mmcv_inner))  # mmcv's call: need_weights=True
            shape = (f'batch {batch}, {queries} x {keys}, {channels} channels, {heads} heads, '
                     'float32, dropout 0.1, forward + backward')
            fused = ([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]
                     if dev.type == 'cuda' else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
            for label, fn in ((f'{name}: mmcv call vs turbox', lambda: step(turbox_inner)),
                              (f'{name}: mmcv call vs math backend', forced(SDPBackend.MATH)),
                              (f"{name}: mmcv call vs torch's fused kernels", forced(fused))):
                rows.append(dict(component='attention', case=label, stock=stock,
                                 turbox=timed(fn), note=shape))
    finally:
        torch.set_float32_matmul_precision(before)
    return rows
