"""Deformable aggregation in plain PyTorch: the specification of the op and its CPU path.

Sparse4D's ``DeformableAggregationFunction`` (HorizonRobotics/Sparse4D,
``projects/mmdet3d_plugin/ops/src/deformable_aggregation_cuda.cu``) computes, for every
anchor ``a`` of batch element ``b`` and channel ``c`` of group ``g = c // (C / G)``::

    out[b, a, c] = sum over points p, cameras k, levels l of
                   weights[b, a, p, k, l, g] * bilinear(map(b, k, l)[c], x * W - 0.5, y * H - 0.5)

where ``(x, y) = sampling_location[b, a, p, k]`` is normalised to ``[0, 1]`` on camera ``k``'s
image and ``(H, W) = spatial_shape[k, l]``. What upstream's CUDA kernel does, and this file
reproduces:

- Pixel coordinates are ``x * W - 0.5`` and ``y * H - 0.5`` (pixel centres at integer
  coordinates plus one half): ``F.grid_sample``'s ``align_corners=False`` convention, with
  ``grid = 2 * loc - 1``.
- A (point, camera) pair is skipped on every level unless ``0 < x < 1`` and ``0 < y < 1``
  (strictly: a location exactly on the image border contributes nothing). Inside, bilinear
  corners that fall off the map read zero (``padding_mode='zeros'``).
- ``mc_ms_feat[b]`` holds each map channels-last and row-major: pixel ``(i, j)`` of camera
  ``k``, level ``l`` is row ``scale_start_index[k, l] + i * W + j`` (the layout of upstream's
  ``feature_maps_format``, reproduced by :func:`feature_maps_format`).
- Gradients flow to ``mc_ms_feat``, ``sampling_location`` and ``weights``; skipped pairs get
  zero gradient. ``spatial_shape`` and ``scale_start_index`` are integer tables.

Upstream's Python fallback (``DeformableFeatureAggregation.feature_sampling``) uses
``grid_sample`` without the ``(0, 1)`` test, so it differs from the CUDA op for samples on or
just outside the image border; the CUDA op is the one reproduced here.
"""
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from turbox_mm.utils.upload import upload


def deformable_aggregation_reference(mc_ms_feat: torch.Tensor, spatial_shape: torch.Tensor,
                                     scale_start_index: torch.Tensor,
                                     sampling_location: torch.Tensor,
                                     weights: torch.Tensor) -> torch.Tensor:
    """Sparse4D's deformable aggregation with ``F.grid_sample``, one call per camera and level.

    Differentiable with respect to ``mc_ms_feat``, ``sampling_location`` and ``weights``. The
    arithmetic runs in the promoted floating type of the three (``grid_sample`` needs one
    type); the result has ``mc_ms_feat``'s dtype.

    Args:
        mc_ms_feat (Tensor): ``[bs, num_feat, C]``, every camera's maps of every level,
            channels last (see :func:`feature_maps_format`).
        spatial_shape (Tensor): ``[cams, levels, 2]`` integer ``(H, W)`` of each map.
        scale_start_index (Tensor): ``[cams, levels]`` integer first row of each map in
            ``mc_ms_feat``.
        sampling_location (Tensor): ``[bs, anchors, pts, cams, 2]``, ``(x, y)`` normalised to
            ``[0, 1]`` on each camera's image.
        weights (Tensor): ``[bs, anchors, pts, cams, levels, groups]``; ``C`` must be a
            multiple of ``groups``, channel ``c`` takes group ``c // (C // groups)``.

    Returns:
        Tensor: ``[bs, anchors, C]``.

    Examples:
        >>> import torch
        >>> feat = torch.arange(4.).reshape(1, 4, 1)  # one 2x2 map, one channel
        >>> shape, start = torch.tensor([[[2, 2]]]), torch.tensor([[0]])
        >>> loc = torch.tensor([0.5, 0.5]).reshape(1, 1, 1, 1, 2)  # the image centre
        >>> w = torch.ones(1, 1, 1, 1, 1, 1)
        >>> deformable_aggregation_reference(feat, shape, start, loc, w)
        tensor([[[1.5000]]])
    """
    bs, _, channels = mc_ms_feat.shape
    _, anchors, pts, cams, _ = sampling_location.shape
    levels, groups = weights.shape[-2:]
    dtype = torch.promote_types(torch.promote_types(mc_ms_feat.dtype, sampling_location.dtype),
                                weights.dtype)
    feat = mc_ms_feat.to(dtype)
    loc = sampling_location.to(dtype)
    wts = weights.to(dtype)

    # Upstream skips a (point, camera) pair on all levels unless 0 < x < 1 and 0 < y < 1.
    inside = ((loc > 0) & (loc < 1)).all(dim=-1)  # [bs, anchors, pts, cams]
    loc = torch.where(inside[..., None], loc, torch.full_like(loc, 0.5))  # finite, unused
    wts = wts * inside[..., None, None]
    grid = loc * 2 - 1  # align_corners=False: pixel = loc * size - 0.5

    shapes = spatial_shape.tolist()
    starts = scale_start_index.tolist()
    out = feat.new_zeros(bs, anchors, groups, channels // groups)
    for cam in range(cams):
        for lvl in range(levels):
            height, width = shapes[cam][lvl]
            start = starts[cam][lvl]
            fmap = feat[:, start:start + height * width].reshape(bs, height, width, channels)
            fmap = fmap.permute(0, 3, 1, 2)  # [bs, C, H, W]
            sampled = F.grid_sample(fmap, grid[:, :, :, cam], mode='bilinear',
                                    padding_mode='zeros', align_corners=False)  # [bs, C, A, P]
            sampled = sampled.reshape(bs, groups, channels // groups, anchors, pts)
            out = out + torch.einsum('bgcap,bapg->bagc', sampled, wts[:, :, :, cam, lvl])
    return out.reshape(bs, anchors, channels).to(mc_ms_feat.dtype)


def feature_maps_format(
        feature_maps: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten FPN outputs into the op's layout, as upstream's ``feature_maps_format`` does.

    Args:
        feature_maps (list[Tensor]): One ``[bs, cams, C, H_l, W_l]`` tensor per level.

    Returns:
        tuple[Tensor, Tensor, Tensor]: ``mc_ms_feat`` ``[bs, cams * sum(H_l * W_l), C]``
        (camera-major, then level, then row-major pixels), ``spatial_shape``
        ``[cams, levels, 2]`` and ``scale_start_index`` ``[cams, levels]``, both int64 on the
        maps' device.

    Examples:
        >>> import torch
        >>> maps = [torch.zeros(1, 2, 8, 4, 6), torch.zeros(1, 2, 8, 2, 3)]
        >>> feat, shape, start = feature_maps_format(maps)
        >>> feat.shape, start.tolist()
        (torch.Size([1, 60, 8]), [[0, 24], [30, 54]])
    """
    bs, cams, channels = feature_maps[0].shape[:3]
    flat: List[torch.Tensor] = [
        fm.reshape(bs, cams, channels, fm.shape[-2] * fm.shape[-1]) for fm in feature_maps
    ]
    mc_ms_feat = torch.cat(flat, dim=-1).permute(0, 1, 3, 2).flatten(1, 2)
    device = mc_ms_feat.device
    sizes = [tuple(fm.shape[-2:]) for fm in feature_maps]
    spatial_shape = upload(torch.tensor([sizes] * cams, dtype=torch.int64), device)
    counts = spatial_shape[..., 0] * spatial_shape[..., 1]
    scale_start_index = (counts.flatten().cumsum(0) - counts.flatten()).reshape(cams, -1)
    return mc_ms_feat, spatial_shape, scale_start_index
