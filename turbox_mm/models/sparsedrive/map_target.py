"""SparseDrive's map targets: one-to-one matching of predicted polylines to map instances over
every equivalent point order (docs/design/sparsedrive.md section 4 "Targets", section 9;
upstream ``P/models/map/target.py`` @ ffebeb4).

Per sample, predictions and ground truth are normalised to the ROI, priced by
:class:`~.map_match_cost.MapQueriesCost` (focal class cost + the smallest line cost over the
``O`` orders of each instance, 38 from ``VectorizeMap``) and matched by scipy's Hungarian
solver. A matched query takes the instance's label and its points, in metres, in the order
that reached the smallest cost.

:meth:`SparsePoint3DTarget.sample` is upstream's procedure (one host copy per sample, the stock
head's path); :meth:`SparsePoint3DTarget.sample_layers` gives the same targets for every decoder
layer with one device-to-host copy for all layers and samples (the turbox head's path,
section 9). Both store :attr:`SparsePoint3DTarget.indices`, the matched (query, instance)
pairs per sample of the last call (its last layer), which upstream's det sampler keeps for the
motion loss; upstream's map sampler keeps none, so this is a convenience with the same
convention.

The map head runs without denoising: upstream's map sampler inherits the base class's no-op
denoising (``get_dn_anchors`` returns None), so ``num_dn_groups`` and ``num_temp_dn_groups``
must be 0 and the other denoising keys of upstream's signature are accepted and unused.
"""
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from turbox_mm.models.sparse4d.matching import (Pairs, check_matcher, group_pairs, no_pairs,
                                                solve, solve_checked)
from turbox_mm.registry import TASK_UTILS
from turbox_mm.utils.deferred_check import DeferredCheck
from turbox_mm.utils.upload import upload
from .map_match_cost import MapQueriesCost, build_lines_cost, normalize_lines

__all__ = ['SparsePoint3DTarget', 'DEFAULT_ASSIGNER']

#: Upstream's map assigner config (sparsedrive_small_stage{1,2}.py).
DEFAULT_ASSIGNER = dict(
    type='HungarianLinesAssigner',
    cost=dict(type='MapQueriesCost',
              cls_cost=dict(type='FocalLossCost', weight=1.0),
              reg_cost=dict(type='LinesL1Cost', weight=10.0, beta=0.01, permute=True)))


