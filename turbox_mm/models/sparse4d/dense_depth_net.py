"""Sparse4D's auxiliary dense depth head on the first FPN levels, and its L1 loss."""
from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from turbox_mm.registry import MODELS


@MODELS.register_module()
class DenseDepthNet(nn.Module):
    """Per-pixel depth from FPN features, supervised by projected lidar points.

    One 1x1 conv per level (the first ``num_depth_layers`` levels); depth =
    ``exp(conv(feature)) * focal / equal_focal``, so the network predicts depth at a reference
    focal length and each camera's own focal rescales it (docs/design/sparse4d.md, 2.12). Only
    an auxiliary loss: the head does not use the depths.

    The convs, the exponential and the loss run in float32 with autocast off (upstream casts
    the features to float; here autocast cannot put the conv back into half precision).

    Args:
        embed_dims (int): Feature channels. Defaults to 256.
        num_depth_layers (int): Levels with a depth conv. Defaults to 3.
        equal_focal (float): Reference focal length (pixels). Defaults to 100.
        max_depth (float): Predictions are clipped to ``[0, max_depth]`` in the loss.
            Defaults to 60.
        loss_weight (float): Weight of the loss. Defaults to 0.2.

    Examples:
        >>> net = DenseDepthNet(embed_dims=8, num_depth_layers=2)
        >>> maps = [torch.randn(1, 2, 8, 4, 6), torch.randn(1, 2, 8, 2, 3)]
        >>> [d.shape for d in net(maps)]
        [torch.Size([2, 1, 4, 6]), torch.Size([2, 1, 2, 3])]
    """

    #: What ``turbox.compile.modules='auto'`` compiles of this module: its forward (a 1x1
    #: conv, exp and focal scaling per level) and its loss (masked L1 per level), each as one
    #: function.
    turbox_compile_methods = ('forward', 'loss')

    def __init__(self,
                 embed_dims: int = 256,
                 num_depth_layers: int = 3,
                 equal_focal: float = 100,
                 max_depth: float = 60,
                 loss_weight: float = 0.2) -> None:
        super().__init__()
        self.embed_dims = embed_dims
        self.num_depth_layers = num_depth_layers
        self.equal_focal = equal_focal
        self.max_depth = max_depth
        self.loss_weight = loss_weight
        self.depth_layers = nn.ModuleList(
            nn.Conv2d(embed_dims, 1, kernel_size=1) for _ in range(num_depth_layers))

    def forward(self, feature_maps: Sequence[Tensor],
                focal: Optional[Tensor] = None) -> List[Tensor]:
        """Depth maps of the first ``num_depth_layers`` levels.

        Args:
            feature_maps (list[Tensor]): ``[B, N, C, H_l, W_l]`` per level; at least
                ``num_depth_layers`` levels.
            focal (Tensor, optional): ``[B, N]`` focal lengths in pixels; None uses
                ``equal_focal`` (no rescaling). Defaults to None.

        Returns:
            list[Tensor]: ``[B * N, 1, H_l, W_l]`` float32 depths (metres).
        """
        if len(feature_maps) < self.num_depth_layers:
            raise ValueError(f'DenseDepthNet: needs {self.num_depth_layers} feature levels, got '
                             f'{len(feature_maps)}')
        depths = []
        for conv, feat in zip(self.depth_layers, feature_maps):
            if feat.dim() != 5:
                raise ValueError(f'DenseDepthNet: feature maps must be [B, N, C, H, W], got '
                                 f'{tuple(feat.shape)}')
            with torch.autocast(feat.device.type, enabled=False):
                depth = conv(feat.flatten(0, 1).float()).exp()
                if focal is not None:
                    scale = focal.reshape(-1).float()
                    if scale.numel() != depth.shape[0]:
                        raise ValueError(f'DenseDepthNet: focal must be [B, N] with B * N = '
                                         f'{depth.shape[0]}, got {tuple(focal.shape)}')
                    depth = depth * (scale / self.equal_focal)[:, None, None, None]
            depths.append(depth)
        return depths

    def loss(self, depth_preds: Sequence[Tensor], gt_depths: Sequence[Tensor]) -> Tensor:
        """L1 depth loss on the pixels with a target.

        Per level: pixels with ``gt > 0`` and a non-NaN prediction are foreground; the
        prediction is clipped to ``[0, max_depth]``; ``sum |pred - gt| / max(1, n_fg * levels)
        * loss_weight``; summed over levels. Zero, and still connected to the graph, without
        foreground.

        Args:
            depth_preds (list[Tensor]): ``[B * N, 1, h, w]`` from :meth:`forward`.
            gt_depths (list[Tensor]): ``[B, N, h, w]`` per level; values ``<= 0`` (e.g. -1)
                mean no target.

        Returns:
            Tensor: The scalar float32 loss.
        """
        if len(depth_preds) != len(gt_depths):
            raise ValueError(f'DenseDepthNet.loss: {len(depth_preds)} depth predictions but '
                             f'{len(gt_depths)} ground-truth levels')
        if not len(depth_preds):
            raise ValueError('DenseDepthNet.loss: no depth levels given')
        levels = len(depth_preds)
        total = None
        with torch.autocast(depth_preds[0].device.type, enabled=False):
            for i, (pred, gt) in enumerate(zip(depth_preds, gt_depths)):
                if pred.dim() != 4 or pred.shape[1] != 1 or gt.numel() != pred.numel() or \
                        tuple(gt.shape[-2:]) != tuple(pred.shape[-2:]):
                    raise ValueError(f'DenseDepthNet.loss: level {i}: prediction '
                                     f'{tuple(pred.shape)} (expected [B * N, 1, h, w]) does not '
                                     f'match ground truth {tuple(gt.shape)} ([B, N, h, w])')
                pred = pred.float().reshape(-1)
                gt = gt.to(pred.device, torch.float32).reshape(-1)
                fg = (gt > 0) & ~torch.isnan(pred)
                # Masking instead of indexing: no host sync, no NaN gradient from masked pixels.
                pred = torch.where(fg, pred, torch.zeros_like(pred)).clamp(0.0, self.max_depth)
                gt = torch.where(fg, gt, torch.zeros_like(gt))
                err = ((pred - gt).abs() * fg).sum()
                count = (fg.sum() * levels).clamp(min=1).float()
                level_loss = err / count * self.loss_weight
                total = level_loss if total is None else total + level_loss
        return total
