"""Sparse4D's image sampling: each anchor gathers features around its keypoints in all cameras."""
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from turbox_mm.ops.deformable_aggregation import (deformable_aggregation,
                                                  deformable_aggregation_reference,
                                                  feature_maps_format)
from turbox_mm.ops.dispatch import check_op_impl
from turbox_mm.registry import MODELS
from ..layers.lss import rotate_points
from .anchor_encoder import linear_relu_ln

RESIDUAL_MODES = ('cat', 'add', None)

FeatureMaps = Union[Tuple[Tensor, Tensor, Tensor], Sequence[Tensor]]


def project_points(key_points: Tensor, projection_mat: Tensor,
                   image_wh: Optional[Tensor] = None) -> Tensor:
    """Project lidar-frame points into every camera, normalised by the image size.

    Depths are clamped to at least ``1e-5`` before the division, so points behind a camera get
    a tiny positive depth and usually land far outside the image (as upstream). The product
    runs as float32 multiply-adds (upstream's float32 product up to rounding order), never in
    TF32.

    Args:
        key_points (Tensor): ``[B, Q, P, 3]``.
        projection_mat (Tensor): ``[B, N, 4, 4]`` lidar-to-image matrices.
        image_wh (Tensor, optional): ``[B, N, 2]`` image width and height; None leaves pixel
            coordinates. Defaults to None.

    Returns:
        Tensor: ``[B, N, Q, P, 2]``, ``(u / W, v / H)``.

    Examples:
        >>> mat = torch.eye(4).repeat(1, 1, 1, 1)
        >>> project_points(torch.tensor([[[[2., 4., 2.]]]]), mat)
        tensor([[[[[1., 2.]]]]])
    """
    homo = torch.cat([key_points, torch.ones_like(key_points[..., :1])], dim=-1)
    # the first three rows of [B, N, 1, 1, 4, 4] on [B, 1, Q, P, 4]: float32 multiply-adds, not
    # a matrix product, which the turbox precision policy would let round in TF32 (about half
    # a pixel here)
    cam = rotate_points(projection_mat[:, :, None, None, :3], homo[:, None], elementwise=True)
    uv = cam[..., :2] / cam[..., 2:3].clamp(min=1e-5)
    if image_wh is not None:
        uv = uv / image_wh[:, :, None, None]
    return uv


