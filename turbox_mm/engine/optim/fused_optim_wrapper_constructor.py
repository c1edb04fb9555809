"""An optim-wrapper constructor that builds torch's fused Adam, AdamW and SGD.

torch's optimizers default to the ``foreach`` implementation (a few dozen multi-tensor kernels
per step) and only use the single-kernel ``fused`` implementation when asked. The fused
kernels are several times faster for detector-sized parameter sets, and they let GradScaler
skip an overflowing step on the device instead of reading ``found_inf`` on the host. Adam and
AdamW are built as their merged-step twins (:mod:`.merged_adam`): one update launch per
distinct set of hyper-parameters instead of one per parameter group, bit for bit the same.
"""
import inspect
import logging
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor, OptimWrapper
from mmengine.registry import OPTIMIZERS

from turbox_mm.registry import OPTIM_WRAPPER_CONSTRUCTORS
from .merged_adam import MERGED_TWINS, bucket_count, supports_merged_step

# torch optimizers with a ``fused`` implementation that GradScaler can drive without a sync
# (``_step_supports_amp_scaling``). Exact classes: a subclass may override ``step``.
FUSABLE_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def _fused_devices() -> Tuple[str, ...]:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        return tuple(_get_fused_kernels_supported_devices())
    except ImportError:  # torch < 2.4 has no such list and no fused CPU kernels.
        return ('cuda', )


def _foreach_devices() -> Tuple[str, ...]:
    try:
        from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices
        return tuple(_get_foreach_kernels_supported_devices()) + ('cpu', )
    except ImportError:
        return ('cuda', 'cpu')


