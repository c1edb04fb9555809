"""BEVFormer's reference points of the BEV queries and their projection into the cameras.

Upstream ``BEVFormerEncoder.get_reference_points`` and ``point_sampling``
(``bevformer/modules/encoder.py`` @ 67cadd8 in hustvl/MapTR; docs/design/maptr.md, section 3.1).
The BEV is ``H x W`` cells flattened row-major (``q = row * W + col``, row along ``y``, column
along ``x``); a cell's centre is ``((col + 0.5) / W, (row + 0.5) / H)`` normalised over the point
cloud range.
"""
from typing import Sequence, Tuple

import torch
from torch import Tensor

from ..layers.lss import rotate_points

#: The depth below which a projected point counts as behind the camera.
EPS = 1e-5


def reference_points_3d(bev_h: int, bev_w: int, z_range: float, num_points_in_pillar: int,
                        batch: int, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """``[batch, D, H * W, 3]`` normalised ``(x, y, z)``: ``D`` anchors per cell at
    ``z = linspace(0.5, Z - 0.5, D) / Z`` with ``Z = z_range`` (metres; MapTR v1: 4 m, 4
    anchors at 1/8, 3/8, 5/8, 7/8 of the height).

    Upstream builds them in the BEV query's dtype (half precision in a mmcv 1.x fp16 run);
    here they are ``dtype``, float32 by default.

    Examples:
        >>> ref = reference_points_3d(2, 3, 4.0, 4, batch=1)
        >>> ref.shape, ref[0, :, 0, 2].tolist()
        (torch.Size([1, 4, 6, 3]), [0.125, 0.375, 0.625, 0.875])
    """
    zs = torch.linspace(0.5, z_range - 0.5, num_points_in_pillar, dtype=dtype,
                        device=device).view(-1, 1, 1).expand(num_points_in_pillar, bev_h,
                                                             bev_w) / z_range
    xs = torch.linspace(0.5, bev_w - 0.5, bev_w, dtype=dtype, device=device).view(
        1, 1, bev_w).expand(num_points_in_pillar, bev_h, bev_w) / bev_w
    ys = torch.linspace(0.5, bev_h - 0.5, bev_h, dtype=dtype, device=device).view(
        1, bev_h, 1).expand(num_points_in_pillar, bev_h, bev_w) / bev_h
    ref = torch.stack((xs, ys, zs), -1).flatten(1, 2)  # [D, H * W, 3]
    return ref[None].repeat(batch, 1, 1, 1)


def reference_points_2d(bev_h: int, bev_w: int, batch: int, device=None,
                        dtype: torch.dtype = torch.float32) -> Tensor:
    """``[batch, H * W, 1, 2]`` normalised ``(x, y)`` of the cell centres (one level).

    Examples:
        >>> reference_points_2d(2, 4, batch=1)[0, :5, 0].tolist()
        [[0.125, 0.25], [0.375, 0.25], [0.625, 0.25], [0.875, 0.25], [0.125, 0.75]]
    """
    ref_y, ref_x = torch.meshgrid(
        torch.linspace(0.5, bev_h - 0.5, bev_h, dtype=dtype, device=device),
        torch.linspace(0.5, bev_w - 0.5, bev_w, dtype=dtype, device=device), indexing='ij')
    ref = torch.stack((ref_x.reshape(-1) / bev_w, ref_y.reshape(-1) / bev_h), -1)
    return ref[None, :, None, :].repeat(batch, 1, 1, 1)


def point_sampling(reference_points: Tensor, pc_range: Sequence[float], lidar2img: Tensor,
                   img_shape: Sequence[int], op_impl: str = 'stock') -> Tuple[Tensor, Tensor]:
    """Project the 3D reference points into every camera (float32, autocast off).

    Upstream's arithmetic: the normalised points scaled to ``pc_range``, made homogeneous,
    multiplied by each camera's ``lidar2img`` (float32), divided by ``max(depth, 1e-5)`` and by
    the image size ``(W, H)`` (upstream reads the first camera's ``img_shape``: the padded
    size, which its pipeline writes there). An anchor is visible when its depth is above
    ``1e-5`` and ``0 < u < 1`` and ``0 < v < 1`` (open intervals).

    Args:
        reference_points (Tensor): ``[B, D, Q, 3]`` normalised ``(x, y, z)``.
        pc_range (list[float]): ``[x_min, y_min, z_min, x_max, y_max, z_max]``.
        lidar2img (Tensor): ``[B, N, 4, 4]`` lidar-to-pixel matrices.
        img_shape (tuple[int]): ``(H, W)`` (further entries ignored).
        op_impl (str): ``'stock'``: upstream's product, every point and matrix repeated to
            ``[D, B, N, Q, 4, 4]`` (MapTR v1, batch 4: about 120 MB a step) for one batched
            matrix product; ``'turbox'``: the same four-term sums as broadcast float32
            multiply-adds of the points ``[D, B, Q, 4]`` and the matrices ``[B, N, 4, 4]``,
            nothing repeated (their rounding may differ in the last bit; not a matrix product,
            which TF32 could round to about 5e-4). Defaults to 'stock'.

    Returns:
        tuple[Tensor, Tensor]: ``reference_points_cam`` ``[N, B, Q, D, 2]`` normalised
        ``(u, v)`` and ``bev_mask`` ``[N, B, Q, D]`` bool.

    Examples:
        >>> ref = torch.tensor([0.5, 0.75, 0.5]).view(1, 1, 1, 3)  # (0, 15, 0) m
        >>> l2i = torch.eye(4)[[0, 2, 1, 3]].view(1, 1, 4, 4)  # depth = y, pixel (x, z) / y
        >>> cam, mask = point_sampling(ref, [-15, -30, -2, 15, 30, 2], l2i, (10, 10))
        >>> cam.view(-1).tolist(), mask.view(-1).tolist()
        ([0.0, 0.0], [False])
    """
    with torch.autocast(reference_points.device.type, enabled=False):
        points = reference_points.float().clone()
        for axis in range(3):
            low, high = pc_range[axis], pc_range[axis + 3]
            points[..., axis:axis + 1] = points[..., axis:axis + 1] * (high - low) + low
        points = torch.cat((points, torch.ones_like(points[..., :1])), -1)
        points = points.permute(1, 0, 2, 3)  # [D, B, Q, 4]
        if op_impl == 'turbox':
            # [1, B, N, 1, 4, 4] matrices on [D, B, 1, Q, 4] points: [D, B, N, Q, 4]
            batch, cams = lidar2img.shape[:2]
            cam = rotate_points(lidar2img.float().view(1, batch, cams, 1, 4, 4),
                                points.unsqueeze(2), elementwise=True)
        else:
            anchors, batch, num_query = points.shape[:3]
            cams = lidar2img.shape[1]
            points = points.view(anchors, batch, 1, num_query, 4).repeat(1, 1, cams, 1,
                                                                         1).unsqueeze(-1)
            matrices = lidar2img.float().view(1, batch, cams, 1, 4, 4).repeat(
                anchors, 1, 1, num_query, 1, 1)
            cam = torch.matmul(matrices, points).squeeze(-1)  # [D, B, N, Q, 4]
        depth = cam[..., 2:3]
        mask = depth > EPS
        cam = cam[..., 0:2] / torch.maximum(depth, torch.ones_like(depth) * EPS)
        height, width = img_shape[0], img_shape[1]
        cam[..., 0] /= width
        cam[..., 1] /= height
        mask = (mask & (cam[..., 1:2] > 0.0) & (cam[..., 1:2] < 1.0) & (cam[..., 0:1] < 1.0)
                & (cam[..., 0:1] > 0.0))
        return cam.permute(2, 1, 3, 0, 4), mask.permute(2, 1, 3, 0, 4).squeeze(-1)
