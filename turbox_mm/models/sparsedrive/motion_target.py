"""SparseDrive's motion targets: the ground-truth futures of the agents matched by the detection
head, and the best of each agent's predicted modes (docs/design/sparsedrive.md section 6.4;
upstream ``P/models/motion/target.py`` @ ffebeb4).

The detection loss's last decoder layer pairs queries with ground-truth boxes (Hungarian
matching); every matched query takes its box's future, ``F`` per-step offsets and a per-step
validity mask. Among a query's ``K`` predicted modes the *best* is the one whose trajectory
(offsets summed up to positions) lies nearest to the ground truth: the mean over all ``F``
steps of the masked Euclidean distance (a plain mean, the denominator counts masked steps too,
as upstream; it does not change the argmin). Unmatched queries have a zero mask, all their
modes tie at 0 and the first (mode 0) is taken, with weight 0.

Upstream places the targets with a Python loop over samples and index assignment. This port
keeps that loop (``B`` is 6) but every index is a device tensor and nothing reads a device
value on the host: no ``.item()``, no boolean indexing, ``num_pos`` stays a tensor.
"""
from typing import Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from turbox_mm.registry import TASK_UTILS

__all__ = ['MotionTarget', 'best_mode', 'gather_mode', 'mode_distance']

#: A sample's matched pairs: ``(query_idx, gt_idx)`` long tensors, or None without ground truth.
Pairs = Optional[Tuple[Tensor, Tensor]]


def mode_distance(reg_pred: Tensor, reg_target: Tensor, reg_weight: Tensor) -> Tensor:
    """Distance of every predicted mode to the ground truth: the mean over the ``T`` steps
    of ``mask x ||P_t - G_t||_2``, with ``P`` and ``G`` the cumulative sums of the per-step
    offsets (positions).

    Args:
        reg_pred (Tensor): ``[..., K, T, 2]`` predicted per-step offsets.
        reg_target (Tensor): ``[..., T, 2]`` ground-truth per-step offsets.
        reg_weight (Tensor): ``[..., T]`` step weights (the validity mask).

    Returns:
        Tensor: ``[..., K]`` distances (no gradient).
    """
    with torch.no_grad():
        pos_pred = reg_pred.detach().cumsum(dim=-2)
        pos_target = reg_target.detach().cumsum(dim=-2).unsqueeze(-3)
        dist = torch.linalg.norm(pos_target - pos_pred, dim=-1)  # [..., K, T]
        return (dist * reg_weight.detach().unsqueeze(-2).to(dist.dtype)).mean(dim=-1)


def best_mode(reg_pred: Tensor, reg_target: Tensor, reg_weight: Tensor) -> Tensor:
    """Index of the predicted mode nearest to the ground truth (:func:`mode_distance`). Ties
    go to the lowest mode index (``argmin``'s first minimum), so a fully masked row picks
    mode 0.

    Args:
        reg_pred (Tensor): ``[..., K, T, 2]`` predicted per-step offsets.
        reg_target (Tensor): ``[..., T, 2]`` ground-truth per-step offsets.
        reg_weight (Tensor): ``[..., T]`` step weights (the validity mask).

    Returns:
        Tensor: ``[...]`` long, the best mode (no gradient).

    Examples:
        >>> pred = torch.tensor([[[1., 0.], [1., 0.]], [[0., 1.], [0., 1.]]])  # K=2, T=2
        >>> best_mode(pred, torch.tensor([[0., 1.], [0., 1.]]), torch.ones(2)).item()
        1
    """
    return mode_distance(reg_pred, reg_target, reg_weight).argmin(dim=-1)


def gather_mode(reg_pred: Tensor, mode: Tensor) -> Tensor:
    """The trajectory of the chosen mode: ``[..., K, T, 2]`` and ``[...]`` -> ``[..., T, 2]``
    (differentiable in ``reg_pred``)."""
    steps, dims = reg_pred.shape[-2:]
    index = mode[..., None, None, None].expand(*mode.shape, 1, steps, dims)
    return torch.gather(reg_pred, -3, index).squeeze(-3)


