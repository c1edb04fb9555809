"""SparseDrive's motion-planning blocks: the sine embedding of trajectory end points, the mode
query encoder and the output layer (docs/design/sparsedrive.md, sections 6.1 and 6.3)."""
import math
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from turbox_mm.models.sparse4d.anchor_encoder import linear_relu_ln
from turbox_mm.models.sparse4d.box3d import COS_YAW, SIN_YAW
from turbox_mm.registry import MODELS

#: Driving commands (right, left, straight): the plan has a group of modes for each.
NUM_COMMANDS = 3
#: Length of the ego status vector the planner predicts (``ego_status``, section 7.1).
EGO_STATUS_DIMS = 10


def sine_position_embedding(pos: Tensor, num_feats: int = 256) -> Tensor:
    """DAB-DETR's sine embedding of 2-D points (upstream's ``gen_sineembed_for_position``).

    Each coordinate, in metres, is multiplied by ``2 pi``; ``num_feats // 2`` features per
    axis follow: feature ``k`` of an axis is ``sin`` (even ``k``) or ``cos`` (odd ``k``) of
    ``v / 10000 ** (2 * (k // 2) / (num_feats // 2))``. The y features come first, then x.

    Upstream fixes ``num_feats`` at 256 whatever the head's width; the head here passes its
    ``embed_dims`` (the same at 256).

    Args:
        pos (Tensor): ``[..., 2]`` (x, y) points; further coordinates are ignored.
        num_feats (int): Output features, even. Defaults to 256.

    Returns:
        Tensor: ``[..., num_feats]`` float32.

    Raises:
        ValueError: ``num_feats`` is odd, or ``pos`` has fewer than 2 coordinates.

    Examples:
        >>> sine_position_embedding(torch.zeros(3, 2), 8)[0]
        tensor([0., 1., 0., 1., 0., 1., 0., 1.])
    """
    if num_feats % 2 or num_feats < 2:
        raise ValueError(f'sine_position_embedding: num_feats must be even and >= 2, got '
                         f'{num_feats}')
    if pos.shape[-1] < 2:
        raise ValueError(f'sine_position_embedding: pos must be [..., 2], got '
                         f'{list(pos.shape)}')
    half = num_feats // 2
    k = torch.arange(half, dtype=torch.float32, device=pos.device)
    period = 10000 ** (2 * torch.div(k, 2, rounding_mode='floor') / half)
    even = (torch.arange(half, device=pos.device) % 2) == 0

    def axis(v: Tensor) -> Tensor:
        phase = (v.float() * (2 * math.pi))[..., None] / period
        # even features sin, odd features cos: upstream interleaves sin(even), cos(odd)
        return torch.where(even, phase.sin(), phase.cos())

    return torch.cat([axis(pos[..., 1]), axis(pos[..., 0])], dim=-1)


def mode_query_encoder(embed_dims: int) -> nn.Sequential:
    """The MLP from an end point's sine embedding to a mode query: Linear, ReLU, LayerNorm,
    Linear (upstream's ``motion_anchor_encoder`` / ``plan_anchor_encoder``; indices 0, 2, 3
    as upstream, so checkpoints load as they are)."""
    return nn.Sequential(*linear_relu_ln(embed_dims, 1, 1, embed_dims),
                         nn.Linear(embed_dims, embed_dims))


def load_anchor(anchor: Union[str, np.ndarray, Sequence, None], name: str,
                shape: Tuple[Optional[int], ...]) -> Tensor:
    """An anchor array (or ``.npy`` path) as a float32 tensor of ``shape`` (None = any).

    Raises:
        ValueError: None, or the shape does not fit (names the argument).
    """
    if anchor is None:
        raise ValueError(f'MotionPlanningHead: {name} (an array or an .npy path) is required')
    source = anchor if isinstance(anchor, str) else 'the array'
    array = np.asarray(np.load(anchor) if isinstance(anchor, str) else anchor, np.float32)
    if array.ndim != len(shape) or any(s is not None and s != a
                                       for s, a in zip(shape, array.shape)):
        want = ', '.join('n' if s is None else str(s) for s in shape)
        raise ValueError(f'MotionPlanningHead: {name} must be [{want}], got '
                         f'{list(array.shape)} from {source}')
    return torch.from_numpy(array.copy())


