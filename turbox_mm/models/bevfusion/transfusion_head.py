"""``TransFusionHead``: BEVFusion's detection head (mmdet3d 1.4 ``projects/BEVFusion``).

Proposals are the ``num_proposals`` strongest local maxima of a class heatmap over the fused
BEV features; a transformer decoder refines their features against the whole BEV, and
per-proposal heads predict the box and the class. Training assigns proposals to ground truth
one to one (:mod:`.transfusion_assigner`) and adds a Gaussian-focal loss on the dense
heatmap. The procedure is upstream's, including its quirks (``docs/design/bevfusion.md``
section 4): the local maximum ignores the border except for pedestrians and traffic cones on
nuScenes, the proposal order is class-major, the score threshold 0.0 is off. Where upstream
fails this head does not: samples without ground-truth boxes (all proposals background),
more than one decoder layer in the targets, ``nms_kernel_size=1``. Ties in the proposal
ranking are broken by a stable sort. ``op_impl='turbox'`` builds the same training targets
for the batch at once with one host synchronisation (:mod:`.transfusion_targets`).
"""
import copy
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from mmcv.cnn import ConvModule, build_conv_layer
from mmdet.models.losses import L1Loss
from mmdet.models.losses.smooth_l1_loss import l1_loss
from mmdet3d.models.dense_heads.centerpoint_head import SeparateHead
from mmdet3d.models.layers import circle_nms, nms_bev
from mmdet3d.models.utils import draw_heatmap_gaussian, gaussian_radius
from mmdet3d.structures import xywhr2xyxyr
from mmengine.structures import InstanceData
from torch import Tensor, nn

from turbox_mm.models.losses import focal_loss_like_mmdet
from turbox_mm.models.sparse4d.matching import check_matcher
from turbox_mm.ops.dispatch import check_op_impl
from turbox_mm.registry import MODELS, TASK_UTILS
from turbox_mm.utils.upload import device_constant

from .transfusion_targets import batched_targets

BOX_KEYS = ('center', 'height', 'dim', 'rot', 'vel')
#: Classes whose heatmap peaks are not suppressed by the local maximum, per dataset.
SMALL_CLASSES = {'nuScenes': (8, 9), 'Waymo': (1, 2)}
#: Test-time NMS groups of classes: (class indices, radius or IoU threshold; -1: no NMS).
NMS_TASKS = {'nuScenes': (((0, 1, 2, 3, 4, 5, 6, 7), -1), ((8, ), 0.175), ((9, ), 0.175)),
             'Waymo': (((0, ), 0.7), ((1, ), 0.7), ((2, ), 0.7))}


def bev_grid(x_size: int, y_size: int) -> Tensor:
    """``[1, x_size * y_size, 2]`` cell centres ``(x + 0.5, y + 0.5)``, x-major."""
    xs, ys = torch.meshgrid(torch.linspace(0, x_size - 1, x_size),
                            torch.linspace(0, y_size - 1, y_size), indexing='ij')
    return torch.stack([xs + 0.5, ys + 0.5], -1).view(1, -1, 2)


