"""SparseDrive's per-layer map head: refined polyline points and class logits."""
import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from turbox_mm.models.sparse4d.anchor_encoder import linear_relu_ln
from turbox_mm.registry import MODELS


@MODELS.register_module()
class SparsePoint3DRefinementModule(nn.Module):
    """Refine polyline anchors from instance features; predict class logits.

    ``f = instance_feature + anchor_embed``; ``points = scale * layers(f) + anchor``: an
    absolute update in metres of all ``num_sample * coords_dim`` coordinates, with no sigmoid
    and no clamp. ``layers`` is two blocks of (Linear, ReLU, Linear, ReLU, LayerNorm) and a
    Linear to ``num_sample * coords_dim``; ``scale`` is a learnable per-coordinate factor
    starting at 1 (upstream's mmcv ``Scale`` given a list, the last module of its ``layers``;
    here a parameter of its own, as in
    :class:`~turbox_mm.models.sparse4d.refinement.SparseBox3DRefinementModule`). Class logits
    come from the instance feature alone: two (Linear, ReLU, LayerNorm) blocks and a Linear
    to ``num_cls``, bias at the logit of 0.01. There is no quality branch: the third output is
    always None (docs/design/sparsedrive.md, section 4).

    The call signature is the box refinement's, so that
    :class:`~turbox_mm.models.sparse4d.sparse4d_head.Sparse4DHead` drives either;
    ``time_interval`` is accepted and unused (map elements do not move).

    Args:
        embed_dims (int): Feature size. Defaults to 256.
        num_sample (int): Points per polyline. Defaults to 20.
        coords_dim (int): Coordinates per point. Defaults to 2.
        num_cls (int): Map classes. Defaults to 3.
        with_cls_branch (bool): Build the class branch. Defaults to True.

    Examples:
        >>> ref = SparsePoint3DRefinementModule(embed_dims=16)
        >>> pts, cls, qt = ref(torch.randn(2, 5, 16), torch.zeros(2, 5, 40),
        ...                    torch.zeros(2, 5, 16))
        >>> pts.shape, cls.shape, qt
        (torch.Size([2, 5, 40]), torch.Size([2, 5, 3]), None)
    """

    def __init__(self,
                 embed_dims: int = 256,
                 num_sample: int = 20,
                 coords_dim: int = 2,
                 num_cls: int = 3,
                 with_cls_branch: bool = True) -> None:
        super().__init__()
        if num_sample < 1 or coords_dim < 1 or num_cls < 1:
            raise ValueError(f'SparsePoint3DRefinementModule: num_sample, coords_dim and '
                             f'num_cls must be >= 1, got {num_sample}, {coords_dim} and '
                             f'{num_cls}')
        self.embed_dims = embed_dims
        self.num_sample = num_sample
        self.coords_dim = coords_dim
        self.output_dim = num_sample * coords_dim
        self.num_cls = num_cls
        self.layers = nn.Sequential(*linear_relu_ln(embed_dims, 2, 2, embed_dims),
                                    nn.Linear(embed_dims, self.output_dim))
        self.scale = nn.Parameter(torch.ones(self.output_dim))
        self.with_cls_branch = with_cls_branch
        self.cls_layers = (nn.Sequential(*linear_relu_ln(embed_dims, 1, 2, embed_dims),
                                         nn.Linear(embed_dims, num_cls))
                           if with_cls_branch else None)
        self.init_weights()

    def init_weights(self) -> None:
        """Class bias at the logit of 0.01, ``-log(99)`` (mmcv's ``bias_init_with_prob``), as
        upstream; every other layer keeps PyTorch's default initialisation (upstream's head
        skips the refinement layers in its xavier pass, and so does ours)."""
        if self.cls_layers is not None:
            nn.init.constant_(self.cls_layers[-1].bias, -math.log((1 - 0.01) / 0.01))

    def forward(self,
                instance_feature: Tensor,
                anchor: Tensor,
                anchor_embed: Tensor,
                time_interval: Union[Tensor, float] = 1.0,
                return_cls: bool = True) -> Tuple[Tensor, Optional[Tensor], None]:
        """Refine the polyline anchors.

        Args:
            instance_feature (Tensor): ``[B, M, C]``.
            anchor (Tensor): ``[B, M, num_sample * coords_dim]`` points in metres.
            anchor_embed (Tensor): ``[B, M, C]``.
            time_interval (Tensor | float): Unused. Defaults to 1.0.
            return_cls (bool): Also predict class logits. Defaults to True.

        Returns:
            tuple: ``points [B, M, num_sample * coords_dim]``, ``cls [B, M, num_cls]`` (None
            unless ``return_cls``), and None (no quality estimate).

        Raises:
            ValueError: Shapes that do not fit, or ``return_cls`` without a class branch.
        """
        if (anchor.shape[-1] != self.output_dim
                or anchor.shape[:-1] != instance_feature.shape[:-1]):
            raise ValueError(f'SparsePoint3DRefinementModule: anchor must be [B, M, '
                             f'{self.output_dim}] matching instance_feature '
                             f'{tuple(instance_feature.shape)}, got {tuple(anchor.shape)}')
        if anchor_embed.shape != instance_feature.shape:
            raise ValueError(f'SparsePoint3DRefinementModule: anchor_embed must have the shape '
                             f'of instance_feature {tuple(instance_feature.shape)}, got '
                             f'{tuple(anchor_embed.shape)}')
        points = self.layers(instance_feature + anchor_embed) * self.scale + anchor
        cls = None
        if return_cls:
            if self.cls_layers is None:
                raise ValueError('SparsePoint3DRefinementModule: return_cls=True needs '
                                 'with_cls_branch=True')
            cls = self.cls_layers(instance_feature)
        return points, cls, None
