"""Build the runner a config asks for."""
from mmengine.config import Config
from mmengine.runner import Runner

from turbox_mm.registry import RUNNERS


def build_runner(cfg: Config) -> Runner:
    """Build the runner named by ``cfg.runner_type``, else mmengine's :class:`Runner`.

    Args:
        cfg (Config): The full config.

    Returns:
        Runner: The runner, not yet started.
    """
    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)
