"""Optim wrappers whose gradient clipping never waits for the GPU.

mmengine's :meth:`OptimWrapper._clip_grad` calls :func:`torch.nn.utils.clip_grad_norm_`, which
computes the total norm and scales the gradients entirely on the device (the clip coefficient
``min(max_norm / (norm + 1e-6), 1)`` is a tensor, never a Python number), and then logs
``float(grad_norm)`` into the message hub. That ``float`` is a device-to-host copy: every step
the host stops until the backward pass and the norm are done, so it can no longer queue the
optimizer kernels, the next batch's copies and the next forward ahead of the GPU.

The wrappers here keep mmengine's clipping (same function, same arguments, so the same
gradients) and only change how the norm reaches the log: it is copied with ``non_blocking=True``
into a pinned host buffer, a CUDA event marks the copy, and the value is pushed to
``'train/grad_norm'`` once the event has completed. Nothing waits unless the GPU falls
``log_interval`` steps behind, so every log interval still shows the norm.

With AMP, :class:`TurboxAmpOptimWrapper` keeps :class:`~mmengine.optim.AmpOptimWrapper`'s
order (unscale, clip, ``scaler.step``, ``scaler.update``). Whether that step is sync-free
depends on the optimizer: a fused Adam/AdamW/SGD (``_step_supports_amp_scaling``) receives
GradScaler's ``found_inf`` tensor and skips the update on the device, while any other optimizer
makes ``GradScaler.step`` read ``found_inf`` with ``.item()``.
:class:`~turbox_mm.engine.optim.fused_optim_wrapper_constructor.TurboxOptimWrapperConstructor`
builds the fused optimizers.
"""
import logging
from typing import List

import torch
from mmengine.logging import print_log
from mmengine.optim import AmpOptimWrapper, OptimWrapper

from turbox_mm.engine.async_scalars import AsyncScalarLog
from turbox_mm.registry import OPTIM_WRAPPERS

__all__ = ['AsyncScalarLog', 'SyncFreeClipMixin', 'TurboxOptimWrapper', 'TurboxAmpOptimWrapper']


