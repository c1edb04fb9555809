"""The ``turbox`` section of a config: what it may hold and how it changes the config.

``configs/_base_/turbox.py`` sets this section; :class:`~turbox_mm.engine.runner.TurboxRunner`
validates it (an unknown key fails with the list of valid ones) and applies it to the config
before mmengine builds anything. The table of options is :mod:`.turbox_option_table`.
"""
import logging
from typing import Dict, List

import torch
from mmengine.config import Config
from mmengine.logging import print_log

from .turbox_option_table import TURBOX_OPTIONS  # noqa: F401 (its callers import it here)

DATALOADER_KEYS = ('train_dataloader', 'val_dataloader', 'test_dataloader')


def apply_turbox_options(cfg: Config, options: Dict) -> List[str]:
    """Rewrite ``cfg`` in place according to validated ``options``.

    Args:
        cfg (Config): The full config.
        options (dict): The output of
            ``check_options(cfg.get('turbox'), TURBOX_OPTIONS)``.

    Returns:
        list[str]: One line per change made, for the start-up report.
    """
    changes = []
    loader_opts = options['dataloader']
    prefetch = loader_opts['prefetch_factor']
    if prefetch is not None and prefetch < 1:  # torch would fail only when the loader starts
        raise ValueError(f"Config key 'turbox.dataloader.prefetch_factor' must be None or >= 1 "
                         f'(batches each worker prepares ahead), got {prefetch}')
    _check_compile_modules(cfg, options['compile'])
    _check_compile_backend(options['compile'])
    _check_compile_counts(options['compile'])
    timeout = loader_opts['timeout']
    if timeout is not None and (isinstance(timeout, bool) or timeout <= 0):
        raise ValueError(f"Config key 'turbox.dataloader.timeout' must be None or a number of "
                         f'seconds > 0, got {timeout!r}')
    has_cuda = torch.cuda.is_available()
    for name in DATALOADER_KEYS:
        loader = cfg.get(name)
        if not loader:
            continue
        workers = loader.get('num_workers', 0)
        if loader_opts['pin_memory'] and not loader.get('pin_memory', False):
            if has_cuda:
                loader['pin_memory'] = True
                changes.append(f'{name}.pin_memory = True')
            else:
                print_log(f'turbox.dataloader.pin_memory: no CUDA device, {name} keeps '
                          'pageable memory', logger='current', level=logging.WARNING)
        if workers > 0:
            if loader_opts['persistent_workers'] and not loader.get('persistent_workers'):
                loader['persistent_workers'] = True
                changes.append(f'{name}.persistent_workers = True')
            if loader_opts['prefetch_factor'] is not None:
                loader['prefetch_factor'] = loader_opts['prefetch_factor']
                changes.append(f"{name}.prefetch_factor = {loader_opts['prefetch_factor']}")
    from .fast_ops import apply_fast_ops
    from .fast_pipeline import apply_fast_pipeline
    from .point_loaders import apply_point_loaders
    from .precomputed_map_gt import apply_precomputed_map_gt
    changes += apply_fast_ops(cfg, options['ops'])
    changes += apply_fast_pipeline(cfg, options['data'])
    changes += apply_precomputed_map_gt(cfg, options['data'])
    changes += apply_point_loaders(cfg, options['data'])
    changes += _apply_loop(cfg, options['loop'])
    changes += _apply_optim(cfg, options['optim'])
    changes += _apply_ema(cfg, options['ema'])
    changes += _apply_system(cfg, options['system'], has_cuda)
    env = options['env']
    env_cfg = cfg.setdefault('env_cfg', {})
    mp_cfg = env_cfg.setdefault('mp_cfg', {})
    for key in ('mp_start_method', 'opencv_num_threads'):
        if mp_cfg.get(key) != env[key]:
            mp_cfg[key] = env[key]
            changes.append(f'env_cfg.mp_cfg.{key} = {env[key]!r}')
    precision = options['precision']
    for key, value in (('allow_tf32', precision['tf32']),
                       ('cudnn_benchmark', precision['cudnn_benchmark'])):
        # Off means "as the config says", not "force off".
        if value and not env_cfg.get(key):
            env_cfg[key] = True
            changes.append(f'env_cfg.{key} = True')
    return changes


