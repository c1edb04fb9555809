"""Micro benchmark: BEV pooling at BEVFusion's size, the PyTorch path against turbox_mm's op.

Stock is what a BEVFusion without upstream's compiled CUDA op runs: the depth softmax, the
``[B, N, D, H, W, C]`` depth x feature product, the cell index of every point and a sum into
the BEV (:func:`turbox_mm.ops.bev_pool.bev_pool_reference`, with autograd for the backward).
Upstream's own CUDA ``bev_pool`` does not build with this stack (issue 15 reports it at 12.7
ms forward including its rank sort, 14.4 ms forward + backward, on an H100). Turbox is
:func:`turbox_mm.ops.bev_pool.bev_pool` with the softmax fused (``depth_logits=True``).

Sizes: BEVFusion's lidar-camera config: batch 4, 6 cameras, 118 depth bins (1-60 m by 0.5 m),
32 x 88 feature pixels, C = 80, into 360 x 360 x 1 cells of 0.3 m (7.98M points). The points
lie along camera rays fanned around the car: level cameras (the rows of an image column at
one depth share a cell) and, in a third row, images rolled by the largest angle of
BEVFusion's rotation augmentation (about 2.6 cells per column and bin). On the CPU (quick)
the sizes shrink and the op runs its reference, so the CPU rows only check that the
benchmark runs.
"""
from typing import Dict, List, Sequence

import torch

from turbox_mm.benchmark.timing import benchmark_device, time_fn
from turbox_mm.ops.bev_pool import bev_pool, bev_pool_reference

#: BEVFusion's largest image rotation in training (``ImageAug3D``'s ``rot_lim``, degrees).
ROLL_DEG = 5.4
#: The grid of BEVFusion's view transform: lower bound, cell size, cells (x, y, z).
BEV_GRID = ([-54.0, -54.0, -10.0], [0.3, 0.3, 20.0], [360, 360, 1])


def camera_rays(b: int = 4, n: int = 6, d: int = 118, h: int = 32, w: int = 88, c: int = 80,
                seed: int = 0, device='cpu', roll_deg: float = 0.0) -> List[torch.Tensor]:
    """Depth logits ``[b, n, d, h, w]``, features ``[b, n, c, h, w]`` and the points ``[b, n,
    d, h, w, 3]`` of ``n`` cameras 60 degrees apart with a 70-degree view, bins 1-60 m.

    With ``roll_deg`` every image is turned by that angle about its optical axis (as
    BEVFusion's image-rotation augmentation turns it): the rows of an image column then
    spread sideways, over several cells at far depths, instead of sharing one.
    """
    gen = torch.Generator().manual_seed(seed)
    depth = torch.randn(b, n, d, h, w, generator=gen)
    feats = torch.randn(b, n, c, h, w, generator=gen)
    dist = torch.linspace(1, 60, d).view(1, 1, d, 1, 1)
    across = torch.deg2rad(torch.linspace(-35, 35, w)).view(1, 1, 1, 1, w)
    up = torch.linspace(-0.1, 0.05, h).view(1, 1, 1, h, 1)
    roll = torch.deg2rad(torch.tensor(float(roll_deg)))
    yaw = torch.deg2rad(torch.arange(n).view(1, n, 1, 1, 1) * 60.0) + \
        (across * roll.cos() - up * roll.sin())
    pitch = across * roll.sin() + up * roll.cos()
    geom = torch.stack(torch.broadcast_tensors(dist * yaw.cos(), dist * yaw.sin(),
                                               dist * pitch), -1).expand(b, n, d, h, w, 3)
    return [t.contiguous().to(device) for t in (depth, feats, geom)]


def _stock(depth, feats, geom, grid: Sequence):
    return bev_pool_reference(depth, feats, geom, *grid, depth_logits=True)


def benchmark(device: str, quick: bool = False) -> List[Dict]:
    """Time BEV pooling forward and forward + backward.

    Args:
        device (str): ``'cuda'`` (or ``'cuda:N'``) or ``'cpu'``.
        quick (bool): Tiny sizes and a few iterations, for tests. Defaults to False.

    Returns:
        list[dict]: Rows as described in :mod:`turbox_mm.benchmark.micro`.
    """
    dev = benchmark_device('bev_pool', device)
    iters, warmup = (3, 1) if quick else (20, 5)
    sizes = dict(b=1, n=2, d=6, h=4, w=8, c=8) if quick else {}
    depth, feats, geom = camera_rays(**sizes, device=dev)
    grid = ([-54.0, -54.0, -10.0], [3.0, 3.0, 20.0], [36, 36, 1]) if quick else BEV_GRID
    points = depth.numel()
    note = f'{points / 1e6:.2f}M points, C={feats.shape[2]}, {grid[2][0]}x{grid[2][1]} cells'
    if dev.type != 'cuda':
        note += '; on the CPU the op runs its reference'
    d_leaf = depth.clone().requires_grad_(True)
    f_leaf = feats.clone().requires_grad_(True)

    def timed(fn):
        return time_fn(fn, iters=iters, warmup=warmup, device=dev.type)

    def both(pool):
        def step():
            d_leaf.grad = f_leaf.grad = None
            pool(d_leaf, f_leaf).sum().backward()
        return step

    def pools(geom):
        """The turbox and stock poolings of ``(depth, feats)`` at the points ``geom``."""
        return (lambda d, f: bev_pool(d, f, geom, *grid, depth_logits=True),
                lambda d, f: _stock(d, f, geom, grid))

    def difference(turbox_pool, stock_pool) -> float:
        """The largest forward difference of the two poolings (stock's storage permuted)."""
        with torch.no_grad():
            return (turbox_pool(depth, feats).float() -
                    stock_pool(depth, feats).permute(0, 3, 1, 2).float()).abs().max().item()

    turbox_pool, stock_pool = pools(geom)
    diff = difference(turbox_pool, stock_pool)
    with torch.no_grad():
        forward = [dict(component='bev_pool', case='forward (softmax + pool)',
                        stock=timed(lambda: stock_pool(depth, feats)),
                        turbox=timed(lambda: turbox_pool(depth, feats)),
                        note=f'{note}; max |difference| {diff:.1e}')]
    rows = forward + [dict(component='bev_pool', case='forward + backward',
                           stock=timed(both(stock_pool)), turbox=timed(both(turbox_pool)),
                           note=note)]
    # the images turned as the rotation augmentation turns them: several cells per column
    turbox_pool, stock_pool = pools(camera_rays(**sizes, device=dev, roll_deg=ROLL_DEG)[2])
    diff = difference(turbox_pool, stock_pool)
    return rows + [dict(component='bev_pool',
                        case=f'forward + backward, images rolled {ROLL_DEG} degrees',
                        stock=timed(both(stock_pool)), turbox=timed(both(turbox_pool)),
                        note=f'{note}; forward max |difference| {diff:.1e}')]
