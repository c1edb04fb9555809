"""Micro benchmark: one optimizer update (clip + step + zero_grad), stock vs turbox.

The parameter set has the tensor shapes of mmdet's ResNet-50 + FPN (26.9M parameters in 175
tensors), repeated to about 77M parameters, the size of the reference measurement on the H100
(torch AdamW: for-loop 23.4 ms, foreach 3.9 ms, fused 1.7 ms; clip with ``.item()`` 1.5 ms).
Gradients are fixed random tensors, copied back before every timed call (untimed, followed
by a device synchronize so that each call starts on an idle GPU and its host overhead counts).

Stock is mmengine's ``OptimWrapper`` / ``AmpOptimWrapper`` with torch's AdamW as mmengine
builds it (``foreach`` by default on CUDA, or the for-loop) and ``clip_grad=dict(max_norm=35)``,
which reads the norm on the host. Turbox is ``TurboxOptimWrapper`` /
``TurboxAmpOptimWrapper`` built by ``TurboxOptimWrapperConstructor`` (fused AdamW) with the
same clipping, sync-free.
"""
import warnings
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn
from mmengine.optim import DefaultOptimWrapperConstructor

from turbox_mm.benchmark.timing import time_fn
from turbox_mm.engine.optim.fused_optim_wrapper_constructor import TurboxOptimWrapperConstructor
from turbox_mm.engine.optim.sync_free_optim_wrapper import (TurboxAmpOptimWrapper,
                                                            TurboxOptimWrapper)

TARGET_PARAMS = 77e6
CLIP_GRAD = dict(max_norm=35, norm_type=2)
OPTIMIZER = dict(type='AdamW', lr=1e-4, weight_decay=0.05)
AMP_SCALE = 2.0**16


def resnet50_fpn_shapes(quick: bool = False) -> List[torch.Size]:
    """Parameter shapes of mmdet's ResNet-50 + FPN (channels / 8 when ``quick``).

    Args:
        quick (bool): Use 8 base channels instead of 64 (0.4M parameters, same tensor count).
            Defaults to False.

    Returns:
        list[torch.Size]: One shape per parameter tensor, in module order.
    """
    from mmdet.models.backbones import ResNet
    from mmdet.models.necks import FPN
    base = 8 if quick else 64
    with torch.device('meta'):
        backbone = ResNet(depth=50, base_channels=base, stem_channels=base)
        neck = FPN([base * 4, base * 8, base * 16, base * 32], base * 4, num_outs=5)
    return [p.shape for m in (backbone, neck) for p in m.parameters()]


def make_param_set(device: str, quick: bool = False,
                   seed: int = 0) -> Tuple[nn.Module, List[torch.Tensor], str]:
    """A module holding the benchmark's parameters, their gradients and a description.

    Args:
        device (str): Where the tensors live.
        quick (bool): Tiny shapes, one copy. Defaults to False.
        seed (int): Seed of the parameter and gradient values. Defaults to 0.

    Returns:
        tuple: ``(module, grads, description)``; ``grads[i]`` matches the i-th parameter.
    """
    shapes = resnet50_fpn_shapes(quick)
    per_copy = sum(s.numel() for s in shapes)
    copies = 1 if quick else max(1, round(TARGET_PARAMS / per_copy))
    gen = torch.Generator(device='cpu').manual_seed(seed)
    params, grads = [], []
    for shape in shapes * copies:
        params.append(nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device)))
        grads.append(torch.randn(shape, generator=gen).to(device))
    numel = per_copy * copies
    desc = (f'{numel / 1e6:.1f}M params in {len(params)} tensors '
            f'(ResNet-50+FPN shapes{" / 8 channels" if quick else ""} x{copies})')
    return nn.ParameterList(params), grads, desc


