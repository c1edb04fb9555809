"""``turbox.ops.fast`` for dynamic voxel encoders: mmcv's ``DynamicScatter`` -> turbox_mm's.

mmdet3d 1.4's dynamic voxel encoders (``DynamicSimpleVFE``, ``DynamicVFE`` and ``SegVFE`` in
``voxel_encoder``, ``DynamicPillarFeatureNet`` in ``pillar_encoder``) build mmcv's
``DynamicScatter`` by the name they imported, inside their constructors, so no config key
reaches it. With ``ops.fast`` the runner rebinds that name, before the model is built, to
:class:`turbox_mm.models.layers.TurboxDynamicScatter`: the same arguments and results, one call
per batch instead of mmcv's per-sample loop, Triton kernels on CUDA, and a CPU path (mmcv has
none). The rebinding is process-wide; :func:`uninstall` restores mmcv's class.
"""
import importlib
from typing import List

from .rebind import Rebindings, Target

_USERS = ('mmdet3d.models.voxel_encoders.voxel_encoder',
          'mmdet3d.models.voxel_encoders.pillar_encoder')


def _targets() -> List[Target]:
    import mmcv.ops

    from turbox_mm.models.layers import TurboxDynamicScatter
    targets = []
    for name in _USERS:
        module = importlib.import_module(name)
        if getattr(module, 'DynamicScatter', None) is mmcv.ops.DynamicScatter:
            targets.append((name, 'DynamicScatter', lambda _: TurboxDynamicScatter))
    return targets


_REBINDINGS = Rebindings('turbox_mm.TurboxDynamicScatter', _targets)
#: Rebind mmdet3d's ``DynamicScatter``; returns one line per rebinding (none twice).
install = _REBINDINGS.install
#: Restore mmcv's ``DynamicScatter`` where :func:`install` replaced it.
uninstall = _REBINDINGS.uninstall
#: ``module.attribute`` of every rebinding in place.
installed = _REBINDINGS.installed
