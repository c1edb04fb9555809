"""Sparse4D v3, the detector: image backbone and neck, the sparse temporal head, depth branch."""
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from mmdet3d.models.detectors import Base3DDetector
from torch import Tensor

from turbox_mm.ops.deformable_aggregation import feature_maps_format
from turbox_mm.registry import MODELS
from turbox_mm.utils.upload import upload

#: What :meth:`Sparse4D.metas` reads from every sample's metainfo (see
#: ``turbox_mm.datasets.transforms.NuScenesSparse4DAdaptor``), beside the ground truth.
REQUIRED_META_KEYS = ('projection_mat', 'image_wh', 'T_global', 'T_global_inv', 'timestamp')


def boxes_to_gravity_centre(boxes) -> Tensor:
    """mmdet3d LiDAR boxes with velocity as ``[n, 9]``: gravity centre, ``l, w, h``, yaw,
    ``vx, vy`` (Sparse4D's target layout; docs/design/sparse4d.md, 0.1).

    Args:
        boxes (LiDARInstance3DBoxes | Tensor): mmdet3d boxes of 9 numbers (bottom centre), or
            a ``[n, 9]`` tensor already in the target layout.

    Returns:
        Tensor: ``[n, 9]`` float32.
    """
    if isinstance(boxes, Tensor):
        tensor = boxes
    else:
        tensor = boxes.tensor
        if tensor.shape[-1] < 9:
            raise ValueError(f'Sparse4D needs boxes with velocities (9 numbers), got '
                             f'{tuple(tensor.shape)}')
        tensor = torch.cat([boxes.gravity_center, tensor[:, 3:9]], dim=-1)
    if tensor.dim() != 2 or tensor.shape[-1] != 9:
        raise ValueError(f'Sparse4D: ground-truth boxes must be [n, 9], got {tuple(tensor.shape)}')
    return tensor.float()