@TASK_UTILS.register_module()
class MotionTarget:
    """Targets of the motion loss from the detection head's matched pairs (module docstring).

    Upstream's sampler takes no arguments; neither does this one.

    Examples:
        >>> target = MotionTarget()
        >>> pred = torch.zeros(1, 3, 6, 12, 2)
        >>> pairs = [(torch.tensor([2]), torch.tensor([0]))]
        >>> out = target.sample(pred, [torch.ones(1, 12, 2)], [torch.ones(1, 12)], pairs)
        >>> out[1].tolist(), out[3][0, 2, -1].tolist(), float(out[5])
        ([[0.0, 0.0, 1.0]], [12.0, 12.0], 1.0)
    """

    def sample(self,
               reg_pred: Tensor,
               gt_agent_fut_trajs: Sequence[Tensor],
               gt_agent_fut_masks: Sequence[Tensor],
               indices: Union[Sequence[Pairs], Mapping[str, Sequence[Pairs]]]
               ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Place each matched ground-truth future on its query and pick the best modes.

        Args:
            reg_pred (Tensor): ``[B, A, K, T, 2]`` predicted per-step offsets of every query
                and mode.
            gt_agent_fut_trajs (list[Tensor]): Per sample ``[n_i, T, 2]`` per-step offsets of
                the ground-truth agents (the detection targets' order).
            gt_agent_fut_masks (list[Tensor]): Per sample ``[n_i, T]`` step validity (0/1,
                any dtype).
            indices (list[tuple[Tensor, Tensor]] or dict): Per sample the detection
                sampler's last-layer ``(query_idx, gt_idx)`` long tensors on the predictions'
                device; ``None`` (or empty tensors) for a sample without ground truth. Also
                accepted: upstream's ``motion_loss_cache`` dict holding them under
                ``'indices'``.

        Returns:
            tuple: On the predictions' device, float tensors in the predictions' dtype
            promoted to at least float32:

            - ``cls_target`` ``[B, A]`` long: the best mode;
            - ``cls_weight`` ``[B, A]``: 1 on matched queries with any valid step, else 0;
            - ``reg_pred_best`` ``[B, A, T, 2]``: the best mode's **positions** (cumulative
              sum of its offsets; upstream returns the offsets and sums them in the loss);
            - ``reg_target`` ``[B, A, T, 2]``: the ground truth's positions (likewise);
            - ``reg_weight`` ``[B, A, T]``: the step mask of the matched ground truth, else 0;
            - ``num_pos``: 0-dim tensor, the number of matched ground truths (masks ignored),
              averaged over ranks (``mmdet.utils.reduce_mean``) and clamped at 1, as
              upstream's ``max(reduce_mean(num_pos), 1.0)``.

        Raises:
            ValueError: Shapes or list lengths disagree.
        """
        if isinstance(indices, Mapping):
            if 'indices' not in indices:
                raise ValueError("MotionTarget.sample: the loss cache has no 'indices'")
            indices = indices['indices']
        self._check(reg_pred, gt_agent_fut_trajs, gt_agent_fut_masks, indices)
        batch, num_query, _, steps, dims = reg_pred.shape
        dtype = torch.promote_types(reg_pred.dtype, torch.float32)
        pred = reg_pred.to(dtype)
        reg_target = pred.new_zeros(batch, num_query, steps, dims)
        reg_weight = pred.new_zeros(batch, num_query, steps)
        num_pos = 0
        for i, pairs in enumerate(indices):  # one small index_put per sample, as upstream
            if pairs is None or gt_agent_fut_trajs[i].shape[0] == 0:
                continue
            query_idx, gt_idx = pairs
            trajs = gt_agent_fut_trajs[i].to(device=pred.device, dtype=dtype)
            masks = gt_agent_fut_masks[i].to(device=pred.device, dtype=dtype)
            reg_target[i].index_put_((query_idx, ), trajs[gt_idx])
            reg_weight[i].index_put_((query_idx, ), masks[gt_idx])
            num_pos += query_idx.shape[0]
        cls_target = best_mode(pred, reg_target, reg_weight)
        cls_weight = reg_weight.detach().ne(0).any(dim=-1).to(dtype)
        reg_pred_best = gather_mode(pred, cls_target).cumsum(dim=-2)
        num_pos = torch.full((), float(num_pos), dtype=dtype, device=pred.device)
        from mmdet.utils import reduce_mean
        num_pos = reduce_mean(num_pos).clamp(min=1.0)
        return (cls_target, cls_weight, reg_pred_best, reg_target.cumsum(dim=-2), reg_weight,
                num_pos)

    @staticmethod
    def _check(reg_pred: Tensor, trajs: Sequence[Tensor], masks: Sequence[Tensor],
               indices: Sequence[Pairs]) -> None:
        """Shape checks (on shapes only: no device value is read)."""
        if reg_pred.dim() != 5 or reg_pred.shape[-1] != 2:
            raise ValueError(f'MotionTarget.sample: reg_pred must be [B, A, K, T, 2], got '
                             f'{tuple(reg_pred.shape)}')
        batch, steps = reg_pred.shape[0], reg_pred.shape[3]
        for name, value in (('gt_agent_fut_trajs', trajs), ('gt_agent_fut_masks', masks),
                            ('indices', indices)):
            if len(value) != batch:
                raise ValueError(f'MotionTarget.sample: {name} has {len(value)} samples, '
                                 f'reg_pred {batch}')
        for i, (traj, mask, pairs) in enumerate(zip(trajs, masks, indices)):
            if traj.dim() != 3 or tuple(traj.shape[1:]) != (steps, 2):
                raise ValueError(f'MotionTarget.sample: gt_agent_fut_trajs[{i}] must be '
                                 f'[n, {steps}, 2], got {tuple(traj.shape)}')
            if tuple(mask.shape) != tuple(traj.shape[:2]):
                raise ValueError(f'MotionTarget.sample: gt_agent_fut_masks[{i}] must be '
                                 f'{tuple(traj.shape[:2])}, got {tuple(mask.shape)}')
            if pairs is None:
                continue
            if len(pairs) != 2 or pairs[0].shape != pairs[1].shape or pairs[0].dim() != 1:
                raise ValueError(f'MotionTarget.sample: indices[{i}] must be two 1-D index '
                                 f'tensors of one length (query_idx, gt_idx)')
            if pairs[0].shape[0] > traj.shape[0]:
                raise ValueError(f'MotionTarget.sample: indices[{i}] has {pairs[0].shape[0]} '
                                 f'pairs for {traj.shape[0]} ground-truth agents')
