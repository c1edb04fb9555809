"""Sparse4D's feed-forward block whose input and output sizes differ (512 in, 256 out)."""
import re
from typing import Optional, Union

from mmcv.cnn import build_activation_layer, build_norm_layer
from torch import Tensor, nn

from turbox_mm.registry import MODELS


@MODELS.register_module()
class AsymmetricFFN(nn.Module):
    """Pre-norm FFN from ``in_channels`` to ``embed_dims`` with a projected identity.

    ``x = norm(x)``; ``out = fcs(x)``; with ``add_identity``, ``out = identity_fc(x) + out``,
    the identity being taken *after* the pre-norm (docs/design/sparse4d.md, 2.8).
    ``identity_fc`` is a Linear when ``in_channels != embed_dims``, else the identity; with
    ``identity_by_hidden`` (upstream's actual rule) a Linear whenever
    ``feedforward_channels != embed_dims``. The two rules agree for Sparse4D's and
    SparseDrive's det and map FFNs (512 -> 1024 -> 256); SparseDrive's motion FFN (256 -> 512
    -> 256) has a Linear identity upstream, so its config sets ``identity_by_hidden``.

    Args:
        in_channels (int): Input features. Defaults to 512.
        pre_norm (bool | dict | None): True for ``LayerNorm(in_channels)``, a norm config for
            mmcv's ``build_norm_layer``, or False/None for no pre-norm. Defaults to True.
        embed_dims (int): Output features. Defaults to 256.
        feedforward_channels (int): Hidden features. Defaults to 1024.
        num_fcs (int): Linear layers, at least 2. Defaults to 2.
        ffn_drop (float): Dropout after each hidden activation and after the last Linear.
            Defaults to 0.1.
        act_cfg (dict): Activation config (mmcv). Defaults to
            ``dict(type='ReLU', inplace=True)``.
        add_identity (bool): Add the (projected) normalised input. Defaults to True.
        identity_by_hidden (bool): Choose the identity's projection by the hidden width, as
            upstream's constructor does. Defaults to False.

    Examples:
        >>> import torch
        >>> AsymmetricFFN(in_channels=8, embed_dims=4, feedforward_channels=16)(
        ...     torch.zeros(2, 3, 8)).shape
        torch.Size([2, 3, 4])
    """

    def __init__(self,
                 in_channels: int = 512,
                 pre_norm: Union[bool, dict, None] = True,
                 embed_dims: int = 256,
                 feedforward_channels: int = 1024,
                 num_fcs: int = 2,
                 ffn_drop: float = 0.1,
                 act_cfg: Optional[dict] = None,
                 add_identity: bool = True,
                 identity_by_hidden: bool = False) -> None:
        super().__init__()
        if num_fcs < 2:
            raise ValueError(f'AsymmetricFFN: num_fcs must be at least 2, got {num_fcs}')
        act_cfg = dict(type='ReLU', inplace=True) if act_cfg is None else act_cfg
        self.in_channels = in_channels
        self.embed_dims = embed_dims
        if pre_norm is True:
            self.pre_norm = nn.LayerNorm(in_channels)
        elif isinstance(pre_norm, dict):
            self.pre_norm = build_norm_layer(pre_norm, in_channels)[1]
        elif pre_norm in (False, None):
            self.pre_norm = None
        else:
            raise ValueError(f'AsymmetricFFN: pre_norm must be a bool, a norm config dict or '
                             f'None, got {pre_norm!r}')
        layers, dims = [], in_channels
        for _ in range(num_fcs - 1):
            layers += [nn.Linear(dims, feedforward_channels), build_activation_layer(act_cfg),
                       nn.Dropout(ffn_drop)]
            dims = feedforward_channels
        layers += [nn.Linear(dims, embed_dims), nn.Dropout(ffn_drop)]
        self.layers = nn.Sequential(*layers)
        self.num_fcs = num_fcs
        self.add_identity = add_identity
        if add_identity:
            project = (feedforward_channels != embed_dims if identity_by_hidden else
                       in_channels != embed_dims)
            self.identity_fc = (nn.Linear(in_channels, embed_dims) if project else
                                nn.Identity())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Also read upstream's layout (Sparse4D / SparseDrive checkpoints): upstream nests each
        hidden block as ``layers.i.0`` (Linear, activation, dropout) and puts the last Linear
        at ``layers.{num_fcs - 1}``; here the blocks are flat (``layers.{3 i}``, the last at
        ``layers.{3 (num_fcs - 1)}``). Keys in upstream's layout are renamed in place."""
        nested = re.compile(re.escape(prefix) + r'layers\.(\d+)\.0\.(weight|bias)$')
        if any(nested.match(k) for k in state_dict):
            last = re.compile(re.escape(prefix) + rf'layers\.{self.num_fcs - 1}\.(weight|bias)$')
            for key in list(state_dict):
                m, t = nested.match(key), last.match(key)
                if m:
                    state_dict[f'{prefix}layers.{3 * int(m.group(1))}.{m.group(2)}'] = \
                        state_dict.pop(key)
                elif t:
                    state_dict[f'{prefix}layers.{3 * (self.num_fcs - 1)}.{t.group(1)}'] = \
                        state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor, identity: Optional[Tensor] = None) -> Tensor:
        """Apply the block.

        Args:
            x (Tensor): ``[..., in_channels]``.
            identity (Tensor, optional): ``[..., in_channels]`` to add instead of the
                normalised ``x``. Defaults to None.

        Returns:
            Tensor: ``[..., embed_dims]``.
        """
        if x.shape[-1] != self.in_channels:
            raise ValueError(f'AsymmetricFFN: expected [..., {self.in_channels}] input, got '
                             f'{tuple(x.shape)}')
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        out = self.layers(x)
        if not self.add_identity:
            return out
        return self.identity_fc(x if identity is None else identity) + out
