"""Sparse4D v3's detection head: the decoder of anchors over 6 cameras and time."""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.model import BaseModule
from torch import Tensor, nn

from turbox_mm.ops.dispatch import check_op_impl
from turbox_mm.registry import MODELS, TASK_UTILS
from .anchor_encoder import encode_at_once
from .head_losses import Sparse4DHeadLosses
from .operation_layers import OperationLayers

#: The operations a decoder layer may hold.
OPERATIONS = ('temp_gnn', 'gnn', 'norm', 'ffn', 'deformable', 'refine')


def default_operation_order(num_decoder: int = 6, num_single_frame_decoder: int = 1) -> List[str]:
    """Sparse4D v3's operation list: single-frame layers, then temporal ones.

    A single-frame layer is ``gnn, norm, deformable, ffn, norm, refine``; a temporal layer puts
    ``temp_gnn`` (attention to the instances of the previous frame) in front. The first layer
    drops its self-attention and norm (it would attend among identical zero features).

    Args:
        num_decoder (int): Layers (each ends with ``refine``). Defaults to 6.
        num_single_frame_decoder (int): Leading layers without temporal attention. Defaults
            to 1.

    Returns:
        list[str]: The operations, 39 for the defaults.

    Examples:
        >>> default_operation_order(2, 1)
        ['deformable', 'ffn', 'norm', 'refine', 'temp_gnn', 'gnn', 'norm', 'deformable', \
'ffn', 'norm', 'refine']
    """
    if not 0 <= num_single_frame_decoder <= num_decoder:
        raise ValueError(f'num_single_frame_decoder must be in [0, {num_decoder}], got '
                         f'{num_single_frame_decoder}')
    single = ['gnn', 'norm', 'deformable', 'ffn', 'norm', 'refine']
    order = (single * num_single_frame_decoder +
             (['temp_gnn'] + single) * (num_decoder - num_single_frame_decoder))
    return order[2:]


