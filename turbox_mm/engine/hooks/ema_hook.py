"""EMA hook whose per-iteration update is a replayed CUDA graph.

:class:`TurboxEMAHook` is mmengine's :class:`~mmengine.hooks.EMAHook` with the averaged model
defaulting to :class:`~turbox_mm.engine.hooks.graph_ema.GraphExponentialMovingAverage`. The
schedule (``begin_iter`` / ``begin_epoch``), the swap of weights around validation and test,
the ``ema_state_dict`` in checkpoints and resuming are mmengine's own code, unchanged, so a
checkpoint written with either hook resumes with the other.

Why nothing else needs overriding: mmengine swaps weights for validation by copying in place
(``p_avg.data.copy_(p_src.data)``) and loads checkpoints with ``copy_`` as well, so the
addresses a captured graph holds stay valid; the averaged model itself notices the cases that
move storage (see :mod:`~turbox_mm.engine.hooks.graph_ema`) and captures again.

:func:`convert_ema_hook_cfg` turns a stock config's ``EMAHook`` entry into this hook, keeping
its arguments, for a turbox option that rewrites ``custom_hooks``.
"""
import copy
import logging
from typing import Optional, Union

from mmengine.hooks import EMAHook
from mmengine.hooks.hook import DATA_BATCH
from mmengine.logging import print_log
from mmengine.model import BaseAveragedModel, ExponentialMovingAverage

from turbox_mm.registry import HOOKS, MODELS
from .graph_ema import GraphExponentialMovingAverage

#: The stock averaged model that :class:`TurboxEMAHook` replaces by its graph twin.
GRAPH_TWINS = {ExponentialMovingAverage: GraphExponentialMovingAverage}


def resolve_ema_type(ema_type: Union[str, type]) -> type:
    """The averaged-model class that :class:`TurboxEMAHook` builds for ``ema_type``.

    Args:
        ema_type (str or type): A registered name (``'ExponentialMovingAverage'``,
            ``'mmengine.ExponentialMovingAverage'``, ``'turbox_mm.GraphExponentialMovingAverage'``)
            or a subclass of :class:`~mmengine.model.BaseAveragedModel`.

    Returns:
        type: :class:`GraphExponentialMovingAverage` for mmengine's
        ``ExponentialMovingAverage`` (same update, same state dict), otherwise the class
        itself.

    Raises:
        KeyError: ``ema_type`` is not a registered model.
        TypeError: ``ema_type`` is not a :class:`~mmengine.model.BaseAveragedModel`.
    """
    cls = ema_type
    if isinstance(ema_type, str):
        try:
            cls = MODELS.get(ema_type)
        except KeyError as exc:
            raise KeyError(f'TurboxEMAHook: ema_type {ema_type!r}: {exc.args[0]}') from None
        if cls is None:
            raise KeyError(f'TurboxEMAHook: ema_type {ema_type!r} is not a registered model')
    if not (isinstance(cls, type) and issubclass(cls, BaseAveragedModel)):
        raise TypeError(f'TurboxEMAHook: ema_type must name a subclass of mmengine\'s '
                        f'BaseAveragedModel, got {ema_type!r}')
    return GRAPH_TWINS.get(cls, cls)


def has_graph_update(ema_type: Union[str, type]) -> bool:
    """Whether ``ema_type`` resolves to an averaged model with the CUDA-graph update.

    Args:
        ema_type (str or type): As for :func:`resolve_ema_type`.

    Returns:
        bool: False for ``StochasticWeightAverage``, ``MomentumAnnealingEMA``, mmdet's
        ``ExpMomentumEMA`` and any other averaging rule (their momentum or weight depends on
        the step, or they are not EMAs); unknown names are False too.
    """
    try:
        return issubclass(resolve_ema_type(ema_type), GraphExponentialMovingAverage)
    except (KeyError, TypeError):
        return False


