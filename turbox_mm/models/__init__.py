"""Models: one folder a model, plus layers and data preprocessors shared across models."""
from . import bevfusion, data_preprocessors, dense_heads, layers, losses, sparse4d  # noqa: F401
from . import maptr, sparsedrive  # noqa: F401
