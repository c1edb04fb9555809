"""``MapTRv2Head``: MapTR v2's head with one-to-many auxiliary queries (upstream
``dense_heads/maptrv2_head.py`` @ 69ab751 and the one-to-many loss of
``detectors/maptrv2.py``; docs/design/maptr.md, sections 4 and 5).

In training the decoder runs ``V_one2one + V_one2many`` vectors (50 + 300): the first group is
matched one to one to the map instances as in v1; the second to the instances repeated
``k_one2many`` times (6), so that several of its vectors learn each instance. The decoupled
self-attention's ``[V, V]`` mask (True = blocked) keeps the groups from seeing each other, so
the one-to-one vectors compute exactly what they would alone. The one-to-many losses come as
``<key>_one2many`` (times ``lambda_one2many``). At test time only the one-to-one vectors run.

Auxiliary segmentation (``aux_seg.use_aux_seg``, upstream's v2 configs): a BEV head
(3x3 convolution without bias, ReLU, 1x1 convolution to ``seg_classes``) on the BEV embedding
as ``[B, C, H, W]`` and a perspective head of the same form on the last image-feature level
``[B * N, C, h, w]``, trained with :class:`.SimpleLoss` against the masks of
:class:`~turbox_mm.datasets.transforms.RasterizeMapGT` (``loss_seg``, ``loss_pv_seg``; not
for the one-to-many group, as upstream). The heads run in training only: upstream also runs
them at test time and discards their outputs. The depth loss is the detector's
(:class:`.MapTRv2`, from its LSS encoder).

The repeated ground truth shares each instance's equivalent orders. Upstream recomputes them
for every copy, which for a ring with more than ``P - 1`` vertices draws another random subset
of its rotations per copy; with precomputed orders the copies use one draw.
"""
from typing import Dict, List, Optional, Sequence

import torch
from mmengine.structures import InstanceData
from torch import Tensor, nn

from turbox_mm.registry import MODELS
from turbox_mm.utils.upload import upload
from .maptr_head import MapTRHead

#: Upstream's ``aux_seg`` defaults (the head's; its v2 configs switch both heads on).
AUX_SEG = dict(use_aux_seg=False, bev_seg=False, pv_seg=False, seg_classes=1,
               feat_down_sample=32, pv_thickness=1)