def plain_param_groups(wrapper: OptimWrapper) -> OptimWrapper:
    """Make the optimizer's parameter groups plain dicts (in place; returns ``wrapper``).

    mmengine builds the optimizer from a config, so ``paramwise_cfg``'s groups arrive as
    ``ConfigDict`` objects, and every read of a group entry (torch's step reads about ten per
    group; with one group per parameter, thousands a step) goes through ``ConfigDict``'s
    attribute machinery. The entries and the ``params`` lists are kept as they are; only the
    mapping type changes, before any parameter scheduler holds the groups.

    Args:
        wrapper (OptimWrapper): A freshly built wrapper.

    Returns:
        OptimWrapper: ``wrapper``.
    """
    groups = wrapper.optimizer.param_groups
    for index, group in enumerate(groups):
        if type(group) is not dict:
            groups[index] = dict(group.items())
    return wrapper


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class TurboxOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """:class:`~mmengine.optim.DefaultOptimWrapperConstructor` that picks fused kernels.

    The parameter groups are mmengine's (``paramwise_cfg`` means exactly what it means there).
    Then, for ``torch.optim.Adam``, ``AdamW`` and ``SGD`` (``type='AdamW'``,
    ``'torch.optim.AdamW'`` or the class itself):

    - ``fused=True`` when every trainable parameter is a floating-point tensor on a device
      with fused kernels (CUDA, and the CPU with torch >= 2.4);
    - otherwise ``foreach=True`` where the foreach kernels can run, with one warning naming the
      first parameter that prevented ``fused``; if neither can run, nothing is set;
    - with either, ``Adam`` and ``AdamW`` become :class:`~.merged_adam.TurboxAdam` /
      ``TurboxAdamW``: the same parameter groups, state and checkpoints, and a step that makes
      one update call per distinct set of hyper-parameters (``paramwise_cfg`` makes one group
      per parameter; the groups of equal learning rate and decay share one launch).

    An explicit ``fused`` or ``foreach`` in the optimizer config, and ``differentiable=True``,
    are left alone; so are other optimizer types (logged at INFO level). The wrapper type is
    not changed: the config's ``type`` is built as written (use
    :class:`~turbox_mm.engine.optim.sync_free_optim_wrapper.TurboxOptimWrapper` or
    ``TurboxAmpOptimWrapper`` for sync-free clipping).

    Args:
        optim_wrapper_cfg (dict): As in ``DefaultOptimWrapperConstructor``: the wrapper config,
            with an ``optimizer`` config.
        paramwise_cfg (dict, optional): As in ``DefaultOptimWrapperConstructor``.
            Defaults to None.

    Examples:
        >>> import torch.nn as nn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> constructor = TurboxOptimWrapperConstructor(
        ...     dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3,
        ...                                              weight_decay=0.05)))
        >>> optim_wrapper = constructor(model)
        >>> optim_wrapper.optimizer.defaults['fused']
        True
    """

    def __call__(self, model: nn.Module) -> OptimWrapper:
        """Build the optim wrapper of ``model`` with the kernel choice applied.

        Args:
            model (nn.Module): The model (or a wrapper with ``.module``) to optimize.

        Returns:
            OptimWrapper: The wrapper built from the config's ``type``.
        """
        module = model.module if hasattr(model, 'module') else model
        extra = self._kernel_choice(module)
        if not extra:
            return plain_param_groups(super().__call__(model))
        user_cfg = self.optimizer_cfg
        self.optimizer_cfg = user_cfg.copy()
        self.optimizer_cfg.update(extra)
        try:
            wrapper = plain_param_groups(super().__call__(model))
        finally:
            self.optimizer_cfg = user_cfg
        if type(wrapper.optimizer) in MERGED_TWINS.values():
            groups = wrapper.optimizer.param_groups
            print_log(f'{type(self).__name__}: {type(wrapper.optimizer).__name__}, '
                      f'{len(groups)} parameter groups updated in '
                      f'{bucket_count(groups)} launches a step', logger='current',
                      level=logging.INFO)
        return wrapper

    def _optimizer_class(self):
        optimizer_type = self.optimizer_cfg['type']
        if inspect.isclass(optimizer_type):
            return optimizer_type
        # Resolved as DefaultOptimWrapperConstructor resolves it.
        with OPTIMIZERS.switch_scope_and_registry(None) as registry:
            return registry.get(optimizer_type)

    def _kernel_choice(self, module: nn.Module) -> dict:
        """The ``fused``/``foreach`` setting to add to the optimizer config ({} for none)."""
        optimizer_cls = self._optimizer_class()
        name = getattr(optimizer_cls, '__name__', str(optimizer_cls))
        if optimizer_cls not in FUSABLE_OPTIMIZERS:
            print_log(f'{type(self).__name__}: {name} has no fused torch kernel; the optimizer '
                      'is built as configured.', logger='current', level=logging.INFO)
            return {}
        # fused/foreach=None mean "torch decides", so this constructor decides instead.
        explicit = [k for k in ('fused', 'foreach') if self.optimizer_cfg.get(k) is not None]
        if self.optimizer_cfg.get('differentiable', False):
            explicit.append('differentiable')
        if explicit:
            print_log(f'{type(self).__name__}: the config sets {name} '
                      f"{', '.join(f'{k}={self.optimizer_cfg[k]}' for k in explicit)}; "
                      'kept as is.', logger='current', level=logging.INFO)
            return {}
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            return {}
        merged = MERGED_TWINS.get(optimizer_cls) if supports_merged_step() else None
        twin = dict(type=merged) if merged is not None else {}
        blocker = self._first_unfusable(named)
        if blocker is None:
            return dict(fused=True, **twin)
        foreach_devices = _foreach_devices()
        if all(p.device.type in foreach_devices for _, p in named):
            fallback, extra = 'foreach=True', dict(foreach=True, **twin)
        else:
            fallback, extra = "torch's default implementation", {}
        print_log(f'{type(self).__name__}: {name} cannot use fused=True because {blocker}; '
                  f'using {fallback}.', logger='current', level=logging.WARNING)
        return extra

    @staticmethod
    def _first_unfusable(named: List[Tuple[str, torch.Tensor]]) -> Optional[str]:
        devices = _fused_devices()
        for name, p in named:
            if p.device.type not in devices:
                return (f'parameter {name!r} is on {p.device.type} (fused kernels run on '
                        f"{', '.join(devices)})")
            if not torch.is_floating_point(p):
                return f'parameter {name!r} is {p.dtype}, not a floating-point type'
        return None