@MODELS.register_module()
class TransFusionHead(nn.Module):
    """BEVFusion's TransFusion head (module docstring); arguments as upstream's.

    Args:
        num_proposals (int): Proposals per sample (200).
        auxiliary (bool): Supervise every decoder layer (their outputs concatenated along the
            proposals).
        in_channels (int): Channels of the fused BEV (512).
        hidden_channel (int): Width of the decoder (128).
        num_classes (int): K (10).
        num_decoder_layers (int): Decoder layers (1).
        decoder_layer (dict): One decoder layer's config
            (:class:`.transfusion_layers.TransFusionDecoderLayer`).
        num_heads (int): Kept for the config's signature.
        nms_kernel_size (int): Window of the heatmap's local maximum (3).
        bn_momentum (float): Momentum of every BatchNorm of the head (0.1).
        common_heads (dict): ``name: (channels, convs)`` of the box heads.
        num_heatmap_convs (int): Convs of the per-proposal class head. Defaults to 2.
        conv_cfg, norm_cfg (dict): Of the per-proposal heads (Conv1d, BN1d).
        bias (str or bool): Bias of the convolutions (``'auto'``).
        loss_cls, loss_bbox, loss_heatmap (dict): The losses' configs.
        train_cfg, test_cfg (dict): As upstream (``grid_size``, ``out_size_factor``,
            ``voxel_size``, ``point_cloud_range``, ``gaussian_overlap``, ``min_radius``,
            ``pos_weight``, ``code_weights``, ``assigner``; ``dataset``, ``nms_type``, ...).
        bbox_coder (dict): :class:`.transfusion_bbox_coder.TransFusionBBoxCoder`'s config.
        op_impl (str): ``'stock'`` builds the training targets sample by sample as upstream;
            ``'turbox'`` builds the same targets for the batch without a host synchronisation
            (:mod:`.transfusion_targets`) and normalises the losses without reading tensors
            on the host. Defaults to 'stock'.
        matcher (str): Where the turbox targets solve the Hungarian matching: ``'device'``
            (``turbox_mm::lsap`` where its kernel runs, scipy's assignment without a host
            read; elsewhere scipy) or ``'host'`` (scipy after one transfer). The stock path
            always uses scipy per sample. Defaults to 'device'.
    """

    def __init__(self, num_proposals: int = 128, auxiliary: bool = True, in_channels: int = 384,
                 hidden_channel: int = 128, num_classes: int = 4, num_decoder_layers: int = 3,
                 decoder_layer: Optional[dict] = None, num_heads: int = 8,
                 nms_kernel_size: int = 1, bn_momentum: float = 0.1,
                 common_heads: Optional[dict] = None, num_heatmap_convs: int = 2,
                 conv_cfg: dict = dict(type='Conv1d'), norm_cfg: dict = dict(type='BN1d'),
                 bias='auto',
                 loss_cls: dict = dict(type='mmdet.GaussianFocalLoss', reduction='mean'),
                 loss_bbox: dict = dict(type='mmdet.L1Loss', reduction='mean'),
                 loss_heatmap: dict = dict(type='mmdet.GaussianFocalLoss', reduction='mean'),
                 train_cfg: Optional[dict] = None, test_cfg: Optional[dict] = None,
                 bbox_coder: Optional[dict] = None, op_impl: str = 'stock',
                 matcher: str = 'device') -> None:
        super().__init__()
        self.op_impl = check_op_impl('TransFusionHead', op_impl)
        self.matcher = check_matcher('TransFusionHead', matcher, allow_none=False)
        if test_cfg is None or 'grid_size' not in test_cfg:
            raise ValueError('TransFusionHead: test_cfg must give grid_size and '
                             'out_size_factor (the BEV grid of the proposals)')
        if nms_kernel_size < 1 or nms_kernel_size % 2 == 0:
            raise ValueError(f'TransFusionHead: nms_kernel_size must be odd and >= 1, got '
                             f'{nms_kernel_size}')
        self.num_classes = num_classes
        self.num_proposals = num_proposals
        self.auxiliary = auxiliary
        self.num_decoder_layers = num_decoder_layers
        self.nms_kernel_size = nms_kernel_size
        self.bn_momentum = bn_momentum
        self.train_cfg = train_cfg
        self.test_cfg = test_cfg
        self.use_sigmoid_cls = loss_cls.get('use_sigmoid', False)
        if not self.use_sigmoid_cls:
            self.num_classes += 1
        self.loss_cls = MODELS.build(loss_cls)
        self.loss_bbox = MODELS.build(loss_bbox)
        self.loss_heatmap = MODELS.build(loss_heatmap)
        self.bbox_coder = TASK_UTILS.build(bbox_coder)
        use_bias = bool(bias)  # 'auto' is a bias for the plain convolutions, as upstream
        self.shared_conv = build_conv_layer(
            dict(type='Conv2d'), in_channels, hidden_channel, kernel_size=3, padding=1,
            bias=use_bias)
        self.heatmap_head = nn.Sequential(
            ConvModule(hidden_channel, hidden_channel, kernel_size=3, padding=1, bias=bias,
                       conv_cfg=dict(type='Conv2d'), norm_cfg=dict(type='BN2d')),
            build_conv_layer(dict(type='Conv2d'), hidden_channel, num_classes, kernel_size=3,
                             padding=1, bias=use_bias))
        self.class_encoding = nn.Conv1d(num_classes, hidden_channel, 1)
        self.decoder = nn.ModuleList(MODELS.build(copy.deepcopy(decoder_layer))
                                     for _ in range(num_decoder_layers))
        heads = dict(common_heads or {}, heatmap=(self.num_classes, num_heatmap_convs))
        self.prediction_heads = nn.ModuleList(
            SeparateHead(hidden_channel, copy.deepcopy(heads), conv_cfg=conv_cfg,
                         norm_cfg=norm_cfg, bias=bias) for _ in range(num_decoder_layers))
        self.init_weights()
        self.bbox_assigner = None if train_cfg is None else \
            TASK_UTILS.build(train_cfg['assigner'])
        out = test_cfg['out_size_factor']
        self.register_buffer('bev_pos', bev_grid(test_cfg['grid_size'][0] // out,
                                                 test_cfg['grid_size'][1] // out),
                             persistent=False)

    def init_weights(self) -> None:
        """Xavier on the decoder's matrices, ``bn_momentum`` on every BatchNorm (upstream's;
        the per-proposal heads keep their construction-time init: BEVFusion never runs their
        ``init_weights``)."""
        for param in self.decoder.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)
        for module in self.modules():
            if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                module.momentum = self.bn_momentum

    # -- forward --------------------------------------------------------------------------------

    def _local_maxima(self, heat: Tensor) -> Tensor:
        """``heat`` where it is its window's maximum (the border excluded), else 0."""
        k = self.nms_kernel_size
        if k == 1:
            return heat
        pad = k // 2
        local_max = torch.zeros_like(heat)
        local_max[:, :, pad:-pad, pad:-pad] = F.max_pool2d(heat, kernel_size=k, stride=1)
        for cls in SMALL_CLASSES.get(self.test_cfg.get('dataset'), ()):
            local_max[:, cls] = heat[:, cls]
        return heat * (heat == local_max)

    def forward(self, feats) -> Dict[str, Tensor]:
        """Fused BEV ``[B, in_channels, X, Y]`` (or a one-element list of it) -> predictions:
        ``center``, ``height``, ``dim``, ``rot``, ``vel``, ``heatmap`` ``[B, *, P * layers]``
        (every layer with ``auxiliary``), ``query_heatmap_score`` ``[B, K, P]``,
        ``dense_heatmap`` ``[B, K, X, Y]``, ``query_labels`` ``[B, P]``."""
        x = feats[0] if isinstance(feats, (list, tuple)) else feats
        batch = x.shape[0]
        feat = self.shared_conv(x)
        flat = feat.view(batch, feat.shape[1], -1)
        bev_pos = self.bev_pos.expand(batch, -1, -1)  # float32, as upstream's, under AMP too
        with torch.autocast(device_type=feat.device.type, enabled=False):
            dense_heatmap = self.heatmap_head(feat.float())
        heat = self._local_maxima(dense_heatmap.detach().sigmoid())
        heat = heat.view(batch, self.num_classes, -1)
        cells = heat.shape[-1]
        top = heat.view(batch, -1).argsort(dim=-1, descending=True,
                                           stable=True)[:, :self.num_proposals]
        labels, index = top // cells, top % cells
        query = flat.gather(-1, index[:, None].expand(-1, flat.shape[1], -1))
        query = query + self.class_encoding(
            F.one_hot(labels, self.num_classes).permute(0, 2, 1).to(query.dtype))
        query_pos = bev_pos.gather(1, index[..., None].expand(-1, -1, 2))
        layers = []
        for decoder, head in zip(self.decoder, self.prediction_heads):
            query = decoder(query, flat, query_pos, bev_pos)
            out = head(query)
            out['center'] = out['center'] + query_pos.permute(0, 2, 1)
            layers.append(out)
            query_pos = out['center'].detach().clone().permute(0, 2, 1)
        used = layers if self.auxiliary else layers[-1:]
        preds = {key: torch.cat([layer[key] for layer in used], -1) for key in used[0]}
        preds['query_heatmap_score'] = heat.gather(
            -1, index[:, None].expand(-1, self.num_classes, -1))
        preds['dense_heatmap'] = dense_heatmap
        preds['query_labels'] = labels
        return preds

    # -- training -------------------------------------------------------------------------------

    def loss(self, feats, batch_data_samples: Sequence) -> Dict[str, Tensor]:
        """Losses for a batch (the samples' ``gt_instances_3d``)."""
        preds = self(feats)
        return self.loss_by_feat(preds, [s.gt_instances_3d for s in batch_data_samples])

    def _layers(self) -> int:
        return self.num_decoder_layers if self.auxiliary else 1

    def get_targets(self, batch_gt_instances_3d: List[InstanceData], preds: Dict[str, Tensor]):
        """Per-sample targets, stacked: labels, label weights, box targets and weights
        ``[B, P * layers(, code)]``, IoUs, the positive count, the mean matched IoU and the
        dense heatmap targets ``[B, K, X, Y]``."""
        if self.op_impl == 'turbox':
            return batched_targets(self, batch_gt_instances_3d, preds)
        results = [self.get_targets_single(gt, {k: v[b:b + 1] for k, v in preds.items()})
                   for b, gt in enumerate(batch_gt_instances_3d)]
        stacked = [torch.cat([r[i] for r in results]) for i in (0, 1, 2, 3, 4, 7)]
        num_pos = sum(r[5] for r in results)
        matched_ious = sum(r[6] for r in results) / max(len(results), 1)
        labels, label_weights, bbox_targets, bbox_weights, ious, heatmap = stacked
        return (labels, label_weights, bbox_targets, bbox_weights, ious, num_pos, matched_ious,
                heatmap)

    def get_targets_single(self, gt_instances_3d: InstanceData, preds: Dict[str, Tensor]):
        """Targets of one sample (``preds`` sliced to it, every layer's proposals)."""
        cfg = self.train_cfg
        gt_boxes = gt_instances_3d.bboxes_3d
        gt_labels = gt_instances_3d.labels_3d
        score = preds['heatmap'].detach()
        boxes = self.bbox_coder.decode(score, *(preds[k].detach() if k in preds else None
                                                for k in ('rot', 'dim', 'center', 'height',
                                                          'vel')))[0]['bboxes']
        device = score.device
        gt_tensor = gt_boxes.tensor.to(device)
        gt_labels = gt_labels.to(device)
        total = score.shape[-1]
        gt_inds, overlaps = [], []
        for layer in range(self._layers()):
            span = slice(layer * self.num_proposals, (layer + 1) * self.num_proposals)
            result = self.bbox_assigner.assign(boxes[span], gt_tensor, gt_labels,
                                               score[0][:, span], cfg)
            gt_inds.append(result.gt_inds)
            overlaps.append(result.max_overlaps)
        gt_inds, ious = torch.cat(gt_inds), torch.cat(overlaps).clamp(0.0, 1.0)
        pos = torch.nonzero(gt_inds > 0)[:, 0]
        neg = torch.nonzero(gt_inds == 0)[:, 0]
        code = self.bbox_coder.code_size
        bbox_targets = torch.zeros(total, code, device=device)
        bbox_weights = torch.zeros(total, code, device=device)
        labels = torch.full((total, ), self.num_classes, dtype=torch.long, device=device)
        label_weights = torch.zeros(total, dtype=torch.long, device=device)
        if len(pos):
            matched = gt_inds[pos] - 1
            bbox_targets[pos] = self.bbox_coder.encode(gt_tensor[matched])
            bbox_weights[pos] = 1.0
            labels[pos] = gt_labels[matched]
            label_weights[pos] = 1 if cfg['pos_weight'] <= 0 else cfg['pos_weight']
        label_weights[neg] = 1
        heatmap = self._heatmap_targets(gt_boxes, gt_labels, device)
        mean_iou = float(ious[pos].sum() / max(len(pos), 1))
        return (labels[None], label_weights[None], bbox_targets[None], bbox_weights[None],
                ious[None], int(pos.shape[0]), mean_iou, heatmap[None])

    def _heatmap_targets(self, gt_boxes, gt_labels: Tensor, device) -> Tensor:
        """``[K, X, Y]``: per box a Gaussian at its cell (upstream's loop and rounding)."""
        cfg = self.train_cfg
        boxes = torch.cat([gt_boxes.gravity_center, gt_boxes.tensor[:, 3:]], 1).to(device)
        grid = torch.tensor(cfg['grid_size'])
        pc_range = torch.tensor(cfg['point_cloud_range'])
        voxel = torch.tensor(cfg['voxel_size'])
        factor = cfg['out_size_factor']
        fmap = grid[:2] // factor
        heatmap = boxes.new_zeros(self.num_classes, int(fmap[1]), int(fmap[0]))
        for idx in range(len(boxes)):
            width = boxes[idx][3] / voxel[0] / factor
            length = boxes[idx][4] / voxel[1] / factor
            if width > 0 and length > 0:
                radius = gaussian_radius((length, width), min_overlap=cfg['gaussian_overlap'])
                radius = max(cfg['min_radius'], int(radius))
                x = (boxes[idx][0] - pc_range[0]) / voxel[0] / factor
                y = (boxes[idx][1] - pc_range[1]) / voxel[1] / factor
                cell = torch.tensor([x, y], dtype=torch.float32, device=device).to(torch.int32)
                draw_heatmap_gaussian(heatmap[gt_labels[idx]], cell[[1, 0]], radius)
        return heatmap

    def loss_by_feat(self, preds: Dict[str, Tensor],
                     batch_gt_instances_3d: List[InstanceData]) -> Dict[str, Tensor]:
        """``loss_heatmap`` and, per supervised layer, ``layer_{i}_loss_cls`` and
        ``layer_{i}_loss_bbox`` (the last layer is ``layer_-1``), plus ``matched_ious``."""
        (labels, label_weights, bbox_targets, bbox_weights, _, num_pos, matched_ious,
         heatmap) = self.get_targets(batch_gt_instances_3d, preds)
        peaks = heatmap.eq(1).float().sum()
        losses = dict(loss_heatmap=self.loss_heatmap(
            preds['dense_heatmap'].sigmoid().clamp(1e-4, 1 - 1e-4).float(), heatmap.float(),
            avg_factor=peaks.clamp(min=1) if self.op_impl == 'turbox' else max(peaks.item(), 1)))
        code_weights = self.train_cfg.get('code_weights', None)
        layers = self._layers()
        for layer in range(layers):
            prefix = 'layer_-1' if layer == layers - 1 else f'layer_{layer}'
            span = slice(layer * self.num_proposals, (layer + 1) * self.num_proposals)
            cls_score = preds['heatmap'][..., span].permute(0, 2, 1).reshape(-1,
                                                                             self.num_classes)
            cls_args = (cls_score.float(), labels[:, span].reshape(-1),
                        label_weights[:, span].reshape(-1))
            losses[f'{prefix}_loss_cls'] = (
                focal_loss_like_mmdet(self.loss_cls, *cls_args, avg_factor=max(num_pos, 1))
                if self.op_impl == 'turbox' else
                self.loss_cls(*cls_args, avg_factor=max(num_pos, 1)))
            box = torch.cat([preds[k][..., span] for k in BOX_KEYS if k in preds],
                            1).permute(0, 2, 1)
            weights = bbox_weights[:, span]
            if code_weights is not None:
                weights = weights * self._code_weights(code_weights, weights)
            losses[f'{prefix}_loss_bbox'] = self._loss_bbox(
                box, bbox_targets[:, span], weights, num_pos)
        losses['matched_ious'] = (matched_ious.detach() if isinstance(matched_ious, Tensor) else
                                  losses['loss_heatmap'].new_tensor(matched_ious))
        return losses

    def _code_weights(self, code_weights: Sequence[float], like: Tensor) -> Tensor:
        """``code_weights`` on ``like``'s device: a fresh host copy each call on the stock
        path (upstream's ``new_tensor``), uploaded once on the turbox path."""
        if self.op_impl != 'turbox':
            return like.new_tensor(code_weights)
        return device_constant(code_weights, like)

    def _loss_bbox(self, box: Tensor, targets: Tensor, weights: Tensor, num_pos: int) -> Tensor:
        """The box loss normalised by the positive count. mmdet's ``L1Loss`` first asks the
        device whether any weight is positive (a host synchronisation); on the turbox path the
        count, a host int, answers that, and the same functional loss runs."""
        if self.op_impl != 'turbox' or type(self.loss_bbox) is not L1Loss:
            return self.loss_bbox(box, targets, weights, avg_factor=max(num_pos, 1))
        if num_pos == 0:  # what L1Loss returns when no weight is positive
            return (box * weights).sum()
        return self.loss_bbox.loss_weight * l1_loss(
            box, targets, weights, reduction=self.loss_bbox.reduction, avg_factor=num_pos)

    # -- testing --------------------------------------------------------------------------------

    def predict(self, feats, batch_input_metas: List[dict]) -> List[InstanceData]:
        """Detections of a batch: ``bboxes_3d``, ``scores_3d``, ``labels_3d`` per sample."""
        return self.predict_by_feat(self(feats), batch_input_metas)

    def predict_by_feat(self, preds: Dict[str, Tensor],
                        batch_input_metas: List[dict]) -> List[InstanceData]:
        """Decode the last layer's proposals: score = sigmoid(class logit) x heatmap peak, for
        the proposal's class; centre-range filter; the test config's NMS, if any."""
        last = slice(-self.num_proposals, None)
        one_hot = F.one_hot(preds['query_labels'], self.num_classes).permute(0, 2, 1)
        score = preds['heatmap'][..., last].sigmoid() * preds['query_heatmap_score'] * one_hot
        decoded = self.bbox_coder.decode(
            score, *(preds[k][..., last] if k in preds else None
                     for k in ('rot', 'dim', 'center', 'height', 'vel')), filter=True)
        results = []
        for meta, det in zip(batch_input_metas, decoded):
            boxes, scores, labels = det['bboxes'], det['scores'], det['labels']
            if self.test_cfg.get('nms_type') is not None:
                keep = self._nms(boxes, scores, labels, meta)
                boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            out = InstanceData()
            out.bboxes_3d = batch_input_metas[0]['box_type_3d'](boxes, box_dim=boxes.shape[-1])
            out.scores_3d = scores
            out.labels_3d = labels.int()
            results.append(out)
        return results

    def _nms(self, boxes: Tensor, scores: Tensor, labels: Tensor, meta: dict) -> Tensor:
        """Boolean keep mask: per group of classes, circle NMS or rotated BEV NMS (upstream's
        test-time option; BEVFusion's nuScenes configs run none)."""
        keep = torch.zeros_like(scores, dtype=torch.bool)
        for classes, radius in NMS_TASKS[self.test_cfg['dataset']]:
            group = torch.zeros_like(keep)
            for cls in classes:
                group |= labels == cls
            members = torch.nonzero(group)[:, 0]
            if radius <= 0 or len(members) == 0:
                keep[members] = True
                continue
            if self.test_cfg['nms_type'] == 'circle':
                centres = torch.cat([boxes[members, :2], scores[members, None]], 1)
                kept = torch.as_tensor(circle_nms(centres.detach().cpu().numpy(), radius),
                                       dtype=torch.long, device=boxes.device)
            else:
                bev = xywhr2xyxyr(meta['box_type_3d'](boxes[members, :7], 7).bev)
                kept = nms_bev(bev, scores[members], thresh=radius,
                               pre_max_size=self.test_cfg['pre_maxsize'],
                               post_max_size=self.test_cfg['post_maxsize'])
            keep[members[kept]] = True
        return keep
