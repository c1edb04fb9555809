"""EMA update: mmengine's ExponentialMovingAverage against turbox's graph-replayed one.

One timed call is one ``update_parameters(model)`` on an averaging step, the work
``EMAHook.after_train_iter`` adds to every training iteration. The models are detector-sized:
mmdet's ResNet-50 + FPN (26.9M parameters, 175 parameter and 159 buffer tensors) and the same
with Faster R-CNN's RPN and box-head layers (41.5M parameters), built from plain layers of the
shapes mmdet's ``faster-rcnn_r50_fpn`` config gives them.

After timing, both averaged models have seen the same updates; the row's note gives their
largest difference (0 expected) and the effective bandwidth of the turbox update.
"""
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn
from mmengine.model import ExponentialMovingAverage

from turbox_mm.benchmark.timing import time_fn
from turbox_mm.engine.hooks.graph_ema import GraphExponentialMovingAverage

MOMENTUM = 0.0002


def resnet50_fpn() -> nn.Module:
    """mmdet's ResNet-50 backbone and FPN neck, as in ``faster-rcnn_r50_fpn``."""
    from mmdet.models.backbones import ResNet
    from mmdet.models.necks import FPN
    return nn.ModuleDict(
        dict(backbone=ResNet(depth=50, num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=1,
                             norm_cfg=dict(type='BN', requires_grad=True), norm_eval=True),
             neck=FPN(in_channels=[256, 512, 1024, 2048], out_channels=256, num_outs=5)))


def faster_rcnn_r50_fpn_shapes() -> nn.Module:
    """ResNet-50 + FPN plus layers shaped as Faster R-CNN's RPN head and Shared2FC box head
    (80 classes, 3 anchors, 7x7 RoIs)."""
    model = resnet50_fpn()
    model['rpn_head'] = nn.ModuleDict(
        dict(rpn_conv=nn.Conv2d(256, 256, 3, padding=1), rpn_cls=nn.Conv2d(256, 3, 1),
             rpn_reg=nn.Conv2d(256, 12, 1)))
    model['roi_head'] = nn.ModuleDict(
        dict(fc1=nn.Linear(256 * 7 * 7, 1024), fc2=nn.Linear(1024, 1024),
             fc_cls=nn.Linear(1024, 81), fc_reg=nn.Linear(1024, 320)))
    return model


def tiny_convnet() -> nn.Module:
    """A few layers with parameters, float and integer buffers (quick mode)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                         nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 4))


def _cases(quick: bool) -> List[Tuple[str, Callable[[], nn.Module], bool]]:
    if quick:
        return [('tiny convnet', tiny_convnet, False)]
    return [('ResNet-50+FPN', resnet50_fpn, False),
            ('ResNet-50+FPN, update_buffers', resnet50_fpn, True),
            ('Faster R-CNN R50-FPN shapes', faster_rcnn_r50_fpn_shapes, False)]


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(((sa[k].double() - sb[k].double()).abs().max().item()
                for k in sa if sa[k].numel()), default=0.0)


def _measure(case: str, build: Callable[[], nn.Module], update_buffers: bool, device: str,
             iters: int, warmup: int) -> Dict:
    torch.manual_seed(0)
    model = build().to(device)
    stock = ExponentialMovingAverage(model, momentum=MOMENTUM, update_buffers=update_buffers)
    turbox = GraphExponentialMovingAverage(model, momentum=MOMENTUM,
                                           update_buffers=update_buffers)
    # Step 0 copies; every call after it averages.
    stock.update_parameters(model)
    turbox.update_parameters(model)
    stock_ms = time_fn(lambda: stock.update_parameters(model), iters, warmup, device)
    turbox_ms = time_fn(lambda: turbox.update_parameters(model), iters, warmup, device)
    diff = _max_diff(stock, turbox)
    n_params = sum(p.numel() for p in model.parameters())
    n_buffers = sum(b.numel() for b in model.buffers())
    n_tensors = len(list(model.parameters())) + len(list(model.buffers()))
    # Averaging reads the averaged and the source tensor and writes the averaged one.
    moved = 3 * sum(t.numel() * t.element_size() for t in turbox.avg_parameters.values()
                    if t.dtype.is_floating_point)
    gbps = moved / (turbox_ms['median_ms'] * 1e-3) / 1e9
    note = (f'{n_params / 1e6:.1f}M params + {n_buffers / 1e3:.0f}k buffer elems in '
            f'{n_tensors} tensors; graph={turbox.graph_active}; max|stock-turbox|={diff:.1e}; '
            f'turbox {gbps:.0f} GB/s')
    return dict(component='ema', case=case, stock=stock_ms, turbox=turbox_ms, note=note)


def benchmark(device: str, quick: bool = False) -> List[Dict]:
    """Time one EMA update, stock against turbox, on detector-sized models.

    Args:
        device (str): ``'cuda'`` (or ``'cuda:N'``) or ``'cpu'``.
        quick (bool): A tiny model and few iterations, for tests. Defaults to False.

    Returns:
        list[dict]: One row per model, with ``component``, ``case``, ``stock``, ``turbox``
        and ``note`` (sizes, whether a graph was replayed, the largest difference between
        the two averaged models and the turbox update's effective bandwidth).

    Examples:
        >>> rows = benchmark('cpu', quick=True)
        >>> rows[0]['component'], rows[0]['stock']['iters'] > 0
        ('ema', True)
    """
    iters, warmup = (5, 2) if quick else (100, 20)
    rows = []
    for case, build, update_buffers in _cases(quick):
        rows.append(_measure(case, build, update_buffers, device, iters, warmup))
        if str(device).startswith('cuda'):
            torch.cuda.empty_cache()
    return rows
