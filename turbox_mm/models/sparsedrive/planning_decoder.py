"""SparseDrive's planning decoding: the commanded manoeuvre's modes, re-scored against the
forecast agents, and the chosen ego trajectory (docs/design/sparsedrive.md sections 6.5 and
10.2; upstream ``P/models/motion/decoder.py`` @ ffebeb4, ``HierarchicalPlanningDecoder``).

Hierarchy: of the ``3 x K`` planned modes (right, left, straight) only the ``K`` of the
ground-truth driving command compete (``argmax`` of the one-hot ``gt_ego_fut_cmd``); with
``use_rescore`` a mode that would collide with a confident agent gets its logit lowered by 999,
unless every mode collides; the highest logit gives ``final_planning``.

Collision test (upstream's, rough by design), for every mode, agent and future step:

- ego boxes at the mode's positions (cumulative sums of its offsets), size
  ``ego_size x dim_scale`` (4.08 m along the heading, 1.73 m across, 1.56 m tall, x 1.1); the
  heading from central differences of ``[origin, p_1, ..., p_T]`` (the last step a backward
  difference), ``pi / 2`` (straight ahead in the lidar frame) at the origin, and ``pi / 2``
  throughout when the mode ends within ``static_dis_thresh`` of the origin;
- agent boxes along each agent's ``num_motion_mode`` best modes (the first ``T`` steps,
  summed up and moved to the box centre), with the box's size, and headings likewise with the
  box's own yaw at the start; agents whose detection confidence is below ``score_thresh``
  have every number of their boxes set to ``1e6`` (far away);
- a pair collides when any of the four bottom corners of one box lies inside the other, in
  both directions.

Upstream quirk (design 10.2): upstream meant to move each ego box ``offset`` (0.5 m) forward
along its heading before the test, but indexes the rows of its flattened ``[N, 7]`` box array
instead of its columns: row 0 gets ``offset * cos(row 6)`` added to all seven of its numbers
and row 1 ``offset * sin(row 6)`` (rows 0 and 1 are the first two steps of the first mode
against the first agent of the first sample; row 6 the box six rows down), and no box is
shifted. ``fix_ego_offset=False`` (the default) reproduces this exactly; ``True`` shifts every
ego box forward along its heading as intended (as the planning metric does with its own box).

Upstream computes the corners on the host through numpy for every pair (design section 9);
here the whole test runs on the device in torch, batched over samples, agents, modes and steps.
"""
import math
from typing import Dict, List, Mapping, Sequence, Tuple, Union

import torch
from torch import Tensor

from turbox_mm.models.sparse4d.box3d import (COS_YAW, SIN_YAW, SIZE_X, SIZE_Z, X, Y,
                                             decode_boxes)
from turbox_mm.registry import TASK_UTILS
from .motion_decoder import last_layer, stack_queue

__all__ = ['HierarchicalPlanningDecoder', 'trajectory_yaw', 'corners_inside', 'EGO_SIZE']

#: Upstream's ego box for the re-scoring: extent along the heading, across it, height (m).
EGO_SIZE = (4.08, 1.73, 1.56)
#: Driving commands (one-hot order of ``gt_ego_fut_cmd``): right, left, straight.
NUM_COMMANDS = 3
#: Logit offset of a colliding mode, and where low-confidence agents are moved.
COLLISION_PENALTY, FAR_AWAY = -999.0, 1e6
#: Columns of the 7-number boxes of the collision test: x, y, z, size x3, yaw.
BOX_X, BOX_Y, BOX_LEN, BOX_WID, BOX_YAW = 0, 1, 3, 4, 6


