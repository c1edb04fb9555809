"""The runner that ``configs/_base_/turbox.py`` selects through ``runner_type``."""
import copy

from mmengine.config import Config, ConfigDict
from mmengine.logging import print_log
from mmengine.runner import Runner

from turbox_mm.registry import RUNNERS
from turbox_mm.utils.options import check_options
from .turbox_options import TURBOX_OPTIONS, apply_turbox_options


@RUNNERS.register_module()
class TurboxRunner(Runner):
    """An mmengine :class:`~mmengine.runner.Runner` that applies the config's ``turbox`` section.

    It validates the section against
    :data:`~turbox_mm.engine.runner.turbox_options.TURBOX_OPTIONS` (an unknown key or a wrong
    type fails at once, naming the key and the valid ones), rewrites the config accordingly and
    then builds and runs exactly as mmengine's runner does. Both mmengine-style launchers,
    ``tools/train.py`` here and mmdet3d's own, build it from ``runner_type``.

    Attributes:
        turbox_options (dict): The validated options, defaults filled in.
        turbox_changes (list[str]): What applying them changed in the config.

    Examples:
        >>> from mmengine.config import Config
        >>> cfg = Config.fromfile('configs/smoke/smoke_turbox.py')  # doctest: +SKIP
        >>> runner = TurboxRunner.from_cfg(cfg)  # doctest: +SKIP
        >>> runner.train()  # doctest: +SKIP
    """

    turbox_options: dict = {}
    turbox_changes: list = []

    @classmethod
    def from_cfg(cls, cfg: Config) -> 'TurboxRunner':
        """Build a runner from a config, applying its ``turbox`` section first.

        Args:
            cfg (Config | ConfigDict | dict): The full config, as for
                :meth:`mmengine.runner.Runner.from_cfg`.

        Returns:
            TurboxRunner: The runner.
        """
        cfg = copy.deepcopy(cfg)
        if not isinstance(cfg, Config):
            cfg = Config(dict(cfg) if isinstance(cfg, ConfigDict) else cfg)
        options = check_options(cfg.get('turbox'), TURBOX_OPTIONS)
        changes = apply_turbox_options(cfg, options)
        runner = super().from_cfg(cfg)
        runner.turbox_options = options
        runner.turbox_changes = changes
        if options['report']:
            summary = '\n'.join(f'  {line}' for line in changes) or '  (nothing to change)'
            print_log(f'turbox_mm: config changes\n{summary}', logger=runner.logger)
        return runner