def _timed_update(wrapper, module: nn.Module, grads: List[torch.Tensor], device: str,
                  iters: int, warmup: int, grad_scale: float = 1.0,
                  clip_only: bool = False) -> Dict[str, float]:
    params = list(module.parameters())
    work = [torch.empty_like(g) for g in grads]
    source = [g * grad_scale for g in grads] if grad_scale != 1.0 else grads
    use_cuda = str(device).startswith('cuda')

    def setup():
        torch._foreach_copy_(work, source)
        for p, g in zip(params, work):
            p.grad = g
        if use_cuda:
            torch.cuda.synchronize()

    if clip_only:
        fn: Callable[[], object] = wrapper._clip_grad
    else:
        def fn():
            wrapper.step()
            wrapper.zero_grad()

    stats = time_fn(fn, iters=iters, warmup=warmup, device=device, setup=setup)
    flush = getattr(wrapper, 'flush_grad_norm', None)
    if flush is not None:
        flush()
    return stats


def _build(constructor_cls, wrapper_type, module: nn.Module, **optimizer_kwargs):
    cfg = dict(type=wrapper_type, optimizer=dict(OPTIMIZER, **optimizer_kwargs),
               clip_grad=dict(CLIP_GRAD))
    if wrapper_type in ('AmpOptimWrapper', TurboxAmpOptimWrapper):
        cfg['loss_scale'] = 'dynamic'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.cuda.amp.GradScaler in mmengine
        wrapper = constructor_cls(cfg)(module)
    if hasattr(wrapper, 'loss_scaler'):
        wrapper.loss_scaler.scale(torch.ones((), device=next(module.parameters()).device))
    return wrapper


def benchmark(device: str, quick: bool = False) -> List[Dict]:
    """Time one optimizer update, stock mmengine vs turbox, on ``device``.

    Args:
        device (str): ``'cuda'`` or ``'cpu'``.
        quick (bool): Tiny shapes and few iterations, for tests. Defaults to False.

    Returns:
        list[dict]: Rows with ``component``, ``case``, ``stock``, ``turbox`` and ``note``.

    Examples:
        >>> rows = benchmark('cpu', quick=True)
        >>> [row['case'] for row in rows][0]
        'AdamW + clip, fp32, stock foreach'
    """
    iters, warmup = (3, 1) if quick else (50, 10)
    module, grads, desc = make_param_set(device, quick)
    timing = dict(device=device, iters=iters, warmup=warmup)
    stock = DefaultOptimWrapperConstructor
    turbox = TurboxOptimWrapperConstructor

    def run(constructor_cls, wrapper_type, grad_scale=1.0, clip_only=False, **kwargs):
        wrapper = _build(constructor_cls, wrapper_type, module, **kwargs)
        try:
            return _timed_update(wrapper, module, grads, grad_scale=grad_scale,
                                 clip_only=clip_only, **timing)
        finally:
            del wrapper
            module.zero_grad(set_to_none=True)

    turbox_fp32 = run(turbox, TurboxOptimWrapper)
    rows = [
        dict(component='optimizer', case='AdamW + clip, fp32, stock foreach',
             stock=run(stock, 'OptimWrapper'), turbox=turbox_fp32,
             note=f'{desc}; turbox: fused AdamW, sync-free clip'),
        dict(component='optimizer', case='AdamW + clip, fp32, stock for-loop',
             stock=run(stock, 'OptimWrapper', foreach=False), turbox=turbox_fp32,
             note='stock: AdamW(foreach=False)'),
        dict(component='optimizer', case='clip only (max_norm=35, L2)',
             stock=run(stock, 'OptimWrapper', clip_only=True),
             turbox=run(turbox, TurboxOptimWrapper, clip_only=True),
             note="stock reads the norm with float(); turbox copies it asynchronously"),
    ]
    if str(device).startswith('cuda') and torch.cuda.is_available():
        rows.append(
            dict(component='optimizer', case='AdamW + clip, AMP fp16 dynamic scale',
                 stock=run(stock, 'AmpOptimWrapper', grad_scale=AMP_SCALE),
                 turbox=run(turbox, TurboxAmpOptimWrapper, grad_scale=AMP_SCALE),
                 note='unscale + clip + GradScaler step/update; stock foreach AdamW syncs '
                 'on found_inf'))
    else:
        rows.append(dict(component='optimizer', case='AdamW + clip, AMP fp16 dynamic scale',
                         stock=None, turbox=None, note='needs CUDA (AmpOptimWrapper)'))
    return rows
