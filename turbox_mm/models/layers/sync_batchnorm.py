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

This file holds the layer and :func:`convert_sync_batchnorm`; the autograd function and
:func:`sync_batch_norm` are in ``sync_batchnorm_function.py``, the two Triton kernels and their
fallback in ``sync_batchnorm_triton.py``, the plain-PyTorch reference in
``sync_batchnorm_reference.py``. Their public names are importable from here too.
"""
import inspect
from typing import Any, Optional, Sequence, Tuple

import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from turbox_mm.registry import MODELS

from .sync_batchnorm_function import sync_batch_norm
from .sync_batchnorm_reference import (REFERENCE_ENV, local_moments,  # noqa: F401 (re-exported)
                                       moments_from_packed, normalize, pack_moments,
                                       running_factor, update_running_stats)
from .sync_batchnorm_triton import finalize_stats, pack_from_invstd  # noqa: F401 (re-exported)

__all__ = ['TurboxSyncBatchNorm', 'convert_sync_batchnorm']

# torch >= 2.12 lets BatchNorm drop only the bias (``bias=False``); older torch has no argument.
_BN_TAKES_BIAS = 'bias' in inspect.signature(_BatchNorm.__init__).parameters


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