class SyncFreeClipMixin:
    """Gradient clipping as mmengine's, with the norm logged without a host sync.

    Mixed into an :class:`~mmengine.optim.OptimWrapper` subclass ahead of it. Only
    :meth:`_clip_grad` changes: ``clip_grad`` takes the same keys as mmengine's (``max_norm``,
    ``norm_type``, ``error_if_nonfinite``, ``foreach``; or ``type='value'`` with
    ``clip_value``). Value clipping never logs and never synced, so it is left to mmengine, and
    so is ``error_if_nonfinite=True``, whose check must read the norm on the host.

    Args:
        log_interval (int): The most steps whose norm may still be on its way to the message
            hub; set it to the ``LoggerHook`` interval so that every logged window has norms.
            Defaults to 10 (``LoggerHook``'s default).
        *args, **kwargs: Passed on to the wrapper (``optimizer``, ``clip_grad``, ...).
    """

    def __init__(self, *args, log_interval: int = 10, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(log_interval, int) or isinstance(log_interval, bool) or log_interval < 1:
            raise ValueError(f'{type(self).__name__}: log_interval must be a positive int, '
                             f'got {log_interval!r}')
        self.log_interval = log_interval
        self._sync_free_clip = (bool(self.clip_grad_kwargs) and self.grad_name == 'grad_norm'
                                and not self.clip_grad_kwargs.get('error_if_nonfinite', False))
        if self.clip_grad_kwargs and self.grad_name == 'grad_norm' and not self._sync_free_clip:
            print_log(f'{type(self).__name__}: clip_grad.error_if_nonfinite=True reads the '
                      'gradient norm on the host every step (a device sync); mmengine\'s '
                      'clipping is used as is.', logger='current', level=logging.WARNING)
        self._grad_norm_log = AsyncScalarLog(self.message_hub, 'train/grad_norm',
                                             capacity=log_interval)

    def _clip_grad(self) -> None:
        """Clip the gradients on their device; queue the norm for the message hub."""
        if not self._sync_free_clip:
            super()._clip_grad()
            return
        params: List[torch.Tensor] = [
            p for group in self.optimizer.param_groups for p in group['params']
            if p.requires_grad and p.grad is not None
        ]
        if params:
            # torch.nn.utils.clip_grad_norm_, as mmengine configured it: the norm, the clip
            # coefficient and the scaling all stay on the device.
            grad_norm = self.clip_func(params, **self.clip_grad_kwargs)
            self._grad_norm_log.push(grad_norm)
        else:
            self._grad_norm_log.poll()

    def flush_grad_norm(self) -> None:
        """Push every gradient norm still in flight to the message hub (waits for them)."""
        self._grad_norm_log.flush()


@OPTIM_WRAPPERS.register_module()
class TurboxOptimWrapper(SyncFreeClipMixin, OptimWrapper):
    """:class:`~mmengine.optim.OptimWrapper` with sync-free gradient clipping.

    Same arguments, same updates and same ``'train/grad_norm'`` log as ``OptimWrapper``; the
    norm reaches the message hub when its copy to the host has completed instead of being read
    with ``float()`` inside the step.

    Args:
        optimizer (Optimizer): The optimizer; fused kernels (``fused=True``) are fastest.
        accumulative_counts (int): As in ``OptimWrapper``. Defaults to 1.
        clip_grad (dict, optional): As in ``OptimWrapper``: ``dict(max_norm=35, norm_type=2)``
            or ``dict(type='value', clip_value=1.0)``. Defaults to None.
        log_interval (int): The most steps whose norm may be in flight (see
            :class:`SyncFreeClipMixin`). Defaults to 10.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        >>> wrapper = TurboxOptimWrapper(optimizer, clip_grad=dict(max_norm=1.0))
        >>> wrapper.update_params(model(torch.randn(8, 4)).pow(2).sum())
        >>> 'train/grad_norm' in wrapper.message_hub.log_scalars
        True

        In a config:

        >>> optim_wrapper = dict(
        ...     type='turbox_mm.TurboxOptimWrapper',
        ...     constructor='turbox_mm.TurboxOptimWrapperConstructor',
        ...     optimizer=dict(type='AdamW', lr=2e-4, weight_decay=0.01),
        ...     clip_grad=dict(max_norm=35, norm_type=2))
    """


@OPTIM_WRAPPERS.register_module()
class TurboxAmpOptimWrapper(SyncFreeClipMixin, AmpOptimWrapper):
    """:class:`~mmengine.optim.AmpOptimWrapper` with sync-free gradient clipping.

    ``loss_scale`` (``'dynamic'``, a float for a static scale, or a dict of GradScaler
    arguments), ``dtype`` (``'float16'`` or ``'bfloat16'``) and ``use_fsdp`` mean what they mean
    in ``AmpOptimWrapper``, which does the scaling: gradients are unscaled before clipping, a
    step whose gradients hold inf/NaN is skipped by the scaler, and the scale is updated.
    Like ``AmpOptimWrapper`` it needs a GPU.

    With a fused optimizer the whole step, dynamic loss scaling included, runs without a host
    sync; with any other optimizer ``GradScaler.step`` reads ``found_inf`` on the host (logged
    once at construction).

    Args:
        loss_scale (str | float | dict): As in ``AmpOptimWrapper``. Defaults to 'dynamic'.
        dtype (str | torch.dtype, optional): Autocast dtype. Defaults to None (float16).
        use_fsdp (bool): Use ``ShardedGradScaler``. Defaults to False.
        log_interval (int): See :class:`SyncFreeClipMixin`. Defaults to 10.
        **kwargs: ``optimizer``, ``accumulative_counts``, ``clip_grad``, as in ``OptimWrapper``.

    Examples:
        >>> optim_wrapper = dict(
        ...     type='turbox_mm.TurboxAmpOptimWrapper',
        ...     constructor='turbox_mm.TurboxOptimWrapperConstructor',
        ...     optimizer=dict(type='AdamW', lr=2e-4, weight_decay=0.01),
        ...     clip_grad=dict(max_norm=35, norm_type=2),
        ...     loss_scale='dynamic')
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if (self.loss_scaler.is_enabled()
                and not getattr(self.optimizer, '_step_supports_amp_scaling', False)):
            print_log(f'{type(self).__name__}: {type(self.optimizer).__name__} is not fused, so '
                      'GradScaler.step reads found_inf on the host every step (a device sync); '
                      'fused=True (TurboxOptimWrapperConstructor sets it) avoids that.',
                      logger='current', level=logging.INFO)
