"""Micro benchmark: the sigmoid focal loss of a detection head, mmdet's ``FocalLoss`` (mmcv's
CUDA kernel) against :func:`turbox_mm.models.losses.focal_loss_like_mmdet` (turbox_mm's op).

Stock is what mmdet's ``FocalLoss(use_sigmoid=True)`` runs on the GPU: mmcv's
``sigmoid_focal_loss`` kernels, whose forward reads the largest label on the host (a sync a
call), then mmdet's weighting and reduction. Turbox is the same loss through
``turbox_mm::sigmoid_focal`` (one kernel each way, no host read) and the same reduction.

Size: one decoder layer of Sparse4D v3 (batch 6 x 900 anchors, 10 classes; a step calls it
12 times: 6 layers and their denoising groups) and MapTR v2's one-to-many decoder layer
(batch 4 x 350 queries, 3 classes). Times include the reduction, as a head calls it. On the
CPU the rows are not timed (mmcv's kernel is CUDA-only).
"""
from typing import Dict, List

import torch

from turbox_mm.benchmark.timing import benchmark_device, time_fn

CASES = {'Sparse4D layer (5400 x 10)': (5400, 10), 'MapTR v2 one-to-many (1400 x 3)': (1400, 3)}


def benchmark(device: str, quick: bool = False) -> List[Dict]:
    """Time the focal loss forward and forward + backward.

    Args:
        device (str): ``'cuda'`` (or ``'cuda:N'``) or ``'cpu'``.
        quick (bool): A few iterations. Defaults to False.

    Returns:
        list[dict]: Rows as described in :mod:`turbox_mm.benchmark.micro`.
    """
    from mmdet.models.losses import FocalLoss

    from turbox_mm.models.losses import focal_loss_like_mmdet
    dev = benchmark_device('sigmoid_focal', device)
    rows = []
    if dev.type != 'cuda':
        for name in CASES:
            for label in ('fwd', 'fwd+bwd'):
                rows.append(dict(component='sigmoid_focal', case=f'{name} {label}', stock=None,
                                 turbox=None, note='needs CUDA (mmcv\'s kernel is CUDA-only)'))
        return rows
    iters, warmup = (3, 1) if quick else (100, 20)
    loss = FocalLoss(use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=2.0)
    for name, (num, classes) in CASES.items():
        gen = torch.Generator().manual_seed(0)
        logits = (torch.randn(num, classes, generator=gen) * 3).to(dev).requires_grad_()
        target = torch.randint(0, classes + 1, (num, ), generator=gen).to(dev)
        weight = (torch.rand(num, generator=gen) > 0.2).float().to(dev)
        avg = torch.tensor(float(num) / 10, device=dev)
        stock = lambda: loss(logits, target, weight=weight, avg_factor=avg)  # noqa: E731
        turbox = lambda: focal_loss_like_mmdet(loss, logits, target, weight, avg)  # noqa: E731

        def both(fn):
            def step():
                logits.grad = None
                fn().backward()
            return step

        with torch.no_grad():
            diff = (stock() - turbox()).abs().item()
            rows.append(dict(component='sigmoid_focal', case=f'{name} fwd',
                             stock=time_fn(stock, iters=iters, warmup=warmup, device='cuda'),
                             turbox=time_fn(turbox, iters=iters, warmup=warmup, device='cuda'),
                             note=f'with the reduction; |difference| {diff:.1e}'))
        rows.append(dict(component='sigmoid_focal', case=f'{name} fwd+bwd',
                         stock=time_fn(both(stock), iters=iters, warmup=warmup, device='cuda'),
                         turbox=time_fn(both(turbox), iters=iters, warmup=warmup,
                                        device='cuda'),
                         note='with the reduction; stock syncs once a call'))
    return rows