def _seg_head(channels: int, classes: int) -> nn.Sequential:
    """Upstream's segmentation head: 3x3 convolution (no bias), ReLU, 1x1 convolution."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                         nn.ReLU(inplace=True), nn.Conv2d(channels, classes, 1))


@MODELS.register_module()
class MapTRv2Head(MapTRHead):
    """MapTR v2's head (module docstring); other arguments as :class:`MapTRHead`.

    Args:
        num_vec_one2one (int): One-to-one vectors. Defaults to 50.
        num_vec_one2many (int): One-to-many vectors (training only). Defaults to 300.
        k_one2many (int): Copies of the ground truth for them. Defaults to 6.
        lambda_one2many (float): Weight of their losses. Defaults to 1.
        aux_seg (dict, optional): Upstream's auxiliary segmentation switches
            (``use_aux_seg``, ``bev_seg``, ``pv_seg``, ``seg_classes``; the others are the
            data pipeline's); defaults to :data:`AUX_SEG` (off).
        z_cfg (dict, optional): Upstream's 3D switches; only 2D.
        loss_seg, loss_pv_seg (dict, optional): The segmentation losses; default
            ``SimpleLoss(pos_weight=2.13)`` (upstream's head defaults; its configs use 4.0
            and 1.0 with weights 1.0 and 2.0).
    """

    decoder_layer_type = 'turbox_mm.DecoupledMapTRDecoderLayer'

    def __init__(self, num_vec_one2one: int = 50, num_vec_one2many: int = 300,
                 k_one2many: int = 6, lambda_one2many: float = 1.0,
                 aux_seg: Optional[dict] = None, z_cfg: Optional[dict] = None,
                 loss_seg: Optional[dict] = None, loss_pv_seg: Optional[dict] = None,
                 **kwargs) -> None:
        if z_cfg is not None and (z_cfg.get('gt_z_flag') or z_cfg.get('pred_z_flag')):
            raise NotImplementedError('MapTRv2Head: 3D points (z_cfg) are not ported')
        kwargs.pop('num_vec', None)
        super().__init__(num_vec=num_vec_one2one + num_vec_one2many, **kwargs)
        self.num_vec_one2one = num_vec_one2one
        self.num_vec_one2many = num_vec_one2many
        self.k_one2many = k_one2many
        self.lambda_one2many = lambda_one2many
        mask = torch.zeros(self.num_vec, self.num_vec, dtype=torch.bool)
        mask[num_vec_one2one:, :num_vec_one2one] = True
        mask[:num_vec_one2one, num_vec_one2one:] = True
        self.register_buffer('self_attn_mask', mask, persistent=False)
        self.aux_seg = dict(AUX_SEG, **(aux_seg or {}))
        self.seg_head = self.pv_seg_head = None
        if self.aux_seg['use_aux_seg']:
            if not (self.aux_seg['bev_seg'] or self.aux_seg['pv_seg']):
                raise ValueError('MapTRv2Head: aux_seg.use_aux_seg needs bev_seg or pv_seg')
            classes = int(self.aux_seg['seg_classes'])
            if self.aux_seg['bev_seg']:
                self.seg_head = _seg_head(self.embed_dims, classes)
                self.loss_seg = MODELS.build(loss_seg or dict(type='turbox_mm.SimpleLoss',
                                                              pos_weight=2.13))
            if self.aux_seg['pv_seg']:
                self.pv_seg_head = _seg_head(self.embed_dims, classes)
                self.loss_pv_seg = MODELS.build(loss_pv_seg or dict(
                    type='turbox_mm.SimpleLoss', pos_weight=2.13))

    def _num_vec(self) -> int:
        return self.num_vec if self.training else self.num_vec_one2one

    def _layer_kwargs(self, num_vec: int) -> dict:
        return dict(self_attn_mask=self.self_attn_mask[:num_vec, :num_vec], num_vec=num_vec,
                    num_pts_per_vec=self.num_pts_per_vec)

    def forward(self, bev_embed: Tensor, batch_input_metas: Optional[List[dict]] = None,
                img_feats: Optional[Tensor] = None) -> Dict[str, Optional[Tensor]]:
        """As :meth:`MapTRHead.forward`, the outputs holding the one-to-one vectors; in
        training ``one2many_outs`` holds the one-to-many ones (``all_cls_scores``,
        ``all_bbox_preds``, ``all_pts_preds`` and the ``enc_*`` Nones), else it is None.

        With the auxiliary heads, in training: ``seg`` ``[B, seg_classes, H, W]`` logits of
        the BEV and, given ``img_feats`` (the last image-feature level ``[B, N, C, h, w]``),
        ``pv_seg`` ``[B, N, seg_classes, h, w]``; else both are None.
        """
        outs = super().forward(bev_embed, batch_input_metas)
        keys = ('all_cls_scores', 'all_bbox_preds', 'all_pts_preds')
        split = self.num_vec_one2one
        one2many = None
        if outs['all_cls_scores'].shape[2] > split:
            one2many = {key: outs[key][:, :, split:] for key in keys}
            one2many.update(enc_cls_scores=None, enc_bbox_preds=None, enc_pts_preds=None)
        outs.update({key: outs[key][:, :, :split] for key in keys})
        outs['one2many_outs'] = one2many
        outs['seg'] = outs['pv_seg'] = None
        if self.training and self.seg_head is not None:
            bev = outs['bev_embed']
            grid = bev.transpose(1, 2).reshape(bev.shape[0], -1, self.bev_h, self.bev_w)
            outs['seg'] = self.seg_head(grid)
        if self.training and self.pv_seg_head is not None and img_feats is not None:
            batch, cams = img_feats.shape[:2]
            pv = self.pv_seg_head(img_feats.flatten(0, 1).to(bev_embed.dtype))
            outs['pv_seg'] = pv.view(batch, cams, *pv.shape[1:])
        return outs

    def loss(self, bev_embed: Tensor, batch_data_samples: Sequence,
             img_feats: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Losses of a batch: ground truth from each sample's ``gt_instances_3d`` and, with
        the auxiliary heads, its ``gt_map_bev_seg`` ``[seg_classes, H, W]`` and
        ``gt_map_pv_seg`` ``[N, seg_classes, h, w]`` masks (``PackMapTRInputs``)."""
        metas = [getattr(s, 'metainfo', None) for s in batch_data_samples]
        preds = self(bev_embed, metas, img_feats=img_feats)
        masks = {}
        for key, field in (('seg', 'gt_map_bev_seg'), ('pv_seg', 'gt_map_pv_seg')):
            if preds.get(key) is not None:
                masks[key] = self._stacked_masks(batch_data_samples, field,
                                                 preds[key].device)
        return self.loss_by_feat(preds, [s.gt_instances_3d for s in batch_data_samples],
                                 masks)

    def _stacked_masks(self, batch_data_samples: Sequence, field: str,
                       device: torch.device) -> Tensor:
        """The samples' ``field`` masks stacked, on ``device`` (one upload)."""
        masks = []
        for index, sample in enumerate(batch_data_samples):
            if field not in sample:
                raise KeyError(f'MapTRv2Head: sample {index} ({sample.metainfo.get("token")}) '
                               f'has no {field}; with aux_seg the train pipeline needs '
                               'turbox_mm.RasterizeMapGT and PackMapTRInputs with that key')
            mask = sample.get(field)
            masks.append(mask if isinstance(mask, Tensor) else torch.as_tensor(mask))
        stacked = torch.stack(masks)
        if self.op_impl == 'turbox':  # pinned and non-blocking: no host wait
            return upload(stacked, device, torch.float32)
        return stacked.to(device=device, dtype=torch.float32)

    def loss_by_feat(self, preds: Dict[str, Tensor], batch_gt_instances: Sequence[InstanceData],
                     masks: Optional[Dict[str, Tensor]] = None) -> Dict[str, Tensor]:
        """The one-to-one losses (v1's keys), with one-to-many outputs every key again as
        ``<key>_one2many`` against the ground truth repeated ``k_one2many`` times, and
        ``loss_seg`` / ``loss_pv_seg`` for the segmentation outputs whose masks are given
        (``masks['seg']`` ``[B, seg_classes, H, W]``, ``masks['pv_seg']`` ``[B, N,
        seg_classes, h, w]``)."""
        device = preds['all_cls_scores'].device
        gts = [self.ground_truth(gt, device) for gt in batch_gt_instances]
        groups = [(preds, gts)]
        if preds.get('one2many_outs') is not None:
            k = self.k_one2many
            repeated = [(labels.repeat(k), bboxes.repeat(k, 1), shifts.repeat(k, 1, 1, 1))
                        for labels, bboxes, shifts in gts]
            groups.append((preds['one2many_outs'], repeated))
        results = self.group_losses(groups)
        losses = {}
        masks = masks or {}
        if preds.get('seg') is not None and 'seg' in masks:
            losses['loss_seg'] = self.loss_seg(preds['seg'], masks['seg'])
        if preds.get('pv_seg') is not None and 'pv_seg' in masks:
            losses['loss_pv_seg'] = self.loss_pv_seg(preds['pv_seg'], masks['pv_seg'])
        losses.update(results[0])
        if len(results) > 1:
            losses.update({f'{key}_one2many': value * self.lambda_one2many
                           for key, value in results[1].items()})
        return losses
