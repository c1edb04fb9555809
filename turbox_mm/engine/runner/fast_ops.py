"""``turbox.ops.fast``: modules with a stock/turbox op choice run turbox_mm's kernels.

A turbox_mm module whose constructor takes ``op_impl`` (``'stock'``, the default, runs the op
the stock config runs; ``'turbox'`` runs turbox_mm's kernel, e.g. the Triton deformable
aggregation) is switched to ``'turbox'`` wherever it appears in ``model``. Both produce the
same results within the tolerance their parity tests state; the model's maths is unchanged.

Configs written for mmdet3d alone are reached too: mmdet3d's ``Det3DDataPreprocessor`` with
hard or dynamic voxelization becomes ``turbox_mm.TurboxDet3DDataPreprocessor`` with
``op_impl='turbox'`` (the same arguments; the batch is voxelized in one call of turbox_mm's
voxelize ops, with the same voxels as mmcv's deterministic op), and mmdet3d's ``CenterHead``
becomes ``turbox_mm.TurboxCenterHead`` with ``op_impl='turbox'`` (its training targets built for
the batch on the GPU, the same tensors, instead of a Python loop over boxes). mmdet3d's NMS
functions are rebound to turbox_mm's kernels (:mod:`.fast_nms`, process-wide), and so is the
``DynamicScatter`` of its dynamic voxel encoders (:mod:`.fast_scatter`).
"""
import inspect
from typing import Any, Dict, List

from mmengine.config import Config

OP_IMPL = 'op_impl'
STOCK_PREPROCESSORS = ('Det3DDataPreprocessor', 'mmdet3d.Det3DDataPreprocessor')
# mmdet3d modules with a turbox twin that takes the same arguments plus op_impl; turbox_mm
# registers none of these names, so the plain name is mmdet3d's in any scope.
TWINS = {
    'CenterHead': 'turbox_mm.TurboxCenterHead',
    'mmdet3d.CenterHead': 'turbox_mm.TurboxCenterHead',
}


def _takes_op_impl(type_name: Any, default_scope: str) -> bool:
    if not isinstance(type_name, str):
        return False
    scope, _, name = type_name.rpartition('.')
    if scope != 'turbox_mm' and not (scope == '' and default_scope == 'turbox_mm'):
        return False
    from turbox_mm.registry import MODELS
    cls = MODELS.module_dict.get(name)
    if cls is None:
        import turbox_mm.models  # noqa: F401  (registers the models)
        cls = MODELS.module_dict.get(name)
    return cls is not None and accepts_op_impl(cls)


def accepts_op_impl(cls: type) -> bool:
    """Whether ``cls(op_impl=...)`` reaches a constructor that names ``op_impl``: its own
    ``__init__`` or, through ``**kwargs`` passed on, a base class's (``MapTRv2Head`` takes
    ``**kwargs`` for ``MapTRHead``'s arguments)."""
    for klass in cls.__mro__:
        init = klass.__dict__.get('__init__')
        if init is None:
            continue
        params = inspect.signature(init).parameters
        if OP_IMPL in params:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return False
    return False


def _is_mmdet3d_original(type_name: str, twin: str) -> bool:
    """Whether ``type_name`` still resolves to the mmdet3d class ``twin`` extends (a project
    may have registered its own class under the name; its override must not be lost)."""
    from mmdet3d.registry import MODELS as MMDET3D_MODELS

    import turbox_mm.models  # noqa: F401  (registers the twins)
    from turbox_mm.registry import MODELS
    twin_cls = MODELS.module_dict[twin.rpartition('.')[2]]
    return MMDET3D_MODELS.get(type_name.rpartition('.')[2]) in twin_cls.__bases__


def _set_op_impls(model: Dict, default_scope: str, changes: List[str]) -> None:
    from .turbox_options import config_dicts
    for path, node in config_dicts(model, 'model'):
        twin = TWINS.get(node['type']) if isinstance(node.get('type'), str) else None
        if twin is not None and _is_mmdet3d_original(node['type'], twin):
            changes.append(f"{path} = {twin}(op_impl='turbox') (was {node['type']})")
            node['type'], node[OP_IMPL] = twin, 'turbox'
        elif _takes_op_impl(node.get('type'), default_scope) and node.get(OP_IMPL) != 'turbox':
            node[OP_IMPL] = 'turbox'
            changes.append(f"{path}.op_impl = 'turbox' ({node['type']})")


def apply_fast_ops(cfg: Config, opts: Dict) -> List[str]:
    """Set ``op_impl='turbox'`` on every module of ``cfg.model`` that takes it, move mmdet3d
    modules with a turbox twin to it, and rebind mmdet3d's NMS calls (:mod:`.fast_nms`) and its
    voxel encoders' ``DynamicScatter`` (:mod:`.fast_scatter`).

    Args:
        cfg (Config): The full config.
        opts (dict): The validated ``turbox.ops`` options.

    Returns:
        list[str]: One line per change.
    """
    changes: List[str] = []
    if opts['fast'] and isinstance(cfg.get('model'), dict):
        changes += _rewrite_voxel_preprocessor(cfg['model'])
        _set_op_impls(cfg['model'], cfg.get('default_scope') or '', changes)
        from . import fast_nms, fast_scatter
        changes += fast_nms.install()
        changes += fast_scatter.install()
    return changes


def _rewrite_voxel_preprocessor(model: Dict) -> List[str]:
    """mmdet3d's voxelizing ``Det3DDataPreprocessor`` -> turbox_mm's, ``op_impl='turbox'``."""
    pre = model.get('data_preprocessor')
    if not isinstance(pre, dict) or not pre.get('voxel'):
        return []
    from turbox_mm.models.data_preprocessors.fast_voxelize import FAST_VOXEL_TYPES

    # turbox_mm registers no 'Det3DDataPreprocessor': the plain name is mmdet3d's in any scope.
    if pre.get('type') not in STOCK_PREPROCESSORS or \
            pre.get('voxel_type', 'hard') not in FAST_VOXEL_TYPES:
        return []
    pre['type'] = 'turbox_mm.TurboxDet3DDataPreprocessor'
    pre[OP_IMPL] = 'turbox'
    return [f"model.data_preprocessor = turbox_mm.TurboxDet3DDataPreprocessor(op_impl='turbox'): "
            f"{pre.get('voxel_type', 'hard')} voxelization of the batch in one call"]
