"""``turbox.data.fast_pipeline``: MapTR's map ground truth read precomputed where the infos
carry it.

==============================================  ================================================
stock                                           turbox
==============================================  ================================================
``turbox_mm.LoadMapGT(impl='reference')``       ``turbox_mm.LoadMapGT(impl='precomputed',
(upstream's shapely ``VectorizedLocalMap``,     fallback='reference')``: the polylines the
every sample cut online: MapTR v1)              map-gt step stored in the sample's
                                                ``map_annotation``, which are the reference's,
                                                so the same outputs bit for bit; a sample
                                                without them is cut with the reference (a
                                                warning names it and the command)
==============================================  ================================================

Upstream's MapTR v1 cuts its map ground truth online per sample, so the stock v1 configs keep
``impl='reference'``; its turbox twin reads what ``tools/create_data.py map-gt`` stored, and
runs as the stock config where the infos lack it. ``impl='precomputed'`` (v2's stock configs,
as upstream's v2) and ``impl='fast'`` are left as they are. Every ``LoadMapGT`` of the train,
val and test loaders is visited, wherever it sits (dataset wrappers included); a config dict
shared by several pipelines is rewritten (and reported) once.
"""
from typing import Dict, List

from mmengine.config import Config

from .turbox_options import dataset_type_nodes

TRANSFORM = 'LoadMapGT'


def apply_precomputed_map_gt(cfg: Config, opts: Dict) -> List[str]:
    """Switch every ``LoadMapGT(impl='reference')`` of ``cfg`` to the precomputed polylines
    with the reference as fallback.

    Args:
        cfg (Config): The full config.
        opts (dict): The validated ``turbox.data`` options (``fast_pipeline``).

    Returns:
        list[str]: One line per change.
    """
    if not opts['fast_pipeline']:
        return []
    changes: List[str] = []
    for path, node, scope, name in dataset_type_nodes(cfg):
        if scope not in ('', 'turbox_mm') or name != TRANSFORM:
            continue
        if node.get('impl', 'fast') != 'reference':
            continue
        node['impl'] = 'precomputed'
        node['fallback'] = 'reference'
        changes.append(f"{path}: {node['type']}(impl='reference') -> impl='precomputed', "
                       "fallback='reference' (the polylines tools/create_data.py map-gt "
                       'stored, the same as the reference\'s; samples without them cut '
                       'with the reference, warned)')
    return changes
