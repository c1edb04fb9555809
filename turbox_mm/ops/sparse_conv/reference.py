"""Sparse convolution in plain PyTorch: the rulebook and the convolution (the CPU path).

mmcv's sparse convolution (and spconv's) has CUDA kernels only. These functions give the same
results on the CPU with mmcv's data layout, so that mmdet3d's sparse encoders (SECOND,
CenterPoint, BEVFusion) run in CPU tests:

* **Rulebook** (:func:`get_indice_pairs`). Input sites ``indices [N, 1 + ndim]`` int32
  ``(batch, spatial...)``. Kernel offsets ``k`` run over the kernel in row-major order. A
  regular convolution connects input site ``i`` to output site ``o`` through offset ``k`` when
  ``i = o * stride - padding + k * dilation`` (cross-correlation, as ``torch.nn.Conv3d``), for
  every output site inside the output grid; its output sites are all the sites reached, in
  (batch, spatial) row-major order. A submanifold convolution keeps the input sites as its
  outputs and connects only existing sites (``stride`` 1). A transposed convolution connects
  ``o = i * stride - padding + k * dilation``. The result is mmcv's ``(outids, indice_pairs [K,
  2, N], indice_pair_num [K])``: pair ``j`` of offset ``k`` is input ``indice_pairs[k, 0, j]``
  to output ``indice_pairs[k, 1, j]``; unused entries are -1.
* **Convolution** (:func:`indice_conv`): ``out[o] += x[i] @ W[k]`` for every pair, with
  ``W = filters.view(K, C_in, C_out)`` (mmcv's ``[*kernel, C_in, C_out]`` weight). With
  ``inverse`` the pairs are read the other way round (output ``indice_pairs[k, 0]``).
  :func:`indice_conv_backward` gives both gradients.

Sums run in the features' dtype, pair order within an offset is the rulebook's.
"""
import itertools
from typing import List, Sequence, Tuple

import torch
from torch import Tensor


