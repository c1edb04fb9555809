"""Every config under configs/ loads, and every `type=` in it resolves to a component."""
import glob
import os.path as osp

import pytest
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.registry import root as mmengine_root

import mmdet3d.engine  # noqa: F401  (hooks and visualizers register on import, as a runner's
import mmdet3d.evaluation  # noqa: F401  build imports them: metrics too)
import mmdet3d.visualization  # noqa: F401
import turbox_mm  # noqa: F401
from conftest import ROOT

CONFIGS = sorted(
    osp.relpath(p, ROOT) for p in glob.glob(osp.join(ROOT, 'configs', '**', '*.py'),
                                            recursive=True))
ROOT_REGISTRIES = [
    getattr(mmengine_root, name) for name in dir(mmengine_root)
    if name.isupper() and hasattr(getattr(mmengine_root, name), '_module_dict')
]


def resolve(type_name: str, scope: str):
    """Find ``type_name`` as mmengine would, from the registries of ``scope``."""
    for root in ROOT_REGISTRIES:
        registry = root._search_child(scope) or root
        try:
            obj = registry.get(type_name)
        except (KeyError, ImportError):  # not this root's, or its scope has no such module
            continue
        if obj is not None:
            return obj
    return None


def collect_types(node, scope, path='cfg'):
    """Yield ``(path, type name, scope)`` for every ``type=`` string in a config tree."""
    if isinstance(node, dict):
        scope = node.get('_scope_', scope)
        if isinstance(node.get('type'), str):
            yield path, node['type'], scope
        for key, value in node.items():
            yield from collect_types(value, scope, f'{path}.{key}')
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from collect_types(value, scope, f'{path}[{i}]')


def test_configs_exist():
    assert 'configs/_base_/turbox.py' in CONFIGS
    assert 'configs/smoke/smoke_stock.py' in CONFIGS


@pytest.mark.parametrize('path', CONFIGS)
def test_config_loads_and_types_resolve(path):
    cfg = Config.fromfile(osp.join(ROOT, path))
    scope = cfg.get('default_scope', 'mmdet3d')
    tree = cfg.to_dict()
    missing = []
    with DefaultScope.overwrite_default_scope(scope):
        for where, name, sub_scope in collect_types(tree, scope):
            if resolve(name, sub_scope) is None:
                missing.append(f'{where}: {name} (scope {sub_scope})')
        if 'runner_type' in cfg and resolve(cfg.runner_type, scope) is None:
            missing.append(f'runner_type: {cfg.runner_type}')
    assert not missing, f'{path}: unresolved types:\n' + '\n'.join(missing)


def test_resolver_catches_a_bad_type():
    tree = dict(model=dict(type='turbox_mm.NoSuchModel'), hooks=[dict(type='NoSuchHook')])
    found = [(w, n) for w, n, s in collect_types(tree, 'mmdet3d') if resolve(n, s) is None]
    assert found == [('cfg.model', 'turbox_mm.NoSuchModel'), ('cfg.hooks[0]', 'NoSuchHook')]


def test_turbox_twin_only_adds_turbox_keys():
    stock = Config.fromfile(osp.join(ROOT, 'configs/smoke/smoke_stock.py')).to_dict()
    turbox = Config.fromfile(osp.join(ROOT, 'configs/smoke/smoke_turbox.py')).to_dict()
    assert set(turbox) - set(stock) == {'runner_type', 'turbox'}
    for key in stock:
        assert turbox[key] == stock[key], key


def _lists(node):
    """Tuples as lists and no ``_scope_='mmdet3d'``, which inheriting a package's config adds."""
    if isinstance(node, dict):
        return {k: _lists(v) for k, v in node.items() if (k, v) != ('_scope_', 'mmdet3d')}
    if isinstance(node, (list, tuple)):
        return [_lists(v) for v in node]
    return node


MMDET3D_TWINS = sorted(p for p in CONFIGS if p.startswith('configs/mmdet3d/')
                       and p.endswith('_turbox.py'))


@pytest.mark.parametrize('path', MMDET3D_TWINS)
def test_mmdet3d_twins_are_the_shipped_config_plus_the_turbox_base(path):
    import mmdet3d
    stock_path = path.replace('_turbox.py', '_stock.py')
    stock = Config.fromfile(osp.join(ROOT, stock_path)).to_dict()
    turbox = Config.fromfile(osp.join(ROOT, path)).to_dict()
    name = osp.basename(stock_path)[:-len('_stock.py')] + '.py'
    shipped = glob.glob(osp.join(osp.dirname(mmdet3d.__file__), '.mim', 'configs', '*', name))
    assert len(shipped) == 1, name
    # the stock file changes nothing (inheritance adds scopes and makes lists, nothing else)
    assert _lists(stock) == _lists(Config.fromfile(shipped[0]).to_dict())
    assert set(turbox) - set(stock) == {'runner_type', 'turbox'}
    for key in stock:
        assert turbox[key] == stock[key], key


def test_mmdet3d_twins_cover_the_three_lidar_configs():
    assert len(MMDET3D_TWINS) == 3
