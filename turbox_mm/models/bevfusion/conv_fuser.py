"""``ConvFuser``: BEVFusion's fuser of the camera and lidar BEV maps."""
from typing import List, Sequence

import torch
from torch import Tensor, nn

from turbox_mm.registry import MODELS


@MODELS.register_module()
class ConvFuser(nn.Sequential):
    """Concatenate the BEV maps on channels (camera first in BEVFusion), then a 3 x 3
    convolution without bias, BatchNorm and ReLU.

    Args:
        in_channels (Sequence[int]): Channels of each input (80 camera, 256 lidar).
        out_channels (int): Output channels (256).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        super().__init__(
            nn.Conv2d(sum(self.in_channels), out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(True))

    def forward(self, inputs: List[Tensor]) -> Tensor:
        """``inputs``: the BEV maps, ``[B, C_i, X, Y]`` each, in ``in_channels``' order."""
        channels = [int(x.shape[1]) for x in inputs]
        if channels != self.in_channels:
            raise ValueError(f'ConvFuser: inputs have {channels} channels, expected '
                             f'{self.in_channels}')
        return super().forward(torch.cat(inputs, dim=1))
