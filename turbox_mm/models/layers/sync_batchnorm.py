"""A SyncBatchNorm that never waits on the host: one packed all_reduce each way.

``torch.nn.SyncBatchNorm`` all-gathers every rank's (mean, invstd, count), then drops the ranks
with no samples by boolean-mask indexing, which makes the host wait for the GPU in every
forward of every BN layer (and reads ``num_batches_tracked`` with ``.item()`` when
``momentum=None``). :class:`TurboxSyncBatchNorm` instead all-reduces sums, so a rank with no
samples simply contributes zeros, and nothing in its forward or backward reads a device value
on the host: the host only enqueues work and the collectives. It also runs on the CPU with the
gloo backend.

How the statistics are exchanged (forward, per channel ``c``; ``n_r`` samples per channel on
rank ``r``, local mean ``m_r`` and local biased variance ``v_r``)::

    packed = [n_r * m_r,  n_r * (v_r + m_r ** 2),  n_r]      # 2C + 1 float64 values
    all_reduce(packed, SUM)                                  # the only collective
    n = sum n_r;  mean = S1 / n;  var = S2 / n - mean ** 2

``m_r`` and ``v_r`` come from a numerically stable single-rank reduction in float32 (Welford in
``torch.batch_norm_stats`` on CUDA, ``torch.var_mean`` elsewhere), never from a float32 sum of
squares. Only the combination of ranks uses raw moments, and it does so in float64: the
cancellation in ``S2 / n - mean ** 2`` costs about ``1e-16 * mean ** 2 / var`` relative error,
negligible next to the float32 rounding of the inputs themselves as long as ``|mean| / std``
stays below ~1e6 (beyond that float32 inputs cannot resolve the spread anyway). Backward
exchanges ``[sum(dy), sum(dy * (x - mean))]`` (2C values) in one all_reduce, as torch does.

Precision (what ``tests/test_sync_batchnorm.py`` checks against ``nn.BatchNorm`` run on the
concatenation of all ranks' inputs, two gloo ranks on the CPU): float32 outputs, input and
parameter gradients and running statistics agree to ``torch.testing.assert_close``'s float32
defaults (rtol 1.3e-6, atol 1e-5), float64 ones to rtol 1e-10; bfloat16 outputs and input
gradients are at most twice as far from the float32 result as PyTorch's own bfloat16
BatchNorm is (plus 1e-3 absolute slack), with statistics and parameter gradients always
accumulated in float32. On CUDA the tests allow rtol = atol = 1e-4 (2e-2 for 16-bit outputs)
against ``torch.nn.SyncBatchNorm``'s sync function and cuDNN BatchNorm.

On CUDA the per-element work uses the same ATen kernels as ``torch.nn.SyncBatchNorm``
(``batch_norm_stats``, ``batch_norm_elemt``, ``batch_norm_backward_reduce``,
``batch_norm_backward_elemt``) and the per-channel bookkeeping (packing the message; mean,
invstd and the running update from the sums) two small Triton kernels, so that one layer
launches five kernels forward and four backward, plus the two collectives. Where a Triton
launch fails, PyTorch ops take over after one warning. Elsewhere, or with
``TURBOX_SYNCBN_REFERENCE=1``, a readable plain-PyTorch reference computes the same quantities.
"""
import inspect
import os
import warnings
from typing import Any, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import Function, once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from turbox_mm.registry import MODELS

__all__ = ['TurboxSyncBatchNorm', 'convert_sync_batchnorm']

#: Set to ``1`` to run the plain-PyTorch reference instead of the ATen and Triton kernels.
REFERENCE_ENV = 'TURBOX_SYNCBN_REFERENCE'

# torch >= 2.12 lets BatchNorm drop only the bias (``bias=False``); older torch has no argument.
_BN_TAKES_BIAS = 'bias' in inspect.signature(_BatchNorm.__init__).parameters


def _reduce_dims(x: Tensor) -> list:
    return [0] + list(range(2, x.dim()))


def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    """View a (C,) tensor so that it broadcasts against ``x`` of shape (N, C, *)."""
    return t.view([1, -1] + [1] * (x.dim() - 2))


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


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


# ---------------------------------------------------------------------------------------------
# The per-channel bookkeeping of the CUDA path as two small Triton kernels, so that a layer's
# forward launches five kernels (and backward four) instead of some thirty tiny PyTorch ops.

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