def topk_rows(score: Tensor, k: int, *inputs: Tensor) -> List[Tensor]:
    """The rows ``[B, k, ...]`` of each input at the ``k`` highest ``score`` ``[B, N]``
    (upstream's ``topk`` of the instance bank, as a gather)."""
    index = score.topk(k, dim=1).indices
    return [x.gather(1, index[..., None].expand(-1, -1, x.shape[-1])) for x in inputs]


def agent_to_lidar(trajs: Tensor, boxes: Tensor) -> Tensor:
    """Rotate agent-frame trajectories ``[B, A, K, T, 2]`` by each box's yaw
    ``atan2(sin, cos)`` (``boxes`` ``[B, A, 11]``) into the lidar frame; no translation."""
    yaw = torch.atan2(boxes[..., SIN_YAW], boxes[..., COS_YAW])
    cos, sin = yaw.cos()[..., None, None], yaw.sin()[..., None, None]
    x, y = trajs[..., 0], trajs[..., 1]
    return torch.stack([x * cos - y * sin, x * sin + y * cos], dim=-1)


def _regression_branch(embed_dims: int, out_dims: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(embed_dims, embed_dims), nn.ReLU(),
                         nn.Linear(embed_dims, embed_dims), nn.ReLU(),
                         nn.Linear(embed_dims, out_dims))


def _classification_branch(embed_dims: int) -> nn.Sequential:
    return nn.Sequential(*linear_relu_ln(embed_dims, 1, 2, embed_dims),
                         nn.Linear(embed_dims, 1))


