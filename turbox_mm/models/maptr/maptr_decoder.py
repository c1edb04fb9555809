"""``MapTRDecoder``: the stack of decoder layers with iterative reference-point refinement.

Upstream (``modules/decoder.py``, v1 @ 67cadd8 and v2 @ baf0798): layer ``l`` attends around
its reference points ``r_l`` (``[B, Q, 2]`` in ``[0, 1]``); with box refinement, the layer's
regression branch then gives ``sigmoid(reg_l(out_l) + logit(r_l))``, and its detached value is
``r_{l + 1}``. ``r_0`` comes from the head (a linear map of the query position, not detached).

Upstream's head recomputes ``sigmoid(reg_l(out_l) + logit(r_l))`` from the decoder's outputs
to get the layer's point predictions: the same tensor, computed a second time. Here the
decoder returns it (with its graph) and the head uses it as is: the same values and the same
gradients (``r_0`` keeps its graph, the later ``r_l`` are detached in both), one regression
pass per layer instead of two.
"""
import copy
from typing import Optional, Tuple

import torch
from mmdet.models.layers.transformer import inverse_sigmoid
from mmengine.model import BaseModule
from torch import Tensor, nn

from turbox_mm.registry import MODELS


@MODELS.register_module()
class MapTRDecoder(BaseModule):
    """The decoder (module docstring).

    Args:
        num_layers (int): Layers. Defaults to 6.
        layer_cfg (dict): One layer's config, built ``num_layers`` times
            (``turbox_mm.MapTRDecoderLayer`` for v1, ``turbox_mm.DecoupledMapTRDecoderLayer``
            for v2). Defaults to v1's layer with upstream's values.
        return_intermediate (bool): Kept for upstream's config; every layer's output is
            returned (MapTR supervises them all), so it must be True. Defaults to True.
        init_cfg (dict, optional): mmengine's init config. Defaults to None.

    Examples:
        >>> dec = MapTRDecoder(num_layers=2, layer_cfg=dict(
        ...     type='turbox_mm.MapTRDecoderLayer',
        ...     self_attn_cfg=dict(embed_dims=16, num_heads=2),
        ...     cross_attn_cfg=dict(embed_dims=16, num_heads=2, num_points=2),
        ...     ffn_cfg=dict(embed_dims=16, feedforward_channels=32)))
        >>> reg = nn.ModuleList(nn.Linear(16, 2) for _ in range(2))
        >>> query, pos, bev = torch.randn(1, 6, 16), torch.randn(1, 6, 16), torch.randn(1, 12, 16)
        >>> states, points, refs = dec(query, pos, bev, torch.rand(1, 6, 2),
        ...                            torch.tensor([[3, 4]]), torch.tensor([0]), reg)
        >>> states.shape, points.shape, refs.shape
        (torch.Size([2, 1, 6, 16]), torch.Size([2, 1, 6, 2]), torch.Size([2, 1, 6, 2]))
    """

    def __init__(self, num_layers: int = 6,
                 layer_cfg: dict = dict(type='turbox_mm.MapTRDecoderLayer'),
                 return_intermediate: bool = True, init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg)
        if not return_intermediate:
            raise ValueError('MapTRDecoder returns every layer (MapTR supervises them all); '
                             'return_intermediate must be True')
        self.num_layers = num_layers
        self.layers = nn.ModuleList(MODELS.build(copy.deepcopy(layer_cfg))
                                    for _ in range(num_layers))

    def forward(self, query: Tensor, query_pos: Tensor, value: Tensor, reference_points: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor, reg_branches: nn.ModuleList,
                refine: bool = True, **layer_kwargs) -> Tuple[Tensor, Tensor, Tensor]:
        """Run the layers.

        Args:
            query (Tensor): ``[B, Q, C]``.
            query_pos (Tensor): ``[B, Q, C]``.
            value (Tensor): The BEV ``[B, H * W, C]``.
            reference_points (Tensor): ``[B, Q, 2]`` initial ``(x, y)`` in ``[0, 1]``.
            spatial_shapes (Tensor): ``[[H, W]]``.
            level_start_index (Tensor): ``[0]``.
            reg_branches (nn.ModuleList): One regression branch per layer (``C -> 2``).
            refine (bool): Update the reference points after each layer (``with_box_refine``);
                otherwise every layer uses the initial ones. Defaults to True.
            layer_kwargs: Passed to every layer (``self_attn_mask``, ``num_vec``,
                ``num_pts_per_vec``).

        Returns:
            tuple[Tensor, Tensor, Tensor]: every layer's output ``[L, B, Q, C]``, its points
            ``sigmoid(reg_l(out_l) + logit(r_l))`` ``[L, B, Q, 2]`` (with graph), and the
            reference points it attended around, ``r_l`` ``[L, B, Q, 2]``.
        """
        states, points, references = [], [], []
        output = query
        for index, layer in enumerate(self.layers):
            references.append(reference_points)
            output = layer(output, query_pos, value, reference_points[..., None, :],
                           spatial_shapes, level_start_index, **layer_kwargs)
            refined = (reg_branches[index](output)[..., :2] +
                       inverse_sigmoid(reference_points)).sigmoid()
            states.append(output)
            points.append(refined)
            if refine:
                reference_points = refined.detach()
        return torch.stack(states), torch.stack(points), torch.stack(references)
