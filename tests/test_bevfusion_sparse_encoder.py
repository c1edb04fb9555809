"""BEVFusion's lidar sparse encoder: (x, y, z) order, shapes, CPU training (turbox_mm's CPU
path of mmcv's sparse convolution)."""
import torch

from turbox_mm.registry import MODELS

ENCODER = dict(type='turbox_mm.BEVFusionSparseEncoder', in_channels=5, sparse_shape=[64, 64, 41],
               order=('conv', 'norm', 'act'),
               norm_cfg=dict(type='BN1d', eps=1e-3, momentum=0.01),
               encoder_channels=((16, 16, 32), (32, 32, 64), (64, 64, 128), (128, 128)),
               encoder_paddings=((0, 0, 1), (0, 0, 1), (0, 0, (1, 1, 0)), (0, 0)),
               block_type='basicblock')


def test_layers_and_shapes_follow_bevfusions_axis_order():
    enc = MODELS.build(ENCODER)
    conv = enc.conv_out[0]
    assert tuple(conv.kernel_size) == (1, 1, 3) and tuple(conv.stride) == (1, 1, 2)
    gen = torch.Generator().manual_seed(0)
    coors = torch.unique(torch.cat([torch.randint(0, 2, (600, 1), generator=gen),
                                    torch.randint(0, 64, (600, 2), generator=gen),
                                    torch.randint(0, 41, (600, 1), generator=gen)], 1), dim=0)
    out = enc(torch.randn(coors.shape[0], 5, generator=gen), coors.int(), 2)
    assert out.shape == (2, 256, 8, 8)  # 128 channels x 2 z cells, 64 / 8 in x and y
    out.mean().backward()
    assert all(p.grad is not None for p in enc.parameters() if p.requires_grad)


def test_the_height_axis_of_the_output_is_x():
    enc = MODELS.build(ENCODER).eval()
    # voxels near x = 0 and y = 63 only: the output is non-zero at small x' and large y'
    coors = torch.tensor([[0, x, y, z] for x in range(3) for y in range(60, 64)
                          for z in range(18, 22)], dtype=torch.int32)
    with torch.no_grad():
        out = enc(torch.ones(coors.shape[0], 5), coors, 1)
    energy = out.abs().sum(1)[0]  # [X', Y']
    assert energy[:2, -2:].sum() > 0 and energy[-2:, :2].sum() == 0
