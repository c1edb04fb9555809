"""Where SparseDrive's map head samples the images for a polyline anchor, and how a polyline
anchor moves from one frame to the next."""
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from turbox_mm.registry import MODELS
from ..layers.lss import rotate_points

#: The keypoint arguments of SparseDrive's map head (``sparsedrive_small_stage1.py``): 20
#: points a polyline, 3 learned offsets at each of 5 heights around the ground -> 300
#: keypoints an anchor.
MAP_KEYPOINTS = dict(num_sample=20, num_learnable_pts=3, fix_height=(0, 0.5, -0.5, 1, -1),
                     ground_height=-1.84023)


@MODELS.register_module()
class SparsePoint3DKeyPointsGenerator(nn.Module):
    """Keypoints of polyline anchors, and the rigid 2-D motion of polylines between frames.

    The anchor is ``num_sample`` points ``(x, y)`` in metres, flattened to
    ``[B, M, 2 * num_sample]``. For every point ``s``, height ``h`` (of ``fix_height``) and
    learned slot ``l``, the keypoint is::

        (x_s + dx[s, h, l],  y_s + dy[s, h, l],  ground_height + fix_height[h])

    where the offsets ``(dx, dy)`` are ``learnable_fc(instance_feature)`` reshaped to
    ``[B, M, num_sample, H, num_learnable_pts, 2]``: unbounded, in metres, a separate offset
    for every height. Keypoints are flattened in ``(point, height, slot)`` order, so
    ``num_pts = num_sample * H * num_learnable_pts`` (300 with :data:`MAP_KEYPOINTS`). There is
    no keypoint at the anchor point itself, as upstream (docs/design/sparsedrive.md,
    section 4). The height is added as ``ground_height`` then ``fix_height[h]`` in the
    keypoints' dtype, upstream's order of rounding.

    The defaults are upstream's class defaults (no learned keypoints): built that way, as
    upstream's map instance bank builds its ``anchor_handler``, the module has no parameters
    and serves only :meth:`anchor_projection`. The map head's deformable aggregation is
    configured with :data:`MAP_KEYPOINTS`.

    Upstream's temporal keypoints (the current keypoints moved into past frames, returned
    when past transforms and timestamps are given) are unused by SparseDrive's configs and
    are not implemented: :meth:`forward` takes the anchor and the instance feature only, as
    the box generator does for
    :class:`~turbox_mm.models.sparse4d.deformable_feature_aggregation.DeformableFeatureAggregation`.

    Args:
        embed_dims (int): Instance feature size. Defaults to 256.
        num_sample (int): Points per polyline anchor. Defaults to 20.
        num_learnable_pts (int): Learned offsets per point and height; :meth:`forward` needs at
            least 1. Defaults to 0 (upstream's default; projection only).
        fix_height (Sequence[float]): Heights above ``ground_height``, metres. Defaults to
            (0,).
        ground_height (float): The ground's z in the lidar frame, metres. Defaults to 0.0.

    Examples:
        >>> gen = SparsePoint3DKeyPointsGenerator(embed_dims=8, **MAP_KEYPOINTS)
        >>> gen.num_pts
        300
        >>> gen(torch.zeros(1, 4, 40), torch.zeros(1, 4, 8)).shape
        torch.Size([1, 4, 300, 3])
    """

    def __init__(self,
                 embed_dims: int = 256,
                 num_sample: int = 20,
                 num_learnable_pts: int = 0,
                 fix_height: Sequence[float] = (0, ),
                 ground_height: float = 0.0) -> None:
        super().__init__()
        if num_sample < 1 or num_learnable_pts < 0 or len(fix_height) < 1:
            raise ValueError(f'SparsePoint3DKeyPointsGenerator: need num_sample >= 1, '
                             f'num_learnable_pts >= 0 and at least one fix_height, got '
                             f'{num_sample}, {num_learnable_pts} and {tuple(fix_height)}')
        self.embed_dims = embed_dims
        self.num_sample = num_sample
        self.num_learnable_pts = num_learnable_pts
        self.ground_height = float(ground_height)
        # Not persistent: upstream keeps the heights as a numpy array, outside the state dict.
        self.register_buffer('fix_height', torch.tensor([float(h) for h in fix_height]),
                             persistent=False)
        self.num_pts = num_sample * len(fix_height) * num_learnable_pts
        self.learnable_fc = (nn.Linear(embed_dims, self.num_pts * 2)
                             if num_learnable_pts > 0 else None)
        self.init_weights()

    def init_weights(self) -> None:
        """Xavier-uniform weights (gain 1) and zero bias for the learned offsets, as upstream's
        ``xavier_init(learnable_fc, distribution='uniform', bias=0.0)``."""
        if self.learnable_fc is not None:
            nn.init.xavier_uniform_(self.learnable_fc.weight)
            nn.init.zeros_(self.learnable_fc.bias)

    def _check_anchor(self, name: str, anchor: Tensor) -> None:
        if anchor.dim() != 3 or anchor.shape[-1] != 2 * self.num_sample:
            raise ValueError(f'SparsePoint3DKeyPointsGenerator.{name}: anchor must be '
                             f'[B, M, {2 * self.num_sample}] (num_sample {self.num_sample} '
                             f'points x (x, y)), got {tuple(anchor.shape)}')

    def forward(self, anchor: Tensor, instance_feature: Optional[Tensor] = None) -> Tensor:
        """Keypoints ``[B, M, num_pts, 3]`` of polyline anchors ``[B, M, 2 * num_sample]``.

        Args:
            anchor (Tensor): ``[B, M, 2 * num_sample]`` points ``(x, y)`` in metres.
            instance_feature (Tensor): ``[B, M, embed_dims]``. Required; optional in the
                signature only to match the box generator's.

        Returns:
            Tensor: ``[B, M, num_pts, 3]`` in the lidar frame, ordered (point, height, slot).

        Raises:
            ValueError: No learned keypoints (``num_learnable_pts`` 0), no instance feature, or
                shapes that do not fit.
        """
        if self.learnable_fc is None:
            raise ValueError('SparsePoint3DKeyPointsGenerator: forward needs learned keypoints '
                             '(num_learnable_pts >= 1); this one was built for '
                             'anchor_projection only')
        self._check_anchor('forward', anchor)
        bs, num_anchor = anchor.shape[:2]
        if instance_feature is None or tuple(instance_feature.shape) != (
                bs, num_anchor, self.embed_dims):
            got = None if instance_feature is None else tuple(instance_feature.shape)
            raise ValueError(f'SparsePoint3DKeyPointsGenerator: instance_feature must be '
                             f'[B, M, embed_dims] = [{bs}, {num_anchor}, {self.embed_dims}], '
                             f'got {got}')
        num_height = self.fix_height.shape[0]
        offset = self.learnable_fc(instance_feature).reshape(
            bs, num_anchor, self.num_sample, num_height, self.num_learnable_pts, 2)
        points = anchor.reshape(bs, num_anchor, self.num_sample, 1, 1, 2)
        xy = offset + points
        # z per height: ground then fix_height, each in the keypoints' dtype (upstream's order).
        z = xy.new_full((num_height, ), self.ground_height) + self.fix_height.to(xy.dtype)
        z = z[:, None, None].expand(*xy.shape[:-1], 1)
        return torch.cat([xy, z], dim=-1).flatten(2, 4)

    def anchor_projection(self,
                          anchor: Tensor,
                          T_temp2cur: Tensor,
                          time_interval: Optional[Tensor] = None) -> Tensor:
        """Move polyline anchors of a past frame into the current frame.

        Each point's ``(x, y)`` is mapped by the top-left 2x2 block (rotation) and the xy
        translation of ``T_temp2cur``: ``p' = R[:2, :2] p + t[:2]``. z, the third row and
        column, and ``time_interval`` play no part (map elements do not move), as upstream's
        ``anchor_projection``. As upstream, ``T_temp2cur`` is cast to the anchor's dtype first.

        Args:
            anchor (Tensor): ``[B, M, 2 * num_sample]`` points ``(x, y)`` in the past frame.
            T_temp2cur (Tensor): ``[B, 4, 4]`` past lidar frame to current lidar frame (float32
                or float64).
            time_interval (Tensor, optional): ``[B]`` seconds; unused, accepted so that the
                instance bank can call box and map handlers alike. Defaults to None.

        Returns:
            Tensor: ``[B, M, 2 * num_sample]`` in the current frame, in ``anchor``'s dtype.

        Raises:
            ValueError: ``anchor`` or ``T_temp2cur`` has the wrong shape.
        """
        self._check_anchor('anchor_projection', anchor)
        bs, num_anchor = anchor.shape[:2]
        if tuple(T_temp2cur.shape) != (bs, 4, 4):
            raise ValueError(f'SparsePoint3DKeyPointsGenerator.anchor_projection: T_temp2cur '
                             f'must be [B, 4, 4] = [{bs}, 4, 4], got {tuple(T_temp2cur.shape)}')
        transform = T_temp2cur.to(anchor.dtype)
        rot = transform[:, None, None, :2, :2]
        trans = transform[:, None, None, :2, 3]
        points = anchor.reshape(bs, num_anchor, self.num_sample, 2)
        moved = rotate_points(rot, points, elementwise=True) + trans  # float32, never TF32
        return moved.reshape(bs, num_anchor, 2 * self.num_sample)