def _per_dim(value, ndim: int) -> List[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * ndim


def _keys(batch: Tensor, coords: Tensor, shape: Sequence[int]) -> Tensor:
    """Row-major linear keys of ``(batch, coords)`` in a grid of ``shape``."""
    key = batch.long()
    for d, size in enumerate(shape):
        key = key * int(size) + coords[:, d].long()
    return key


def get_indice_pairs(indices: Tensor, batch_size: int, spatial_shape: Sequence[int], ksize=3,
                     stride=1, padding=0, dilation=1, out_padding=0, subm: bool = False,
                     transpose: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """The rulebook of one sparse convolution (module docstring); mmcv's signature.

    Returns:
        tuple[Tensor, Tensor, Tensor]: ``outids [M, 1 + ndim]`` int32, ``indice_pairs [K, 2,
        N]`` int32, ``indice_pair_num [K]`` int32.
    """
    ndim = indices.shape[1] - 1
    ksize, stride = _per_dim(ksize, ndim), _per_dim(stride, ndim)
    padding, dilation = _per_dim(padding, ndim), _per_dim(dilation, ndim)
    out_padding = _per_dim(out_padding, ndim)
    in_shape = [int(s) for s in spatial_shape]
    if subm:
        out_shape = in_shape
    elif transpose:
        out_shape = [(in_shape[d] - 1) * stride[d] - 2 * padding[d] + ksize[d] + out_padding[d]
                     for d in range(ndim)]
    else:
        out_shape = [(in_shape[d] + 2 * padding[d] - dilation[d] * (ksize[d] - 1) - 1)
                     // stride[d] + 1 for d in range(ndim)]
    device = indices.device
    num = indices.shape[0]
    batch, coords = indices[:, 0].long(), indices[:, 1:].long()
    offsets = torch.tensor(list(itertools.product(*[range(k) for k in ksize])), dtype=torch.long,
                           device=device).view(-1, ndim)
    stride_t = torch.tensor(stride, device=device)
    pad_t = torch.tensor(padding, device=device)
    dil_t = torch.tensor(dilation, device=device)
    bound = torch.tensor(out_shape, device=device)
    # candidate output of every (offset, input site)
    shifted = coords[None] + pad_t - offsets[:, None] * dil_t  # [K, N, ndim]
    if subm:
        out_coords, valid = shifted, ((shifted >= 0) & (shifted < bound)).all(-1)
    elif transpose:
        out_coords = coords[None] * stride_t - pad_t + offsets[:, None] * dil_t
        valid = ((out_coords >= 0) & (out_coords < bound)).all(-1)
    else:
        valid = ((shifted % stride_t == 0) & (shifted >= 0)).all(-1)
        out_coords = torch.div(shifted, stride_t, rounding_mode='floor')
        valid &= (out_coords < bound).all(-1)
    flat_batch = batch[None].expand(offsets.shape[0], -1)
    keys = _keys(flat_batch.reshape(-1), out_coords.reshape(-1, ndim).clamp(min=0), out_shape)
    keys = keys.view(offsets.shape[0], num)
    if subm:
        out_keys = _keys(batch, coords, out_shape)
        order = torch.argsort(out_keys)
        sorted_keys = out_keys[order]
        pos = torch.searchsorted(sorted_keys, keys).clamp(max=max(num - 1, 0))
        found = valid & (sorted_keys[pos] == keys) if num else valid
        out_index = order[pos] if num else pos
        outids = indices
    else:
        unique = torch.unique(keys[valid])  # sorted: (batch, spatial) row-major
        out_index = torch.searchsorted(unique, keys)
        found = valid
        outids = torch.empty(unique.shape[0], ndim + 1, dtype=indices.dtype, device=device)
        rest = unique.clone()
        for d in range(ndim - 1, -1, -1):
            outids[:, d + 1] = (rest % out_shape[d]).to(indices.dtype)
            rest = torch.div(rest, out_shape[d], rounding_mode='floor')
        outids[:, 0] = rest.to(indices.dtype)
    pairs = torch.full((offsets.shape[0], 2, num), -1, dtype=torch.int32, device=device)
    counts = torch.zeros(offsets.shape[0], dtype=torch.int32, device=device)
    source = torch.arange(num, device=device)
    for k in range(offsets.shape[0]):
        hit = found[k]
        count = int(hit.sum())
        pairs[k, 0, :count] = source[hit].int()
        pairs[k, 1, :count] = out_index[k][hit].int()
        counts[k] = count
    return outids, pairs, counts


def indice_conv(features: Tensor, filters: Tensor, indice_pairs: Tensor, indice_pair_num: Tensor,
                num_activate_out: int, inverse: bool = False, subm: bool = False) -> Tensor:
    """``[num_activate_out, C_out]``: the convolution of ``features [N, C_in]`` over the
    rulebook (module docstring); mmcv's signature (``subm`` changes nothing here)."""
    c_in, c_out = filters.shape[-2], filters.shape[-1]
    weights = filters.reshape(-1, c_in, c_out)
    out = features.new_zeros(num_activate_out, c_out)
    src, dst = (1, 0) if inverse else (0, 1)
    for k, count in enumerate(indice_pair_num.tolist()):
        if count:
            rows_in = indice_pairs[k, src, :count].long()
            rows_out = indice_pairs[k, dst, :count].long()
            out.index_add_(0, rows_out, (features[rows_in] @ weights[k]).to(out.dtype))
    return out


def indice_conv_backward(features: Tensor, filters: Tensor, out_bp: Tensor,
                         indice_pairs: Tensor, indice_pair_num: Tensor, inverse: bool = False,
                         subm: bool = False) -> Tuple[Tensor, Tensor]:
    """``(grad of features, grad of filters)`` of :func:`indice_conv` for ``out_bp``."""
    c_in, c_out = filters.shape[-2], filters.shape[-1]
    weights = filters.reshape(-1, c_in, c_out)
    grad_features = torch.zeros_like(features)
    grad_weights = torch.zeros_like(weights)
    src, dst = (1, 0) if inverse else (0, 1)
    for k, count in enumerate(indice_pair_num.tolist()):
        if count:
            rows_in = indice_pairs[k, src, :count].long()
            rows_out = indice_pairs[k, dst, :count].long()
            grad = out_bp[rows_out]
            grad_features.index_add_(0, rows_in, (grad @ weights[k].T).to(grad_features.dtype))
            grad_weights[k] = (features[rows_in].T @ grad).to(grad_weights.dtype)
    return grad_features, grad_weights.view_as(filters)
