"""Multi-head attention with mmcv's wrapper semantics, computed by PyTorch's SDPA.

SparseDrive's ``MultiheadFlashAttention`` (``P/models/attention.py`` @ ffebeb4;
docs/design/sparsedrive.md sections 6 and 10.1) wraps flash-attn's varlen kv-packed kernel:
it casts the projected query, key and value to fp16, drops attention probabilities in
training, accepts no ``attn_mask`` and is otherwise mmcv's ``MultiheadAttention`` (identity
shortcut, positional embeddings added, output dropout). :class:`MultiheadSDPAttention` is the
same block on :func:`torch.nn.functional.scaled_dot_product_attention`, so it runs on any
device and dtype, and it takes masks.

The parameters are named as upstream's (``attn.in_proj_weight`` ``[3E, E]``,
``attn.in_proj_bias`` ``[3E]``, ``attn.out_proj.{weight, bias}``), which is also the layout of
``torch.nn.MultiheadAttention`` inside mmcv's ``MultiheadAttention``: a state dict of either
loads as it is, with no conversion.
"""
import copy
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from mmcv.cnn.bricks.drop import build_dropout
from mmengine.model import BaseModule
from torch import Tensor, nn

from turbox_mm.registry import MODELS


def _as_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (True = masked) as an additive float mask of ``dtype``."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        mask, float('-inf'))


def _check_mask(mask: Tensor, name: str) -> Tensor:
    # As torch MHA (2.13): the old ByteTensor masks are refused too.
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f'{name} must be a bool or floating tensor, got {mask.dtype}')
    return mask


def sdpa_mask(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], batch: int,
              num_heads: int, len_q: int, len_k: int, dtype: torch.dtype,
              causal: bool = False) -> Optional[Tensor]:
    """Turn torch-MHA-style masks into one SDPA mask broadcastable to ``[B, H, Lq, Lk]``.

    Boolean masks follow ``torch.nn.MultiheadAttention`` (and mmcv): True means *masked*.
    SDPA's boolean mask means the opposite, so the result is inverted. Floating masks are
    added to the attention logits, as torch MHA does.

    Args:
        attn_mask (Tensor, optional): ``[Lq, Lk]`` or ``[B * H, Lq, Lk]`` (torch MHA's 3-D
            layout, row ``b * H + h``), bool or float.
        key_padding_mask (Tensor, optional): ``[B, Lk]``, bool or float.
        batch (int): B.
        num_heads (int): H.
        len_q (int): Lq.
        len_k (int): Lk.
        dtype (torch.dtype): Dtype of a float result (the attention's compute dtype).
        causal (bool): Also mask key ``j`` for query ``i`` when ``j > i + Lk - Lq`` (the
            bottom-right-aligned causal mask of flash-attn 2.1+). Defaults to False.

    Returns:
        Tensor or None: None when nothing is masked; a bool mask (True = attend) when every
        input is boolean; else a float additive mask of ``dtype``.

    Raises:
        ValueError: A mask's shape does not fit; the message names the mask and both shapes.
        TypeError: A mask is neither boolean nor floating.
    """
    masks = []  # each [B or 1, H or 1, Lq or 1, Lk], bool True = masked, or float additive
    if attn_mask is not None:
        attn_mask = _check_mask(attn_mask, 'attn_mask')
        shape = tuple(attn_mask.shape)
        if shape == (len_q, len_k):
            masks.append(attn_mask[None, None])
        elif shape == (batch * num_heads, len_q, len_k):
            masks.append(attn_mask.view(batch, num_heads, len_q, len_k))
        else:
            raise ValueError(f'attn_mask must be [{len_q}, {len_k}] or '
                             f'[{batch * num_heads}, {len_q}, {len_k}], got '
                             f'{list(attn_mask.shape)}')
    if key_padding_mask is not None:
        key_padding_mask = _check_mask(key_padding_mask, 'key_padding_mask')
        if tuple(key_padding_mask.shape) != (batch, len_k):
            raise ValueError(f'key_padding_mask must be [{batch}, {len_k}], got '
                             f'{list(key_padding_mask.shape)}')
        masks.append(key_padding_mask[:, None, None, :])
    if causal:
        device = masks[0].device if masks else None
        rows = torch.arange(len_q, device=device)[:, None]
        cols = torch.arange(len_k, device=device)[None, :]
        masks.append((cols > rows + (len_k - len_q))[None, None])
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        masked = masks[0]
        for m in masks[1:]:
            masked = masked | m
        return ~masked
    total = None
    for m in masks:
        m = _as_additive(m, dtype) if m.dtype == torch.bool else m.to(dtype)
        total = m if total is None else total + m
    return total


