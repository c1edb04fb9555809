"""Process-wide rebinding of names in mmdet3d's modules, undoable (``turbox.ops.fast``).

mmdet3d calls some ops as module-level names (its NMS functions, mmcv's ``DynamicScatter``
class) that no config can reach. :class:`Rebindings` replaces such a name in the module that
uses it and remembers the original, so that :meth:`Rebindings.uninstall` restores it.
"""
import importlib
from typing import Any, Callable, Dict, List, Tuple

#: ``(module name, attribute, factory)``: the factory takes the original, returns the
#: replacement.
Target = Tuple[str, str, Callable[[Any], Any]]


class Rebindings:
    """The rebindings of one ``ops.fast`` feature.

    Args:
        label (str): What the replacements are, for the report lines.
        targets (callable): Returns the :data:`Target` list available here; may raise
            ``ImportError`` (mmdet3d or mmcv missing: nothing to rebind).
    """

    def __init__(self, label: str, targets: Callable[[], List[Target]]) -> None:
        self.label = label
        self.targets = targets
        self._originals: Dict[Tuple[str, str], Any] = {}

    def install(self) -> List[str]:
        """Rebind every target not rebound yet; one report line per rebinding (empty when
        mmdet3d is not importable or all is installed)."""
        try:
            targets = self.targets()
        except ImportError:
            return []
        changes = []
        for module_name, attr, factory in targets:
            if (module_name, attr) in self._originals:
                continue
            module = importlib.import_module(module_name)
            original = getattr(module, attr)
            self._originals[(module_name, attr)] = original
            setattr(module, attr, factory(original))
            changes.append(f'{module_name}.{attr} = {self.label} (process-wide)')
        return changes

    def uninstall(self) -> None:
        """Restore every original :meth:`install` replaced."""
        for (module_name, attr), original in list(self._originals.items()):
            setattr(importlib.import_module(module_name), attr, original)
            del self._originals[(module_name, attr)]

    def installed(self) -> List[str]:
        """``module.attribute`` of every rebinding in place."""
        return [f'{m}.{a}' for m, a in self._originals]