def _check_compile_modules(cfg: Config, opts: Dict) -> None:
    """Fail before anything is built on a ``compile.modules`` entry the model cannot have:
    not a dotted path, or a first component that is no key of ``cfg.model`` (OpenMMLab
    models build each submodule under its config key). Deeper parts are checked against
    the built model (:func:`.module_compiler.compile_submodules`)."""
    modules = opts['modules']
    if not opts['enable'] or modules == 'auto':
        return
    if isinstance(modules, str):
        raise ValueError(f"Config key 'turbox.compile.modules' must be 'auto' or a list of "
                         f'submodule paths, got {modules!r}')
    model = cfg.get('model')
    keys = sorted(k for k, v in model.items() if isinstance(v, dict)) \
        if isinstance(model, dict) else None
    for path in modules:
        parts = path.split('.') if isinstance(path, str) else []
        if parts and parts[0] == '*':
            raise ValueError(f"Config key 'turbox.compile.modules': {path!r} starts with *: "
                             "the first part must name a submodule (a key of cfg.model), "
                             "a * may stand for the children below it")
        if not parts or not all(p.isidentifier() or p.isdigit() or (p == '*' and i > 0)
                                for i, p in enumerate(parts)):
            raise ValueError(f"Config key 'turbox.compile.modules': {path!r} is not a dotted "
                             "submodule path such as 'img_backbone', 'head.layers.0' or "
                             "'head.layers.*'")
        if keys is not None and parts[0] not in keys:
            raise ValueError(f"Config key 'turbox.compile.modules': {path!r} names no "
                             f'submodule of the model: {parts[0]!r} is not a key of '
                             f"cfg.model holding a module config (those are: "
                             f"{', '.join(keys)})")


def _check_compile_counts(opts: Dict) -> None:
    """Fail on a ``compile.recompile_limit`` below 1 or a negative ``compile.eager_iters``."""
    limit = opts['recompile_limit']
    if limit is not None and limit < 1:
        raise ValueError(f"Config key 'turbox.compile.recompile_limit' must be None or >= 1, "
                         f'got {limit}')
    if opts['eager_iters'] < 0:
        raise ValueError(f"Config key 'turbox.compile.eager_iters' must be >= 0, got "
                         f"{opts['eager_iters']}")


def _check_compile_backend(opts: Dict) -> None:
    """Fail before anything is built on a ``compile.backend`` that torch does not know
    (``torch.compile`` itself would fail only at the first compiled call, after the model, the
    data and the first batch were made)."""
    if not opts['enable']:
        return
    import torch._dynamo
    known = torch._dynamo.list_backends(exclude_tags=())
    if opts['backend'] not in known:
        raise ValueError(f"Config key 'turbox.compile.backend': torch.compile has no backend "
                         f"{opts['backend']!r}; registered here: {', '.join(sorted(known))}")


# Stock loop names (as configs write them) and their pipelined twins.
PIPELINED_LOOPS = {
    'EpochBasedTrainLoop': 'turbox_mm.PipelinedEpochBasedTrainLoop',
    'IterBasedTrainLoop': 'turbox_mm.PipelinedIterBasedTrainLoop',
}
# Samplers of one finite epoch whose batches CyclicBatchSampler may chain; batch samplers it
# may wrap. Infinite samplers (mmengine's InfiniteSampler, turbox_mm.GroupInBatchSampler)
# need nothing.
CYCLIC_SAMPLERS = ('DefaultSampler', 'turbox_mm.GroupSampler')
CYCLIC_BATCH_SAMPLERS = ('AspectRatioBatchSampler', 'TrackAspectRatioBatchSampler')


