"""``MapTRHead``: MapTR v1's map-element head on a BEV embedding (upstream
``dense_heads/maptr_head.py`` @ 50f2ecd and the decoder half of ``modules/transformer.py``
@ 8704e6b; docs/design/maptr.md, sections 4 and 5).

Hierarchical queries: ``V`` instance embeddings plus ``P`` point embeddings (each ``2C``
wide) give ``V x P`` queries, whose first ``C`` channels are the query position and last
``C`` the query; a linear map of the position gives each query's initial reference point.
The decoder (:class:`.MapTRDecoder`) refines the points layer by layer; per layer, the class
logits of a vector come from the mean of its ``P`` outputs, and its box is the bounds of its
points (``transform_box``, ``'minmax'``).

Training: per layer, the vectors are assigned one to one to the map instances over their
equivalent point orders (:class:`.MapTRAssigner`), and the losses are focal classification,
point L1 (normalised), edge-direction cosine (metric) and box L1 / GIoU (weight 0 in
upstream's configs); keys ``loss_cls, loss_bbox, loss_iou, loss_pts, loss_dir`` for the last
layer and ``d0.`` ... ``d4.`` for the others.

The BEV encoder is not part of this head: the head takes the BEV embedding ``[B, H * W, C]``
(row ``y``-major as upstream's, or ``[B, C, H, W]``) and returns ``bev_embed`` batch-first
(upstream's is ``[H * W, B, C]``). Upstream's ``transformer.decoder.*`` and
``transformer.reference_points`` are this head's ``decoder.*`` and ``reference_points``.

``op_impl``:

- ``'stock'``: upstream's procedure. Per layer and sample: costs, one host copy and scipy;
  targets by boolean masks; the positive count read on the host (``.item()``); every loss
  term computed, the weight-0 ones included.
- ``'turbox'``: the same numbers without host waits: all layers x samples assigned at once,
  on the GPU by ``turbox_mm::lsap`` (``matcher='device'``) or with one host transfer
  (:mod:`.maptr_targets`), the positive count a device tensor, mmdet's focal
  loss through :func:`turbox_mm.models.losses.focal_loss_like_mmdet`, non-finite box targets
  masked rather than indexed away, loss terms whose ``loss_weight`` is 0 returned as a zero
  that keeps the graph (``0 * sum(preds)``) instead of being computed, host ground truth
  uploaded through pinned memory. It is also the default ``op_impl`` of the decoder's
  deformable attention (turbox's MSDA op), unless the decoder config sets it.

Ground truth of a sample (``gt_instances_3d`` of its data sample, or the list given to
:meth:`MapTRHead.loss_by_feat`): an ``InstanceData`` with

- ``labels``: ``[G]`` long (divider 0, ped_crossing 1, boundary 2);
- ``shifts``: ``[G, O, P_gt, 2]`` metric points of each instance's equivalent orders, padding
  orders at -10000 (``LoadMapGT``'s ``gt_map_shifts``);
- ``bboxes`` (optional): ``[G, 4]`` metric ``xyxy`` bounds (``gt_map_bboxes``); when absent,
  the bounds of the first order's points (only the weight-0 box terms read them);
- ``pts`` (optional, unused): ``[G, P_gt, 2]`` (``gt_map_pts``).

Arrays or tensors, on any device.
"""
import copy
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from mmdet.utils import reduce_mean
from mmengine.model import BaseModule, bias_init_with_prob
from mmengine.structures import InstanceData
from torch import Tensor, nn

from turbox_mm.models.sparse4d.matching import check_matcher
from turbox_mm.ops.dispatch import check_op_impl
from turbox_mm.registry import MODELS, TASK_UTILS
from turbox_mm.utils.upload import upload
from .custom_ms_deformable_attention import CustomMSDeformableAttention
from .geometry import (PC_RANGE, denormalize_2d_bbox, denormalize_2d_pts,
                       normalize_2d_bbox, normalize_2d_pts, pts_to_bbox)
from .maptr_targets import turbox_losses

#: The loss keys of one decoder layer, in upstream's order.
LOSS_KEYS = ('loss_cls', 'loss_bbox', 'loss_iou', 'loss_pts', 'loss_dir')
GroundTruth = Tuple[Tensor, Tensor, Tensor]  # labels [G], bboxes [G, 4], shifts [G, O, P, 2]