@HOOKS.register_module()
class TurboxEMAHook(EMAHook):
    """:class:`~mmengine.hooks.EMAHook` whose averaged model updates through a CUDA graph.

    ``ema_type='ExponentialMovingAverage'`` (mmengine's default) is built as
    :class:`~turbox_mm.engine.hooks.graph_ema.GraphExponentialMovingAverage`, which gives the
    same weights with one graph replay per iteration. Other ``ema_type`` values are built as
    given and behave exactly as under mmengine's hook (one log line says that they update
    per tensor). Iterations before ``begin_iter`` / ``begin_epoch`` copy the model's state with
    grouped foreach copies instead of one copy per tensor.

    ``priority`` stays ``'NORMAL'``, as mmengine's: above ``CheckpointHook`` (``'VERY_LOW'``), so
    ``ema_state_dict`` is written before the checkpoint is saved, and the EMA weights are
    swapped in before validation hooks of lower priority run.

    Args:
        ema_type (str or type): The averaged model. Defaults to
            ``'turbox_mm.GraphExponentialMovingAverage'``.
        strict_load (bool): Strict key matching when resuming ``ema_state_dict``.
            Defaults to False.
        begin_iter (int): Iteration from which the EMA averages. Defaults to 0.
        begin_epoch (int): Epoch from which the EMA averages. Defaults to 0.
        **kwargs: Arguments of the averaged model (``momentum``, ``interval``,
            ``update_buffers``, ``device``; for the graph one also ``use_graph``, ``warmup``).

    Examples:
        >>> from turbox_mm.engine.hooks.ema_hook import TurboxEMAHook
        >>> hook = TurboxEMAHook(ema_type='ExponentialMovingAverage', momentum=0.001)
        >>> hook.ema_cfg['type'].__name__, hook.ema_cfg['momentum']
        ('GraphExponentialMovingAverage', 0.001)
    """

    priority = 'NORMAL'

    def __init__(self,
                 ema_type: Union[str, type] = 'turbox_mm.GraphExponentialMovingAverage',
                 strict_load: bool = False,
                 begin_iter: int = 0,
                 begin_epoch: int = 0,
                 **kwargs) -> None:
        cls = resolve_ema_type(ema_type)
        if not issubclass(cls, GraphExponentialMovingAverage):
            print_log(f'TurboxEMAHook: ema_type {cls.__name__} has no CUDA-graph update; it '
                      'updates per tensor, as under mmengine\'s EMAHook', logger='current',
                      level=logging.WARNING)
        # mmengine builds ``dict(type=ema_type, **kwargs)``; a class as ``type`` builds from
        # any registry, whatever the default scope.
        super().__init__(ema_type=cls, strict_load=strict_load, begin_iter=begin_iter,
                         begin_epoch=begin_epoch, **kwargs)

    def after_train_iter(self,
                         runner,
                         batch_idx: int,
                         data_batch: DATA_BATCH = None,
                         outputs: Optional[dict] = None) -> None:
        """Update the EMA; before it begins, copy the model's state into it.

        Args:
            runner (Runner): The runner of the training process.
            batch_idx (int): The index of the current batch in the train loop.
            data_batch (dict or tuple or list, optional): Data from the dataloader.
                Defaults to None.
            outputs (dict, optional): Outputs of the model. Defaults to None.
        """
        if not self._ema_started(runner) and isinstance(self.ema_model,
                                                        GraphExponentialMovingAverage):
            self.ema_model.copy_from(self.src_model)
            return
        super().after_train_iter(runner, batch_idx, data_batch, outputs)


#: Names under which configs write mmengine's EMA hook.
STOCK_EMA_HOOK_NAMES = ('EMAHook', 'mmengine.EMAHook', 'mmdet.EMAHook', 'mmdet3d.EMAHook')


def convert_ema_hook_cfg(hook_cfg: dict) -> Optional[dict]:
    """The :class:`TurboxEMAHook` twin of a stock ``EMAHook`` entry of ``custom_hooks``.

    Every argument (``momentum``, ``interval``, ``update_buffers``, ``begin_iter``,
    ``begin_epoch``, ``strict_load``, ``priority``, ...) is kept; ``type`` becomes
    ``'turbox_mm.TurboxEMAHook'`` and ``ema_type``, when it names mmengine's
    ``ExponentialMovingAverage``, becomes ``'turbox_mm.GraphExponentialMovingAverage'``.

    Args:
        hook_cfg (dict): One entry of a config's ``custom_hooks``.

    Returns:
        dict or None: A new dict, or None when ``hook_cfg`` is not an ``EMAHook`` entry (it is
        then left to the caller unchanged).

    Raises:
        ValueError: The entry's ``ema_type`` has no graph update (``StochasticWeightAverage``,
            ``MomentumAnnealingEMA``, mmdet's ``ExpMomentumEMA``, unknown names); the message
            names it. Callers keep the stock hook for such entries.

    Examples:
        >>> from turbox_mm.engine.hooks.ema_hook import convert_ema_hook_cfg
        >>> cfg = convert_ema_hook_cfg(dict(type='EMAHook', momentum=0.0002, priority=49))
        >>> cfg['type'], cfg['ema_type'], cfg['momentum'], cfg['priority']
        ('turbox_mm.TurboxEMAHook', 'turbox_mm.GraphExponentialMovingAverage', 0.0002, 49)
        >>> convert_ema_hook_cfg(dict(type='CheckpointHook')) is None
        True
    """
    hook_type = hook_cfg.get('type')
    if not (hook_type in STOCK_EMA_HOOK_NAMES or hook_type is EMAHook):
        return None
    ema_type = hook_cfg.get('ema_type', 'ExponentialMovingAverage')
    if not has_graph_update(ema_type):
        name = getattr(ema_type, '__name__', ema_type)
        raise ValueError(f'EMAHook ema_type={name!r} has no CUDA-graph twin in turbox_mm '
                         '(only ExponentialMovingAverage, whose momentum is fixed, has one); '
                         'keep mmengine\'s EMAHook for it')
    new_cfg = copy.deepcopy(dict(hook_cfg))
    new_cfg['type'] = 'turbox_mm.TurboxEMAHook'
    if resolve_ema_type(ema_type) is GraphExponentialMovingAverage:
        new_cfg['ema_type'] = 'turbox_mm.GraphExponentialMovingAverage'
    return new_cfg
