"""``turbox.data.point_loaders``: mmdet3d's lidar loaders become their turbox twins.

============================================  ==================================================
stock (mmdet3d 1.4)                           turbox
============================================  ==================================================
``LoadPointsFromFile``                        ``turbox_mm.LoadPointsFromFileChecked`` (the same
                                              points; a missing or cut file names itself)
``LoadPointsFromMultiSweeps``                 ``turbox_mm.LoadPointsFromMultiSweepsFast`` (the
                                              same points and random sweep choice, read into
                                              one preallocated buffer; files named on error)
============================================  ==================================================

Every pipeline of the train, val and test loaders is rewritten, wherever the transform config
sits (dataset wrappers, GT-paste's ``db_sampler.points_loader``). A name that a project has
registered for its own class (so that it no longer resolves to mmdet3d's) is left alone.
"""
from typing import Dict, List

from mmengine.config import Config

from .turbox_options import dataset_type_nodes

TWINS = {
    'LoadPointsFromFile': 'turbox_mm.LoadPointsFromFileChecked',
    'LoadPointsFromMultiSweeps': 'turbox_mm.LoadPointsFromMultiSweepsFast',
}


def _is_mmdet3d_original(name: str) -> bool:
    import mmdet3d.datasets.transforms as mmdet3d_transforms
    from mmdet3d.registry import TRANSFORMS
    return TRANSFORMS.get(name) is getattr(mmdet3d_transforms, name, None)


def apply_point_loaders(cfg: Config, opts: Dict) -> List[str]:
    """Swap mmdet3d's point loaders for their twins in every loader of ``cfg``.

    Args:
        cfg (Config): The full config.
        opts (dict): The validated ``turbox.data`` options (``point_loaders``).

    Returns:
        list[str]: One line per change.
    """
    if not opts['point_loaders']:
        return []
    try:
        import mmdet3d.datasets.transforms  # noqa: F401
    except ImportError:  # no mmdet3d: no mmdet3d loaders to swap
        return []
    changes: List[str] = []
    for path, node, scope, name in dataset_type_nodes(cfg):
        if scope in ('', 'mmdet3d') and name in TWINS and _is_mmdet3d_original(name):
            type_name = node['type']
            node['type'] = TWINS[name]
            changes.append(f'{path} = {TWINS[name]} (was {type_name})')
    return changes
