"""``BEVFormerEncoder``: the layer stack of MapTR v1's BEV encoder (upstream
``bevformer/modules/encoder.py`` @ 67cadd8 in hustvl/MapTR; docs/design/maptr.md, section 3.1).

Per forward: the 3D reference points of the BEV pillars (``num_points_in_pillar`` anchors over
the ``z`` range of ``pc_range``) are projected into every camera (:func:`.point_sampling`,
float32), the 2D reference points of the cells are laid out for the temporal self-attention's
queue (``[shifted previous, current]`` with a previous BEV, the current points twice without),
and the queries go through the layers (:class:`.BEVFormerLayer`), each layer's output the next
one's query. The previous BEV, when there is one, is interleaved with the **initial** query
(``[prev_0, q_0, prev_1, q_1, ...]``) once, for every layer.

Batch-first throughout (upstream's queries are ``[Q, B, C]`` on entry and permuted).
"""
import copy
from typing import Optional, Sequence

import torch
from mmengine.model import BaseModule
from torch import Tensor, nn

from turbox_mm.ops.dispatch import check_op_impl
from turbox_mm.registry import MODELS
from .bev_points import point_sampling, reference_points_2d, reference_points_3d
from .geometry import PC_RANGE
from .scoped_build import build_scoped


@MODELS.register_module()
class BEVFormerEncoder(BaseModule):
    """BEVFormer's encoder as MapTR v1 configures it (module docstring).

    Args:
        num_layers (int): Layers. Defaults to 1 (``maptr_tiny_r50_24e``).
        transformerlayers (dict | list[dict]): The layer config (built ``num_layers`` times)
            or one per layer; :class:`.BEVFormerLayer` by default, with MapTR v1's values. The
            layers' ``op_impl`` defaults to this encoder's.
        pc_range (list[float]): Point cloud range. Defaults to MapTR v1's
            ``[-15, -30, -2, 15, 30, 2]``.
        num_points_in_pillar (int): Anchors per pillar. Defaults to 4.
        return_intermediate (bool): Return every layer's output stacked. Defaults to False.
        dataset_type (str): Ignored (upstream's). Defaults to 'nuscenes'.
        op_impl (str): ``'stock'`` or ``'turbox'``, passed on to the layers and to
            :func:`.point_sampling` (turbox: the projection without upstream's repeated
            copies). Defaults to 'stock'.
        init_cfg (dict, optional): mmengine's init config. Defaults to None.
    """

    def __init__(self, num_layers: int = 1, transformerlayers: Optional[dict] = None,
                 pc_range: Sequence[float] = PC_RANGE, num_points_in_pillar: int = 4,
                 return_intermediate: bool = False, dataset_type: str = 'nuscenes',
                 op_impl: str = 'stock', init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg)
        self.op_impl = check_op_impl(type(self).__name__, op_impl)
        if isinstance(transformerlayers, (list, tuple)):
            if len(transformerlayers) != num_layers:
                raise ValueError(f'{type(self).__name__}: {len(transformerlayers)} layer '
                                 f'configs for num_layers={num_layers}')
            layer_cfgs = [copy.deepcopy(dict(cfg)) for cfg in transformerlayers]
        else:
            layer_cfgs = [copy.deepcopy(dict(transformerlayers or {})) for _ in range(num_layers)]
        for cfg in layer_cfgs:
            cfg.setdefault('op_impl', op_impl)
        self.layers = nn.ModuleList(build_scoped(cfg, 'turbox_mm.BEVFormerLayer')
                                    for cfg in layer_cfgs)
        self.num_layers = num_layers
        self.embed_dims = self.layers[0].embed_dims
        self.pc_range = list(pc_range)
        self.num_points_in_pillar = num_points_in_pillar
        self.return_intermediate = return_intermediate

    def forward(self, bev_query: Tensor, value: Tensor, bev_h: int, bev_w: int,
                bev_pos: Optional[Tensor], spatial_shapes: Tensor, level_start_index: Tensor,
                bev_spatial_shapes: Tensor, bev_level_start_index: Tensor, lidar2img: Tensor,
                img_shape: Sequence[int], prev_bev: Optional[Tensor] = None,
                shift: Optional[Tensor] = None) -> Tensor:
        """Encode the BEV.

        Args:
            bev_query (Tensor): ``[B, H * W, C]``.
            value (Tensor): ``[B, N, L, C]`` camera features (levels concatenated).
            bev_h, bev_w (int): The BEV grid.
            bev_pos (Tensor, optional): ``[B, H * W, C]``.
            spatial_shapes (Tensor): ``[levels, 2]`` of the camera features.
            level_start_index (Tensor): ``[levels]``.
            bev_spatial_shapes (Tensor): ``[[H, W]]``.
            bev_level_start_index (Tensor): ``[0]``.
            lidar2img (Tensor): ``[B, N, 4, 4]``.
            img_shape (tuple[int]): ``(H, W)`` of the (padded) input images.
            prev_bev (Tensor, optional): ``[B, H * W, C]`` the previous BEV (aligned).
            shift (Tensor, optional): ``[B, 2]`` normalised ``(x, y)`` shift of the previous
                BEV's reference points; zero if None.

        Returns:
            Tensor: ``[B, H * W, C]``, or ``[layers, B, H * W, C]`` with
            ``return_intermediate``.
        """
        bs, len_bev, channels = bev_query.shape
        device = bev_query.device
        ref_3d = reference_points_3d(bev_h, bev_w, self.pc_range[5] - self.pc_range[2],
                                     self.num_points_in_pillar, bs, device)
        ref_2d = reference_points_2d(bev_h, bev_w, bs, device)
        reference_points_cam, bev_mask = point_sampling(ref_3d, self.pc_range, lidar2img,
                                                        img_shape, self.op_impl)
        if prev_bev is not None:
            shift_ref_2d = ref_2d.clone()
            if shift is not None:
                shift_ref_2d += shift[:, None, None, :].to(ref_2d.dtype)
            prev_bev = torch.stack([prev_bev, bev_query], 1).reshape(bs * 2, len_bev, channels)
            hybrid_ref_2d = torch.stack([shift_ref_2d, ref_2d], 1)
        else:
            hybrid_ref_2d = torch.stack([ref_2d, ref_2d], 1)
        hybrid_ref_2d = hybrid_ref_2d.reshape(bs * 2, len_bev, ref_2d.shape[2], 2)

        output, intermediate = bev_query, []
        for layer in self.layers:
            output = layer(output, value, bev_pos, hybrid_ref_2d, bev_spatial_shapes,
                           bev_level_start_index, reference_points_cam, bev_mask,
                           spatial_shapes, level_start_index, prev_bev=prev_bev)
            if self.return_intermediate:
                intermediate.append(output)
        return torch.stack(intermediate) if self.return_intermediate else output
