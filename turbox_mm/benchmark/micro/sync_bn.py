"""Micro benchmark: torch's SyncBatchNorm against :class:`TurboxSyncBatchNorm`, forward + backward.

``torch.nn.SyncBatchNorm`` skips synchronisation when the group has a single rank, so on one
GPU its module times plain BatchNorm. To time the synchronised path on one device this
benchmark calls torch's sync autograd function (``torch.nn.modules._functions.SyncBatchNorm``,
what the module runs at world size > 1: ``batch_norm_stats``, an all_gather of
(mean, invstd, count), a host-synchronising mask over empty ranks,
``batch_norm_gather_stats_with_counts``, and in backward one all_reduce) and
``TurboxSyncBatchNorm(force_sync=True)`` (one packed all_reduce each way, no host sync), both in
a single-rank process group that is created here when none exists (gloo on the CPU, NCCL on
CUDA) and destroyed afterwards. The collectives therefore move no data between devices; what is
timed is the kernels, the collective calls and the host syncs of each implementation. A second
row per shape sets the collective path against local BatchNorm (``nn.BatchNorm2d``, which is what
``torch.nn.SyncBatchNorm`` runs at world size 1), i.e. what synchronising costs on one device.

Shapes are ResNet-50/FPN-like feature maps: batch 6, 256 channels at 64x176 and 64 channels at
128x352; float32, and on CUDA also float16 inputs with float32 parameters (as under AMP).
torch's sync function has no CPU kernels, so on the CPU its column reads n/a.
"""
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from turbox_mm.benchmark.timing import benchmark_device, time_fn
from turbox_mm.models.layers.sync_batchnorm import TurboxSyncBatchNorm

SHAPES = ((6, 256, 64, 176), (6, 64, 128, 352))
QUICK_SHAPES = ((2, 8, 6, 10), )
MOMENTUM = 0.1
EPS = 1e-5


def _ensure_group(device: torch.device) -> bool:
    """Initialise a single-rank default group if there is none; True if one was created."""
    if dist.is_initialized():
        return False
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    if device.type == 'cuda':
        torch.cuda.set_device(device.index if device.index is not None else
                              torch.cuda.current_device())
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def _fwd_bwd(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
             grad: torch.Tensor) -> Callable[[], None]:

    def step():
        forward(x).backward(grad)

    return step


def _time(step: Callable[[], None], params: List[torch.Tensor], device: torch.device,
          iters: int, warmup: int) -> Optional[Dict[str, float]]:

    def zero_grads():
        for p in params:
            p.grad = None

    return time_fn(step, iters=iters, warmup=warmup, device=device.type, setup=zero_grads)


def _case_rows(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device, iters: int,
               warmup: int) -> List[Dict]:
    from torch.nn.modules._functions import SyncBatchNorm as TorchSyncBatchNormFunction

    group = dist.group.WORLD
    world = dist.get_world_size(group)
    channels = shape[1]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    grad = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    ours = TurboxSyncBatchNorm(channels, EPS, MOMENTUM, force_sync=True).to(device)
    local = nn.BatchNorm2d(channels, EPS, MOMENTUM).to(device)
    theirs = nn.BatchNorm2d(channels, EPS, MOMENTUM).to(device)  # holds params and buffers

    def torch_sync(inp):
        return TorchSyncBatchNormFunction.apply(inp, theirs.weight, theirs.bias,
                                                theirs.running_mean, theirs.running_var, EPS,
                                                MOMENTUM, group, world)

    turbox = _time(_fwd_bwd(ours, x, grad), [x, *ours.parameters()], device, iters, warmup)
    note_stock = ''
    try:
        stock = _time(_fwd_bwd(torch_sync, x, grad), [x, *theirs.parameters()], device, iters,
                      warmup)
    except (RuntimeError, NotImplementedError):
        stock = None
        note_stock = f'; torch\'s sync function has no {device.type} kernels'
    baseline = _time(_fwd_bwd(local, x, grad), [x, *local.parameters()], device, iters, warmup)

    dtype_name = str(dtype).replace('torch.', '')
    params = 'float32 params' if dtype != torch.float32 else ''
    case = ' '.join(filter(None, ['x'.join(map(str, shape)), dtype_name, params, 'fwd+bwd']))
    backend = dist.get_backend(group)
    return [
        dict(component='SyncBatchNorm', case=case, stock=stock, turbox=turbox,
             note=(f'sync path, world size {world} ({backend}): torch sync function '
                   f'(all_gather + host sync) vs TurboxSyncBatchNorm(force_sync=True) '
                   f'(one all_reduce each way){note_stock}')),
        dict(component='SyncBatchNorm vs local BN', case=case, stock=baseline, turbox=turbox,
             note='stock = nn.BatchNorm2d, what torch.nn.SyncBatchNorm runs at world size 1: '
             'the cost of synchronising'),
    ]


def benchmark(device: str, quick: bool = False) -> List[Dict]:
    """Time forward + backward of torch's and turbox's SyncBatchNorm (see the module docstring).

    Args:
        device (str): ``'cuda'`` (or ``'cuda:N'``) or ``'cpu'``.
        quick (bool): One tiny shape and a few iterations, for tests. Defaults to False.

    Returns:
        list[dict]: Two rows per shape and dtype, as described in
        :mod:`turbox_mm.benchmark.micro`.

    Examples:
        >>> rows = benchmark('cpu', quick=True)  # doctest: +SKIP
        >>> rows[0]['component']  # doctest: +SKIP
        'SyncBatchNorm'
    """
    dev = benchmark_device('sync_bn', device)
    shapes = QUICK_SHAPES if quick else SHAPES
    iters, warmup = (3, 1) if quick else (50, 10)
    dtypes = [torch.float32]
    if dev.type == 'cuda':
        dtypes.append(torch.float16)
    created = _ensure_group(dev)
    try:
        rows = []
        for shape in shapes:
            for dtype in dtypes:
                rows.extend(_case_rows(shape, dtype, dev, iters, warmup))
        return rows
    finally:
        if created:
            dist.destroy_process_group()
