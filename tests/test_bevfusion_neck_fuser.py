"""BEVFusion's GeneralizedLSSFPN and ConvFuser against their definitions."""
import pytest
import torch
import torch.nn.functional as F

from turbox_mm.models.bevfusion import ConvFuser, GeneralizedLSSFPN
from turbox_mm.registry import MODELS

NECK = dict(type='turbox_mm.GeneralizedLSSFPN', in_channels=[12, 24, 48], out_channels=16,
            start_level=0, num_outs=3, norm_cfg=dict(type='BN2d', requires_grad=True),
            act_cfg=dict(type='ReLU', inplace=True),
            upsample_cfg=dict(mode='bilinear', align_corners=False))


def test_neck_concatenates_top_down_as_defined():
    neck = MODELS.build(NECK).eval()
    assert [m.conv.in_channels for m in neck.lateral_convs] == [12 + 16, 24 + 48]
    assert all(m.conv.bias is None for m in neck.lateral_convs)  # conv, BN, ReLU
    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, c, 16 // 2**i, 44 // 2**i, generator=gen)
             for i, c in enumerate([12, 24, 48])]
    outs = neck(feats)
    assert [tuple(o.shape) for o in outs] == [(2, 16, 16, 44), (2, 16, 8, 22)]

    def level(i, finer, coarser):
        up = F.interpolate(coarser, size=finer.shape[2:], mode='bilinear', align_corners=False)
        return neck.fpn_convs[i](neck.lateral_convs[i](torch.cat([finer, up], 1)))

    top = level(1, feats[1], feats[2])
    torch.testing.assert_close(outs[1], top)
    torch.testing.assert_close(outs[0], level(0, feats[0], top))


def test_neck_rejects_a_wrong_number_of_levels():
    neck = MODELS.build(NECK)
    with pytest.raises(ValueError, match='expected 3 levels, got 2'):
        neck([torch.zeros(1, 12, 4, 4), torch.zeros(1, 24, 2, 2)])
    with pytest.raises(ValueError, match='must leave at least two'):
        GeneralizedLSSFPN([12], 16, 1)


def test_fuser_concatenates_camera_then_lidar():
    fuser = ConvFuser([3, 5], 4).eval()
    cam, lidar = torch.randn(2, 3, 6, 6), torch.randn(2, 5, 6, 6)
    conv, bn = fuser[0], fuser[1]
    assert conv.bias is None and conv.kernel_size == (3, 3)
    want = torch.relu(bn(F.conv2d(torch.cat([cam, lidar], 1), conv.weight, padding=1)))
    torch.testing.assert_close(fuser([cam, lidar]), want)
    with pytest.raises(ValueError, match=r'inputs have \[5, 3\] channels, expected \[3, 5\]'):
        fuser([lidar, cam])
