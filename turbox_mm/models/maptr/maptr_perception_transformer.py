"""``MapTRPerceptionTransformer``: MapTR v1's BEV encoder, the BEV half of upstream's
``MapTRPerceptionTransformer`` (``maptr/modules/transformer.py`` @ 8704e6b, ``attn_bev_encode``)
plus the BEV queries and positional encoding that upstream's head owns
(``dense_heads/maptr_head.py`` @ 50f2ecd); docs/design/maptr.md, section 3.1.

The detector (:class:`.MapTR`) calls it as its ``bev_encoder``:
``bev_encoder(mlvl_feats, img_metas, prev_bev=None)`` -> the BEV embedding ``[B, H * W, C]``
(row-major over ``y`` then ``x``), which :class:`.MapTRHead` decodes. Per forward:

- the BEV queries ``bev_embedding`` ``[H * W, C]`` plus, per sample, ``can_bus_mlp`` of its
  18 can-bus values (``18 -> C/2 -> C``, ReLU after each, LayerNorm);
- ``bev_pos`` from the learned positional encoding (channels ``0 .. C/2`` the column, the rest
  the row);
- camera features ``[B, N, C, h, w]`` per level, flattened to ``[B, N, h * w, C]``, plus
  ``cams_embeds[n]`` and ``level_embeds[l]``, levels concatenated;
- the layers of :class:`.BEVFormerEncoder` (projection of the pillars with each sample's
  ``lidar2img`` and the first sample's first ``img_shape``, as upstream).

Where upstream's parameters are (checkpoint keys of upstream's ``MapTR`` -> this module's,
:meth:`MapTRPerceptionTransformer.upstream_key`):

==============================================  ===========================
upstream                                        here
==============================================  ===========================
``pts_bbox_head.bev_embedding.*``               ``bev_embedding.*``
``pts_bbox_head.positional_encoding.*``         ``positional_encoding.*``
``pts_bbox_head.transformer.level_embeds``      ``level_embeds``
``pts_bbox_head.transformer.cams_embeds``       ``cams_embeds``
``pts_bbox_head.transformer.can_bus_mlp.*``     ``can_bus_mlp.*``
``pts_bbox_head.transformer.encoder.*``         ``encoder.*``
``pts_bbox_head.transformer.decoder.*``         the head's ``decoder.*``
``pts_bbox_head.transformer.reference_points``  the head's ``reference_points``
==============================================  ===========================

Inside ``encoder.layers.<i>``: ``attentions.0`` temporal self-attention (``sampling_offsets``,
``attention_weights``, ``value_proj``, ``output_proj``), ``attentions.1`` spatial
cross-attention (``output_proj``; ``attention.attention_weights``, ``attention.value_proj``),
``ffns.0.layers.0.0`` / ``ffns.0.layers.1``, ``norms.0-2``: upstream's names.

``op_impl`` (``'stock'`` or ``'turbox'``) is passed on to every part (the deformable attention's
and the kernel attention's ops, the spatial cross-attention's rebatching); here it also picks
how the samples' host data reach the device: stock as upstream (``new_tensor`` from the metas,
a synchronous copy each: ``lidar2img``, ``can_bus``, the BEV shift, the level tables), turbox
through pinned memory without a host wait (the level tables cached per device, the shift only
computed when a previous BEV needs it).

Precision, as upstream: the image features and the previous BEV enter as float32 (upstream's
head is ``force_fp32`` on them); the layers run under whatever autocast is active, except the
projection of the reference points and the spatial cross-attention (float32, autocast off).
"""
import copy
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from mmengine.model import BaseModule
from torch import Tensor, nn

from turbox_mm.ops.dispatch import check_op_impl
from turbox_mm.registry import MODELS
from turbox_mm.utils.upload import upload
from .bevformer_encoder import PC_RANGE, BEVFormerEncoder
from .bevformer_layer import ATTN_CFGS
from .geometry_spatial_cross_attention import GKT_CFG
from .scoped_build import build_scoped
from .temporal_self_attention import TemporalSelfAttention

