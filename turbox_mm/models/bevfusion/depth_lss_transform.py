"""``DepthLSSTransform``: BEVFusion's camera-to-BEV view transform (lift, splat), lidar-aided.

The maths of mmdet3d 1.4's ``projects/BEVFusion`` ``DepthLSSTransform``:

1. **Frustum.** ``D x fH x fW`` points ``(u, v, d)``: ``u`` evenly from 0 to ``W - 1`` of the
   augmented image in ``fW`` steps, ``v`` from 0 to ``H - 1`` in ``fH`` steps, ``d`` the depth
   bins ``arange(*dbound)``.
2. **Geometry** (:meth:`DepthLSSTransform.get_geometry`): each frustum point is taken back
   through the image augmentation, scaled by its depth, through the inverse intrinsics and
   ``camera2lidar``, then the lidar augmentation: ``[B, N, D, fH, fW, 3]``.
3. **Depth image** of the lidar points (:mod:`.lidar_depth`), ``[B * N, 1, H, W]``, through
   ``dtransform`` (1 -> 8 -> 32 -> 64 channels, strides 1, 4, 2) to the feature size.
4. ``depthnet`` on ``[depth features, image features]`` gives ``D`` depth logits and ``C``
   context channels; the softmax over the bins times the context is pooled into the BEV grid
   (``xbound``/``ybound``/``zbound``) by sum (:mod:`turbox_mm.ops.bev_pool`), the z cells
   stacked into channels.
5. ``downsample`` convolutions (stride 2 with ``downsample=2``).

``op_impl='stock'`` runs upstream's procedure (the depth image with a loop over samples and
cameras and boolean indexing; the pooling with the ``[B, N, D, fH, fW, C]`` product, a
boolean filter and an index sum, as the PyTorch path of the pooling does). ``'turbox'`` draws
the depth image for the batch at once without host syncs and pools with
``turbox_mm::bev_pool`` (softmax fused, product never stored). ``bev_pool_impl`` sets the
pooling alone (the like-for-like stock configuration: upstream's users run a compiled
pooling op).

The grid's ``dx``, ``bx``, ``nx`` and the frustum are buffers, not saved in checkpoints
(upstream keeps them as frozen parameters: loading an upstream checkpoint reports them as
unexpected keys).
"""
from typing import List, Optional, Sequence

import torch
from mmengine.model import BaseModule
from torch import Tensor, nn

from turbox_mm.ops.bev_pool import bev_pool
from turbox_mm.ops.dispatch import check_op_impl
from turbox_mm.registry import MODELS
from ..layers.lss import (bev_grid, conv_bn_relu, image_frustum, pool_stock, pooling_grid,
                          rotate_points, unproject_frustum)
from .lidar_depth import depth_image_batched, depth_image_stock


