"""SparseDrive's planning targets: the ego's ground-truth future against the predicted modes of
the commanded manoeuvre (docs/design/sparsedrive.md section 6.4; upstream
``P/models/motion/target.py`` @ ffebeb4).

The planner predicts ``K`` modes for each of the 3 driving commands (right, left, straight;
command-major). Training uses only the modes of the sample's ground-truth command (the argmax
of its one-hot ``gt_ego_fut_cmd``); among them the best mode is the one nearest to the
ground truth, by :func:`~.motion_target.best_mode` (mean over steps of the masked distance
between positions). Unlike the motion targets, the regression target stays in **per-step
offsets**: upstream's planning loss compares offsets, not their cumulative sums.
"""
from typing import Mapping, Tuple, Union

import torch
from torch import Tensor

from turbox_mm.registry import TASK_UTILS
from .motion_target import best_mode, gather_mode

__all__ = ['PlanningTarget']

#: Driving commands (one-hot order of ``gt_ego_fut_cmd``): right, left, straight.
NUM_COMMANDS = 3


@TASK_UTILS.register_module()
class PlanningTarget:
    """Targets of the planning loss (module docstring).

    Args:
        ego_fut_ts (int): Future steps of the ego trajectory. Defaults to 6.
        ego_fut_mode (int): Modes per command. Defaults to 6.

    Raises:
        ValueError: A non-positive step or mode count.

    Examples:
        >>> target = PlanningTarget(ego_fut_ts=2, ego_fut_mode=2)
        >>> reg = torch.zeros(1, 1, 6, 2, 2)
        >>> reg[0, 0, 5] = 1.0  # command 2 (straight), mode 1
        >>> out = target.sample(torch.arange(6.).view(1, 1, 6), reg, torch.ones(1, 2, 2),
        ...                     torch.ones(1, 2), torch.tensor([[0., 0., 1.]]))
        >>> out[0].tolist(), out[1].tolist(), out[3].tolist()
        ([[4.0, 5.0]], [1], [[[1.0, 1.0], [1.0, 1.0]]])
    """

    def __init__(self, ego_fut_ts: int = 6, ego_fut_mode: int = 6) -> None:
        if int(ego_fut_ts) < 1 or int(ego_fut_mode) < 1:
            raise ValueError(f'PlanningTarget: ego_fut_ts and ego_fut_mode must be positive, '
                             f'got {ego_fut_ts} and {ego_fut_mode}')
        self.ego_fut_ts = int(ego_fut_ts)
        self.ego_fut_mode = int(ego_fut_mode)

    def sample(self,
               cls_pred: Tensor,
               reg_pred: Tensor,
               gt_ego_fut_trajs: Tensor,
               gt_ego_fut_masks: Tensor,
               gt_ego_fut_cmd: Union[Tensor, Mapping[str, Tensor]]
               ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Select the commanded modes and the best of them.

        Args:
            cls_pred (Tensor): ``[B, 1, 3 * K]`` mode logits (the refinement module's output;
                any shape of ``B x 3 x K`` elements, command-major, is accepted).
            reg_pred (Tensor): ``[B, 1, 3 * K, T, 2]`` per-step offsets (any shape of
                ``B x 3 x K x T x 2`` elements, command-major).
            gt_ego_fut_trajs (Tensor): ``[B, T, 2]`` ground-truth per-step offsets.
            gt_ego_fut_masks (Tensor): ``[B, T]`` step validity (0/1, any dtype).
            gt_ego_fut_cmd (Tensor or dict): ``[B, 3]`` one-hot command, or upstream's
                ``data`` dict holding it under ``'gt_ego_fut_cmd'``.

        Returns:
            tuple: Upstream's six outputs with its singleton query axis dropped (what its loss
            reads after ``flatten(end_dim=1)``); floats in the predictions' dtype promoted to
            at least float32:

            - ``cls`` ``[B, K]``: the commanded modes' logits (differentiable);
            - ``cls_target`` ``[B]`` long: the best mode;
            - ``cls_weight`` ``[B]``: 1 where any step is valid;
            - ``reg_pred_best`` ``[B, T, 2]``: the best mode's per-step offsets
              (differentiable; no cumulative sum, as upstream);
            - ``reg_target`` ``[B, T, 2]``: ``gt_ego_fut_trajs``;
            - ``reg_weight`` ``[B, T]``: ``gt_ego_fut_masks``.

        Raises:
            ValueError: Shapes disagree with ``B``, ``ego_fut_mode`` or ``ego_fut_ts``.
        """
        if isinstance(gt_ego_fut_cmd, Mapping):
            if 'gt_ego_fut_cmd' not in gt_ego_fut_cmd:
                raise ValueError("PlanningTarget.sample: data has no 'gt_ego_fut_cmd'")
            gt_ego_fut_cmd = gt_ego_fut_cmd['gt_ego_fut_cmd']
        modes, steps = self.ego_fut_mode, self.ego_fut_ts
        batch = reg_pred.shape[0] if reg_pred.dim() else 0
        checks = (
            ('cls_pred', cls_pred, batch * NUM_COMMANDS * modes, f'[B, 1, {3 * modes}]'),
            ('reg_pred', reg_pred, batch * NUM_COMMANDS * modes * steps * 2,
             f'[B, 1, {3 * modes}, {steps}, 2]'),
        )
        for name, value, numel, want in checks:
            if value.dim() == 0 or value.shape[0] != batch or value.numel() != numel:
                raise ValueError(f'PlanningTarget.sample: {name} must be {want} (B={batch}), '
                                 f'got {tuple(value.shape)}')
        for name, value, want in (('gt_ego_fut_trajs', gt_ego_fut_trajs, (batch, steps, 2)),
                                  ('gt_ego_fut_masks', gt_ego_fut_masks, (batch, steps)),
                                  ('gt_ego_fut_cmd', gt_ego_fut_cmd, (batch, NUM_COMMANDS))):
            if tuple(value.shape) != want:
                raise ValueError(f'PlanningTarget.sample: {name} must be {list(want)}, got '
                                 f'{tuple(value.shape)}')
        dtype = torch.promote_types(reg_pred.dtype, torch.float32)
        device = reg_pred.device
        rows = torch.arange(batch, device=device)
        command = gt_ego_fut_cmd.to(device).argmax(dim=-1)
        cls = cls_pred.to(dtype).reshape(batch, NUM_COMMANDS, modes)[rows, command]
        reg = reg_pred.to(dtype).reshape(batch, NUM_COMMANDS, modes, steps, 2)[rows, command]
        reg_target = gt_ego_fut_trajs.to(device=device, dtype=dtype)
        reg_weight = gt_ego_fut_masks.to(device=device, dtype=dtype)
        cls_target = best_mode(reg, reg_target, reg_weight)
        cls_weight = reg_weight.ne(0).any(dim=-1).to(dtype)
        return cls, cls_target, cls_weight, gather_mode(reg, cls_target), reg_target, reg_weight
