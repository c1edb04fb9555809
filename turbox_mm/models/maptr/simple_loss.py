"""``SimpleLoss``: MapTR v2's loss of its auxiliary segmentation heads (upstream
``losses/simple_loss.py`` @ 69ab751): binary cross-entropy on logits with a positive-class
weight, averaged over every element, times ``loss_weight``."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from turbox_mm.registry import MODELS


@MODELS.register_module()
class SimpleLoss(nn.Module):
    """``loss_weight * mean(BCEWithLogits(pred, target, pos_weight))`` over all elements.

    Upstream's configs: BEV segmentation ``pos_weight=4.0, loss_weight=1.0``; perspective
    segmentation ``pos_weight=1.0, loss_weight=2.0``.

    Args:
        pos_weight (float): Weight of the positive term of every element.
        loss_weight (float): Factor of the mean. Defaults to 1.0.

    Examples:
        >>> loss = SimpleLoss(pos_weight=4.0)
        >>> pred, target = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1., 0.], [0., 0.]]]])
        >>> round(float(loss(pred, target)), 4)  # (4 log 2 + 3 log 2) / 4
        1.213
    """

    def __init__(self, pos_weight: float, loss_weight: float = 1.0) -> None:
        super().__init__()
        # a buffer, as torch's BCEWithLogitsLoss keeps it: it follows the module's device; not
        # saved (upstream's checkpoints hold it as loss_seg.loss_fn.pos_weight: an unexpected
        # key here, the value comes from the config)
        self.register_buffer('pos_weight', torch.tensor([float(pos_weight)]), persistent=False)
        self.loss_weight = float(loss_weight)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """Logits ``pred`` and a 0/1 ``target`` of the same shape (any dtype)."""
        if pred.shape != target.shape:
            raise ValueError(f'SimpleLoss: prediction {tuple(pred.shape)} and target '
                             f'{tuple(target.shape)} differ')
        loss = F.binary_cross_entropy_with_logits(pred, target.to(pred.dtype),
                                                  pos_weight=self.pos_weight.to(pred.dtype))
        return loss * self.loss_weight
