"""Sparse4D's anchor embedding: one small MLP per part of the box state, concatenated."""
from typing import Sequence, Tuple

import torch
from torch import Tensor, nn

from turbox_mm.registry import MODELS
from .box3d import COS_YAW, SIN_YAW, SIZE_X, SIZE_Z, VX, X, Z


def linear_relu_ln(embed_dims: int, in_loops: int, out_loops: int,
                   input_dims: int) -> nn.Sequential:
    """``out_loops`` times: ``in_loops`` x (Linear, ReLU), then LayerNorm.

    Only the first Linear takes ``input_dims`` features.

    Examples:
        >>> linear_relu_ln(8, 1, 2, 3)(torch.zeros(4, 3)).shape
        torch.Size([4, 8])
    """
    layers, dims = [], input_dims
    for _ in range(out_loops):
        for _ in range(in_loops):
            layers += [nn.Linear(dims, embed_dims), nn.ReLU(inplace=True)]
            dims = embed_dims
        layers.append(nn.LayerNorm(embed_dims))
    return nn.Sequential(*layers)


def encode_at_once(encoder: nn.Module, *parts: Tensor) -> Tuple[Tensor, ...]:
    """``encoder`` of each of ``parts`` (``[B, n_i, D]``) from one call over their
    concatenation along dim 1, split back: the same rows as one call per part where the
    encoder embeds each anchor on its own (an MLP per row, as the anchor encoders here), with
    the launches of one call, forward and backward.

    Examples:
        >>> enc = SparseBox3DEncoder()
        >>> a, b = torch.randn(2, 5, 11), torch.randn(2, 3, 11)
        >>> ea, eb = encode_at_once(enc, a, b)
        >>> torch.allclose(ea, enc(a), atol=1e-6), torch.allclose(eb, enc(b), atol=1e-6)
        (True, True)
    """
    both = encoder(torch.cat([p.to(parts[0].dtype) for p in parts], dim=1))
    return both.split([p.shape[1] for p in parts], dim=1)


@MODELS.register_module()
class SparseBox3DEncoder(nn.Module):
    """Embed ``[..., 11]`` box states as ``[..., sum(embed_dims)]`` features.

    Position (x, y, z), log sizes, (sin, cos) of yaw and velocity each go through their own
    :func:`linear_relu_ln` stack; the four embeddings are concatenated (Sparse4D v3's
    ``mode='cat'``, 128 + 32 + 32 + 64 = 256 features).

    Args:
        embed_dims (Sequence[int]): Sizes of the position, size, yaw and velocity embeddings.
            Defaults to (128, 32, 32, 64).
        vel_dims (int): Velocity components used (2 or 3). Defaults to 3.
        in_loops (int): Linear+ReLU pairs per block. Defaults to 1.
        out_loops (int): Blocks. Defaults to 4.

    Examples:
        >>> SparseBox3DEncoder()(torch.zeros(2, 5, 11)).shape
        torch.Size([2, 5, 256])
    """

    def __init__(self,
                 embed_dims: Sequence[int] = (128, 32, 32, 64),
                 vel_dims: int = 3,
                 in_loops: int = 1,
                 out_loops: int = 4) -> None:
        super().__init__()
        if len(embed_dims) != 4:
            raise ValueError(f'SparseBox3DEncoder: embed_dims needs 4 sizes (position, size, '
                             f'yaw, velocity), got {tuple(embed_dims)}')
        if vel_dims not in (2, 3):
            raise ValueError(f'SparseBox3DEncoder: vel_dims must be 2 or 3, got {vel_dims}')
        self.vel_dims = vel_dims
        self.embed_dims = sum(embed_dims)
        pos, size, yaw, vel = embed_dims
        self.pos_fc = linear_relu_ln(pos, in_loops, out_loops, 3)
        self.size_fc = linear_relu_ln(size, in_loops, out_loops, 3)
        self.yaw_fc = linear_relu_ln(yaw, in_loops, out_loops, 2)
        self.vel_fc = linear_relu_ln(vel, in_loops, out_loops, vel_dims)

    def forward(self, box_3d: Tensor) -> Tensor:
        """Embed box states.

        Args:
            box_3d (Tensor): ``[..., 11]``.

        Returns:
            Tensor: ``[..., sum(embed_dims)]``.
        """
        return torch.cat([
            self.pos_fc(box_3d[..., X:Z + 1]),
            self.size_fc(box_3d[..., SIZE_X:SIZE_Z + 1]),
            self.yaw_fc(box_3d[..., SIN_YAW:COS_YAW + 1]),  # a slice: no index upload
            self.vel_fc(box_3d[..., VX:VX + self.vel_dims]),
        ], dim=-1)
