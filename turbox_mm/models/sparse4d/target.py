"""Sparse4D v3's training targets: Hungarian matching, denoising queries, temporal denoising.

Three jobs, all on the 10-number regression target ``[x, y, z, log l, log w, log h, sin yaw,
cos yaw, vx, vy]`` (the state of :mod:`.box3d` without ``vz``, which upstream never supervises,
docs/design/sparse4d.md 0.3-4):

- :meth:`SparseBox3DTarget.sample` assigns each ground truth to one of the ``Q`` predictions of
  a decoder layer (one-to-one, scipy's Hungarian solver on a focal-style class cost plus a
  weighted L1 box cost, design doc 2.10.2);
- :meth:`SparseBox3DTarget.get_dn_anchors` (:mod:`.denoising`) builds the denoising queries:
  noisy copies of the ground truths (positives) and farther copies (negatives), in independent
  groups that only see each other inside a group (2.10.3);
- :meth:`SparseBox3DTarget.cache_dn` and :meth:`SparseBox3DTarget.update_dn` carry some of those
  groups into the next frame, where they are re-targeted by instance id (2.10.4).
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from turbox_mm.registry import TASK_UTILS
from turbox_mm.utils.deferred_check import DeferredCheck
from turbox_mm.utils.upload import device_constant, upload
from .box3d import COS_YAW, SIN_YAW, VX, VY, X, Z
from .matching import (INVALID_COST, Pairs, check_matcher, group_pairs, no_pairs, solve,
                       solve_checked)
from .denoising import DN_NEGATIVE, DenoisingMixin
from .temporal_dn import DN_PADDING, TemporalDnMixin

#: Length of a regression target (the state without ``vz``).
REG_DIM = 10
__all__ = ['SparseBox3DTarget', 'INVALID_COST', 'REG_DIM', 'DN_NEGATIVE', 'DN_PADDING']


def _as_weight_vector(value: Union[float, Sequence[float]], name: str) -> List[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * REG_DIM
    value = [float(v) for v in value]
    if len(value) != REG_DIM:
        raise ValueError(f'SparseBox3DTarget: {name} needs {REG_DIM} numbers (x, y, z, 3 log '
                         f'sizes, sin, cos, vx, vy), got {len(value)}')
    return value


@TASK_UTILS.register_module()
class SparseBox3DTarget(DenoisingMixin, TemporalDnMixin):
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
        matcher (str, optional): Where :meth:`sample_layers` and :meth:`get_dn_anchors` solve
            their matchings: ``'host'`` (scipy after one device-to-host transfer, the step's
            sync) or ``'device'`` (``turbox_mm::lsap``: the same matches, no host read; the
            host path still serves tensors the op's kernel does not run for, CPU ones). None
            (the default) lets the owning head choose: ``Sparse4DHead`` picks ``'device'``
            with ``op_impl='turbox'``, ``'host'`` otherwise; alone, None means ``'host'``. On
            the device path the label-range check reads its flags when they have reached the
            host (:class:`~turbox_mm.utils.deferred_check.DeferredCheck`): a bad label raises
            its error a step or a few later.

    :attr:`indices` holds the matches of the last :meth:`sample` call (the last layer's after
    :meth:`sample_layers`), which SparseDrive's motion loss reads: per sample ``(query_idx,
    gt_idx)`` long tensors on the predictions' device in scipy's order (queries ascending);
    None before the first call. A sample without GT gets empty tensors where upstream stores
    ``[None, None]``, so every entry has one type (a tuple where upstream has a list).

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
                 num_classes: int = 10,
                 matcher: Optional[str] = None) -> None:
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
        self.matcher = check_matcher('SparseBox3DTarget', matcher)
        self._label_checks = DeferredCheck()
        self.dn_metas: Optional[Dict[str, Optional[Tensor]]] = None
        self.indices: Optional[List[Pairs]] = None

    def _constant(self, name: str, like: Tensor) -> Tensor:
        """``getattr(self, name)`` (a list of floats) as a tensor on ``like``'s device and dtype,
        uploaded once (an upload of a Python list waits for the device)."""
        return device_constant(getattr(self, name), like)

    # ------------------------------------------------------------------------------------------
    # Encoding
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _check_box(box: Tensor, index: int) -> None:
        if box.dim() != 2 or box.shape[-1] not in (7, 9):
            raise ValueError(f'SparseBox3DTarget: box_target[{index}] must be [n, 9] '
                             f'(x, y, z, l, w, h, yaw, vx, vy; gravity centre) or [n, 7], got '
                             f'{tuple(box.shape)}')

    @classmethod
    def _encode_one(cls, box: Tensor, index: int) -> Tuple[Tensor, Tensor]:
        """One sample's GT ``[n, 9]`` (or ``[n, 7]``) to its ``[n, 10]`` target and finite mask."""
        cls._check_box(box, index)
        return cls._encode_rows(box.to(torch.promote_types(box.dtype, torch.float32)))

    @staticmethod
    def _encode_rows(box: Tensor) -> Tuple[Tensor, Tensor]:
        """``[..., 7 or 9]`` float boxes to ``[..., 10]`` targets (non-finite entries 0) and
        the finite mask."""
        out = box.new_zeros(*box.shape[:-1], REG_DIM)
        out[..., X:Z + 1] = box[..., 0:3]
        out[..., 3:6] = box[..., 3:6].log()
        out[..., SIN_YAW] = box[..., 6].sin()
        out[..., COS_YAW] = box[..., 6].cos()
        if box.shape[-1] == 9:
            out[..., VX:VY + 1] = box[..., 7:9]
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
        if self.cls_wise_reg_weights:
            table = self._constant('_cls_wise_table', weights)
            for row, cls in enumerate(self.cls_wise_reg_weights):
                weights = torch.where((labels == cls)[..., None], table[row], weights)
        return weights

    @property
    def _cls_wise_table(self) -> List[List[float]]:
        return list(self.cls_wise_reg_weights.values())

    # ------------------------------------------------------------------------------------------
    # Costs
    # ------------------------------------------------------------------------------------------
    def _class_costs(self, cls_pred: Tensor) -> Tensor:
        """``[..., C]`` logits to the focal-style cost of each class, ``[..., C]``."""
        p = cls_pred.to(torch.promote_types(cls_pred.dtype, torch.float32)).sigmoid()
        neg = -(1 - p + self.eps).log() * (1 - self.alpha) * p.pow(self.gamma)
        pos = -(p + self.eps).log() * self.alpha * (1 - p).pow(self.gamma)
        return pos - neg

    def _cls_cost(self, cls_pred: Tensor, labels: Tensor) -> Tensor:
        """``[Q, C]`` logits and ``[n]`` labels to the ``[Q, n]`` class cost (weighted)."""
        return self._class_costs(cls_pred)[:, labels] * self.cls_weight

    def _box_cost(self, box_pred: Tensor, box_target: Tensor, gt_weights: Tensor) -> Tensor:
        """``[..., Q, 10]`` predictions, ``[..., n, 10]`` targets and per-GT weights to the
        ``[..., Q, n]`` weighted L1 cost."""
        box_pred = box_pred[..., :REG_DIM].to(box_target.dtype)
        diff = (box_pred[..., :, None, :] - box_target[..., None, :, :]).abs()
        weights = gt_weights[..., None, :, :] * self._constant('reg_weights', box_target)
        return (diff * weights).sum(-1) * self.box_weight

    def _check_gts(self, cls_target: Sequence[Tensor], box_target: Sequence[Tensor],
                   batch: Optional[int] = None) -> None:
        """Shape checks (no device access); the label range is checked by
        :meth:`_check_labels` on the host copy that the matching makes anyway."""
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

    def _bad_labels(self, labels: Tensor, sizes: Sequence[int]) -> Tensor:
        """``[B]`` bool on the device: sample ``b`` has a label outside ``[0, C)`` among its
        first ``sizes[b]`` (padded ``[B, n]`` labels)."""
        live = self._live_slots(sizes, labels.shape[1], labels.device)
        return (live & ((labels < 0) | (labels >= self.num_classes))).any(1)

    @staticmethod
    def _live_slots(sizes: Sequence[int], num_gt: int, device: torch.device) -> Tensor:
        """``[B, num_gt]`` bool on ``device``: slot ``j`` of sample ``b`` holds a GT
        (``j < sizes[b]``); the sizes go up without a wait."""
        return torch.arange(num_gt, device=device) < \
            upload(np.asarray(sizes, np.int64), device)[:, None]

    def _check_labels(self, bad: Tensor, cls_target: Sequence[Tensor]) -> None:
        """Raise the named error for the first sample that :meth:`_bad_labels` flagged."""
        for i in np.flatnonzero(bad.numpy()):
            raise ValueError(f'SparseBox3DTarget: cls_target[{i}] holds labels outside '
                             f'[0, {self.num_classes}): {cls_target[i].tolist()}')

    def _solve_checked(self, cost: Tensor, sizes: Sequence[int], bad: Tensor,
                       cls_target: Sequence[Tensor]) -> Tensor:
        """The pairs of :func:`solve_batched` for ``cost`` on :attr:`matcher`'s side, with the
        label-range check of ``bad`` (:meth:`_bad_labels`): at once after the host path's
        transfer, deferred on the device path (no wait)."""
        targets = [c.detach() for c in cls_target]  # for the error message only
        return solve_checked(cost, sizes, bad, lambda flags: self._check_labels(flags, targets),
                             self.matcher or 'host', self._label_checks)

    def _padded_gts(self, cls_target: Sequence[Tensor], box_target: Sequence[Tensor],
                    device: torch.device, dtype: torch.dtype,
                    pad_label: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
        """``[B, n]`` labels (``pad_label`` in padded slots), ``[B, n, 10]`` targets and
        ``[B, n, 10]`` regression weights (0 in padded slots), ``n`` the largest GT count."""
        num_gt = max(c.shape[0] for c in cls_target)
        labels = torch.stack([F.pad(c.to(device, torch.long), (0, num_gt - c.shape[0]),
                                    value=pad_label) for c in cls_target])
        targets, finite = self._encode_padded(box_target, num_gt, device)
        weights = self._gt_weights(labels, finite).to(dtype)
        return labels, targets.to(dtype), weights

    def _encode_padded(self, box_target: Sequence[Tensor], num_gt: int,
                       device: torch.device) -> Tuple[Tensor, Tensor]:
        """The batch's GT boxes encoded at once: ``[B, num_gt, 10]`` targets (0 in padded
        slots) and the finite mask (False there); as :meth:`_encode_one` per sample, with
        a handful of operations for the batch instead of a dozen per sample. The batch is
        encoded in one dtype (float32, float64 if any sample is): a float32 sample beside a
        float64 one differs from its own encoding in the last bit."""
        dtype = torch.float32
        for b, box in enumerate(box_target):
            self._check_box(box, b)
            dtype = torch.promote_types(dtype, box.dtype)
        # [n, 7] boxes get zero velocity, as _encode_one gives them
        boxes = torch.stack([F.pad(box.to(device, dtype),
                                   (0, 9 - box.shape[-1], 0, num_gt - box.shape[0]))
                             for box in box_target])
        out, finite = self._encode_rows(boxes)
        sizes = [int(box.shape[0]) for box in box_target]
        if min(sizes) < num_gt:  # padded slots: no target (cos 0 would be 1 there)
            live = self._live_slots(sizes, num_gt, device)[..., None]
            out, finite = torch.where(live, out, 0.0), finite & live
        return out, finite

    # ------------------------------------------------------------------------------------------
    # One-to-one matching
    # ------------------------------------------------------------------------------------------
    def sample(self, cls_pred: Tensor, box_pred: Tensor, cls_target: Sequence[Tensor],
               box_target: Sequence[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        """Match ground truths to predictions, one to one, per sample.

        Costs are computed in float32 whatever the predictions' dtype; the Hungarian solver
        runs on the CPU, sample by sample, with a host copy each (upstream's procedure, which
        the stock head runs). :meth:`sample_layers` gives the same matches for several decoder
        layers at once with one host sync (the turbox head's path).

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

            The float outputs are float32 (float64 for float64 predictions). The matches go to
            :attr:`indices`.
        """
        self._check_predictions(cls_pred, box_pred, '')
        batch, num_query, _ = cls_pred.shape
        self._check_gts(cls_target, box_target, batch)
        for i, labels in enumerate(cls_target):  # a host read per sample, as upstream
            if labels.numel() and (int(labels.min()) < 0 or
                                   int(labels.max()) >= self.num_classes):
                raise ValueError(f'SparseBox3DTarget: cls_target[{i}] holds labels outside '
                                 f'[0, {self.num_classes}): {labels.tolist()}')
        device = box_pred.device
        dtype = torch.promote_types(box_pred.dtype, torch.float32)
        out_cls = torch.full((batch, num_query), self.num_classes, dtype=torch.long,
                             device=device)
        out_box = torch.zeros(batch, num_query, REG_DIM, dtype=dtype, device=device)
        out_weights = torch.zeros_like(out_box)
        indices = [no_pairs(device) for _ in range(batch)]
        for b in range(batch):
            if cls_target[b].numel() == 0:
                continue
            labels = cls_target[b].to(device=device, dtype=torch.long)
            target, finite = self._encode_one(box_target[b].to(device), b)
            target = target.to(dtype)
            weights = self._gt_weights(labels, finite).to(dtype)
            cost = (self._cls_cost(cls_pred[b], labels)
                    + self._box_cost(box_pred[b], target, weights))
            pred_idx, gt_idx = solve(cost.detach().cpu().double().numpy())
            pred_idx = torch.as_tensor(pred_idx, dtype=torch.long, device=device)
            gt_idx = torch.as_tensor(gt_idx, dtype=torch.long, device=device)
            out_cls[b, pred_idx] = labels[gt_idx]
            out_box[b, pred_idx] = target[gt_idx]
            out_weights[b, pred_idx] = weights[gt_idx]
            indices[b] = (pred_idx, gt_idx)
        self.indices = indices
        return out_cls, out_box, out_weights

    def _check_predictions(self, cls_pred: Tensor, box_pred: Tensor, where: str) -> None:
        if cls_pred.dim() != 3 or box_pred.dim() != 3 or box_pred.shape[:2] != cls_pred.shape[:2]:
            raise ValueError(f'SparseBox3DTarget.sample: cls_pred{where} must be [B, Q, C] and '
                             f'box_pred{where} [B, Q, >={REG_DIM}], got {tuple(cls_pred.shape)} '
                             f'and {tuple(box_pred.shape)}')
        if box_pred.shape[-1] < REG_DIM:
            raise ValueError(f'SparseBox3DTarget.sample: box_pred{where} needs at least '
                             f'{REG_DIM} numbers per query, got {box_pred.shape[-1]}')
        if cls_pred.shape[-1] != self.num_classes:
            raise ValueError(f'SparseBox3DTarget.sample: cls_pred{where} has '
                             f'{cls_pred.shape[-1]} classes, the target was built with '
                             f'num_classes={self.num_classes}')

    def sample_layers(self, cls_preds: Sequence[Tensor], box_preds: Sequence[Tensor],
                      cls_target: Sequence[Tensor], box_target: Sequence[Tensor],
                      stacked: bool = False
                      ) -> Union[List[Tuple[Tensor, Tensor, Tensor]],
                                 Tuple[Tensor, Tensor, Tensor]]:
        """:meth:`sample` for every decoder layer, with one host sync for all of them.

        The cost matrices of all layers and samples are built on the device as one padded
        tensor and copied to the host in one transfer (with the label-range check); scipy
        solves each matrix on its valid columns; the assignment goes back as one index tensor
        without a wait. The matches are those of calling :meth:`sample` per layer; the last
        layer's go to :attr:`indices`, cut from that index tensor by counts known on the host
        (``min(Q, n_b)`` pairs per sample), so storing them adds no wait.

        Args:
            cls_preds (list[Tensor]): Per layer ``[B, Q, C]`` logits (equal shapes).
            box_preds (list[Tensor]): Per layer ``[B, Q, >=10]`` states.
            cls_target (list[Tensor]): Per sample ``[n_b]`` labels.
            box_target (list[Tensor]): Per sample ``[n_b, 9]`` boxes.
            stacked (bool): Return the three targets of all layers stacked (``[L, B, ...]``)
                instead of a tuple per layer. Defaults to False.

        Returns:
            list[tuple] or tuple: Per layer, :meth:`sample`'s ``(cls, box, reg_weights)``; with
                ``stacked`` these three, each stacked over the layers.
        """
        if len(cls_preds) != len(box_preds) or not cls_preds:
            raise ValueError(f'SparseBox3DTarget.sample_layers: {len(cls_preds)} class and '
                             f'{len(box_preds)} box predictions; need one or more of each')
        for i, (cls_pred, box_pred) in enumerate(zip(cls_preds, box_preds)):
            self._check_predictions(cls_pred, box_pred, f'[{i}]' if len(cls_preds) > 1 else '')
            if cls_pred.shape != cls_preds[0].shape or box_pred.shape[:2] != cls_pred.shape[:2]:
                raise ValueError(f'SparseBox3DTarget.sample_layers: layer {i} has shape '
                                 f'{tuple(cls_pred.shape)}, layer 0 {tuple(cls_preds[0].shape)}')
            if (cls_pred.dtype, box_pred.dtype) != (cls_preds[0].dtype, box_preds[0].dtype):
                raise ValueError(f'SparseBox3DTarget.sample_layers: layer {i} has dtypes '
                                 f'{cls_pred.dtype} / {box_pred.dtype}, layer 0 '
                                 f'{cls_preds[0].dtype} / {box_preds[0].dtype}')
        batch, num_query, _ = cls_preds[0].shape
        self._check_gts(cls_target, box_target, batch)
        layers = len(cls_preds)
        device = box_preds[0].device
        dtype = torch.promote_types(box_preds[0].dtype, torch.float32)
        out_cls = torch.full((layers, batch, num_query), self.num_classes, dtype=torch.long,
                             device=device)
        out_box = torch.zeros(layers, batch, num_query, REG_DIM, dtype=dtype, device=device)
        out_weights = torch.zeros_like(out_box)
        sizes = [int(c.shape[0]) for c in cls_target]
        indices = [no_pairs(device) for _ in range(batch)]
        if max(sizes, default=0) > 0:
            labels, target, weights = self._padded_gts(cls_target, box_target, device, dtype)
            bad = self._bad_labels(labels, sizes)
            safe = labels.clamp(0, self.num_classes - 1)  # checked below, before any use
            # all layers at once: [L, B, Q, C] logits and [L, B, Q, 10] boxes (one dtype),
            # priced in one pass by the same elementwise operations as one layer at a time
            # (no autograd: the cost only decides the matching, and its intermediates
            # would otherwise be kept for every layer at once)
            with torch.no_grad():
                logits = torch.stack(list(cls_preds))
                boxes = torch.stack([b[..., :REG_DIM] for b in box_preds])
                index = safe[None, :, None].expand(layers, -1, num_query, -1)
                cost = (torch.gather(self._class_costs(logits), -1, index) * self.cls_weight +
                        self._box_cost(boxes, target, weights)).flatten(0, 1)  # [L * B, Q, n]
            pairs = self._solve_checked(cost, sizes, bad, cls_target)
            layer, sample = pairs[0] // batch, pairs[0] % batch
            query, gt = pairs[1], pairs[2]
            out_cls[layer, sample, query] = labels[sample, gt]
            out_box[layer, sample, query] = target[sample, gt]
            out_weights[layer, sample, query] = weights[sample, gt]
            indices = group_pairs(pairs, num_query, sizes, -1, layers)
        self.indices = indices
        if stacked:
            return out_cls, out_box, out_weights
        return [(out_cls[i], out_box[i], out_weights[i]) for i in range(layers)]
