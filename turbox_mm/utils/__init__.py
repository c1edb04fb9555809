"""Utilities shared across turbox_mm."""
from .compat import allow_mmengine_checkpoint_types, register_config_package
from .options import check_options

__all__ = ['allow_mmengine_checkpoint_types', 'register_config_package', 'check_options']
