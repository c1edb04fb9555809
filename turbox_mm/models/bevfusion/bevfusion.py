"""``BEVFusion``: the detector of mmdet3d 1.4's ``projects/BEVFusion`` (lidar-only or
camera + lidar), mmengine-native.

The flow (``docs/design/bevfusion.md`` section 1): the lidar points are hard-voxelized per
sample into ``(batch, x, y, z)`` voxels whose feature is the mean of their points, through the
sparse encoder (``BEVFusionSparseEncoder``); with images, the camera branch (backbone, neck,
the first neck output, ``view_transform``) runs on a copy of the points; the BEV maps are
fused camera first (``fusion_layer``), then ``pts_backbone``, ``pts_neck`` and the head.

``op_impl``: ``'stock'`` voxelizes as upstream (mmcv's deterministic op, one call per sample,
the batch size read from the last voxel: a host sync); ``'turbox'`` voxelizes the batch in one
call of ``turbox_mm::hard_voxelize`` (the same voxels in the same order) before the camera
branch (its host read of the voxel count then waits for little) and takes the batch size from
the number of samples; with a camera branch on CUDA it runs the sparse encoder on a side
stream once the camera branch is queued (``overlap_lidar``: spconv's host waits for its pair
counts then wait for the encoder's kernels only, while the camera kernels keep the device
busy); it also sends the camera matrices to the device without making the host wait (pinned
memory, non-blocking). A sample without points in the point
cloud range gets an empty lidar BEV (the stock path warns, naming its position in the batch;
upstream's batch size, read from the last voxel, is wrong when that sample is the last).
``init_weights`` initialises only the image backbone, as upstream's override does (the other
parts keep their construction-time initialisation).
"""
import copy
import warnings
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from mmcv.ops import Voxelization
from mmdet3d.models.detectors import Base3DDetector
from torch import Tensor

from turbox_mm.ops.dispatch import check_op_impl
from turbox_mm.ops.voxelize import hard_voxelize
from turbox_mm.registry import MODELS
from turbox_mm.utils.side_stream import mark_ready, run_on_side_stream
from turbox_mm.utils.upload import upload

#: metainfo key -> ``view_transform`` argument, with the default for a missing key.
CAMERA_MATRICES = (
    ('lidar2img', 'lidar2image', None),
    ('cam2img', 'cam_intrinsic', None),
    ('cam2lidar', 'camera2lidar', None),
    ('img_aug_matrix', 'img_aug_matrix', 'eye'),
    ('lidar_aug_matrix', 'lidar_aug_matrix', 'eye'),
)
#: The sparse encoder's batch size: an int, or upstream's 0-d tensor read of the last voxel.
BatchSize = Union[int, Tensor]