class SDPAttentionCore(nn.Module):
    """Packed in-projection, SDPA and out-projection on batch-first tensors.

    Holds upstream ``FlashMHA``'s parameters under its names. Initialised as ``FlashMHA``
    and ``torch.nn.MultiheadAttention``: xavier-uniform ``in_proj_weight``, zero biases,
    PyTorch's default ``nn.Linear`` init for ``out_proj.weight``.

    Args:
        embed_dims (int): E.
        num_heads (int): H; ``E % H == 0``.
        attn_drop (float): Dropout on the attention probabilities in training.
        bias (bool): Biases on the projections. Defaults to True.
        causal (bool): Bottom-right-aligned causal mask (flash-attn 2.x). Defaults to False.
    """

    def __init__(self, embed_dims: int, num_heads: int, attn_drop: float = 0.,
                 bias: bool = True, causal: bool = False) -> None:
        super().__init__()
        if embed_dims % num_heads != 0:
            raise ValueError(f'embed_dims ({embed_dims}) must be divisible by num_heads '
                             f'({num_heads})')
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.head_dims = embed_dims // num_heads
        self.dropout_p = float(attn_drop)
        self.causal = bool(causal)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dims, embed_dims))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dims))
        else:
            self.register_parameter('in_proj_bias', None)
        self.out_proj = nn.Linear(embed_dims, embed_dims, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform in-projection, zero biases (upstream's ``_reset_parameters``)."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                attn_mask: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
                fp16_compute: bool = False) -> Tensor:
        """Attend.

        Args:
            query (Tensor): ``[B, Lq, E]``.
            key (Tensor): ``[B, Lk, E]``.
            value (Tensor): ``[B, Lk, E]``.
            attn_mask (Tensor, optional): See :func:`sdpa_mask`.
            key_padding_mask (Tensor, optional): See :func:`sdpa_mask`.
            fp16_compute (bool): Run SDPA on fp32 inputs in fp16. Defaults to False.

        Returns:
            Tensor: ``[B, Lq, E]``.
        """
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        batch, len_q, len_k = query.shape[0], query.shape[1], key.shape[1]
        heads, dims = self.num_heads, self.head_dims
        q = F.linear(query, w_q, b_q).view(batch, len_q, heads, dims).transpose(1, 2)
        k = F.linear(key, w_k, b_k).view(batch, len_k, heads, dims).transpose(1, 2)
        v = F.linear(value, w_v, b_v).view(batch, len_k, heads, dims).transpose(1, 2)
        out_dtype = q.dtype
        if fp16_compute and q.dtype == torch.float32:
            q, k, v = q.half(), k.half(), v.half()
        mask = sdpa_mask(attn_mask, key_padding_mask, batch, heads, len_q, len_k, q.dtype,
                         self.causal)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.)
        out = out.to(out_dtype).transpose(1, 2).reshape(batch, len_q, self.embed_dims)
        return self.out_proj(out)