@TASK_UTILS.register_module()
class SparsePoint3DTarget:
    """Hungarian targets of the map head (module docstring).

    Args:
        assigner (dict): Upstream's assigner config (``HungarianLinesAssigner`` with a
            ``MapQueriesCost``; built without a registry, see
            :mod:`~.map_match_cost`). Defaults to :data:`DEFAULT_ASSIGNER`.
        num_dn_groups (int): Must be 0 (no map denoising). Defaults to 0.
        dn_noise_scale, max_dn_gt, add_neg_dn: Upstream's unused denoising keys.
        num_temp_dn_groups (int): Must be 0. Defaults to 0.
        num_cls (int): Map classes; the background label. Defaults to 3.
        num_sample (int): Points per polyline. Defaults to 20.
        roi_size (tuple[float, float]): ``(W, H)`` x and y extents of the map ROI in metres.
            Defaults to ``(30, 60)``.
        matcher (str, optional): Where :meth:`sample_layers` solves: ``'host'`` (scipy after
            one transfer) or ``'device'`` (``turbox_mm::lsap``, no host read; the label check
            then runs once its flags reach the host, a step or a few later). None (the
            default) lets the head choose (``Sparse4DHead``: ``'device'`` with
            ``op_impl='turbox'``); alone it means ``'host'``.

    Attributes:
        indices (list[tuple[Tensor, Tensor]] or None): Per sample of the last call (for
            :meth:`sample_layers`, of its last layer) ``(query_idx, gt_idx)`` long tensors on
            the predictions' device, scipy's order (queries ascending); empty for a sample
            without ground truth (upstream's det sampler stores ``None`` there).
        num_dn_groups, num_temp_dn_groups (int): 0.
        dn_metas: None (the head reads it).

    Examples:
        >>> target = SparsePoint3DTarget()
        >>> gt = torch.zeros(1, 38, 20, 2)
        >>> cls, pts, w = target.sample(torch.zeros(1, 4, 3), torch.ones(1, 4, 40),
        ...                             [torch.tensor([2])], [gt])
        >>> cls.tolist(), int(w.sum()), [q.tolist() for q, _ in target.indices]
        ([[2, 3, 3, 3]], 40, [[0]])
    """

    def __init__(self,
                 assigner: Union[dict, MapQueriesCost] = DEFAULT_ASSIGNER,
                 num_dn_groups: int = 0,
                 dn_noise_scale: Union[float, Sequence[float]] = 0.5,
                 max_dn_gt: int = 32,
                 add_neg_dn: bool = True,
                 num_temp_dn_groups: int = 0,
                 num_cls: int = 3,
                 num_sample: int = 20,
                 roi_size: Sequence[float] = (30, 60),
                 matcher: Optional[str] = None) -> None:
        self.matcher = check_matcher('SparsePoint3DTarget', matcher)
        self._label_checks = DeferredCheck()
        if num_dn_groups != 0 or num_temp_dn_groups != 0:
            raise ValueError(f'SparsePoint3DTarget: map denoising is not supported (upstream '
                             f'has none); num_dn_groups ({num_dn_groups}) and '
                             f'num_temp_dn_groups ({num_temp_dn_groups}) must be 0')
        if num_cls <= 0 or num_sample <= 0:
            raise ValueError(f'SparsePoint3DTarget: num_cls ({num_cls}) and num_sample '
                             f'({num_sample}) must be positive')
        if len(roi_size) != 2 or min(roi_size) <= 0:
            raise ValueError(f'SparsePoint3DTarget: roi_size must be two positive extents '
                             f'(x, y), got {roi_size!r}')
        self.cost = build_lines_cost(assigner)
        self.num_cls = int(num_cls)
        self.num_sample = int(num_sample)
        self.roi_size = (float(roi_size[0]), float(roi_size[1]))
        self.num_dn_groups = 0
        self.num_temp_dn_groups = 0
        self.dn_metas = None
        self.indices: Optional[List[Pairs]] = None

    @property
    def dims(self) -> int:
        """Numbers per polyline: ``2 * num_sample``."""
        return 2 * self.num_sample

    def get_dn_anchors(self, *args, **kwargs) -> None:
        """No map denoising (upstream's base-class behaviour): always None."""
        return None

    def _normalize(self, lines: Tensor) -> Tensor:
        return normalize_lines(lines, self.num_sample, self.roi_size)

    # -- checks ----------------------------------------------------------------------------

    def _check_predictions(self, cls_pred: Tensor, pts_pred: Tensor, where: str) -> None:
        if cls_pred.dim() != 3 or pts_pred.dim() != 3 or pts_pred.shape[:2] != cls_pred.shape[:2]:
            raise ValueError(f'SparsePoint3DTarget: cls_pred{where} must be [B, M, C] and '
                             f'pts_pred{where} [B, M, {self.dims}], got '
                             f'{tuple(cls_pred.shape)} and {tuple(pts_pred.shape)}')
        if pts_pred.shape[-1] != self.dims:
            raise ValueError(f'SparsePoint3DTarget: pts_pred{where} must hold 2 * num_sample = '
                             f'{self.dims} numbers per query, got {pts_pred.shape[-1]}')
        if cls_pred.shape[-1] != self.num_cls:
            raise ValueError(f'SparsePoint3DTarget: cls_pred{where} has {cls_pred.shape[-1]} '
                             f'classes, the target was built with num_cls={self.num_cls}')

    def _flat_gts(self, cls_target: Sequence[Tensor], pts_target: Sequence[Tensor],
                  batch: int) -> List[Tensor]:
        """Shape checks; per sample ``[G, O, D]`` ground truth (``O = 1`` without ``permute``;
        a sample without instances may come in any ``[0, ...]`` shape)."""
        if len(cls_target) != batch or len(pts_target) != batch:
            raise ValueError(f'SparsePoint3DTarget: the predictions hold {batch} samples but '
                             f'gt labels have {len(cls_target)} and gt points '
                             f'{len(pts_target)}')
        want = ('[G, O, num_sample, 2] or [G, O, 2 * num_sample]' if self.cost.permute else
                '[G, num_sample, 2] or [G, 2 * num_sample]')
        out = []
        for i, (labels, pts) in enumerate(zip(cls_target, pts_target)):
            num_gt = pts.shape[0] if pts.dim() else -1
            if labels.dim() != 1 or labels.shape[0] != num_gt:
                raise ValueError(f'SparsePoint3DTarget: gt labels[{i}] must be [G] with G = '
                                 f'{num_gt} (the instances of gt points[{i}]), got '
                                 f'{tuple(labels.shape)}')
            if num_gt == 0:
                out.append(pts.new_zeros(0, 1, self.dims))
                continue
            lines = pts
            if not self.cost.permute:
                lines = lines.unsqueeze(1)
            if lines.dim() == 4 and lines.shape[-2:] == (self.num_sample, 2):
                lines = lines.flatten(2, 3)
            if lines.dim() != 3 or lines.shape[-1] != self.dims or lines.shape[1] == 0:
                raise ValueError(f'SparsePoint3DTarget: gt points[{i}] must be {want} with '
                                 f'num_sample = {self.num_sample}, got {tuple(pts.shape)}')
            out.append(lines)
        return out

    def _check_label_values(self, cls_target: Sequence[Tensor]) -> None:
        for i, labels in enumerate(cls_target):  # a host read per sample, as the stock path
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_cls):
                raise ValueError(f'SparsePoint3DTarget: gt labels[{i}] hold values outside '
                                 f'[0, {self.num_cls}): {labels.tolist()}')

    # -- stock path ------------------------------------------------------------------------

    def sample(self, cls_pred: Tensor, pts_pred: Tensor, cls_target: Sequence[Tensor],
               pts_target: Sequence[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        """Match map instances to the queries of one decoder layer, sample by sample.

        Costs are computed in float32 (float64 for float64 predictions), without gradients,
        and copied to the host once per sample for scipy, as upstream does. Non-finite costs
        become :data:`~turbox_mm.models.sparse4d.matching.INVALID_COST` (upstream's map
        sampler would hand them to scipy, which raises).

        Args:
            cls_pred (Tensor): ``[B, M, C]`` class logits, ``C = num_cls``.
            pts_pred (Tensor): ``[B, M, 2 * num_sample]`` predicted points in metres.
            cls_target (list[Tensor]): Per sample ``[G]`` long labels in ``[0, C)``.
            pts_target (list[Tensor]): Per sample ``[G, O, num_sample, 2]`` or
                ``[G, O, 2 * num_sample]`` metric points of each order (``[G, num_sample,
                2]`` / ``[G, 2 * num_sample]`` with ``permute=False``).

        Returns:
            tuple[Tensor, Tensor, Tensor]: On the predictions' device:

            - ``cls`` ``[B, M]`` long: the matched instance's label, ``num_cls`` elsewhere;
            - ``pts`` ``[B, M, 2 * num_sample]``: the matched instance in its best order
              (metres), 0 elsewhere;
            - ``weights`` ``[B, M, 2 * num_sample]``: 1 on matched rows, 0 elsewhere.

        Raises:
            ValueError: Shapes that disagree, or labels outside ``[0, num_cls)``.
        """
        self._check_predictions(cls_pred, pts_pred, '')
        batch, num_query, _ = cls_pred.shape
        gts = self._flat_gts(cls_target, pts_target, batch)
        self._check_label_values(cls_target)
        device = pts_pred.device
        dtype = torch.promote_types(pts_pred.dtype, torch.float32)
        out_cls = torch.full((batch, num_query), self.num_cls, dtype=torch.long, device=device)
        out_pts = torch.zeros(batch, num_query, self.dims, dtype=dtype, device=device)
        indices = []
        for b in range(batch):
            if gts[b].shape[0] == 0:
                indices.append(no_pairs(device))
                continue
            labels = cls_target[b].to(device=device, dtype=torch.long)
            gt = gts[b].to(device=device, dtype=dtype)
            with torch.no_grad():
                cost, order = self.cost(cls_pred[b].detach().to(dtype),
                                        self._normalize(pts_pred[b].detach().to(dtype)),
                                        labels, self._normalize(gt))
            query, gt_idx = solve(cost.cpu().double().numpy())
            query = torch.as_tensor(query, dtype=torch.long, device=device)
            gt_idx = torch.as_tensor(gt_idx, dtype=torch.long, device=device)
            out_cls[b, query] = labels[gt_idx]
            out_pts[b, query] = gt[gt_idx, order[query, gt_idx]]
            indices.append((query, gt_idx))
        self.indices = indices
        return out_cls, out_pts, self._weights(out_cls, out_pts)

    def _weights(self, out_cls: Tensor, out_pts: Tensor) -> Tensor:
        """1 on matched rows (a label other than the background), from the labels: no Python
        scalar is written through an index (torch would copy it from the host)."""
        matched = (out_cls != self.num_cls).to(out_pts.dtype).unsqueeze(-1)
        return matched.expand_as(out_pts).contiguous()

    # -- turbox path -----------------------------------------------------------------------

    def _padded_gts(self, cls_target: Sequence[Tensor], gts: Sequence[Tensor],
                    device: torch.device, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """``[B, G]`` labels (0 in padded slots) and ``[B, G, O, D]`` points (0 in padded
        slots), ``G`` and ``O`` the largest counts. A sample with fewer orders repeats its
        first one: a copy placed after the original never wins a tie."""
        orders = max(g.shape[1] for g in gts)
        lines = []
        for g in gts:
            if g.shape[1] < orders:
                g = torch.cat([g, g[:, :1].expand(-1, orders - g.shape[1], -1)], 1)
            lines.append(g.to(dtype))
        labels = pad_sequence([c.to(torch.long) for c in cls_target], batch_first=True)
        lines = pad_sequence(lines, batch_first=True)
        return upload(labels, device), upload(lines, device)

    def _check_labels(self, bad: Tensor, cls_target: Sequence[Tensor]) -> None:
        """The named error for the first sample whose host flag in ``bad`` is set."""
        for i in np.flatnonzero(bad.numpy())[:1]:
            raise ValueError(f'SparsePoint3DTarget: gt labels[{i}] hold values outside '
                             f'[0, {self.num_cls}): {cls_target[i].tolist()}')

    def sample_layers(self, cls_preds: Sequence[Tensor], pts_preds: Sequence[Tensor],
                      cls_target: Sequence[Tensor], pts_target: Sequence[Tensor],
                      stacked: bool = False
                      ) -> Union[List[Tuple[Tensor, Tensor, Tensor]],
                                 Tuple[Tensor, Tensor, Tensor]]:
        """:meth:`sample` for every decoder layer, with one host sync for all of them.

        The costs of all layers and samples are priced on the device (a layer at a time, all
        samples padded to the largest instance count), stacked and copied to the host in one
        transfer together with the label check; scipy solves each matrix on its sample's
        columns; the pairs go back in one non-blocking upload and the targets are scattered
        on the device. The results equal :meth:`sample` layer by layer (same cost functions,
        same solver).

        Args:
            cls_preds (list[Tensor]): Per layer ``[B, M, C]`` logits (equal shapes).
            pts_preds (list[Tensor]): Per layer ``[B, M, 2 * num_sample]`` points.
            cls_target (list[Tensor]): Per sample ``[G]`` labels.
            pts_target (list[Tensor]): Per sample ground truth (see :meth:`sample`).
            stacked (bool): Return the three targets of all layers stacked (``[L, B, ...]``)
                instead of a tuple per layer. Defaults to False.

        Returns:
            list[tuple] or tuple: Per layer, :meth:`sample`'s ``(cls, pts, weights)``; with
                ``stacked`` these three, each stacked over the layers.

        Raises:
            ValueError: Shapes that disagree, or labels outside ``[0, num_cls)``.
        """
        if len(cls_preds) != len(pts_preds) or not cls_preds:
            raise ValueError(f'SparsePoint3DTarget.sample_layers: {len(cls_preds)} class and '
                             f'{len(pts_preds)} point predictions; need one or more of each')
        for i, (cls_pred, pts_pred) in enumerate(zip(cls_preds, pts_preds)):
            self._check_predictions(cls_pred, pts_pred, f'[{i}]')
            if cls_pred.shape != cls_preds[0].shape:
                raise ValueError(f'SparsePoint3DTarget.sample_layers: layer {i} has shape '
                                 f'{tuple(cls_pred.shape)}, layer 0 {tuple(cls_preds[0].shape)}')
        batch, num_query, _ = cls_preds[0].shape
        gts = self._flat_gts(cls_target, pts_target, batch)
        layers = len(cls_preds)
        device = pts_preds[0].device
        dtype = torch.promote_types(pts_preds[0].dtype, torch.float32)
        out_cls = torch.full((layers, batch, num_query), self.num_cls, dtype=torch.long,
                             device=device)
        out_pts = torch.zeros(layers, batch, num_query, self.dims, dtype=dtype, device=device)
        sizes = [int(g.shape[0]) for g in gts]
        indices = [no_pairs(device) for _ in range(batch)]
        if max(sizes) > 0:
            labels, gt = self._padded_gts(cls_target, gts, device, dtype)
            bad = ((labels < 0) | (labels >= self.num_cls)).any(1)  # padding (0) is valid
            safe = labels.clamp(0, self.num_cls - 1)  # checked below, before any use
            with torch.no_grad():
                gt_norm = self._normalize(gt)
                priced = [self.cost(c.detach().to(dtype), self._normalize(p.detach().to(dtype)),
                                    safe, gt_norm) for c, p in zip(cls_preds, pts_preds)]
            cost = torch.stack([c for c, _ in priced]).flatten(0, 1)  # [L * B, M, G], layer-major
            order = torch.stack([o for _, o in priced])  # [L, B, M, G]
            targets = [c.detach() for c in cls_target]  # for the error message only
            pairs = solve_checked(cost, sizes, bad,
                                  lambda flags: self._check_labels(flags, targets),
                                  self.matcher or 'host', self._label_checks)
            layer, sample = pairs[0] // batch, pairs[0] % batch
            query, gt_idx = pairs[1], pairs[2]
            out_cls[layer, sample, query] = labels[sample, gt_idx]
            out_pts[layer, sample, query] = gt[sample, gt_idx, order[layer, sample, query, gt_idx]]
            indices = group_pairs(pairs, num_query, sizes, -1, layers)
        self.indices = indices
        weights = self._weights(out_cls, out_pts)
        if stacked:
            return out_cls, out_pts, weights
        return [(out_cls[i], out_pts[i], weights[i]) for i in range(layers)]
