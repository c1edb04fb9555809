"""Data transforms: turbox twins of the stock loading and augmentation transforms."""
from .pack_jpeg_bytes import PackJpegBytes, pack_jpeg_bytes

__all__ = ['PackJpegBytes', 'pack_jpeg_bytes']