@MODELS.register_module()
class BEVFusion(Base3DDetector):
    """BEVFusion (module docstring).

    Args:
        data_preprocessor (dict): A ``Det3DDataPreprocessor`` config holding
            ``voxelize_cfg`` (``max_num_points``, ``point_cloud_range``, ``voxel_size``,
            ``max_voxels`` (train, test), ``voxelize_reduce``); the preprocessor itself does not
            voxelize.
        pts_voxel_encoder (dict, optional): Built and not called, as upstream (the mean over
            each voxel's points is the feature).
        pts_middle_encoder, pts_backbone, pts_neck, bbox_head (dict): The lidar branch and the
            head.
        img_backbone, img_neck, view_transform, fusion_layer (dict, optional): The camera
            branch and the fuser (all or none).
        op_impl (str): ``'stock'`` or ``'turbox'``. Defaults to 'stock'.
        init_cfg (dict, optional): mmengine's.
        seg_head: Accepted for upstream's signature; must be None.
        overlap_lidar (bool): With ``op_impl='turbox'``, on CUDA, with the camera branch:
            run the sparse encoder on a side CUDA stream after the camera branch is queued,
            so that its host waits (spconv's pair counts) leave the device busy. Defaults to
            True.
    """

    #: What ``turbox.compile.modules='auto'`` adds to the backbones and necks: the fuser and
    #: the whole head's forward (convolutions, the heatmap's local maxima, the top proposals,
    #: the decoder layers and prediction heads: fixed shapes, no data-dependent branch). The
    #: targets and losses stay eager.
    turbox_compile_submodules = ('fusion_layer', 'bbox_head')

    def __init__(self, data_preprocessor: dict, pts_middle_encoder: dict, pts_backbone: dict,
                 pts_neck: dict, bbox_head: dict, pts_voxel_encoder: Optional[dict] = None,
                 fusion_layer: Optional[dict] = None, img_backbone: Optional[dict] = None,
                 img_neck: Optional[dict] = None, view_transform: Optional[dict] = None,
                 op_impl: str = 'stock', init_cfg: Optional[dict] = None,
                 seg_head: Optional[dict] = None, overlap_lidar: bool = True) -> None:
        if seg_head is not None:
            raise ValueError('BEVFusion: seg_head is not supported (upstream ignores it)')
        preprocessor = copy.deepcopy(dict(data_preprocessor))  # upstream pops from the config
        if 'voxelize_cfg' not in preprocessor:
            raise KeyError('BEVFusion: data_preprocessor needs voxelize_cfg (max_num_points, '
                           'point_cloud_range, voxel_size, max_voxels, voxelize_reduce)')
        voxelize_cfg = dict(preprocessor.pop('voxelize_cfg'))
        self.voxelize_reduce = bool(voxelize_cfg.pop('voxelize_reduce', True))
        super().__init__(data_preprocessor=preprocessor, init_cfg=init_cfg)
        self.op_impl = check_op_impl('BEVFusion', op_impl)
        self.overlap_lidar = bool(overlap_lidar)
        self._empty_samples: List[int] = []  # of the last stock voxelization
        camera = [img_backbone, img_neck, view_transform]
        if any(c is not None for c in camera) and not all(c is not None for c in camera):
            raise ValueError('BEVFusion: img_backbone, img_neck and view_transform come '
                             'together (camera branch) or not at all (lidar only)')
        # Built in upstream's order (the random draws, so the initial weights, follow it).
        self.pts_voxel_layer = Voxelization(**voxelize_cfg)
        self.pts_voxel_encoder = MODELS.build(pts_voxel_encoder) if pts_voxel_encoder else None
        self.img_backbone = MODELS.build(img_backbone) if img_backbone else None
        self.img_neck = MODELS.build(img_neck) if img_neck else None
        self.view_transform = MODELS.build(view_transform) if view_transform else None
        self.pts_middle_encoder = MODELS.build(pts_middle_encoder)
        self.fusion_layer = MODELS.build(fusion_layer) if fusion_layer else None
        self.pts_backbone = MODELS.build(pts_backbone)
        self.pts_neck = MODELS.build(pts_neck)
        self.bbox_head = MODELS.build(bbox_head)
        self.init_weights()  # as upstream: the image backbone only, at construction too

    def init_weights(self) -> None:
        """Only the image backbone, as upstream (module docstring)."""
        if self.img_backbone is not None:
            self.img_backbone.init_weights()

    # -- lidar ----------------------------------------------------------------------------------

    @torch.no_grad()
    def voxelize(self, points: List[Tensor]):
        """``(features [M, C], coords [M, 4] (batch, x, y, z) int32, sizes [M])``: hard
        voxels of every sample, the mean of their points as the feature."""
        layer = self.pts_voxel_layer
        if self.op_impl == 'turbox':
            max_voxels = layer.max_voxels[0 if layer.training else 1]
            voxels, coors, sizes = hard_voxelize(
                torch.cat(points), layer.voxel_size, layer.point_cloud_range,
                layer.max_num_points, max_voxels, sample_sizes=[len(p) for p in points])
            # (batch, z, y, x) -> (batch, x, y, z); a list index would copy it from the host
            coords = torch.cat([coors[:, :1], coors[:, 1:].flip(1)], 1)
        else:
            parts, coord_parts, size_parts = [], [], []
            for k, cloud in enumerate(points):
                voxels, coors, sizes = layer(cloud)
                parts.append(voxels)
                coord_parts.append(F.pad(coors[:, [2, 1, 0]], (1, 0), mode='constant', value=k))
                size_parts.append(sizes)
            self._empty_samples = [k for k, c in enumerate(coord_parts) if c.shape[0] == 0]
            voxels, coords, sizes = torch.cat(parts), torch.cat(coord_parts), torch.cat(size_parts)
        feats = voxels
        if self.voxelize_reduce:
            feats = voxels.sum(dim=1) / sizes.type_as(voxels).view(-1, 1)
        return feats, coords.int(), sizes

    def extract_pts_feat(self, batch_inputs_dict: Dict,
                         voxels: Optional[Tuple[Tensor, Tensor, BatchSize]] = None) -> Tensor:
        """The lidar BEV ``[B, C, X, Y]`` (voxelization in float32; the encoder outside that
        region, as upstream: under AMP spconv runs it in half precision).

        Args:
            batch_inputs_dict (dict): The batch, with ``points``.
            voxels (tuple, optional): :meth:`batch_voxels` of these points, made earlier.
                Defaults to None (voxelize here).

        Returns:
            Tensor: The sparse encoder's output.
        """
        if voxels is None:
            voxels = self.batch_voxels(batch_inputs_dict['points'])
        return self.pts_middle_encoder(*voxels)

    def batch_voxels(self, points: List[Tensor]) -> Tuple[Tensor, Tensor, BatchSize]:
        """The sparse encoder's input: :meth:`voxelize` in float32, with the batch size.

        Args:
            points (list[Tensor]): Per sample ``[P, C]`` points.

        Returns:
            tuple: ``(features [M, C], coords [M, 4] int32, batch_size)``; the batch size is
            the number of samples (turbox, or stock with an empty sample) or upstream's read
            of the last voxel's batch index (a 0-d tensor).
        """
        with torch.autocast(device_type=points[0].device.type, enabled=False):
            points = [p.float() for p in points]
            feats, coords, _ = self.voxelize(points)
            if self.op_impl == 'turbox':
                batch_size = len(points)
            elif self._empty_samples:
                warnings.warn(f'BEVFusion: sample(s) {self._empty_samples} of the batch (of '
                              f'{len(points)}) have no points in the point cloud range; their '
                              'lidar BEV is empty (upstream takes the batch size from the last '
                              'voxel, which fails when the last sample is empty)', stacklevel=3)
                batch_size = len(points)
            else:
                batch_size = coords[-1, 0] + 1
        return feats, coords, batch_size

    # -- camera ---------------------------------------------------------------------------------

    def extract_img_feat(self, imgs: Tensor, points: List[Tensor], metas: List[dict]) -> Tensor:
        """Images ``[B, N, 3, H, W]`` to the camera BEV (the view transform in float32)."""
        batch, cams = imgs.shape[:2]
        x = self.img_backbone(imgs.reshape(batch * cams, *imgs.shape[2:]).contiguous())
        x = self.img_neck(x)
        if not isinstance(x, Tensor):
            x = x[0]
        x = x.view(batch, cams, *x.shape[1:])
        matrices = {}
        for key, arg, default in CAMERA_MATRICES:
            if default is None and any(key not in m for m in metas):
                raise KeyError(f'BEVFusion: the camera branch needs {key!r} in every sample\'s '
                               'metainfo (Pack3DDetInputs meta_keys)')
            value = np.asarray([m.get(key, np.eye(4)) for m in metas], dtype=np.float32)
            matrices[arg] = (upload(value, imgs.device) if self.op_impl == 'turbox' else
                             imgs.new_tensor(value, dtype=torch.float32))
        with torch.autocast(device_type=imgs.device.type, enabled=False):
            return self.view_transform(x.float(), points, metas=metas, **matrices)

    # -- the detector's API --------------------------------------------------------------------

    def extract_feat(self, batch_inputs_dict: Dict, batch_input_metas: List[dict]):
        """The neck's output for the head (camera first in the fusion)."""
        features, voxels, ready = [], None, None
        imgs = batch_inputs_dict.get('imgs')
        camera = imgs is not None and self.img_backbone is not None
        if self.op_impl == 'turbox':
            # The voxelizer's one host read (the voxel count) first, while the device has
            # little queued: after the camera branch it would wait for all of that branch's
            # kernels, with nothing launched meanwhile. The two branches are independent
            # (and the voxelizer draws no random numbers), so the order changes no value.
            voxels = self.batch_voxels(batch_inputs_dict['points'])
            if camera and self.overlap_lidar:
                ready = mark_ready(voxels[:2])
        if camera:
            points = [p.clone() for p in batch_inputs_dict['points']]
            features.append(self.extract_img_feat(imgs, points, batch_input_metas))
        if ready is None:
            features.append(self.extract_pts_feat(batch_inputs_dict, voxels=voxels))
        else:
            # The sparse encoder waits on the host for its pair counts (spconv), each wait
            # for the kernels of its own stream only: the camera branch, queued on the main
            # stream, keeps the device busy meanwhile. Same kernels, same values.
            features.append(run_on_side_stream(
                lambda *v: self.extract_pts_feat(batch_inputs_dict, voxels=v), voxels, ready))
        if self.fusion_layer is not None:
            x = self.fusion_layer(features)
        elif len(features) == 1:
            x = features[0]
        else:
            raise ValueError('BEVFusion: camera and lidar features need a fusion_layer')
        return self.pts_neck(self.pts_backbone(x))

    def loss(self, batch_inputs_dict: Dict, batch_data_samples: List, **kwargs) -> Dict:
        metas = [s.metainfo for s in batch_data_samples]
        return self.bbox_head.loss(self.extract_feat(batch_inputs_dict, metas),
                                   batch_data_samples)

    def predict(self, batch_inputs_dict: Dict, batch_data_samples: List, **kwargs) -> List:
        metas = [s.metainfo for s in batch_data_samples]
        results = self.bbox_head.predict(self.extract_feat(batch_inputs_dict, metas), metas)
        return self.add_pred_to_datasample(batch_data_samples, results)

    def _forward(self, batch_inputs_dict: Dict, batch_data_samples: Optional[List] = None,
                 **kwargs):
        """The head's raw outputs (tensor mode)."""
        metas = [s.metainfo for s in batch_data_samples] if batch_data_samples else []
        return self.bbox_head(self.extract_feat(batch_inputs_dict, metas))
