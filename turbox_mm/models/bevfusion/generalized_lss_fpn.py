"""``GeneralizedLSSFPN``: BEVFusion's camera neck (mmdet3d 1.4 ``projects/BEVFusion``)."""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmengine.model import BaseModule
from torch import Tensor, nn

from turbox_mm.registry import MODELS


@MODELS.register_module()
class GeneralizedLSSFPN(BaseModule):
    """A top-down neck that concatenates instead of adding.

    From the coarsest level down, the level above is resized to this level's size
    (``upsample_cfg``), concatenated to it, and passed through a 1 x 1 and a 3 x 3
    ``ConvModule``; the coarsest backbone level is only an input (BEVFusion: Swin-T's 192,
    384 and 768 channels at strides 8, 16, 32 become two 256-channel maps; the detector uses
    the first). ``num_outs`` is kept for the config's signature, as upstream, whose neck also
    returns one map fewer than its levels.

    Args:
        in_channels (Sequence[int]): Channels of the backbone levels.
        out_channels (int): Channels of every output.
        num_outs (int): Upstream's argument; not used to build anything.
        start_level (int): The first backbone level used. Defaults to 0.
        end_level (int): One past the last level used (-1: all of them). Defaults to -1.
            (Upstream's forward ignores its ``end_level``, so only -1 means the same there.)
        no_norm_on_lateral (bool): No norm in the 1 x 1 convolutions. Defaults to False.
        conv_cfg, norm_cfg, act_cfg (dict, optional): For the ``ConvModule``s (norm: BN2d
            by default, as upstream).
        upsample_cfg (dict): ``F.interpolate`` arguments. Defaults to bilinear with
            ``align_corners=True`` (BEVFusion's config sets False).
        init_cfg (dict, optional): mmengine's.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, num_outs: int,
                 start_level: int = 0, end_level: int = -1, no_norm_on_lateral: bool = False,
                 conv_cfg: Optional[dict] = None, norm_cfg: Optional[dict] = dict(type='BN2d'),
                 act_cfg: Optional[dict] = dict(type='ReLU'),
                 upsample_cfg: dict = dict(mode='bilinear', align_corners=True),
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.num_outs = num_outs
        self.upsample_cfg = dict(upsample_cfg)
        self.end_level = len(self.in_channels) if end_level == -1 else end_level
        if not 0 <= start_level < self.end_level - 1 or self.end_level > len(self.in_channels):
            raise ValueError(f'GeneralizedLSSFPN: levels {start_level}..{end_level} of '
                             f'{len(self.in_channels)} must leave at least two')
        self.start_level = start_level
        self.lateral_convs = nn.ModuleList()
        self.fpn_convs = nn.ModuleList()
        for i in range(start_level, self.end_level - 1):
            above = self.in_channels[i + 1] if i == self.end_level - 2 else out_channels
            self.lateral_convs.append(ConvModule(
                self.in_channels[i] + above, out_channels, 1, conv_cfg=conv_cfg,
                norm_cfg=norm_cfg if not no_norm_on_lateral else None, act_cfg=act_cfg,
                inplace=False))
            self.fpn_convs.append(ConvModule(out_channels, out_channels, 3, padding=1,
                                             conv_cfg=conv_cfg, norm_cfg=norm_cfg,
                                             act_cfg=act_cfg, inplace=False))

    def forward(self, inputs: Sequence[Tensor]) -> Tuple[Tensor, ...]:
        """Backbone levels (finest first) to ``end_level - start_level - 1`` maps."""
        if len(inputs) != len(self.in_channels):
            raise ValueError(f'GeneralizedLSSFPN: expected {len(self.in_channels)} levels, got '
                             f'{len(inputs)}')
        levels: List[Tensor] = list(inputs[self.start_level:self.end_level])
        for i in range(len(levels) - 2, -1, -1):
            above = F.interpolate(levels[i + 1], size=levels[i].shape[2:], **self.upsample_cfg)
            merged = torch.cat([levels[i], above], 1)
            levels[i] = self.fpn_convs[i](self.lateral_convs[i](merged))
        return tuple(levels[:-1])
