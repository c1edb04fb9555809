"""Micro benchmark: BEV NMS and rotated overlaps, mmcv's / mmdet3d's ops against turbox_mm's.

Stock is what mmdet3d 1.4 calls: ``mmdet3d.models.layers.nms_bev`` (mmcv's ``nms_rotated``),
``nms_normal_bev`` (mmcv's ``nms``), mmcv's ``nms3d`` / ``nms3d_normal``, mmdet3d's numba
``circle_nms`` (with the host copy CenterHead makes before it) and mmcv's ``box_iou_rotated``.
Turbox is :mod:`turbox_mm.ops.bev_nms` (the Triton kernels on CUDA; on the CPU the reference,
so the CPU rows only check that the benchmark runs). Each row's note says whether both kept
the same indices.

Boxes: pre-NMS detections of a nuScenes sweep, 4000 by default (the issue's size): 500 objects
within +-50 m (car to pedestrian sizes, any heading), each detected 8 times with centre, size
and heading jitter, random scores. CenterPoint's per-task call is also timed (1000 boxes in,
``pre_max_size=1000``, ``post_max_size=83``, IoU 0.2).
"""
from typing import Dict, List

import torch

from turbox_mm.benchmark.timing import benchmark_device, time_fn
from turbox_mm.ops import bev_nms as tb

BOXES, QUICK_BOXES = 4000, 48


def detections(num: int, seed: int = 0) -> torch.Tensor:
    """``[num, 8]``: ``x, y, z, dx, dy, dz, heading, score``, 8 jittered copies per object."""
    gen = torch.Generator().manual_seed(seed)
    objects = max(-(-num // 8), 1)
    centre = (torch.rand(objects, 3, generator=gen) * 2 - 1) * torch.tensor([50.0, 50.0, 1.0])
    size = torch.rand(objects, 3, generator=gen) * torch.tensor([4.0, 1.5, 1.0]) + \
        torch.tensor([0.5, 0.5, 1.0])
    heading = (torch.rand(objects, 1, generator=gen) * 2 - 1) * 3.14159
    base = torch.cat([centre, size, heading], 1).repeat_interleave(8, 0)[:num]
    jitter = torch.randn(base.shape, generator=gen) * torch.tensor(
        [0.3, 0.3, 0.1, 0.2, 0.1, 0.1, 0.2])
    boxes = base + jitter
    boxes[:, 3:6] = boxes[:, 3:6].abs() + 0.1
    return torch.cat([boxes, torch.rand(num, 1, generator=gen)], 1)


def _xyxyr(boxes: torch.Tensor) -> torch.Tensor:
    half = boxes[:, 3:5] / 2
    return torch.cat([boxes[:, :2] - half, boxes[:, :2] + half, boxes[:, 6:7]], 1)


def benchmark(device: str, quick: bool = False) -> List[Dict]:
    """Time mmcv's / mmdet3d's and turbox_mm's BEV NMS.

    Args:
        device (str): ``'cuda'`` (or ``'cuda:N'``) or ``'cpu'``.
        quick (bool): 48 boxes and a few iterations, for tests. Defaults to False.

    Returns:
        list[dict]: Rows as described in :mod:`turbox_mm.benchmark.micro`.
    """
    from mmcv.ops import box_iou_rotated, nms3d, nms3d_normal
    from mmdet3d.models.layers import circle_nms, nms_bev, nms_normal_bev
    dev = benchmark_device('bev_nms', device)
    num = QUICK_BOXES if quick else BOXES
    iters, warmup = (3, 1) if quick else (50, 10)
    dets = detections(num).to(dev)
    boxes7, scores = dets[:, :7].contiguous(), dets[:, 7].contiguous()
    bev = _xyxyr(boxes7)
    xywhr = boxes7[:, [0, 1, 3, 4, 6]].contiguous()
    note = f'{num} boxes'
    if dev.type != 'cuda':
        note += '; on the CPU the op runs its reference'

    def timed(fn):
        return time_fn(fn, iters=iters, warmup=warmup, device=dev.type)

    def circle_stock():
        centres = torch.cat([boxes7[:, :2], scores[:, None]], 1)
        return torch.tensor(circle_nms(centres.detach().cpu().numpy(), 4.0, post_max_size=83),
                            dtype=torch.long, device=dev)

    def circle_turbox():
        return tb.circle_nms(torch.cat([boxes7[:, :2], scores[:, None]], 1), 4.0, 83)

    task = min(num, 1000)
    cases = [
        ('rotated (mmdet3d nms_bev)', lambda: nms_bev(bev, scores, 0.2),
         lambda: tb.nms_bev(bev, scores, 0.2), note),
        ('centerpoint task: nms_bev 1000 -> 83',
         lambda: nms_bev(bev[:task], scores[:task], 0.2, 1000, 83),
         lambda: tb.nms_bev(bev[:task], scores[:task], 0.2, 1000, 83), f'{task} boxes'),
        ('iou3d (mmcv nms3d)', lambda: nms3d(boxes7, scores, 0.2),
         lambda: tb.nms3d(boxes7, scores, 0.2), note),
        ('aligned (nms_normal_bev)', lambda: nms_normal_bev(bev, scores, 0.2),
         lambda: tb.nms_normal_bev(bev, scores, 0.2), note),
        ('iou3d_normal (mmcv nms3d_normal)', lambda: nms3d_normal(boxes7, scores, 0.2),
         lambda: tb.nms3d_normal(boxes7, scores, 0.2), note),
        ('circle (mmdet3d circle_nms, r^2 = 4)', circle_stock, circle_turbox,
         note + '; stock: host copy + numba'),
    ]
    if dev.type != 'cuda':  # mmcv's iou3d ops are CUDA-only
        cases = [c for c in cases if 'nms3d' not in c[0]]
    rows = []
    for case, stock_fn, turbox_fn, case_note in cases:
        same = torch.equal(stock_fn().cpu(), turbox_fn().cpu())
        rows.append(dict(component='bev_nms', case=case, stock=timed(stock_fn),
                         turbox=timed(turbox_fn),
                         note=f'{case_note}; kept indices {"equal" if same else "DIFFER"}'))
    pairs = min(num, 1000)
    a = xywhr[:pairs]
    diff = (box_iou_rotated(a, a) - tb.box_iou_rotated(a, a)).abs().max().item()
    rows.append(dict(component='bev_nms', case=f'box_iou_rotated {pairs} x {pairs}',
                     stock=timed(lambda: box_iou_rotated(a, a)),
                     turbox=timed(lambda: tb.box_iou_rotated(a, a)),
                     note=f'max |IoU difference| {diff:.1e}'))
    return rows
