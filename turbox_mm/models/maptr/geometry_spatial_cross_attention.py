"""``GeometrySptialCrossAttention``: MapTR v1's spatial cross-attention from the BEV queries to
every camera's features (upstream ``maptr/modules/geometry_kernel_attention.py`` @ 67cadd8;
the class keeps upstream's spelling, which configs name).

Per camera ``n``, the BEV queries whose pillar is seen by it attend to its features through
:class:`.GeometryKernelAttention` (around the projections of the pillar's anchors); a query's
results are summed over the cameras that processed it, divided by the number of cameras
that see it (at least 1), projected (``output_proj``), passed through dropout and added to the
query. No positional embedding (the encoder layer passes none).

Upstream's procedure, with the quirks of BEVFormer's spatial cross-attention it copies
(docs/design/maptr.md, section 3.1), is the ``'stock'`` path:

- the queries of camera ``n`` are those whose mask row has any visible anchor **in batch
  sample 0** (``bev_mask[n, 0]``), for every sample of the batch: a query that sample ``b > 0``
  sees but sample 0 does not gets nothing from that camera, and one that only sample 0 sees is
  still processed for sample ``b`` (its anchors read the clamped border);
- these queries are gathered (``nonzero``, a host sync per camera) into ``[B, N, max_len, C]``
  and their reference points into ``[B, N, max_len, D, 2]`` by Python loops over ``B x N``;
  the padding rows (zero queries at ``(0, 0)``) are attended too and dropped;
- the results are scatter-added back camera after camera (loops again), and the divisor counts
  the cameras each sample itself sees (``bev_mask[:, b]``), not sample 0's.

``'turbox'`` computes the same numbers without host syncs or loops over ``B x N``: every
query attends for every camera (``[B * N, H * W]`` rows instead of ``[B * N, max_len]``; a row
depends on its own query and reference points only, so the rows upstream processes get the
same values), the attention weights of a query are computed once and shared by the cameras
(upstream computes them per camera from the same query), and the results of the rows upstream
does not process are masked out (``torch.where`` on sample 0's visibility) before the same
camera-after-camera sum. Masked rows get a zero output gradient, which the turbox kernel's
backward skips. The price is memory and forward gathers for ``H * W`` rows a camera instead of
``max_len`` (2.8 x at MapTR v1's size with the synthetic rig of the kernel's benchmark: 20000
rows against a ``max_len`` of 7171); the locations are kept as int32 (the same pixels) to halve
theirs. With ``max_len`` set, turbox instead gathers each camera's visible queries (sample 0's,
in query order, by a stable sort on the device) into a fixed ``max_len`` rows, the rest of the
rows being invisible queries masked out as above: upstream's rows and sums again, at a static
size and without a host sync, provided no camera sees more than ``max_len`` queries (checked on
the device by ``torch._assert_async``: an error, never a silent drop; on CUDA it ends the
process). Which of the two is faster on a GPU is for the benchmark to say.
Both paths run in float32 with autocast off (upstream's ``force_fp32``).
"""
from typing import Optional

import torch
from mmengine.model import BaseModule
from torch import Tensor, nn

from turbox_mm.ops.dispatch import check_op_impl
from turbox_mm.registry import MODELS
from .geometry_kernel_attention import GeometryKernelAttention
from .scoped_build import build_scoped

#: MapTR v1's kernel attention (``maptr_tiny_r50_24e``; ``embed_dims`` is the owner's).
GKT_CFG = dict(type='turbox_mm.GeometryKernelAttention', num_heads=4, dilation=1,
               kernel_size=(3, 5), num_levels=1)