def config_dicts(node, path: str):
    """Every dict of a config tree with its dotted path, parents before their children (a
    caller may change a dict it is given before its children are visited)."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from config_dicts(value, f'{path}.{key}')
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from config_dicts(value, f'{path}[{i}]')


def dataset_type_nodes(cfg: Config):
    """Every typed dict inside the datasets of the config's train, val and test loaders
    (pipelines, wrapped datasets): ``(path, node, scope, name)`` with ``node['type']`` split
    at its last dot (``scope`` is ``''`` without one); parents before their children."""
    for key in DATALOADER_KEYS:
        loader = cfg.get(key)
        if not (isinstance(loader, dict) and isinstance(loader.get('dataset'), dict)):
            continue
        for path, node in config_dicts(loader['dataset'], f'{key}.dataset'):
            type_name = node.get('type')
            if isinstance(type_name, str):
                scope, _, name = type_name.rpartition('.')
                yield path, node, scope, name


def _short(type_name) -> str:
    """'mmengine.DefaultSampler' -> 'DefaultSampler' (scope prefixes do not matter here)."""
    return type_name.split('.')[-1] if isinstance(type_name, str) else ''


def _apply_loop(cfg: Config, opts: Dict) -> List[str]:
    """Swap in the pipelined train loop and the cyclic batch sampler."""
    train_cfg = cfg.get('train_cfg')
    if not opts['pipelined'] or not train_cfg:
        return []
    changes = []
    loop_type = train_cfg.get('type')
    if loop_type is None:  # mmengine's shorthand: dict(by_epoch=..., max_epochs/max_iters=...)
        loop_type = 'EpochBasedTrainLoop' if train_cfg.get('by_epoch') else 'IterBasedTrainLoop'
    twin = PIPELINED_LOOPS.get(_short(loop_type)) if isinstance(loop_type, str) else None
    if twin is None:
        print_log(f'turbox.loop.pipelined: train_cfg.type {loop_type!r} is not a stock mmengine '
                  'loop; it is kept as it is', logger='current', level=logging.WARNING)
        return changes
    train_cfg.pop('by_epoch', None)
    train_cfg['type'] = twin
    train_cfg['preprocess_ahead'] = opts['preprocess_ahead']
    changes.append(f"train_cfg.type = {twin!r} (was {loop_type!r}), "
                   f"preprocess_ahead={opts['preprocess_ahead']}")
    loader = cfg.get('train_dataloader')
    if not opts['cyclic_loader'] or not loader:
        return changes
    if not (loader.get('num_workers', 0) > 0 and loader.get('persistent_workers')):
        # A hook that changes the dataset at an epoch boundary (mmdet3d's
        # DisableObjectSampleHook) reaches non-persistent workers only because the stock loop
        # starts new ones every epoch; one iterator for the run would keep the old pipeline.
        print_log('turbox.loop.cyclic_loader: train_dataloader has no persistent workers; the '
                  'loader is restarted per epoch as before', logger='current',
                  level=logging.INFO)
        return changes
    sampler_cfg, batch_sampler = loader.get('sampler'), loader.get('batch_sampler')
    if not isinstance(sampler_cfg, dict) or (batch_sampler is not None
                                             and not isinstance(batch_sampler, dict)):
        print_log('turbox.loop.cyclic_loader: train_dataloader has a built sampler object; the '
                  'loader is restarted per epoch as before', logger='current',
                  level=logging.INFO)
        return changes
    sampler = _short(sampler_cfg.get('type'))
    inner = _short(batch_sampler.get('type')) if batch_sampler else None
    if sampler not in [_short(s) for s in CYCLIC_SAMPLERS] or (
            batch_sampler and inner not in CYCLIC_BATCH_SAMPLERS + ('CyclicBatchSampler', )):
        print_log(f'turbox.loop.cyclic_loader: train_dataloader sampler {sampler!r} / '
                  f'batch_sampler {inner!r} is not known to be one finite epoch; the loader is '
                  'restarted per epoch as before', logger='current', level=logging.INFO)
        return changes
    if inner == 'CyclicBatchSampler':
        return changes
    loader['batch_sampler'] = dict(type='turbox_mm.CyclicBatchSampler',
                                   drop_last=loader.pop('drop_last', False),
                                   batch_sampler=batch_sampler)
    changes.append('train_dataloader.batch_sampler = turbox_mm.CyclicBatchSampler'
                   + (f' around {inner}' if inner else ''))
    return changes


# Stock wrapper names and their sync-free twins.
SYNC_FREE_WRAPPERS = {
    'OptimWrapper': 'turbox_mm.TurboxOptimWrapper',
    'AmpOptimWrapper': 'turbox_mm.TurboxAmpOptimWrapper',
}


def _apply_optim(cfg: Config, opts: Dict) -> List[str]:
    """Fused optimizers (constructor) and sync-free clipping (wrapper type)."""
    wrapper = cfg.get('optim_wrapper')
    if not isinstance(wrapper, dict) or 'optimizer' not in wrapper:
        if isinstance(wrapper, dict) and (opts['fused'] or opts['sync_free_clip']):
            # Several optimizers (OptimWrapperDict) or a custom constructor's own layout.
            print_log('turbox.optim: optim_wrapper holds no single `optimizer`; it is kept as '
                      'it is', logger='current', level=logging.WARNING)
        return []
    changes = []
    if opts['sync_free_clip']:
        wrapper_type = wrapper.get('type', 'OptimWrapper')
        twin = SYNC_FREE_WRAPPERS.get(_short(wrapper_type)) if isinstance(
            wrapper_type, str) else None
        if twin is None:
            print_log(f'turbox.optim.sync_free_clip: optim_wrapper.type {wrapper_type!r} is not '
                      "mmengine's; kept, and its clipping syncs with the host",
                      logger='current', level=logging.WARNING)
        else:
            wrapper['type'] = twin
            # The norm is logged at the logger's interval at the latest.
            interval = ((cfg.get('default_hooks') or {}).get('logger') or {}).get('interval')
            if isinstance(interval, int) and interval > 0:
                wrapper.setdefault('log_interval', interval)
            changes.append(f'optim_wrapper.type = {twin!r} (was {wrapper_type!r})')
    if opts['fused']:
        constructor = wrapper.get('constructor', 'DefaultOptimWrapperConstructor')
        if _short(constructor) == 'DefaultOptimWrapperConstructor':
            wrapper['constructor'] = 'turbox_mm.TurboxOptimWrapperConstructor'
            changes.append("optim_wrapper.constructor = 'turbox_mm.TurboxOptimWrapperConstructor'"
                           ' (fused optimizer kernels)')
        elif _short(constructor) != 'TurboxOptimWrapperConstructor':
            print_log(f'turbox.optim.fused: optim_wrapper.constructor {constructor!r} is the '
                      "config's own; kept, fused kernels not applied",
                      logger='current', level=logging.WARNING)
    return changes


def _apply_ema(cfg: Config, opts: Dict) -> List[str]:
    """Swap mmengine's EMAHook (ExponentialMovingAverage) for the CUDA-graph one."""
    hooks = cfg.get('custom_hooks') or []
    if not opts['graph']:
        return []
    from turbox_mm.engine.hooks.ema_hook import convert_ema_hook_cfg
    changes = []
    for i, hook in enumerate(hooks):
        try:
            new = convert_ema_hook_cfg(hook)
        except ValueError as exc:
            print_log(f'turbox.ema.graph: custom_hooks[{i}] kept as it is: {exc}',
                      logger='current', level=logging.WARNING)
            continue
        if new is not None:
            hooks[i] = new
            changes.append(f"custom_hooks[{i}]: {hook.get('type')} -> turbox_mm.TurboxEMAHook")
    return changes


