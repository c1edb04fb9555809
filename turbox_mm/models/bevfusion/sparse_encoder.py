"""``BEVFusionSparseEncoder``: BEVFusion's lidar sparse encoder, in (x, y, z) order."""
from typing import Sequence, Tuple

from mmdet3d.models.layers import make_sparse_convmodule
from mmdet3d.models.layers.spconv import IS_SPCONV2_AVAILABLE
from mmdet3d.models.middle_encoders import SparseEncoder
from torch import Tensor, nn

from turbox_mm.registry import MODELS

if IS_SPCONV2_AVAILABLE:
    from spconv.pytorch import SparseConvTensor
else:
    from mmcv.ops import SparseConvTensor


@MODELS.register_module()
class BEVFusionSparseEncoder(SparseEncoder):
    """mmdet3d's ``SparseEncoder`` with BEVFusion's axis order: voxel coordinates ``(batch, x,
    y, z)``, ``sparse_shape`` ``[X, Y, Z]`` (``[1440, 1440, 41]``), the last convolution
    across z (kernel ``(1, 1, 3)``, stride ``(1, 1, 2)``), and the dense output ``[B, C * Z',
    X', Y']`` with channel ``c * Z' + z`` and the height axis along x. mmdet3d's own encoder
    has ``(z, y, x)`` and the height axis along y. Unlike it, no autocast guard: under AMP the
    sparse convolutions are not forced to float32 (as upstream).

    Args:
        in_channels (int): Voxel feature channels (5).
        sparse_shape (Sequence[int]): ``[X, Y, Z]``.
        order, norm_cfg, base_channels, output_channels, encoder_channels,
            encoder_paddings, block_type: As mmdet3d's ``SparseEncoder``.
    """

    def __init__(self, in_channels: int, sparse_shape: Sequence[int],
                 order: Tuple[str, ...] = ('conv', 'norm', 'act'),
                 norm_cfg: dict = dict(type='BN1d', eps=1e-3, momentum=0.01),
                 base_channels: int = 16, output_channels: int = 128,
                 encoder_channels=((16, ), (32, 32, 32), (64, 64, 64), (64, 64, 64)),
                 encoder_paddings=((1, ), (1, 1, 1), (1, 1, 1), ((0, 1, 1), 1, 1)),
                 block_type: str = 'conv_module') -> None:
        # Built as upstream builds it (nn.Module's constructor, then its layers in its
        # order), not through SparseEncoder's: the same random draws, the same initial weights.
        nn.Module.__init__(self)
        if block_type not in ('conv_module', 'basicblock'):
            raise ValueError(f"BEVFusionSparseEncoder: block_type must be 'conv_module' or "
                             f"'basicblock', got {block_type!r}")
        if not (isinstance(order, tuple) and len(order) == 3 and
                set(order) == {'conv', 'norm', 'act'}):
            raise ValueError(f"BEVFusionSparseEncoder: order must order 'conv', 'norm' and "
                             f"'act', got {order!r}")
        self.sparse_shape = list(sparse_shape)
        self.in_channels = in_channels
        self.order = order
        self.base_channels = base_channels
        self.output_channels = output_channels
        self.encoder_channels = encoder_channels
        self.encoder_paddings = encoder_paddings
        self.stage_num = len(encoder_channels)
        self.return_middle_feats = False
        self.conv_input = make_sparse_convmodule(
            in_channels, base_channels, 3, norm_cfg=norm_cfg, padding=1, indice_key='subm1',
            conv_type='SubMConv3d', **({} if order[0] == 'conv' else dict(order=('conv', ))))
        encoder_out_channels = self.make_encoder_layers(make_sparse_convmodule, norm_cfg,
                                                        base_channels, block_type=block_type)
        self.conv_out = make_sparse_convmodule(
            encoder_out_channels, output_channels, kernel_size=(1, 1, 3), stride=(1, 1, 2),
            norm_cfg=norm_cfg, padding=0, indice_key='spconv_down2', conv_type='SparseConv3d')

    def forward(self, voxel_features: Tensor, coors: Tensor, batch_size: int) -> Tensor:
        """``[M, C]`` voxel features at ``(batch, x, y, z)`` -> ``[B, C_out * Z', X', Y']``."""
        x = SparseConvTensor(voxel_features, coors.int(), self.sparse_shape, batch_size)
        x = self.conv_input(x)
        for layer in self.encoder_layers:
            x = layer(x)
        dense = self.conv_out(x).dense()  # [B, C, X', Y', Z']
        batch, channels, xs, ys, zs = dense.shape
        return dense.permute(0, 1, 4, 2, 3).reshape(batch, channels * zs, xs, ys)
