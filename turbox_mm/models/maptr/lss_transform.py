"""``LSSTransform``: MapTR v2's BEV encoder, lift-splat with BEVDepth's camera-aware depth net
and depth supervision (upstream ``maptr/modules/encoder.py`` @ 69ab751, ``LSSTransform`` on
``BaseTransform``, plus the flattening of ``MapTRPerceptionTransformer.lss_bev_encode`` in
``transformer.py`` @ 69ab751); docs/design/maptr.md, section 3.2.

The detector calls it as its ``bev_encoder``: ``forward(mlvl_feats, img_metas, prev_bev=None)``
-> ``(bev_embed, depth)``:

1. **Features**: ``mlvl_feats[feat_down_sample_indice]`` (upstream's transformer argument,
   -1: the last level), ``[B, N, C_in, fH, fW]``, in float32 with autocast off (upstream's
   head and this transform are ``force_fp32``).
2. **Matrices** from ``img_metas``: ``camera2ego``, ``camera_intrinsics``, ``img_aug_matrix``
   (``N x 4 x 4`` per sample) and ``lidar2ego`` (``4 x 4``). ``lidar2img`` is not read
   (upstream uploads it and never uses it).
3. **Frustum** ``[D, fH, fW, 3]`` from the first sample's first ``img_shape`` ``(H, W)``:
   ``u = linspace(0, W - 1, fW)``, ``v = linspace(0, H - 1, fH)``, ``d = arange(*dbound)``;
   ``H // feat_down_sample`` must be ``fH`` (and here ``W // feat_down_sample`` ``fW``), else
   ``ValueError``. Cached per image and feature size (upstream builds it once, on the first
   call, and never checks again).
4. **Geometry** ``[B, N, D, fH, fW, 3]`` (:meth:`LSSTransform.get_geometry`): the image
   augmentation undone, ``(u d, v d, d)``, ``camera2ego``'s ``R K^-1`` and ``t``, then into
   the lidar frame through the inverse of ``lidar2ego`` (``R^-1 (p - t)``).
5. **Depth net** (:class:`~turbox_mm.models.maptr.depth_net.DepthNet`) on the features and
   the 22 camera numbers of :meth:`LSSTransform.get_mlp_input`: ``D`` logits, ``C`` context.
6. **Pooling**: softmax over the bins times the context, summed per BEV cell
   (``trunc((p - lower) / cell)``, points outside dropped) -> ``[B, C, Y, X]`` with rows along
   ``y`` (upstream pools to ``[B, C, X, Y]`` and permutes), then ``downsample`` (3x3
   conv-BN-ReLU, 3x3 stride 2 conv-BN-ReLU, 3x3 conv-BN-ReLU, no biases, with ``downsample=2``).
7. **Outputs**: ``bev_embed`` ``[B, bev_h * bev_w, C]`` float32, query ``row * bev_w + col``,
   row = ``y`` cell (row 0 at ``y = pc_range[1]``), column = ``x`` cell: MapTR v2's grid
   ``[-15, 15] x [-30, 30]`` at 0.15 m gives 200 x 400 cells, 100 x 200 after the stride
   (``bev_h = 200``, ``bev_w = 100``, as v1's encoder). ``depth`` ``[B, N, D, fH, fW]`` float32:
   the depth probabilities (softmax over the bins), what upstream returns and
   :meth:`LSSTransform.get_depth_loss` takes.

``op_impl``: ``'stock'`` runs upstream's procedure (one synchronous upload per matrix,
``torch.inverse``, the depth loss with boolean-mask indexing and a Python ``max`` on the
count); ``'turbox'`` gives the same values without host syncs: the matrices packed on the host
and uploaded once through pinned memory, inverses without the singularity check
(``torch.linalg.inv_ex``), the frustum's products as float32 multiply-adds (the same sums
rounded in another order; no batched matrix-vector launches, no TF32), the depth loss with
a gather and masked sums, the depth net's ASPP global average broadcast over the map rather
than interpolated from 1x1 (the same values; no contended atomic adds in its backward).
``bev_pool_impl``
(defaults to ``op_impl``) picks the pooling alone: ``'stock'`` as upstream's PyTorch code (the
``[B, N, D, fH, fW, C]`` product, a boolean filter, an index sum:
:func:`~turbox_mm.models.layers.lss.pool_stock`, shared with BEVFusion's
``DepthLSSTransform``), ``'turbox'`` :func:`turbox_mm.ops.bev_pool.bev_pool` with the softmax
fused (the product never stored). The op's cells are upstream's: the same float32 ``lower`` and
cell size, IEEE division and truncation (tested on MapTR v2's grid); the turbox path hands it the
points with ``x`` and ``y`` swapped so that its channels-last output is already the ``[B, C, Y,
X]`` layout (no transpose of the BEV). Upstream's pooling op (mmdet3d 0.17's ``bev_pool``)
sums like both; the order of the additions, hence the last bits, differ.

Depth loss (:meth:`LSSTransform.get_depth_loss`, upstream's procedure): ``gt_depth [B, N, H,
W]`` (0: no lidar point); per ``feat_down_sample`` patch the smallest non-zero depth (none:
1e5); bin ``k = trunc((d - (d_min - step)) / step)`` if ``0 <= (d - (d_min - step)) / step <
D + 1`` else 0; one-hot over ``D + 1`` with column 0 dropped (so ``k = 0`` and the empty
patches have no label); binary cross-entropy between the probabilities and the one-hot only at
the elements where the label is 1 (``-log p`` of the true bin, log clamped at -100), summed,
divided by ``max(1, number of labelled patches)``, times ``loss_depth_weight``, float32 with
autocast off. With no labelled patch at all the loss is 0 (upstream: the empty sum over 1), with
zero gradients; the turbox path gives the same.

Not built: upstream's ``MapTRPerceptionTransformer`` also builds ``can_bus_mlp``,
``cams_embeds`` and ``level_embeds``, which feed nothing with an LSS encoder (hence its
``find_unused_parameters``), and its head builds ``positional_encoding`` whose output is unused.
Their keys in an upstream checkpoint are unexpected keys here. The grid tensors ``dx``, ``bx``,
``nx`` are buffers, not saved (upstream: frozen parameters, so unexpected keys too).
Checkpoint keys (:meth:`LSSTransform.upstream_key`):

==============================================  ==============================
upstream                                        here
==============================================  ==============================
``pts_bbox_head.transformer.encoder.<rest>``    ``<rest>`` (``depth_net.*``,
                                                ``downsample.*``)
``pts_bbox_head.transformer.encoder.dx|bx|nx``  not loaded (buffers)
``pts_bbox_head.transformer.can_bus_mlp.*``,    not built
``cams_embeds``, ``level_embeds``
==============================================  ==============================

Initialisation: :meth:`LSSTransform.init_weights` is upstream's effective one (its head's init
calls the transformer's, which makes every parameter with more than one dimension
Xavier-uniform, this encoder's included; biases and norms keep their construction init).

Deviations from upstream: ``grid_config`` defaults to ``dict(depth=dbound)`` (upstream needs it
for the loss and has no default; its ``x``/``y``/``z`` entries are unused there as here: the
grid comes from ``pc_range`` and ``voxel_size``); the frustum is checked and cached per image
size; ``get_depth_loss`` returns a zero tensor rather than the int 0 when ``depth`` is None.
"""
import math
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.model import BaseModule
from torch import Tensor, nn