@MODELS.register_module()
class MotionPlanningRefinementModule(nn.Module):
    """The motion-planning head's output layer: mode scores and trajectories for every agent,
    mode scores and trajectories for the ego car under each command, and the ego status.

    - Agents: ``motion_query`` ``[B, A, fut_mode, C]`` -> scores through two (Linear, ReLU,
      LayerNorm) blocks and a Linear to 1 -> ``[B, A, fut_mode]``; trajectories through
      (Linear, ReLU) x 2 and a Linear to ``fut_ts * 2`` -> ``[B, A, fut_mode, fut_ts, 2]``
      (per-step offsets in metres, not cumulated).
    - Ego: ``plan_query`` ``[B, 1, 3 * ego_fut_mode, C]`` (command-major) likewise ->
      ``[B, 1, 3 * ego_fut_mode]`` and ``[B, 1, 3 * ego_fut_mode, ego_fut_ts, 2]``.
    - Status: ``ego_feature + ego_anchor_embed`` ``[B, 1, C]`` through (Linear, ReLU) x 2 and a
      Linear to 10 -> ``[B, 1, 10]``.

    Both score biases start at the logit of 0.01 (:meth:`init_weights`); every other weight
    keeps PyTorch's default (the head's xavier pass skips this layer, as upstream's).
    Parameter names follow upstream (``motion_cls_branch``, ``motion_reg_branch``,
    ``plan_cls_branch``, ``plan_reg_branch``, ``plan_status_branch``).

    Args:
        embed_dims (int): C. Defaults to 256.
        fut_ts (int): Agent future steps. Defaults to 12.
        fut_mode (int): Agent modes. Defaults to 6.
        ego_fut_ts (int): Ego future steps. Defaults to 6.
        ego_fut_mode (int): Ego modes per command. Defaults to 3 (upstream's default; its
            configs use 6).

    Examples:
        >>> ref = MotionPlanningRefinementModule(16, fut_ts=4, fut_mode=2, ego_fut_ts=3,
        ...                                      ego_fut_mode=2)
        >>> out = ref(torch.zeros(1, 5, 2, 16), torch.zeros(1, 1, 6, 16),
        ...           torch.zeros(1, 1, 16), torch.zeros(1, 1, 16))
        >>> [tuple(x.shape) for x in out]
        [(1, 5, 2), (1, 5, 2, 4, 2), (1, 1, 6), (1, 1, 6, 3, 2), (1, 1, 10)]
    """

    def __init__(self,
                 embed_dims: int = 256,
                 fut_ts: int = 12,
                 fut_mode: int = 6,
                 ego_fut_ts: int = 6,
                 ego_fut_mode: int = 3) -> None:
        super().__init__()
        for name, value in (('embed_dims', embed_dims), ('fut_ts', fut_ts),
                            ('fut_mode', fut_mode), ('ego_fut_ts', ego_fut_ts),
                            ('ego_fut_mode', ego_fut_mode)):
            if value < 1:
                raise ValueError(f'MotionPlanningRefinementModule: {name} must be >= 1, got '
                                 f'{value}')
        self.embed_dims = embed_dims
        self.fut_ts, self.fut_mode = fut_ts, fut_mode
        self.ego_fut_ts, self.ego_fut_mode = ego_fut_ts, ego_fut_mode
        self.motion_cls_branch = _classification_branch(embed_dims)
        self.motion_reg_branch = _regression_branch(embed_dims, fut_ts * 2)
        self.plan_cls_branch = _classification_branch(embed_dims)
        self.plan_reg_branch = _regression_branch(embed_dims, ego_fut_ts * 2)
        self.plan_status_branch = _regression_branch(embed_dims, EGO_STATUS_DIMS)
        self.init_weights()

    def init_weights(self) -> None:
        """Score biases at the logit of 0.01, ``-log(99)`` (mmcv's ``bias_init_with_prob``)."""
        bias = -math.log((1 - 0.01) / 0.01)
        nn.init.constant_(self.motion_cls_branch[-1].bias, bias)
        nn.init.constant_(self.plan_cls_branch[-1].bias, bias)

    def forward(self, motion_query: Tensor, plan_query: Tensor, ego_feature: Tensor,
                ego_anchor_embed: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Predict.

        Args:
            motion_query (Tensor): ``[B, A, fut_mode, C]``.
            plan_query (Tensor): ``[B, 1, 3 * ego_fut_mode, C]``.
            ego_feature (Tensor): ``[B, 1, C]``.
            ego_anchor_embed (Tensor): ``[B, 1, C]``.

        Returns:
            tuple: motion scores ``[B, A, fut_mode]``, motion offsets
            ``[B, A, fut_mode, fut_ts, 2]``, plan scores ``[B, 1, 3 * ego_fut_mode]``, plan
            offsets ``[B, 1, 3 * ego_fut_mode, ego_fut_ts, 2]``, ego status ``[B, 1, 10]``.

        Raises:
            ValueError: A query's mode count or feature size does not fit.
        """
        num_plan = NUM_COMMANDS * self.ego_fut_mode
        for name, x, modes in (('motion_query', motion_query, self.fut_mode),
                               ('plan_query', plan_query, num_plan)):
            if x.dim() != 4 or x.shape[2] != modes or x.shape[3] != self.embed_dims:
                raise ValueError(f'MotionPlanningRefinementModule: {name} must be [B, N, '
                                 f'{modes}, {self.embed_dims}], got {list(x.shape)}')
        batch, num_anchor = motion_query.shape[:2]
        motion_cls = self.motion_cls_branch(motion_query).squeeze(-1)
        motion_reg = self.motion_reg_branch(motion_query).reshape(
            batch, num_anchor, self.fut_mode, self.fut_ts, 2)
        plan_cls = self.plan_cls_branch(plan_query).squeeze(-1)
        plan_reg = self.plan_reg_branch(plan_query).reshape(
            batch, 1, num_plan, self.ego_fut_ts, 2)
        status = self.plan_status_branch(ego_feature + ego_anchor_embed)
        return motion_cls, motion_reg, plan_cls, plan_reg, status