#: Upstream checkpoint prefixes (MapTR's detector) and this module's (module docstring).
UPSTREAM_PREFIXES = (
    ('pts_bbox_head.bev_embedding.', 'bev_embedding.'),
    ('pts_bbox_head.positional_encoding.', 'positional_encoding.'),
    ('pts_bbox_head.transformer.level_embeds', 'level_embeds'),
    ('pts_bbox_head.transformer.cams_embeds', 'cams_embeds'),
    ('pts_bbox_head.transformer.can_bus_mlp.', 'can_bus_mlp.'),
    ('pts_bbox_head.transformer.encoder.', 'encoder.'),
)


@MODELS.register_module()
class MapTRPerceptionTransformer(BaseModule):
    """MapTR v1's BEV encoder (module docstring); defaults are ``maptr_tiny_r50_24e``'s.

    Args:
        bev_h, bev_w (int): The BEV grid (rows along ``y``, columns along ``x``). Defaults to
            200, 100.
        pc_range (list[float]): Point cloud range (also the encoder's unless it sets one).
            Defaults to ``[-15, -30, -2, 15, 30, 2]``.
        embed_dims (int): C. Defaults to 256.
        num_feature_levels (int): Rows of ``level_embeds`` (upstream's default 4; MapTR uses
            level 0). Defaults to 4.
        num_cams (int): Cameras N (``cams_embeds`` rows; also the spatial cross-attention's
            unless set). Defaults to 6.
        encoder (dict): :class:`.BEVFormerEncoder` config (upstream's keys; plain type names
            are looked up in turbox_mm first). Defaults to MapTR v1's one layer.
        positional_encoding (dict): Defaults to mmdet's ``LearnedPositionalEncoding(C / 2,
            bev_h, bev_w)``.
        rotate_prev_bev (bool): Rotate a previous BEV by the can-bus yaw change
            (torchvision's ``rotate``, as upstream). Defaults to True.
        use_shift (bool): Shift the previous BEV's reference points by the ego motion.
            Defaults to True.
        use_can_bus (bool): Add the can-bus MLP to the queries. Defaults to True.
        len_can_bus (int): Can-bus values used. Defaults to 18.
        can_bus_norm (bool): LayerNorm at the end of the can-bus MLP. Defaults to True.
        use_cams_embeds (bool): Add the camera embeddings. Defaults to True.
        rotate_center (list[int]): Centre ``(x, y)`` pixel of the rotation. Defaults to
            ``[100, 100]`` (upstream's, not the grid's centre).
        modality (str): Only ``'vision'``. Defaults to 'vision'.
        decoder (dict, optional): Must be None: :class:`.MapTRHead` owns the decoder.
        op_impl (str): ``'stock'`` or ``'turbox'`` (module docstring). Defaults to 'stock'.
        init_cfg (dict, optional): mmengine's init config. Defaults to None.

    Examples:
        >>> enc = MapTRPerceptionTransformer(
        ...     bev_h=4, bev_w=2, embed_dims=16, num_cams=1, encoder=dict(
        ...         transformerlayers=dict(feedforward_channels=32, attn_cfgs=[
        ...             dict(embed_dims=16, num_heads=2),
        ...             dict(embed_dims=16, attention=dict(embed_dims=16))])))
        >>> feats = [torch.randn(2, 1, 16, 3, 5)]
        >>> meta = dict(lidar2img=np.eye(4)[None], img_shape=[(96, 160)], can_bus=np.zeros(18))
        >>> enc(feats, [meta, meta]).shape
        torch.Size([2, 8, 16])
    """

    #: What ``turbox.compile.modules='auto'`` compiles of this module: the BEVFormer encoder
    #: (reference points, their projection into the cameras, the temporal self-attention and
    #: the geometric spatial cross-attention), whose turbox path has no data-dependent
    #: control flow (the stock path's per-camera ``nonzero`` breaks the graph). A call with a
    #: previous BEV (``video_test_mode`` at test time) is a graph of its own. The previous
    #: BEV's rotation, the can-bus MLP, the positional encoding, the uploads and the camera
    #: features' flattening stay eager.
    turbox_compile_submodules = ('encoder', )

    def __init__(self, bev_h: int = 200, bev_w: int = 100,
                 pc_range: Sequence[float] = PC_RANGE, embed_dims: int = 256,
                 num_feature_levels: int = 4, num_cams: int = 6, encoder: Optional[dict] = None,
                 positional_encoding: Optional[dict] = None, rotate_prev_bev: bool = True,
                 use_shift: bool = True, use_can_bus: bool = True, len_can_bus: int = 18,
                 can_bus_norm: bool = True, use_cams_embeds: bool = True,
                 rotate_center: Sequence[int] = (100, 100), modality: str = 'vision',
                 decoder: Optional[dict] = None, op_impl: str = 'stock',
                 init_cfg: Optional[dict] = None, **kwargs) -> None:
        super().__init__(init_cfg)
        name = type(self).__name__
        self.op_impl = check_op_impl(name, op_impl)
        if modality != 'vision':
            raise NotImplementedError(f"{name}: only modality='vision' is ported (MapTR's "
                                      'configs do not fuse lidar)')
        if decoder is not None:
            raise ValueError(f'{name}: the decoder belongs to MapTRHead here; configure it '
                             'there')
        self.bev_h, self.bev_w = bev_h, bev_w
        self.pc_range = list(pc_range)
        self.embed_dims = embed_dims
        self.num_feature_levels = num_feature_levels
        self.num_cams = num_cams
        self.rotate_prev_bev = rotate_prev_bev
        self.use_shift = use_shift
        self.use_can_bus = use_can_bus
        self.len_can_bus = len_can_bus
        self.use_cams_embeds = use_cams_embeds
        self.rotate_center = list(rotate_center)

        self.bev_embedding = nn.Embedding(bev_h * bev_w, embed_dims)
        self.positional_encoding = build_scoped(
            positional_encoding or dict(num_feats=embed_dims // 2, row_num_embed=bev_h,
                                        col_num_embed=bev_w),
            'mmdet.LearnedPositionalEncoding')
        self.level_embeds = nn.Parameter(torch.empty(num_feature_levels, embed_dims))
        self.cams_embeds = nn.Parameter(torch.empty(num_cams, embed_dims))
        self.can_bus_mlp = nn.Sequential(
            nn.Linear(len_can_bus, embed_dims // 2), nn.ReLU(inplace=True),
            nn.Linear(embed_dims // 2, embed_dims), nn.ReLU(inplace=True))
        if can_bus_norm:
            self.can_bus_mlp.add_module('norm', nn.LayerNorm(embed_dims))
        self.encoder = build_scoped(self._encoder_cfg(encoder), 'turbox_mm.BEVFormerEncoder')
        if not isinstance(self.encoder, BEVFormerEncoder):
            raise TypeError(f'{name}: encoder must be a BEVFormerEncoder (the LSS encoder is '
                            f'MapTR v2\'s), got {type(self.encoder).__name__}')
        self.register_buffer('bev_spatial_shapes', torch.tensor([[bev_h, bev_w]]),
                             persistent=False)
        self.register_buffer('bev_level_start_index', torch.tensor([0]), persistent=False)
        self._level_tables: Dict[tuple, Tuple[Tensor, Tensor]] = {}
        self.init_weights()

    def _encoder_cfg(self, encoder: Optional[dict]) -> dict:
        """The encoder's config with, unless set there, this module's ``op_impl`` and
        ``pc_range``, its ``embed_dims`` in the attentions (and the kernel attention) and its
        ``num_cams`` in the spatial cross-attention; layers without ``attn_cfgs`` get
        :data:`.ATTN_CFGS` so completed."""
        cfg = copy.deepcopy(dict(encoder or {}))
        cfg.setdefault('op_impl', self.op_impl)
        cfg.setdefault('pc_range', self.pc_range)
        layers = cfg.get('transformerlayers') or {}
        layers = [dict(c) for c in layers] if isinstance(layers, (list, tuple)) else dict(layers)
        for layer in layers if isinstance(layers, list) else [layers]:
            attns = [dict(c) for c in layer.get('attn_cfgs') or copy.deepcopy(ATTN_CFGS)]
            for attn in attns:
                attn.setdefault('embed_dims', self.embed_dims)
            if len(attns) == 2:
                attns[1].setdefault('num_cams', self.num_cams)
                kernel = dict(attns[1].get('attention') or GKT_CFG)
                kernel.setdefault('embed_dims', self.embed_dims)
                attns[1]['attention'] = kernel
            layer['attn_cfgs'] = attns
        cfg['transformerlayers'] = layers
        return cfg

    def init_weights(self) -> None:
        """Upstream's transformer init, on the parts it reaches: Xavier-uniform on every
        matrix of the encoder, the embeddings and the can-bus MLP; the temporal
        self-attentions' own init again; normal level and camera embeddings. Upstream's
        ``xavier_init(can_bus_mlp)`` is a no-op on a ``Sequential`` (no ``weight``), so the
        MLP's biases keep PyTorch's init. ``bev_embedding`` and the positional encoding are
        upstream's head's, whose init does not reach them: N(0, 1). The kernel attention is
        not re-initialised, so its attention weight matrix ends Xavier-uniform."""
        params = [self.level_embeds, self.cams_embeds, *self.can_bus_mlp.parameters(),
                  *self.encoder.parameters()]
        for param in params:
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)
        for module in self.encoder.modules():
            if isinstance(module, TemporalSelfAttention):
                module.init_weights()
        nn.init.normal_(self.level_embeds)
        nn.init.normal_(self.cams_embeds)
        self._is_init = True

    @staticmethod
    def upstream_key(key: str) -> Optional[str]:
        """This module's key for a key of upstream's MapTR checkpoint, None if it is not an
        encoder parameter (module docstring).

        Examples:
            >>> MapTRPerceptionTransformer.upstream_key('pts_bbox_head.transformer.cams_embeds')
            'cams_embeds'
        """
        for theirs, ours in UPSTREAM_PREFIXES:
            if key.startswith(theirs):
                return ours + key[len(theirs):]
        return None

    # -- host data ------------------------------------------------------------------------------

    def _to_device(self, values: List, device: torch.device) -> Tensor:
        """Per-sample values (arrays, lists or tensors) as one float32 tensor on ``device``:
        stock as upstream's ``new_tensor``, turbox through pinned memory."""
        if all(isinstance(v, Tensor) for v in values):
            batch = torch.stack([v.to(values[0].device) for v in values])
        else:
            batch = torch.from_numpy(np.asarray([
                v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v)
                for v in values], dtype=np.float64))
        if self.op_impl == 'turbox':
            return upload(batch, device, torch.float32)
        return batch.to(device=device, dtype=torch.float32)

    def _shift(self, metas: Sequence[dict]) -> np.ndarray:
        """``[B, 2]`` normalised ``(x, y)`` shift of the previous BEV from the can-bus
        translation and yaw (upstream's numpy arithmetic, float64)."""
        can_bus = np.asarray([np.asarray(m['can_bus'], dtype=np.float64) for m in metas])
        delta_x, delta_y = can_bus[:, 0], can_bus[:, 1]
        ego_angle = can_bus[:, -2] / np.pi * 180
        grid_length_y = (self.pc_range[4] - self.pc_range[1]) / self.bev_h
        grid_length_x = (self.pc_range[3] - self.pc_range[0]) / self.bev_w
        translation_length = np.sqrt(delta_x ** 2 + delta_y ** 2)
        translation_angle = np.arctan2(delta_y, delta_x) / np.pi * 180
        bev_angle = ego_angle - translation_angle
        shift_y = translation_length * np.cos(bev_angle / 180 * np.pi) / grid_length_y / self.bev_h
        shift_x = translation_length * np.sin(bev_angle / 180 * np.pi) / grid_length_x / self.bev_w
        return np.stack([shift_x * self.use_shift, shift_y * self.use_shift], -1)

    def _level_tables_of(self, feats: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
        """``spatial_shapes [levels, 2]`` and ``level_start_index [levels]`` of the camera
        features (turbox: uploaded without a host wait and cached per shapes and device)."""
        shapes = tuple((int(f.shape[-2]), int(f.shape[-1])) for f in feats)
        device = feats[0].device
        key = (shapes, str(device))
        if self.op_impl == 'turbox' and key in self._level_tables:
            return self._level_tables[key]
        if self.op_impl == 'turbox':
            spatial_shapes = upload(np.asarray(shapes, dtype=np.int64).reshape(-1, 2), device)
        else:
            spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=device)
        start = torch.cat((spatial_shapes.new_zeros((1, )),
                           spatial_shapes.prod(1).cumsum(0)[:-1]))
        if self.op_impl == 'turbox':
            self._level_tables[key] = (spatial_shapes, start)
        return spatial_shapes, start

    @staticmethod
    def _img_shape(metas: Sequence[dict]) -> Tuple[int, int]:
        """``(H, W)`` of upstream's ``img_metas[0]['img_shape'][0]`` (the first camera's
        padded size); a single ``(H, W[, C])`` is taken as is."""
        shape = metas[0]['img_shape']
        if isinstance(shape[0], (tuple, list, np.ndarray, Tensor)):
            shape = shape[0]
        return int(shape[0]), int(shape[1])

    # -- forward --------------------------------------------------------------------------------

    def _rotate(self, prev_bev: Tensor, metas: Sequence[dict]) -> Tensor:
        """Each sample's previous BEV rotated by its can-bus yaw change (degrees) about
        ``rotate_center`` with torchvision's ``rotate``, as upstream (which rotates the
        caller's tensor in place; this returns a new one)."""
        try:
            from torchvision.transforms.functional import rotate
        except ImportError as error:
            raise ImportError(f'{type(self).__name__}: rotate_prev_bev needs torchvision '
                              '(upstream rotates the previous BEV with its rotate)') from error
        out = []
        for index, meta in enumerate(metas):
            grid = prev_bev[index].reshape(self.bev_h, self.bev_w, -1).permute(2, 0, 1)
            grid = rotate(grid, float(meta['can_bus'][-1]), center=self.rotate_center)
            out.append(grid.permute(1, 2, 0).reshape(self.bev_h * self.bev_w, -1))
        return torch.stack(out)

    def forward(self, mlvl_feats: Sequence[Tensor], img_metas: Sequence[dict],
                prev_bev: Optional[Tensor] = None) -> Tensor:
        """The BEV embedding of a batch.

        Args:
            mlvl_feats (list[Tensor]): Camera features ``[B, N, C, h, w]`` per level.
            img_metas (list[dict]): Per sample ``lidar2img`` (``[N, 4, 4]``, arrays or
                tensors), ``can_bus`` (18 values) and ``img_shape`` (the padded input size,
                ``(H, W)`` or one per camera; the first sample's is used).
            prev_bev (Tensor, optional): ``[B, H * W, C]`` the previous frame's BEV.

        Returns:
            Tensor: ``[B, H * W, C]``.
        """
        feats = [feat.float() for feat in mlvl_feats]
        bs, num_cam = feats[0].shape[:2]
        if num_cam != self.num_cams:
            raise ValueError(f'{type(self).__name__}: features of {num_cam} cameras, '
                             f'num_cams is {self.num_cams}')
        if len(img_metas) != bs:
            raise ValueError(f'{type(self).__name__}: {len(img_metas)} metas for a batch of '
                             f'{bs}')
        device, dtype = feats[0].device, feats[0].dtype
        bev_queries = self.bev_embedding.weight.to(dtype)
        mask = torch.zeros((bs, self.bev_h, self.bev_w), device=device).to(dtype)
        bev_pos = self.positional_encoding(mask).to(dtype).flatten(2).transpose(1, 2)

        shift = None
        if self.op_impl == 'stock' or prev_bev is not None:
            shift = self._to_device(list(self._shift(img_metas)), device)
        if prev_bev is not None:
            prev_bev = prev_bev.float()
            if self.rotate_prev_bev:
                prev_bev = self._rotate(prev_bev, img_metas)
        can_bus = self._to_device([m['can_bus'] for m in img_metas], device)
        can_bus = self.can_bus_mlp(can_bus[:, :self.len_can_bus])
        bev_queries = bev_queries[None] + can_bus[:, None] * self.use_can_bus

        values = []
        for level, feat in enumerate(feats):
            feat = feat.flatten(3).transpose(2, 3)  # [B, N, h * w, C]
            if self.use_cams_embeds:
                feat = feat + self.cams_embeds[None, :, None, :].to(feat.dtype)
            values.append(feat + self.level_embeds[None, None, level:level + 1, :].to(feat.dtype))
        spatial_shapes, level_start_index = self._level_tables_of(feats)
        lidar2img = self._to_device([m['lidar2img'] for m in img_metas], device)
        return self.encoder(bev_queries, torch.cat(values, 2), self.bev_h, self.bev_w, bev_pos,
                            spatial_shapes, level_start_index, self.bev_spatial_shapes,
                            self.bev_level_start_index, lidar2img, self._img_shape(img_metas),
                            prev_bev=prev_bev, shift=shift)
