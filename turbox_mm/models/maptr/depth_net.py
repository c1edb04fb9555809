"""MapTR v2's camera-aware ``DepthNet`` (BEVDepth style) and its parts: upstream
``maptr/modules/encoder.py`` @ 69ab751 (``Mlp``, ``SELayer``, ``DepthNet``, ``_ASPPModule``,
``ASPP``); docs/design/maptr.md, section 3.2.

``DepthNet`` turns image features ``[B * N, C_in, fH, fW]`` and 22 camera numbers per image
(:meth:`~turbox_mm.models.maptr.LSSTransform.get_mlp_input`) into ``D`` depth logits followed by
``C`` context channels:

- the 22 numbers through ``BatchNorm1d(22)``;
- ``reduce_conv``: 3x3 convolution (with bias) to ``mid`` channels, BN, ReLU;
- context: ``Mlp(22 -> mid -> mid)`` of the numbers gates the features (:class:`SELayer`), a
  1x1 convolution gives ``C`` channels;
- depth: another ``Mlp`` and :class:`SELayer`, three of mmdet's ``BasicBlock`` (the same block
  as mmdet 2.x's that upstream uses: 3x3 conv, BN, ReLU, 3x3 conv, BN, identity, ReLU),
  :class:`ASPP`, optionally mmcv's deformable convolution (``use_dcn``), a 1x1 convolution to
  ``D`` channels.

Module and parameter names are upstream's, so upstream checkpoints load as they are.
Initialisation as upstream's constructors: PyTorch's defaults, Kaiming-normal convolutions and
unit BN inside the ASPP (MapTR's transformer then re-initialises every matrix Xavier-uniform:
:meth:`~turbox_mm.models.maptr.LSSTransform.init_weights`).

Deviation: upstream's ``with_cp`` branch calls a ``checkpoint`` function it never imports (a
``NameError``); here it is ``torch.utils.checkpoint`` (non-reentrant). Its configs set
``with_cp=False``.
"""
from typing import Optional, Type

import torch
import torch.nn.functional as F
from mmdet.models.backbones.resnet import BasicBlock
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

#: The camera numbers per image the MLPs read (fx, fy, cx, cy; six of the augmentation;
#: the top three rows of ``camera2ego``).
MLP_INPUT_CHANNELS = 22


