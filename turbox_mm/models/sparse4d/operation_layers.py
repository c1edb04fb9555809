"""What Sparse4D-style decoders share: layers built from an operation list, upstream's weight
initialisation, and the decoupled attention (Sparse4D v3's head, SparseDrive's motion head)."""
from typing import Optional

import torch
from torch import Tensor, nn

from turbox_mm.registry import MODELS


class OperationLayers:
    """Mixin of a head whose ``layers`` (an ``nn.ModuleList``) follow ``operation_order``.

    The head provides ``operation_order``, ``layers``, ``decouple_attn``, ``fc_before`` and
    ``fc_after``. Decoupled attention (Sparse4D v3): the positional embedding is concatenated
    to the query and key features instead of added; the values pass through ``fc_before`` and
    the output through ``fc_after`` (identities when not decoupled).
    """

    @staticmethod
    def build_op(op: str, cfg: dict) -> nn.Module:
        """One layer: ``'norm'`` through mmcv's ``build_norm_layer`` (``normalized_shape`` or
        ``num_features`` gives its size), anything else through ``MODELS``.

        Raises:
            ValueError: A norm config without its size.
        """
        if op == 'norm':
            from mmcv.cnn import build_norm_layer
            cfg = dict(cfg)
            dims = cfg.pop('normalized_shape', None) or cfg.pop('num_features', None)
            if dims is None:
                raise ValueError("norm_layer needs 'normalized_shape'")
            return build_norm_layer(cfg, dims)[1]
        return MODELS.build(cfg)

    def init_weights(self) -> None:
        """Xavier-uniform for every weight matrix of the layers but the refinement layers
        (upstream's rule), then each submodule's own initialisation.

        Unlike upstream, buffers are not touched: Sparse4D's fixed keypoints keep their
        configured values (docs/design/sparse4d.md, 0.3-2).
        """
        for op, layer in zip(self.operation_order, self.layers):
            if op == 'refine':
                continue
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for module in self.modules():
            if module is not self and hasattr(module, 'init_weights'):
                module.init_weights()
        self._is_init = True

    def graph_model(self, index: int, query: Tensor, key: Optional[Tensor] = None,
                    value: Optional[Tensor] = None, query_pos: Optional[Tensor] = None,
                    key_pos: Optional[Tensor] = None, **kwargs) -> Tensor:
        """Attention of layer ``index``, decoupled when ``decouple_attn`` (see the class)."""
        if self.decouple_attn:
            query = torch.cat([query, query_pos], dim=-1)
            if key is not None:
                key = torch.cat([key, key_pos], dim=-1)
            query_pos = key_pos = None
        if value is not None:
            value = self.fc_before(value)
        out = self.layers[index](query, key, value, query_pos=query_pos, key_pos=key_pos,
                                 **kwargs)
        return self.fc_after(out)
