"""``MapTRv2Head``: MapTR v2's head with one-to-many auxiliary queries (upstream
``dense_heads/maptrv2_head.py`` @ 69ab751 and the one-to-many loss of
``detectors/maptrv2.py``; docs/design/maptr.md, sections 4 and 5).

In training the decoder runs ``V_one2one + V_one2many`` vectors (50 + 300): the first group is
matched one to one to the map instances as in v1; the second to the instances repeated
``k_one2many`` times (6), so that several of its vectors learn each instance. The decoupled
self-attention's ``[V, V]`` mask (True = blocked) keeps the groups from seeing each other, so
the one-to-one vectors compute exactly what they would alone. The one-to-many losses come as
``<key>_one2many`` (times ``lambda_one2many``). At test time only the one-to-one vectors run.

Not yet ported: the auxiliary BEV and perspective segmentation heads (``aux_seg``; their
``SimpleLoss`` terms ``loss_seg``, ``loss_pv_seg``) and the depth loss (the LSS encoder's).

The repeated ground truth shares each instance's equivalent orders. Upstream recomputes them
for every copy, which for a ring with more than ``P - 1`` vertices draws another random subset
of its rotations per copy; with precomputed orders the copies use one draw.
"""
from typing import Dict, List, Optional, Sequence

import torch
from mmengine.structures import InstanceData
from torch import Tensor

from turbox_mm.registry import MODELS
from .maptr_head import MapTRHead


@MODELS.register_module()
class MapTRv2Head(MapTRHead):
    """MapTR v2's head (module docstring); other arguments as :class:`MapTRHead`.

    Args:
        num_vec_one2one (int): One-to-one vectors. Defaults to 50.
        num_vec_one2many (int): One-to-many vectors (training only). Defaults to 300.
        k_one2many (int): Copies of the ground truth for them. Defaults to 6.
        lambda_one2many (float): Weight of their losses. Defaults to 1.
        aux_seg (dict, optional): Upstream's auxiliary segmentation switches; only
            ``use_aux_seg=False`` for now.
        z_cfg (dict, optional): Upstream's 3D switches; only 2D.
    """

    decoder_layer_type = 'turbox_mm.DecoupledMapTRDecoderLayer'

    def __init__(self, num_vec_one2one: int = 50, num_vec_one2many: int = 300,
                 k_one2many: int = 6, lambda_one2many: float = 1.0,
                 aux_seg: Optional[dict] = None, z_cfg: Optional[dict] = None,
                 **kwargs) -> None:
        if aux_seg is not None and aux_seg.get('use_aux_seg', False):
            raise NotImplementedError('MapTRv2Head: the auxiliary segmentation heads '
                                      '(aux_seg.use_aux_seg) are not ported yet')
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

    def _num_vec(self) -> int:
        return self.num_vec if self.training else self.num_vec_one2one

    def _layer_kwargs(self, num_vec: int) -> dict:
        return dict(self_attn_mask=self.self_attn_mask[:num_vec, :num_vec], num_vec=num_vec,
                    num_pts_per_vec=self.num_pts_per_vec)

    def forward(self, bev_embed: Tensor,
                batch_input_metas: Optional[List[dict]] = None) -> Dict[str, Optional[Tensor]]:
        """As :meth:`MapTRHead.forward`, the outputs holding the one-to-one vectors; in
        training ``one2many_outs`` holds the one-to-many ones (``all_cls_scores``,
        ``all_bbox_preds``, ``all_pts_preds`` and the ``enc_*`` Nones), else it is None."""
        outs = super().forward(bev_embed, batch_input_metas)
        keys = ('all_cls_scores', 'all_bbox_preds', 'all_pts_preds')
        split = self.num_vec_one2one
        one2many = None
        if outs['all_cls_scores'].shape[2] > split:
            one2many = {key: outs[key][:, :, split:] for key in keys}
            one2many.update(enc_cls_scores=None, enc_bbox_preds=None, enc_pts_preds=None)
        outs.update({key: outs[key][:, :, :split] for key in keys})
        outs['one2many_outs'] = one2many
        return outs

    def loss_by_feat(self, preds: Dict[str, Tensor],
                     batch_gt_instances: Sequence[InstanceData]) -> Dict[str, Tensor]:
        """The one-to-one losses (v1's keys) and, with one-to-many outputs, every key again
        as ``<key>_one2many`` against the ground truth repeated ``k_one2many`` times."""
        device = preds['all_cls_scores'].device
        gts = [self.ground_truth(gt, device) for gt in batch_gt_instances]
        groups = [(preds, gts)]
        if preds.get('one2many_outs') is not None:
            k = self.k_one2many
            repeated = [(labels.repeat(k), bboxes.repeat(k, 1), shifts.repeat(k, 1, 1, 1))
                        for labels, bboxes, shifts in gts]
            groups.append((preds['one2many_outs'], repeated))
        results = self.group_losses(groups)
        losses = dict(results[0])
        if len(results) > 1:
            losses.update({f'{key}_one2many': value * self.lambda_one2many
                           for key, value in results[1].items()})
        return losses