def trajectory_yaw(points: Tensor, start_yaw: Tensor, static_dis_thresh: float) -> Tensor:
    """Headings along a trajectory, as upstream's re-scoring estimates them.

    Args:
        points (Tensor): ``[..., S, 2]`` positions, the start first (``S >= 2``).
        start_yaw (Tensor): Heading at the start, broadcastable to ``points.shape[:-2]``.
        static_dis_thresh (float): A trajectory ending closer than this to its start keeps
            the start heading at every step (a static object's heading would be noise).

    Returns:
        Tensor: ``[..., S]``: the start heading, then ``atan2`` of central differences
        ``p_{i+1} - p_{i-1}``, the last step a backward difference ``p_S - p_{S-1}``.
    """
    first = start_yaw.to(points.dtype).expand(points.shape[:-2]).unsqueeze(-1)
    mid = points[..., 2:, :] - points[..., :-2, :]
    last = points[..., -1, :] - points[..., -2, :]
    yaw = torch.cat([first, torch.atan2(mid[..., 1], mid[..., 0]),
                     torch.atan2(last[..., 1], last[..., 0]).unsqueeze(-1)], dim=-1)
    static = torch.linalg.norm(points[..., -1, :] - points[..., 0, :], dim=-1) < static_dis_thresh
    return torch.where(static.unsqueeze(-1), first, yaw)


def corners_inside(inner: Tensor, outer: Tensor) -> Tensor:
    """Whether any of the four bottom corners of ``inner`` lies inside ``outer`` (bird's eye
    view, borders included).

    Args:
        inner (Tensor): ``[..., 7]`` boxes ``x, y, z, extent along heading, extent across,
            height, yaw``.
        outer (Tensor): ``[..., 7]``, broadcastable against ``inner``.

    Returns:
        Tensor: ``[...]`` bool.
    """
    cos_o, sin_o = torch.cos(outer[..., BOX_YAW]), torch.sin(outer[..., BOX_YAW])
    dx, dy = inner[..., BOX_X] - outer[..., BOX_X], inner[..., BOX_Y] - outer[..., BOX_Y]
    centre_x, centre_y = dx * cos_o + dy * sin_o, dy * cos_o - dx * sin_o  # in outer's frame
    rel = inner[..., BOX_YAW] - outer[..., BOX_YAW]
    cos_r, sin_r = torch.cos(rel), torch.sin(rel)
    half_len, half_wid = inner[..., BOX_LEN] / 2, inner[..., BOX_WID] / 2
    lim_len, lim_wid = outer[..., BOX_LEN] / 2, outer[..., BOX_WID] / 2
    found = torch.zeros(torch.broadcast_shapes(inner.shape[:-1], outer.shape[:-1]),
                        dtype=torch.bool, device=inner.device)
    for along, across in ((-1, -1), (-1, 1), (1, 1), (1, -1)):
        u, v = along * half_len, across * half_wid
        x = centre_x + cos_r * u - sin_r * v
        y = centre_y + sin_r * u + cos_r * v
        found = found | ((x <= lim_len) & (x >= -lim_len) & (y <= lim_wid) & (y >= -lim_wid))
    return found


