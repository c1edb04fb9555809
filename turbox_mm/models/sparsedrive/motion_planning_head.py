"""SparseDrive's motion-planning head: multi-mode futures of the tracked agents and the ego plan,
decoded from the det and map instances (docs/design/sparsedrive.md, sections 6.1 to 6.4)."""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from mmengine.model import BaseModule
from torch import Tensor, nn

from turbox_mm.models.sparse4d.anchor_encoder import encode_at_once
from turbox_mm.models.sparse4d.operation_layers import OperationLayers
from turbox_mm.ops.dispatch import check_op_impl
from turbox_mm.registry import MODELS, TASK_UTILS
from .motion_blocks import (NUM_COMMANDS, agent_to_lidar, load_anchor, mode_query_encoder,
                            sine_position_embedding, topk_rows)

#: The operations a decoder layer may hold.
OPERATIONS = ('temp_gnn', 'gnn', 'norm', 'cross_gnn', 'ffn', 'refine')


@MODELS.register_module()
class MotionPlanningHead(OperationLayers, BaseModule):
    """SparseDrive's stage-2 head (upstream ``P/models/motion/motion_planning_head.py`` at
    ffebeb4): motion prediction for the det queries and planning for the ego car.

    Inputs per frame (:meth:`forward`): the det head's final ``instance_feature`` and
    ``anchor_embed`` ``[B, A, C]``, scores and boxes (last layer) and tracking ids; the map
    head's features, embeddings and scores. The ``num_det`` most confident det instances and
    the ``num_map`` most confident map instances are the keys of ``gnn`` and ``cross_gnn``; an
    ego instance (feature from the front camera, frozen box anchor, both from the
    :class:`~turbox_mm.models.sparsedrive.instance_queue.InstanceQueue`) joins the A agents as
    query ``A``. The decoder runs ``operation_order`` over the ``A + 1`` queries:

    - ``temp_gnn``: each query attends to its own queued history (``[B * (A + 1), 1]``
      queries against ``[B * (A + 1), L]`` keys with the queue's key-padding mask);
    - ``gnn``: all queries against the fixed top-``num_det`` det features plus the ego
      feature (positional embeddings are the det anchor embeddings; decoupled when
      ``decouple_attn``: concatenated, values through ``fc_before``, output through
      ``fc_after``, as the det head);
    - ``cross_gnn``: against the top-``num_map`` map instances (embeddings added);
    - ``norm``, ``ffn``; ``refine``:
      :class:`~turbox_mm.models.sparsedrive.motion_blocks.MotionPlanningRefinementModule` on
      mode queries. A mode query is the sine embedding (:func:`sine_position_embedding`) of
      the last point of a mode anchor through a small MLP: the motion anchors ``[num_cls,
      fut_mode, fut_ts, 2]`` picked by each query's best class and rotated by its (detached)
      box yaw; the plan anchors ``[3, ego_fut_mode, ego_fut_ts, 2]`` (commands right, left,
      straight), flattened command-major. The instance's ``feature + embed`` is added.

    The anchors are frozen buffers (upstream: parameters without gradient; same state-dict
    names). Nothing read from the det or map heads is detached (the motion losses also
    train them), except the boxes that orient the motion anchors, as upstream.

    Args:
        fut_ts (int): Agent future steps. Defaults to 12.
        fut_mode (int): Agent modes. Defaults to 6.
        ego_fut_ts (int): Ego future steps. Defaults to 6.
        ego_fut_mode (int): Ego modes per command. Defaults to 3 (upstream's default; its
            config uses 6).
        motion_anchor (str | np.ndarray): ``[num_cls, fut_mode, fut_ts, 2]`` or an ``.npy``
            path (``kmeans_motion_6.npy``); cumulated positions in the agent frame.
        plan_anchor (str | np.ndarray): ``[3, ego_fut_mode, ego_fut_ts, 2]`` or a path.
        embed_dims (int): C. Defaults to 256.
        decouple_attn (bool): Decoupled ``temp_gnn`` / ``gnn`` (attention width ``2C``).
            Defaults to False.
        instance_queue (dict): :class:`InstanceQueue` config.
        operation_order (Sequence[str]): Ops among :data:`OPERATIONS`; at least one
            ``refine``.
        temp_graph_model (dict, optional): Attention for ``temp_gnn``.
        graph_model (dict, optional): Attention for ``gnn``.
        cross_graph_model (dict, optional): Attention for ``cross_gnn``.
        norm_layer (dict, optional): ``dict(type='LN', normalized_shape=C)``.
        ffn (dict, optional): :class:`~turbox_mm.models.sparse4d.AsymmetricFFN` config.
        refine_layer (dict, optional): :class:`MotionPlanningRefinementModule` config.
        motion_sampler (dict, optional): ``TASK_UTILS`` config of the motion target; training.
        motion_loss_cls (dict, optional): Motion mode loss (``mmdet.FocalLoss``).
        motion_loss_reg (dict, optional): Motion trajectory loss (``mmdet.L1Loss``).
        planning_sampler (dict, optional): ``TASK_UTILS`` config of the planning target.
        plan_loss_cls (dict, optional): Plan mode loss (``mmdet.FocalLoss``).
        plan_loss_reg (dict, optional): Plan trajectory loss (``mmdet.L1Loss``).
        plan_loss_status (dict, optional): Ego status loss (``mmdet.L1Loss``).
        motion_decoder (dict, optional): ``TASK_UTILS`` config; inference.
        planning_decoder (dict, optional): ``TASK_UTILS`` config; inference.
        num_det (int): Det instances in ``gnn``'s keys. Defaults to 50.
        num_map (int): Map instances in ``cross_gnn``'s keys. Defaults to 10.
        op_impl (str): ``'stock'``: the losses through the configured modules, as upstream;
            ``'turbox'``: the same losses without host reads (mmcv's focal kernel reads the
            largest label, mmdet's L1 loss tests its weights on the host), and one call of
            the detection head's anchor encoder for the ego and the queued anchors where
            upstream makes two (the encoder embeds each anchor on its own: the same rows).
            Both forward passes read nothing on the host. Defaults to ``'stock'``.
        init_cfg (dict, optional): mmengine init config. Defaults to None.

    Raises:
        ValueError: A bad anchor, operation order, op_impl or missing layer config.
    """

    #: What ``turbox.compile.modules='auto'`` compiles of this head (module_compiler): each
    #: layer of ``operation_order`` (attention, FFN, refinement; its LayerNorms stay eager).
    turbox_compile_submodules = ('layers.*', )
    #: ... and its ``loss`` (the motion and planning targets and losses) as one compiled
    #: function.
    turbox_compile_methods = ('loss', )

    def __init__(self,
                 fut_ts: int = 12,
                 fut_mode: int = 6,
                 ego_fut_ts: int = 6,
                 ego_fut_mode: int = 3,
                 motion_anchor: Union[str, np.ndarray, None] = None,
                 plan_anchor: Union[str, np.ndarray, None] = None,
                 embed_dims: int = 256,
                 decouple_attn: bool = False,
                 instance_queue: Optional[dict] = None,
                 operation_order: Optional[Sequence[str]] = None,
                 temp_graph_model: Optional[dict] = None,
                 graph_model: Optional[dict] = None,
                 cross_graph_model: Optional[dict] = None,
                 norm_layer: Optional[dict] = None,
                 ffn: Optional[dict] = None,
                 refine_layer: Optional[dict] = None,
                 motion_sampler: Optional[dict] = None,
                 motion_loss_cls: Optional[dict] = None,
                 motion_loss_reg: Optional[dict] = None,
                 planning_sampler: Optional[dict] = None,
                 plan_loss_cls: Optional[dict] = None,
                 plan_loss_reg: Optional[dict] = None,
                 plan_loss_status: Optional[dict] = None,
                 motion_decoder: Optional[dict] = None,
                 planning_decoder: Optional[dict] = None,
                 num_det: int = 50,
                 num_map: int = 10,
                 op_impl: str = 'stock',
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg)
        self.op_impl = check_op_impl('MotionPlanningHead', op_impl)
        self.fut_ts, self.fut_mode = fut_ts, fut_mode
        self.ego_fut_ts, self.ego_fut_mode = ego_fut_ts, ego_fut_mode
        self.embed_dims = embed_dims
        self.decouple_attn = decouple_attn
        self.num_det, self.num_map = num_det, num_map
        if instance_queue is None:
            raise ValueError('MotionPlanningHead: instance_queue (an InstanceQueue config) is '
                             'required')
        if operation_order is None or 'refine' not in operation_order:
            raise ValueError('MotionPlanningHead: operation_order must hold at least one '
                             f"'refine', got {operation_order}")
        operation_order = list(operation_order)
        unknown = sorted(set(operation_order) - set(OPERATIONS))
        if unknown:
            raise ValueError(f'MotionPlanningHead: unknown operations {unknown}; valid: '
                             f'{", ".join(OPERATIONS)}')
        configs = dict(temp_gnn=temp_graph_model, gnn=graph_model, cross_gnn=cross_graph_model,
                       norm=norm_layer, ffn=ffn, refine=refine_layer)
        missing = sorted({op for op in operation_order if configs[op] is None})
        if missing:
            raise ValueError(f'MotionPlanningHead: operation_order uses {missing} without a '
                             'layer config (temp_graph_model, graph_model, cross_graph_model, '
                             'norm_layer, ffn, refine_layer)')
        self.operation_order = operation_order
        self.instance_queue = MODELS.build(instance_queue)
        self.layers = nn.ModuleList([self.build_op(op, configs[op])
                                     for op in operation_order])
        self._check_refine()
        if decouple_attn:
            self.fc_before = nn.Linear(embed_dims, embed_dims * 2, bias=False)
            self.fc_after = nn.Linear(embed_dims * 2, embed_dims, bias=False)
        else:
            self.fc_before = self.fc_after = nn.Identity()

        def build(cfg, registry):
            return registry.build(cfg) if cfg is not None else None

        self.motion_sampler = build(motion_sampler, TASK_UTILS)
        self.planning_sampler = build(planning_sampler, TASK_UTILS)
        self.motion_decoder = build(motion_decoder, TASK_UTILS)
        self.planning_decoder = build(planning_decoder, TASK_UTILS)
        self.motion_loss_cls = build(motion_loss_cls, MODELS)
        self.motion_loss_reg = build(motion_loss_reg, MODELS)
        self.plan_loss_cls = build(plan_loss_cls, MODELS)
        self.plan_loss_reg = build(plan_loss_reg, MODELS)
        self.plan_loss_status = build(plan_loss_status, MODELS)

        self.register_buffer('motion_anchor', load_anchor(
            motion_anchor, 'motion_anchor', (None, fut_mode, fut_ts, 2)))
        self.register_buffer('plan_anchor', load_anchor(
            plan_anchor, 'plan_anchor', (NUM_COMMANDS, ego_fut_mode, ego_fut_ts, 2)))
        self.motion_anchor_encoder = mode_query_encoder(embed_dims)
        self.plan_anchor_encoder = mode_query_encoder(embed_dims)

    def _check_refine(self) -> None:
        for op, layer in zip(self.operation_order, self.layers):
            if op != 'refine':
                continue
            for name in ('fut_ts', 'fut_mode', 'ego_fut_ts', 'ego_fut_mode', 'embed_dims'):
                value = getattr(layer, name, None)
                if value is not None and value != getattr(self, name):
                    raise ValueError(f'MotionPlanningHead: refine_layer.{name} is {value}, the '
                                     f'head has {getattr(self, name)}')

    # -- forward ------------------------------------------------------------------------------

    def motion_anchors(self, det_cls: Tensor, det_boxes: Tensor) -> Tensor:
        """Each det query's motion anchors ``[B, A, fut_mode, fut_ts, 2]`` in the lidar frame:
        those of its best class, rotated by its (detached) box yaw."""
        if det_cls.shape[-1] != self.motion_anchor.shape[0]:
            raise ValueError(f'MotionPlanningHead: the det head scores {det_cls.shape[-1]} '
                             f'classes, motion_anchor has {self.motion_anchor.shape[0]}')
        anchors = self.motion_anchor[det_cls.argmax(dim=-1)]
        return agent_to_lidar(anchors, det_boxes.detach())

    def forward(self, det_output: Dict, map_output: Dict, feature_maps, metas: Dict,
                anchor_encoder: nn.Module,
                mask: Optional[Tensor]) -> Tuple[Dict[str, list], Dict[str, list]]:
        """Decode one frame.

        Args:
            det_output (dict): The det head's output: ``instance_feature``, ``anchor_embed``
                ``[B, A, C]``, ``classification`` / ``prediction`` lists (last ``[B, A,
                num_cls]`` logits / ``[B, A, 11]``), ``instance_id`` ``[B, A]``.
            map_output (dict): The map head's ``instance_feature``, ``anchor_embed``
                ``[B, M, C]`` and ``classification`` (last ``[B, M, 3]``).
            feature_maps: The image features (see
                :func:`~turbox_mm.models.sparsedrive.instance_queue.ego_feature_map`).
            metas (dict): ``T_global``, ``T_global_inv`` ``[B, 4, 4]`` (float64).
            anchor_encoder (nn.Module): The det head's box encoder (embeds the ego anchor and
                the queued boxes).
            mask (Tensor, optional): ``[B]`` bool, the det bank's ``mask``; None on a first
                frame.

        Returns:
            tuple: ``motion_output`` with ``classification`` (list per ``refine``, ``[B, A,
            fut_mode]`` logits), ``prediction`` (list, ``[B, A, fut_mode, fut_ts, 2]``
            per-step offsets), ``period`` ``[B, A]`` long, ``anchor_queue`` (list of up to L
            ``[B, A, 11]``, oldest first); ``planning_output`` with ``classification`` (list,
            ``[B, 1, 3 * ego_fut_mode]``), ``prediction`` (list, ``[B, 1, 3 * ego_fut_mode,
            ego_fut_ts, 2]``), ``status`` (list, ``[B, 1, 10]``), ``period`` ``[B, 1]``,
            ``anchor_queue`` (list of ``[B, 1, 11]``). The queues are copies of the lists
            (upstream hands out the queue's own lists, which the next frame mutates).
        """
        for out, name, keys in ((det_output, 'det_output', ('instance_feature', 'anchor_embed',
                                                            'classification', 'prediction',
                                                            'instance_id')),
                                (map_output, 'map_output', ('instance_feature', 'anchor_embed',
                                                            'classification'))):
            lacking = [k for k in keys if k not in out]
            if lacking:
                hint = (' (set with_instance_id=True on the det head)'
                        if 'instance_id' in lacking else '')
                raise KeyError(f'MotionPlanningHead: {name} lacks {lacking}{hint}')
        feature, embed = det_output['instance_feature'], det_output['anchor_embed']
        batch, num_anchor, dims = feature.shape
        if num_anchor < self.num_det:
            raise ValueError(f'MotionPlanningHead: num_det={self.num_det} exceeds the '
                             f'{num_anchor} det queries')
        if map_output['instance_feature'].shape[1] < self.num_map:
            raise ValueError(f'MotionPlanningHead: num_map={self.num_map} exceeds the '
                             f"{map_output['instance_feature'].shape[1]} map queries")
        det_cls = det_output['classification'][-1].sigmoid()
        det_boxes = det_output['prediction'][-1]
        det_selected, det_embed_selected = topk_rows(
            det_cls.max(dim=-1).values, self.num_det, feature, embed)
        map_cls = map_output['classification'][-1].sigmoid()
        map_selected, map_embed_selected = topk_rows(
            map_cls.max(dim=-1).values, self.num_map, map_output['instance_feature'],
            map_output['anchor_embed'])

        queue = self.instance_queue
        ego_feature, ego_anchor, temp_feature, temp_anchor, temp_mask = queue.get(
            det_output, feature_maps, metas, batch, mask)
        if self.op_impl == 'turbox':  # one encoder call for both (it embeds row by row)
            ego_embed, temp_embed = encode_at_once(anchor_encoder, ego_anchor,
                                                   temp_anchor.flatten(1, 2))
            temp_embed = temp_embed.unflatten(1, temp_anchor.shape[1:3]).flatten(0, 1)
        else:
            ego_embed = anchor_encoder(ego_anchor)
            temp_embed = anchor_encoder(temp_anchor).flatten(0, 1)
        temp_feature, temp_mask = temp_feature.flatten(0, 1), temp_mask.flatten(0, 1)

        motion_anchor = self.motion_anchors(det_cls, det_boxes)
        motion_mode_query = self.motion_anchor_encoder(
            sine_position_embedding(motion_anchor[..., -1, :], self.embed_dims))
        plan_anchor = self.plan_anchor[None].expand(batch, -1, -1, -1, -1)
        plan_mode_query = self.plan_anchor_encoder(
            sine_position_embedding(plan_anchor[..., -1, :], self.embed_dims)
        ).flatten(1, 2).unsqueeze(1)

        det_selected = torch.cat([det_selected, ego_feature], dim=1)
        det_embed_selected = torch.cat([det_embed_selected, ego_embed], dim=1)
        feature = torch.cat([feature, ego_feature], dim=1)
        embed = torch.cat([embed, ego_embed], dim=1)

        motion_cls, motion_reg, plan_cls, plan_reg, plan_status = [], [], [], [], []
        for i, op in enumerate(self.operation_order):
            layer = self.layers[i]
            if op == 'temp_gnn':
                feature = self.graph_model(
                    i, feature.flatten(0, 1).unsqueeze(1), temp_feature, temp_feature,
                    query_pos=embed.flatten(0, 1).unsqueeze(1), key_pos=temp_embed,
                    key_padding_mask=temp_mask).reshape(batch, num_anchor + 1, dims)
            elif op == 'gnn':
                feature = self.graph_model(i, feature, det_selected, det_selected,
                                           query_pos=embed, key_pos=det_embed_selected)
            elif op in ('norm', 'ffn'):
                feature = layer(feature)
            elif op == 'cross_gnn':
                feature = layer(feature, key=map_selected, query_pos=embed,
                                key_pos=map_embed_selected)
            else:  # refine
                instance = feature + embed
                outs = layer(motion_mode_query + instance[:, :num_anchor, None],
                             plan_mode_query + instance[:, num_anchor:, None],
                             feature[:, num_anchor:], embed[:, num_anchor:])
                for store, value in zip((motion_cls, motion_reg, plan_cls, plan_reg,
                                         plan_status), outs):
                    store.append(value)

        queue.cache_motion(feature[:, :num_anchor], det_output, metas)
        queue.cache_planning(feature[:, num_anchor:], plan_status[-1])
        motion_output = dict(classification=motion_cls, prediction=motion_reg,
                             period=queue.period, anchor_queue=list(queue.anchor_queue))
        planning_output = dict(classification=plan_cls, prediction=plan_reg,
                               status=plan_status, period=queue.ego_period,
                               anchor_queue=list(queue.ego_anchor_queue))
        return motion_output, planning_output

    # -- training -----------------------------------------------------------------------------

    def loss(self, motion_output: Dict, planning_output: Dict, metas: Dict,
             indices: Sequence[Tuple[Tensor, Tensor]]) -> Dict[str, Tensor]:
        """Motion and planning losses of every ``refine`` output ``i`` (upstream's keys,
        unprefixed): ``motion_loss_cls_i``, ``motion_loss_reg_i``, ``planning_loss_cls_i``,
        ``planning_loss_reg_i``, ``planning_loss_status_i``.

        Args:
            motion_output (dict): :meth:`forward`'s first output.
            planning_output (dict): :meth:`forward`'s second output.
            metas (dict): ``gt_agent_fut_trajs`` / ``gt_agent_fut_masks`` (lists of ``[n_i,
                fut_ts, 2]`` / ``[n_i, fut_ts]``), ``gt_ego_fut_trajs`` ``[B, ego_fut_ts, 2]``,
                ``gt_ego_fut_masks`` ``[B, ego_fut_ts]``, ``gt_ego_fut_cmd`` ``[B, 3]``,
                ``ego_status`` ``[B, 10]``.
            indices (Sequence[tuple[Tensor, Tensor]]): Per sample the (query, GT) pairs of the
                det sampler's last matching (its final decoder layer), as upstream.

        Returns:
            dict[str, Tensor]: The losses.

        Raises:
            RuntimeError: A sampler or loss is not configured.
            KeyError: ``metas`` lack a ground-truth key.
        """
        losses = self.loss_motion(motion_output, metas, indices)
        losses.update(self.loss_planning(planning_output, metas))
        return losses

    def loss_motion(self, motion_output: Dict, metas: Dict,
                    indices: Sequence[Tuple[Tensor, Tensor]]) -> Dict[str, Tensor]:
        """Per output: focal loss of the best mode (rows with any valid GT step), normalised
        by the matched agents (averaged over ranks, at least 1); L1 between the cumulated best
        mode and the cumulated GT, masked per step, summed and divided by the same count
        (docs/design/sparsedrive.md 6.4). Unlike upstream's Python ``max``, the count stays a
        tensor (no host read)."""
        self._require('motion', (self.motion_sampler, self.motion_loss_cls,
                                 self.motion_loss_reg), metas,
                      ('gt_agent_fut_trajs', 'gt_agent_fut_masks'))
        losses = {}
        for i, (cls, reg) in enumerate(zip(motion_output['classification'],
                                           motion_output['prediction'])):
            cls, reg = cls.float(), reg.float()
            (cls_target, cls_weight, reg_pred, reg_target, reg_weight,
             num_pos) = self.motion_sampler.sample(reg, metas['gt_agent_fut_trajs'],
                                                   metas['gt_agent_fut_masks'], indices)
            # The sampler's count is already averaged over ranks and at least 1; its best
            # mode and target are already cumulated into positions.
            num_pos = torch.as_tensor(num_pos, dtype=cls.dtype, device=cls.device)
            losses[f'motion_loss_cls_{i}'] = self._focal(
                self.motion_loss_cls, cls.flatten(0, 1), cls_target.flatten(),
                cls_weight.flatten().to(cls.dtype), num_pos)
            losses[f'motion_loss_reg_{i}'] = self._l1(
                self.motion_loss_reg, reg_pred.flatten(0, 1), reg_target.flatten(0, 1),
                reg_weight.flatten(0, 1)[..., None].to(reg.dtype), num_pos)
        return losses

    def loss_planning(self, planning_output: Dict, metas: Dict) -> Dict[str, Tensor]:
        """Per output, on the GT command's modes: focal loss of the best mode (rows with any
        valid GT step) averaged over all ``B x ego_fut_mode`` elements (no ``avg_factor``);
        L1 of the best mode's step offsets (not cumulated) against the GT's, masked per step,
        mean over all elements; L1 of the ego status, mean (docs/design/sparsedrive.md 6.4).

        The planning sampler's outputs may carry upstream's extra unit dimension (``[B, 1,
        ...]``) or not: they are flattened to rows here."""
        self._require('planning', (self.planning_sampler, self.plan_loss_cls,
                                   self.plan_loss_reg, self.plan_loss_status), metas,
                      ('gt_ego_fut_trajs', 'gt_ego_fut_masks', 'gt_ego_fut_cmd', 'ego_status'))
        losses = {}
        for i, (cls, reg, status) in enumerate(zip(planning_output['classification'],
                                                   planning_output['prediction'],
                                                   planning_output['status'])):
            cls, reg, status = cls.float(), reg.float(), status.float()
            (cls, cls_target, cls_weight, reg_pred, reg_target,
             reg_weight) = self.planning_sampler.sample(
                cls, reg, metas['gt_ego_fut_trajs'], metas['gt_ego_fut_masks'],
                metas['gt_ego_fut_cmd'])
            steps = reg_pred.shape[-2:]
            losses[f'planning_loss_cls_{i}'] = self._focal(
                self.plan_loss_cls, cls.reshape(-1, cls.shape[-1]), cls_target.reshape(-1),
                cls_weight.reshape(-1).to(cls.dtype), None)
            losses[f'planning_loss_reg_{i}'] = self._l1(
                self.plan_loss_reg, reg_pred.reshape(-1, *steps),
                reg_target.reshape(-1, *steps).to(reg.dtype),
                reg_weight.reshape(-1, steps[0], 1).to(reg.dtype), None)
            status = status.flatten(1)
            ego_status = metas['ego_status'].to(status.dtype)
            if ego_status.shape != status.shape:
                raise ValueError(f"MotionPlanningHead.loss: metas['ego_status'] must be "
                                 f'{list(status.shape)}, got {list(ego_status.shape)}')
            losses[f'planning_loss_status_{i}'] = self._l1(self.plan_loss_status, status,
                                                           ego_status, None, None)
        return losses

    @staticmethod
    def _require(task: str, modules: Sequence, metas: Dict, keys: Sequence[str]) -> None:
        if any(m is None for m in modules):
            raise RuntimeError(f'MotionPlanningHead.loss: the {task} sampler and losses must '
                               'be configured for training')
        lacking = [k for k in keys if k not in metas]
        if lacking:
            raise KeyError(f'MotionPlanningHead.loss: metas lack {lacking}')

    def _focal(self, loss: nn.Module, pred: Tensor, target: Tensor, weight: Tensor,
               avg_factor: Optional[Tensor]) -> Tensor:
        """The classification loss; with ``op_impl='turbox'`` mmdet's focal loss without
        mmcv's host read (:func:`~turbox_mm.models.losses.focal_loss_like_mmdet`)."""
        if self.op_impl == 'turbox':
            from turbox_mm.models.losses import focal_loss_like_mmdet
            return focal_loss_like_mmdet(loss, pred, target.long(), weight=weight,
                                         avg_factor=avg_factor)
        return loss(pred, target.long(), weight=weight, avg_factor=avg_factor)

    def _l1(self, loss: nn.Module, pred: Tensor, target: Tensor, weight: Optional[Tensor],
            avg_factor: Optional[Tensor]) -> Tensor:
        """A regression loss; with ``op_impl='turbox'`` mmdet's ``L1Loss`` without its host
        test ``any(weight > 0)`` (an all-zero weight gives 0 either way)."""
        from mmdet.models.losses import L1Loss
        if self.op_impl == 'turbox' and type(loss) is L1Loss:
            from mmdet.models.losses.smooth_l1_loss import l1_loss
            return loss.loss_weight * l1_loss(pred, target, weight, reduction=loss.reduction,
                                              avg_factor=avg_factor)
        return loss(pred, target, weight=weight, avg_factor=avg_factor)

    # -- inference ----------------------------------------------------------------------------

    def post_process(self, det_output: Dict, motion_output: Dict, planning_output: Dict,
                     metas: Dict) -> List[Dict]:
        """Decoded motion and planning results per sample, merged into one dict each.

        The decoders are called as upstream calls them: ``motion_decoder.decode(det
        classification list, det prediction list, det instance_id or None, det quality list
        or None, motion_output)`` and ``planning_decoder.decode(det_output, motion_output,
        planning_output, metas)`` (metas carry ``gt_ego_fut_cmd`` ``[B, 3]``). Upstream
        returns the two lists; its joint head merges them.

        Raises:
            RuntimeError: No decoder configured.
            ValueError: The decoders' results differ in length or share a key.
        """
        if self.motion_decoder is None or self.planning_decoder is None:
            raise RuntimeError('MotionPlanningHead.post_process needs motion_decoder and '
                               'planning_decoder')
        motion = self.motion_decoder.decode(
            det_output['classification'], det_output['prediction'],
            det_output.get('instance_id'), det_output.get('quality'), motion_output)
        planning = self.planning_decoder.decode(det_output, motion_output, planning_output,
                                                metas)
        if len(motion) != len(planning):
            raise ValueError(f'MotionPlanningHead.post_process: {len(motion)} motion results, '
                             f'{len(planning)} planning results')
        results = []
        for m, p in zip(motion, planning):
            shared = sorted(set(m) & set(p))
            if shared:
                raise ValueError(f'MotionPlanningHead.post_process: both decoders return '
                                 f'{shared}')
            results.append({**m, **p})
        return results
