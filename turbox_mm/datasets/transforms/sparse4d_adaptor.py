"""The last Sparse4D transform: the per-sample arrays the model reads, from the sample."""
import math
import warnings
from typing import Dict

import numpy as np
import torch
from mmcv.transforms import BaseTransform

from turbox_mm.registry import TRANSFORMS
from .circle_object_range_filter import labels_array
from .multi_scale_depth_map import image_sizes

#: ``meta_keys`` for ``Pack3DDetInputs`` after :class:`NuScenesSparse4DAdaptor`.
SPARSE4D_META_KEYS = ('sample_idx', 'token', 'scene_token', 'frame_idx', 'timestamp',
                      'box_type_3d', 'img_shape', 'lidar2img', 'projection_mat', 'image_wh',
                      'T_global', 'T_global_inv', 'focal', 'gt_depth', 'instance_id')
_warned = {'instance_id': False}


@TRANSFORMS.register_module()
class NuScenesSparse4DAdaptor(BaseTransform):
    """Write the arrays Sparse4D v3's model reads (upstream's ``NuScenesSparse4DAdaptor``).

    Added or rewritten keys, with ``N`` cameras and ``n`` ground truths:

    - ``projection_mat``: float32 ``(N, 4, 4)``, the stacked ``lidar2img`` as the
      augmentations left it (image and BEV rotation): augmented lidar frame -> augmented
      pixels (times depth).
    - ``image_wh``: float32 ``(N, 2)``, ``(W, H)`` of each augmented image, from
      ``img_shape``.
    - ``T_global``: float64 ``(4, 4)``, ``lidar2global`` (augmented lidar frame -> global);
      ``T_global_inv``: its inverse.
    - ``cam_intrinsic``: float32 ``(N, 4, 4)`` (stacked); ``focal``: float32 ``(N,)``,
      ``sqrt(|det(K[:2, :2])|)`` of the augmented intrinsics (``sqrt(fx * fy)``; a flip
      only changes the sign).
    - ``timestamp``: float seconds.
    - ``instance_id``: int64 ``(n,)``, aligned with the boxes; where the sample has
      ground truths but no ids (mmdet3d's converter writes none), -1 each, with a warning
      (once per process).
    - ``gt_bboxes_3d``: the yaw (column 6) wrapped to ``[-pi, pi)`` (pi as float32 rounds
      it, so ``float32(-pi) <= yaw < float32(pi)``), float32; mmdet3d boxes
      stay mmdet3d boxes (9 numbers with the velocity). ``gt_labels_3d``: int64.

    Images are left as they are (a list of ``(H, W, C)``; ``Pack3DDetInputs`` stacks them
    to ``(N, C, H, W)``), so float (stock) and uint8 (turbox, normalised on the GPU)
    pipelines both work. Pack with ``meta_keys=SPARSE4D_META_KEYS``.

    Required keys: ``lidar2img``, ``img_shape``, ``lidar2global``, ``cam_intrinsic``.
    Optional: ``timestamp``, ``gt_bboxes_3d``, ``gt_labels_3d``, ``instance_id``.

    Examples:
        >>> k = np.diag([100., 50., 1., 1.])
        >>> k[0, 0] = -100.  # flipped
        >>> out = NuScenesSparse4DAdaptor()(dict(
        ...     lidar2img=[np.eye(4)], img_shape=[(256, 704)], lidar2global=np.eye(4),
        ...     cam_intrinsic=[k], timestamp=3.5))
        >>> out['image_wh'].tolist(), round(float(out['focal'][0]), 3), out['T_global'].dtype
        ([[704.0, 256.0]], 70.711, dtype('float64'))
    """

    def transform(self, results: Dict) -> Dict:
        """Add the model's arrays to ``results``.

        Args:
            results (dict): The sample.

        Returns:
            dict: ``results``, modified in place.
        """
        name = type(self).__name__
        for key in ('lidar2img', 'lidar2global', 'cam_intrinsic'):
            if key not in results:
                raise KeyError(f'{name}: results has no {key!r} (Sparse4DNuScenesDataset '
                               'adds it)')
        projection = np.stack([np.asarray(m, dtype=np.float64) for m in results['lidar2img']])
        if projection.ndim != 3 or projection.shape[1:] != (4, 4):
            raise ValueError(f'{name}: lidar2img must be N 4x4 matrices, got '
                             f'{projection.shape}')
        num_views = len(projection)
        results['projection_mat'] = projection.astype(np.float32)
        sizes = image_sizes(results, num_views, name)
        results['image_wh'] = np.array([(w, h) for h, w in sizes], dtype=np.float32)
        t_global = np.asarray(results['lidar2global'], dtype=np.float64)
        if t_global.shape != (4, 4):
            raise ValueError(f'{name}: lidar2global must be 4x4, got {t_global.shape}')
        results['T_global'] = t_global
        results['T_global_inv'] = np.linalg.inv(t_global)
        intrinsics = np.stack([np.asarray(k, dtype=np.float64)
                               for k in results['cam_intrinsic']])
        if len(intrinsics) != num_views:
            raise ValueError(f'{name}: {len(intrinsics)} cam_intrinsic for {num_views} '
                             'cameras')
        results['focal'] = np.sqrt(np.abs(np.linalg.det(intrinsics[:, :2, :2]))).astype(
            np.float32)
        results['cam_intrinsic'] = intrinsics.astype(np.float32)
        if 'timestamp' in results:
            results['timestamp'] = float(results['timestamp'])
        if 'gt_labels_3d' in results:
            labels = labels_array(results)
            results['gt_labels_3d'] = labels
            self._instance_ids(results, len(labels), name)
        if 'gt_bboxes_3d' in results:
            results['gt_bboxes_3d'] = self._wrap_yaw(results['gt_bboxes_3d'], name)
        return results

    @staticmethod
    def _instance_ids(results: Dict, num_gt: int, owner: str) -> None:
        if 'instance_id' in results:
            ids = results['instance_id']
            if isinstance(ids, torch.Tensor):
                ids = ids.cpu().numpy()
            ids = np.asarray(ids, dtype=np.int64).reshape(-1)
            if len(ids) != num_gt:
                raise ValueError(f'{owner}: {len(ids)} instance ids for {num_gt} boxes; '
                                 'filter boxes with CircleObjectRangeFilter / '
                                 'InstanceNameFilter, which keep them aligned')
            results['instance_id'] = ids
            return
        if num_gt > 0 and not _warned['instance_id']:
            _warned['instance_id'] = True
            from turbox_mm.datasets.nuscenes_instance_ids import command_line
            warnings.warn(f'{owner}: samples without instance_id (infos without '
                          'instances[k].instance_id, as mmdet3d\'s converter writes them); '
                          'using -1, which disables temporal denoising and tracking ids. Add '
                          f'the ids from the nuScenes tables with: {command_line()} '
                          '(docs/data.md)', stacklevel=2)
        results['instance_id'] = np.full(num_gt, -1, dtype=np.int64)

    @staticmethod
    def _wrap_yaw(boxes, owner: str):
        data = getattr(boxes, 'tensor', boxes)
        if data.ndim != 2 or data.shape[1] < 7:
            raise ValueError(f'{owner}: gt_bboxes_3d must be (n, >=7), got shape '
                             f'{tuple(data.shape)}')
        period = 2 * math.pi
        if isinstance(data, torch.Tensor):
            data = data.float()
            yaw = data[:, 6].double()
            data[:, 6] = (yaw - torch.floor(yaw / period + 0.5) * period).to(data.dtype)
            # float32 has no pi: what rounds up to float32(pi) goes to float32(-pi).
            top = torch.tensor(math.pi, dtype=data.dtype)
            data[:, 6] = torch.where(data[:, 6] >= top, data[:, 6] - 2 * top, data[:, 6])
            if hasattr(boxes, 'tensor'):
                boxes.tensor = data
                return boxes
            return data
        data = np.array(data, dtype=np.float32, copy=True)
        yaw = data[:, 6].astype(np.float64)
        data[:, 6] = yaw - np.floor(yaw / period + 0.5) * period
        top = np.float32(math.pi)
        data[:, 6] = np.where(data[:, 6] >= top, data[:, 6] - 2 * top, data[:, 6])
        return data
