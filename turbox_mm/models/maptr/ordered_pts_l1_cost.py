"""``OrderedPtsL1Cost``: the L1 distance between a predicted point set and every equivalent
order of every ground-truth instance (upstream ``losses/map_loss.py`` @ 67cadd8)."""
import torch
from torch import Tensor

from turbox_mm.registry import TASK_UTILS


@TASK_UTILS.register_module()
class OrderedPtsL1Cost:
    """``weight * sum |pred - gt_order|`` over all points and both coordinates.

    Leading batch dimensions are allowed (the turbox path prices every layer and sample at
    once); each matrix is ``torch.cdist(p=1)`` of the flattened point sets, as upstream.

    Args:
        weight (float): Defaults to 1.

    Examples:
        >>> cost = OrderedPtsL1Cost(weight=5.)
        >>> pred = torch.zeros(3, 4, 2)
        >>> gt = torch.ones(2, 5, 4, 2)
        >>> cost(pred, gt).shape  # [Q, G * O]
        torch.Size([3, 10])
        >>> float(cost(pred, gt)[0, 0])
        40.0
    """

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = weight

    def __call__(self, pts_pred: Tensor, gt_pts: Tensor) -> Tensor:
        """Price ``[..., Q, P, 2]`` normalised predictions against ``[..., G, O, P, 2]``
        normalised ground-truth orders; returns ``[..., Q, G * O]`` (ground truth major)."""
        pred = pts_pred.flatten(-2)
        gt = gt_pts.flatten(-2).flatten(-3, -2)
        batch = torch.broadcast_shapes(pred.shape[:-2], gt.shape[:-2])
        pred = pred.expand(*batch, *pred.shape[-2:])
        gt = gt.expand(*batch, *gt.shape[-2:])
        return torch.cdist(pred, gt, p=1) * self.weight
