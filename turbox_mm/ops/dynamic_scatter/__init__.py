"""Dynamic scatter: reduce lidar point features into the voxels they fall in (max/sum/mean).

- :mod:`.reference`: the specification in plain PyTorch (mmcv 2.1's ``dynamic_scatter``) and
  the CPU path (mmcv has no CPU op).
- :mod:`.triton_kernels`: one sort of packed coordinate keys and a per-voxel reduction kernel.
- :mod:`.op`: ``torch.ops.turbox_mm.dynamic_scatter`` with its fake, its autograd and the
  dispatch.

:func:`dynamic_scatter` is a drop-in for ``mmcv.ops.dynamic_scatter``: the same voxels in the
same order, the same reduced features (``'sum'``/``'mean'`` up to float rounding: turbox adds
in a fixed order, mmcv with atomics), the same gradients. It also takes ``[N, 4]`` ``(batch,
z, y, x)`` coordinates in one call, where mmcv's ``DynamicScatter`` loops over the samples
(:class:`turbox_mm.models.layers.TurboxDynamicScatter`).
"""
from typing import Tuple

from torch import Tensor

from .op import dynamic_scatter_op, fallback_reason
from .reference import REDUCE_TYPES, dynamic_scatter_backward, dynamic_scatter_reference

__all__ = [
    'dynamic_scatter', 'dynamic_scatter_op', 'dynamic_scatter_reference',
    'dynamic_scatter_backward', 'fallback_reason', 'REDUCE_TYPES'
]


def dynamic_scatter(feats: Tensor, coors: Tensor,
                    reduce_type: str = 'max') -> Tuple[Tensor, Tensor]:
    """Reduce ``feats`` into the voxels named by ``coors`` (mmcv's ``dynamic_scatter``).

    Args:
        feats (Tensor): ``[N, C]`` float16/32/64 or bfloat16 features, any strides.
        coors (Tensor): ``[N, D]`` int32/int64 voxel coordinates; a row with a negative entry
            belongs to no voxel.
        reduce_type (str): ``'max'``, ``'sum'`` or ``'mean'``. Defaults to ``'max'``.

    Returns:
        tuple[Tensor, Tensor]: ``voxel_feats [M, C]`` and ``voxel_coors [M, D]``, the distinct
        rows of ``coors`` in lexicographic order.

    Examples:
        >>> import torch
        >>> feats = torch.tensor([[1., 4.], [3., 2.], [5., 5.]])
        >>> coors = torch.tensor([[0, 0, 1], [0, 0, 1], [0, 0, 0]], dtype=torch.int32)
        >>> voxel_feats, voxel_coors = dynamic_scatter(feats, coors, 'mean')
        >>> voxel_feats.tolist(), voxel_coors.tolist()
        ([[5.0, 5.0], [2.0, 3.0]], [[0, 0, 0], [0, 0, 1]])
    """
    voxel_feats, voxel_coors = dynamic_scatter_op(feats, coors, reduce_type)[:2]
    return voxel_feats, voxel_coors
