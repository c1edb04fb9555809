"""``MapTRv2``: MapTR v2's detector (upstream ``detectors/maptrv2.py`` @ 69ab751 / e1e6d64, an
mmdet3d 0.17 ``MVXTwoStageDetector``), as an mmdet3d 1.x detector (docs/design/maptr.md,
section 2).

The flow is v1's (:class:`~turbox_mm.models.maptr.MapTR`) with three differences:

- The BEV encoder is the LSS transform (:class:`.LSSTransform`): it returns the BEV embedding
  and the per-camera depth distributions ``(bev, depth)``, and owns the depth loss
  (``get_depth_loss``), added as ``loss_depth`` (``nan_to_num``'d, as upstream) when the
  samples carry ``gt_depth`` ``[N, H, W]`` (``PointToMultiViewDepth`` and
  ``PadMultiViewImageDepth`` in the pipeline, packed by ``PackMapTRInputs``).
- The head (:class:`.MapTRv2Head`) also gets the last image-feature level for its perspective
  segmentation head, and adds the one-to-many and segmentation losses.
- Precision: upstream's v2 head forward is ``force_fp32``, and the LSS encoder runs inside it,
  so here the encoder, the head and the losses run in float32 with autocast off; only the
  backbone and neck follow the optim wrapper's autocast (upstream's ``auto_fp16`` of
  ``extract_feat``).
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from turbox_mm.registry import MODELS
from .maptr import MapTR


@MODELS.register_module()
class MapTRv2(MapTR):
    """MapTR v2 (Liao et al., 2023) for mmdet3d 1.x (module docstring); the arguments are
    :class:`~turbox_mm.models.maptr.MapTR`'s, ``bev_encoder`` an encoder returning
    ``(bev, depth)`` with a ``get_depth_loss(gt_depth, depth)`` method."""

    def encode_with_depth(self, feats: List[Tensor], img_metas: List[dict],
                          prev_bev: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """``(bev [B, H * W, C], depth)`` of the encoder, in float32 with autocast off."""
        with torch.autocast(device_type=feats[0].device.type, enabled=False):
            out = self.bev_encoder([f.float() for f in feats], img_metas, prev_bev=prev_bev)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError(f'MapTRv2: bev_encoder {type(self.bev_encoder).__name__} must '
                            'return (bev, depth), as turbox_mm.LSSTransform does')
        return out[0], out[1]

    def encode(self, feats: List[Tensor], img_metas: List[dict],
               prev_bev: Optional[Tensor] = None) -> Tensor:
        """The BEV embedding alone (prediction and ``mode='tensor'``)."""
        return self.encode_with_depth(feats, img_metas, prev_bev)[0]

    @staticmethod
    def gt_depth(batch_data_samples: Sequence) -> Optional[Tensor]:
        """The samples' ``gt_depth`` stacked ``[B, N, H, W]``, or None when no sample has one
        (upstream's ``gt_depth=None``: no depth loss). Some samples with and some without is
        an error naming the first without."""
        present = ['gt_depth' in sample for sample in batch_data_samples]
        if not any(present):
            return None
        if not all(present):
            index = present.index(False)
            meta = batch_data_samples[index].metainfo
            raise KeyError(f"MapTRv2: sample {index} (token {meta.get('token')}) has no "
                           'gt_depth while others of its batch do')
        return torch.stack([sample.gt_depth for sample in batch_data_samples])

    def loss(self, batch_inputs_dict: Dict, batch_data_samples: Sequence, **kwargs) -> Dict:
        """``loss_depth`` (when the samples carry ``gt_depth``), the segmentation losses, and
        the head's one-to-one and one-to-many losses of every decoder layer."""
        feats = self.extract_feat(batch_inputs_dict)
        metas = self._single_frame_metas(batch_data_samples)
        bev, depth = self.encode_with_depth(feats, metas, prev_bev=None)
        losses = {}
        with torch.autocast(device_type=bev.device.type, enabled=False):
            gt_depth = self.gt_depth(batch_data_samples)
            if gt_depth is not None:
                loss_depth = self.bev_encoder.get_depth_loss(gt_depth.to(depth.device), depth)
                losses['loss_depth'] = torch.nan_to_num(loss_depth)
            losses.update(self.pts_bbox_head.loss(bev.float(), batch_data_samples,
                                                  img_feats=feats[-1].float()))
        return losses
