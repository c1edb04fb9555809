"""The ``turbox`` section of a config: what it may hold and how it changes the config.

``configs/_base_/turbox.py`` sets this section; :class:`~turbox_mm.engine.runner.TurboxRunner`
validates it (an unknown key fails with the list of valid ones) and applies it to the config
before mmengine builds anything. The table grows as components land.
"""
import logging
from typing import Dict, List

import torch
from mmengine.config import Config
from mmengine.logging import print_log

from turbox_mm.utils.options import Option, Schema

DATALOADER_KEYS = ('train_dataloader', 'val_dataloader', 'test_dataloader')

TURBOX_OPTIONS: Schema = {
    'report': Option(True, (bool,), 'log the options in effect and what they changed'),
    'dataloader': {
        'pin_memory': Option(
            True, (bool,),
            'page-locked batches, so host-to-device copies can run asynchronously; '
            'skipped with a warning where no CUDA device is present'),
        'persistent_workers': Option(
            True, (bool,),
            'keep loader workers alive between epochs instead of restarting them; '
            'only where num_workers > 0'),
        'prefetch_factor': Option(
            None, (int, type(None)),
            'batches each worker prepares ahead; None keeps the loader\'s setting; '
            'only where num_workers > 0'),
    },
    'env': {
        'mp_start_method': Option(
            'fork', (str,), 'start method of loader worker processes (env_cfg.mp_cfg)',
            choices=('fork', 'spawn', 'forkserver')),
        'opencv_num_threads': Option(
            0, (int,), 'OpenCV threads per process; 0 stops OpenCV from competing with '
            'loader workers for cores (env_cfg.mp_cfg)'),
    },
}


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
    env = options['env']
    env_cfg = cfg.setdefault('env_cfg', {})
    mp_cfg = env_cfg.setdefault('mp_cfg', {})
    for key in ('mp_start_method', 'opencv_num_threads'):
        if mp_cfg.get(key) != env[key]:
            mp_cfg[key] = env[key]
            changes.append(f'env_cfg.mp_cfg.{key} = {env[key]!r}')
    return changes
