"""``BEVFusionSparseEncoder``: BEVFusion's lidar sparse encoder, in (x, y, z) order."""
from typing import Sequence

from mmdet3d.models.layers import make_sparse_convmodule
from mmdet3d.models.layers.spconv import IS_SPCONV2_AVAILABLE
from mmdet3d.models.middle_encoders import SparseEncoder
from torch import Tensor

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
        **kwargs: ``SparseEncoder``'s (``order``, ``norm_cfg``, ``base_channels``,
            ``output_channels``, ``encoder_channels``, ``encoder_paddings``, ``block_type``).
    """

    def __init__(self, in_channels: int, sparse_shape: Sequence[int], **kwargs) -> None:
        if kwargs.get('return_middle_feats'):
            raise ValueError('BEVFusionSparseEncoder: return_middle_feats is not supported')
        super().__init__(in_channels, list(sparse_shape), **kwargs)
        norm_cfg = kwargs.get('norm_cfg', dict(type='BN1d', eps=1e-3, momentum=0.01))
        self.conv_out = make_sparse_convmodule(
            self.conv_out[0].in_channels, self.output_channels, kernel_size=(1, 1, 3),
            stride=(1, 1, 2), norm_cfg=norm_cfg, padding=0, indice_key='spconv_down2',
            conv_type='SparseConv3d')

    def forward(self, voxel_features: Tensor, coors: Tensor, batch_size: int) -> Tensor:
        """``[M, C]`` voxel features at ``(batch, x, y, z)`` -> ``[B, C_out * Z', X', Y']``."""
        x = SparseConvTensor(voxel_features, coors.int(), self.sparse_shape, batch_size)
        x = self.conv_input(x)
        for layer in self.encoder_layers:
            x = layer(x)
        dense = self.conv_out(x).dense()  # [B, C, X', Y', Z']
        batch, channels, xs, ys, zs = dense.shape
        return dense.permute(0, 1, 4, 2, 3).reshape(batch, channels * zs, xs, ys)