@MODELS.register_module()
class DepthLSSTransform(BaseModule):
    """BEVFusion's lidar-aided LSS view transform (module docstring).

    Args:
        in_channels (int): Image feature channels (256).
        out_channels (int): Context channels C pooled into the BEV (80).
        image_size (Sequence[int]): Augmented image ``(H, W)`` (256, 704).
        feature_size (Sequence[int]): Image feature ``(fH, fW)`` (32, 88).
        xbound, ybound, zbound (Sequence[float]): ``(min, max, step)`` of the BEV grid.
        dbound (Sequence[float]): ``(min, max, step)`` of the depth bins.
        downsample (int): 1 or 2: the stride of the convolutions after pooling.
        op_impl (str): ``'stock'`` or ``'turbox'`` (module docstring). Defaults to 'stock'.
        bev_pool_impl (str, optional): The pooling alone; defaults to ``op_impl``.
        init_cfg (dict, optional): mmengine's.
    """

    #: What ``turbox.compile.modules='auto'`` compiles here: the three convolution stacks
    #: (fixed shapes, no data-dependent branch); the geometry, the depth image and the pooling
    #: stay eager. Eager, their eight batch norms run cuDNN's NCHW kernels: in an H100
    #: profile of BEVFusion (docs/benchmarks.md) the step's eight cuDNN batch norms took about
    #: 10 ms of device time, 6.3 ms of it in two backward calls of a kernel for few channels
    #: over large images (by shape, presumably ``dtransform``'s 8 channels of 256x704 and
    #: ``downsample``'s 80 of 360x360). Compiled, they are Inductor's reductions fused with
    #: the ReLUs; the gain is not measured yet.
    turbox_compile_submodules = ('dtransform', 'depthnet', 'downsample')

    def __init__(self, in_channels: int, out_channels: int, image_size: Sequence[int],
                 feature_size: Sequence[int], xbound: Sequence[float], ybound: Sequence[float],
                 zbound: Sequence[float], dbound: Sequence[float], downsample: int = 1,
                 op_impl: str = 'stock', bev_pool_impl: Optional[str] = None,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if downsample not in (1, 2):
            raise ValueError(f'DepthLSSTransform: downsample must be 1 or 2, got {downsample}')
        self.op_impl = check_op_impl('DepthLSSTransform', op_impl)
        self.bev_pool_impl = check_op_impl('DepthLSSTransform', bev_pool_impl or op_impl)
        self.image_size = tuple(int(s) for s in image_size)
        self.feature_size = tuple(int(s) for s in feature_size)
        dx, bx, nx = bev_grid(xbound, ybound, zbound)
        self.register_buffer('dx', dx, persistent=False)
        self.register_buffer('bx', bx, persistent=False)
        self.register_buffer('nx', nx, persistent=False)
        self.register_buffer('frustum', self._frustum(dbound), persistent=False)
        self.C = out_channels
        self.D = self.frustum.shape[0]
        self.dtransform = nn.Sequential(*conv_bn_relu(1, 8, 1),
                                        *conv_bn_relu(8, 32, 5, stride=4, padding=2),
                                        *conv_bn_relu(32, 64, 5, stride=2, padding=2))
        self.depthnet = nn.Sequential(*conv_bn_relu(in_channels + 64, in_channels, 3, padding=1),
                                      *conv_bn_relu(in_channels, in_channels, 3, padding=1),
                                      nn.Conv2d(in_channels, self.D + self.C, 1))
        if downsample > 1:
            self.downsample = nn.Sequential(
                *conv_bn_relu(out_channels, out_channels, 3, padding=1, bias=False),
                *conv_bn_relu(out_channels, out_channels, 3, stride=downsample, padding=1,
                              bias=False),
                *conv_bn_relu(out_channels, out_channels, 3, padding=1, bias=False))
        else:
            self.downsample = nn.Identity()
        # the pooling grid, as float32 values of upstream's tensors
        self._lower, self._cell, self._cells = pooling_grid(dx, bx, nx)

    def _frustum(self, dbound: Sequence[float]) -> Tensor:
        return image_frustum(self.image_size, self.feature_size, dbound)

    def get_geometry(self, camera2lidar_rots: Tensor, camera2lidar_trans: Tensor,
                     intrins: Tensor, post_rots: Tensor, post_trans: Tensor,
                     extra_rots: Optional[Tensor] = None,
                     extra_trans: Optional[Tensor] = None) -> Tensor:
        """The BEV-frame point of every frustum point of every camera: ``[B, N, D, fH, fW,
        3]`` (``extra_*``: the lidar augmentation, ``[B, 3, 3]`` and ``[B, 3]``)."""
        batch = camera2lidar_trans.shape[0]
        pts = unproject_frustum(self.frustum, camera2lidar_rots, camera2lidar_trans, intrins,
                                post_rots, post_trans, sync_free=self.op_impl == 'turbox')
        if extra_rots is not None:
            pts = rotate_points(extra_rots.view(batch, 1, 1, 1, 1, 3, 3), pts,
                                elementwise=self.op_impl == 'turbox')
        if extra_trans is not None:
            pts = pts + extra_trans.view(batch, 1, 1, 1, 1, 3)
        return pts

    def depth_image(self, points: List[Tensor], lidar2image: Tensor, img_aug_matrix: Tensor,
                    lidar_aug_matrix: Tensor) -> Tensor:
        """``[B, N, 1, H, W]`` lidar depth images (:mod:`.lidar_depth`)."""
        draw = depth_image_batched if self.op_impl == 'turbox' else depth_image_stock
        return draw(points, lidar2image, img_aug_matrix, lidar_aug_matrix, self.image_size)

    def pool(self, depth_logits: Tensor, context: Tensor, geom: Tensor) -> Tensor:
        """Softmax over the bins, times the context, summed into the BEV: ``[B, Z * C, X,
        Y]`` (``depth_logits [B, N, D, fH, fW]``, ``context [B, N, C, fH, fW]``)."""
        if self.bev_pool_impl == 'turbox':
            return bev_pool(depth_logits, context, geom, self._lower, self._cell, self._cells,
                            depth_logits=True)
        return self._pool_stock(depth_logits.softmax(2), context, geom)

    def _pool_stock(self, depth: Tensor, context: Tensor, geom: Tensor) -> Tensor:
        """Upstream's PyTorch procedure (:func:`~turbox_mm.models.layers.lss.pool_stock`):
        the product, a boolean filter of the kept points, an index sum, the z cells stacked
        into channels."""
        return pool_stock(depth, context, geom, self._lower, self._cell, self._cells)

    def forward(self, img: Tensor, points: List[Tensor], lidar2image: Tensor,
                cam_intrinsic: Tensor, camera2lidar: Tensor, img_aug_matrix: Tensor,
                lidar_aug_matrix: Tensor, metas=None, **kwargs) -> Tensor:
        """Camera features ``img [B, N, C_in, fH, fW]`` to the BEV ``[B, C, X', Y']``.

        The matrices are ``[B, N, 4, 4]`` (``lidar_aug_matrix``: ``[B, 4, 4]``).
        """
        batch, cams, channels, fh, fw = img.shape
        geom = self.get_geometry(camera2lidar[..., :3, :3], camera2lidar[..., :3, 3],
                                 cam_intrinsic[..., :3, :3], img_aug_matrix[..., :3, :3],
                                 img_aug_matrix[..., :3, 3], lidar_aug_matrix[..., :3, :3],
                                 lidar_aug_matrix[..., :3, 3])
        depth = self.depth_image(points, lidar2image, img_aug_matrix, lidar_aug_matrix)
        depth = self.dtransform(depth.view(batch * cams, 1, *self.image_size))
        net = self.depthnet(torch.cat([depth, img.view(batch * cams, channels, fh, fw)], 1))
        logits = net[:, :self.D].view(batch, cams, self.D, fh, fw)
        context = net[:, self.D:self.D + self.C].view(batch, cams, self.C, fh, fw)
        return self.downsample(self.pool(logits, context, geom))