def _as_tensor(value, device: torch.device, dtype: torch.dtype, pinned: bool = False) -> Tensor:
    """A ground-truth field (array or tensor) on ``device`` in ``dtype``; with ``pinned``,
    a host one goes through pinned memory without a host wait (:func:`upload`)."""
    if not isinstance(value, Tensor):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if pinned:
        return upload(value, device, dtype)
    return value.to(device=device, dtype=dtype)


@MODELS.register_module()
class MapTRHead(BaseModule):
    """MapTR v1's head (module docstring); defaults are ``maptr_tiny_r50_24e``'s values.

    Args:
        num_classes (int): K. Defaults to 3.
        embed_dims (int): C. Defaults to 256.
        bev_h, bev_w (int): The BEV grid (rows along y, columns along x). Defaults to 200, 100.
        num_vec (int): V. Defaults to 50.
        num_pts_per_vec (int): P. Defaults to 20.
        num_pts_per_gt_vec (int): Points of a ground-truth order; predictions are
            interpolated to it in the losses and costs if it differs. Defaults to 20.
        query_embed_type (str): ``'instance_pts'`` (hierarchical) or ``'all_pts'`` (one
            embedding per query). Defaults to 'instance_pts'.
        transform_method (str): Points to boxes; only ``'minmax'``. Defaults to 'minmax'.
        gt_shift_pts_pattern (str): Which equivalent orders the ground truth carries; they
            come precomputed (``shifts``), so this only documents the config. Defaults to 'v2'.
        dir_interval (int): Point step of the direction loss's edges. Defaults to 1.
        with_box_refine (bool): Per-layer branches and reference refinement. Defaults to True.
        num_reg_fcs (int): Hidden layers of the branches. Defaults to 2.
        code_size (int): Outputs of the regression branch (2: x, y). Defaults to 2.
        code_weights (list[float], optional): Box L1 weights. Defaults to ``[1] * 4``.
        sync_cls_avg_factor (bool): Average the class normaliser over processes. Defaults to
            True.
        decoder (dict): :class:`.MapTRDecoder`'s config. Defaults to upstream's 6 layers.
        bbox_coder (dict): :class:`.MapTRNMSFreeCoder`'s config (its ``pc_range`` is the
            head's).
        loss_cls, loss_bbox, loss_iou, loss_pts, loss_dir (dict): The losses (upstream's
            types and weights: focal x2, L1 x0, GIoU x0, points L1 x5, direction x0.005).
        train_cfg (dict, optional): ``assigner`` (:class:`.MapTRAssigner`, its ``pc_range``
            defaulting to the head's). Needed for the losses.
        test_cfg (dict, optional): Unused (upstream's ``pts`` test config).
        op_impl (str): ``'stock'`` or ``'turbox'`` (module docstring). Defaults to 'stock'.
        matcher (str): Where ``op_impl='turbox'`` solves the assignments: ``'device'``
            (``turbox_mm::lsap`` on the GPU, scipy's matches without a host sync; the host
            path serves tensors its kernel does not run for) or ``'host'`` (scipy after one
            transfer). The stock path is upstream's either way. Defaults to 'device'.
        in_channels, num_query, as_two_stage: Upstream's arguments: ``in_channels`` must be
            ``embed_dims``; ``num_query`` is ignored (V x P, as upstream); two-stage is not
            supported (MapTR does not use it).
        init_cfg (dict, optional): mmengine's init config. Defaults to None.
    """

    decoder_layer_type = 'turbox_mm.MapTRDecoderLayer'

    #: What ``turbox.compile.modules='auto'`` compiles of this head: each decoder layer
    #: (self-attention, the deformable cross-attention, the FFN: dozens of eager launches a
    #: layer on a host-bound step, and no data-dependent control flow in the turbox path;
    #: the stock path's mmcv op breaks the graph). Compiled, the cross-attention always runs
    #: turbox_mm's MSDA op (mmcv's would break the graph), also at the small sizes where the
    #: eager turbox path calls mmcv's (:func:`.turbox_op_pays`). The reference-point
    #: refinement, the targets and the losses stay eager. v2's head inherits it. MapTR's
    #: detectors declare the whole head instead (:class:`~turbox_mm.models.maptr.MapTR`),
    #: which takes the place of this inside them.
    turbox_compile_submodules = ('decoder.layers.*', )

    def __init__(self, num_classes: int = 3, embed_dims: int = 256, bev_h: int = 200,
                 bev_w: int = 100, num_vec: int = 50, num_pts_per_vec: int = 20,
                 num_pts_per_gt_vec: int = 20, query_embed_type: str = 'instance_pts',
                 transform_method: str = 'minmax', gt_shift_pts_pattern: str = 'v2',
                 dir_interval: int = 1, with_box_refine: bool = True, num_reg_fcs: int = 2,
                 code_size: int = 2, code_weights: Optional[Sequence[float]] = None,
                 sync_cls_avg_factor: bool = True, decoder: Optional[dict] = None,
                 bbox_coder: Optional[dict] = None,
                 loss_cls: dict = dict(type='mmdet.FocalLoss', use_sigmoid=True, gamma=2.0,
                                       alpha=0.25, loss_weight=2.0),
                 loss_bbox: dict = dict(type='mmdet.L1Loss', loss_weight=0.0),
                 loss_iou: dict = dict(type='mmdet.GIoULoss', loss_weight=0.0),
                 loss_pts: dict = dict(type='turbox_mm.PtsL1Loss', loss_weight=5.0),
                 loss_dir: dict = dict(type='turbox_mm.PtsDirCosLoss', loss_weight=0.005),
                 train_cfg: Optional[dict] = None, test_cfg: Optional[dict] = None,
                 op_impl: str = 'stock', matcher: str = 'device',
                 in_channels: Optional[int] = None, num_query: Optional[int] = None,
                 as_two_stage: bool = False, init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg)
        name = type(self).__name__
        self.op_impl = check_op_impl(name, op_impl)
        self.matcher = check_matcher(name, matcher, allow_none=False)
        if as_two_stage:
            raise NotImplementedError(f'{name}: as_two_stage is not supported (MapTR does not '
                                      'use it)')
        if query_embed_type not in ('instance_pts', 'all_pts'):
            raise ValueError(f"{name}: query_embed_type must be 'instance_pts' or 'all_pts', "
                             f'got {query_embed_type!r}')
        if transform_method != 'minmax':
            raise NotImplementedError(f"{name}: only transform_method='minmax' (upstream has "
                                      'no other)')
        if in_channels is not None and in_channels != embed_dims:
            raise ValueError(f'{name}: in_channels ({in_channels}) must equal embed_dims '
                             f'({embed_dims})')
        if code_size != 2:
            raise NotImplementedError(f'{name}: only 2D points (code_size 2) are ported')
        self.num_classes = num_classes
        self.embed_dims = embed_dims
        self.bev_h, self.bev_w = bev_h, bev_w
        self.num_vec = num_vec
        self.num_pts_per_vec = num_pts_per_vec
        self.num_pts_per_gt_vec = num_pts_per_gt_vec
        self.query_embed_type = query_embed_type
        self.gt_shift_pts_pattern = gt_shift_pts_pattern
        self.dir_interval = dir_interval
        self.with_box_refine = with_box_refine
        self.sync_cls_avg_factor = sync_cls_avg_factor
        self.train_cfg, self.test_cfg = train_cfg, test_cfg

        coder = dict(type='turbox_mm.MapTRNMSFreeCoder', pc_range=PC_RANGE,
                     post_center_range=[-20, -35, -20, -35, 20, 35, 20, 35], max_num=50,
                     num_classes=num_classes)
        self.bbox_coder = TASK_UTILS.build(coder if bbox_coder is None else bbox_coder)
        self.pc_range = list(self.bbox_coder.pc_range)
        self.loss_cls = MODELS.build(loss_cls)
        self.loss_bbox = MODELS.build(loss_bbox)
        self.loss_iou = MODELS.build(loss_iou)
        self.loss_pts = MODELS.build(loss_pts)
        self.loss_dir = MODELS.build(loss_dir)
        if not getattr(self.loss_cls, 'use_sigmoid', False):
            raise NotImplementedError(f'{name}: only a sigmoid classification loss (MapTR\'s '
                                      'focal loss) is supported')
        self.assigner = None
        if train_cfg is not None and train_cfg.get('assigner') is not None:
            assigner = dict(train_cfg['assigner'])
            if assigner.get('pc_range') is None:
                assigner['pc_range'] = self.pc_range
            self.assigner = TASK_UTILS.build(assigner)
        self.register_buffer('code_weights', torch.tensor(
            [1.0] * 4 if code_weights is None else list(code_weights), dtype=torch.float32))

        self.decoder = MODELS.build(self._decoder_cfg(decoder, op_impl))
        self.reference_points = nn.Linear(embed_dims, 2)
        self.cls_branches, self.reg_branches = self._branches(num_reg_fcs, code_size)
        if query_embed_type == 'instance_pts':
            self.instance_embedding = nn.Embedding(num_vec, embed_dims * 2)
            self.pts_embedding = nn.Embedding(num_pts_per_vec, embed_dims * 2)
        else:
            self.query_embedding = nn.Embedding(num_vec * num_pts_per_vec, embed_dims * 2)
        self.register_buffer('bev_spatial_shapes', torch.tensor([[bev_h, bev_w]]),
                             persistent=False)
        self.register_buffer('bev_level_start_index', torch.tensor([0]), persistent=False)
        self.init_weights()

    # -- construction ---------------------------------------------------------------------------

    def _decoder_cfg(self, decoder: Optional[dict], op_impl: str) -> dict:
        """The decoder config, its layers' cross-attention defaulting to the head's
        ``op_impl`` and ``embed_dims``."""
        cfg = copy.deepcopy(decoder) if decoder is not None else dict(
            type='turbox_mm.MapTRDecoder', num_layers=6)
        cfg.setdefault('type', 'turbox_mm.MapTRDecoder')
        layer = cfg.setdefault('layer_cfg', dict(type=self.decoder_layer_type))
        layer.setdefault('type', self.decoder_layer_type)
        cross = layer.setdefault('cross_attn_cfg', dict(num_heads=8, num_levels=1,
                                                        num_points=4, dropout=0.1))
        cross.setdefault('embed_dims', self.embed_dims)
        cross.setdefault('op_impl', op_impl)
        return cfg

    def _branches(self, num_reg_fcs: int, code_size: int) -> Tuple[nn.ModuleList, nn.ModuleList]:
        """Per layer: class ``(Linear, LN, ReLU) x num_reg_fcs, Linear(K)``; points
        ``(Linear, ReLU) x num_reg_fcs, Linear(code_size)``. Copies with box refinement,
        one shared module otherwise (as upstream)."""
        dims = self.embed_dims
        cls_layers: List[nn.Module] = []
        reg_layers: List[nn.Module] = []
        for _ in range(num_reg_fcs):
            cls_layers += [nn.Linear(dims, dims), nn.LayerNorm(dims), nn.ReLU(inplace=True)]
            reg_layers += [nn.Linear(dims, dims), nn.ReLU()]
        cls_branch = nn.Sequential(*cls_layers, nn.Linear(dims, self.num_classes))
        reg_branch = nn.Sequential(*reg_layers, nn.Linear(dims, code_size))
        num = self.decoder.num_layers
        if self.with_box_refine:
            return (nn.ModuleList(copy.deepcopy(cls_branch) for _ in range(num)),
                    nn.ModuleList(copy.deepcopy(reg_branch) for _ in range(num)))
        return nn.ModuleList([cls_branch] * num), nn.ModuleList([reg_branch] * num)

    def init_weights(self) -> None:
        """Upstream's: Xavier-uniform on every decoder matrix, then the deformable
        attentions' own init; Xavier-uniform reference-point layer with zero bias; the class
        branches' last bias at the logit of 0.01. Embeddings stay N(0, 1), the branches
        PyTorch's default (upstream's init does not reach them)."""
        for param in self.decoder.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)
        for module in self.decoder.modules():
            if isinstance(module, CustomMSDeformableAttention):
                module.init_weights()
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.constant_(self.reference_points.bias, 0.0)
        for branch in self.cls_branches:
            nn.init.constant_(branch[-1].bias, bias_init_with_prob(0.01))
        self._is_init = True

    # -- forward --------------------------------------------------------------------------------

    def _num_vec(self) -> int:
        """Vectors decoded in this mode."""
        return self.num_vec

    def _layer_kwargs(self, num_vec: int) -> dict:
        """Extra arguments of every decoder layer (v2: the mask and the grouping)."""
        return {}

    def query_embeds(self, num_vec: int) -> Tensor:
        """``[num_vec * P, 2C]``: instance + point embeddings, instance-major."""
        if self.query_embed_type == 'all_pts':
            return self.query_embedding.weight[:num_vec * self.num_pts_per_vec]
        return (self.pts_embedding.weight[None] +
                self.instance_embedding.weight[:num_vec, None]).flatten(0, 1)

    def flatten_bev(self, bev_embed: Tensor) -> Tensor:
        """``[B, H * W, C]`` from ``[B, H * W, C]`` or ``[B, C, H, W]``."""
        if bev_embed.dim() == 4:
            if tuple(bev_embed.shape[2:]) != (self.bev_h, self.bev_w):
                raise ValueError(f'{type(self).__name__}: BEV of shape '
                                 f'{tuple(bev_embed.shape)}, expected [B, C, {self.bev_h}, '
                                 f'{self.bev_w}]')
            return bev_embed.flatten(2).transpose(1, 2)
        if bev_embed.dim() != 3 or bev_embed.shape[1] != self.bev_h * self.bev_w:
            raise ValueError(f'{type(self).__name__}: BEV of shape {tuple(bev_embed.shape)}, '
                             f'expected [B, {self.bev_h * self.bev_w}, C]')
        return bev_embed

    def forward(self, bev_embed: Tensor,
                batch_input_metas: Optional[List[dict]] = None) -> Dict[str, Optional[Tensor]]:
        """Decode the map vectors of a BEV embedding.

        Args:
            bev_embed (Tensor): ``[B, H * W, C]`` or ``[B, C, H, W]``.
            batch_input_metas (list[dict], optional): Unused (the BEV encoder reads them).

        Returns:
            dict: ``bev_embed`` ``[B, H * W, C]``; per decoder layer ``all_cls_scores``
            ``[L, B, V, K]`` logits, ``all_bbox_preds`` ``[L, B, V, 4]`` normalised
            ``(cx, cy, w, h)``, ``all_pts_preds`` ``[L, B, V, P, 2]`` normalised ``(x, y)``;
            ``enc_cls_scores``, ``enc_bbox_preds``, ``enc_pts_preds`` None (no two-stage).
        """
        bev = self.flatten_bev(bev_embed)
        batch = bev.shape[0]
        num_vec = self._num_vec()
        query_pos, query = self.query_embeds(num_vec).to(bev.dtype).split(self.embed_dims, 1)
        query_pos = query_pos[None].expand(batch, -1, -1)
        query = query[None].expand(batch, -1, -1)
        reference_points = self.reference_points(query_pos).sigmoid()
        states, points, _ = self.decoder(
            query, query_pos, bev, reference_points, self.bev_spatial_shapes,
            self.bev_level_start_index, self.reg_branches, refine=self.with_box_refine,
            **self._layer_kwargs(num_vec))
        layers = states.shape[0]
        per_vector = states.view(layers, batch, num_vec, self.num_pts_per_vec, -1).mean(3)
        cls = torch.stack([branch(per_vector[i]) for i, branch in enumerate(self.cls_branches)])
        pts = points.view(layers, batch, num_vec, self.num_pts_per_vec, 2)
        return dict(bev_embed=bev, all_cls_scores=cls, all_bbox_preds=pts_to_bbox(pts),
                    all_pts_preds=pts, enc_cls_scores=None, enc_bbox_preds=None,
                    enc_pts_preds=None)

    # -- ground truth ---------------------------------------------------------------------------

    def ground_truth(self, gt: InstanceData, device: torch.device) -> GroundTruth:
        """One sample's ``(labels [G], bboxes [G, 4], shifts [G, O, P_gt, 2])`` on ``device``
        (the fields of the module docstring)."""
        for key in ('labels', 'shifts'):
            if key not in gt:
                raise KeyError(f'{type(self).__name__}: ground truth needs {key!r} (labels '
                               f'[G], shifts [G, O, P, 2]); got {list(gt.keys())}')
        pinned = self.op_impl == 'turbox'
        labels = _as_tensor(gt.labels, device, torch.long, pinned).view(-1)
        shifts = _as_tensor(gt.shifts, device, torch.float32, pinned)
        if shifts.dim() != 4 or shifts.shape[0] != labels.shape[0] or shifts.shape[-1] != 2 \
                or shifts.shape[2] != self.num_pts_per_gt_vec:
            raise ValueError(f'{type(self).__name__}: shifts must be [G, O, '
                             f'{self.num_pts_per_gt_vec}, 2] with G = {labels.shape[0]} labels, '
                             f'got {tuple(shifts.shape)}')
        if 'bboxes' in gt:
            bboxes = _as_tensor(gt.bboxes, device, torch.float32, pinned)
        else:
            first = shifts[:, 0]
            bboxes = torch.cat([first.min(1)[0], first.max(1)[0]], -1)
        return labels, bboxes.view(-1, 4), shifts

    # -- training -------------------------------------------------------------------------------

    def loss(self, bev_embed: Tensor, batch_data_samples: Sequence) -> Dict[str, Tensor]:
        """Losses of a batch; ground truth from each sample's ``gt_instances_3d``."""
        metas = [getattr(s, 'metainfo', None) for s in batch_data_samples]
        preds = self(bev_embed, metas)
        return self.loss_by_feat(preds, [s.gt_instances_3d for s in batch_data_samples])

    def loss_by_feat(self, preds: Dict[str, Tensor],
                     batch_gt_instances: Sequence[InstanceData]) -> Dict[str, Tensor]:
        """Upstream's ``loss``: every layer's losses, keys ``loss_*`` (last layer) and
        ``d{i}.loss_*``."""
        device = preds['all_cls_scores'].device
        gts = [self.ground_truth(gt, device) for gt in batch_gt_instances]
        return self.group_losses([(preds, gts)])[0]

    def group_losses(self, groups: Sequence[Tuple[Dict[str, Tensor], List[GroundTruth]]]
                     ) -> List[Dict[str, Tensor]]:
        """Loss dicts of query groups, each ``(preds, ground truth)``; the turbox path
        assigns all groups with one host transfer."""
        if self.assigner is None:
            raise ValueError(f'{type(self).__name__}: train_cfg.assigner is needed for the '
                             'losses')
        if self.op_impl == 'turbox':
            return turbox_losses(self, groups)
        results = []
        for preds, gts in groups:
            per_layer = [self.loss_single(preds['all_cls_scores'][i], preds['all_bbox_preds'][i],
                                          preds['all_pts_preds'][i], gts)
                         for i in range(preds['all_cls_scores'].shape[0])]
            results.append(self._loss_dict(per_layer))
        return results

    @staticmethod
    def _loss_dict(per_layer: Sequence[Sequence[Tensor]]) -> Dict[str, Tensor]:
        losses = dict(zip(LOSS_KEYS, per_layer[-1]))
        for index, values in enumerate(per_layer[:-1]):
            losses.update({f'd{index}.{key}': value for key, value in zip(LOSS_KEYS, values)})
        return losses

    def _pred_pts(self, pts: Tensor) -> Tensor:
        """``[N, P, 2]`` predictions at the ground truth's point count (upstream
        interpolates linearly when they differ)."""
        if pts.shape[1] == self.num_pts_per_gt_vec:
            return pts
        pts = F.interpolate(pts.permute(0, 2, 1), size=self.num_pts_per_gt_vec, mode='linear',
                            align_corners=True)
        return pts.permute(0, 2, 1).contiguous()

    # stock: upstream's per-sample targets and per-layer losses

    def get_targets_single(self, cls_score: Tensor, bbox_pred: Tensor, pts_pred: Tensor,
                           gt: GroundTruth) -> Tuple[Tensor, ...]:
        """One sample of one layer: labels, label weights ``[V]``, box targets and weights
        ``[V, 4]``, points targets and weights ``[V, P_gt, 2]``, positive count (a tensor)."""
        gt_labels, gt_bboxes, gt_shifts = gt
        num_query = bbox_pred.shape[0]
        result, order_index = self.assigner.assign(bbox_pred, cls_score, pts_pred, gt_bboxes,
                                                   gt_labels, gt_shifts)
        pos = torch.nonzero(result.gt_inds > 0, as_tuple=False).squeeze(-1).unique()
        matched = result.gt_inds[pos] - 1
        labels = gt_bboxes.new_full((num_query, ), self.num_classes, dtype=torch.long)
        labels[pos] = gt_labels[matched]
        label_weights = gt_bboxes.new_ones(num_query)
        bbox_targets = torch.zeros_like(bbox_pred)
        bbox_weights = torch.zeros_like(bbox_pred)
        bbox_weights[pos] = 1.0
        bbox_targets[pos] = gt_bboxes[matched]
        pts_targets = pts_pred.new_zeros((num_query, self.num_pts_per_gt_vec, 2))
        pts_weights = torch.zeros_like(pts_targets)
        pts_weights[pos] = 1.0
        if order_index is not None:
            pts_targets[pos] = gt_shifts[matched, order_index[pos, matched]]
        return (labels, label_weights, bbox_targets, bbox_weights, pts_targets, pts_weights,
                pos.numel())

    def loss_single(self, cls_scores: Tensor, bbox_preds: Tensor, pts_preds: Tensor,
                    gts: Sequence[GroundTruth]) -> Tuple[Tensor, ...]:
        """Upstream's ``loss_single``: one decoder layer, the batch; the five losses."""
        targets = [self.get_targets_single(cls_scores[b].detach(), bbox_preds[b].detach(),
                                           pts_preds[b].detach(), gt)
                   for b, gt in enumerate(gts)]
        (labels, label_weights, bbox_targets, bbox_weights, pts_targets,
         pts_weights) = [torch.cat([t[i] for t in targets]) for i in range(6)]
        num_pos = sum(t[6] for t in targets)
        cls_scores = cls_scores.reshape(-1, self.num_classes)
        cls_avg_factor = num_pos * 1.0
        if self.sync_cls_avg_factor:
            cls_avg_factor = reduce_mean(cls_scores.new_tensor(cls_avg_factor))
        cls_avg_factor = max(cls_avg_factor, 1)
        loss_cls = self.loss_cls(cls_scores, labels, label_weights, avg_factor=cls_avg_factor)
        num_pos = torch.clamp(reduce_mean(loss_cls.new_tensor(num_pos)), min=1).item()

        bbox_preds = bbox_preds.reshape(-1, 4)
        normalized_bbox_targets = normalize_2d_bbox(bbox_targets, self.pc_range)
        finite = torch.isfinite(normalized_bbox_targets).all(dim=-1)
        bbox_weights = bbox_weights * self.code_weights
        loss_bbox = self.loss_bbox(bbox_preds[finite], normalized_bbox_targets[finite],
                                   bbox_weights[finite], avg_factor=num_pos)
        pts_preds = self._pred_pts(pts_preds.reshape(-1, pts_preds.shape[-2], 2))
        loss_pts = self.loss_pts(pts_preds[finite],
                                 normalize_2d_pts(pts_targets, self.pc_range)[finite],
                                 pts_weights[finite], avg_factor=num_pos)
        step = self.dir_interval
        metric_preds = denormalize_2d_pts(pts_preds, self.pc_range)
        pred_dirs = metric_preds[:, step:] - metric_preds[:, :-step]
        target_dirs = pts_targets[:, step:] - pts_targets[:, :-step]
        loss_dir = self.loss_dir(pred_dirs[finite], target_dirs[finite],
                                 pts_weights[:, :-step, 0][finite], avg_factor=num_pos)
        loss_iou = self.loss_iou(denormalize_2d_bbox(bbox_preds, self.pc_range)[finite],
                                 bbox_targets[finite], bbox_weights[finite], avg_factor=num_pos)
        return tuple(torch.nan_to_num(loss)
                     for loss in (loss_cls, loss_bbox, loss_iou, loss_pts, loss_dir))

    # -- testing --------------------------------------------------------------------------------

    def predict(self, bev_embed: Tensor, batch_input_metas: Optional[List[dict]] = None
                ) -> List[InstanceData]:
        """Map elements of a batch (:meth:`predict_by_feat`)."""
        return self.predict_by_feat(self(bev_embed, batch_input_metas), batch_input_metas)

    def predict_by_feat(self, preds: Dict[str, Tensor],
                        batch_input_metas: Optional[List[dict]] = None) -> List[InstanceData]:
        """Decode the last layer with the NMS-free coder: per sample ``pts_3d`` ``[k, P, 2]``
        (metres), ``scores_3d`` ``[k]``, ``labels_3d`` ``[k]``, ``bboxes`` ``[k, 4]`` (metric
        ``xyxy``; upstream's ``boxes_3d``), ``k <= max_num``, best first."""
        results = []
        for det in self.bbox_coder.decode(preds):
            out = InstanceData()
            out.pts_3d = det['pts']
            out.scores_3d = det['scores']
            out.labels_3d = det['labels']
            out.bboxes = det['bboxes']
            results.append(out)
        return results
