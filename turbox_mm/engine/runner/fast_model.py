"""``turbox.ops.fast`` on the built model: fewer operations a training step, the same maths.

Three changes that no config can reach, made to the model object (any config's, before it
is compiled or wrapped for DDP):

* **Loss summation.** mmengine's ``BaseModel.parse_losses`` takes ``mean()`` of every loss (a
  scalar already, in practice) and adds them one by one in Python: two operations a loss,
  about 190 a step for MapTR v2 (70 loss terms), each a kernel launch on the GPU.
  :func:`stacked_parse_losses` leaves scalar losses as they are and sums float32 / float64
  terms in one reduction over their stack. The log holds the same entries; the gradient
  reaching every term is exactly 1 times the incoming one, as before, so the parameters'
  gradients are bit for bit mmengine's; only the logged total may differ from mmengine's
  sequential sum in the last bits. Half-precision terms keep mmengine's sequential sum (a
  reduction would accumulate in float32 and could stay finite where mmengine's overflows to
  inf, which ``CheckInvalidLossHook`` watches for). Installed where the model's class keeps
  mmengine's ``parse_losses``.
* **Attention without weights.** mmcv's ``MultiheadAttention`` calls ``torch.nn``'s with
  ``need_weights`` left at its default (True) and discards the weights. torch then computes
  the attention explicitly (scores, softmax, dropout, weighted sum, and the head-averaged
  weights, each materialised) instead of one ``scaled_dot_product_attention`` kernel. Its
  inner module becomes :class:`WeightlessMultiheadAttention`, whose default is
  ``need_weights=False``: the same output (up to float rounding; attention dropout draws its
  mask inside the kernel, from another random stream), the same parameters and
  ``state_dict``. Only inner modules of mmcv's class (or subclasses that keep its
  ``forward``) change; an ``nn.MultiheadAttention`` used directly keeps returning weights.
  Two differences outside well-formed input and bit reproducibility: a query whose keys are
  all masked gets NaN from the explicit softmax but a finite output (the projection's bias)
  from ``scaled_dot_product_attention`` (``tests/test_fast_model.py`` pins it); and on the GPU
  the memory-efficient attention's backward is not bitwise deterministic unless
  ``torch.use_deterministic_algorithms(True)`` is set. Training attention in float32 on
  CUDA over long key sequences (at least :data:`MATH_MIN_KEYS`, outside an autocast to half
  precision: BEVFusion's TransFusion cross-attention) runs ``scaled_dot_product_attention``'s
  math backend instead (:func:`math_attention_wanted`): there torch's memory-efficient
  kernel, its only fused choice in float32, had a slow backward; the math backend is
  deterministic and draws dropout as the explicit attention does (its fully masked queries
  are finite too).
* **No in-place activation on a view.** ``nn.Linear`` on an input of more than two dimensions
  returns a view of a 2-D product, and an in-place activation right after it (``ReLU(inplace=
  True)`` in an ``nn.Sequential``: Sparse4D's ``linear_relu_ln`` blocks, mmcv's ``FFN``)
  then writes into a view. Autograd records that as ``CopySlices`` over an ``as_strided``
  view, whose backward allocates and fills a zero tensor, copies slices and clones the
  gradient: about six kernels where the activation's own backward is one (measured on
  Sparse4D's anchor encoder). :func:`out_of_place_activations` makes exactly those
  activations out of place: the same values, and no more memory kept for backward (autograd
  keeps neither the linear layer's output nor, for ReLU, anything but the activation's
  result; the transient peak holds one more activation).
"""
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel


class WeightlessMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose ``need_weights`` defaults to False.

    Its attention weights are then ``None`` unless a caller asks for them, and torch runs
    ``scaled_dot_product_attention`` (a fused kernel on the GPU where torch has one; the math
    backend where :func:`math_attention_wanted` says so). Made only by changing the class of
    the inner module of mmcv's ``MultiheadAttention``, which discards them.
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        """``nn.MultiheadAttention.forward`` with ``need_weights=False`` by default; training
        attention in float32 on CUDA over long key sequences takes torch's math backend
        (:func:`math_attention_wanted`)."""
        kwargs = dict(key_padding_mask=key_padding_mask, need_weights=need_weights,
                      attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                      is_causal=is_causal)
        keys = key.shape[1] if self.batch_first and key.dim() == 3 else key.shape[0]
        if need_weights or not self.training or not math_attention_wanted(query, keys):
            return super().forward(query, key, value, **kwargs)
        with sdpa_kernel(SDPBackend.MATH):
            return super().forward(query, key, value, **kwargs)


def _sdpa_kernel_traceable() -> bool:
    """Whether Dynamo traces ``sdpa_kernel`` (torch >= 2.6); older ones break the graph."""
    from torch._dynamo.variables import ctx_manager
    return hasattr(ctx_manager, 'SDPAKernelVariable')


#: Key sequence length from which float32 training attention on CUDA takes the math backend.
#: The one measured case: BEVFusion's TransFusion cross-attention, 200 queries over 32,400
#: BEV cells. Shorter sequences (Sparse4D's, MapTR's: about 1,000 keys) are not measured and
#: keep torch's choice, and the memory it saves.
MATH_MIN_KEYS = 16384


def math_attention_wanted(query: Tensor, keys: int) -> bool:
    """Whether training attention on ``query`` over ``keys`` keys should take
    ``scaled_dot_product_attention``'s math backend: float32 on CUDA, outside an autocast to
    half precision, from :data:`MATH_MIN_KEYS` keys.

    In float32 torch has no flash kernel and picks the memory-efficient one, which keeps
    float32 accuracy in its products (3xTF32, whatever ``allow_tf32`` says). Its backward
    (with dropout) took 49.6 ms an iteration on an H100 for BEVFusion's TransFusion head, whose
    cross-attention has 200 queries over 32,400 BEV cells at head size 16
    (``docs/benchmarks.md``). The math backend is the attention mmcv's own call computes
    (``need_weights=True``: scores, softmax, dropout, weighted sum, TF32 products where
    allowed) without the head-averaged weights; like mmcv's call it keeps score-sized tensors
    for the backward (about 0.8 GB each for TransFusion's batch of 4, by arithmetic), which the
    memory-efficient kernel does not. Two differences from mmcv's call remain: a query whose
    keys are all masked gets the output projection's bias, not NaN, and q and k are each
    scaled by the root of the scale. Half precision (or an autocast to it) keeps the fused
    kernels; evaluation and shorter key sequences keep torch's choice.

    Args:
        query (Tensor): The attention's query (its device and dtype decide).
        keys (int): The key sequence length.

    Returns:
        bool: Whether to run the math backend.
    """
    if query.device.type != 'cuda' or query.dtype != torch.float32 or keys < MATH_MIN_KEYS:
        return False
    if torch.is_autocast_enabled('cuda') and torch.get_autocast_dtype('cuda') in (
            torch.float16, torch.bfloat16):
        return False
    return not torch.compiler.is_compiling() or _sdpa_kernel_traceable()


#: Loss dtypes summed in one reduction (half precision keeps mmengine's sequential sum).
_STACKED_DTYPES = (torch.float32, torch.float64)


def _sum(terms: Sequence[Tensor]):
    """The sum of ``terms``: one reduction over their stack where they are float32 / float64
    scalars of one dtype and device; else Python's ``sum`` (mmengine's); ``0`` when empty."""
    if len(terms) > 1 and terms[0].dtype in _STACKED_DTYPES and all(
            t.dim() == 0 and t.dtype == terms[0].dtype and t.device == terms[0].device
            for t in terms):
        return torch.stack(list(terms)).sum()
    return sum(terms)


def _mean(value: Tensor) -> Tensor:
    """mmengine's ``value.mean()``, except that a floating-point scalar is its own mean."""
    if value.dim() == 0 and value.is_floating_point():
        return value
    return value.mean()


