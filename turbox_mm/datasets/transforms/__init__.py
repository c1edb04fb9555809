"""Data transforms: turbox twins of the stock loading and augmentation transforms, and the
Sparse4D pipeline's own transforms.

``ResizeCropFlipImage`` is the stock one (Sparse4D's, ported as the reference);
``MultiViewAffineAug`` is its turbox twin.
"""
from .bbox_rotation import BBoxRotation
from .bev_load_multiview_images import BEVLoadMultiViewImageFromFiles
from .bev_load_multiview_images_turbo import BEVLoadMultiViewImagesTurbo
from .bevfusion_global_rot_scale_trans import BEVFusionGlobalRotScaleTrans
from .bevfusion_random_flip_3d import BEVFusionRandomFlip3D
from .circle_object_range_filter import CircleObjectRangeFilter
from .grid_mask import GridMask
from .image_aug_3d import ImageAug3D
from .image_aug_3d_turbo import ImageAug3DTurbo
from .instance_name_filter import InstanceNameFilter
from .load_map_gt import LoadMapGT
from .load_multiview_images import LoadMultiViewImagesTurbo
from .load_scaled_multiview_images_turbo import (LoadScaledMultiViewImagesTurbo,
                                                 exact_decode_factor)
from .load_points_checked import LoadPointsFromFileChecked
from .load_points_fast import LoadPointsFromMultiSweepsFast
from .maptr_adaptor import NuScenesMapTRAdaptor
from .multi_scale_depth_map import MultiScaleDepthMapGenerator
from .multiview_affine_aug import MultiViewAffineAug
from .normalize_multiview_image import NormalizeMultiviewImage
from .pack_maptr_inputs import MAPTR_META_KEYS, PackMapTRInputs
from .pad_multiview_image import PadMultiViewImage
from .pad_multiview_image_depth import PadMultiViewImageDepth
from .pack_jpeg_bytes import PackJpegBytes, pack_jpeg_bytes
from .photometric_multiview import PhotoMetricDistortionMultiViewImage
from .point_to_multiview_depth import PointToMultiViewDepth, multiview_depth_maps
from .random_scale_multiview_image import RandomScaleImageMultiViewImage
from .rasterize_map_gt import RasterizeMapGT
from .resize_crop_flip_image import ResizeCropFlipImage
from .sparse4d_adaptor import SPARSE4D_META_KEYS, NuScenesSparse4DAdaptor

from .sparsedrive_adaptor import SPARSEDRIVE_META_KEYS, NuScenesSparseDriveAdaptor
from .vectorize_map import VectorizeMap

__all__ = [
    'BBoxRotation', 'BEVFusionGlobalRotScaleTrans', 'BEVFusionRandomFlip3D',
    'BEVLoadMultiViewImageFromFiles', 'BEVLoadMultiViewImagesTurbo', 'ImageAug3DTurbo',
    'CircleObjectRangeFilter', 'GridMask', 'ImageAug3D', 'InstanceNameFilter',
    'LoadMapGT',
    'LoadMultiViewImagesTurbo', 'LoadScaledMultiViewImagesTurbo', 'exact_decode_factor',
    'LoadPointsFromFileChecked', 'LoadPointsFromMultiSweepsFast',
    'MultiScaleDepthMapGenerator', 'MultiViewAffineAug', 'NormalizeMultiviewImage',
    'PackJpegBytes', 'pack_jpeg_bytes', 'PhotoMetricDistortionMultiViewImage',
    'ResizeCropFlipImage', 'SPARSE4D_META_KEYS', 'NuScenesSparse4DAdaptor',
    'MAPTR_META_KEYS', 'NuScenesMapTRAdaptor', 'PackMapTRInputs', 'PadMultiViewImage',
    'RandomScaleImageMultiViewImage', 'PadMultiViewImageDepth', 'PointToMultiViewDepth',
    'multiview_depth_maps', 'RasterizeMapGT', 'SPARSEDRIVE_META_KEYS',
    'NuScenesSparseDriveAdaptor', 'VectorizeMap'
]
