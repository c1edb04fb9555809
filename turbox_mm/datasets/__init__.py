"""Datasets, samplers and transforms."""
from . import samplers, transforms  # noqa: F401
