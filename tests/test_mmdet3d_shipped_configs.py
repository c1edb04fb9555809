"""Every config mmdet3d ships (inside the installed package) takes the turbox section: the
options apply to the config, and its model, built as TurboxRunner builds it (the config as
rewritten, then turbox's fast-model changes), has the stock model's parameters and buffers,
name for name and shape for shape, so checkpoints stay interchangeable.

A config that mmdet3d itself cannot load or build here (an optional library missing, the
nuImages configs' ``pretrained`` argument that mmdet 3 no longer takes) is left out, named in
the skip count; turbox must not add a failure of its own."""
import glob
import logging
import os.path as osp
import warnings

import pytest

mmdet3d = pytest.importorskip('mmdet3d')

from mmengine.config import Config  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402

from turbox_mm.engine.runner.fast_model import apply_fast_model  # noqa: E402
from turbox_mm.engine.runner.turbox_options import (TURBOX_OPTIONS,  # noqa: E402
                                                    apply_turbox_options)
from turbox_mm.registry import MODELS  # noqa: E402
from turbox_mm.utils.options import check_options  # noqa: E402

ROOT = osp.join(osp.dirname(mmdet3d.__file__), '.mim', 'configs')


def _shipped():
    return sorted(p for p in glob.glob(osp.join(ROOT, '**', '*.py'), recursive=True)
                  if '_base_' not in p.split(osp.sep))


def _build(cfg):
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope') or 'mmdet3d'):
        return MODELS.build(cfg.model)


def _layout(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_every_shipped_config_takes_the_turbox_section():
    from mmdet3d.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    paths = _shipped()
    assert len(paths) > 100, f'expected mmdet3d to ship its configs under {ROOT}'
    failures, skipped, checked = [], [], 0
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            for path in paths:
                name = osp.relpath(path, ROOT)
                try:
                    stock = _build(Config.fromfile(path))
                except Exception as error:  # mmdet3d's own failure here: not ours to test
                    skipped.append(f'{name}: {type(error).__name__}: {error}')
                    continue
                try:
                    cfg = Config.fromfile(path)
                    cfg.turbox = {}
                    apply_turbox_options(cfg, check_options(cfg.turbox, TURBOX_OPTIONS))
                    model = _build(cfg)
                    apply_fast_model(model)
                except Exception as error:
                    failures.append(f'{name}: {type(error).__name__}: {error}')
                    continue
                if _layout(model) != _layout(stock):
                    only = set(_layout(model)) ^ set(_layout(stock))
                    failures.append(f'{name}: state_dict differs from stock ({sorted(only)[:5]})')
                checked += 1
                del stock, model
    finally:
        logging.disable(logging.NOTSET)
    assert not failures, '\n'.join(failures)
    # the configs this environment builds: all but the optional-library and nuImages ones
    # (108 with the project's setup); the stock builds fail only for those known reasons
    assert checked >= 108, (checked, skipped)
    known = ("unexpected keyword argument 'pretrained'", 'MinkowskiEngine', 'Minkowski Engine',
             'Torchsparse', 'No such file or directory')
    assert all(any(k in s for k in known) for s in skipped), skipped