def stacked_parse_losses(losses: Dict[str, object]) -> Tuple[Tensor, Dict[str, Tensor]]:
    """mmengine's ``BaseModel.parse_losses`` in a few operations (see the module docstring).

    Args:
        losses (dict): The model's loss dict: tensors or lists of tensors.

    Returns:
        tuple[Tensor, dict]: The total of the entries whose name contains ``'loss'``, and the
        log variables (``'loss'`` first, then every entry's mean, in order).

    Raises:
        TypeError: An entry is neither a tensor nor a list of tensors (named, as mmengine).
    """
    from mmengine.utils import is_list_of
    log_vars = []
    for name, value in losses.items():
        if isinstance(value, Tensor):
            log_vars.append((name, _mean(value)))
        elif is_list_of(value, Tensor):
            log_vars.append((name, _sum([_mean(v) for v in value])))
        else:
            raise TypeError(f'{name} is not a tensor or list of tensors')
    loss = _sum([value for name, value in log_vars if 'loss' in name])
    return loss, OrderedDict([('loss', loss)] + log_vars)


def _mmcv_attention_class():
    try:
        from mmcv.cnn.bricks.transformer import MultiheadAttention
    except ImportError:  # pragma: no cover - mmcv is a dependency
        return None
    return MultiheadAttention


def weightless_attention(model: nn.Module) -> int:
    """Make the inner attention of every mmcv ``MultiheadAttention`` in ``model`` (whose class
    keeps mmcv's ``forward``) a :class:`WeightlessMultiheadAttention`; returns how many."""
    mmcv_cls = _mmcv_attention_class()
    if mmcv_cls is None:
        return 0
    count = 0
    for module in model.modules():
        inner = getattr(module, 'attn', None)
        if (isinstance(module, mmcv_cls) and type(module).forward is mmcv_cls.forward
                and type(inner) is nn.MultiheadAttention):
            inner.__class__ = WeightlessMultiheadAttention
            count += 1
    return count


def out_of_place_activations(model: nn.Module) -> int:
    """Set ``inplace=False`` on every in-place ``torch.nn`` activation that directly follows
    an ``nn.Linear`` in an ``nn.Sequential`` of ``model`` (the module docstring says why);
    returns how many changed.

    Examples:
        >>> block = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.LayerNorm(4),
        ...                       nn.ReLU(inplace=True))
        >>> out_of_place_activations(block), block[1].inplace, block[3].inplace
        (1, False, True)
    """
    count = 0
    for seq in model.modules():
        # only Sequentials that run their children in order (a subclass with its own forward
        # might read the linear layer's output after the activation)
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        children = [m for m in seq._modules.values() if m is not None]  # as forward runs them
        for before, act in zip(children, children[1:]):
            if (isinstance(before, nn.Linear) and not before._forward_hooks
                    and getattr(act, 'inplace', False) is True
                    and type(act).__module__ == nn.ReLU.__module__):
                act.inplace = False
                count += 1
    return count


def apply_fast_model(model: nn.Module) -> List[str]:
    """Apply this module's three changes to ``model`` (unwrapped); one report line per change.

    Args:
        model (nn.Module): The model as built, before compile and DDP.

    Returns:
        list[str]: What changed.
    """
    from mmengine.model import BaseModel
    changes = []
    if isinstance(model, BaseModel) and type(model).parse_losses is BaseModel.parse_losses \
            and 'parse_losses' not in vars(model):
        model.parse_losses = stacked_parse_losses
        changes.append('model.parse_losses: the loss terms summed in one reduction '
                       '(turbox_mm.stacked_parse_losses; the same gradients)')
    count = weightless_attention(model)
    if count:
        changes.append(f"mmcv MultiheadAttention: {count} without attention weights "
                       "(scaled_dot_product_attention; mmcv discards them)")
    count = out_of_place_activations(model)
    if count:
        changes.append(f'{count} in-place activations after nn.Linear made out of place (an '
                       'in-place write into the linear layer\'s view; the same values)')
    return changes


__all__ = ['WeightlessMultiheadAttention', 'MATH_MIN_KEYS', 'math_attention_wanted',
           'stacked_parse_losses', 'weightless_attention',
           'out_of_place_activations', 'apply_fast_model']
