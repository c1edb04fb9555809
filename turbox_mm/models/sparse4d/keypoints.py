"""Where Sparse4D samples the images for an anchor: 7 fixed and 6 learned keypoints."""
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from turbox_mm.registry import MODELS
from .box3d import COS_YAW, SIN_YAW, SIZE_X, SIZE_Z, X, Z

#: Sparse4D v3's fixed keypoints, in units of the box's extent: the centre and six points at
#: 0.45 of the extent from it along each box axis (just inside the faces).
FIXED_KEYPOINTS_V3 = ((0., 0., 0.), (.45, 0., 0.), (-.45, 0., 0.), (0., .45, 0.),
                      (0., -.45, 0.), (0., 0., .45), (0., 0., -.45))


@MODELS.register_module()
class SparseBox3DKeyPointsGenerator(nn.Module):
    """Keypoints of each anchor box in the lidar frame.

    Fixed keypoints are ``fix_scale * size`` in the box frame; learned ones are
    ``(sigmoid(Linear(feature)) - 0.5) * size``, so they stay within the box. All are rotated
    by the anchor's yaw (its sine and cosine as they are, not normalised, as upstream does) and
    moved to the anchor's centre.

    Upstream's head re-initialises every parameter with more than one dimension, which replaced
    the configured fixed keypoints by random frozen values (docs/design/sparse4d.md, 0.3-2);
    here they are a buffer, so the configured values stay. Load a released checkpoint's values
    with ``load_state_dict`` if bit-compatibility with it is wanted.

    Args:
        embed_dims (int): Instance feature size. Defaults to 256.
        num_learnable_pts (int): Learned keypoints. Defaults to 6.
        fix_scale (Sequence[Sequence[float]]): Fixed keypoints in units of the box extent.
            Defaults to :data:`FIXED_KEYPOINTS_V3`.

    Examples:
        >>> gen = SparseBox3DKeyPointsGenerator(embed_dims=8, num_learnable_pts=2)
        >>> gen(torch.zeros(1, 3, 11), torch.zeros(1, 3, 8)).shape
        torch.Size([1, 3, 9, 3])
    """

    def __init__(self,
                 embed_dims: int = 256,
                 num_learnable_pts: int = 6,
                 fix_scale: Sequence[Sequence[float]] = FIXED_KEYPOINTS_V3) -> None:
        super().__init__()
        fix = torch.as_tensor(fix_scale, dtype=torch.float32).reshape(-1, 3)
        self.register_buffer('fix_scale', fix)
        self.num_learnable_pts = num_learnable_pts
        self.num_pts = len(fix) + num_learnable_pts
        self.learnable_fc = (nn.Linear(embed_dims, num_learnable_pts * 3)
                             if num_learnable_pts > 0 else None)
        self.init_weights()

    def init_weights(self) -> None:
        """Xavier-uniform weights and zero bias for the learned offsets, as upstream."""
        if self.learnable_fc is not None:
            nn.init.xavier_uniform_(self.learnable_fc.weight)
            nn.init.zeros_(self.learnable_fc.bias)

    def forward(self, anchor: Tensor, instance_feature: Optional[Tensor] = None) -> Tensor:
        """Keypoints ``[B, Q, num_pts, 3]`` of anchors ``[B, Q, 11]``.

        Args:
            anchor (Tensor): ``[B, Q, 11]`` box states.
            instance_feature (Tensor, optional): ``[B, Q, embed_dims]``; needed when there are
                learned keypoints.

        Returns:
            Tensor: ``[B, Q, num_pts, 3]`` in the lidar frame.
        """
        size = anchor[..., SIZE_X:SIZE_Z + 1].exp()[..., None, :]
        points = self.fix_scale.to(anchor.dtype) * size
        if self.learnable_fc is not None:
            if instance_feature is None:
                raise ValueError('SparseBox3DKeyPointsGenerator: learned keypoints need the '
                                 'instance features')
            offsets = self.learnable_fc(instance_feature).reshape(
                *anchor.shape[:-1], self.num_learnable_pts, 3)
            points = torch.cat([points, (offsets.sigmoid() - 0.5) * size], dim=-2)
        cos, sin = anchor[..., COS_YAW, None], anchor[..., SIN_YAW, None]
        x, y = points[..., 0], points[..., 1]
        rotated = torch.stack([cos * x - sin * y, sin * x + cos * y, points[..., 2]], dim=-1)
        return rotated + anchor[..., None, X:Z + 1]
