"""A small conv net for smoke runs of the training machinery."""
from typing import Dict, List, Optional, Union

import torch
from mmengine.model import BaseModel
from torch import nn

from turbox_mm.registry import MODELS


@MODELS.register_module()
class SmokeModel(BaseModel):
    """Conv-BN-ReLU blocks, global pooling and a linear head, trained with an L2 loss.

    It pairs with :class:`~turbox_mm.testing.SmokeDataset`. It holds batch norm layers so
    that SyncBN conversion and its statistics are exercised, and enough parameters that the
    optimizer, clipping and EMA machinery do real work.

    Args:
        in_channels (int): Channels of the input image. Defaults to 3.
        channels (int): Width of the conv blocks. Defaults to 16.
        num_blocks (int): Number of conv blocks. Defaults to 2.
        data_preprocessor (dict, optional): As for :class:`mmengine.model.BaseModel`.

    Examples:
        >>> model = SmokeModel(channels=8)
        >>> losses = model(torch.rand(2, 3, 16, 16), torch.rand(2, 3), mode='loss')
        >>> sorted(losses)
        ['loss']
    """

    def __init__(self,
                 in_channels: int = 3,
                 channels: int = 16,
                 num_blocks: int = 2,
                 data_preprocessor: Optional[dict] = None) -> None:
        super().__init__(data_preprocessor=data_preprocessor)
        layers = []
        width = in_channels
        for _ in range(num_blocks):
            layers += [
                nn.Conv2d(width, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True)
            ]
            width = channels
        self.backbone = nn.Sequential(*layers)
        self.head = nn.Linear(channels + in_channels, in_channels)

    def forward(self,
                inputs: torch.Tensor,
                data_samples: Optional[torch.Tensor] = None,
                mode: str = 'tensor') -> Union[Dict[str, torch.Tensor], List[dict], torch.Tensor]:
        """Run the network.

        Args:
            inputs (Tensor): Images of shape ``(N, C, H, W)``.
            data_samples (Tensor, optional): Targets of shape ``(N, C)``; needed for
                ``mode='loss'`` and ``mode='predict'``.
            mode (str): ``'loss'``, ``'predict'`` or ``'tensor'``. Defaults to ``'tensor'``.

        Returns:
            dict | list | Tensor: ``{'loss': ...}`` for ``'loss'``; one
            ``{'pred', 'target'}`` dict per sample for ``'predict'``; raw predictions for
            ``'tensor'``.
        """
        if inputs.dim() != 4:
            raise ValueError(f'SmokeModel expects inputs of shape (N, C, H, W), got '
                             f'{tuple(inputs.shape)}')
        feats = self.backbone(inputs).mean(dim=(2, 3))
        pred = self.head(torch.cat([feats, inputs.mean(dim=(2, 3))], dim=1))
        if mode == 'tensor':
            return pred
        if data_samples is None:
            raise ValueError(f"SmokeModel: mode='{mode}' needs data_samples (the targets)")
        if mode == 'loss':
            return dict(loss=nn.functional.mse_loss(pred, data_samples))
        if mode == 'predict':
            return [dict(pred=p.detach(), target=t) for p, t in zip(pred, data_samples)]
        raise ValueError(f"SmokeModel: unknown mode '{mode}'; valid: 'loss', 'predict', "
                         "'tensor'")
