"""``turbox.ops.fast`` reaches every turbox_mm module of our turbox configs that has an op
choice, including those that take ``op_impl`` through ``**kwargs`` (``MapTRv2Head``)."""
import os.path as osp

import pytest
from mmengine.config import Config

from conftest import ROOT, TURBOX_CONFIGS
from turbox_mm.engine.runner.fast_ops import accepts_op_impl, apply_fast_ops
from turbox_mm.engine.runner.turbox_options import config_dicts
from turbox_mm.registry import MODELS


def _turbox_mm_class(type_name, default_scope):
    if not isinstance(type_name, str):
        return None
    scope, _, name = type_name.rpartition('.')
    if scope == 'turbox_mm' or (scope == '' and default_scope == 'turbox_mm'):
        return MODELS.module_dict.get(name)
    return None


def test_a_subclass_taking_op_impl_through_kwargs_is_reached():
    class Base:
        def __init__(self, op_impl='stock'):
            self.op_impl = op_impl

    class Passes(Base):
        def __init__(self, extra=1, **kwargs):
            super().__init__(**kwargs)

    class Closes(Base):
        def __init__(self, extra=1):
            super().__init__()

    assert accepts_op_impl(Base) and accepts_op_impl(Passes)
    assert not accepts_op_impl(Closes) and not accepts_op_impl(dict)


@pytest.mark.parametrize('path', TURBOX_CONFIGS)
def test_every_module_with_an_op_choice_runs_turbox(path):
    cfg = Config.fromfile(osp.join(ROOT, path))
    apply_fast_ops(cfg, dict(fast=True))
    scope = cfg.get('default_scope') or ''
    missed = [f'{where} ({node["type"]})' for where, node in config_dicts(cfg.model, 'model')
              if (cls := _turbox_mm_class(node.get('type'), scope)) is not None
              and accepts_op_impl(cls) and node.get('op_impl') != 'turbox']
    assert not missed, f'{path}: still stock after ops.fast: {missed}'


def test_maptrv2_head_is_switched():
    cfg = Config.fromfile(osp.join(ROOT, 'configs/maptr/maptrv2_nusc_r50_24ep_turbox.py'))
    changes = apply_fast_ops(cfg, dict(fast=True))
    assert cfg.model.pts_bbox_head.op_impl == 'turbox', changes
