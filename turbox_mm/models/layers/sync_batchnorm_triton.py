"""The CUDA path's per-channel bookkeeping as two small Triton kernels, with their fallback.

:func:`pack_from_invstd` packs the forward message from ``torch.batch_norm_stats``'s output and
:func:`finalize_stats` turns the all-reduced message into ``mean``, ``invstd`` and the running
update, one kernel each, so that a layer's forward launches five kernels (and backward four)
instead of some thirty tiny PyTorch ops. Where Triton is missing, ``TURBOX_SYNCBN_REFERENCE=1``
is set, the tensors are not on CUDA, or a launch failed once (one warning, then PyTorch ops for
good), both fall back to the reference in :mod:`.sync_batchnorm_reference`.
"""
import os
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from .sync_batchnorm_reference import (REFERENCE_ENV, moments_from_packed, pack_moments,
                                       running_factor, update_running_stats)

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