from turbox_mm.ops.bev_pool import bev_pool
from turbox_mm.ops.dispatch import check_op_impl
from turbox_mm.registry import MODELS
from turbox_mm.utils.upload import upload
from ..layers.lss import (bev_grid, conv_bn_relu, image_frustum, inverse, pool_stock,
                          pooling_grid, rotate_points, unproject_frustum)
from .depth_net import DepthNet

#: Per-camera metainfo matrices the transform reads (``N x 4 x 4`` per sample), and the
#: per-sample one (``4 x 4``).
CAMERA_KEYS = ('camera2ego', 'camera_intrinsics', 'img_aug_matrix')
LIDAR_KEY = 'lidar2ego'
#: Upstream checkpoint prefix of this encoder, and its keys that are buffers here.
UPSTREAM_PREFIX = 'pts_bbox_head.transformer.encoder.'
UPSTREAM_BUFFERS = ('dx', 'bx', 'nx')


@MODELS.register_module()
class LSSTransform(BaseModule):
    """MapTR v2's LSS BEV encoder (module docstring).

    Args:
        in_channels (int): Image feature channels (256).
        out_channels (int): BEV channels ``C`` (256).
        feat_down_sample (int): Image to feature stride (32).
        pc_range (Sequence[float]): ``[x_min, y_min, z_min, x_max, y_max, z_max]`` of the grid.
        voxel_size (Sequence[float]): Cell size ``(x, y, z)`` ([0.15, 0.15, 20]).
        dbound (Sequence[float]): ``(min, max, step)`` of the depth bins ([1, 35, 0.5]: 68).
        downsample (int): 1 or 2, the stride after pooling. Defaults to 1 (upstream's
            default; its v2 config: 2).
        loss_depth_weight (float): Defaults to 3.0.
        depthnet_cfg (dict, optional): :class:`DepthNet` options (``use_dcn``, ``with_cp``,
            ``aspp_mid_channels``, ...). Defaults to None (DepthNet's defaults).
        grid_config (dict, optional): Only ``depth`` ``(min, max, step)`` is read (the loss's
            bins). Defaults to ``dict(depth=dbound)``.
        feat_down_sample_indice (int): Which feature level to lift. Defaults to -1.
        op_impl (str): ``'stock'`` or ``'turbox'`` (module docstring). Defaults to 'stock'.
        bev_pool_impl (str, optional): The pooling alone; defaults to ``op_impl``.
        init_cfg (dict, optional): mmengine's. Defaults to None.

    Examples:
        >>> vt = LSSTransform(8, 4, 16, [-4, -8, -10, 4, 8, 10], [1, 1, 20], [1, 9, 2],
        ...                   downsample=2, depthnet_cfg=dict(use_dcn=False,
        ...                   aspp_mid_channels=4)).eval()
        >>> meta = dict(camera2ego=[np.eye(4)], camera_intrinsics=[np.eye(4)],
        ...             img_aug_matrix=[np.eye(4)], lidar2ego=np.eye(4),
        ...             img_shape=[(32, 48, 3)])
        >>> bev, depth = vt([torch.randn(2, 1, 8, 2, 3)], [meta, meta])
        >>> bev.shape, depth.shape, (vt.bev_h, vt.bev_w)
        (torch.Size([2, 32, 4]), torch.Size([2, 1, 4, 2, 3]), (8, 4))
    """

    #: What ``turbox.compile.modules='auto'`` compiles here: the depth network and the
    #: ``downsample`` convolutions (fixed shapes, no data-dependent branch), as BEVFusion's
    #: ``DepthLSSTransform`` does; the matrices, the geometry and the pooling stay eager.
    #: Tested with the configs' ``use_dcn=False``; with mmcv's deformable convolution in the
    #: depth network (``use_dcn=True``) it is not. The gain is not measured yet.
    turbox_compile_submodules = ('depth_net', 'downsample')

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 feat_down_sample: int,
                 pc_range: Sequence[float],
                 voxel_size: Sequence[float],
                 dbound: Sequence[float],
                 downsample: int = 1,
                 loss_depth_weight: float = 3.0,
                 depthnet_cfg: Optional[dict] = None,
                 grid_config: Optional[dict] = None,
                 feat_down_sample_indice: int = -1,
                 op_impl: str = 'stock',
                 bev_pool_impl: Optional[str] = None,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        name = type(self).__name__
        self.op_impl = check_op_impl(name, op_impl)
        self.bev_pool_impl = check_op_impl(name, bev_pool_impl or op_impl)
        if downsample not in (1, 2):
            raise ValueError(f'{name}: downsample must be 1 or 2, got {downsample}')
        self.in_channels = in_channels
        self.C = out_channels
        self.feat_down_sample = int(feat_down_sample)
        self.feat_down_sample_indice = feat_down_sample_indice
        self.xbound = [pc_range[0], pc_range[3], voxel_size[0]]
        self.ybound = [pc_range[1], pc_range[4], voxel_size[1]]
        self.zbound = [pc_range[2], pc_range[5], voxel_size[2]]
        self.dbound = list(dbound)
        self.D = int((dbound[1] - dbound[0]) / dbound[2])
        bins = torch.arange(*dbound).numel()
        if bins != self.D:
            raise ValueError(f'{name}: dbound {list(dbound)} gives {bins} depth bins but '
                             f'int((max - min) / step) = {self.D}; make them agree')
        self.grid_config = dict(grid_config) if grid_config else dict(depth=list(dbound))
        if 'depth' not in self.grid_config:
            raise ValueError(f"{name}: grid_config needs 'depth' (min, max, step), got "
                             f'{sorted(self.grid_config)}')
        self.loss_depth_weight = loss_depth_weight
        dx, bx, nx = bev_grid(self.xbound, self.ybound, self.zbound)
        self.register_buffer('dx', dx, persistent=False)
        self.register_buffer('bx', bx, persistent=False)
        self.register_buffer('nx', nx, persistent=False)
        self._lower, self._cell, self._cells = pooling_grid(dx, bx, nx)
        if downsample > 1 and self._cells[2] != 1:
            raise ValueError(f'{name}: the downsample convolutions take {out_channels} '
                             f'channels, so the grid needs one z cell, got {self._cells[2]}')
        self.downsample_factor = downsample
        # the turbox path broadcasts the ASPP's global average (the same values) where
        # upstream interpolates a 1x1 map, unless depthnet_cfg says otherwise
        self.depth_net = DepthNet(in_channels, in_channels, self.C, self.D,
                                  **{'aspp_broadcast_pool': self.op_impl == 'turbox',
                                     **(depthnet_cfg or {})})
        if downsample > 1:
            self.downsample = nn.Sequential(
                *conv_bn_relu(out_channels, out_channels, 3, padding=1, bias=False),
                *conv_bn_relu(out_channels, out_channels, 3, stride=downsample, padding=1,
                              bias=False),
                *conv_bn_relu(out_channels, out_channels, 3, padding=1, bias=False))
        else:
            self.downsample = nn.Identity()
        self._frusta: Dict[tuple, Tensor] = {}

    @property
    def bev_h(self) -> int:
        """BEV rows (``y`` cells after the stride)."""
        return math.ceil(self._cells[1] / self.downsample_factor)

    @property
    def bev_w(self) -> int:
        """BEV columns (``x`` cells after the stride)."""
        return math.ceil(self._cells[0] / self.downsample_factor)

    def init_weights(self) -> None:
        """Upstream's effective init (module docstring): Xavier-uniform on every parameter
        with more than one dimension; with an ``init_cfg``, mmengine's init instead."""
        if self.init_cfg is not None:
            super().init_weights()
            return
        for param in self.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)
        self._is_init = True

    @staticmethod
    def upstream_key(key: str) -> Optional[str]:
        """This module's key for a key of upstream's MapTR v2 checkpoint; None if it is not a
        parameter of this encoder (module docstring).

        Examples:
            >>> LSSTransform.upstream_key('pts_bbox_head.transformer.encoder.depth_net.bn.weight')
            'depth_net.bn.weight'
            >>> LSSTransform.upstream_key('pts_bbox_head.transformer.cams_embeds') is None
            True
        """
        if not key.startswith(UPSTREAM_PREFIX):
            return None
        rest = key[len(UPSTREAM_PREFIX):]
        return None if rest in UPSTREAM_BUFFERS else rest

    # -- host data ------------------------------------------------------------------------------

    def frustum(self, img_metas: Sequence[dict], feature_size: Tuple[int, int],
                device: torch.device) -> Tensor:
        """The ``[D, fH, fW, 3]`` frustum of the first sample's first ``img_shape`` (module
        docstring), cached per size and device (turbox: uploaded without a host wait)."""
        shape = img_metas[0]['img_shape']
        first = shape if isinstance(shape[0], (int, np.integer)) else shape[0]
        height, width = int(first[0]), int(first[1])
        fh, fw = feature_size
        ds = self.feat_down_sample
        if height // ds != fh or width // ds != fw:
            raise ValueError(f'{type(self).__name__}: the image features are {fh} x {fw} but '
                             f'img_shape {height} x {width} // feat_down_sample {ds} is '
                             f'{height // ds} x {width // ds}')
        key = (height, width, fh, fw, str(device))
        if key not in self._frusta:
            frustum = image_frustum((height, width), (fh, fw), self.dbound)
            self._frusta[key] = (upload(frustum, device) if self.op_impl == 'turbox'
                                 else frustum.to(device))
        return self._frusta[key]

    @staticmethod
    def _host_matrices(img_metas: Sequence[dict], cams: int) -> Dict[str, np.ndarray]:
        """The metas' matrices as float64 arrays, ``[B, N, 4, 4]`` per camera key and
        ``[B, 4, 4]`` for ``lidar2ego``; named errors for missing keys or wrong shapes."""
        out = {}
        for key, shape in [(k, (cams, 4, 4)) for k in CAMERA_KEYS] + [(LIDAR_KEY, (4, 4))]:
            rows = []
            for index, meta in enumerate(img_metas):
                if key not in meta:
                    raise KeyError(f"LSSTransform: sample {index} lacks {key!r} in its "
                                   'metainfo (turbox_mm.NuScenesMapTRAdaptor adds it)')
                value = np.asarray(meta[key], dtype=np.float64)
                if value.shape != shape:
                    raise ValueError(f'LSSTransform: sample {index} {key} must be {shape} for '
                                     f'{cams} cameras, got {value.shape}')
                rows.append(value)
            out[key] = np.stack(rows)
        return out

    def matrices(self, img_metas: Sequence[dict], cams: int,
                 like: Tensor) -> Dict[str, Tensor]:
        """The matrices as float32 tensors on ``like``'s device: stock one synchronous upload
        each (upstream's ``new_tensor``), turbox one pinned non-blocking upload for all."""
        host = self._host_matrices(img_metas, cams)
        if self.op_impl == 'stock':
            return {key: like.new_tensor(value, dtype=torch.float32)
                    for key, value in host.items()}
        batch = len(img_metas)
        packed = np.concatenate([host[key] for key in CAMERA_KEYS] +
                                [host[LIDAR_KEY][:, None]], axis=1)  # [B, 3N + 1, 4, 4]
        packed = upload(packed, like.device, torch.float32)
        out = {key: packed[:, i * cams:(i + 1) * cams] for i, key in enumerate(CAMERA_KEYS)}
        out[LIDAR_KEY] = packed[:, 3 * cams].view(batch, 4, 4)
        return out

    # -- geometry and depth net ----------------------------------------------------------------

    def get_geometry(self, frustum: Tensor, camera2ego: Tensor, camera_intrinsics: Tensor,
                     img_aug_matrix: Tensor, lidar2ego: Tensor) -> Tensor:
        """The lidar-frame point of every frustum point of every camera:
        ``[B, N, D, fH, fW, 3]`` (matrices ``[B, N, 4, 4]``, ``lidar2ego`` ``[B, 4, 4]``)."""
        sync_free = self.op_impl == 'turbox'
        pts = unproject_frustum(frustum, camera2ego[..., :3, :3], camera2ego[..., :3, 3],
                                camera_intrinsics[..., :3, :3], img_aug_matrix[..., :3, :3],
                                img_aug_matrix[..., :3, 3], sync_free=sync_free)
        batch = pts.shape[0]
        pts = pts - lidar2ego[:, :3, 3].view(batch, 1, 1, 1, 1, 3)
        rots = inverse(lidar2ego[:, :3, :3], sync_free).view(batch, 1, 1, 1, 1, 3, 3)
        return rotate_points(rots, pts, elementwise=sync_free)

    @staticmethod
    def get_mlp_input(camera2ego: Tensor, intrin: Tensor, post_rot: Tensor,
                      post_tran: Tensor) -> Tensor:
        """The depth net's 22 camera numbers ``[B, N, 22]``: fx, fy, cx, cy; the
        augmentation's r00, r01, t0, r10, r11, t1; the top three rows of ``camera2ego``."""
        batch, cams = camera2ego.shape[:2]
        mlp_input = torch.stack([
            intrin[:, :, 0, 0], intrin[:, :, 1, 1], intrin[:, :, 0, 2], intrin[:, :, 1, 2],
            post_rot[:, :, 0, 0], post_rot[:, :, 0, 1], post_tran[:, :, 0],
            post_rot[:, :, 1, 0], post_rot[:, :, 1, 1], post_tran[:, :, 1]], dim=-1)
        return torch.cat([mlp_input, camera2ego[:, :, :3, :].reshape(batch, cams, -1)], dim=-1)

    # -- pooling --------------------------------------------------------------------------------

    def pool(self, logits: Tensor, depth: Tensor, context: Tensor, geom: Tensor) -> Tensor:
        """The BEV before ``downsample``: ``[B, Z * C, Y, X]`` (rows along ``y``).

        Args:
            logits (Tensor): ``[B, N, D, fH, fW]`` depth logits (the turbox op's input).
            depth (Tensor): Their softmax over ``D`` (the stock pooling's input).
            context (Tensor): ``[B, N, C, fH, fW]``.
            geom (Tensor): ``[B, N, D, fH, fW, 3]`` points ``(x, y, z)``.
        """
        if self.bev_pool_impl == 'turbox':
            # y, x, z: the op's [B, Z*C, Y, X] output (channels-last) is the layout wanted
            yxz = torch.stack((geom[..., 1], geom[..., 0], geom[..., 2]), -1)
            order = (1, 0, 2)
            return bev_pool(logits, context, yxz, [self._lower[i] for i in order],
                            [self._cell[i] for i in order], [self._cells[i] for i in order],
                            depth_logits=True)
        bev = pool_stock(depth, context, geom, self._lower, self._cell, self._cells)
        return bev.permute(0, 1, 3, 2).contiguous()

    # -- forward --------------------------------------------------------------------------------

    def forward(self, mlvl_feats: Union[Sequence[Tensor], Tensor], img_metas: Sequence[dict],
                prev_bev: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """``(bev_embed [B, bev_h * bev_w, C], depth [B, N, D, fH, fW])``, float32 (module
        docstring). ``prev_bev`` is accepted and unused (upstream's LSS has no history)."""
        feats = mlvl_feats if isinstance(mlvl_feats, Tensor) else \
            mlvl_feats[self.feat_down_sample_indice]
        if feats.dim() != 5:
            raise ValueError(f'{type(self).__name__}: image features must be [B, N, C, fH, '
                             f'fW], got {tuple(feats.shape)}')
        batch, cams, channels, fh, fw = feats.shape
        if len(img_metas) != batch:
            raise ValueError(f'{type(self).__name__}: {len(img_metas)} img_metas for a batch '
                             f'of {batch}')
        with torch.autocast(device_type=feats.device.type, enabled=False):
            feats = feats.float()
            mats = self.matrices(img_metas, cams, feats)
            img_aug = mats['img_aug_matrix']
            geom = self.get_geometry(self.frustum(img_metas, (fh, fw), feats.device),
                                     mats['camera2ego'], mats['camera_intrinsics'], img_aug,
                                     mats[LIDAR_KEY])
            mlp_input = self.get_mlp_input(mats['camera2ego'], mats['camera_intrinsics'],
                                           img_aug[..., :3, :3], img_aug[..., :3, 3])
            net = self.depth_net(feats.reshape(batch * cams, channels, fh, fw), mlp_input)
            logits = net[:, :self.D]
            depth = logits.softmax(dim=1).view(batch, cams, self.D, fh, fw)
            context = net[:, self.D:self.D + self.C].view(batch, cams, self.C, fh, fw)
            bev = self.downsample(
                self.pool(logits.view(batch, cams, self.D, fh, fw), depth, context, geom))
            bev_embed = bev.flatten(2).transpose(1, 2).contiguous()
        return bev_embed, depth

    # -- depth loss -----------------------------------------------------------------------------

    def _patch_bins(self, gt_depths: Tensor) -> Tensor:
        """Per ``feat_down_sample`` patch the smallest non-zero depth (1e5 where none) as the
        continuous bin ``(d - (d_min - step)) / step``: ``[B * N * h * w]``."""
        if gt_depths.dim() != 4:
            raise ValueError(f'{type(self).__name__}: gt_depth must be [B, N, H, W], got '
                             f'{tuple(gt_depths.shape)}')
        batch, cams, height, width = gt_depths.shape
        ds = self.feat_down_sample
        if height % ds or width % ds:
            raise ValueError(f'{type(self).__name__}: gt_depth {height} x {width} is not a '
                             f'multiple of feat_down_sample {ds}')
        patches = gt_depths.view(batch * cams, height // ds, ds, width // ds, ds, 1)
        patches = patches.permute(0, 1, 3, 5, 2, 4).contiguous().view(-1, ds * ds)
        patches = torch.where(patches == 0.0, 1e5 * torch.ones_like(patches), patches)
        nearest = torch.min(patches, dim=-1).values
        low, _, step = self.grid_config['depth']
        return (nearest - (low - step)) / step

    def get_downsampled_gt_depth(self, gt_depths: Tensor) -> Tensor:
        """Upstream's labels: ``[B * N * h * w, D]`` one-hot float (module docstring)."""
        bins = self._patch_bins(gt_depths)
        bins = torch.where((bins < self.D + 1) & (bins >= 0.0), bins, torch.zeros_like(bins))
        return F.one_hot(bins.long(), num_classes=self.D + 1).view(-1, self.D + 1)[:, 1:].float()

    def _depth_rows(self, depth: Tensor, rows: int) -> Tensor:
        """``depth [B, N, D, h, w]`` (or ``[B * N, D, h, w]``) as ``[B * N * h * w, D]``."""
        if depth.dim() not in (4, 5) or depth.shape[-3] != self.D:
            raise ValueError(f'{type(self).__name__}: depth must be [B, N, {self.D}, h, w], '
                             f'got {tuple(depth.shape)}')
        out = depth.float().movedim(-3, -1).reshape(-1, self.D)
        if out.shape[0] != rows:
            raise ValueError(f'{type(self).__name__}: depth {tuple(depth.shape)} has '
                             f'{out.shape[0]} pixels, gt_depth gives {rows} patches')
        return out

    def get_depth_loss(self, gt_depth: Tensor, depth: Optional[Tensor]) -> Tensor:
        """The depth loss, a float32 scalar (module docstring).

        Args:
            gt_depth (Tensor): ``[B, N, H, W]`` lidar depth per pixel of the padded image, 0
                where no point.
            depth (Tensor): ``[B, N, D, H / s, W / s]`` probabilities of :meth:`forward`.
        """
        if depth is None:
            return gt_depth.new_zeros((), dtype=torch.float32)
        with torch.autocast(device_type=gt_depth.device.type, enabled=False):
            gt_depth = gt_depth.float()
            if self.op_impl == 'turbox':
                loss = self._depth_loss_sync_free(gt_depth, depth)
            else:
                labels = self.get_downsampled_gt_depth(gt_depth)
                preds = self._depth_rows(depth, labels.shape[0])
                fg_mask = labels > 0.0
                labels, preds = labels[fg_mask], preds[fg_mask]
                loss = F.binary_cross_entropy(preds, labels, reduction='none').sum() / max(
                    1.0, fg_mask.sum())
        return self.loss_depth_weight * loss

    def _depth_loss_sync_free(self, gt_depth: Tensor, depth: Tensor) -> Tensor:
        """The stock loss's value without host syncs: the true bin's probability by a gather,
        the labelled patches by a mask, ``sum / clamp(count, 1)`` on the device."""
        bins = self._patch_bins(gt_depth)
        inside = (bins < self.D + 1) & (bins >= 0.0)
        label = torch.where(inside, bins, torch.zeros_like(bins)).long()
        labelled = label >= 1  # label 0 is the dropped one-hot column
        preds = self._depth_rows(depth, label.shape[0])
        prob = preds.gather(1, (label - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        bce = F.binary_cross_entropy(prob, torch.ones_like(prob), reduction='none')
        count = labelled.sum()
        return (bce * labelled).sum() / count.clamp(min=1)