@MODELS.register_module()
class Sparse4D(Base3DDetector):
    """Sparse4D v3 (Lin et al., 2023) for mmdet3d 1.x.

    The images of all cameras ``[B, N, 3, H, W]`` go through GridMask (training), the backbone
    and the FPN in one batch of ``B * N``; the multi-scale maps, flattened once into the
    deformable-aggregation layout, feed :class:`~turbox_mm.models.sparse4d.Sparse4DHead`,
    which carries its instances from frame to frame. A dense depth head on the first FPN levels
    is supervised with lidar depth in training only.

    Precision follows upstream: backbone and neck may run under autocast (mixed precision); the
    head, its losses and the depth branch run in float32 with autocast off.

    Per-sample inputs come from the data samples' metainfo (what ``NuScenesSparse4DAdaptor``
    writes): ``projection_mat``, ``image_wh``, ``T_global``, ``T_global_inv``, ``timestamp``;
    in training also ``focal``, ``gt_depth`` and ``instance_id``, and the ground truth in
    ``gt_instances_3d``. Batches must walk sequences in temporal order (``GroupInBatchSampler``
    in training, an unshuffled sampler in testing).

    Args:
        img_backbone (dict): Image backbone, e.g. ``mmdet.ResNet``.
        head (dict): :class:`~turbox_mm.models.sparse4d.Sparse4DHead` config.
        img_neck (dict, optional): Neck, e.g. ``mmdet.FPN``. Defaults to None.
        depth_branch (dict, optional): :class:`~turbox_mm.models.sparse4d.DenseDepthNet`.
            Defaults to None.
        use_grid_mask (bool): GridMask the images in training. Defaults to True.
        grid_mask (dict, optional): GridMask config. Defaults to upstream's (``prob=0.7``).
        data_preprocessor (dict, optional): Defaults to None.
        init_cfg (dict, optional): Defaults to None.
    """

    def __init__(self,
                 img_backbone: dict,
                 head: dict,
                 img_neck: Optional[dict] = None,
                 depth_branch: Optional[dict] = None,
                 use_grid_mask: bool = True,
                 grid_mask: Optional[dict] = None,
                 data_preprocessor: Optional[dict] = None,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.img_backbone = MODELS.build(img_backbone)
        self.img_neck = MODELS.build(img_neck) if img_neck is not None else None
        self.head = MODELS.build(head)
        self.depth_branch = MODELS.build(depth_branch) if depth_branch is not None else None
        if use_grid_mask:
            grid_mask = grid_mask or dict(type='turbox_mm.GridMask', use_h=True, use_w=True,
                                          rotate=1, offset=False, ratio=0.5, mode=1, prob=0.7)
            self.grid_mask = MODELS.build(grid_mask)
        else:
            self.grid_mask = None

    # -- features -----------------------------------------------------------------------------

    def extract_feat(self, batch_inputs_dict: Dict) -> List[Tensor]:
        """Multi-scale image features ``[B, N, C, h, w]`` per level.

        Args:
            batch_inputs_dict (dict): ``imgs`` ``[B, N, 3, H, W]`` (the data preprocessor's).

        Returns:
            list[Tensor]: One tensor per neck level.
        """
        imgs = batch_inputs_dict.get('imgs')
        if imgs is None or imgs.dim() != 5:
            shape = None if imgs is None else tuple(imgs.shape)
            raise ValueError(f"Sparse4D: inputs['imgs'] must be [B, N, 3, H, W], got {shape}")
        batch, cams = imgs.shape[:2]
        x = imgs.flatten(0, 1)
        if self.grid_mask is not None and self.training:
            x = self.grid_mask(x)
        feats = self.img_backbone(x)
        if self.img_neck is not None:
            feats = self.img_neck(feats)
        if isinstance(feats, Tensor):
            feats = [feats]
        return [f.reshape(batch, cams, *f.shape[1:]) for f in feats]

    def metas(self, batch_data_samples: Sequence, device: torch.device,
              with_gt: bool = False) -> Dict:
        """The head's per-batch inputs, stacked on ``device`` (see the class docstring).

        Raises:
            KeyError: A sample lacks one of :data:`REQUIRED_META_KEYS` (names it and the
                sample).
        """
        infos = [s.metainfo for s in batch_data_samples]
        for i, info in enumerate(infos):
            missing = [k for k in REQUIRED_META_KEYS if k not in info]
            if missing:
                raise KeyError(f"Sparse4D: sample {i} (sample_idx {info.get('sample_idx')}) "
                               f'lacks metainfo {missing}; the pipeline needs '
                               'turbox_mm.NuScenesSparse4DAdaptor and Pack3DDetInputs with '
                               'its meta_keys')

        def stack(key, dtype):
            return upload(np.stack([np.asarray(m[key]) for m in infos]), device, dtype)

        metas = dict(
            projection_mat=stack('projection_mat', torch.float32),
            image_wh=stack('image_wh', torch.float32),
            T_global=stack('T_global', torch.float64),
            T_global_inv=stack('T_global_inv', torch.float64),
            # float64 on the host too: seconds since 1970 keep no fraction in float32
            timestamp=upload(np.array([float(m['timestamp']) for m in infos], np.float64),
                             device))
        if all('focal' in m for m in infos):
            metas['focal'] = stack('focal', torch.float32)
        if not with_gt:
            return metas
        if all('gt_depth' in m for m in infos):
            levels = len(infos[0]['gt_depth'])
            metas['gt_depth'] = [
                upload(np.stack([np.asarray(m['gt_depth'][k]) for m in infos]), device,
                       torch.float32)
                for k in range(levels)]
        boxes, labels, ids = [], [], []
        known = False
        for sample, info in zip(batch_data_samples, infos):
            gt = sample.gt_instances_3d
            boxes.append(upload(boxes_to_gravity_centre(gt.bboxes_3d), device))
            labels.append(upload(gt.labels_3d, device, torch.long))
            inst = info.get('instance_id')
            if inst is None or len(inst) != len(labels[-1]):
                inst = np.full(len(labels[-1]), -1, dtype=np.int64)
            inst = np.asarray(inst)
            known = known or bool((inst >= 0).any())  # on the host: no wait
            ids.append(upload(inst, device, torch.long))
        # Without instance ids (mmdet3d's converter writes none) temporal denoising is off, as
        # upstream without ids; denoising itself stays.
        metas.update(gt_bboxes_3d=boxes, gt_labels_3d=labels, instance_id=ids if known else None)
        return metas

    # -- modes --------------------------------------------------------------------------------

    def loss(self, batch_inputs_dict: Dict, batch_data_samples: Sequence, **kwargs) -> Dict:
        """Head losses of every decoder layer and the dense depth loss."""
        feats = [f.float() for f in self.extract_feat(batch_inputs_dict)]
        device = feats[0].device
        metas = self.metas(batch_data_samples, device, with_gt=True)
        with torch.autocast(device_type=device.type, enabled=False):
            outputs = self.head(feature_maps_format(feats), metas)
            losses = self.head.loss(outputs, metas)
            if self.depth_branch is not None:
                if 'gt_depth' not in metas:
                    raise KeyError('Sparse4D: the depth branch needs gt_depth in the metainfo '
                                   '(turbox_mm.MultiScaleDepthMapGenerator)')
                depths = self.depth_branch(feats, metas.get('focal'))
                losses['loss_dense_depth'] = self.depth_branch.loss(depths, metas['gt_depth'])
        return losses

    def predict(self, batch_inputs_dict: Dict, batch_data_samples: Sequence, **kwargs):
        """Boxes per sample as ``Det3DDataSample.pred_instances_3d`` (LiDAR boxes)."""
        feats = [f.float() for f in self.extract_feat(batch_inputs_dict)]
        device = feats[0].device
        metas = self.metas(batch_data_samples, device)
        with torch.autocast(device_type=device.type, enabled=False):
            outputs = self.head(feature_maps_format(feats), metas)
            results = self.head.post_process(outputs)
        instances = [self.head.decoder.to_instance_data(r) for r in results]
        return self.add_pred_to_datasample(batch_data_samples, instances)

    def _forward(self, batch_inputs_dict: Dict, batch_data_samples: Sequence = None, **kwargs):
        """The head's raw outputs (``mode='tensor'``)."""
        feats = [f.float() for f in self.extract_feat(batch_inputs_dict)]
        device = feats[0].device
        metas = self.metas(batch_data_samples, device)
        with torch.autocast(device_type=device.type, enabled=False):
            return self.head(feature_maps_format(feats), metas)
