"""Configs of the BEV encoder's parts with upstream's plain type names, made buildable.

MapTR's configs name the encoder's parts without a scope (``type='BEVFormerLayer'``,
``'TemporalSelfAttention'``, ``'LearnedPositionalEncoding'``). Under mmdet3d's default scope
mmengine would look such a name up in mmdet3d's registry and miss it, so the encoder scopes
the names itself before building: a name registered in ``turbox_mm`` gets ``turbox_mm.``, one
registered in mmdet gets ``mmdet.``, anything else is left as written.
"""
import copy
from typing import Optional

from mmdet.registry import MODELS as MMDET_MODELS
from torch import nn

from turbox_mm.registry import MODELS


def scoped_cfg(cfg: Optional[dict], default_type: str) -> dict:
    """A deep copy of ``cfg`` (``{}`` if None) whose ``type`` names its scope (module
    docstring); ``default_type`` where it has none.

    Examples:
        >>> scoped_cfg(dict(type='LearnedPositionalEncoding', num_feats=8), 'x')['type']
        'mmdet.LearnedPositionalEncoding'
    """
    cfg = copy.deepcopy(cfg) if cfg is not None else {}
    name = cfg.setdefault('type', default_type)
    if isinstance(name, str) and '.' not in name:
        if name in MODELS.module_dict:
            cfg['type'] = f'turbox_mm.{name}'
        elif name in MMDET_MODELS.module_dict:
            cfg['type'] = f'mmdet.{name}'
    return cfg


def build_scoped(cfg: Optional[dict], default_type: str) -> nn.Module:
    """Build :func:`scoped_cfg` ``(cfg, default_type)`` from turbox_mm's registry."""
    return MODELS.build(scoped_cfg(cfg, default_type))
