"""Sparse4D v3's training targets: Hungarian matching, denoising queries, temporal denoising.

Three jobs, all on the 10-number regression target ``[x, y, z, log l, log w, log h, sin yaw,
cos yaw, vx, vy]`` (the state of :mod:`.box3d` without ``vz``, which upstream never supervises,
docs/design/sparse4d.md 0.3-4):

- :meth:`SparseBox3DTarget.sample` assigns each ground truth to one of the ``Q`` predictions of
  a decoder layer (one-to-one, scipy's Hungarian solver on a focal-style class cost plus a
  weighted L1 box cost, design doc 2.10.2);
- :meth:`SparseBox3DTarget.get_dn_anchors` builds the denoising queries: noisy copies of the
  ground truths (positives) and farther copies (negatives), in independent groups that only see
  each other inside a group (2.10.3);
- :meth:`SparseBox3DTarget.cache_dn` and :meth:`SparseBox3DTarget.update_dn` carry some of those
  groups into the next frame, where they are re-targeted by instance id (2.10.4).
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from turbox_mm.registry import TASK_UTILS
from .box3d import COS_YAW, SIN_YAW, VX, VY, X, Z

#: Length of a regression target (the state without ``vz``).
REG_DIM = 10
#: What an infinite or NaN matching cost is replaced by before the solver sees it.
INVALID_COST = 1e8
#: Label of a denoising query that matched no ground truth (an explicit negative).
DN_NEGATIVE = -3
#: Label of padding (a denoising query matched to, or drawn from, a padded ground-truth slot).
DN_PADDING = -1

DnOutput = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Optional[Tensor]]


def _as_weight_vector(value: Union[float, Sequence[float]], name: str) -> List[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * REG_DIM
    value = [float(v) for v in value]
    if len(value) != REG_DIM:
        raise ValueError(f'SparseBox3DTarget: {name} needs {REG_DIM} numbers (x, y, z, 3 log '
                         f'sizes, sin, cos, vx, vy), got {len(value)}')
    return value


@TASK_UTILS.register_module()
class SparseBox3DTarget:
    """Targets of Sparse4D v3: one-to-one matching, denoising and temporal denoising queries.

    Args:
        cls_weight (float): Weight of the class cost in the matching. Defaults to 2.0.
        alpha (float): Focal-cost balance. Defaults to 0.25.
        gamma (float): Focal-cost exponent. Defaults to 2.0.
        eps (float): Added inside the logarithms of the class cost. Defaults to 1e-12.
        box_weight (float): Weight of the box cost in the matching. Defaults to 0.25.
        reg_weights (list[float], optional): Per-dimension weights of the box cost (matching
            only; the loss has its own). Defaults to None, the v3 config's
            ``[2, 2, 2, .5, .5, .5, 0, 0, 0, 0]`` (centre and log sizes only).
        cls_wise_reg_weights (dict[int, list[float]], optional): Class index to the 10 per-GT
            weights that replace the default ones (1 where the target is finite) for that
            class, in the cost and in the returned ``reg_weights``; the v3 config gives the
            traffic cone ``{9: [2, 2, 2, 1, 1, 1, 0, 0, 1, 1]}`` (no yaw). Defaults to None.
        num_dn_groups (int): Denoising groups; 0 turns denoising off. Defaults to 0.
        num_temp_dn_groups (int): Of those, how many are carried to the next frame; 0 turns
            temporal denoising off (and instance ids are then ignored). Defaults to 0.
        dn_noise_scale (float or list[float]): Noise scale per regression dimension. Positive
            queries get ``U(-1, 1) * scale``, negatives ``±U(1, 2) * scale``. Defaults to 0.5.
        max_dn_gt (int): At most this many ground truths per sample (the first ones) get
            denoising queries. Defaults to 32.
        add_neg_dn (bool): Add the negative copies. Defaults to True.
        num_classes (int): Classes; the background label of :meth:`sample`. Defaults to 10.

    The per-frame temporal state lives in :attr:`dn_metas` (None until :meth:`cache_dn` stored
    something). The head projects the cached anchors into the next frame before calling
    :meth:`update_dn`, with :meth:`project_dn_anchors` or by overwriting
    ``dn_metas['dn_anchor']`` (shape ``[B, num_temp_dn_groups, n, 11]``).

    Examples:
        >>> target = SparseBox3DTarget(num_classes=3)
        >>> gt_cls = [torch.tensor([1])]
        >>> gt_box = [torch.tensor([[5., 0., 1., 4., 2., 1.5, 0., 1., 0.]])]
        >>> labels, boxes, weights = target.sample(torch.zeros(1, 4, 3), torch.zeros(1, 4, 10),
        ...                                        gt_cls, gt_box)
        >>> labels.shape, boxes.shape, int((labels == 1).sum())
        (torch.Size([1, 4]), torch.Size([1, 4, 10]), 1)
    """

    def __init__(self,
                 cls_weight: float = 2.0,
                 alpha: float = 0.25,
                 gamma: float = 2.0,
                 eps: float = 1e-12,
                 box_weight: float = 0.25,
                 reg_weights: Optional[Sequence[float]] = None,
                 cls_wise_reg_weights: Optional[Dict[int, Sequence[float]]] = None,
                 num_dn_groups: int = 0,
                 num_temp_dn_groups: int = 0,
                 dn_noise_scale: Union[float, Sequence[float]] = 0.5,
                 max_dn_gt: int = 32,
                 add_neg_dn: bool = True,
                 num_classes: int = 10) -> None:
        if num_dn_groups < 0 or num_temp_dn_groups < 0:
            raise ValueError(f'SparseBox3DTarget: num_dn_groups ({num_dn_groups}) and '
                             f'num_temp_dn_groups ({num_temp_dn_groups}) must be >= 0')
        if num_temp_dn_groups > num_dn_groups:
            raise ValueError(f'SparseBox3DTarget: num_temp_dn_groups ({num_temp_dn_groups}) '
                             f'cannot exceed num_dn_groups ({num_dn_groups})')
        if max_dn_gt <= 0:
            raise ValueError(f'SparseBox3DTarget: max_dn_gt must be positive, got {max_dn_gt}')
        self.cls_weight = float(cls_weight)
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.eps = float(eps)
        self.box_weight = float(box_weight)
        if reg_weights is None:
            reg_weights = [2.0] * 3 + [0.5] * 3 + [0.0] * 4
        self.reg_weights = _as_weight_vector(reg_weights, 'reg_weights')
        self.cls_wise_reg_weights = {
            int(c): _as_weight_vector(w, f'cls_wise_reg_weights[{c}]')
            for c, w in (cls_wise_reg_weights or {}).items()
        }
        self.num_dn_groups = int(num_dn_groups)
        self.num_temp_dn_groups = int(num_temp_dn_groups)
        self.dn_noise_scale = _as_weight_vector(dn_noise_scale, 'dn_noise_scale')
        self.max_dn_gt = int(max_dn_gt)
        self.add_neg_dn = bool(add_neg_dn)
        self.num_classes = int(num_classes)
        self.dn_metas: Optional[Dict[str, Optional[Tensor]]] = None

    # ------------------------------------------------------------------------------------------
    # Encoding
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _encode_one(box: Tensor, index: int) -> Tuple[Tensor, Tensor]:
        """One sample's GT ``[n, 9]`` (or ``[n, 7]``) to its ``[n, 10]`` target and finite mask."""
        if box.dim() != 2 or box.shape[-1] not in (7, 9):
            raise ValueError(f'SparseBox3DTarget: box_target[{index}] must be [n, 9] '
                             f'(x, y, z, l, w, h, yaw, vx, vy; gravity centre) or [n, 7], got '
                             f'{tuple(box.shape)}')
        box = box.to(torch.promote_types(box.dtype, torch.float32))
        out = box.new_zeros(box.shape[0], REG_DIM)
        out[:, X:Z + 1] = box[:, 0:3]
        out[:, 3:6] = box[:, 3:6].log()
        out[:, SIN_YAW] = box[:, 6].sin()
        out[:, COS_YAW] = box[:, 6].cos()
        if box.shape[-1] == 9:
            out[:, VX:VY + 1] = box[:, 7:9]
        finite = torch.isfinite(out)
        return torch.where(finite, out, out.new_zeros(())), finite

    def encode_reg_target(self, box_target: Sequence[Tensor],
                          device: Optional[Union[torch.device, str]] = None) -> List[Tensor]:
        """Ground-truth boxes to regression targets.

        Args:
            box_target (list[Tensor]): Per sample ``[n, 9]``: ``x, y, z`` (gravity centre),
                ``l, w, h`` (extent along the box's x, y, z axes), ``yaw``, ``vx, vy``;
                ``[n, 7]`` boxes get zero velocity.
            device (torch.device or str, optional): Where to put the results. Defaults to None
                (where the boxes are).

        Returns:
            list[Tensor]: Per sample ``[n, 10]`` ``x, y, z, log l, log w, log h, sin yaw,
            cos yaw, vx, vy`` in float32 (float64 for float64 boxes). Non-finite entries (NaN
            velocities) are 0.
        """
        out = []
        for i, box in enumerate(box_target):
            enc, _ = self._encode_one(box, i)
            out.append(enc if device is None else enc.to(device))
        return out

    def _gt_weights(self, labels: Tensor, finite: Tensor) -> Tensor:
        """Per-GT regression weights: 1 where the target is finite, class overrides on top."""
        weights = finite.to(torch.float32)
        for cls, w in self.cls_wise_reg_weights.items():
            weights = torch.where((labels == cls)[:, None], weights.new_tensor(w), weights)
        return weights

    # ------------------------------------------------------------------------------------------
    # Costs
    # ------------------------------------------------------------------------------------------
    def _cls_cost(self, cls_pred: Tensor, labels: Tensor) -> Tensor:
        """``[Q, C]`` logits and ``[n]`` labels to the ``[Q, n]`` focal-style class cost."""
        p = cls_pred.to(torch.promote_types(cls_pred.dtype, torch.float32)).sigmoid()
        neg = -(1 - p + self.eps).log() * (1 - self.alpha) * p.pow(self.gamma)
        pos = -(p + self.eps).log() * self.alpha * (1 - p).pow(self.gamma)
        return (pos - neg)[:, labels] * self.cls_weight

    def _box_cost(self, box_pred: Tensor, box_target: Tensor, gt_weights: Tensor) -> Tensor:
        """``[..., Q, 10]`` predictions, ``[..., n, 10]`` targets and per-GT weights to the
        ``[..., Q, n]`` weighted L1 cost."""
        box_pred = box_pred[..., :REG_DIM].to(box_target.dtype)
        diff = (box_pred[..., :, None, :] - box_target[..., None, :, :]).abs()
        weights = gt_weights[..., None, :, :] * box_target.new_tensor(self.reg_weights)
        return (diff * weights).sum(-1) * self.box_weight

    @staticmethod
    def _solve(cost: Tensor) -> Tuple[np.ndarray, np.ndarray]:
        """Hungarian assignment on the CPU; non-finite costs become :data:`INVALID_COST`."""
        cost = cost.detach().cpu().double().numpy()
        cost = np.where(np.isfinite(cost), cost, INVALID_COST)
        return linear_sum_assignment(cost)

    def _check_gts(self, cls_target: Sequence[Tensor], box_target: Sequence[Tensor],
                   batch: Optional[int] = None) -> None:
        if len(cls_target) != len(box_target):
            raise ValueError(f'SparseBox3DTarget: cls_target has {len(cls_target)} samples but '
                             f'box_target has {len(box_target)}')
        if batch is not None and len(cls_target) != batch:
            raise ValueError(f'SparseBox3DTarget: the predictions hold {batch} samples but '
                             f'cls_target has {len(cls_target)}')
        for i, (labels, box) in enumerate(zip(cls_target, box_target)):
            if labels.dim() != 1 or labels.shape[0] != box.shape[0]:
                raise ValueError(f'SparseBox3DTarget: cls_target[{i}] must be [n] with n = '
                                 f'{box.shape[0]} (the boxes of box_target[{i}]), got '
                                 f'{tuple(labels.shape)}')
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise ValueError(f'SparseBox3DTarget: cls_target[{i}] holds labels outside '
                                 f'[0, {self.num_classes}): {labels.tolist()}')

    # ------------------------------------------------------------------------------------------
    # One-to-one matching
    # ------------------------------------------------------------------------------------------
    def sample(self, cls_pred: Tensor, box_pred: Tensor, cls_target: Sequence[Tensor],
               box_target: Sequence[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        """Match ground truths to predictions, one to one, per sample.

        Costs are computed in float32 whatever the predictions' dtype; the Hungarian solver
        runs on the CPU.

        Args:
            cls_pred (Tensor): ``[B, Q, C]`` class logits.
            box_pred (Tensor): ``[B, Q, >=10]`` predicted states (only the first 10 are used).
            cls_target (list[Tensor]): Per sample ``[n_b]`` long labels in ``[0, C)``.
            box_target (list[Tensor]): Per sample ``[n_b, 9]`` boxes (see
                :meth:`encode_reg_target`).

        Returns:
            tuple[Tensor, Tensor, Tensor]: On the predictions' device:

            - ``cls`` ``[B, Q]`` long: the matched GT's label, ``num_classes`` elsewhere;
            - ``box`` ``[B, Q, 10]``: the matched GT's regression target, 0 elsewhere;
            - ``reg_weights`` ``[B, Q, 10]``: the matched GT's weights (1 where finite, the
              class-wise override where given), 0 elsewhere.

            The float outputs are float32 (float64 for float64 predictions).
        """
        if cls_pred.dim() != 3 or box_pred.dim() != 3 or box_pred.shape[:2] != cls_pred.shape[:2]:
            raise ValueError(f'SparseBox3DTarget.sample: cls_pred must be [B, Q, C] and box_pred '
                             f'[B, Q, >={REG_DIM}], got {tuple(cls_pred.shape)} and '
                             f'{tuple(box_pred.shape)}')
        if box_pred.shape[-1] < REG_DIM:
            raise ValueError(f'SparseBox3DTarget.sample: box_pred needs at least {REG_DIM} '
                             f'numbers per query, got {box_pred.shape[-1]}')
        batch, num_query, num_cls = cls_pred.shape
        if num_cls != self.num_classes:
            raise ValueError(f'SparseBox3DTarget.sample: cls_pred has {num_cls} classes, the '
                             f'target was built with num_classes={self.num_classes}')
        self._check_gts(cls_target, box_target, batch)
        device = box_pred.device
        dtype = torch.promote_types(box_pred.dtype, torch.float32)
        out_cls = torch.full((batch, num_query), self.num_classes, dtype=torch.long,
                             device=device)
        out_box = torch.zeros(batch, num_query, REG_DIM, dtype=dtype, device=device)
        out_weights = torch.zeros_like(out_box)
        for b in range(batch):
            if cls_target[b].numel() == 0:
                continue
            labels = cls_target[b].to(device=device, dtype=torch.long)
            target, finite = self._encode_one(box_target[b].to(device), b)
            target = target.to(dtype)
            weights = self._gt_weights(labels, finite).to(dtype)
            cost = (self._cls_cost(cls_pred[b], labels)
                    + self._box_cost(box_pred[b], target, weights))
            pred_idx, gt_idx = self._solve(cost)
            pred_idx = torch.as_tensor(pred_idx, dtype=torch.long, device=device)
            gt_idx = torch.as_tensor(gt_idx, dtype=torch.long, device=device)
            out_cls[b, pred_idx] = labels[gt_idx]
            out_box[b, pred_idx] = target[gt_idx]
            out_weights[b, pred_idx] = weights[gt_idx]
        return out_cls, out_box, out_weights

    # ------------------------------------------------------------------------------------------
    # Denoising
    # ------------------------------------------------------------------------------------------
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
        encoded = self.encode_reg_target(box_target, device)
        gt_box = torch.stack([F.pad(e, (0, 0, 0, num_gt - e.shape[0])) for e in encoded])
        ids = None
        if gt_instance_id is not None:
            ids = torch.stack([F.pad(x[:self.max_dn_gt].to(device, torch.long),
                                     (0, num_gt - min(x.shape[0], self.max_dn_gt)),
                                     value=-1) for x in gt_instance_id])

        # Rows are (group, sample), group-major: row g * B + b.
        labels = labels.repeat(groups, 1)
        gt_box = gt_box.repeat(groups, 1, 1)
        ids = ids.repeat(groups, 1) if ids is not None else None
        scale = gt_box.new_tensor(self.dn_noise_scale)
        anchors = gt_box + (torch.rand_like(gt_box) * 2 - 1) * scale
        source_labels = labels
        if self.add_neg_dn:
            magnitude = torch.rand_like(gt_box) + 1
            sign = (torch.rand_like(gt_box) > 0.5).to(gt_box.dtype) * 2 - 1
            anchors = torch.cat([anchors, gt_box + magnitude * sign * scale], dim=1)
            source_labels = torch.cat([labels, labels], dim=1)
        per_group = anchors.shape[1]

        # One transfer to the CPU for all rows; the assignment comes back as one index tensor
        # (the matched GT slot of each anchor, -1 where unmatched).
        cost = self._box_cost(anchors, gt_box, torch.ones_like(gt_box)).detach().cpu()
        matched = torch.full(anchors.shape[:2], -1, dtype=torch.long)
        for row in range(anchors.shape[0]):
            anchor_idx, gt_idx = self._solve(cost[row])
            matched[row, torch.from_numpy(anchor_idx)] = torch.from_numpy(gt_idx).long()
        matched = matched.to(device)
        hit = matched >= 0
        slot = matched.clamp(min=0)
        dn_box = torch.where(hit[..., None],
                             torch.gather(gt_box, 1, slot[..., None].expand(-1, -1, REG_DIM)),
                             gt_box.new_zeros(()))
        dn_cls = torch.where(hit, torch.gather(labels, 1, slot), labels.new_tensor(DN_NEGATIVE))
        dn_id = None
        if ids is not None:
            dn_id = torch.where(hit, torch.gather(ids, 1, slot), ids.new_tensor(-1))

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

    # ------------------------------------------------------------------------------------------
    # Temporal denoising
    # ------------------------------------------------------------------------------------------
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
        keep = keep.to(dn_instance_feature.device)

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
        temp_cls = torch.where(match.any(-1), cached_cls, cached_cls.new_tensor(DN_PADDING))
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