@MODELS.register_module()
class GeometrySptialCrossAttention(BaseModule):
    """Spatial cross-attention with geometric kernel attention (module docstring).

    Args:
        embed_dims (int): Channels C. Defaults to 256.
        num_cams (int): Cameras N. Defaults to 6.
        pc_range (list[float], optional): Unused (upstream keeps it). Defaults to None.
        dropout (float): Dropout on the projected output. Defaults to 0.1.
        attention (dict): :class:`.GeometryKernelAttention`'s config; its ``op_impl``
            defaults to this module's (set it to ``'turbox'`` alone for "stock + turbox op").
            Defaults to MapTR v1's (:data:`GKT_CFG`).
        batch_first (bool): Only True (the encoder's layout). Defaults to True.
        op_impl (str): ``'stock'`` or ``'turbox'`` (module docstring). Defaults to 'stock'.
        max_len (int, optional): Turbox only: rows per camera, at least the most queries a
            camera sees in a batch's sample 0 (module docstring); None processes every query.
            Defaults to None.
        init_cfg (dict, optional): mmengine's init config. Defaults to None.

    Examples:
        >>> sca = GeometrySptialCrossAttention(embed_dims=16, num_cams=2, attention=dict(
        ...     embed_dims=16, num_heads=4))
        >>> query, value = torch.randn(1, 6, 16), torch.randn(1, 2, 12, 16)
        >>> ref, mask = torch.rand(2, 1, 6, 4, 2), torch.rand(2, 1, 6, 4) > 0.5
        >>> sca(query, value, ref, mask, torch.tensor([[3, 4]]), torch.tensor([0])).shape
        torch.Size([1, 6, 16])
    """

    def __init__(self, embed_dims: int = 256, num_cams: int = 6, pc_range: Optional[list] = None,
                 dropout: float = 0.1, attention: Optional[dict] = None, batch_first: bool = True,
                 op_impl: str = 'stock', max_len: Optional[int] = None,
                 init_cfg: Optional[dict] = None, **kwargs) -> None:
        super().__init__(init_cfg)
        name = type(self).__name__
        self.op_impl = check_op_impl(name, op_impl)
        if max_len is not None and (op_impl != 'turbox' or max_len < 1):
            raise ValueError(f'{name}: max_len (a positive row count) is for '
                             f"op_impl='turbox'; stock sizes its rows per batch, as upstream")
        self.max_len = max_len
        if not batch_first:
            raise ValueError(f'{name}: only batch_first=True is supported')
        self.embed_dims = embed_dims
        self.num_cams = num_cams
        self.pc_range = pc_range
        self.batch_first = batch_first
        cfg = dict(GKT_CFG if attention is None else attention)
        cfg.setdefault('op_impl', op_impl)
        cfg.setdefault('embed_dims', embed_dims)
        self.attention = build_scoped(cfg, GKT_CFG['type'])
        if not isinstance(self.attention, GeometryKernelAttention):
            raise TypeError(f'{name}: attention must be a GeometryKernelAttention, got '
                            f'{type(self.attention).__name__}')
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.dropout = nn.Dropout(dropout)
        self.init_weights()

    def init_weights(self) -> None:
        """Upstream's: Xavier-uniform ``output_proj`` with zero bias (the kernel attention
        keeps its own init)."""
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)
        self._is_init = True

    def forward(self, query: Tensor, value: Tensor, reference_points_cam: Tensor,
                bev_mask: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                query_pos: Optional[Tensor] = None) -> Tensor:
        """Attend from the BEV queries to the cameras that see them.

        Args:
            query (Tensor): ``[B, Q, C]`` BEV queries (also the residual).
            value (Tensor): ``[B, N, L, C]`` camera features, the levels' pixels one after the
                other (upstream's ``[N, L, B, C]``, permuted).
            reference_points_cam (Tensor): ``[N, B, Q, D, 2]`` normalised ``(u, v)`` of the
                ``D`` anchors of each query's pillar in each camera.
            bev_mask (Tensor): ``[N, B, Q, D]`` bool, the anchor projects into the image.
            spatial_shapes (Tensor): ``[levels, 2]`` ``(H, W)``.
            level_start_index (Tensor): ``[levels]``.
            query_pos (Tensor, optional): Added to the query (not the residual); the encoder
                passes none.

        Returns:
            Tensor: ``[B, Q, C]`` float32.
        """
        cams = value.shape[1]
        if cams != self.num_cams or reference_points_cam.shape[0] != cams \
                or bev_mask.shape[0] != cams:
            raise ValueError(f'{type(self).__name__}: num_cams is {self.num_cams}, got value '
                             f'{tuple(value.shape)}, reference_points_cam '
                             f'{tuple(reference_points_cam.shape)}, bev_mask '
                             f'{tuple(bev_mask.shape)}')
        with torch.autocast(query.device.type, enabled=False):
            query, value = query.float(), value.float()
            reference_points_cam = reference_points_cam.float()
            if query_pos is not None:
                query_pos = query_pos.float()
            residual = query
            if query_pos is not None:
                query = query + query_pos
            attend = self._turbox if self.op_impl == 'turbox' else self._stock
            slots = attend(query, value.flatten(0, 1), reference_points_cam, bev_mask,
                           spatial_shapes, level_start_index)
            count = (bev_mask.sum(-1) > 0).permute(1, 2, 0).sum(-1)
            slots = slots / torch.clamp(count, min=1.0)[..., None]
            return self.dropout(self.output_proj(slots)) + residual

    def _stock(self, query: Tensor, value: Tensor, reference_points_cam: Tensor,
               bev_mask: Tensor, spatial_shapes: Tensor, level_start_index: Tensor) -> Tensor:
        """Upstream's rebatching: ``[B, Q, C]`` sums over the cameras (module docstring)."""
        bs, _, dims = query.shape
        cams, _, _, anchors, _ = reference_points_cam.shape
        indexes = [mask[0].sum(-1).nonzero().squeeze(-1) for mask in bev_mask]
        max_len = max(len(index) for index in indexes)
        queries = query.new_zeros([bs, cams, max_len, dims])
        points = reference_points_cam.new_zeros([bs, cams, max_len, anchors, 2])
        for j in range(bs):
            for i, points_per_img in enumerate(reference_points_cam):
                index = indexes[i]
                queries[j, i, :len(index)] = query[j, index]
                points[j, i, :len(index)] = points_per_img[j, index]
        out = self.attention(queries.view(bs * cams, max_len, dims), value,
                             points.view(bs * cams, max_len, anchors, 2), spatial_shapes,
                             level_start_index).view(bs, cams, max_len, dims)
        slots = torch.zeros_like(query)
        for j in range(bs):
            for i, index in enumerate(indexes):
                slots[j, index] += out[j, i, :len(index)]
        return slots

    def _turbox(self, query: Tensor, value: Tensor, reference_points_cam: Tensor,
                bev_mask: Tensor, spatial_shapes: Tensor, level_start_index: Tensor) -> Tensor:
        """Every query (or ``max_len`` rows) for every camera, sample 0's visibility as a mask
        (module docstring)."""
        bs, num_query, dims = query.shape
        cams, _, _, anchors, _ = reference_points_cam.shape
        gkt = self.attention
        weights = gkt.weights(query)  # [B, Q, heads, levels, points], once for every camera
        points = reference_points_cam.transpose(0, 1)  # [B, N, Q, D, 2]
        visible = bev_mask[:, 0].any(-1)  # [N, Q], sample 0's rows
        if self.max_len is None or self.max_len >= num_query:
            rows, order = num_query, None
            weights = weights[:, None].expand(bs, cams, *weights.shape[1:])
        else:
            rows = self.max_len
            torch._assert_async(
                visible.sum(1).max() <= rows,
                f'{type(self).__name__}: a camera sees more than max_len={rows} BEV queries')
            # each camera's visible queries first, in query order
            order = torch.sort((~visible).to(torch.uint8), dim=1, stable=True)[1][:, :rows]
            visible = visible.gather(1, order)  # [N, rows]
            weights = weights[:, order]  # [B, N, rows, heads, levels, points]
            points = points.gather(2, order[None, :, :, None, None].expand(
                bs, cams, rows, anchors, 2))
        locations = gkt.locations(points.reshape(bs * cams, rows, anchors, 2), spatial_shapes,
                                  torch.int32)  # int32: half the memory kept for the backward
        out = gkt.sample(gkt.project_value(value), spatial_shapes, level_start_index, locations,
                         weights.flatten(0, 1)).view(bs, cams, rows, dims)
        slots = torch.zeros_like(query)
        for cam in range(cams):
            masked = torch.where(visible[cam, None, :, None], out[:, cam], 0.0)
            if order is None:
                slots = slots + masked
            else:
                slots = slots.index_add(1, order[cam], masked)
        return slots
