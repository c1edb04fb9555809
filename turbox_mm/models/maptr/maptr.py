"""``MapTR``: MapTR v1's detector (upstream ``detectors/maptr.py`` @ 50f2ecd, an mmdet3d 0.17
``MVXTwoStageDetector``), as an mmdet3d 1.x ``Base3DDetector`` (docs/design/maptr.md,
section 2).

The flow: the images of all cameras ``[B, N, 3, H, W]`` go through GridMask (training only,
one mask for the whole batch), the image backbone and the neck in one batch of ``B * N``;
every neck level comes back as ``[B, N, C, h, w]``. The BEV encoder (upstream's
``pts_bbox_head.transformer`` minus its decoder: BEV queries, positional encoding, can-bus
MLP and the BEVFormer-style layers) turns them into the BEV embedding ``[B, H * W, C]``,
which :class:`~turbox_mm.models.maptr.MapTRHead` decodes into map vectors.

Upstream's head owns the whole ``MapTRPerceptionTransformer``; ours owns only the decoder, so
the encoder is this detector's ``bev_encoder``, called as
``bev_encoder(mlvl_feats, img_metas, prev_bev=prev_bev)`` -> ``[B, H * W, C]`` (or
``[B, C, H, W]``), where ``img_metas`` are the samples' metainfo dicts (``lidar2img``,
``img_shape``, ``can_bus``, ...; ``can_bus`` as a float64 array, a copy).

Temporal input, as upstream's v1 with ``queue_length=1``: training has no history
(``prev_bev=None``, and the dataset's ``union2one`` zeroes ``can_bus[:3]`` and
``can_bus[-1]``, done here); at test time ``video_test_mode=False`` (upstream's config)
gives the same; with ``video_test_mode=True`` the previous frame's BEV of the same scene is
passed on and ``can_bus[:3]`` and ``can_bus[-1]`` become the deltas to that frame (upstream's
``forward_test``; one sample per batch, as upstream).

Precision: the head (decoder and losses) runs in float32 with autocast off (upstream's
``force_fp32``); the backbone, neck and encoder run under whatever autocast the optim wrapper
sets (upstream's ``auto_fp16`` regions).

Outputs of ``predict``: each data sample's ``pred_instances_3d`` holds ``pts_3d``
``[k, P, 2]`` (metres, lidar frame), ``scores_3d``, ``labels_3d`` and ``bboxes`` (metric
``xyxy``), what :class:`~turbox_mm.evaluation.MapChamferMetric` reads.
"""
import copy
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from mmdet3d.models.detectors import Base3DDetector
from torch import Tensor

from turbox_mm.registry import MODELS

#: Upstream's GridMask of ``maptr_tiny_r50_24e`` (BEVFormer's, built in the detector).
GRID_MASK = dict(type='turbox_mm.GridMask', use_h=True, use_w=True, rotate=1, offset=False,
                 ratio=0.5, mode=1, prob=0.7)


