"""Micro benchmark: hard and dynamic voxelization, mmcv's ops against turbox_mm's.

Stock is ``mmcv.ops.voxelization`` as mmdet3d's ``VoxelizationByGridShape`` calls it:
deterministic hard voxelization (mmdet3d's default; rows "det."), its non-deterministic mode
(rows "non-det.", CUDA only; turbox's answer to both is the same deterministic op), and dynamic
voxelization. Turbox is :func:`turbox_mm.ops.voxelize.voxelization` (the Triton kernels on
CUDA; on the CPU the op runs its PyTorch reference, so the CPU rows only check that the
benchmark runs). A "batch of 4" row times mmdet3d's per-sample loop against one batched call
(:meth:`~turbox_mm.models.layers.TurboxVoxelization.forward_batch`).

Sizes: a 10-sweep nuScenes sample, about 349k points (x, y, z, intensity, time) spread over
+-70 m, at the settings of mmdet3d 1.4's nuScenes configs: CenterPoint 0.075 m voxels (1440 x
1440 x 40, 10 points, 120k voxels in training), PointPillars 0.25 m pillars (400 x 400 x 1,
64 points, 30k pillars).
"""
from typing import Dict, List

import torch

from turbox_mm.benchmark.timing import benchmark_device, time_fn
from turbox_mm.ops.voxelize import hard_voxelize, voxelization

CASES = {
    'centerpoint 0.075': dict(voxel_size=[0.075, 0.075, 0.2], pcr=[-54, -54, -5, 54, 54, 3],
                              max_points=10, max_voxels=120000),
    'pointpillars 0.25': dict(voxel_size=[0.25, 0.25, 8], pcr=[-50, -50, -5, 50, 50, 3],
                              max_points=64, max_voxels=30000),
}
POINTS, QUICK_POINTS = 349_000, 2_000


def sweep_cloud(num: int, seed: int = 0) -> torch.Tensor:
    """``[num, 5]`` points: radius squared-uniform to 70 m (denser near the car, as a lidar),
    z in [-4, 4], intensity and sweep time offsets."""
    gen = torch.Generator().manual_seed(seed)
    radius = torch.rand(num, generator=gen).pow(2) * 70
    angle = torch.rand(num, generator=gen) * 6.283185307
    return torch.stack([radius * angle.cos(), radius * angle.sin(),
                        torch.rand(num, generator=gen) * 8 - 4, torch.rand(num, generator=gen),
                        torch.rand(num, generator=gen) * 0.45], 1)


def benchmark(device: str, quick: bool = False) -> List[Dict]:
    """Time mmcv's and turbox_mm's voxelization at nuScenes' sizes.

    Args:
        device (str): ``'cuda'`` (or ``'cuda:N'``) or ``'cpu'``.
        quick (bool): 2k points and a few iterations, for tests. Defaults to False.

    Returns:
        list[dict]: Rows as described in :mod:`turbox_mm.benchmark.micro`.

    Examples:
        >>> rows = benchmark('cpu', quick=True)  # doctest: +SKIP
        >>> rows[0]['component']  # doctest: +SKIP
        'voxelize'
    """
    from mmcv.ops import voxelization as mmcv_voxelization
    dev = benchmark_device('voxelize', device)
    num = QUICK_POINTS if quick else POINTS
    iters, warmup = (3, 1) if quick else (30, 5)
    clouds = [sweep_cloud(num, seed).to(dev) for seed in range(4)]
    note = f'{num} points'
    if dev.type != 'cuda':
        note += '; on the CPU the op runs its reference'

    def timed(fn):
        return time_fn(fn, iters=iters, warmup=warmup, device=dev.type)

    rows = []
    for name, c in CASES.items():
        args = (c['voxel_size'], c['pcr'], c['max_points'], c['max_voxels'])
        voxels = int(mmcv_voxelization(clouds[0], *args, True)[0].shape[0])
        case_note = f'{note}, {voxels} voxels'
        turbox = timed(lambda: voxelization(clouds[0], *args))
        modes = (('det.', True), ('non-det.', False))
        if dev.type != 'cuda':
            modes = modes[:1]  # mmcv has no non-deterministic CPU op
        for label, deterministic in modes:
            stock = timed(lambda: mmcv_voxelization(clouds[0], *args, deterministic))
            rows.append(dict(component='voxelize', case=f'{name} hard {label}', stock=stock,
                             turbox=turbox, note=case_note))
        rows.append(dict(
            component='voxelize', case=f'{name} dynamic',
            stock=timed(lambda: mmcv_voxelization(clouds[0], c['voxel_size'], c['pcr'], -1, -1)),
            turbox=timed(lambda: voxelization(clouds[0], c['voxel_size'], c['pcr'], -1, -1)),
            note=note))
        sizes = [int(p.shape[0]) for p in clouds]

        def per_sample():
            for cloud in clouds:
                mmcv_voxelization(cloud, *args, True)

        def batched():
            hard_voxelize(torch.cat(clouds), *args, sample_sizes=sizes)

        rows.append(dict(component='voxelize', case=f'{name} hard det., batch of 4',
                         stock=timed(per_sample), turbox=timed(batched),
                         note=f'{note} x 4; turbox: concatenation + one call'))
    return rows
