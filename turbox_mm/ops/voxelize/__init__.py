"""Voxelization of lidar points: hard (mmcv's ``Voxelization`` with ``max_points``) and dynamic.

- :mod:`.reference`: the specification in plain PyTorch (mmcv 2.1's semantics) and the CPU
  path.
- :mod:`.triton_kernels`: the key, run and scatter kernels around one radix sort.
- :mod:`.op`: ``torch.ops.turbox_mm.hard_voxelize`` / ``dynamic_voxelize`` with their fakes
  and the dispatch (CUDA tensors with Triton -> kernels; otherwise -> reference, one warning).

:func:`voxelization` is a drop-in for ``mmcv.ops.voxelization`` (same arguments, same
results as mmcv's deterministic mode: the same voxels in the same order, the same points in
each voxel in the same order). Its ``deterministic=False`` gives that same result too: any
order is a valid result of mmcv's non-deterministic mode, and this one is faster than it.
"""
from typing import Optional, Sequence, Tuple, Union

from torch import Tensor

from .op import dynamic_voxelize_op, fallback_reason, hard_voxelize_op
from .reference import (grid_shape, hard_voxelize_reference, voxel_coords_reference)

__all__ = [
    'voxelization', 'hard_voxelize', 'dynamic_voxelize', 'hard_voxelize_reference',
    'voxel_coords_reference', 'grid_shape', 'fallback_reason'
]


def _floats(values: Sequence[float], name: str, length: int) -> list:
    values = [float(v) for v in (values.tolist() if hasattr(values, 'tolist') else values)]
    if len(values) != length:
        raise ValueError(f'voxelize: {name} must have {length} values, got {values}')
    return values


def dynamic_voxelize(points: Tensor, voxel_size: Sequence[float],
                     point_cloud_range: Sequence[float]) -> Tensor:
    """Each point's voxel ``(z, y, x)``, ``(-1, -1, -1)`` for a dropped point.

    Args:
        points (Tensor): ``[N, C]``, ``C >= 3``, x, y, z first; float16/32/64 or bfloat16,
            any strides.
        voxel_size (Sequence[float]): ``[vx, vy, vz]``.
        point_cloud_range (Sequence[float]): ``[x_min, y_min, z_min, x_max, y_max, z_max]``.

    Returns:
        Tensor: ``[N, 3]`` int32, mmcv's ``dynamic_voxelize_forward``.

    Examples:
        >>> import torch
        >>> pts = torch.tensor([[0.5, 0.5, 0.5, 1.0], [9.0, 0.0, 0.0, 1.0]])
        >>> dynamic_voxelize(pts, [1, 1, 1], [0, 0, 0, 4, 4, 4]).tolist()
        [[0, 0, 0], [-1, -1, -1]]
    """
    return dynamic_voxelize_op(points, _floats(voxel_size, 'voxel_size', 3),
                               _floats(point_cloud_range, 'point_cloud_range', 6))


def hard_voxelize(points: Tensor, voxel_size: Sequence[float], point_cloud_range: Sequence[float],
                  max_points: int, max_voxels: int,
                  sample_sizes: Optional[Sequence[int]] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Hard voxelization of one sample, or of several concatenated ones in one launch.

    Args:
        points (Tensor): ``[N, C]``, ``C >= 3``, x, y, z first; the samples one after another.
        voxel_size (Sequence[float]): ``[vx, vy, vz]``.
        point_cloud_range (Sequence[float]): ``[x_min, y_min, z_min, x_max, y_max, z_max]``.
        max_points (int): Points kept per voxel.
        max_voxels (int): Voxels kept per sample.
        sample_sizes (Sequence[int], optional): Points per sample. Defaults to one sample.

    Returns:
        tuple[Tensor, Tensor, Tensor]: ``voxels [M, max_points, C]``, ``coors [M, 4]`` int32
        ``(sample, z, y, x)``, ``num_points [M]`` int32.

    Examples:
        >>> import torch
        >>> pts = torch.tensor([[0.5, 0.5, 0.5], [0.6, 0.5, 0.5], [1.5, 0.5, 0.5]])
        >>> voxels, coors, num = hard_voxelize(pts, [1, 1, 1], [0, 0, 0, 4, 4, 4], 5, 100)
        >>> coors.tolist(), num.tolist()
        ([[0, 0, 0, 0], [0, 0, 0, 1]], [2, 1])
    """
    sizes = [int(points.shape[0])] if sample_sizes is None else [int(s) for s in sample_sizes]
    return hard_voxelize_op(points, sizes, _floats(voxel_size, 'voxel_size', 3),
                            _floats(point_cloud_range, 'point_cloud_range', 6), int(max_points),
                            int(max_voxels))


def voxelization(points: Tensor, voxel_size: Union[Sequence[float], float],
                 coors_range: Union[Sequence[float], float], max_points: int = 35,
                 max_voxels: int = 20000,
                 deterministic: bool = True) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor]]:
    """A drop-in for ``mmcv.ops.voxelization`` (one sample; ``coors`` are ``(z, y, x)``).

    ``max_points == -1`` or ``max_voxels == -1`` means dynamic voxelization, as in mmcv.
    ``deterministic`` is accepted for mmcv's signature; both values give the deterministic
    result (module docstring).

    Returns:
        Tensor or tuple[Tensor, Tensor, Tensor]: ``coors [N, 3]`` (dynamic) or ``(voxels
        [M, max_points, C], coors [M, 3], num_points [M])``.
    """
    del deterministic  # one algorithm serves both modes
    if max_points == -1 or max_voxels == -1:
        return dynamic_voxelize(points, voxel_size, coors_range)
    voxels, coors, num_points = hard_voxelize(points, voxel_size, coors_range, max_points,
                                              max_voxels)
    return voxels, coors[:, 1:].contiguous(), num_points
