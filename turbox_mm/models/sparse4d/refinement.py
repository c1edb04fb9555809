"""Sparse4D's per-layer head: refined box state, class logits and quality logits."""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from turbox_mm.registry import MODELS
from .anchor_encoder import linear_relu_ln
from .box3d import COS_YAW, SIN_YAW, SIZE_Z, VX


def _bias_with_prob(prior_prob: float) -> float:
    """The logit of ``prior_prob`` (mmcv's ``bias_init_with_prob``): ``-log((1 - p) / p)``."""
    return float(-math.log((1 - prior_prob) / prior_prob))


@MODELS.register_module()
class SparseBox3DRefinementModule(nn.Module):
    """Refine anchors from instance features; predict class and quality logits.

    ``f = instance_feature + anchor_embed``; ``out = scale * layers(f)`` (a learnable
    per-dimension scale); position and log sizes (and sin/cos with ``refine_yaw``) are added to
    the anchor's; the velocity slots are a displacement, so ``vel = out / time_interval +
    anchor_vel``. Class logits come from the instance feature alone (no anchor embedding, as
    upstream); quality logits ``[centerness, yawness]`` from ``f``
    (docs/design/sparse4d.md, 2.9).

    Args:
        embed_dims (int): Feature size. Defaults to 256.
        output_dim (int): Box state size. Defaults to 11.
        num_cls (int): Classes. Defaults to 10.
        normalize_yaw (bool): Make (sin, cos) unit length after refining. Defaults to False.
        refine_yaw (bool): Add the anchor's (sin, cos) to the prediction; else the prediction
            replaces them. Defaults to True.
        with_cls_branch (bool): Build the class branch. Defaults to True.
        with_quality_estimation (bool): Build the quality branch. Defaults to True.

    Examples:
        >>> ref = SparseBox3DRefinementModule(embed_dims=16, num_cls=3)
        >>> box, cls, qt = ref(torch.randn(2, 5, 16), torch.zeros(2, 5, 11),
        ...                    torch.zeros(2, 5, 16), torch.full((2,), 0.5))
        >>> box.shape, cls.shape, qt.shape
        (torch.Size([2, 5, 11]), torch.Size([2, 5, 3]), torch.Size([2, 5, 2]))
    """

    def __init__(self,
                 embed_dims: int = 256,
                 output_dim: int = 11,
                 num_cls: int = 10,
                 normalize_yaw: bool = False,
                 refine_yaw: bool = True,
                 with_cls_branch: bool = True,
                 with_quality_estimation: bool = True) -> None:
        super().__init__()
        if output_dim < COS_YAW + 1:
            raise ValueError(f'SparseBox3DRefinementModule: output_dim must be at least '
                             f'{COS_YAW + 1} (position, sizes, sin, cos), got {output_dim}')
        self.embed_dims = embed_dims
        self.output_dim = output_dim
        self.num_cls = num_cls
        self.normalize_yaw = normalize_yaw
        self.refine_yaw = refine_yaw
        #: Slots ``[0, num_refined)`` are refined additively.
        self.num_refined = COS_YAW + 1 if refine_yaw else SIZE_Z + 1
        self.layers = nn.Sequential(*linear_relu_ln(embed_dims, 2, 2, embed_dims),
                                    nn.Linear(embed_dims, output_dim))
        self.scale = nn.Parameter(torch.ones(output_dim))
        self.with_cls_branch = with_cls_branch
        self.cls_layers = (nn.Sequential(*linear_relu_ln(embed_dims, 1, 2, embed_dims),
                                         nn.Linear(embed_dims, num_cls))
                           if with_cls_branch else None)
        self.with_quality_estimation = with_quality_estimation
        self.quality_layers = (nn.Sequential(*linear_relu_ln(embed_dims, 1, 2, embed_dims),
                                             nn.Linear(embed_dims, 2))
                               if with_quality_estimation else None)
        self.init_weights()

    def init_weights(self) -> None:
        """Class bias at the logit of 0.01 (``-log(99)``), as upstream."""
        if self.cls_layers is not None:
            nn.init.constant_(self.cls_layers[-1].bias, _bias_with_prob(0.01))

    def forward(self,
                instance_feature: Tensor,
                anchor: Tensor,
                anchor_embed: Tensor,
                time_interval: Union[Tensor, float] = 1.0,
                return_cls: bool = True
                ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """Refine the anchors.

        Args:
            instance_feature (Tensor): ``[B, Q, C]``.
            anchor (Tensor): ``[B, Q, output_dim]``.
            anchor_embed (Tensor): ``[B, Q, C]``.
            time_interval (Tensor | float): ``[B]`` seconds (or one number) the predicted
                displacement is divided by. Defaults to 1.0.
            return_cls (bool): Also predict class and quality logits. Defaults to True.

        Returns:
            tuple: ``anchor [B, Q, output_dim]``, ``cls [B, Q, num_cls]`` (None unless
            ``return_cls``), ``quality [B, Q, 2]`` (None unless ``return_cls`` and the quality
            branch exists).
        """
        if anchor.shape[-1] != self.output_dim or anchor.shape[:-1] != instance_feature.shape[:-1]:
            raise ValueError(f'SparseBox3DRefinementModule: anchor must be [B, Q, '
                             f'{self.output_dim}] matching instance_feature '
                             f'{tuple(instance_feature.shape)}, got {tuple(anchor.shape)}')
        feature = instance_feature + anchor_embed
        out = self.layers(feature) * self.scale
        n = self.num_refined
        parts = [out[..., :n] + anchor[..., :n], out[..., n:VX]]
        if self.normalize_yaw:
            head = torch.cat(parts, dim=-1)
            parts = [head[..., :SIN_YAW], F.normalize(head[..., SIN_YAW:COS_YAW + 1], dim=-1)]
        if self.output_dim > VX:
            dt = torch.as_tensor(time_interval, dtype=out.dtype, device=out.device)
            if dt.dim() == 1:
                if dt.shape[0] != out.shape[0]:
                    raise ValueError(f'SparseBox3DRefinementModule: time_interval must be [B] '
                                     f'= [{out.shape[0]}] or a scalar, got {tuple(dt.shape)}')
                dt = dt[:, None, None]
            elif dt.dim() != 0:
                raise ValueError(f'SparseBox3DRefinementModule: time_interval must be [B] or a '
                                 f'scalar, got {tuple(dt.shape)}')
            parts.append(out[..., VX:] / dt + anchor[..., VX:])
        box = torch.cat(parts, dim=-1)

        cls = quality = None
        if return_cls:
            if self.cls_layers is None:
                raise ValueError('SparseBox3DRefinementModule: return_cls=True needs '
                                 'with_cls_branch=True')
            cls = self.cls_layers(instance_feature)
            if self.quality_layers is not None:
                quality = self.quality_layers(feature)
        return box, cls, quality
