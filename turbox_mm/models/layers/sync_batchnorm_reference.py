"""The plain-PyTorch reference of :class:`~.sync_batchnorm.TurboxSyncBatchNorm`'s maths.

What each rank computes around the two collectives, in readable PyTorch: the local moments
and the packed forward message (:func:`local_moments`, :func:`pack_moments`), the global
statistics from the all-reduced sums (:func:`moments_from_packed`), ``nn.BatchNorm``'s running
update (:func:`running_factor`, :func:`update_running_stats`), the normalisation
(:func:`normalize`) and the backward (``_backward_reference``). It runs off CUDA, with
``TURBOX_SYNCBN_REFERENCE=1``, and after a failed Triton launch, and it is the spec that the
ATen and Triton path (:mod:`.sync_batchnorm_function`, :mod:`.sync_batchnorm_triton`) is tested
against. The formulas and the precision argument are in :mod:`.sync_batchnorm`'s docstring.
"""
from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

#: Set to ``1`` to run the plain-PyTorch reference instead of the ATen and Triton kernels.
REFERENCE_ENV = 'TURBOX_SYNCBN_REFERENCE'


def _reduce_dims(x: Tensor) -> list:
    return [0] + list(range(2, x.dim()))


def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    """View a (C,) tensor so that it broadcasts against ``x`` of shape (N, C, *)."""
    return t.view([1, -1] + [1] * (x.dim() - 2))


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def local_moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of a non-empty ``x`` (N, C, *), in float32.

    A stable one-rank reduction (``torch.var_mean``); float64 inputs stay in float64.

    Args:
        x (Tensor): float16, bfloat16, float32 or float64.

    Returns:
        tuple[Tensor, Tensor]: ``mean`` and ``var`` of shape (C,).
    """
    xf = x.to(_acc_dtype(x))
    var, mean = torch.var_mean(xf, dim=_reduce_dims(x), correction=0)
    return mean, var


def pack_moments(mean: Tensor, var: Tensor, count: int) -> Tensor:
    """The forward message of one rank: ``[n*mean, n*(var + mean**2), n]`` in float64.

    Args:
        mean (Tensor): Local mean (C,).
        var (Tensor): Local biased variance (C,).
        count (int): Local samples per channel, ``n``.

    Returns:
        Tensor: Shape (2C + 1,), float64.
    """
    mean = mean.double()
    packed = torch.cat([mean, torch.addcmul(var.double(), mean, mean), mean.new_ones(1)])
    return packed.mul_(count)


def moments_from_packed(packed: Tensor, eps: float,
                        dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Global statistics from the all-reduced message of :func:`pack_moments`.

    Args:
        packed (Tensor): (2C + 1,) float64 sums over ranks.
        eps (float): Added to the variance before the inverse square root.
        dtype (torch.dtype): dtype of the returned ``mean`` and ``invstd``.

    Returns:
        tuple: ``mean`` (C,), ``invstd`` (C,) in ``dtype``; ``var`` (C,) biased, float64;
        ``count`` (1,) float64, the number of samples per channel over all ranks.
    """
    channels = (packed.numel() - 1) // 2
    count = packed[2 * channels:]
    moments = packed[:2 * channels].view(2, channels) / count.clamp(min=1)
    mean, var = moments[0], torch.addcmul(moments[1], moments[0], moments[0], value=-1)
    var = var.clamp_(min=0)
    invstd = (var + eps).rsqrt_()
    return mean.to(dtype), invstd.to(dtype), var, count


def running_factor(momentum: Optional[float],
                   num_batches_tracked: Optional[Tensor]) -> Union[float, Tensor]:
    """``momentum``, or for ``momentum=None`` the cumulative ``1 / num_batches_tracked``.

    The cumulative factor stays a device tensor (``nn.BatchNorm`` reads it on the host).
    """
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        return 0.0
    return torch.reciprocal(num_batches_tracked.to(torch.float64))


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                         count: Tensor, factor: Union[float, Tensor]) -> None:
    """``nn.BatchNorm``'s update, in place, on the device, skipped when ``count == 0``.

    ``running = (1 - factor) * running + factor * stat``, with the unbiased variance
    ``var * count / (count - 1)``.

    Args:
        running_mean (Tensor): Buffer (C,), updated in place.
        running_var (Tensor): Buffer (C,), updated in place.
        mean (Tensor): Batch mean (C,).
        var (Tensor): Biased batch variance (C,), float64.
        count (Tensor): (1,) samples per channel over all ranks.
        factor (float | Tensor): See :func:`running_factor`.
    """
    acc = torch.float64 if running_mean.dtype == torch.float64 else torch.float32
    if isinstance(factor, Tensor):
        factor = factor.to(acc)
    unbiased = (var * (count / (count - 1).clamp(min=1))).to(acc)
    seen = count > 0
    for buf, stat in ((running_mean, mean.to(acc)), (running_var, unbiased)):
        old = buf.to(acc)
        new = old * (1 - factor) + stat * factor
        buf.copy_(torch.where(seen, new, old))


def normalize(x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
              bias: Optional[Tensor]) -> Tensor:
    """``(x - mean) * invstd * weight + bias`` in float32, returned in ``x``'s dtype."""
    scale = invstd if weight is None else invstd * weight
    out = (x.to(mean.dtype) - _per_channel(mean, x)) * _per_channel(scale, x)
    if bias is not None:
        out = out + _per_channel(bias, x)
    return out.to(x.dtype)


def _grad_input(grad_out: Tensor, xmu: Tensor, weight: Optional[Tensor], invstd: Tensor,
                mean_dy: Tensor, mean_dy_xmu: Tensor) -> Tensor:
    """``(dy - mean(dy) - xmu * invstd**2 * mean(dy * xmu)) * invstd * weight``."""
    scale = invstd if weight is None else invstd * weight
    proj = invstd * invstd * mean_dy_xmu
    return (grad_out - _per_channel(mean_dy, xmu) - xmu * _per_channel(proj, xmu)) * \
        _per_channel(scale, xmu)


def _backward_reference(grad_out, x, weight, mean, invstd, total, group, need_x, need_w,
                        need_b):
    acc = mean.dtype
    dy = grad_out.to(acc)
    xmu = x.to(acc) - _per_channel(mean, x)
    dims = _reduce_dims(x)
    sum_dy = dy.sum(dims)
    sum_dy_xmu = (dy * xmu).sum(dims)
    # Parameter gradients stay local: DDP averages them over ranks like any other.
    grad_w = sum_dy_xmu * invstd if need_w else None
    grad_b = sum_dy if need_b else None
    grad_x = None
    if need_x:
        packed = torch.cat([sum_dy, sum_dy_xmu])
        if group is not None:
            dist.all_reduce(packed, dist.ReduceOp.SUM, group=group)
        packed = packed / total.clamp(min=1).to(acc)
        mean_dy, mean_dy_xmu = packed.chunk(2)
        grad_x = _grad_input(dy, xmu, weight, invstd, mean_dy, mean_dy_xmu).to(x.dtype)
    return grad_x, grad_w, grad_b