def _has_hook(hooks: List, name: str) -> bool:
    return any(_short(h.get('type')) == name for h in hooks if isinstance(h, dict))


def _apply_system(cfg: Config, opts: Dict, has_cuda: bool) -> List[str]:
    """CPU affinity and GC control, as custom hooks (each added once)."""
    hooks = cfg.get('custom_hooks') or []
    changes = []
    if opts['cpu_affinity']:
        if not has_cuda:
            print_log('turbox.system.cpu_affinity: no CUDA device, the process keeps every '
                      'core', logger='current', level=logging.INFO)
        elif not _has_hook(hooks, 'CPUAffinityHook'):
            hooks.append(dict(type='turbox_mm.CPUAffinityHook'))
            changes.append('custom_hooks += turbox_mm.CPUAffinityHook')
    if opts['gc'] and not _has_hook(hooks, 'GCHook'):
        if opts['gc_interval'] < 1:
            raise ValueError(f"Config key 'turbox.system.gc_interval' must be >= 1, got "
                             f"{opts['gc_interval']}")
        # The memory guard's cross-rank decision is a collective (a host sync): check it only
        # at the scheduled collections, which pause every rank anyway.
        hooks.append(dict(type='turbox_mm.GCHook', interval=opts['gc_interval'],
                          check_interval=opts['gc_interval']))
        changes.append(f"custom_hooks += turbox_mm.GCHook(interval={opts['gc_interval']})")
    if changes:
        cfg.custom_hooks = hooks
    if opts['async_log']:
        changes += _apply_async_log(cfg)
    if opts['atomic_checkpoints']:
        changes += _apply_atomic_checkpoints(cfg)
    return changes