@MODELS.register_module()
class Sparse4DHead(Sparse4DHeadLosses, OperationLayers, BaseModule):
    """The Sparse4D v3 head: instance bank, decoder layers, denoising, losses and decoding.

    Per frame: the instance bank hands out the learned anchors (and, after the first frame of
    a sequence, the instances cached from the previous frame, projected into this one); in
    training, noisy copies of the ground truth (denoising queries) join them, walled off by an
    attention mask. The decoder then runs ``operation_order``: temporal attention to the cached
    instances (``temp_gnn``), self-attention (``gnn``), LayerNorm, deformable aggregation over
    cameras and levels, the asymmetric FFN and the refinement of anchors with class and quality
    scores after each layer. After the first ``num_single_frame_decoder`` layers the weakest
    current instances make room for the cached ones; after the last, the bank caches the best.

    Attention is *decoupled* as in v3: the positional embedding is concatenated to the feature
    rather than added (``512 = 256 + 256`` features in the attention), the values pass through
    ``fc_before`` and the output through ``fc_after``.

    Numbers and semantics follow upstream (docs/design/sparse4d.md, sections 2.2, 2.7, 2.11);
    the head runs in float32 (the detector disables autocast around it, as upstream's
    ``force_fp32``).

    Args:
        instance_bank (dict): :class:`~turbox_mm.models.sparse4d.InstanceBank` config.
        anchor_encoder (dict): :class:`~turbox_mm.models.sparse4d.SparseBox3DEncoder` config.
        graph_model (dict): Attention config (mmcv ``MultiheadAttention``), for ``gnn``.
        norm_layer (dict): Norm config, e.g. ``dict(type='LN', normalized_shape=256)``.
        ffn (dict): :class:`~turbox_mm.models.sparse4d.AsymmetricFFN` config.
        deformable_model (dict): :class:`~turbox_mm.models.sparse4d.DeformableFeatureAggregation`
            config.
        refine_layer (dict): :class:`~turbox_mm.models.sparse4d.SparseBox3DRefinementModule`
            config.
        temp_graph_model (dict, optional): Attention config for ``temp_gnn``. Defaults to None
            (then no ``temp_gnn`` may appear in the order).
        num_decoder (int): Decoder layers. Defaults to 6.
        num_single_frame_decoder (int): Layers before the bank's update. Defaults to 1.
        operation_order (list[str], optional): Defaults to :func:`default_operation_order`.
        sampler (dict, optional): :class:`~turbox_mm.models.sparse4d.target.SparseBox3DTarget`
            config; needed for training.
        decoder (dict, optional): :class:`~turbox_mm.models.sparse4d.SparseBox3DDecoder` config.
            Defaults to the decoder's defaults.
        loss_cls (dict, optional): Classification loss (``mmdet.FocalLoss``).
        loss_reg (dict, optional): :class:`~turbox_mm.models.sparse4d.losses.SparseBox3DLoss`.
        reg_weights (Sequence[float], optional): Weights of the 10 regression targets in the
            loss. Defaults to all ones.
        cls_threshold_to_reg (float): A matched query enters the regression losses only when
            its best class score exceeds this. Defaults to -1 (all).
        decouple_attn (bool): Concatenate instead of adding positional embeddings. Defaults to
            True.
        gt_cls_key (str): Key of the ground-truth labels in ``metas``. Defaults to
            ``'gt_labels_3d'`` (SparseDrive's map head: ``'gt_map_labels'``).
        gt_reg_key (str): Key of the regression targets in ``metas``. Defaults to
            ``'gt_bboxes_3d'`` (map head: ``'gt_map_pts'``).
        gt_id_key (str): Key of the ground-truth instance ids (temporal denoising). Defaults
            to ``'instance_id'``.
        with_instance_id (bool, optional): Tracking ids from the bank: None (Sparse4D v3) in
            inference only; True (SparseDrive's det head) in training too, where the motion
            head's instance queue needs them; False never (the map head). Defaults to None.
        task_prefix (str, optional): Prefix of the loss keys (``'det'`` gives
            ``det_loss_cls_0``, ...), as SparseDrive's heads name theirs. Defaults to None.
        op_impl (str): How the training losses (and a little of the forward) are computed.
            ``'stock'`` as upstream: the matching layer by layer and sample by sample (a host
            copy each), boolean indexing of the matched rows, mmcv's focal loss and mmdet's L1
            loss (which read device values on the host); ``'turbox'`` (``ops.fast``): the same
            losses with one host sync for all layers' matching
            (:meth:`SparseBox3DTarget.sample_layers`), rows kept by 0/1 weights, and the focal
            and L1 losses without host reads, each loss called once for all decoder layers
            (and once for all denoising layers) with one ``reduce_mean`` of every layer's
            normaliser (:meth:`_loss_stacked`); the matchings (one-to-one and denoising) are
            solved on the GPU by ``turbox_mm::lsap`` where the sampler leaves the choice to the
            head (``matcher=None``), so the step has no host sync for them; and the current
            and cached anchors embedded by one encoder call (:meth:`_embed_anchors`).
            Defaults to ``'stock'``.
        init_cfg (dict, optional): mmengine init config. Defaults to None.
    """

    #: What ``turbox.compile.modules='auto'`` compiles of this head (each on its own): the
    #: anchor encoder (called after every refinement), each decoder layer and the regression
    #: loss (box or line loss with their quality terms: elementwise work on all rows at once
    #: in the turbox path). They hold no data-dependent control flow; the bank, the
    #: denoising and the targets stay eager.
    turbox_compile_submodules = ('anchor_encoder', 'layers.*', 'loss_reg')

    def __init__(self,
                 instance_bank: dict,
                 anchor_encoder: dict,
                 graph_model: dict,
                 norm_layer: dict,
                 ffn: dict,
                 deformable_model: dict,
                 refine_layer: dict,
                 temp_graph_model: Optional[dict] = None,
                 num_decoder: int = 6,
                 num_single_frame_decoder: int = 1,
                 operation_order: Optional[Sequence[str]] = None,
                 sampler: Optional[dict] = None,
                 decoder: Optional[dict] = None,
                 loss_cls: Optional[dict] = None,
                 loss_reg: Optional[dict] = None,
                 reg_weights: Optional[Sequence[float]] = None,
                 cls_threshold_to_reg: float = -1.0,
                 decouple_attn: bool = True,
                 gt_cls_key: str = 'gt_labels_3d',
                 gt_reg_key: str = 'gt_bboxes_3d',
                 gt_id_key: str = 'instance_id',
                 with_instance_id: Optional[bool] = None,
                 task_prefix: Optional[str] = None,
                 op_impl: str = 'stock',
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg)
        self.op_impl = check_op_impl('Sparse4DHead', op_impl)
        self.gt_cls_key, self.gt_reg_key, self.gt_id_key = gt_cls_key, gt_reg_key, gt_id_key
        self.with_instance_id = with_instance_id
        self.task_prefix = task_prefix
        self.num_decoder = num_decoder
        self.num_single_frame_decoder = num_single_frame_decoder
        self.cls_threshold_to_reg = cls_threshold_to_reg
        self.decouple_attn = decouple_attn
        self.reg_weights = list(reg_weights) if reg_weights is not None else [1.0] * 10
        # on the module's device, so that the loss uploads nothing (an upload waits)
        self.register_buffer('reg_weight_vector', torch.tensor(self.reg_weights),
                             persistent=False)
        if operation_order is None:
            operation_order = default_operation_order(num_decoder, num_single_frame_decoder)
        operation_order = list(operation_order)
        unknown = sorted(set(operation_order) - set(OPERATIONS))
        if unknown:
            raise ValueError(f'Sparse4DHead: unknown operations {unknown} in operation_order; '
                             f'valid: {", ".join(OPERATIONS)}')
        if operation_order.count('refine') != num_decoder:
            raise ValueError(f"Sparse4DHead: operation_order has "
                             f"{operation_order.count('refine')} 'refine' steps, "
                             f'num_decoder is {num_decoder}')
        if 'temp_gnn' in operation_order and temp_graph_model is None:
            raise ValueError("Sparse4DHead: operation_order has 'temp_gnn' but "
                             'temp_graph_model is None')
        self.operation_order = operation_order

        self.instance_bank = MODELS.build(instance_bank)
        self.anchor_encoder = MODELS.build(anchor_encoder)
        self.sampler = TASK_UTILS.build(sampler) if sampler is not None else None
        if getattr(self.sampler, 'matcher', 'host') is None:  # the sampler leaves it to us
            self.sampler.matcher = 'device' if self.op_impl == 'turbox' else 'host'
        self.decoder = TASK_UTILS.build(decoder if decoder is not None else
                                        dict(type='turbox_mm.SparseBox3DDecoder'))
        self.loss_cls = MODELS.build(loss_cls) if loss_cls is not None else None
        self.loss_reg = MODELS.build(loss_reg) if loss_reg is not None else None

        configs = dict(temp_gnn=temp_graph_model, gnn=graph_model, norm=norm_layer, ffn=ffn,
                       deformable=deformable_model, refine=refine_layer)
        self.layers = nn.ModuleList([self.build_op(op, configs[op]) for op in operation_order])
        self.embed_dims = self.instance_bank.embed_dims
        if decouple_attn:
            self.fc_before = nn.Linear(self.embed_dims, self.embed_dims * 2, bias=False)
            self.fc_after = nn.Linear(self.embed_dims * 2, self.embed_dims, bias=False)
        else:
            self.fc_before = self.fc_after = nn.Identity()

    # -- forward ----------------------------------------------------------------------------

    def forward(self, feature_maps, metas: Dict) -> Dict:
        """Decode one frame.

        Args:
            feature_maps: What the deformable model reads: ``(col_feats, spatial_shape,
                scale_start_index)`` from
                :func:`~turbox_mm.ops.deformable_aggregation.feature_maps_format`.
            metas (dict): ``projection_mat`` ``[B, N, 4, 4]``, ``image_wh`` ``[B, N, 2]``,
                ``timestamp`` ``[B]`` (float64 seconds), ``T_global`` and ``T_global_inv``
                ``[B, 4, 4]``; in training also ``gt_bboxes_3d`` (list of ``[n, 9]``: gravity
                centre, ``l, w, h``, yaw, ``vx, vy``), ``gt_labels_3d`` and ``instance_id``
                (lists of ``[n]`` long).

        Returns:
            dict: Per decoder layer ``prediction`` ``[B, Q, 11]``, ``classification``
            ``[B, Q, C]`` (None for layers whose scores are not needed in inference) and
            ``quality`` ``[B, Q, 2]``; in training with denoising also ``dn_*`` entries; in
            inference ``instance_id`` ``[B, Q]`` (tracking ids from the instance bank, -1
            where none).
        """
        bank = self.instance_bank
        batch = metas['projection_mat'].shape[0]
        sampler = self.sampler
        num_dn_groups = getattr(sampler, 'num_dn_groups', 0) if sampler is not None else 0
        if num_dn_groups > 0 and sampler.dn_metas is not None and (
                sampler.dn_metas['dn_anchor'].shape[0] != batch):
            sampler.dn_metas = None
        feature, anchor, temp_feature, temp_anchor, time_interval = bank.get(
            batch, metas['timestamp'], metas['T_global'], metas['T_global_inv'])
        if temp_anchor is not None and num_dn_groups > 0:
            sampler.project_dn_anchors(bank.project_to_current)

        dn = None
        attn_mask = None
        num_free = feature.shape[1]
        if self.training and num_dn_groups > 0:
            dn = sampler.get_dn_anchors(metas[self.gt_cls_key], metas[self.gt_reg_key],
                                        metas.get(self.gt_id_key))
        if dn is not None:
            dn_anchor, dn_reg_target, dn_cls_target, dn_attn_mask, valid_mask, dn_id = dn
            num_dn = dn_anchor.shape[1]
            anchor = torch.cat([anchor, dn_anchor.to(anchor.dtype)], dim=1)
            feature = torch.cat([feature, feature.new_zeros(batch, num_dn, feature.shape[-1])],
                                dim=1)
            total = num_free + num_dn
            attn_mask = torch.ones(total, total, dtype=torch.bool, device=anchor.device)
            attn_mask[:num_free, :num_free] = False
            attn_mask[num_free:, num_free:] = dn_attn_mask
        temp_dn = None

        anchor_embed, temp_anchor_embed = self._embed_anchors(anchor, temp_anchor)
        predictions: List[Tensor] = []
        classifications: List[Optional[Tensor]] = []
        qualities: List[Optional[Tensor]] = []
        last = len(self.operation_order) - 1
        cls = None
        for i, op in enumerate(self.operation_order):
            layer = self.layers[i]
            if op == 'temp_gnn':
                feature = self.graph_model(
                    i, feature, temp_feature, temp_feature, query_pos=anchor_embed,
                    key_pos=temp_anchor_embed,
                    attn_mask=attn_mask if temp_feature is None else None)
            elif op == 'gnn':
                feature = self.graph_model(i, feature, value=feature, query_pos=anchor_embed,
                                           attn_mask=attn_mask)
            elif op in ('norm', 'ffn'):
                feature = layer(feature)
            elif op == 'deformable':
                feature = layer(feature, anchor, anchor_embed, feature_maps,
                                metas['projection_mat'], metas['image_wh'])
            else:  # refine
                need_cls = (self.training or len(predictions) == self.num_single_frame_decoder - 1
                            or i == last)
                anchor, cls, quality = layer(feature, anchor, anchor_embed, time_interval,
                                             return_cls=need_cls)
                predictions.append(anchor)
                classifications.append(cls)
                qualities.append(quality)
                if len(predictions) == self.num_single_frame_decoder:
                    feature, anchor = bank.update(feature, anchor, cls)
                    if dn is not None and dn_id is not None and sampler.num_temp_dn_groups > 0:
                        (feature, anchor, t_reg, t_cls, t_valid,
                         dn_id) = sampler.update_dn(feature, anchor, dn_reg_target,
                                                    dn_cls_target, valid_mask, dn_id,
                                                    bank.num_anchor, bank.mask)
                        temp_dn = (t_reg, t_cls, t_valid)
                # After the last layer too (as SparseDrive's head): the output's embedding is
                # that of the final anchors, which the motion head reads.
                anchor_embed = self.anchor_encoder(anchor)
                if (len(predictions) > self.num_single_frame_decoder
                        and temp_anchor_embed is not None):
                    temp_anchor_embed = anchor_embed[:, :bank.num_temp_instances]

        output = {}
        if dn is not None:
            output.update(
                dn_prediction=[x[:, num_free:] for x in predictions],
                dn_classification=[x[:, num_free:] for x in classifications],
                dn_reg_target=dn_reg_target, dn_cls_target=dn_cls_target,
                dn_valid_mask=valid_mask)
            predictions = [x[:, :num_free] for x in predictions]
            classifications = [x[:, :num_free] for x in classifications]
            qualities = [x[:, :num_free] if x is not None else None for x in qualities]
            cache_cls, cache_valid = dn_cls_target, valid_mask
            if temp_dn is not None:
                output.update(temp_dn_reg_target=temp_dn[0], temp_dn_cls_target=temp_dn[1],
                              temp_dn_valid_mask=temp_dn[2], dn_id_target=dn_id)
                cache_cls, cache_valid = temp_dn[1], temp_dn[2]
            if dn_id is not None:
                sampler.cache_dn(feature[:, num_free:], anchor[:, num_free:], cache_cls,
                                 cache_valid, dn_id)
            feature, anchor, cls = feature[:, :num_free], anchor[:, :num_free], cls[:, :num_free]
            anchor_embed = anchor_embed[:, :num_free]
        # The final features and anchor embeddings (before the cache), which SparseDrive's
        # motion head reads.
        output.update(classification=classifications, prediction=predictions,
                      quality=qualities, instance_feature=feature, anchor_embed=anchor_embed)
        bank.cache(feature, anchor, cls, metas['timestamp'], metas['T_global'])
        with_id = (not self.training if self.with_instance_id is None else
                   self.with_instance_id)
        if with_id:
            # Tracking, as upstream: ids with the decoder's score threshold (None in v3).
            output['instance_id'] = bank.get_instance_id(
                cls, getattr(self.decoder, 'score_threshold', None))
        return output

    def _embed_anchors(self, anchor: Tensor,
                       temp_anchor: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """The embeddings of the current anchors ``[B, Q, 11]`` and of the cached ones ``[B, T,
        11]`` (None on a sequence's first frame).

        Upstream calls the encoder once for each; the encoder embeds each anchor on its own
        (an MLP per row), so on the turbox path one call over both gives the same rows with
        half the encoder's launches, forward and backward, on every frame but the first
        (:func:`.anchor_encoder.encode_at_once`).
        """
        if temp_anchor is None:
            return self.anchor_encoder(anchor), None
        if self.op_impl != 'turbox':
            return self.anchor_encoder(anchor), self.anchor_encoder(temp_anchor)
        embed, temp_embed = encode_at_once(self.anchor_encoder, anchor, temp_anchor)
        return embed, temp_embed

    # -- inference --------------------------------------------------------------------------

    def post_process(self, outputs: Dict) -> List[Dict[str, Tensor]]:
        """The last layer's boxes through the decoder (top-k, centerness-weighted scores), with
        their instance ids where the outputs carry them (inference)."""
        quality = outputs['quality'][-1]
        return self.decoder.decode(outputs['classification'][-1], outputs['prediction'][-1],
                                   quality, instance_id=outputs.get('instance_id'))
