"""SparseDrive's joint head: the detection and map heads on the same image features, then (stage
2) the motion-planning head on their outputs."""
from typing import Dict, List, Optional, Tuple

from mmengine.model import BaseModule
from torch import Tensor

from turbox_mm.registry import MODELS

#: The tasks of ``task_config`` and their defaults (upstream's stage 1).
TASKS = dict(with_det=True, with_map=True, with_motion_plan=False)


@MODELS.register_module()
class SparseDriveHead(BaseModule):
    """The heads of SparseDrive (docs/design/sparsedrive.md, section 2).

    The detection head (a :class:`~turbox_mm.models.sparse4d.Sparse4DHead` over 3-D boxes) and
    the map head (a ``Sparse4DHead`` over point-set anchors: SparseDrive's point modules, its
    map target and line loss) read the same multi-scale features one after the other, each
    with its own instance bank. Their losses are keyed by their ``task_prefix`` (``det_``,
    ``map_``).

    Stage 2's motion-planning head (``task_config.with_motion_plan``,
    :class:`~turbox_mm.models.sparsedrive.MotionPlanningHead`) then reads both heads' outputs
    (the det head's final instances, its anchor encoder and its bank's temporal mask, the
    map head's instances); its losses use the det sampler's Hungarian pairs of the last
    decoder layer, so the det loss runs first. The config may declare ``motion_plan_head``
    while the task is off, as upstream's stage-1 config does: it is not built then.

    Args:
        task_config (dict): ``with_det``, ``with_map``, ``with_motion_plan`` (bools).
        det_head (dict, optional): Detection head config; needed with ``with_det``.
        map_head (dict, optional): Map head config; needed with ``with_map``.
        motion_plan_head (dict, optional): Stage 2's head; needed with ``with_motion_plan``,
            ignored without. Defaults to None.
        init_cfg (dict, optional): mmengine init config. Defaults to None.

    Raises:
        ValueError: An unknown task, no task at all, a task without its head config, or
            motion planning without detection and map.
    """

    def __init__(self,
                 task_config: dict,
                 det_head: Optional[dict] = None,
                 map_head: Optional[dict] = None,
                 motion_plan_head: Optional[dict] = None,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg)
        unknown = sorted(set(task_config) - set(TASKS))
        if unknown:
            raise ValueError(f'SparseDriveHead: unknown task_config keys {unknown}; valid: '
                             f'{sorted(TASKS)}')
        tasks = {**TASKS, **task_config}
        self.with_det, self.with_map = bool(tasks['with_det']), bool(tasks['with_map'])
        self.with_motion_plan = bool(tasks['with_motion_plan'])
        if not (self.with_det or self.with_map):
            raise ValueError('SparseDriveHead: task_config enables no task')
        if self.with_motion_plan and not (self.with_det and self.with_map):
            raise ValueError('SparseDriveHead: with_motion_plan needs with_det and with_map '
                             '(the motion head reads both heads\' instances)')
        for flag, cfg, name in ((self.with_det, det_head, 'det_head'),
                                (self.with_map, map_head, 'map_head'),
                                (self.with_motion_plan, motion_plan_head, 'motion_plan_head')):
            if flag and cfg is None:
                raise ValueError(f'SparseDriveHead: the task needs {name}')
        self.det_head = MODELS.build(det_head) if self.with_det else None
        self.map_head = MODELS.build(map_head) if self.with_map else None
        self.motion_plan_head = (MODELS.build(motion_plan_head) if self.with_motion_plan
                                 else None)

    def forward(self, feature_maps, metas: Dict) -> Tuple[Optional[Dict], ...]:
        """The heads on one frame.

        Args:
            feature_maps: The deformable-aggregation feature triple
                (:func:`~turbox_mm.ops.deformable_aggregation.feature_maps_format`).
            metas (dict): What :meth:`Sparse4DHead.forward` reads, plus the map ground truth
                (``gt_map_labels``, ``gt_map_pts``) in training.

        Returns:
            tuple: ``(det, map, motion, planning)`` outputs (None for a task that is off).
        """
        det = self.det_head(feature_maps, metas) if self.with_det else None
        map_out = self.map_head(feature_maps, metas) if self.with_map else None
        motion = planning = None
        if self.with_motion_plan:
            motion, planning = self.motion_plan_head(
                det, map_out, feature_maps, metas, self.det_head.anchor_encoder,
                self.det_head.instance_bank.mask)
        return det, map_out, motion, planning

    def loss(self, outputs: Tuple[Optional[Dict], ...], metas: Dict) -> Dict[str, Tensor]:
        """The heads' losses, merged (their keys carry the heads' prefixes; the motion head's
        are ``motion_loss_*`` and ``planning_loss_*``).

        Raises:
            KeyError: Two heads produced the same loss key (give them distinct
                ``task_prefix`` values).
        """
        det, map_out, motion, planning = outputs
        losses: Dict[str, Tensor] = {}
        parts = [(self.det_head, lambda: self.det_head.loss(det, metas)),
                 (self.map_head, lambda: self.map_head.loss(map_out, metas))]
        if self.with_motion_plan:
            # after the det loss: the det sampler keeps its last layer's Hungarian pairs
            parts.append((self.motion_plan_head, lambda: self.motion_plan_head.loss(
                motion, planning, metas, self.det_head.sampler.indices)))
        for head, compute in parts:
            if head is None:
                continue
            part = compute()
            clash = sorted(set(part) & set(losses))
            if clash:
                raise KeyError(f'SparseDriveHead: loss keys {clash} come from two heads; set '
                               'distinct task_prefix values')
            losses.update(part)
        return losses

    def post_process(self, outputs: Tuple[Optional[Dict], ...],
                     metas: Optional[Dict] = None) -> List[Dict]:
        """Decoded results per sample: ``{'det': ..., 'map': ..., 'motion_plan': ...}`` (the
        decoders' dicts; a task that is off is absent). ``motion_plan`` merges the motion
        decoder's (the det fields plus ``trajs_3d``, ``trajs_score``, ...) and the planning
        decoder's (``final_planning``, ...); it needs ``metas`` (``gt_ego_fut_cmd``).

        Unlike upstream, every sample gets its own dict (upstream's list repeats one dict,
        so with a test batch above 1 all samples report the last one's results).
        """
        det, map_out, motion, planning = outputs
        parts = []
        if det is not None:
            parts.append(('det', self.det_head.post_process(det)))
        if map_out is not None:
            parts.append(('map', self.map_head.post_process(map_out)))
        if motion is not None:
            if metas is None:
                raise ValueError('SparseDriveHead.post_process: motion planning needs metas')
            parts.append(('motion_plan', self.motion_plan_head.post_process(
                det, motion, planning, metas)))
        batch = len(parts[0][1])
        return [{name: results[i] for name, results in parts} for i in range(batch)]