@TASK_UTILS.register_module()
class HierarchicalPlanningDecoder:
    """Command selection, collision-aware re-scoring and the final plan (module docstring).

    Args:
        ego_fut_ts (int): Future steps of a plan. Defaults to 6.
        ego_fut_mode (int): Modes per command. Defaults to 6.
        use_rescore (bool): Penalise colliding modes. Defaults to True (upstream's class
            default is False; its stage-2 config, the only user, sets True).
        fix_ego_offset (bool): Shift the ego boxes ``offset`` forward along their heading, as
            upstream intended; False reproduces its mis-indexed shift (module docstring).
            Defaults to False.
        score_thresh (float): Agents less confident than this are ignored. Defaults to 0.5.
        static_dis_thresh (float): See :func:`trajectory_yaw`. Defaults to 0.5.
        dim_scale (float): Ego box enlargement. Defaults to 1.1.
        num_motion_mode (int): Best agent modes tested. Defaults to 1.
        offset (float): Forward shift of the ego box (m). Defaults to 0.5.
        ego_size (tuple[float, float, float]): Ego box before scaling. Defaults to
            :data:`EGO_SIZE`.

    Raises:
        ValueError: Non-positive step, mode or motion-mode counts.

    Examples:
        >>> dec = HierarchicalPlanningDecoder(ego_fut_ts=6, ego_fut_mode=6)
        >>> det = dict(classification=[torch.zeros(1, 2, 10)], prediction=[torch.zeros(1, 2, 11)])
        >>> motion = dict(classification=[torch.zeros(1, 2, 6)],
        ...               prediction=[torch.zeros(1, 2, 6, 12, 2)])
        >>> plan = dict(classification=[torch.zeros(1, 1, 18)],
        ...             prediction=[torch.ones(1, 1, 18, 6, 2)],
        ...             anchor_queue=[torch.zeros(1, 1, 11)] * 2, period=torch.ones(1, 1))
        >>> out = dec.decode(det, motion, plan, dict(gt_ego_fut_cmd=torch.tensor([[0, 0, 1]])))
        >>> out[0]['final_planning'][-1].tolist(), out[0]['planning'].shape
        ([6.0, 6.0], torch.Size([3, 6, 6, 2]))
    """

    def __init__(self,
                 ego_fut_ts: int = 6,
                 ego_fut_mode: int = 6,
                 use_rescore: bool = True,
                 fix_ego_offset: bool = False,
                 score_thresh: float = 0.5,
                 static_dis_thresh: float = 0.5,
                 dim_scale: float = 1.1,
                 num_motion_mode: int = 1,
                 offset: float = 0.5,
                 ego_size: Sequence[float] = EGO_SIZE) -> None:
        if int(ego_fut_ts) < 1 or int(ego_fut_mode) < 1 or int(num_motion_mode) < 1:
            raise ValueError(f'HierarchicalPlanningDecoder: ego_fut_ts, ego_fut_mode and '
                             f'num_motion_mode must be positive, got {ego_fut_ts}, '
                             f'{ego_fut_mode}, {num_motion_mode}')
        if len(ego_size) != 3:
            raise ValueError(f'HierarchicalPlanningDecoder: ego_size needs 3 numbers, got '
                             f'{ego_size}')
        self.ego_fut_ts, self.ego_fut_mode = int(ego_fut_ts), int(ego_fut_mode)
        self.use_rescore, self.fix_ego_offset = bool(use_rescore), bool(fix_ego_offset)
        self.score_thresh, self.static_dis_thresh = float(score_thresh), float(static_dis_thresh)
        self.dim_scale, self.num_motion_mode = float(dim_scale), int(num_motion_mode)
        self.offset, self.ego_size = float(offset), tuple(float(s) for s in ego_size)

    # ------------------------------------------------------------------------------------------
    def decode(self, det_output: Mapping, motion_output: Mapping, planning_output: Mapping,
               data: Union[Mapping, Tensor]) -> List[Dict[str, Tensor]]:
        """Decode a batch (upstream's signature).

        Args:
            det_output (dict): Detection head outputs: per layer ``classification``
                ``[B, A, C]`` and ``prediction`` ``[B, A, 11]`` (the last layer is used).
            motion_output (dict): Motion outputs: per layer ``classification`` ``[B, A, Km]``
                and ``prediction`` ``[B, A, Km, F, 2]`` (per-step offsets, ``F >= T``).
            planning_output (dict): Per layer ``classification`` ``[B, 1, 3 * K]`` and
                ``prediction`` ``[B, 1, 3 * K, T, 2]`` (per-step offsets), ``anchor_queue``
                (list of ``[B, 1, 11]``) and ``period`` ``[B, 1]``.
            data (dict or Tensor): Holds ``gt_ego_fut_cmd`` ``[B, 3]`` (one-hot), or is it.

        Returns:
            list[dict]: Per sample, on the CPU: ``planning_score`` ``[3, K]`` (sigmoid, the
            commanded row re-scored), ``planning`` ``[3, K, T, 2]`` (positions),
            ``final_planning`` ``[T, 2]``, ``ego_period`` and ``ego_anchor_queue``
            ``[1, L, 10]`` (decoded boxes).
        """
        cls = last_layer(planning_output['classification'])
        reg = last_layer(planning_output['prediction'])
        batch, modes, steps = cls.shape[0], self.ego_fut_mode, self.ego_fut_ts
        if cls.numel() != batch * NUM_COMMANDS * modes or reg.shape[0] != batch or \
                reg.numel() != batch * NUM_COMMANDS * modes * steps * 2:
            raise ValueError(f'HierarchicalPlanningDecoder.decode: planning classification '
                             f'must be [B, 1, {3 * modes}] and prediction [B, 1, {3 * modes}, '
                             f'{steps}, 2], got {tuple(cls.shape)} and {tuple(reg.shape)}')
        cls = cls.reshape(batch, NUM_COMMANDS, modes)
        reg = reg.reshape(batch, NUM_COMMANDS, modes, steps, 2).cumsum(dim=-2)
        scores, final = self.select(det_output, motion_output, cls, reg, data)
        queue = stack_queue(planning_output['anchor_queue'], 'HierarchicalPlanningDecoder')
        fields = dict(planning_score=scores.sigmoid(), planning=reg, final_planning=final,
                      ego_period=planning_output['period'],
                      ego_anchor_queue=decode_boxes(queue))
        host = {key: value.detach().cpu() for key, value in fields.items()}  # one copy a field
        return [{key: value[b] for key, value in host.items()} for b in range(batch)]

    def select(self, det_output: Mapping, motion_output: Mapping, plan_cls: Tensor,
               plan_reg: Tensor, data: Union[Mapping, Tensor]) -> Tuple[Tensor, Tensor]:
        """Pick the commanded modes, re-score them, take the best.

        Args:
            det_output, motion_output: As :meth:`decode`.
            plan_cls (Tensor): ``[B, 3, K]`` logits.
            plan_reg (Tensor): ``[B, 3, K, T, 2]`` positions.
            data (dict or Tensor): As :meth:`decode`.

        Returns:
            tuple[Tensor, Tensor]: ``[B, 3, K]`` logits with the commanded row re-scored
            (detached), and ``[B, T, 2]`` the chosen plan.
        """
        command = data['gt_ego_fut_cmd'] if isinstance(data, Mapping) else data
        batch = plan_cls.shape[0]
        if tuple(command.shape) != (batch, NUM_COMMANDS):
            raise ValueError(f'HierarchicalPlanningDecoder: gt_ego_fut_cmd must be [{batch}, '
                             f'{NUM_COMMANDS}], got {tuple(command.shape)}')
        rows = torch.arange(batch, device=plan_cls.device)
        command = command.to(plan_cls.device).argmax(dim=-1)
        full = plan_cls.detach().clone()
        cls, reg = plan_cls[rows, command], plan_reg[rows, command]
        if self.use_rescore:
            det_cls = last_layer(det_output['classification'])
            cls = self.rescore(cls, reg, last_layer(motion_output['classification']).sigmoid(),
                               last_layer(motion_output['prediction']),
                               last_layer(det_output['prediction']),
                               det_cls.sigmoid().max(dim=-1).values)
        full[rows, command] = cls.detach().to(full.dtype)
        return full, reg[rows, cls.argmax(dim=-1)]

    # ------------------------------------------------------------------------------------------
    def rescore(self, plan_cls: Tensor, plan_reg: Tensor, motion_cls: Tensor, motion_reg: Tensor,
                det_anchors: Tensor, det_confidence: Tensor) -> Tensor:
        """Lower the logits of colliding modes by 999 (module docstring).

        Args:
            plan_cls (Tensor): ``[B, K]`` logits of the commanded modes.
            plan_reg (Tensor): ``[B, K, T, 2]`` their positions.
            motion_cls (Tensor): ``[B, A, Km]`` agent mode scores (only their order matters).
            motion_reg (Tensor): ``[B, A, Km, F, 2]`` agent per-step offsets, ``F >= T``.
            det_anchors (Tensor): ``[B, A, 11]`` agent box states.
            det_confidence (Tensor): ``[B, A]`` agent confidences (max class probability).

        Returns:
            Tensor: ``[B, K]``, ``plan_cls`` plus -999 where a mode collides and not all do.
        """
        steps, num_agent = plan_reg.shape[2], det_anchors.shape[1]
        if motion_reg.shape[:2] != det_anchors.shape[:2] or motion_reg.shape[3] < steps or \
                tuple(det_confidence.shape) != tuple(det_anchors.shape[:2]) or \
                motion_cls.shape != motion_reg.shape[:3]:
            raise ValueError(
                f'HierarchicalPlanningDecoder.rescore: agents disagree: motion_cls '
                f'{tuple(motion_cls.shape)}, motion_reg {tuple(motion_reg.shape)} (needs >= '
                f'{steps} steps), det_anchors {tuple(det_anchors.shape)}, det_confidence '
                f'{tuple(det_confidence.shape)}')
        if num_agent == 0:
            return plan_cls
        dtype = torch.promote_types(plan_reg.dtype, torch.float32)
        ego = self._ego_boxes(plan_reg.to(dtype))[:, None, None]  # [B, 1, 1, K, T, 7]
        agents = self._agent_boxes(motion_cls, motion_reg.to(dtype), det_anchors.to(dtype),
                                   det_confidence, steps)[:, :, :, None]  # [B, A, n, 1, T, 7]
        shape = torch.broadcast_shapes(ego.shape, agents.shape)
        ego = ego.expand(shape)
        if not self.fix_ego_offset:
            ego = self._misindexed_offset(ego.reshape(-1, 7)).reshape(shape)
        hit = corners_inside(agents, ego) | corners_inside(ego, agents)  # [B, A, n, K, T]
        hit = hit.permute(0, 3, 1, 2, 4).flatten(2).any(dim=-1)  # [B, K]
        hit = hit & ~hit.all(dim=-1, keepdim=True)  # all modes collide: no re-scoring
        return plan_cls + hit.to(plan_cls.dtype) * COLLISION_PENALTY

    def _ego_boxes(self, plan_reg: Tensor) -> Tensor:
        """``[B, K, T, 7]`` ego boxes along the plans (step 0, the origin, dropped)."""
        points = torch.cat([plan_reg.new_zeros(plan_reg.shape[:-2] + (1, 2)), plan_reg], dim=-2)
        yaw = trajectory_yaw(points, plan_reg.new_full((), math.pi / 2), self.static_dis_thresh)
        size = [points.new_full(points.shape[:-1] + (1, ), s) * self.dim_scale
                for s in self.ego_size]  # fills, no host-to-device copy
        boxes = torch.cat([points, points.new_zeros(points.shape[:-1] + (1, ))] + size +
                          [yaw.unsqueeze(-1)], dim=-1)[..., 1:, :]
        if self.fix_ego_offset:
            shift = torch.stack([boxes[..., BOX_YAW].cos(), boxes[..., BOX_YAW].sin()], -1)
            boxes = torch.cat([boxes[..., :2] + self.offset * shift, boxes[..., 2:]], dim=-1)
        return boxes

    def _agent_boxes(self, motion_cls: Tensor, motion_reg: Tensor, det_anchors: Tensor,
                     det_confidence: Tensor, steps: int) -> Tensor:
        """``[B, A, n, T, 7]`` boxes along each agent's ``n`` best modes (step 0 dropped)."""
        offsets = motion_reg[..., :steps, :].cumsum(dim=-2)
        points = torch.cat([offsets.new_zeros(offsets.shape[:-2] + (1, 2)), offsets], dim=-2)
        points = points + det_anchors[:, :, None, None, X:Y + 1]  # [B, A, Km, T + 1, 2]
        _, best = motion_cls.topk(self.num_motion_mode, dim=-1)  # [B, A, n]
        index = best[..., None, None].expand(best.shape + points.shape[-2:])
        points = torch.gather(points, 2, index)
        start = torch.atan2(det_anchors[..., SIN_YAW], det_anchors[..., COS_YAW])
        yaw = trajectory_yaw(points, start.unsqueeze(-1), self.static_dis_thresh)
        size = det_anchors[..., SIZE_X:SIZE_Z + 1].exp()[:, :, None, None]
        boxes = torch.cat([points, points.new_zeros(points.shape[:-1] + (1, )),
                           size.expand(points.shape[:-1] + (3, )), yaw.unsqueeze(-1)], dim=-1)
        far = (det_confidence < self.score_thresh)[:, :, None, None, None]
        boxes = torch.where(far, boxes.new_full((), FAR_AWAY), boxes)
        return boxes[..., 1:, :]

    def _misindexed_offset(self, flat: Tensor) -> Tensor:
        """Upstream's offset as written: rows 0 and 1 of the ``[N, 7]`` pair array get
        ``offset * cos`` / ``offset * sin`` of row 6 added to all their numbers (skipped when
        there is no row 6, where upstream would fail)."""
        if flat.shape[0] <= 6:
            return flat
        flat = flat.clone()
        row6 = flat[6].clone()
        flat[0] = flat[0] + self.offset * torch.cos(row6)
        flat[1] = flat[1] + self.offset * torch.sin(row6)
        return flat