class Mlp(nn.Module):
    """Two linear layers with an activation and dropout after each.

    Args:
        in_features (int): Input width.
        hidden_features (int, optional): Defaults to ``in_features``.
        out_features (int, optional): Defaults to ``in_features``.
        act_layer (type): Activation class. Defaults to ``nn.ReLU``.
        drop (float): Dropout probability. Defaults to 0.

    Examples:
        >>> Mlp(22, 8, 4)(torch.zeros(3, 22)).shape
        torch.Size([3, 4])
    """

    def __init__(self, in_features: int, hidden_features: Optional[int] = None,
                 out_features: Optional[int] = None, act_layer: Type[nn.Module] = nn.ReLU,
                 drop: float = 0.0) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class SELayer(nn.Module):
    """Squeeze-and-excitation gate from an external vector: ``x * sigmoid(W2 relu(W1 v))``.

    Args:
        channels (int): Channels of ``x`` and of the gate vector.
        act_layer (type): Defaults to ``nn.ReLU``.
        gate_layer (type): Defaults to ``nn.Sigmoid``.

    Examples:
        >>> SELayer(4)(torch.ones(2, 4, 3, 3), torch.zeros(2, 4, 1, 1)).shape
        torch.Size([2, 4, 3, 3])
    """

    def __init__(self, channels: int, act_layer: Type[nn.Module] = nn.ReLU,
                 gate_layer: Type[nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, channels, 1, bias=True)
        self.act1 = act_layer()
        self.conv_expand = nn.Conv2d(channels, channels, 1, bias=True)
        self.gate = gate_layer()

    def forward(self, x: Tensor, x_se: Tensor) -> Tensor:
        """``x [M, C, H, W]`` gated by ``x_se [M, C, 1, 1]``."""
        return x * self.gate(self.conv_expand(self.act1(self.conv_reduce(x_se))))


def _init_kaiming(module: nn.Module) -> None:
    """Upstream's ASPP init: Kaiming-normal convolutions (PyTorch's default arguments), BN
    weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()


class ASPPModule(nn.Module):
    """One ASPP branch: (dilated) convolution without bias, BN, ReLU (upstream's
    ``_ASPPModule``).

    Args:
        inplanes (int): Input channels.
        planes (int): Output channels.
        kernel_size (int): 1 or 3.
        padding (int): Padding.
        dilation (int): Dilation.
        norm_layer (type): Defaults to ``nn.BatchNorm2d``.
    """

    def __init__(self, inplanes: int, planes: int, kernel_size: int, padding: int,
                 dilation: int, norm_layer: Type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.atrous_conv = nn.Conv2d(inplanes, planes, kernel_size=kernel_size, stride=1,
                                     padding=padding, dilation=dilation, bias=False)
        self.bn = norm_layer(planes)
        self.relu = nn.ReLU()
        _init_kaiming(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.atrous_conv(x)))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: branches of dilation 1 (1x1), 6, 12, 18 (3x3) and a
    global average, each to ``mid_channels``, concatenated, 1x1 back to ``inplanes``, BN,
    ReLU, dropout 0.5.

    Args:
        inplanes (int): Input and output channels.
        mid_channels (int): Channels of each branch. Defaults to 256.
        norm_layer (type): Defaults to ``nn.BatchNorm2d``.
        broadcast_pool (bool): Spread the global average over the map by broadcasting instead
            of upstream's ``F.interpolate`` of the 1x1 map (bilinear, ``align_corners=True``):
            the same values forward for finite inputs (each output takes the single pixel with
            weight 1; an infinite average stays infinite, where the interpolation makes NaN);
            backward a reduction, where the interpolation's CUDA kernel adds every output's
            gradient atomically into one pixel per image and channel. Defaults to False
            (upstream's call; the turbox path sets it).

    Examples:
        >>> ASPP(8, 4).eval()(torch.zeros(2, 8, 5, 7)).shape
        torch.Size([2, 8, 5, 7])
    """

    DILATIONS = (1, 6, 12, 18)

    def __init__(self, inplanes: int, mid_channels: int = 256,
                 norm_layer: Type[nn.Module] = nn.BatchNorm2d,
                 broadcast_pool: bool = False) -> None:
        super().__init__()
        self.broadcast_pool = bool(broadcast_pool)
        d1, d6, d12, d18 = self.DILATIONS
        self.aspp1 = ASPPModule(inplanes, mid_channels, 1, padding=0, dilation=d1,
                                norm_layer=norm_layer)
        self.aspp2 = ASPPModule(inplanes, mid_channels, 3, padding=d6, dilation=d6,
                                norm_layer=norm_layer)
        self.aspp3 = ASPPModule(inplanes, mid_channels, 3, padding=d12, dilation=d12,
                                norm_layer=norm_layer)
        self.aspp4 = ASPPModule(inplanes, mid_channels, 3, padding=d18, dilation=d18,
                                norm_layer=norm_layer)
        self.global_avg_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d((1, 1)),
            nn.Conv2d(inplanes, mid_channels, 1, stride=1, bias=False),
            norm_layer(mid_channels), nn.ReLU())
        self.conv1 = nn.Conv2d(int(mid_channels * 5), inplanes, 1, bias=False)
        self.bn1 = norm_layer(inplanes)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.5)
        _init_kaiming(self)

    def forward(self, x: Tensor) -> Tensor:
        x4 = self.aspp4(x)
        pooled = self.global_avg_pool(x)
        if self.broadcast_pool:
            pooled = pooled.expand(-1, -1, *x4.shape[2:])
        else:
            pooled = F.interpolate(pooled, size=x4.shape[2:], mode='bilinear',
                                   align_corners=True)
        x = torch.cat((self.aspp1(x), self.aspp2(x), self.aspp3(x), x4, pooled), dim=1)
        return self.dropout(self.relu(self.bn1(self.conv1(x))))


