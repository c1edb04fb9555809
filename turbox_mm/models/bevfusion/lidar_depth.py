"""The sparse lidar depth image of each camera, as BEVFusion's ``DepthLSSTransform`` draws it.

Every lidar point (its lidar-frame x, y, z) is taken back through the batch's lidar
augmentation, projected with ``lidar2image``, and its depth (the camera-frame z clamped to
``[1e-5, 1e5]``) written at its pixel after the image augmentation, when the pixel lies in the
image (``0 <= v < H``, ``0 <= u < W``, truncated to integers). Where several points land on a
pixel, the last point in the cloud's order wins (upstream writes them all in one indexed
assignment: on the CPU the last one wins, on CUDA any may).

- :func:`depth_image_stock`: upstream's procedure, a loop over the samples and the cameras with
  boolean indexing (a host synchronisation per camera and sample).
- :func:`depth_image_batched`: the same arithmetic for the whole batch at once (clouds padded to
  the longest), and one scatter whose winner per pixel is the last point: no host sync. Its
  3 x 3 products are float32 multiply-adds
  (:func:`~turbox_mm.models.layers.lss.rotate_columns`), not matrix products, which
  ``_base_/turbox.py``'s TF32 could round by about 5e-4 (half a pixel at u ~ 1000); the
  depths then agree with the loop's to rounding order, and a pixel index only where a point
  lies within that rounding of a pixel edge.
"""
from typing import List

import torch
from torch import Tensor

from ..layers.lss import inverse, rotate_columns

Z_MIN, Z_MAX = 1e-5, 1e5
#: Scatter slots past the images that the off-image entries are spread over (a power of 2).
SPARE_SLOTS = 1 << 16


def depth_image_stock(points: List[Tensor], lidar2image: Tensor, img_aug_matrix: Tensor,
                      lidar_aug_matrix: Tensor, image_size) -> Tensor:
    """``[B, N, 1, H, W]`` depth images, upstream's way (module docstring).

    Args:
        points (list[Tensor]): Per sample ``[P, >= 3]`` lidar points (x, y, z first).
        lidar2image (Tensor): ``[B, N, 4, 4]``.
        img_aug_matrix (Tensor): ``[B, N, 4, 4]``.
        lidar_aug_matrix (Tensor): ``[B, 4, 4]``.
        image_size (Sequence[int]): ``(H, W)`` of the augmented images.
    """
    height, width = image_size
    batch, cams = lidar2image.shape[:2]
    depth = points[0].new_zeros(batch, cams, 1, height, width)
    for b in range(batch):
        xyz = points[b][:, :3] - lidar_aug_matrix[b, :3, 3]
        xyz = torch.inverse(lidar_aug_matrix[b, :3, :3]).matmul(xyz.transpose(1, 0))
        cam = lidar2image[b, :, :3, :3].matmul(xyz) + lidar2image[b, :, :3, 3].reshape(-1, 3, 1)
        dist = cam[:, 2, :].clamp(Z_MIN, Z_MAX)
        uv = cam[:, :2, :] / dist[:, None, :]
        pix = img_aug_matrix[b, :, :3, :3].matmul(torch.cat([uv, dist[:, None, :]], 1)) + \
            img_aug_matrix[b, :, :3, 3].reshape(-1, 3, 1)
        u, v = pix[:, 0, :], pix[:, 1, :]
        on_image = (v < height) & (v >= 0) & (u < width) & (u >= 0)
        for c in range(cams):
            rows, cols = v[c, on_image[c]].long(), u[c, on_image[c]].long()
            depth[b, c, 0, rows, cols] = dist[c, on_image[c]]
    return depth


def depth_image_batched(points: List[Tensor], lidar2image: Tensor, img_aug_matrix: Tensor,
                        lidar_aug_matrix: Tensor, image_size) -> Tensor:
    """:func:`depth_image_stock` for the whole batch in a few kernels, without a host sync;
    the last point wins on a shared pixel on every device."""
    height, width = image_size
    batch, cams = lidar2image.shape[:2]
    longest = max((p.shape[0] for p in points), default=0)
    xyz = points[0].new_zeros(batch, longest, 3)
    real = torch.zeros(batch, longest, dtype=torch.bool, device=xyz.device)
    for b, cloud in enumerate(points):  # copies only (sizes are known on the host)
        xyz[b, :cloud.shape[0]] = cloud[:, :3]
        real[b, :cloud.shape[0]] = True
    xyz = xyz - lidar_aug_matrix[:, None, :3, 3]
    # the inverse without torch.inverse's singularity check, which waits for the device
    xyz = rotate_columns(inverse(lidar_aug_matrix[:, :3, :3], sync_free=True),
                         xyz.transpose(1, 2))
    cam = rotate_columns(lidar2image[:, :, :3, :3], xyz[:, None]) + \
        lidar2image[:, :, :3, 3, None]
    dist = cam[:, :, 2, :].clamp(Z_MIN, Z_MAX)  # [B, N, P]
    uv = cam[:, :, :2, :] / dist[:, :, None, :]
    pix = rotate_columns(img_aug_matrix[:, :, :3, :3],
                         torch.cat([uv, dist[:, :, None, :]], 2)) + \
        img_aug_matrix[:, :, :3, 3, None]
    u, v = pix[:, :, 0, :], pix[:, :, 1, :]
    on_image = (v < height) & (v >= 0) & (u < width) & (u >= 0) & real[:, None, :]
    plane = torch.arange(batch * cams, device=xyz.device).view(batch, cams, 1)
    flat = (plane * height + v.clamp(0, height - 1).long()) * width + \
        u.clamp(0, width - 1).long()
    pixels = batch * cams * height * width
    entry = torch.arange(flat.numel(), device=xyz.device)
    # Off-image entries (most of them: a point is in front of one or two of the cameras) go to
    # SPARE_SLOTS slots past the image, spread by entry: one shared slot made every one of them
    # an atomic on a single address (267 ms a step at BEVFusion's size on an H100).
    flat = torch.where(on_image.reshape(-1), flat.reshape(-1),
                       pixels + (entry & (SPARE_SLOTS - 1)))
    # The winner of a pixel: its last point in the cloud's order, as a loop writing in order
    # leaves it. A pixel belongs to one (sample, camera), whose entries of ``flat`` run in
    # point order, so the highest entry index is the last point.
    source = torch.full((pixels + SPARE_SLOTS, ), -1, dtype=torch.long, device=xyz.device)
    source.scatter_reduce_(0, flat, entry, 'amax')
    values = torch.cat([dist.reshape(-1), dist.new_zeros(1)])
    depth = values[torch.where(source[:pixels] >= 0, source[:pixels], flat.numel())]
    return depth.view(batch, cams, 1, height, width)
