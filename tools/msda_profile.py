"""Where multi-scale deformable attention's time goes, turbox_mm's op against mmcv's, forward +
backward at MapTR's decoder and TSA sizes: the host time to queue one call, the wall time per
call, and the GPU time of each kernel (torch.profiler, CUDA activity). Needs a CUDA GPU.

    python tools/msda_profile.py

A call whose wall time equals its host time is host-bound: the GPU waits for the launches.
"""
import time

import torch
from torch.profiler import profile, ProfilerActivity
from turbox_mm.benchmark.micro.ms_deform_attn import CASES, make_inputs, mmcv_ms_deform_attn
from turbox_mm.ops.ms_deform_attn import ms_deform_attn

for case in ('MapTR decoder, 1000 queries', 'MapTR v2 decoder, 7000 queries', 'MapTR v1 TSA'):
    size = CASES[case]
    value, shapes, start, loc, weights = make_inputs(size, 'cuda')
    grad = torch.randn(size['bs'], size['queries'], size['heads'] * size['dims'], device='cuda')
    for name, fn in (('mmcv', mmcv_ms_deform_attn), ('turbox', ms_deform_attn)):
        v, l, w = (t.clone().requires_grad_() for t in (value, loc, weights))

        def step():
            out = fn(v, shapes, start, l, w)
            out.backward(grad)
        for _ in range(10):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            step()
        host = (time.perf_counter() - t0) / 50 * 1e3
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 50 * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        print(f'== {case} {name}: host {host:.3f} ms/call (queueing), wall {wall:.3f} ms/call')
        rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:8]
        for e in rows:
            print(f'   {e.device_time_total / 10 / 1e3:8.3f} ms/call  x{e.count // 10:<3} '
                  f'{e.key[:90]}')
