"""turbox_mm: a training and inference accelerator for OpenMMLab autonomous-driving models.

Importing the package (directly or through ``custom_imports=dict(imports=['turbox_mm'])``)
registers every turbox component in the ``turbox_mm`` scope and applies the compatibility
fixes of :mod:`turbox_mm.utils.compat`. It needs no GPU.
"""
from .utils import compat as _compat
from .version import __version__

_compat.apply()

from . import registry  # noqa: E402
from . import datasets, engine, evaluation, models, ops, testing  # noqa: E402,F401

__all__ = ['__version__', 'registry']
