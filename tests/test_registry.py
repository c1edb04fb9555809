"""The turbox_mm registries: scope, parents, lookups from other scopes, and their errors."""
import pytest
from mmdet3d import registry as mmdet3d_registry
from mmdet.registry import HOOKS as MMDET_HOOKS
from mmdet.registry import MODELS as MMDET_MODELS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import RUNNERS as MMENGINE_RUNNERS
from mmengine.registry import DefaultScope

import turbox_mm
from turbox_mm import registry
from turbox_mm.testing import SmokeModel

ALL = [
    'RUNNERS', 'RUNNER_CONSTRUCTORS', 'LOOPS', 'HOOKS', 'DATASETS', 'DATA_SAMPLERS',
    'TRANSFORMS', 'MODELS', 'MODEL_WRAPPERS', 'WEIGHT_INITIALIZERS', 'TASK_UTILS', 'OPTIMIZERS',
    'OPTIM_WRAPPERS', 'OPTIM_WRAPPER_CONSTRUCTORS', 'PARAM_SCHEDULERS', 'METRICS',
    'LOG_PROCESSORS'
]


@pytest.mark.parametrize('name', ALL)
def test_child_of_mmdet3d_and_linked_under_root(name):
    reg = getattr(registry, name)
    assert reg.scope == 'turbox_mm'
    assert reg.parent is getattr(mmdet3d_registry, name)
    root = reg._get_root_registry()
    assert root.scope == 'mmengine'
    assert root._children['turbox_mm'] is reg


def test_functions_registry_is_child_of_mmengine():
    assert registry.FUNCTIONS.scope == 'turbox_mm'
    assert registry.FUNCTIONS.parent.scope == 'mmengine'


@pytest.mark.parametrize('lookup', [
    mmdet3d_registry.MODELS,  # parent
    MMDET_MODELS,  # a sibling scope
    MMENGINE_MODELS,  # the root
])
def test_scoped_name_found_from_every_scope(lookup):
    assert lookup.get('turbox_mm.SmokeModel') is SmokeModel


def test_runner_found_from_root_and_mmdet():
    runner = registry.RUNNERS.get('TurboxRunner')
    assert MMENGINE_RUNNERS.get('turbox_mm.TurboxRunner') is runner
    assert mmdet3d_registry.RUNNERS.get('turbox_mm.TurboxRunner') is runner


def test_plain_names_fall_back_to_mmdet3d_and_mmengine():
    # Inside the turbox_mm scope, mmdet3d's and mmengine's components stay reachable.
    assert registry.MODELS.get('PointPillarsScatter') is \
        mmdet3d_registry.MODELS.get('PointPillarsScatter')
    assert registry.HOOKS.get('CheckpointHook').__name__ == 'CheckpointHook'


def test_build_in_turbox_scope():
    with DefaultScope.overwrite_default_scope('turbox_mm'):
        model = MMENGINE_MODELS.build(dict(type='SmokeModel', channels=4))
    assert isinstance(model, SmokeModel)


def test_unknown_name_lists_valid_names():
    with pytest.raises(KeyError) as err:
        registry.MODELS.get('SmokeModle')
    msg = str(err.value)
    assert "'SmokeModle'" in msg
    assert "did you mean 'SmokeModel'" in msg
    assert 'Valid model names:' in msg and 'SmokeModel' in msg


def test_unknown_scoped_name_from_other_scope_lists_valid_names():
    with pytest.raises(KeyError, match=r"'NoSuchRunner'.*Valid runner names: TurboxRunner"):
        MMDET_HOOKS.build  # noqa: B018 (the registry exists)
        MMENGINE_RUNNERS.get('turbox_mm.NoSuchRunner')


def test_other_scopes_keep_returning_none():
    # Keys of another scope are not ours to reject: mmengine's fallbacks must keep working.
    assert registry.MODELS.get('mmdet.NoSuchModel') is None


def test_version():
    assert isinstance(turbox_mm.__version__, str) and turbox_mm.__version__.count('.') == 2