def _deformable_conv(channels: int) -> nn.Module:
    """Upstream's ``DCN`` layer (mmcv's ``DeformConv2dPack``, 3x3, groups 4)."""
    from mmcv.ops import DeformConv2dPack  # compiled ops: only needed with use_dcn
    return DeformConv2dPack(channels, channels, kernel_size=3, padding=1, groups=4,
                            im2col_step=128)


class DepthNet(nn.Module):
    """Camera-aware depth and context network (module docstring).

    Args:
        in_channels (int): Image feature channels.
        mid_channels (int): Width inside (MapTR: ``in_channels``).
        context_channels (int): Context channels ``C`` (0: depth only).
        depth_channels (int): Depth bins ``D``.
        use_dcn (bool): Deformable convolution after the ASPP. Defaults to True (upstream's
            default; MapTR v2's config sets False).
        use_aspp (bool): Defaults to True.
        with_cp (bool): Gradient checkpointing of the depth branch. Defaults to False.
        aspp_mid_channels (int): ASPP branch width; negative: ``mid_channels``. Defaults to -1
            (MapTR v2's config: 96).
        only_depth (bool): No context branch. Defaults to False.
        aspp_broadcast_pool (bool): :class:`ASPP`'s ``broadcast_pool``. Defaults to False.

    Examples:
        >>> net = DepthNet(16, 16, 8, 5, use_dcn=False, aspp_mid_channels=4).eval()
        >>> net(torch.zeros(2, 16, 3, 4), torch.zeros(2, 22)).shape
        torch.Size([2, 13, 3, 4])
    """

    def __init__(self, in_channels: int, mid_channels: int, context_channels: int,
                 depth_channels: int, use_dcn: bool = True, use_aspp: bool = True,
                 with_cp: bool = False, aspp_mid_channels: int = -1,
                 only_depth: bool = False, aspp_broadcast_pool: bool = False) -> None:
        super().__init__()
        self.reduce_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm2d(mid_channels), nn.ReLU(inplace=True))
        self.only_depth = only_depth or context_channels == 0
        if not self.only_depth:
            self.context_conv = nn.Conv2d(mid_channels, context_channels, kernel_size=1)
            self.context_mlp = Mlp(MLP_INPUT_CHANNELS, mid_channels, mid_channels)
            self.context_se = SELayer(mid_channels)
        self.bn = nn.BatchNorm1d(MLP_INPUT_CHANNELS)
        self.depth_mlp = Mlp(MLP_INPUT_CHANNELS, mid_channels, mid_channels)
        self.depth_se = SELayer(mid_channels)
        layers = [BasicBlock(mid_channels, mid_channels) for _ in range(3)]
        if use_aspp:
            layers.append(ASPP(mid_channels,
                               mid_channels if aspp_mid_channels < 0 else aspp_mid_channels,
                               broadcast_pool=aspp_broadcast_pool))
        if use_dcn:
            layers.append(_deformable_conv(mid_channels))
        layers.append(nn.Conv2d(mid_channels, depth_channels, kernel_size=1))
        self.depth_conv = nn.Sequential(*layers)
        self.with_cp = with_cp

    def forward(self, x: Tensor, mlp_input: Tensor) -> Tensor:
        """``x [M, C_in, fH, fW]`` and ``mlp_input [..., 22]`` (``M`` rows in all) to
        ``[M, D + C, fH, fW]``: the depth logits first, then the context."""
        mlp_input = self.bn(mlp_input.reshape(-1, mlp_input.shape[-1]))
        x = self.reduce_conv(x)
        if not self.only_depth:  # upstream's order (the context first)
            context = self.context_conv(
                self.context_se(x, self.context_mlp(mlp_input)[..., None, None]))
        depth = self.depth_se(x, self.depth_mlp(mlp_input)[..., None, None])
        if self.with_cp and depth.requires_grad:
            depth = checkpoint(self.depth_conv, depth, use_reentrant=False)
        else:
            depth = self.depth_conv(depth)
        if self.only_depth:
            return depth
        return torch.cat([depth, context], dim=1)