def _apply_atomic_checkpoints(cfg: Config) -> List[str]:
    """mmengine's CheckpointHook (the default, or named in default_hooks) -> turbox's."""
    default_hooks = cfg.get('default_hooks') or {}
    # mmengine's default when the config names none: CheckpointHook(interval=1)
    current = default_hooks.get('checkpoint', dict(type='CheckpointHook', interval=1))
    kind = current.get('type') if isinstance(current, dict) else None
    if kind is None or _short(kind) == 'TurboxCheckpointHook':
        return []
    if _short(kind) != 'CheckpointHook':
        print_log(f'turbox.system.atomic_checkpoints: default_hooks.checkpoint is {kind!r}, '
                  "not mmengine's; kept (the runner still writes each file atomically)",
                  logger='current', level=logging.WARNING)
        return []
    default_hooks['checkpoint'] = dict(current, type='turbox_mm.TurboxCheckpointHook')
    cfg.default_hooks = default_hooks
    return ['default_hooks.checkpoint = turbox_mm.TurboxCheckpointHook (outdated checkpoints '
            'deleted only after the new one is saved)']


def _apply_async_log(cfg: Config) -> List[str]:
    """mmengine's RuntimeInfoHook (the default, or named in default_hooks) -> turbox's."""
    default_hooks = cfg.get('default_hooks') or {}
    current = default_hooks.get('runtime_info', dict(type='RuntimeInfoHook'))
    kind = current.get('type') if isinstance(current, dict) else None
    if kind is None or _short(kind) == 'TurboxRuntimeInfoHook':
        return []  # switched off (None) or already turbox's
    if _short(kind) != 'RuntimeInfoHook':
        print_log(f'turbox.system.async_log: default_hooks.runtime_info is {kind!r}, not '
                  "mmengine's; kept, and it reads every logged value on the host",
                  logger='current', level=logging.WARNING)
        return []
    logger = default_hooks.get('logger') or {}
    interval = logger.get('interval') if isinstance(logger, dict) else None
    hook = dict(current, type='turbox_mm.TurboxRuntimeInfoHook')  # priority etc. kept
    if isinstance(interval, int) and interval > 0:
        hook['interval'] = interval
    default_hooks['runtime_info'] = hook
    cfg.default_hooks = default_hooks
    return ['default_hooks.runtime_info = turbox_mm.TurboxRuntimeInfoHook (training outputs '
            'logged without a host sync per iteration)']
