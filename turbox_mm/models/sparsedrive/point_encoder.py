"""SparseDrive's map anchor embedding: one MLP over the flattened polyline points."""
from torch import Tensor, nn

from turbox_mm.models.sparse4d.anchor_encoder import linear_relu_ln
from turbox_mm.registry import MODELS


@MODELS.register_module()
class SparsePoint3DEncoder(nn.Module):
    """Embed map anchors ``[..., num_sample * coords_dim]`` as ``[..., embed_dims]`` features.

    The anchor is a polyline of ``num_sample`` points in metres (lidar frame), flattened with
    the coordinates of each point next to each other (``x0, y0, x1, y1, ...``). It goes through
    two blocks of (Linear, ReLU, LayerNorm), ``num_sample * coords_dim -> embed_dims ->
    embed_dims``, as upstream's ``SparsePoint3DEncoder`` (docs/design/sparsedrive.md,
    section 4). The raw metric values go in; nothing is normalised first.

    This is the map head's counterpart of
    :class:`~turbox_mm.models.sparse4d.anchor_encoder.SparseBox3DEncoder`: the head calls
    ``encoder(anchor)`` on either.

    Args:
        embed_dims (int): Output feature size. Defaults to 256.
        num_sample (int): Points per polyline. Defaults to 20.
        coords_dim (int): Coordinates per point. Defaults to 2.

    Examples:
        >>> import torch
        >>> SparsePoint3DEncoder(embed_dims=16)(torch.zeros(2, 5, 40)).shape
        torch.Size([2, 5, 16])
    """

    def __init__(self, embed_dims: int = 256, num_sample: int = 20, coords_dim: int = 2) -> None:
        super().__init__()
        if num_sample < 1 or coords_dim < 1:
            raise ValueError(f'SparsePoint3DEncoder: num_sample and coords_dim must be >= 1, '
                             f'got {num_sample} and {coords_dim}')
        self.embed_dims = embed_dims
        self.num_sample = num_sample
        self.coords_dim = coords_dim
        self.input_dims = num_sample * coords_dim
        self.pos_fc = linear_relu_ln(embed_dims, 1, 2, self.input_dims)

    def forward(self, anchor: Tensor) -> Tensor:
        """Embed map anchors.

        Args:
            anchor (Tensor): ``[..., num_sample * coords_dim]`` flattened polyline points.

        Returns:
            Tensor: ``[..., embed_dims]``.

        Raises:
            ValueError: The last dimension of ``anchor`` is not ``num_sample * coords_dim``.
        """
        if anchor.shape[-1] != self.input_dims:
            raise ValueError(f'SparsePoint3DEncoder: anchor must be [..., {self.input_dims}] '
                             f'(num_sample {self.num_sample} x coords_dim {self.coords_dim}), '
                             f'got {tuple(anchor.shape)}')
        return self.pos_fc(anchor)