if triton is not None:

    @triton.jit(do_not_specialize=['count'])
    def _pack_kernel(mean_ptr, invstd_ptr, out_ptr, channels, count, BLOCK: tl.constexpr):
        """``out = [n*m, n*(v + m*m), n]`` in float64, ``v = 1 / invstd**2`` (0 where invstd is
        0, as ``batch_norm_stats`` returns for a zero variance with eps = 0)."""
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < channels
        m = tl.load(mean_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        inv = tl.load(invstd_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        var = tl.where(inv > 0, 1.0 / (inv * inv), 0.0)
        n = count.to(tl.float64)
        tl.store(out_ptr + offs, n * m, mask=mask)
        tl.store(out_ptr + channels + offs, n * (var + m * m), mask=mask)
        if pid == 0:
            tl.store(out_ptr + 2 * channels, n)

    @triton.jit
    def _finalize_kernel(packed_ptr, mean_ptr, invstd_ptr, rmean_ptr, rvar_ptr, nbt_ptr,
                         momentum, eps, channels, UPDATE: tl.constexpr,
                         CUMULATIVE: tl.constexpr, BLOCK: tl.constexpr):
        """Global mean, invstd and the running update of :func:`moments_from_packed` and
        :func:`update_running_stats` in one pass; ``CUMULATIVE`` reads
        ``num_batches_tracked`` for ``momentum=None``."""
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < channels
        n = tl.load(packed_ptr + 2 * channels)
        n_safe = tl.maximum(n, 1.0)
        m = tl.load(packed_ptr + offs, mask=mask, other=0.0) / n_safe
        ex2 = tl.load(packed_ptr + channels + offs, mask=mask, other=0.0) / n_safe
        var = tl.maximum(ex2 - m * m, 0.0)
        invstd = 1.0 / tl.sqrt(var + eps)
        tl.store(mean_ptr + offs, m.to(mean_ptr.dtype.element_ty), mask=mask)
        tl.store(invstd_ptr + offs, invstd.to(invstd_ptr.dtype.element_ty), mask=mask)
        if UPDATE:
            if CUMULATIVE:
                f = 1.0 / tl.load(nbt_ptr).to(tl.float64)
            else:
                f = momentum
            f = tl.where(n > 0, f, 0.0)
            unbiased = var * (n / tl.maximum(n - 1.0, 1.0))
            rm = tl.load(rmean_ptr + offs, mask=mask, other=0.0).to(tl.float64)
            rv = tl.load(rvar_ptr + offs, mask=mask, other=0.0).to(tl.float64)
            # Through float32: Triton's interpreter mis-converts float64 to bfloat16.
            rm = (rm * (1.0 - f) + m * f).to(tl.float32)
            rv = (rv * (1.0 - f) + unbiased * f).to(tl.float32)
            tl.store(rmean_ptr + offs, rm.to(rmean_ptr.dtype.element_ty), mask=mask)
            tl.store(rvar_ptr + offs, rv.to(rvar_ptr.dtype.element_ty), mask=mask)


# Tests set this (with TRITON_INTERPRET=1) to run the kernels on CPU tensors.
_TRITON_ON_CPU = False
# Set after a launch failed (e.g. no compiler for Triton's launcher): PyTorch ops from then on.
_triton_failed = False


def _use_triton(t: Tensor) -> bool:
    if triton is None or _triton_failed or os.environ.get(REFERENCE_ENV, '0') == '1':
        return False
    return t.is_cuda or _TRITON_ON_CPU


def _launch(kernel, grid, *args, **meta) -> bool:
    """Launch a Triton kernel; on failure warn once, fall back for good and return False."""
    global _triton_failed
    try:
        kernel[grid](*args, **meta)
        return True
    except Exception as err:  # compilation or launch: keep training on the PyTorch ops
        _triton_failed = True
        warnings.warn(f'TurboxSyncBatchNorm: Triton kernel {kernel.fn.__name__} failed '
                      f'({type(err).__name__}: {err}); using PyTorch ops instead')
        return False


def _block(channels: int) -> int:
    return min(1024, max(16, triton.next_power_of_2(channels)))


def pack_from_invstd(mean: Tensor, invstd: Tensor, count: int) -> Tensor:
    """:func:`pack_moments` from ``batch_norm_stats(x, 0)``'s ``(mean, invstd)``; one kernel.

    Args:
        mean (Tensor): Local mean (C,).
        invstd (Tensor): ``1 / sqrt(var)``, 0 where ``var == 0``.
        count (int): Local samples per channel.

    Returns:
        Tensor: (2C + 1,) float64.
    """
    channels = mean.numel()
    if _use_triton(mean):
        out = torch.empty(2 * channels + 1, dtype=torch.float64, device=mean.device)
        block = _block(channels)
        if _launch(_pack_kernel, (triton.cdiv(channels, block), ), mean, invstd, out, channels,
                   count, BLOCK=block):
            return out
    invstd = invstd.double()
    var = torch.where(invstd > 0, invstd.pow(-2), torch.zeros_like(invstd))
    return pack_moments(mean, var, count)


def finalize_stats(packed: Tensor, eps: float, dtype: torch.dtype,
                   running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   momentum: Optional[float],
                   num_batches_tracked: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """Global ``mean`` and ``invstd`` from the all-reduced message; updates the running stats.

    Args:
        packed (Tensor): (2C + 1,) float64, see :func:`pack_moments`.
        eps (float): Added to the variance.
        dtype (torch.dtype): dtype of ``mean`` and ``invstd``.
        running_mean (Tensor, optional): Updated in place unless None.
        running_var (Tensor, optional): Updated in place unless None.
        momentum (float, optional): None for the cumulative average.
        num_batches_tracked (Tensor, optional): Already incremented for this batch.

    Returns:
        tuple[Tensor, Tensor, Tensor]: ``mean`` (C,), ``invstd`` (C,) and ``count`` (1,)
        float64, the samples per channel over all ranks.
    """
    channels = (packed.numel() - 1) // 2
    update = running_mean is not None and running_var is not None
    cumulative = momentum is None and num_batches_tracked is not None
    fused = _use_triton(packed) and packed.is_contiguous() and (not update or all(
        b.is_contiguous() and b.dtype != torch.float64 for b in (running_mean, running_var)))
    if fused:
        mean = torch.empty(channels, dtype=dtype, device=packed.device)
        invstd = torch.empty_like(mean)
        block = _block(channels)
        if _launch(_finalize_kernel, (triton.cdiv(channels, block), ), packed, mean, invstd,
                   running_mean if update else mean, running_var if update else mean,
                   num_batches_tracked if cumulative else packed,
                   0.0 if momentum is None else float(momentum), float(eps), channels,
                   UPDATE=update, CUMULATIVE=cumulative, BLOCK=block):
            return mean, invstd, packed[2 * channels:]
    mean, invstd, var, count = moments_from_packed(packed, eps, dtype)
    if update:
        update_running_stats(running_mean, running_var, mean, var, count,
                             running_factor(momentum, num_batches_tracked))
    return mean, invstd, count


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


@MODELS.register_module(name=['TurboxSyncBatchNorm', 'TurboxSyncBN'])
class TurboxSyncBatchNorm(_BatchNorm):
    """Drop-in ``torch.nn.SyncBatchNorm`` whose forward and backward never sync the host.

    In training, with ``torch.distributed`` initialised and more than one rank in
    ``process_group``, each forward exchanges the packed per-channel moments and sample count in
    one ``all_reduce`` and each backward ``[sum(dy), sum(dy * (x - mean))]`` in one more; the
    result equals ``nn.BatchNorm`` run on the concatenation of all ranks' inputs (see the
    module docstring for the formula and the tolerance). Ranks may hold different batch sizes,
    zero included: such a rank contributes nothing but still joins both collectives. Parameter
    gradients are this rank's own, so that DDP averages them as usual (zeros, never None, on a
    rank without samples, so that DDP's reducer is not left waiting for them).

    In eval mode, without ``torch.distributed`` or with a single rank it is plain BatchNorm
    (``F.batch_norm``), except that ``momentum=None`` in training goes through the same
    sync-free code (with no collective) so that the cumulative average never reads
    ``num_batches_tracked`` on the host. The running statistics follow ``nn.BatchNorm``
    exactly: unbiased variance, ``momentum`` or cumulative average, ``num_batches_tracked``.

    Inputs of any rank >= 2 are accepted ((N, C), (N, C, L), (N, C, H, W), (N, C, D, H, W)),
    in any memory format (channels_last, non-contiguous), in float16/bfloat16/float32/float64
    with parameters of the same or a wider dtype; statistics are accumulated in float32 and
    outputs come back in the input's dtype. Works on CUDA (NCCL) and on the CPU (gloo).

    Every rank of the group must call forward and backward of each layer in the same order,
    as with ``torch.nn.SyncBatchNorm``.

    Args:
        num_features (int): Channels C.
        eps (float): Added to the variance. Defaults to 1e-5.
        momentum (float, optional): Running-statistics momentum; None for the cumulative
            average. Defaults to 0.1.
        affine (bool): Learn a per-channel scale and shift. Defaults to True.
        track_running_stats (bool): Keep running statistics. Defaults to True.
        process_group (ProcessGroup, optional): The ranks to synchronise over. Defaults to
            None, the whole world.
        device (torch.device, optional): Device of the parameters and buffers.
        dtype (torch.dtype, optional): dtype of the parameters and buffers.
        bias (bool): With ``affine``, learn the shift too (as torch >= 2.12's BatchNorm).
            Defaults to True.
        force_sync (bool): Take the collective path in training even when the group has a
            single rank (the all_reduce is then a no-op on the data). For tests and for timing
            the collective path on one GPU; results equal the unsynchronised ones. Defaults to
            False.

    Examples:
        >>> import torch
        >>> bn = TurboxSyncBatchNorm(8)
        >>> bn(torch.randn(4, 8, 6, 6)).shape
        torch.Size([4, 8, 6, 6])
        >>> from mmcv.cnn import build_norm_layer
        >>> name, layer = build_norm_layer(dict(type='turbox_mm.TurboxSyncBatchNorm'), 16)
        >>> name, type(layer).__name__
        ('bn', 'TurboxSyncBatchNorm')
    """

    def __init__(self,
                 num_features: int,
                 eps: float = 1e-5,
                 momentum: Optional[float] = 0.1,
                 affine: bool = True,
                 track_running_stats: bool = True,
                 process_group: Any = None,
                 device=None,
                 dtype=None,
                 *,
                 bias: bool = True,
                 force_sync: bool = False) -> None:
        factory_kwargs = dict(device=device, dtype=dtype)
        if _BN_TAKES_BIAS:
            factory_kwargs['bias'] = bias
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         **factory_kwargs)
        if affine and not bias and not _BN_TAKES_BIAS:
            self.register_parameter('bias', None)
        self.process_group = process_group
        self.force_sync = force_sync

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f'{type(self).__name__} expects an input of shape (N, C, *) with '
                             f'at least 2 dimensions, got shape {tuple(input.shape)}')
        if input.size(1) != self.num_features:
            raise ValueError(f'{type(self).__name__}(num_features={self.num_features}) got an '
                             f'input with {input.size(1)} channels: shape '
                             f'{tuple(input.shape)}')

    def sync_group(self) -> Any:
        """The process group to synchronise over now, or None for plain BatchNorm.

        Returns:
            ProcessGroup or None: ``process_group`` (the world if unset) when training with
            ``torch.distributed`` initialised and either more than one rank or ``force_sync``.
        """
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        if dist.get_world_size(group) > 1 or self.force_sync:
            return group
        return None

    def forward(self, input: Tensor) -> Tensor:
        """Normalise ``input`` (N, C, *); see the class docstring."""
        self._check_input_dim(input)
        tracking = self.training and self.track_running_stats
        if tracking and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        running_mean = self.running_mean if not self.training or self.track_running_stats \
            else None
        running_var = self.running_var if not self.training or self.track_running_stats \
            else None
        group = self.sync_group() if bn_training else None
        cumulative = tracking and self.momentum is None and self.num_batches_tracked is not None
        if group is not None or cumulative:
            # nn.BatchNorm would read num_batches_tracked on the host for momentum=None.
            return sync_batch_norm(input, self.weight, self.bias, running_mean, running_var,
                                   self.momentum, self.eps, group, self.num_batches_tracked)
        return F.batch_norm(input, running_mean, running_var, self.weight, self.bias,
                            bn_training, 0.0 if self.momentum is None else self.momentum,
                            self.eps)

    @classmethod
    def convert_sync_batchnorm(cls,
                               module: nn.Module,
                               process_group: Any = None,
                               sync_only: bool = False) -> nn.Module:
        """See :func:`convert_sync_batchnorm`."""
        return convert_sync_batchnorm(module, process_group, sync_only)


def _mmcv_sync_bn() -> Tuple[type, ...]:
    try:
        from mmcv.ops import SyncBatchNorm as MMCVSyncBatchNorm
    except Exception:  # mmcv without its compiled ops, or no mmcv at all
        return ()
    return (MMCVSyncBatchNorm, )


def _convertible(module: nn.Module, extra: Sequence[type], sync_only: bool) -> bool:
    if isinstance(module, TurboxSyncBatchNorm):
        return False
    return isinstance(module, (nn.SyncBatchNorm if sync_only else _BatchNorm, *extra))


def convert_sync_batchnorm(module: nn.Module,
                           process_group: Any = None,
                           sync_only: bool = False) -> nn.Module:
    """Replace every BatchNorm in ``module`` by a :class:`TurboxSyncBatchNorm`.

    Converts ``nn.BatchNorm1d/2d/3d`` and every other ``_BatchNorm`` (``torch.nn.SyncBatchNorm``,
    mmengine's ``_BatchNormXd``, ...) and, where mmcv's ops are built, ``mmcv.ops.SyncBatchNorm``.
    The new layers share the old ones' parameters and buffers (same tensors, so device, dtype,
    ``requires_grad`` and values are kept) and copy ``eps``, ``momentum``, ``affine``,
    ``track_running_stats``, the training flag and ``qconfig``. Layers that already are
    :class:`TurboxSyncBatchNorm` are kept as they are.

    Note that mmcv's SyncBatchNorm with ``stats_mode='default'`` weights every rank's mean
    equally; after conversion the statistics are those of all samples (mmcv's ``'N'``), which
    differs only when ranks hold different batch sizes.

    Args:
        module (nn.Module): A model or a single BatchNorm layer.
        process_group (ProcessGroup, optional): Group of the new layers. Defaults to None: the
            group of a converted ``torch.nn.SyncBatchNorm`` / mmcv SyncBatchNorm where it had
            one, else the whole world.
        sync_only (bool): Convert only layers that already synchronise
            (``torch.nn.SyncBatchNorm``, mmcv's SyncBatchNorm) and leave plain BatchNorm local,
            as a config that sets no ``sync_bn`` but builds ``norm_cfg=dict(type='SyncBN')``
            layers expects. Defaults to False.

    Returns:
        nn.Module: ``module`` with its BatchNorm layers replaced; a new layer if ``module``
        itself is a BatchNorm.

    Raises:
        ValueError: A lazy BatchNorm whose parameters are not materialised yet.

    Examples:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> net = convert_sync_batchnorm(net)
        >>> type(net[1]).__name__
        'TurboxSyncBatchNorm'
    """
    return _convert(module, process_group, _mmcv_sync_bn(), sync_only, '')


def _convert(module: nn.Module, process_group: Any, extra: Sequence[type], sync_only: bool,
             name: str) -> nn.Module:
    output = module
    if _convertible(module, extra, sync_only):
        if any(isinstance(p, nn.parameter.UninitializedParameter)
               for p in module.parameters(recurse=False)):
            raise ValueError(f'convert_sync_batchnorm: {name or type(module).__name__} is a '
                             'lazy BatchNorm whose parameters are not initialised yet; run one '
                             'forward first')
        group = process_group
        if group is None:
            group = getattr(module, 'process_group', None)
        if group is None and not isinstance(module, _BatchNorm):
            group = getattr(module, 'group', None)  # mmcv's SyncBatchNorm
        output = TurboxSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats, group, device='meta',
            bias=not module.affine or module.bias is not None)
        if module.affine:
            output.weight = module.weight
            output.bias = module.bias
        output.running_mean = module.running_mean
        output.running_var = module.running_var
        output.num_batches_tracked = module.num_batches_tracked
        output.training = module.training
        if hasattr(module, 'qconfig'):
            output.qconfig = module.qconfig
    for child_name, child in module.named_children():
        output.add_module(child_name, _convert(child, process_group, extra, sync_only,
                                               f'{name}.{child_name}' if name else child_name))
    return output
