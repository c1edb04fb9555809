"""Dynamic scatter (points -> voxels) in plain PyTorch: the specification and the CPU path.

The semantics are mmcv 2.1's ``dynamic_scatter`` (``DynamicScatter``, CUDA op
``dynamic_point_to_voxel_forward/backward``), which mmdet3d's dynamic voxel encoders
(``DynamicVFE``, ``DynamicSimpleVFE``, ``DynamicPillarFeatureNet``, ``SegVFE``) call:

* **Voxels.** A point belongs to the voxel named by its row of ``coors``; a row with any
  negative entry (dynamic voxelization writes ``-1`` for a dropped point) belongs to none and
  is left out. The voxels are the distinct rows, sorted lexicographically (mmcv's
  ``unique(dim=0)``), so that with ``(batch, z, y, x)`` rows every sample's voxels come in
  the order mmcv's per-sample loop gives.
* **Reduction** of the features of a voxel's points, per channel: ``'max'``, ``'sum'`` or
  ``'mean'`` (the sum divided by the point count). ``'max'`` skips NaN values (mmcv's
  ``fmaxf``): a channel whose values are all NaN gives ``-inf``. 16-bit features are reduced
  in float32 and written back in their dtype (mmcv has only float32 and float64).
* **Gradients.** ``'sum'``: every point receives its voxel's gradient; ``'mean'``: the
  gradient divided by the count; ``'max'``: per channel, the gradient goes to the lowest
  indexed point whose feature equals the maximum (mmcv's ``reduce_from``), the others get 0.
  Left-out points get 0.

Besides the reduced features and the voxels' coordinates, the op returns what the backward
pass needs: each point's voxel (``-1`` when left out), the point counts, and for ``'max'`` the
index of the point each maximum came from (``N`` where none: a channel of NaN values only).
"""
from typing import Tuple

import torch
from torch import Tensor

REDUCE_TYPES = ('max', 'sum', 'mean')
FEAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
COOR_DTYPES = (torch.int32, torch.int64)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 features, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(feats: Tensor, coors: Tensor, reduce_type: str) -> None:
    """Raise ``ValueError`` naming the argument unless the inputs are a valid scatter."""
    if reduce_type not in REDUCE_TYPES:
        raise ValueError(f'dynamic_scatter: reduce_type must be one of {REDUCE_TYPES}, got '
                         f'{reduce_type!r}')
    if feats.dim() != 2 or feats.dtype not in FEAT_DTYPES:
        raise ValueError(f'dynamic_scatter: feats must be a [N, C] float tensor, got shape '
                         f'{tuple(feats.shape)} {feats.dtype}')
    if coors.dim() != 2 or coors.shape[1] < 1 or coors.dtype not in COOR_DTYPES:
        raise ValueError(f'dynamic_scatter: coors must be a [N, D] int32/int64 tensor, got '
                         f'shape {tuple(coors.shape)} {coors.dtype}')
    if coors.shape[0] != feats.shape[0]:
        raise ValueError(f'dynamic_scatter: feats {tuple(feats.shape)} and coors '
                         f'{tuple(coors.shape)} must have one row per point')
    if coors.device != feats.device:
        raise ValueError(f'dynamic_scatter: feats are on {feats.device}, coors on '
                         f'{coors.device}')


def dynamic_scatter_reference(feats: Tensor, coors: Tensor,
                              reduce_type: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Reduce the points' features into their voxels (module docstring).

    Args:
        feats (Tensor): ``[N, C]`` float features.
        coors (Tensor): ``[N, D]`` int32/int64 voxel coordinates, a negative entry for none.
        reduce_type (str): ``'max'``, ``'sum'`` or ``'mean'``.

    Returns:
        tuple[Tensor, ...]: ``voxel_feats [M, C]`` (the dtype of ``feats``), ``voxel_coors
        [M, D]`` (the dtype of ``coors``), ``point2voxel [N]`` int64 (``-1``: left out),
        ``counts [M]`` int32 and ``argmax [M, C]`` int64 (``'max'``; ``[0, C]`` otherwise).

    Examples:
        >>> import torch
        >>> feats = torch.tensor([[1., 4.], [3., 2.], [5., 5.]])
        >>> coors = torch.tensor([[0, 1], [0, 1], [-1, 0]])
        >>> out = dynamic_scatter_reference(feats, coors, 'max')
        >>> out[0].tolist(), out[1].tolist(), out[4].tolist()
        ([[3.0, 4.0]], [[0, 1]], [[1, 0]])
    """
    check_inputs(feats, coors, reduce_type)
    num, channels = feats.shape
    valid = (coors >= 0).all(1)
    kept = valid.nonzero()[:, 0]
    if kept.numel():
        voxel_coors, inverse, counts = torch.unique(coors[kept], dim=0, return_inverse=True,
                                                    return_counts=True)
    else:
        voxel_coors = coors.new_zeros(0, coors.shape[1])
        inverse = kept.new_zeros(0)
        counts = kept.new_zeros(0)
    voxels = voxel_coors.shape[0]
    point2voxel = torch.full((num,), -1, dtype=torch.int64, device=feats.device)
    point2voxel[kept] = inverse
    values = feats[kept].to(accumulate_dtype(feats.dtype))
    rows = inverse[:, None].expand(-1, channels)
    argmax = torch.zeros(0, channels, dtype=torch.int64, device=feats.device)
    if reduce_type == 'max':
        out = values.new_full((voxels, channels), float('-inf'))
        # NaN features are skipped, as mmcv's fmaxf (and the kernel's maxnum) skip them.
        out.scatter_reduce_(0, rows, values.nan_to_num(nan=float('-inf')), 'amax')
        # The lowest index among the points that hold the maximum (num where none does).
        candidates = torch.where(values == out[inverse], kept[:, None], num)
        argmax = torch.full((voxels, channels), num, dtype=torch.int64, device=feats.device)
        argmax.scatter_reduce_(0, rows, candidates, 'amin')
    else:
        out = values.new_zeros(voxels, channels).index_add_(0, inverse, values)
        if reduce_type == 'mean':
            out = out / counts[:, None].to(out.dtype)
    return out.to(feats.dtype), voxel_coors, point2voxel, counts.to(torch.int32), argmax


def dynamic_scatter_backward(grad: Tensor, num: int, point2voxel: Tensor, counts: Tensor,
                             argmax: Tensor, reduce_type: str) -> Tensor:
    """The gradient of the points' features from that of the voxels' (module docstring).

    Torch ops only, no host synchronisation: the backward of the kernel path too.

    Args:
        grad (Tensor): ``[M, C]``, the gradient of ``voxel_feats``.
        num (int): N, the number of points.
        point2voxel, counts, argmax (Tensor): As the forward returned them.
        reduce_type (str): The forward's reduction.

    Returns:
        Tensor: ``[N, C]`` in the dtype of ``grad``.
    """
    channels = grad.shape[1]
    if reduce_type == 'max':
        # One extra row catches the maxima no point holds (index num).
        out = grad.new_zeros(num + 1, channels)
        out.scatter_(0, argmax, grad)
        return out[:num]
    per_voxel = grad
    if reduce_type == 'mean':
        per_voxel = grad / counts[:, None].to(grad.dtype)
    padded = torch.cat([per_voxel, grad.new_zeros(1, channels)])  # row M: left out
    return padded[torch.where(point2voxel >= 0, point2voxel, per_voxel.shape[0])]