@MODELS.register_module()
class MultiheadSDPAttention(BaseModule):
    """Upstream SparseDrive's ``MultiheadFlashAttention`` on PyTorch's SDPA.

    ``forward`` follows mmcv 2.1's ``MultiheadAttention.forward``: ``key`` defaults to
    ``query`` and ``value`` to ``key`` (both taken *before* positional embeddings are added);
    ``identity`` defaults to ``query``; when ``key_pos`` is None, ``query_pos`` serves as
    ``key_pos`` if it has the key's shape (else a warning); ``query_pos`` / ``key_pos`` are
    added to query / key; the result is ``identity + dropout_layer(proj_drop(attention))``.
    Also registered as ``MultiheadFlashAttention``, so upstream configs build it by name.

    Differences from upstream (docs/design/sparsedrive.md 10.1), each deliberate:

    - **Numerics.** Upstream always computes the attention in fp16 (its ``auto_fp16`` casts
      the projected q and kv to half, then the output back to fp32), while the projections
      run in the input's dtype. Here SDPA runs in the input's dtype by default, so fp32
      heads get fp32 attention: results differ from upstream's at fp16 rounding level
      (largest error of the attention output against float64, relative to its largest value,
      with E 512, 8 heads, 900 queries x 600 random keys, on the CPU: 4e-4 with fp16 compute,
      3e-6 in fp32). ``fp16_compute=True`` reproduces
      upstream's casts (fp32 q/k/v to half, output back to the input's dtype); inputs already
      in fp16/bf16 (autocast) are left as they are, as ``auto_fp16`` leaves them. Dropout draws
      differ from flash-attn's kernel in any case (same law, other random stream).
    - **Masks.** Upstream asserts ``attn_mask is None`` (hence no Sparse4D denoising in
      SparseDrive). Here ``attn_mask`` (``[Lq, Lk]`` or ``[B * H, Lq, Lk]``) and
      ``key_padding_mask`` (``[B, Lk]``) are accepted with torch MHA's convention: boolean True
      = masked, float = added to the logits. Upstream forwards ``key_padding_mask`` to
      flash-attn's ``unpad_input``, whose convention is the opposite (True = valid key);
      no upstream call site passes one to a flash layer. A query whose keys are all masked
      gets a zero attention output from SDPA (torch 2.13, CPU), where torch MHA gives NaN.
    - **batch_first.** Upstream ignores the argument (``self.batch_first = True`` always).
      Here ``batch_first=False`` means ``[L, B, E]`` inputs, as in mmcv.
    - **Head size.** flash-attn needs ``E / H`` divisible by 8 and at most 128; SDPA does not.
    - **kwargs.** Upstream passes unknown keyword arguments to ``FlashMHA``, which ignores
      them; here only ``dropout``, ``bias`` and ``causal`` are known, others raise.
    - **dropout.** As upstream and mmcv, the deprecated ``dropout=p`` sets ``attn_drop = p``
      and ``dropout_layer['drop_prob'] = p`` (with a ``DeprecationWarning``). Both upstream
      and mmcv write into the ``dropout_layer`` dict itself, i.e. into the shared default
      argument, so one ``dropout=0.1`` layer silently gives every later layer built without
      ``dropout`` a 0.1 shortcut dropout; here the dict is copied first.

    Args:
        embed_dims (int): E, input and output features.
        num_heads (int): H.
        attn_drop (float): Dropout on the attention probabilities (training only).
            Defaults to 0.
        proj_drop (float): ``nn.Dropout`` on the attention output. Defaults to 0.
        dropout_layer (dict, optional): mmcv dropout config applied before the shortcut;
            None or empty for the identity. Defaults to
            ``dict(type='Dropout', drop_prob=0.)``.
        init_cfg (dict, optional): mmengine init config. Defaults to None.
        batch_first (bool): Inputs are ``[B, L, E]`` (True) or ``[L, B, E]``. Defaults to True.
        fp16_compute (bool): Compute SDPA in fp16 for fp32 inputs, as upstream. Defaults to
            False.
        **kwargs: ``dropout`` (float, deprecated, see above), ``bias`` (bool, projection
            biases, default True), ``causal`` (bool, bottom-right-aligned causal mask as
            flash-attn 2.x, default False).

    Raises:
        TypeError: An unknown keyword argument.
        ValueError: ``embed_dims`` not divisible by ``num_heads``.

    Examples:
        >>> attn = MultiheadSDPAttention(embed_dims=8, num_heads=2)
        >>> attn(torch.randn(2, 5, 8), query_pos=torch.randn(2, 5, 8)).shape
        torch.Size([2, 5, 8])
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 attn_drop: float = 0.,
                 proj_drop: float = 0.,
                 dropout_layer: Optional[dict] = dict(type='Dropout', drop_prob=0.),
                 init_cfg: Optional[dict] = None,
                 batch_first: bool = True,
                 fp16_compute: bool = False,
                 **kwargs) -> None:
        super().__init__(init_cfg)
        dropout_layer = copy.deepcopy(dropout_layer)
        if 'dropout' in kwargs:
            warnings.warn(
                'MultiheadSDPAttention: `dropout` is deprecated; it sets both attn_drop and '
                "dropout_layer['drop_prob'] (set attn_drop, proj_drop and dropout_layer "
                'instead)', DeprecationWarning)
            attn_drop = kwargs.pop('dropout')
            if dropout_layer:
                dropout_layer['drop_prob'] = attn_drop
        unknown = sorted(set(kwargs) - {'bias', 'causal'})
        if unknown:
            raise TypeError(f'MultiheadSDPAttention got unknown arguments {unknown}; known '
                            "extra ones are 'dropout', 'bias' and 'causal'")
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.batch_first = batch_first
        self.fp16_compute = fp16_compute
        self.attn = SDPAttentionCore(embed_dims, num_heads, attn_drop,
                                     bias=kwargs.get('bias', True),
                                     causal=kwargs.get('causal', False))
        self.proj_drop = nn.Dropout(proj_drop)
        self.dropout_layer = build_dropout(dropout_layer) if dropout_layer else nn.Identity()

    def forward(self,
                query: Tensor,
                key: Optional[Tensor] = None,
                value: Optional[Tensor] = None,
                identity: Optional[Tensor] = None,
                query_pos: Optional[Tensor] = None,
                key_pos: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None,
                **kwargs) -> Tensor:
        """Attention with identity shortcut.

        Args:
            query (Tensor): ``[B, Lq, E]`` (``[Lq, B, E]`` unless ``batch_first``).
            key (Tensor, optional): ``[B, Lk, E]``; None: ``query``. Defaults to None.
            value (Tensor, optional): ``[B, Lk, E]``; None: ``key``. Defaults to None.
            identity (Tensor, optional): Shortcut, shaped as ``query``; None: ``query``
                (without ``query_pos``). Defaults to None.
            query_pos (Tensor, optional): Added to ``query``. Defaults to None.
            key_pos (Tensor, optional): Added to ``key``; None: ``query_pos`` when it has the
                key's shape. Defaults to None.
            attn_mask (Tensor, optional): ``[Lq, Lk]`` or ``[B * H, Lq, Lk]``; bool True =
                masked, or float added to the logits. Defaults to None.
            key_padding_mask (Tensor, optional): ``[B, Lk]``; bool True = masked, or float.
                Defaults to None.
            **kwargs: Ignored (mmcv's transformer layers pass extra keys), except
                ``residual``, mmcv's old name of ``identity`` (a ``DeprecationWarning``, as
                mmcv's ``deprecated_api_warning`` gives; not through that decorator, whose one
                wrapper code object every decorated forward shares, so that Dynamo's
                recompile limit counts them together).

        Returns:
            Tensor: Shaped as ``query``.

        Raises:
            ValueError: ``query``/``key``/``value`` are not 3-D with ``embed_dims`` features
                and matching batch and key lengths, or a mask does not fit; ``residual``
                given with an ``identity`` that is not None (mmcv's decorator raises an
                ``AssertionError`` there, and also where ``identity=None`` is passed
                explicitly, which here means "not given").
        """
        if 'residual' in kwargs:
            if identity is not None:
                raise ValueError('MultiheadSDPAttention.forward: got both "residual" (its '
                                 'deprecated name) and "identity"')
            warnings.warn('"residual" is deprecated in `MultiheadSDPAttention.forward`, '
                          'please use "identity" instead', DeprecationWarning)
            identity = kwargs.pop('residual')
        if key is None:
            key = query
        if value is None:
            value = key
        if identity is None:
            identity = query
        if key_pos is None and query_pos is not None:
            if query_pos.shape == key.shape:
                key_pos = query_pos
            else:
                warnings.warn(f'{type(self).__name__}: the key has no positional encoding '
                              '(key_pos is None and query_pos has another shape)')
        if query_pos is not None:
            query = query + query_pos
        if key_pos is not None:
            key = key + key_pos
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        self._check_inputs(query, key, value)
        out = self.attn(query, key, value, attn_mask=attn_mask,
                        key_padding_mask=key_padding_mask, fp16_compute=self.fp16_compute)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return identity + self.dropout_layer(self.proj_drop(out))

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor) -> None:
        layout = '[B, L, E]' if self.batch_first else '[L, B, E]'
        for name, x in (('query', query), ('key', key), ('value', value)):
            if x.dim() != 3 or x.shape[-1] != self.embed_dims:
                raise ValueError(f'{type(self).__name__}: {name} must be {layout} with '
                                 f'E = {self.embed_dims}, got {list(x.shape)} (batch first)')
        if key.shape[:2] != value.shape[:2] or key.shape[0] != query.shape[0]:
            raise ValueError(f'{type(self).__name__}: batch / key lengths differ (batch '
                             f'first): query {list(query.shape)}, key {list(key.shape)}, '
                             f'value {list(value.shape)}')


# Upstream configs name the layer ``MultiheadFlashAttention``; no registry of mmcv, mmdet or
# mmdet3d (1.4) holds that name, so the alias shadows nothing.
MODELS.register_module(name='MultiheadFlashAttention', module=MultiheadSDPAttention)
