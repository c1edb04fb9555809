"""Micro benchmark: the sparse convolution encoder of CenterPoint / BEVFusion's lidar branch.

mmdet3d 1.4 runs its sparse convolution layers on spconv 2 where spconv imports (its
``register_spconv2`` replaces mmcv's layers in the registry), on mmcv's ops otherwise. This
times mmdet3d's ``SparseEncoder`` at the settings of ``centerpoint_voxel0075_second_secfpn``
(sparse shape 41 x 1440 x 1440, 5 input channels, basic blocks, output 128 x 2 channels),
forward + backward, for a batch of 4 ten-sweep nuScenes samples voxelized as that config does
(hard voxelization, 10 points a voxel, the mean of each voxel's points as
``HardSimpleVFE``). Rows:

- float32 (stock: spconv's TF32 flag off, cuDNN/matmul TF32 off) against TF32 (turbox's
  ``precision.tf32``, which also sets spconv's ``SPCONV_ALLOW_TF32``);
- float32 against float16 autocast (what an ``AmpOptimWrapper`` config runs).

Sparse convolution has no CPU op (neither mmcv's nor spconv's): on the CPU the rows are
empty, with a note.
"""
from typing import Dict, List

import torch

from turbox_mm.benchmark.micro.voxelize import POINTS, QUICK_POINTS, sweep_cloud
from turbox_mm.benchmark.timing import benchmark_device, time_fn
from turbox_mm.engine.runner.precision import apply_precision
from turbox_mm.ops.voxelize import hard_voxelize

SAMPLES = 4
VOXEL, RANGE = [0.075, 0.075, 0.2], [-54, -54, -5, 54, 54, 3]
ENCODER = dict(type='SparseEncoder', in_channels=5, sparse_shape=[41, 1440, 1440],
               output_channels=128, order=('conv', 'norm', 'act'),
               encoder_channels=((16, 16, 32), (32, 32, 64), (64, 64, 128), (128, 128)),
               encoder_paddings=((0, 0, 1), (0, 0, 1), (0, 0, [0, 1, 1]), (0, 0)),
               block_type='basicblock')


def _backend(encoder) -> str:
    module = type(encoder.conv_input[0]).__module__
    return 'spconv 2' if module.startswith('spconv') else f'mmcv ({module})'


def benchmark(device: str, quick: bool = False) -> List[Dict]:
    """Time the encoder in float32, TF32 and float16 autocast.

    Args:
        device (str): ``'cuda'`` (or ``'cuda:N'``) or ``'cpu'``.
        quick (bool): 2k points per sample and a few iterations, for tests. Defaults to False.

    Returns:
        list[dict]: Rows as described in :mod:`turbox_mm.benchmark.micro`.
    """
    cases = ['float32 vs TF32 (precision.tf32)', 'float32 vs float16 autocast']
    dev = benchmark_device('spconv_precision', device)
    if dev.type != 'cuda':
        return [dict(component='spconv_precision', case=case, stock=None, turbox=None,
                     note='sparse convolution has no CPU op (mmcv, spconv): needs CUDA')
                for case in cases]
    import mmdet3d.models  # noqa: F401  (registers the encoder, on spconv 2 where it imports)
    from mmdet3d.registry import MODELS
    num = QUICK_POINTS if quick else POINTS
    iters, warmup = (3, 1) if quick else (20, 5)
    feats, coors = [], []
    for sample in range(SAMPLES):
        voxels, coor, count = hard_voxelize(sweep_cloud(num, sample).to(dev), VOXEL, RANGE, 10,
                                            120000)
        feats.append(voxels.sum(1) / count[:, None].clamp(min=1))
        coor[:, 0] = sample
        coors.append(coor)
    feats, coors = torch.cat(feats), torch.cat(coors)
    torch.manual_seed(0)
    encoder = MODELS.build(ENCODER).to(dev).train()
    note = f'{SAMPLES} x {num} points, {feats.shape[0]} voxels, {_backend(encoder)}'

    def step(autocast: bool):
        encoder.zero_grad(set_to_none=True)
        with torch.autocast('cuda', dtype=torch.float16, enabled=autocast):
            out = encoder(feats, coors, SAMPLES)
        out.float().mean().backward()

    def timed(tf32: bool, autocast: bool = False):
        apply_precision(dict(allow_tf32=tf32))
        return time_fn(lambda: step(autocast), iters=iters, warmup=warmup, device='cuda')

    before = torch.get_float32_matmul_precision()
    try:
        fp32 = timed(False)
        rows = [dict(component='spconv_precision', case=cases[0], stock=fp32, turbox=timed(True),
                     note=note + '; forward + backward'),
                dict(component='spconv_precision', case=cases[1], stock=fp32,
                     turbox=timed(False, autocast=True), note=note + '; forward + backward')]
    finally:
        apply_precision(dict(allow_tf32=before != 'highest'))
    return rows
