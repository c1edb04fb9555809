"""turbox_mm: a training and inference accelerator for OpenMMLab autonomous-driving models.

Importing the package registers every turbox component in the ``turbox_mm`` scope, applies
the compatibility fixes of :mod:`turbox_mm.utils.compat`, and gives mmcv's sparse convolution
layers a CPU path (:mod:`turbox_mm.ops.sparse_conv.cpu_path`; CUDA tensors are untouched).
It needs no GPU. A config needs no ``custom_imports`` for it: mmengine's ``Registry.get``
imports ``turbox_mm.registry``, and with it this package, the first time it looks up a
``turbox_mm.``-prefixed type (such as ``runner_type='turbox_mm.TurboxRunner'`` of
``configs/_base_/turbox.py``).
"""
from .utils import compat as _compat
from .version import __version__

_compat.apply()

from . import registry  # noqa: E402
from . import datasets, engine, evaluation, models, ops, testing  # noqa: E402,F401
from .ops.sparse_conv import cpu_path as _sparse_cpu_path  # noqa: E402

_sparse_cpu_path.install()

__all__ = ['__version__', 'registry']