@MODELS.register_module()
class DeformableFeatureAggregation(nn.Module):
    """Multi-camera, multi-level feature sampling at the keypoints of each anchor.

    For every anchor: keypoints from ``kps_generator``; per-group weights over (camera, level,
    keypoint) from the instance feature plus the anchor embedding, plus a camera embedding of
    the first three rows of each ``projection_mat`` (``use_camera_embed``), softmaxed jointly
    over cameras x levels x keypoints separately per group; the keypoints projected into every
    camera; then the deformable-aggregation op sums the bilinear samples with these weights,
    and ``output_proj`` maps the result. Sparse4D v3 (docs/design/sparse4d.md, 2.6) concatenates
    the input after the new features (``residual_mode='cat'``, ``2 * embed_dims`` out).

    In training, ``attn_drop`` drops whole (camera, keypoint) pairs on all levels and groups
    and scales the rest by ``1 / (1 - attn_drop)`` without renormalising, as upstream.

    Projection and sampling run in float32 with autocast off, whatever the input dtype; the
    sampled features come back in ``instance_feature``'s dtype.

    Args:
        embed_dims (int): Feature size ``C``. Defaults to 256.
        num_groups (int): Weight groups; ``C`` must be a multiple. Defaults to 8.
        num_levels (int): Feature levels ``L``. Defaults to 4.
        num_cams (int): Cameras ``N``. Defaults to 6.
        proj_drop (float): Dropout after ``output_proj``. Defaults to 0.0.
        attn_drop (float): Drop probability of a (camera, keypoint) pair in training.
            Defaults to 0.0.
        kps_generator (dict): Config of the keypoint generator, built with ``MODELS``;
            ``embed_dims`` is passed through. Defaults to
            ``dict(type='turbox_mm.SparseBox3DKeyPointsGenerator', num_learnable_pts=6)``.
        use_camera_embed (bool): Add a camera embedding before the weights; without it the
            weights layer predicts every camera's weights itself. Defaults to True.
        residual_mode (str | None): ``'cat'`` (``[new, input]``), ``'add'`` or None.
            Defaults to ``'cat'``.
        op_impl (str): ``'stock'`` runs the ``grid_sample`` specification
            (:func:`deformable_aggregation_reference`), ``'turbox'`` the fast op
            (:func:`deformable_aggregation`). Defaults to ``'stock'``.

    Examples:
        >>> dfa = DeformableFeatureAggregation(embed_dims=16, num_groups=2, num_levels=2,
        ...                                    num_cams=2)
        >>> maps = [torch.randn(1, 2, 16, 4, 6), torch.randn(1, 2, 16, 2, 3)]
        >>> mat = torch.eye(4).expand(1, 2, 4, 4)
        >>> out = dfa(torch.randn(1, 5, 16), torch.zeros(1, 5, 11), torch.zeros(1, 5, 16),
        ...           maps, mat, torch.ones(1, 2, 2))
        >>> out.shape
        torch.Size([1, 5, 32])
    """

    def __init__(self,
                 embed_dims: int = 256,
                 num_groups: int = 8,
                 num_levels: int = 4,
                 num_cams: int = 6,
                 proj_drop: float = 0.0,
                 attn_drop: float = 0.0,
                 kps_generator: Optional[dict] = None,
                 use_camera_embed: bool = True,
                 residual_mode: Optional[str] = 'cat',
                 op_impl: str = 'stock') -> None:
        super().__init__()
        if embed_dims % num_groups != 0:
            raise ValueError(f'DeformableFeatureAggregation: embed_dims ({embed_dims}) must be '
                             f'a multiple of num_groups ({num_groups})')
        if residual_mode not in RESIDUAL_MODES:
            raise ValueError(f'DeformableFeatureAggregation: residual_mode must be one of '
                             f'{RESIDUAL_MODES}, got {residual_mode!r}')
        check_op_impl('DeformableFeatureAggregation', op_impl)
        if not 0.0 <= attn_drop < 1.0:
            raise ValueError(f'DeformableFeatureAggregation: attn_drop must be in [0, 1), got '
                             f'{attn_drop}')
        self.embed_dims = embed_dims
        self.num_groups = num_groups
        self.num_levels = num_levels
        self.num_cams = num_cams
        self.attn_drop = attn_drop
        self.residual_mode = residual_mode
        self.op_impl = op_impl

        cfg = dict(type='turbox_mm.SparseBox3DKeyPointsGenerator', num_learnable_pts=6)
        if kps_generator is not None:
            cfg = dict(kps_generator)
        cfg['embed_dims'] = embed_dims
        self.kps_generator = MODELS.build(cfg)
        self.num_pts = self.kps_generator.num_pts

        if use_camera_embed:
            self.camera_encoder = linear_relu_ln(embed_dims, 1, 2, 12)
            weight_outputs = num_groups * num_levels * self.num_pts
        else:
            self.camera_encoder = None
            weight_outputs = num_groups * num_cams * num_levels * self.num_pts
        self.weights_fc = nn.Linear(embed_dims, weight_outputs)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop)
        self.init_weights()

    def init_weights(self) -> None:
        """Zero weights layer (uniform weights at start), xavier-uniform output projection."""
        nn.init.zeros_(self.weights_fc.weight)
        nn.init.zeros_(self.weights_fc.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def get_weights(self, instance_feature: Tensor, anchor_embed: Tensor,
                    projection_mat: Tensor) -> Tensor:
        """Sampling weights ``[B, Q, N, L, P, G]``, softmaxed over ``(N, L, P)`` per group.

        Args:
            instance_feature (Tensor): ``[B, Q, C]``.
            anchor_embed (Tensor): ``[B, Q, C]``.
            projection_mat (Tensor): ``[B, N, 4, 4]``.

        Returns:
            Tensor: ``[B, Q, N, L, P, G]``; with ``attn_drop`` in training, dropped
            (camera, keypoint) pairs are zero and the rest scaled up.
        """
        bs, num_anchor = instance_feature.shape[:2]
        feature = instance_feature + anchor_embed
        if self.camera_encoder is not None:
            cam_embed = self.camera_encoder(
                projection_mat[:, :, :3].reshape(bs, self.num_cams, 12).to(feature.dtype))
            feature = feature[:, :, None] + cam_embed[:, None]
        weights = self.weights_fc(feature).reshape(bs, num_anchor, -1, self.num_groups)
        weights = weights.softmax(dim=-2).reshape(bs, num_anchor, self.num_cams,
                                                  self.num_levels, self.num_pts,
                                                  self.num_groups)
        if self.training and self.attn_drop > 0:
            keep = torch.rand(bs, num_anchor, self.num_cams, 1, self.num_pts, 1,
                              device=weights.device) > self.attn_drop
            weights = weights * keep.to(weights.dtype) / (1 - self.attn_drop)
        return weights

    def _check(self, instance_feature: Tensor, anchor: Tensor, anchor_embed: Tensor,
               projection_mat: Tensor, image_wh: Optional[Tensor], spatial_shape: Tensor):
        bs, num_anchor = instance_feature.shape[:2]
        name = 'DeformableFeatureAggregation'
        if instance_feature.dim() != 3 or instance_feature.shape[-1] != self.embed_dims:
            raise ValueError(f'{name}: instance_feature must be [B, Q, {self.embed_dims}], got '
                             f'{tuple(instance_feature.shape)}')
        if tuple(anchor.shape[:2]) != (bs, num_anchor) or anchor.dim() != 3:
            raise ValueError(f'{name}: anchor must be [B, Q, 11] = [{bs}, {num_anchor}, 11], '
                             f'got {tuple(anchor.shape)}')
        if anchor_embed.shape != instance_feature.shape:
            raise ValueError(f'{name}: anchor_embed must have the shape of instance_feature '
                             f'{tuple(instance_feature.shape)}, got {tuple(anchor_embed.shape)}')
        if tuple(projection_mat.shape) != (bs, self.num_cams, 4, 4):
            raise ValueError(f'{name}: projection_mat must be [B, num_cams, 4, 4] = '
                             f'[{bs}, {self.num_cams}, 4, 4], got {tuple(projection_mat.shape)}')
        if image_wh is not None and tuple(image_wh.shape) != (bs, self.num_cams, 2):
            raise ValueError(f'{name}: image_wh must be [B, num_cams, 2] = '
                             f'[{bs}, {self.num_cams}, 2], got {tuple(image_wh.shape)}')
        if tuple(spatial_shape.shape) != (self.num_cams, self.num_levels, 2):
            raise ValueError(f'{name}: spatial_shape must be [num_cams, num_levels, 2] = '
                             f'[{self.num_cams}, {self.num_levels}, 2], got '
                             f'{tuple(spatial_shape.shape)}')

    def forward(self,
                instance_feature: Tensor,
                anchor: Tensor,
                anchor_embed: Tensor,
                feature_maps: FeatureMaps,
                projection_mat: Tensor,
                image_wh: Optional[Tensor] = None) -> Tensor:
        """Aggregate image features for every anchor.

        Args:
            instance_feature (Tensor): ``[B, Q, C]``.
            anchor (Tensor): ``[B, Q, 11]`` box states.
            anchor_embed (Tensor): ``[B, Q, C]``.
            feature_maps (tuple | list[Tensor]): ``(col_feats [B, N * sum(HW), C],
                spatial_shape [N, L, 2], scale_start_index [N, L])`` as
                :func:`feature_maps_format` makes it, or the ``L`` maps ``[B, N, C, H, W]``
                themselves (formatted here).
            projection_mat (Tensor): ``[B, N, 4, 4]`` lidar-to-image matrices.
            image_wh (Tensor, optional): ``[B, N, 2]`` image width and height. Defaults to
                None (``projection_mat`` then maps to normalised coordinates).

        Returns:
            Tensor: ``[B, Q, 2C]`` for ``residual_mode='cat'`` (new features first), else
            ``[B, Q, C]``.
        """
        if len(feature_maps) and torch.is_tensor(feature_maps[0]) and feature_maps[0].dim() == 5:
            feature_maps = feature_maps_format(list(feature_maps))
        if len(feature_maps) != 3:
            raise ValueError('DeformableFeatureAggregation: feature_maps must be (col_feats, '
                             'spatial_shape, scale_start_index) or a list of [B, N, C, H, W] '
                             f'maps, got {len(feature_maps)} items')
        col_feats, spatial_shape, scale_start_index = feature_maps
        self._check(instance_feature, anchor, anchor_embed, projection_mat, image_wh,
                    spatial_shape)
        bs, num_anchor = instance_feature.shape[:2]
        key_points = self.kps_generator(anchor, instance_feature)
        weights = self.get_weights(instance_feature, anchor_embed, projection_mat)

        with torch.autocast(instance_feature.device.type, enabled=False):
            points_2d = project_points(key_points.float(), projection_mat.float(),
                                       None if image_wh is None else image_wh.float())
            points_2d = points_2d.permute(0, 2, 3, 1, 4).contiguous()  # [B, Q, P, N, 2]
            weights = weights.float().permute(0, 1, 4, 2, 3, 5).contiguous()  # [B,Q,P,N,L,G]
            op = deformable_aggregation if self.op_impl == 'turbox' else \
                deformable_aggregation_reference
            features = op(col_feats.float(), spatial_shape, scale_start_index, points_2d,
                          weights)
        features = features.reshape(bs, num_anchor, self.embed_dims).to(instance_feature.dtype)
        output = self.proj_drop(self.output_proj(features))
        if self.residual_mode == 'add':
            output = output + instance_feature
        elif self.residual_mode == 'cat':
            output = torch.cat([output, instance_feature], dim=-1)
        return output
