"""Micro benchmark: the backbone and neck of a camera model, eager vs compiled, fp32 vs TF32.

What ``turbox.compile`` and ``turbox.precision`` change, measured where they act: one training
step's forward and backward of mmdet's ResNet-50 + FPN (Sparse4D v3's image backbone and neck)
on a batch of 6 samples x 6 cameras at 256x704, with a dummy loss over the FPN outputs.

- ``precision``: strict float32 (stock) vs TF32 matmuls and convolutions (turbox), both eager.
- ``compile``: eager vs ``compile_submodules(model, ['backbone', 'neck'])`` (turbox's
  ``torch.compile`` of submodules with Inductor), both with TF32 and cuDNN autotuning, so the
  row shows what compilation adds on top of the precision policy.

Compilation happens in the warm-up calls and is not timed. ``quick=True`` runs a tiny network
on the CPU with the ``eager`` backend (no C++ toolchain needed): it checks the code path, not the
speed.
"""
from typing import Dict, List

import torch
from torch import nn

from turbox_mm.benchmark.timing import time_fn
from turbox_mm.engine.runner.module_compiler import compile_submodules
from turbox_mm.engine.runner.precision import apply_precision


def _model(quick: bool) -> nn.Module:
    if quick:
        model = nn.Module()
        model.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                       nn.ReLU())
        model.neck = nn.Conv2d(8, 8, 1)
        model.forward = lambda x: [model.neck(model.backbone(x))]
        return model
    from mmdet.models.backbones import ResNet
    from mmdet.models.necks import FPN

    class BackboneNeck(nn.Module):

        def __init__(self):
            super().__init__()
            # Sparse4D v3: ResNet-50 (norm_eval, frozen stem), 4-level FPN with 256 channels.
            self.backbone = ResNet(depth=50, num_stages=4, out_indices=(0, 1, 2, 3),
                                   frozen_stages=-1, norm_eval=False, style='pytorch')
            self.neck = FPN(in_channels=[256, 512, 1024, 2048], out_channels=256, num_outs=4,
                            start_level=0, add_extra_convs='on_output',
                            relu_before_extra_convs=True)

        def forward(self, x):
            return self.neck(self.backbone(x))

    return BackboneNeck()


def _step_fn(model: nn.Module, x: torch.Tensor):

    def step():
        loss = sum(out.float().mean() for out in model(x))
        loss.backward()
        for p in model.parameters():
            p.grad = None

    return step


def benchmark(device: str, quick: bool = False) -> List[Dict]:
    """Time forward+backward of ResNet-50 + FPN: eager vs compiled, float32 vs TF32.

    Args:
        device (str): ``'cuda'`` or ``'cpu'``.
        quick (bool): A tiny network on the CPU with the ``eager`` backend. Defaults to False.

    Returns:
        list[dict]: Rows of ``component``, ``case``, ``stock``, ``turbox``, ``note``.
    """
    if quick:
        device, shape, iters, warmup, backend = 'cpu', (2, 3, 16, 16), 3, 2, 'eager'
    else:
        shape, iters, warmup, backend = (36, 3, 256, 704), 10, 3, 'inductor'
    torch.manual_seed(0)
    x = torch.randn(shape, device=device)
    conv = getattr(torch.backends.cudnn, 'conv', None)
    new_api = conv is not None and hasattr(conv, 'fp32_precision')
    # torch >= 2.9 refuses to read the legacy flag once the new one was set: read only one.
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark,
             conv.fp32_precision if new_api else None,
             None if new_api else torch.backends.cudnn.allow_tf32)
    rows = []
    try:
        torch.backends.cudnn.benchmark = True
        eager = _model(quick).to(device)
        apply_precision(dict(allow_tf32=False))
        strict = time_fn(_step_fn(eager, x), iters=iters, warmup=warmup, device=device)
        apply_precision(dict(allow_tf32=True))
        tf32 = time_fn(_step_fn(eager, x), iters=iters, warmup=warmup, device=device)
        rows.append(dict(component='precision', case=f'ResNet-50+FPN fwd+bwd {tuple(shape)}',
                         stock=strict, turbox=tf32,
                         note='stock: float32 matmul/conv; turbox: TF32 (turbox.precision.tf32)'))
        compiled = _model(quick).to(device)
        compiled.load_state_dict(eager.state_dict())
        compile_submodules(compiled, ['backbone', 'neck'], backend=backend)
        # Both with TF32, the turbox default (an AMP row would double the compile time).
        rows.append(dict(
            component='compile', case='ResNet-50+FPN fwd+bwd, TF32',
            stock=tf32,
            turbox=time_fn(_step_fn(compiled, x), iters=iters, warmup=warmup,
                           device=device),
            note=f'stock: eager; turbox: torch.compile({backend}) of backbone and neck, compile '
                 'time not counted'))
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.benchmark = saved[1]
        if saved[2] is not None:
            conv.fp32_precision = saved[2]
        else:
            torch.backends.cudnn.allow_tf32 = saved[3]
    return rows
