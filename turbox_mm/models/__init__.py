"""Models: one folder a model, plus layers shared across models."""
from . import layers  # noqa: F401
