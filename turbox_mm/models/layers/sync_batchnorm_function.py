"""The autograd function of the synchronised batch norm and its functional form.

:func:`sync_batch_norm` (training-mode batch norm over the samples of every rank) and
``_SyncBatchNormFunction``: one packed ``all_reduce`` forward, one backward. On CUDA the
per-element work runs in the same ATen kernels as ``torch.nn.SyncBatchNorm``
(``batch_norm_stats``, ``batch_norm_elemt``, ``batch_norm_backward_reduce``,
``batch_norm_backward_elemt``) and the per-channel bookkeeping in the Triton kernels of
:mod:`.sync_batchnorm_triton`; elsewhere, or with ``TURBOX_SYNCBN_REFERENCE=1``, the
plain-PyTorch reference of :mod:`.sync_batchnorm_reference` runs.
"""
import os
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import Function, once_differentiable

from .sync_batchnorm_reference import (REFERENCE_ENV, _acc_dtype, _backward_reference,
                                       local_moments, normalize, pack_moments)
from .sync_batchnorm_triton import finalize_stats, pack_from_invstd


def _use_native(x: Tensor) -> bool:
    """ATen's CUDA batch-norm kernels, unless ``TURBOX_SYNCBN_REFERENCE=1``."""
    return x.is_cuda and os.environ.get(REFERENCE_ENV, '0') != '1'


def _dense(t: Tensor) -> Tensor:
    """``t`` itself if it is dense in a memory format the ATen kernels take, else a copy."""
    if t.is_contiguous():
        return t
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return t
    return t.contiguous()


def _like_memory_format(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` in the memory format of ``ref`` (the ATen kernels want both alike)."""
    if ref.dim() == 4 and ref.is_contiguous(memory_format=torch.channels_last) \
            and not ref.is_contiguous():
        return t.contiguous(memory_format=torch.channels_last)
    if ref.dim() == 5 and ref.is_contiguous(memory_format=torch.channels_last_3d) \
            and not ref.is_contiguous():
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t.contiguous()


class _SyncBatchNormFunction(Function):
    """Autograd of the synchronised batch norm; ``process_group=None`` means no collective."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor],
                momentum: Optional[float], num_batches_tracked: Optional[Tensor], eps: float,
                process_group: Any) -> Tensor:
        native = _use_native(x)
        with torch.autocast(x.device.type, enabled=False):
            if native:
                x = _dense(x)
            acc = _acc_dtype(x)
            weight_acc = None if weight is None else weight.to(acc)
            bias_acc = None if bias is None else bias.to(acc)
            channels = x.size(1)
            count = x.numel() // channels
            if count == 0:
                packed = torch.zeros(2 * channels + 1, dtype=torch.float64, device=x.device)
            elif native:
                packed = pack_from_invstd(*torch.batch_norm_stats(x, 0.0), count)
            else:
                packed = pack_moments(*local_moments(x), count)
            if process_group is not None:
                dist.all_reduce(packed, dist.ReduceOp.SUM, group=process_group)
            mean, invstd, total = finalize_stats(packed, eps, acc, running_mean, running_var,
                                                 momentum, num_batches_tracked)
            if count == 0:
                out = torch.empty_like(x)
            elif native:
                out = torch.batch_norm_elemt(x, weight_acc, bias_acc, mean, invstd, eps)
            else:
                out = normalize(x, mean, invstd, weight_acc, bias_acc)
        ctx.save_for_backward(x, weight_acc, mean, invstd, total)
        ctx.process_group = process_group
        ctx.native = native
        ctx.weight_dtype = None if weight is None else weight.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, weight, mean, invstd, total = ctx.saved_tensors
        args = (grad_out, x, weight, mean, invstd, total, ctx.process_group,
                *ctx.needs_input_grad[:3])
        with torch.autocast(x.device.type, enabled=False):
            if ctx.native:
                grad_x, grad_w, grad_b = _backward_native(*args)
            else:
                grad_x, grad_w, grad_b = _backward_reference(*args)
        if grad_w is not None:
            grad_w = grad_w.to(ctx.weight_dtype)
        if grad_b is not None:
            grad_b = grad_b.to(ctx.weight_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def _backward_native(grad_out, x, weight, mean, invstd, total, group, need_x, need_w, need_b):
    channels = x.size(1)
    if x.numel() == 0:
        # Still join the collective so that the ranks with samples are not left waiting.
        if need_x and group is not None:
            dist.all_reduce(torch.zeros(2 * channels, dtype=mean.dtype, device=x.device),
                            dist.ReduceOp.SUM, group=group)
        zeros = torch.zeros(channels, dtype=mean.dtype, device=x.device)
        return (torch.zeros_like(x) if need_x else None, zeros if need_w else None,
                zeros if need_b else None)
    grad_out = _like_memory_format(grad_out, x)
    sum_dy, sum_dy_xmu, grad_w, grad_b = torch.batch_norm_backward_reduce(
        grad_out, x, mean, invstd, weight, need_x, need_w, need_b)
    grad_x = None
    if need_x:
        packed = torch.cat([sum_dy, sum_dy_xmu])
        if group is not None:
            dist.all_reduce(packed, dist.ReduceOp.SUM, group=group)
        sum_dy, sum_dy_xmu = packed.chunk(2)
        # The kernel divides by the sum of this int32 tensor: the global count.
        grad_x = torch.batch_norm_backward_elemt(grad_out, x, mean, invstd, weight, sum_dy,
                                                 sum_dy_xmu, total.to(torch.int32))
    return grad_x, grad_w if need_w else None, grad_b if need_b else None


def sync_batch_norm(x: Tensor,
                    weight: Optional[Tensor],
                    bias: Optional[Tensor],
                    running_mean: Optional[Tensor],
                    running_var: Optional[Tensor],
                    momentum: Optional[float],
                    eps: float,
                    process_group: Any = None,
                    num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """Batch norm in training mode over the samples of every rank of ``process_group``.

    Args:
        x (Tensor): Input (N, C, *); N may be 0 on some ranks.
        weight (Tensor, optional): Scale (C,).
        bias (Tensor, optional): Shift (C,).
        running_mean (Tensor, optional): Updated in place unless None.
        running_var (Tensor, optional): Updated in place unless None.
        momentum (float, optional): Momentum of the running update; None for the cumulative
            average ``1 / num_batches_tracked`` (read on the device).
        eps (float): Added to the variance.
        process_group (ProcessGroup, optional): The ranks to synchronise over; ``None``
            normalises with this rank's statistics alone and calls no collective.
        num_batches_tracked (Tensor, optional): For ``momentum=None``: the batch count,
            already incremented for this batch, as ``nn.BatchNorm`` does.

    Returns:
        Tensor: The normalised ``x``, in its dtype.

    Examples:
        >>> import torch
        >>> x = torch.randn(4, 3, 5, 5)
        >>> y = sync_batch_norm(x, None, None, None, None, 0.1, 1e-5)
        >>> torch.allclose(y, torch.nn.functional.batch_norm(x, None, None, training=True),
        ...                atol=1e-5)
        True
    """
    return _SyncBatchNormFunction.apply(x, weight, bias, running_mean, running_var, momentum,
                                        num_batches_tracked, eps, process_group)
