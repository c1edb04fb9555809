"""Micro benchmark: dynamic scatter, mmcv's ``DynamicScatter`` against turbox_mm's.

Stock is ``mmcv.ops.DynamicScatter`` as mmdet3d's dynamic voxel encoders call it: ``[N, 4]``
``(batch, z, y, x)`` coordinates, a per-sample loop of mmcv's CUDA op. Turbox is
:class:`turbox_mm.models.layers.TurboxDynamicScatter` (one call of the Triton path for the
batch). mmcv has no CPU op: on the CPU only the turbox column is timed (its reference), to
check that the benchmark runs.

Sizes: a batch of 4 ten-sweep nuScenes samples (about 349k points each), dynamically voxelized
at two settings of mmdet3d's dynamic encoders: ``DynamicPillarFeatureNet``'s 64-channel
point features scattered with max into 0.2 m pillars, and ``DynamicVFE``'s cluster-centre
mean of the 5 raw channels into 0.075 x 0.075 x 0.2 m voxels. Each is timed forward, and
forward + backward.
"""
from typing import Dict, List

import torch
import torch.nn.functional as F

from turbox_mm.benchmark.micro.voxelize import POINTS, QUICK_POINTS, sweep_cloud
from turbox_mm.benchmark.timing import benchmark_device, time_fn
from turbox_mm.ops.voxelize import dynamic_voxelize

CASES = {
    'pillars 0.2 m, 64 ch, max': dict(voxel_size=[0.2, 0.2, 8],
                                      pcr=[-51.2, -51.2, -5, 51.2, 51.2, 3], channels=64,
                                      average=False),
    'voxels 0.075 m, 5 ch, mean': dict(voxel_size=[0.075, 0.075, 0.2],
                                       pcr=[-54, -54, -5, 54, 54, 3], channels=5, average=True),
}
SAMPLES = 4


def benchmark(device: str, quick: bool = False) -> List[Dict]:
    """Time mmcv's and turbox_mm's dynamic scatter at nuScenes' sizes.

    Args:
        device (str): ``'cuda'`` (or ``'cuda:N'``) or ``'cpu'``.
        quick (bool): 2k points per sample and a few iterations, for tests. Defaults to False.

    Returns:
        list[dict]: Rows as described in :mod:`turbox_mm.benchmark.micro`.
    """
    from mmcv.ops import DynamicScatter

    from turbox_mm.models.layers import TurboxDynamicScatter
    dev = benchmark_device('dynamic_scatter', device)
    num = QUICK_POINTS if quick else POINTS
    iters, warmup = (3, 1) if quick else (30, 5)
    clouds = [sweep_cloud(num, seed).to(dev) for seed in range(SAMPLES)]
    rows = []
    for name, c in CASES.items():
        coors = torch.cat([F.pad(dynamic_voxelize(cloud, c['voxel_size'], c['pcr']), (1, 0),
                                 value=s) for s, cloud in enumerate(clouds)])
        gen = torch.Generator(device=dev).manual_seed(0)
        feats = torch.randn(coors.shape[0], c['channels'], device=dev, generator=gen)
        grad_feats = feats.clone().requires_grad_(True)
        layers = dict(stock=DynamicScatter(c['voxel_size'], c['pcr'], c['average']),
                      turbox=TurboxDynamicScatter(c['voxel_size'], c['pcr'], c['average']))
        voxels = int(layers['turbox'](feats, coors)[0].shape[0])
        note = f'{SAMPLES} x {num} points, {voxels} voxels'
        if dev.type != 'cuda':
            note += '; mmcv has no CPU op, turbox runs its reference'

        def timed(side, backward):
            if side == 'stock' and dev.type != 'cuda':
                return None
            layer = layers[side]

            def step():
                out = layer(grad_feats if backward else feats, coors)[0]
                if backward:
                    out.backward(torch.ones_like(out))

            return time_fn(step, iters=iters, warmup=warmup, device=dev.type,
                           setup=(lambda: setattr(grad_feats, 'grad', None)) if backward else None)

        for label, backward in (('forward', False), ('forward + backward', True)):
            rows.append(dict(component='dynamic_scatter', case=f'{name}, {label}',
                             stock=timed('stock', backward), turbox=timed('turbox', backward),
                             note=note))
    return rows
