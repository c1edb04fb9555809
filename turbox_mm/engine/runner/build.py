"""Build the runner a config asks for."""
import logging

from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.runner import Runner

from turbox_mm.registry import RUNNERS
from .turbox_runner import TurboxRunner


def build_runner(cfg: Config) -> Runner:
    """Build the runner named by ``cfg.runner_type``, else mmengine's :class:`Runner`.

    A ``turbox`` section is applied only by :class:`TurboxRunner` and its subclasses; where
    the config has one and the runner is another, a warning in the run's log says that the
    section is ignored.

    Args:
        cfg (Config): The full config.

    Returns:
        Runner: The runner, not yet started.
    """
    if 'runner_type' in cfg:
        runner = RUNNERS.build(cfg)
    else:
        runner = Runner.from_cfg(cfg)
    if cfg.get('turbox') is not None and not isinstance(runner, TurboxRunner):
        print_log(ignored_turbox_message(cfg, runner), logger=runner.logger,
                  level=logging.WARNING)
    return runner


def ignored_turbox_message(cfg: Config, runner: Runner) -> str:
    """Say that ``cfg.turbox`` has no effect under ``runner`` and how to change that.

    Args:
        cfg (Config): The config, with a ``turbox`` section.
        runner (Runner): The runner built from it, not a :class:`TurboxRunner`.

    Returns:
        str: The warning.
    """
    runner_type = cfg.get('runner_type', None)
    named = (f'runner_type={runner_type!r}' if runner_type is not None
             else 'no runner_type (mmengine.runner.Runner)')
    return (f'turbox_mm: the config has a `turbox` section but {named} builds '
            f'{type(runner).__module__}.{type(runner).__qualname__}, which ignores it: no '
            "turbox option is applied. Use runner_type='turbox_mm.TurboxRunner' (as "
            'configs/_base_/turbox.py sets it) or a runner that subclasses '
            'turbox_mm.TurboxRunner.')
