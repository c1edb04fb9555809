"""Sparse4D v3's temporal denoising: denoising groups carried from one frame to the next.

:class:`TemporalDnMixin` is the temporal half of
:class:`~turbox_mm.models.sparse4d.target.SparseBox3DTarget` (design doc 2.10.4): it keeps
some denoising groups of a frame (:meth:`~TemporalDnMixin.cache_dn`), moves their anchors into
the next frame (:meth:`~TemporalDnMixin.project_dn_anchors`) and re-targets them there by
instance id (:meth:`~TemporalDnMixin.update_dn`). The host needs no wait in any of them.
"""
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from turbox_mm.utils.upload import upload

#: Label of padding (a denoising query matched to, or drawn from, a padded ground-truth slot).
DN_PADDING = -1

DnOutput = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Optional[Tensor]]


class TemporalDnMixin:
    """Temporal denoising state and steps; the class using it sets ``num_dn_groups``,
    ``num_temp_dn_groups`` and ``dn_metas``."""

    num_dn_groups: int
    num_temp_dn_groups: int
    dn_metas: Optional[Dict[str, Optional[Tensor]]]

    def cache_dn(self, dn_instance_feature: Tensor, dn_anchor: Tensor, dn_cls_target: Tensor,
                 valid_mask: Tensor, dn_id_target: Optional[Tensor]) -> None:
        """Keep ``num_temp_dn_groups`` random denoising groups (one draw for the whole batch)
        for the next frame, detached, in :attr:`dn_metas`.

        Does nothing when temporal denoising is off or ``dn_id_target`` is None (then whatever
        was cached before stays).

        Args:
            dn_instance_feature (Tensor): ``[B, K, C]`` final-layer features of the dn queries.
            dn_anchor (Tensor): ``[B, K, 11]`` their final anchors.
            dn_cls_target (Tensor): ``[B, K]`` long labels.
            valid_mask (Tensor): ``[B, K]`` bool.
            dn_id_target (Tensor, optional): ``[B, K]`` long instance ids.
        """
        if self.num_temp_dn_groups <= 0 or dn_id_target is None:
            return
        batch, num_dn = dn_instance_feature.shape[:2]
        groups = self.num_dn_groups
        if num_dn % groups:
            raise ValueError(f'SparseBox3DTarget.cache_dn: {num_dn} dn queries do not split into '
                             f'num_dn_groups={groups} groups')
        for name, x in (('dn_anchor', dn_anchor), ('dn_cls_target', dn_cls_target),
                        ('valid_mask', valid_mask), ('dn_id_target', dn_id_target)):
            if tuple(x.shape[:2]) != (batch, num_dn):
                raise ValueError(f'SparseBox3DTarget.cache_dn: {name} must start with '
                                 f'{(batch, num_dn)}, got {tuple(x.shape)}')
        per_group = num_dn // groups
        keep = torch.randperm(groups) < self.num_temp_dn_groups
        # the kept groups' indices (host-side nonzero), uploaded without a wait
        keep = upload(keep.nonzero()[:, 0], dn_instance_feature.device)

        def pick(x: Tensor) -> Tensor:
            return x.detach().reshape(batch, groups, per_group, *x.shape[2:])[:, keep]

        self.dn_metas = dict(
            dn_instance_feature=pick(dn_instance_feature),
            dn_anchor=pick(dn_anchor),
            dn_cls_target=pick(dn_cls_target),
            valid_mask=pick(valid_mask),
            dn_id_target=pick(dn_id_target))

    def project_dn_anchors(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Move the cached dn anchors into the current frame.

        Args:
            fn (callable): Maps anchors ``[B, N, 11]`` to ``[B, N, 11]`` (e.g. the instance
                bank's projection with this frame's transform and time step). Does nothing when
                nothing is cached.
        """
        if self.dn_metas is None:
            return
        anchor = self.dn_metas['dn_anchor']
        projected = fn(anchor.flatten(1, 2))
        self.dn_metas['dn_anchor'] = projected.reshape(anchor.shape)

    def update_dn(self, instance_feature: Tensor, anchor: Tensor, dn_reg_target: Tensor,
                  dn_cls_target: Tensor, valid_mask: Tensor, dn_id_target: Optional[Tensor],
                  num_normal_anchor: int, temporal_valid_mask: Optional[Tensor]) -> DnOutput:
        """Swap the first ``num_temp_dn_groups`` dn groups for the cached ones, re-targeted.

        Each cached group ``g`` is matched to the current group ``g`` by instance id: its
        regression target becomes the sum of the current targets with an equal id, its label
        stays the cached one when some id matched, else -1. An id of -1 (unknown: negatives,
        padding, or ground truth without instance ids) matches nothing; upstream lets -1 match
        -1, which sums every id-less ground truth of the group into one target when instance ids
        are missing. Cached groups are padded
        (zeros, label -1, invalid, id -1) or truncated to the current group length. A sample
        takes the cached version where ``temporal_valid_mask`` is True, else keeps its current
        groups. Order: cached groups, then the remaining current groups; the normal queries
        stay in front.

        Passes everything through unchanged when ``temporal_valid_mask`` is None (and then
        drops the cache), when nothing is cached, when the cache's batch size differs, when
        ``dn_id_target`` is None or when there are no dn queries.

        Args:
            instance_feature (Tensor): ``[B, Q, C]``, normal queries first.
            anchor (Tensor): ``[B, Q, 11]``.
            dn_reg_target (Tensor): ``[B, K, 10]`` with ``K = Q - num_normal_anchor``.
            dn_cls_target (Tensor): ``[B, K]`` long.
            valid_mask (Tensor): ``[B, K]`` bool.
            dn_id_target (Tensor, optional): ``[B, K]`` long.
            num_normal_anchor (int): Queries that are not denoising queries.
            temporal_valid_mask (Tensor, optional): ``[B]`` bool, the instance bank's mask
                (the previous frame is recent enough).

        Returns:
            tuple: ``(instance_feature, anchor, dn_reg_target, dn_cls_target, valid_mask,
            dn_id_target)`` with the same shapes as the inputs.
        """
        unchanged = (instance_feature, anchor, dn_reg_target, dn_cls_target, valid_mask,
                     dn_id_target)
        if temporal_valid_mask is None:
            self.dn_metas = None
        batch, num_query = instance_feature.shape[:2]
        metas = self.dn_metas
        if (metas is None or dn_id_target is None or num_query <= num_normal_anchor
                or metas['dn_instance_feature'].shape[0] != batch):
            return unchanged
        groups = self.num_dn_groups
        num_dn = num_query - num_normal_anchor
        if num_dn % groups:
            raise ValueError(f'SparseBox3DTarget.update_dn: {num_dn} dn queries do not split '
                             f'into num_dn_groups={groups} groups')
        per_group = num_dn // groups
        if temporal_valid_mask.shape != (batch, ):
            raise ValueError(f'SparseBox3DTarget.update_dn: temporal_valid_mask must be '
                             f'[{batch}], got {tuple(temporal_valid_mask.shape)}')

        def split(x: Tensor) -> Tensor:
            return x.reshape(batch, groups, per_group, *x.shape[2:])

        current = [
            split(instance_feature[:, num_normal_anchor:]),
            split(anchor[:, num_normal_anchor:]),
            split(dn_reg_target),
            split(dn_cls_target),
            split(valid_mask),
            split(dn_id_target),
        ]
        cur_reg, cur_id = current[2], current[5]
        temp_id = metas['dn_id_target'].to(cur_id.device)
        num_temp = temp_id.shape[1]
        if num_temp > groups:
            raise ValueError(f'SparseBox3DTarget.update_dn: {num_temp} cached groups, but only '
                             f'num_dn_groups={groups} current ones')
        # [B, Gt, n_prev, n]: cached query i of group g has the id of current query j.
        match = (temp_id[..., None] == cur_id[:, :num_temp, None, :]) & (temp_id[..., None] >= 0)
        temp_reg = (match[..., None].to(cur_reg.dtype) * cur_reg[:, :num_temp, None]).sum(3)
        cached_cls = metas['dn_cls_target'].to(cur_id.device)
        temp_cls = torch.where(match.any(-1), cached_cls, DN_PADDING)
        cached = [metas['dn_instance_feature'], metas['dn_anchor'], temp_reg, temp_cls,
                  metas['valid_mask'], temp_id]
        pad_values = [0, 0, 0, DN_PADDING, False, -1]
        out = []
        use_temp = temporal_valid_mask.to(device=cur_id.device, dtype=torch.bool)
        for temp, cur, pad in zip(cached, current, pad_values):
            temp = temp.to(device=cur.device, dtype=cur.dtype)
            n_prev = temp.shape[2]
            if n_prev < per_group:
                filler = temp.new_full(temp.shape[:2] + (per_group - n_prev, ) + temp.shape[3:],
                                       pad)
                temp = torch.cat([temp, filler], dim=2)
            else:
                temp = temp[:, :, :per_group]
            select = use_temp.reshape((batch, ) + (1, ) * (temp.dim() - 1))
            temp = torch.where(select, temp, cur[:, :num_temp])
            out.append(torch.cat([temp, cur[:, num_temp:]], dim=1).flatten(1, 2))
        out[0] = torch.cat([instance_feature[:, :num_normal_anchor], out[0]], dim=1)
        out[1] = torch.cat([anchor[:, :num_normal_anchor], out[1]], dim=1)
        return tuple(out)
