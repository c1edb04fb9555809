"""Fixes for what breaks when mmengine 0.10 meets current PyTorch and a turbox_mm install.

The fixes are applied once, when :mod:`turbox_mm` is imported: by hand (tools/train.py),
through ``custom_imports``, or by mmengine's registry on the first ``turbox_mm.``-prefixed type
it looks up (a config's ``runner_type``, before the runner exists).

1. **Resuming checkpoints under torch >= 2.6.** ``torch.load`` defaults to
   ``weights_only=True`` since torch 2.6, and mmengine 0.10 calls it without the argument. An
   mmengine checkpoint holds the message hub's :class:`~mmengine.logging.HistoryBuffer` objects,
   whose state is numpy arrays, so ``runner.resume`` fails with an ``UnpicklingError``. We never
   turn ``weights_only`` off: :func:`allow_mmengine_checkpoint_types` adds exactly the types
   that mmengine checkpoints hold to torch's allow-list. Numpy arrays are allowed under both
   their numpy 1 (``numpy.core``) and numpy 2 (``numpy._core``) pickle names, so a checkpoint
   written on one numpy major version loads on the other.

2. **``turbox_mm::`` config paths.** mmengine resolves ``package::path`` only for the packages
   in its ``MODULE2PACKAGE`` table, and finds the package's folder through its distribution's
   location, which is wrong for editable (PEP 660) installs. :func:`register_config_package`
   adds ``turbox_mm`` to the table and resolves its folder from the imported module.

3. **``np.long`` under numpy 1.24 to 1.26.** mmdet3d 1.4's ``DataBaseSampler.sample_all`` (the
   GT paste of ``ObjectSample``, in every nuScenes CenterPoint config) makes its labels with
   ``dtype=np.long``, which numpy removed in 1.24 and brought back in 2.0 as the C ``long``
   (mmdet3d issue 2821, fixed after 1.4.0 by PR 2872). :func:`define_numpy_long` defines it
   as numpy 2 does on Linux, ``np.int64``, where it is missing.
"""
import os.path as osp
import pickle
from typing import Any, List, Tuple

import numpy as np
import torch

_applied = False
# The statistics every HistoryBuffer registers on creation (mmengine 0.10).
_BUILTIN_STATISTICS = ('min', 'max', 'mean', 'current')


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """``getattr`` restricted to what mmengine checkpoints use it for.

    A :class:`~mmengine.logging.HistoryBuffer` pickles its ``statistics_methods`` table as
    ``getattr(HistoryBuffer, 'mean')`` and the like. Allowing the builtin ``getattr`` itself
    would let a checkpoint reach any attribute of any allowed object, so this stand-in resolves
    only the statistics methods registered on ``HistoryBuffer`` and refuses everything else.
    """
    from mmengine.logging import HistoryBuffer

    allowed = set(_BUILTIN_STATISTICS) | set(HistoryBuffer._statistics_methods)
    if obj is HistoryBuffer and name in allowed:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'turbox_mm allows getattr in weights_only checkpoints only for the statistics '
        f'methods of mmengine.logging.HistoryBuffer ({", ".join(sorted(allowed))}); the '
        f'checkpoint asks for getattr({getattr(obj, "__qualname__", type(obj).__name__)}, '
        f'{name!r})')


def mmengine_checkpoint_globals() -> List[Tuple[object, str]]:
    """List the non-tensor globals an mmengine checkpoint holds, with their pickle names.

    Found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on checkpoints that
    mmengine 0.10 writes (``tests/test_compat.py`` checks the list against a fresh one).

    Returns:
        list[tuple[object, str]]: ``(object, 'module.qualname')`` pairs in the form accepted by
        :func:`torch.serialization.add_safe_globals`.
    """
    from mmengine.logging import HistoryBuffer

    try:  # numpy >= 2
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray

    pairs: List[Tuple[object, str]] = [
        (HistoryBuffer, 'mmengine.logging.history_buffer.HistoryBuffer'),
        (_history_buffer_getattr, 'builtins.getattr'),
        (np.ndarray, 'numpy.ndarray'),
        (np.dtype, 'numpy.dtype'),
    ]
    # Arrays and numpy scalars are pickled through these two functions; their module is
    # numpy.core.multiarray under numpy 1 and numpy._core.multiarray under numpy 2.
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        pairs.append((multiarray._reconstruct, f'{module}._reconstruct'))
        pairs.append((multiarray.scalar, f'{module}.scalar'))
    # Unpickling a dtype BUILDs an instance of its class (numpy.dtypes.Float64DType, ...):
    # the plain numeric dtypes that logged values and counts take.
    for scalar_type in (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16,
                        np.int8, np.uint8, np.bool_):
        dtype_cls = type(np.dtype(scalar_type))
        if dtype_cls is not np.dtype:  # numpy < 1.25 has no per-dtype classes
            pairs.append((dtype_cls, f'numpy.dtypes.{dtype_cls.__name__}'))
    return pairs


def allow_mmengine_checkpoint_types() -> bool:
    """Let ``torch.load(weights_only=True)`` read mmengine checkpoints.

    Returns:
        bool: True if the types were added; False on a torch without
        ``torch.serialization.add_safe_globals`` (older than 2.4, where ``weights_only``
        defaults to False and nothing needs fixing).
    """
    add = getattr(torch.serialization, 'add_safe_globals', None)
    if add is None:
        return False
    add(mmengine_checkpoint_globals())
    return True


def register_config_package() -> None:
    """Make ``turbox_mm::<path>`` config paths resolve, in editable installs too."""
    import mmengine.config.config as config_module
    from mmengine.config.utils import MODULE2PACKAGE

    MODULE2PACKAGE.setdefault('turbox_mm', 'turbox_mm')
    original = config_module.get_installed_path
    if getattr(original, '_turbox_mm', False):
        return

    def get_installed_path(package: str) -> str:
        if package == 'turbox_mm':
            import turbox_mm
            return osp.dirname(osp.abspath(turbox_mm.__file__))
        return original(package)

    get_installed_path._turbox_mm = True
    config_module.get_installed_path = get_installed_path


def define_numpy_long() -> bool:
    """Define ``np.long`` (``np.int64``) where numpy lacks it (1.24 to 1.26).

    Returns:
        bool: True if it was defined here; False where numpy has it (before 1.24, or 2.x).
    """
    if 'long' in vars(np):  # not hasattr: numpy 1.2x warns on the look-up
        return False
    np.long = np.int64
    return True


def apply() -> None:
    """Apply every fix once; later calls do nothing."""
    global _applied
    if _applied:
        return
    allow_mmengine_checkpoint_types()
    register_config_package()
    define_numpy_long()
    _applied = True
