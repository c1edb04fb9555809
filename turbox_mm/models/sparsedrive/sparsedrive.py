"""SparseDrive, the detector: Sparse4D's image path with SparseDrive's joint head."""
from typing import Dict, List, Sequence

import numpy as np
import torch
from torch import Tensor

from turbox_mm.models.sparse4d.sparse4d import Sparse4D
from turbox_mm.ops.deformable_aggregation import feature_maps_format
from turbox_mm.registry import MODELS
from turbox_mm.utils.upload import upload

#: Per-sample ground truth of variable length: ``(key, dtype)``. Each goes to the head as a
#: list of tensors, one per sample.
RAGGED_KEYS = (
    ('gt_map_labels', torch.long),
    ('gt_map_pts', torch.float32),  # [G, orders, points, 2]
    ('gt_agent_fut_trajs', torch.float32),
    ('gt_agent_fut_masks', torch.float32),
)
#: The planning decoder's outputs that go into a data sample's ``pred_planning``.
PLANNING_KEYS = ('planning_score', 'planning', 'final_planning')
#: Per-sample fields of fixed shape: stacked over the batch (``[B, ...]``).
STACKED_KEYS = (
    ('gt_ego_fut_trajs', torch.float32),
    ('gt_ego_fut_masks', torch.float32),
    ('gt_ego_fut_cmd', torch.float32),
    ('ego_status', torch.float32),
)


def carried_by_all(infos: Sequence[dict], key: str) -> bool:
    """Whether every sample's metainfo carries ``key`` (False when none does).

    Raises:
        KeyError: Some samples carry it and others do not (names those that lack it).
    """
    present = [key in m for m in infos]
    if any(present) and not all(present):
        raise KeyError(f'SparseDrive: {key!r} is in the metainfo of some samples of the batch '
                       f'only (samples {[i for i, p in enumerate(present) if not p]} lack it)')
    return all(present)


def upload_ragged(arrays: Sequence[np.ndarray], device: torch.device,
                  dtype: torch.dtype) -> List[Tensor]:
    """Per-sample arrays ``[n_i, ...]`` as device tensors, through one upload.

    The arrays are concatenated on the host, copied once and split on the device by the
    host-known lengths (no device read).

    Raises:
        ValueError: The arrays' trailing shapes differ (names them).
    """
    arrays = [np.asarray(a) for a in arrays]
    tails = {a.shape[1:] for a in arrays}
    if len(tails) > 1:
        raise ValueError(f'SparseDrive: per-sample arrays must agree after the first dim, got '
                         f'{[a.shape for a in arrays]}')
    whole = upload(np.concatenate(arrays), device, dtype)
    return list(torch.split(whole, [len(a) for a in arrays]))


@MODELS.register_module()
class SparseDrive(Sparse4D):
    """SparseDrive (Sun et al., 2024) for mmdet3d 1.x: detection, tracking and online map (stage
    1), plus motion prediction and planning (stage 2).

    The image path is Sparse4D's (GridMask, backbone and FPN in one batch of ``B * N``, the
    deformable-aggregation feature layout, the dense depth branch in training), then
    :class:`~turbox_mm.models.sparsedrive.SparseDriveHead` runs the detection and the map
    heads. Precision as upstream: backbone and neck may run under autocast; heads, losses and
    depth run in float32.

    Per-sample inputs: Sparse4D's metainfo (:data:`~turbox_mm.models.sparse4d.sparse4d.
    REQUIRED_META_KEYS`) and, from ``turbox_mm.NuScenesSparseDriveAdaptor`` (packed with
    ``SPARSEDRIVE_META_KEYS``), the map ground truth ``gt_map_labels`` ``[G]`` and
    ``gt_map_pts`` ``[G, 38, 20, 2]`` and the planning fields. Predictions: the boxes in
    ``pred_instances_3d`` (as Sparse4D; in stage 2 with ``trajs_3d`` ``[K, 6, 12, 2]`` and
    ``trajs_score`` ``[K, 6]``), the map polylines in ``pred_map_instances`` (``pts``,
    ``scores``, ``labels``; what ``SparseDriveMapMetric`` reads) and, in stage 2, the plan in
    ``pred_planning`` (``final_planning`` ``[6, 2]``, ``planning``, ``planning_score``).

    Args:
        img_backbone (dict): Image backbone, e.g. ``mmdet.ResNet``.
        head (dict): :class:`~turbox_mm.models.sparsedrive.SparseDriveHead` config.
        img_neck (dict, optional): Neck. Defaults to None.
        depth_branch (dict, optional): ``DenseDepthNet``. Defaults to None.
        use_grid_mask (bool): GridMask in training. Defaults to True.
        grid_mask (dict, optional): GridMask config. Defaults to upstream's.
        data_preprocessor (dict, optional): Defaults to None.
        init_cfg (dict, optional): Defaults to None.
    """

    def metas(self, batch_data_samples: Sequence, device: torch.device,
              with_gt: bool = False) -> Dict:
        """Sparse4D's metas plus SparseDrive's fields where the samples carry them.

        Fixed-shape fields (``ego_status``, ``gt_ego_fut_*``) are stacked; ragged ground truth
        (``gt_map_*``, ``gt_agent_fut_*``) becomes per-sample lists, in training only.

        Raises:
            KeyError: Some samples of the batch carry a field and others do not (names it).
        """
        metas = super().metas(batch_data_samples, device, with_gt=with_gt)
        infos = [s.metainfo for s in batch_data_samples]
        for key, dtype in STACKED_KEYS:
            if carried_by_all(infos, key):
                metas[key] = upload(np.stack([np.asarray(m[key]) for m in infos]), device, dtype)
        if not with_gt:
            return metas
        for key, dtype in RAGGED_KEYS:
            if carried_by_all(infos, key):
                metas[key] = upload_ragged([m[key] for m in infos], device, dtype)
        return metas

    def predict(self, batch_data_samples_inputs: Dict, batch_data_samples: Sequence,
                **kwargs):
        """Boxes in ``pred_instances_3d`` and map polylines in ``pred_map_instances``."""
        feats = [f.float() for f in self.extract_feat(batch_data_samples_inputs)]
        device = feats[0].device
        metas = self.metas(batch_data_samples, device)
        with torch.autocast(device_type=device.type, enabled=False):
            outputs = self.head(feature_maps_format(feats), metas)
            results = self.head.post_process(outputs, metas)
        head = self.head
        if head.det_head is not None:
            instances = []
            for r in results:
                det = head.det_head.decoder.to_instance_data(r['det'])
                if 'motion_plan' in r:
                    # the motion decoder keeps the det decoder's boxes, in the same order
                    motion = r['motion_plan']
                    if not torch.equal(motion['indices'], r['det']['indices']):
                        raise ValueError('SparseDrive: the motion decoder kept other boxes than '
                                         'the det decoder (give both the same num_output)')
                    for key in ('trajs_3d', 'trajs_score'):
                        det[key] = motion[key]
                instances.append(det)
            # Also sets the (empty) 2-D predictions that mmdet3d's metrics expect.
            self.add_pred_to_datasample(batch_data_samples, instances)
        if head.map_head is not None:
            for sample, result in zip(batch_data_samples, results):
                sample.pred_map_instances = head.map_head.decoder.to_instance_data(
                    result['map'])
        if head.motion_plan_head is not None:
            for sample, result in zip(batch_data_samples, results):
                sample.pred_planning = {k: result['motion_plan'][k] for k in PLANNING_KEYS
                                        if k in result['motion_plan']}
        return batch_data_samples