@MODELS.register_module()
class MapTR(Base3DDetector):
    """MapTR v1 (Liao et al., 2023) for mmdet3d 1.x (module docstring).

    Args:
        img_backbone (dict): Image backbone, e.g. ``mmdet.ResNet``.
        pts_bbox_head (dict): :class:`~turbox_mm.models.maptr.MapTRHead` config (upstream's
            key; its ``train_cfg`` / ``test_cfg`` default to this detector's
            ``train_cfg['pts']`` / ``test_cfg['pts']``, as ``MVXTwoStageDetector``).
        bev_encoder (dict): The BEV encoder (module docstring).
        img_neck (dict, optional): Neck, e.g. ``mmdet.FPN``. Defaults to None.
        use_grid_mask (bool): GridMask the images in training. Defaults to True.
        grid_mask (dict, optional): GridMask config. Defaults to upstream's (:data:`GRID_MASK`,
            ``prob=0.7``).
        video_test_mode (bool): Carry the BEV from frame to frame at test time. Defaults to
            False (upstream's v1 config).
        modality (str): Only ``'vision'`` (upstream's ``'fusion'`` is off in its configs).
            Defaults to 'vision'.
        train_cfg, test_cfg (dict, optional): Upstream's, with a ``pts`` section for the head.
        data_preprocessor (dict, optional): Defaults to None.
        init_cfg (dict, optional): Defaults to None.
    """

    #: What ``turbox.compile.modules='auto'`` compiles of the detector besides the backbone
    #: and neck: the whole head's forward, one graph (the query embeddings, every decoder
    #: layer, the reference-point refinement and the class branches, and v2's auxiliary BEV
    #: and perspective segmentation heads; a few hundred eager launches a step at six layers
    #: when only the layers were compiled). It takes the place of the head's own
    #: ``decoder.layers.*``; its targets and losses stay eager. Training and evaluation compile
    #: once each (v2 decodes its one-to-many queries in training only).
    turbox_compile_submodules = ('pts_bbox_head', )

    def __init__(self,
                 img_backbone: dict,
                 pts_bbox_head: dict,
                 bev_encoder: dict,
                 img_neck: Optional[dict] = None,
                 use_grid_mask: bool = True,
                 grid_mask: Optional[dict] = None,
                 video_test_mode: bool = False,
                 modality: str = 'vision',
                 train_cfg: Optional[dict] = None,
                 test_cfg: Optional[dict] = None,
                 data_preprocessor: Optional[dict] = None,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        if modality != 'vision':
            raise NotImplementedError(f"MapTR: only modality='vision' is ported, got "
                                      f'{modality!r}')
        self.img_backbone = MODELS.build(img_backbone)
        self.img_neck = MODELS.build(img_neck) if img_neck is not None else None
        self.bev_encoder = MODELS.build(bev_encoder)
        head = copy.deepcopy(pts_bbox_head)
        if head.get('train_cfg') is None and train_cfg is not None:
            head['train_cfg'] = train_cfg.get('pts')
        if head.get('test_cfg') is None and test_cfg is not None:
            head['test_cfg'] = test_cfg.get('pts')
        self.pts_bbox_head = MODELS.build(head)
        self.grid_mask = MODELS.build(grid_mask or GRID_MASK) if use_grid_mask else None
        self.video_test_mode = video_test_mode
        self.train_cfg, self.test_cfg = train_cfg, test_cfg
        self.prev_frame_info = dict(prev_bev=None, scene_token=None, prev_pos=0,
                                    prev_angle=0)

    # -- features -----------------------------------------------------------------------------

    def extract_feat(self, batch_inputs_dict: Dict) -> List[Tensor]:
        """Image features ``[B, N, C, h, w]`` per neck level.

        Args:
            batch_inputs_dict (dict): ``imgs`` ``[B, N, 3, H, W]`` (the data preprocessor's).

        Returns:
            list[Tensor]: One tensor per neck level.
        """
        imgs = batch_inputs_dict.get('imgs')
        if imgs is None or imgs.dim() != 5:
            shape = None if imgs is None else tuple(imgs.shape)
            raise ValueError(f"MapTR: inputs['imgs'] must be [B, N, 3, H, W] (one frame: "
                             f'queue_length 1), got {shape}')
        batch, cams = imgs.shape[:2]
        x = imgs.flatten(0, 1).float()  # upstream forces the inputs to fp32
        if self.grid_mask is not None and self.training:
            x = self.grid_mask(x)
        feats = self.img_backbone(x)
        if self.img_neck is not None:
            feats = self.img_neck(feats)
        if isinstance(feats, Tensor):
            feats = [feats]
        return [f.reshape(batch, cams, *f.shape[1:]) for f in feats]

    @staticmethod
    def img_metas(batch_data_samples: Sequence) -> List[dict]:
        """Copies of the samples' metainfo for the encoder, ``can_bus`` as a float64 array
        (its own copy, so the deltas below never touch the data samples)."""
        metas = []
        for index, sample in enumerate(batch_data_samples):
            meta = dict(sample.metainfo)
            if 'can_bus' not in meta:
                raise KeyError(f"MapTR: sample {index} (sample_idx {meta.get('sample_idx')}) "
                               'lacks can_bus in its metainfo; the pipeline needs '
                               'turbox_mm.NuScenesMapTRAdaptor and turbox_mm.PackMapTRInputs')
            meta['can_bus'] = np.array(meta['can_bus'], dtype=np.float64)
            metas.append(meta)
        return metas

    def encode(self, feats: List[Tensor], img_metas: List[dict],
               prev_bev: Optional[Tensor] = None) -> Tensor:
        """The BEV embedding ``[B, H * W, C]`` (or ``[B, C, H, W]``) of the encoder."""
        return self.bev_encoder(feats, img_metas, prev_bev=prev_bev)

    def _single_frame_metas(self, batch_data_samples: Sequence) -> List[dict]:
        """Metas of frames without history: ``can_bus`` position and yaw in degrees zeroed
        (upstream's ``union2one`` in training, ``forward_test`` without a previous BEV)."""
        metas = self.img_metas(batch_data_samples)
        for meta in metas:
            meta['can_bus'][:3] = 0
            meta['can_bus'][-1] = 0
        return metas

    # -- modes --------------------------------------------------------------------------------

    def loss(self, batch_inputs_dict: Dict, batch_data_samples: Sequence, **kwargs) -> Dict:
        """The head's losses of every decoder layer (``loss_*`` and ``d{i}.loss_*``)."""
        feats = self.extract_feat(batch_inputs_dict)
        bev = self.encode(feats, self._single_frame_metas(batch_data_samples), prev_bev=None)
        with torch.autocast(device_type=bev.device.type, enabled=False):
            return self.pts_bbox_head.loss(bev.float(), batch_data_samples)

    def _test_metas(self, batch_data_samples: Sequence) -> tuple:
        """Upstream's ``forward_test`` bookkeeping: ``(metas, prev_bev, (pos, angle))``."""
        if not self.video_test_mode:
            self.prev_frame_info['prev_bev'] = None
            return self._single_frame_metas(batch_data_samples), None, None
        if len(batch_data_samples) != 1:
            raise ValueError('MapTR: video_test_mode needs one sample per test batch (as '
                             f'upstream), got {len(batch_data_samples)}')
        metas = self.img_metas(batch_data_samples)
        meta, info = metas[0], self.prev_frame_info
        if meta.get('scene_token') != info['scene_token']:
            info['prev_bev'] = None
        info['scene_token'] = meta.get('scene_token')
        pose = (meta['can_bus'][:3].copy(), float(meta['can_bus'][-1]))
        if info['prev_bev'] is not None:
            meta['can_bus'][:3] -= info['prev_pos']
            meta['can_bus'][-1] -= info['prev_angle']
        else:
            meta['can_bus'][:3] = 0
            meta['can_bus'][-1] = 0
        return metas, info['prev_bev'], pose

    def predict(self, batch_inputs_dict: Dict, batch_data_samples: Sequence, **kwargs):
        """Map vectors per sample as ``pred_instances_3d`` (module docstring)."""
        feats = self.extract_feat(batch_inputs_dict)
        metas, prev_bev, pose = self._test_metas(batch_data_samples)
        bev = self.encode(feats, metas, prev_bev=prev_bev)
        with torch.autocast(device_type=bev.device.type, enabled=False):
            results = self.pts_bbox_head.predict(bev.float(), metas)
        if pose is not None:
            # a copy: a compiled encoder's output may live in a CUDA graph's pool
            # (compile.mode='reduce-overhead'), which the next step's replays overwrite
            self.prev_frame_info.update(prev_pos=pose[0], prev_angle=pose[1],
                                        prev_bev=bev.detach().clone())
        return self.add_pred_to_datasample(batch_data_samples, data_instances_3d=results)

    def _forward(self, batch_inputs_dict: Dict, batch_data_samples: Sequence = None,
                 **kwargs) -> Dict[str, Optional[Tensor]]:
        """The head's raw outputs (``mode='tensor'``), without history."""
        feats = self.extract_feat(batch_inputs_dict)
        bev = self.encode(feats, self._single_frame_metas(batch_data_samples))
        with torch.autocast(device_type=bev.device.type, enabled=False):
            return self.pts_bbox_head(bev.float())
