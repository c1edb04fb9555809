"""``PackMapTRInputs``: mmdet3d's ``Pack3DDetInputs`` with the map ground truth in
``gt_instances_3d`` (MapTR's head contract) and MapTR v2's dense targets as data-sample
fields."""
from typing import Sequence

import numpy as np
import torch
from mmdet3d.datasets.transforms import Pack3DDetInputs
from mmdet3d.datasets.transforms.formating import to_tensor

from turbox_mm.registry import TRANSFORMS

#: ``LoadMapGT``'s output -> the ``gt_instances_3d`` field ``MapTRHead`` reads.
MAP_GT_FIELDS = {'gt_map_labels': 'labels', 'gt_map_shifts': 'shifts',
                 'gt_map_bboxes': 'bboxes', 'gt_map_pts': 'pts'}
#: MapTR v2's dense targets -> (dtype, dimensions); each becomes the data-sample field of
#: its own name, what ``MapTRv2`` and ``MapTRv2Head`` read.
DENSE_GT_FIELDS = {'gt_depth': (torch.float32, 3), 'gt_map_bev_seg': (torch.uint8, 3),
                   'gt_map_pv_seg': (torch.uint8, 4)}
#: What MapTR's models read from the metainfo, upstream's ``CustomCollect3D`` meta keys in
#: mmdet3d 1.x's names, plus the temporal and map fields.
MAPTR_META_KEYS = ('img_path', 'ori_shape', 'img_shape', 'pad_shape', 'scale_factor',
                   'img_norm_cfg', 'lidar2img', 'cam2img', 'camera_intrinsics', 'camera2ego',
                   'img_aug_matrix', 'lidar2ego', 'lidar2global', 'ego2global', 'can_bus',
                   'sample_idx', 'token', 'scene_token', 'frame_idx', 'timestamp',
                   'map_location', 'box_type_3d', 'num_views')


@TRANSFORMS.register_module()
class PackMapTRInputs(Pack3DDetInputs):
    """Pack a MapTR sample: ``img`` into the inputs, the metainfo, and the map ground truth
    of :class:`~turbox_mm.datasets.transforms.LoadMapGT` into ``gt_instances_3d`` as
    :class:`~turbox_mm.models.maptr.MapTRHead` reads it:

    - ``gt_map_labels`` -> ``labels`` ``[G]`` int64;
    - ``gt_map_shifts`` -> ``shifts`` ``[G, O, P, 2]`` float32 (padding orders at -10000);
    - ``gt_map_bboxes`` -> ``bboxes`` ``[G, 4]`` metric ``xyxy``;
    - ``gt_map_pts`` -> ``pts`` ``[G, P, 2]``;

    and MapTR v2's dense targets as fields of the data sample itself (``data_sample.<key>``):

    - ``gt_depth`` (:class:`PointToMultiViewDepth`, :class:`PadMultiViewImageDepth`) ->
      ``gt_depth`` float32 ``[N, H, W]``: metres, 0 = no lidar point, at the padded image
      size (with ``downsample=1``);
    - ``gt_map_bev_seg`` (:class:`RasterizeMapGT`) -> ``gt_map_bev_seg`` uint8
      ``[seg_classes, bev_h, bev_w]``, row = y cell (row 0 at the patch's -y edge), column =
      x cell;
    - ``gt_map_pv_seg`` (:class:`RasterizeMapGT`) -> ``gt_map_pv_seg`` uint8
      ``[N, seg_classes, fH, fW]``, the padded image size // ``feat_down_sample``.

    A map or dense key in ``keys`` that the sample lacks is skipped (test time: the ground
    truth is in ``eval_ann_info``, which is passed on as mmdet3d does). The 3D-box keys cannot
    be packed with the map (``gt_instances_3d`` holds one instance set).

    Args:
        keys (Sequence[str]): Input and ground-truth keys. Defaults to ``img`` and the four map
            keys (v2 adds ``gt_depth``, ``gt_map_bev_seg``, ``gt_map_pv_seg``).
        meta_keys (Sequence[str]): Defaults to :data:`MAPTR_META_KEYS`.

    Examples:
        >>> import numpy as np
        >>> pack = PackMapTRInputs(keys=['gt_map_labels', 'gt_map_shifts'])
        >>> out = pack(dict(gt_map_labels=np.array([0, 2]),
        ...                 gt_map_shifts=np.zeros((2, 19, 20, 2), np.float32)))
        >>> gt = out['data_samples'].gt_instances_3d
        >>> gt.labels.tolist(), tuple(gt.shifts.shape)
        ([0, 2], (2, 19, 20, 2))
        >>> pack = PackMapTRInputs(keys=['gt_depth', 'gt_map_bev_seg'])
        >>> sample = pack(dict(gt_depth=np.zeros((6, 480, 800), np.float32),
        ...                    gt_map_bev_seg=np.zeros((1, 200, 100), np.uint8)))['data_samples']
        >>> tuple(sample.gt_depth.shape), sample.gt_map_bev_seg.dtype
        ((6, 480, 800), torch.uint8)
    """

    def __init__(self, keys: Sequence[str] = ('img', 'gt_map_labels', 'gt_map_shifts',
                                              'gt_map_bboxes', 'gt_map_pts'),
                 meta_keys: Sequence[str] = MAPTR_META_KEYS) -> None:
        keys = list(keys)
        self.map_keys = [k for k in keys if k in MAP_GT_FIELDS]
        self.dense_keys = [k for k in keys if k in DENSE_GT_FIELDS]
        clash = [k for k in keys if k in self.INSTANCEDATA_3D_KEYS]
        if self.map_keys and clash:
            raise ValueError(f'PackMapTRInputs: {clash} and the map ground truth cannot share '
                             'gt_instances_3d')
        own = set(MAP_GT_FIELDS) | set(DENSE_GT_FIELDS)
        super().__init__(keys=[k for k in keys if k not in own], meta_keys=tuple(meta_keys))

    def pack_single_results(self, results: dict) -> dict:
        packed = super().pack_single_results(results)
        gt = packed['data_samples'].gt_instances_3d
        for key in self.map_keys:
            if key in results:
                gt[MAP_GT_FIELDS[key]] = to_tensor(results[key])
        sample = packed['data_samples']
        for key in self.dense_keys:
            if key in results:
                sample.set_field(self._dense(results, key), key)
        return packed

    @staticmethod
    def _dense(results: dict, key: str) -> torch.Tensor:
        dtype, ndim = DENSE_GT_FIELDS[key]
        value = results[key]
        if isinstance(value, (list, tuple)):
            value = np.stack([np.asarray(v) for v in value])
        value = torch.as_tensor(np.ascontiguousarray(value)).to(dtype)
        if value.dim() != ndim:
            token = results.get('token', results.get('sample_idx'))
            raise ValueError(f'PackMapTRInputs: sample {token}: {key} must have {ndim} '
                             f'dimensions, got shape {tuple(value.shape)}')
        return value

    def __repr__(self) -> str:
        keys = list(self.keys) + self.map_keys + self.dense_keys
        return f'{type(self).__name__}(keys={keys}, meta_keys={self.meta_keys})'
