"""Registries of turbox_mm.

Every registry here is a child of mmdet3d's registry of the same kind (itself a child of
mmengine's root), under the scope ``turbox_mm``. Inside the ``turbox_mm`` scope a plain name
therefore falls back to mmdet3d's and then mmengine's components, exactly as mmdet3d's own
registries fall back to mmengine's.

mmengine only finds a scoped name such as ``'turbox_mm.GCHook'`` from another scope when that
scope is a direct child of the root registry or of the registry doing the lookup. So that
``type='turbox_mm.Foo'`` works from an mmdet3d config, an mmdet config and a bare mmengine
config alike, each registry is also linked under mmengine's root.

Modules are located lazily: naming ``type='turbox_mm.Foo'`` in a config makes mmengine import
this module and then the ``locations`` of the registry that holds ``Foo``.

A name that is not registered in the ``turbox_mm`` scope raises a :class:`KeyError` that names
it and lists the valid names, instead of mmengine's generic message.
"""
import difflib
from typing import Optional, Type

from mmdet3d import registry as mmdet3d_registry
from mmengine.registry import FUNCTIONS as MMENGINE_FUNCTIONS
from mmengine.registry import Registry

SCOPE = 'turbox_mm'


class TurboxRegistry(Registry):
    """A registry whose misses name the key and list the valid names.

    Behaves as :class:`mmengine.registry.Registry`, except that looking up an unregistered
    name in this scope raises instead of returning ``None``.
    """

    def get(self, key: str) -> Optional[Type]:
        """Return the class or function registered as ``key``.

        Args:
            key (str): A name, optionally prefixed by a scope (``'turbox_mm.Foo'``).

        Returns:
            type or None: The registered object. ``None`` only for keys of another scope,
            so that mmengine's own fallbacks keep working.

        Raises:
            KeyError: ``key`` belongs to this scope (or has none) and is found neither here
                nor in a parent registry. The message lists this registry's names.
        """
        obj = super().get(key)
        if obj is not None:
            return obj
        scope, name = Registry.split_scope_key(key)
        if scope not in (None, self.scope):
            return None
        raise KeyError(unknown_name_message(name, self))


def unknown_name_message(name: str, registry: Registry) -> str:
    """Build the error message for an unregistered ``name``.

    Args:
        name (str): The name that was looked up, without scope.
        registry (Registry): The registry that was searched.

    Returns:
        str: A message naming ``name`` and the registry's valid names, with the closest
        matches first when there are any.
    """
    valid = sorted(registry.module_dict)
    msg = f"'{name}' is not registered in {registry.scope}'s {registry.name} registry"
    close = difflib.get_close_matches(name, valid, n=3)
    if close:
        msg += f"; did you mean {', '.join(repr(c) for c in close)}?"
    listed = ', '.join(valid) if valid else '(none yet)'
    return f'{msg} Valid {registry.name} names: {listed}.'


def _child(parent: Registry, name: str, locations: list) -> TurboxRegistry:
    registry = TurboxRegistry(name, parent=parent, scope=SCOPE, locations=locations)
    root = parent._get_root_registry()
    if root is not parent and SCOPE not in root._children:
        root._children[SCOPE] = registry
    return registry


# Runners and loops.
RUNNERS = _child(mmdet3d_registry.RUNNERS, 'runner', ['turbox_mm.engine.runner'])
RUNNER_CONSTRUCTORS = _child(mmdet3d_registry.RUNNER_CONSTRUCTORS, 'runner constructor',
                             ['turbox_mm.engine.runner'])
LOOPS = _child(mmdet3d_registry.LOOPS, 'loop', ['turbox_mm.engine.loops'])
HOOKS = _child(mmdet3d_registry.HOOKS, 'hook', ['turbox_mm.engine.hooks'])

# Data.
DATASETS = _child(mmdet3d_registry.DATASETS, 'dataset',
                  ['turbox_mm.datasets', 'turbox_mm.testing'])
DATA_SAMPLERS = _child(mmdet3d_registry.DATA_SAMPLERS, 'data sampler',
                       ['turbox_mm.datasets.samplers'])
TRANSFORMS = _child(mmdet3d_registry.TRANSFORMS, 'transform',
                    ['turbox_mm.datasets.transforms'])

# Models.
MODELS = _child(mmdet3d_registry.MODELS, 'model',
                ['turbox_mm.models', 'turbox_mm.engine.hooks', 'turbox_mm.testing'])
MODEL_WRAPPERS = _child(mmdet3d_registry.MODEL_WRAPPERS, 'model_wrapper', ['turbox_mm.models'])
WEIGHT_INITIALIZERS = _child(mmdet3d_registry.WEIGHT_INITIALIZERS, 'weight initializer',
                             ['turbox_mm.models'])
TASK_UTILS = _child(mmdet3d_registry.TASK_UTILS, 'task util', ['turbox_mm.models'])

# Optimisation.
OPTIMIZERS = _child(mmdet3d_registry.OPTIMIZERS, 'optimizer', ['turbox_mm.engine.optim'])
OPTIM_WRAPPERS = _child(mmdet3d_registry.OPTIM_WRAPPERS, 'optim_wrapper',
                        ['turbox_mm.engine.optim'])
OPTIM_WRAPPER_CONSTRUCTORS = _child(mmdet3d_registry.OPTIM_WRAPPER_CONSTRUCTORS,
                                    'optimizer wrapper constructor', ['turbox_mm.engine.optim'])
PARAM_SCHEDULERS = _child(mmdet3d_registry.PARAM_SCHEDULERS, 'parameter scheduler',
                          ['turbox_mm.engine.optim'])

# Evaluation and logging.
METRICS = _child(mmdet3d_registry.METRICS, 'metric', ['turbox_mm.evaluation', 'turbox_mm.testing'])
EVALUATOR = _child(mmdet3d_registry.EVALUATOR, 'evaluator', ['turbox_mm.evaluation'])
LOG_PROCESSORS = _child(mmdet3d_registry.LOG_PROCESSORS, 'log_processor',
                        ['turbox_mm.engine.runner'])

# Functions (collate functions and the like): mmdet3d has none of its own.
FUNCTIONS = _child(MMENGINE_FUNCTIONS, 'function',
                   ['turbox_mm.datasets', 'turbox_mm.utils.affinity'])
