"""Data transforms: turbox twins of the stock loading and augmentation transforms.

``ResizeCropFlipImage`` is the stock one (Sparse4D's, ported as the reference);
``MultiViewAffineAug`` is its turbox twin.
"""
from .load_multiview_images import LoadMultiViewImagesTurbo
from .load_points_fast import LoadPointsFromMultiSweepsFast
from .multiview_affine_aug import MultiViewAffineAug
from .pack_jpeg_bytes import PackJpegBytes, pack_jpeg_bytes
from .resize_crop_flip_image import ResizeCropFlipImage

__all__ = ['LoadMultiViewImagesTurbo', 'LoadPointsFromMultiSweepsFast', 'MultiViewAffineAug',
           'PackJpegBytes', 'pack_jpeg_bytes', 'ResizeCropFlipImage']
