"""Sparse4D v3's denoising queries: noisy copies of the ground truths, matched back to them.

:class:`DenoisingMixin` is the single-frame denoising half of
:class:`~turbox_mm.models.sparse4d.target.SparseBox3DTarget` (design doc 2.10.3):
:meth:`~DenoisingMixin.get_dn_anchors` draws, per group, noisy copies of every ground truth
(positives) and farther copies (negatives), and assigns each to a ground-truth slot with one
Hungarian matching for all groups and samples. Groups only see each other inside a group.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .temporal_dn import DN_PADDING, DnOutput

#: Label of a denoising query that matched no ground truth (an explicit negative).
DN_NEGATIVE = -3


class DenoisingMixin:
    """Denoising queries of a batch; the class using it sets ``num_dn_groups``,
    ``num_temp_dn_groups``, ``max_dn_gt`` and ``add_neg_dn``, and provides the target's
    checks, encoding and matching (``_check_gts``, ``_encode_padded``, ``_constant``,
    ``_bad_labels``, ``_box_cost``, ``_solve_checked``)."""

    num_dn_groups: int
    num_temp_dn_groups: int
    max_dn_gt: int
    add_neg_dn: bool

    def get_dn_anchors(self,
                       cls_target: Sequence[Tensor],
                       box_target: Sequence[Tensor],
                       gt_instance_id: Optional[Sequence[Tensor]] = None) -> Optional[DnOutput]:
        """Build the denoising queries of a batch (training only).

        With ``M = min(max_b n_b, max_dn_gt)`` (padded GT slots get label -1 and a zero box)
        and ``n = 2M`` with negatives (else ``M``), each of the ``num_dn_groups`` groups holds
        ``n`` noisy anchors: the ``M`` positives, then the ``M`` negatives. In each group the
        noisy anchors are matched to the ``M`` GT slots (Hungarian, box cost with unit per-GT
        weights). Matched anchors take the GT's target, label and id; anchors matched to a
        padded slot get label -1, unmatched ones -3 (explicit negative) and id -1.

        The noise draws from torch's global generator (``torch.manual_seed`` reproduces it).

        Args:
            cls_target (list[Tensor]): Per sample ``[n_b]`` long labels.
            box_target (list[Tensor]): Per sample ``[n_b, 9]`` boxes.
            gt_instance_id (list[Tensor], optional): Per sample ``[n_b]`` long instance ids;
                ignored when ``num_temp_dn_groups`` is 0. Defaults to None.

        Returns:
            tuple or None: None when ``num_dn_groups`` is 0 or no sample has a GT; else, with
            ``K = num_dn_groups * n`` (group-major):

            - ``dn_anchor`` ``[B, K, 11]``: the noisy anchors, ``vz`` = 0;
            - ``dn_reg_target`` ``[B, K, 10]``;
            - ``dn_cls_target`` ``[B, K]`` long, in ``{label, -1, -3}``;
            - ``attn_mask`` ``[K, K]`` bool, True = blocked (everything but the ``n x n``
              diagonal blocks);
            - ``valid_mask`` ``[B, K]`` bool: matched to a real GT, or an explicit negative
              drawn from a real GT (i.e. not padding);
            - ``dn_id_target`` ``[B, K]`` long, or None without ids / temporal denoising.
        """
        if self.num_dn_groups <= 0:
            return None
        self._check_gts(cls_target, box_target)
        if len(cls_target) == 0:
            return None
        if self.num_temp_dn_groups <= 0:
            gt_instance_id = None
        if gt_instance_id is not None:
            if len(gt_instance_id) != len(cls_target):
                raise ValueError(f'SparseBox3DTarget.get_dn_anchors: gt_instance_id has '
                                 f'{len(gt_instance_id)} samples, cls_target {len(cls_target)}')
            for i, (ids, labels) in enumerate(zip(gt_instance_id, cls_target)):
                if tuple(ids.shape) != tuple(labels.shape):
                    raise ValueError(f'SparseBox3DTarget.get_dn_anchors: gt_instance_id[{i}] '
                                     f'must be {tuple(labels.shape)}, got {tuple(ids.shape)}')
        cls_target = [c[:self.max_dn_gt] for c in cls_target]
        box_target = [b[:self.max_dn_gt] for b in box_target]
        num_gt = max(c.shape[0] for c in cls_target)
        if num_gt == 0:
            return None
        device = cls_target[0].device
        batch, groups = len(cls_target), self.num_dn_groups

        # Padded GTs: label -1, zero target, id -1.
        labels = torch.stack([F.pad(c.to(device, torch.long), (0, num_gt - c.shape[0]),
                                    value=DN_PADDING) for c in cls_target])
        gt_box, _ = self._encode_padded(box_target, num_gt, device)
        ids = None
        if gt_instance_id is not None:
            ids = torch.stack([F.pad(x[:self.max_dn_gt].to(device, torch.long),
                                     (0, num_gt - min(x.shape[0], self.max_dn_gt)),
                                     value=-1) for x in gt_instance_id])

        # Rows are (group, sample), group-major: row g * B + b.
        labels = labels.repeat(groups, 1)
        gt_box = gt_box.repeat(groups, 1, 1)
        ids = ids.repeat(groups, 1) if ids is not None else None
        scale = self._constant('dn_noise_scale', gt_box)
        anchors = gt_box + (torch.rand_like(gt_box) * 2 - 1) * scale
        source_labels = labels
        if self.add_neg_dn:
            magnitude = torch.rand_like(gt_box) + 1
            sign = (torch.rand_like(gt_box) > 0.5).to(gt_box.dtype) * 2 - 1
            anchors = torch.cat([anchors, gt_box + magnitude * sign * scale], dim=1)
            source_labels = torch.cat([labels, labels], dim=1)
        per_group = anchors.shape[1]

        # One transfer to the CPU for all rows (with the label check); the assignment comes
        # back as one index tensor: the matched GT slot of each anchor, -1 where unmatched.
        bad = self._bad_labels(labels[:batch], [c.shape[0] for c in cls_target])
        cost = self._box_cost(anchors, gt_box, torch.ones_like(gt_box))
        pairs = self._solve_checked(cost, [num_gt], bad, cls_target)
        matched = torch.full(anchors.shape[:2], -1, dtype=torch.long, device=device)
        matched[pairs[0], pairs[1]] = pairs[2]
        hit = matched >= 0
        dims = gt_box.shape[-1]
        slot = matched.clamp(min=0)
        dn_box = torch.where(hit[..., None],
                             torch.gather(gt_box, 1, slot[..., None].expand(-1, -1, dims)),
                             0.0)
        dn_cls = torch.where(hit, torch.gather(labels, 1, slot), DN_NEGATIVE)
        dn_id = None
        if ids is not None:
            dn_id = torch.where(hit, torch.gather(ids, 1, slot), -1)

        def to_batch_major(x: Tensor) -> Tensor:
            x = x.reshape(groups, batch, per_group, *x.shape[2:]).transpose(0, 1)
            return x.flatten(1, 2)

        dn_anchor = to_batch_major(anchors)
        dn_anchor = torch.cat([dn_anchor, dn_anchor.new_zeros(dn_anchor.shape[:2] + (1, ))], -1)
        dn_box, dn_cls = to_batch_major(dn_box), to_batch_major(dn_cls)
        dn_id = to_batch_major(dn_id) if dn_id is not None else None
        source_labels = to_batch_major(source_labels)
        valid_mask = (dn_cls >= 0) | ((source_labels >= 0) & (dn_cls == DN_NEGATIVE))
        total = groups * per_group
        block = torch.arange(total, device=device) // per_group
        attn_mask = block[:, None] != block[None, :]
        return dn_anchor, dn_box, dn_cls, attn_mask, valid_mask, dn_id
