"""``TurboxVoxelization``: mmdet3d's ``VoxelizationByGridShape`` on turbox_mm's voxelize ops."""
from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from turbox_mm.ops.voxelize import dynamic_voxelize, hard_voxelize
from turbox_mm.ops.voxelize import grid_shape as voxel_grid_shape
from turbox_mm.registry import MODELS


@MODELS.register_module()
class TurboxVoxelization(nn.Module):
    """Voxelization with the arguments and results of mmdet3d's ``VoxelizationByGridShape``.

    Hard voxelization (``max_num_points > 0``) gives exactly what mmcv's deterministic mode
    gives, in one parallel pass (:mod:`turbox_mm.ops.voxelize`); ``max_num_points == -1`` is
    dynamic voxelization. :meth:`forward_batch` voxelizes the samples of a batch in one call,
    with one host synchronisation instead of one per sample.

    Args:
        point_cloud_range (list[float]): ``[x_min, y_min, z_min, x_max, y_max, z_max]``.
        max_num_points (int): Points kept per voxel; -1 for dynamic voxelization.
        voxel_size (list[float]): ``[vx, vy, vz]``. Exclusive with ``grid_shape``.
        grid_shape (list[int]): ``[L, W, H]``: the voxel size is then ``range / (shape - 1)``,
            as mmdet3d computes it. Exclusive with ``voxel_size``.
        max_voxels (int or tuple[int, int]): Voxels kept per sample, (training, testing).
            Defaults to 20000.
        deterministic (bool): Accepted for mmdet3d's signature; the result is deterministic
            either way. Defaults to True.

    Examples:
        >>> import torch
        >>> layer = TurboxVoxelization([0, 0, 0, 4, 4, 4], 5, voxel_size=[1, 1, 1])
        >>> voxels, coors, num = layer(torch.tensor([[0.5, 0.5, 0.5], [2.5, 0.5, 0.5]]))
        >>> coors.tolist(), num.tolist()
        ([[0, 0, 0], [0, 0, 2]], [1, 1])
    """

    def __init__(self, point_cloud_range: Sequence[float], max_num_points: int,
                 voxel_size: Sequence[float] = (), grid_shape: Sequence[int] = (),
                 max_voxels: Union[int, Tuple[int, int]] = 20000,
                 deterministic: bool = True) -> None:
        super().__init__()
        if len(voxel_size) and len(grid_shape):
            raise ValueError('TurboxVoxelization: voxel_size and grid_shape are exclusive; give '
                             'one of them')
        if len(point_cloud_range) != 6:
            raise ValueError('TurboxVoxelization: point_cloud_range must be [x_min, y_min, z_min, '
                             f'x_max, y_max, z_max], got {list(point_cloud_range)}')
        self.point_cloud_range = list(point_cloud_range)
        self.max_num_points = int(max_num_points)
        self.max_voxels = (tuple(max_voxels) if isinstance(max_voxels, (tuple, list)) else
                           (int(max_voxels), int(max_voxels)))
        if len(self.max_voxels) != 2:
            raise ValueError('TurboxVoxelization: max_voxels must be an int or (training, testing),'
                             f' got {max_voxels}')
        self.deterministic = deterministic
        pcr = torch.tensor(self.point_cloud_range, dtype=torch.float32)
        if len(voxel_size):
            self.voxel_size = list(voxel_size)
            voxel_grid_shape(self.voxel_size, self.point_cloud_range)  # raises if no grid
            # the attribute as mmdet3d computes it (torch.round); the op rounds as mmcv's C++
            self.grid_shape = torch.round((pcr[3:] - pcr[:3]) / torch.tensor(
                self.voxel_size, dtype=torch.float32)).long().tolist()
        elif len(grid_shape):
            shape = torch.tensor(list(grid_shape), dtype=torch.float32)
            self.voxel_size = ((pcr[3:] - pcr[:3]) / (shape - 1)).tolist()
            self.grid_shape = list(grid_shape)
            voxel_grid_shape(self.voxel_size, self.point_cloud_range)  # raises if no grid
        else:
            raise ValueError('TurboxVoxelization: give voxel_size or grid_shape')

    @property
    def dynamic(self) -> bool:
        """True for dynamic voxelization (``max_num_points == -1`` or ``max_voxels == -1``)."""
        return self.max_num_points == -1 or self.current_max_voxels == -1

    @property
    def current_max_voxels(self) -> int:
        """``max_voxels`` of the current mode (training or testing)."""
        return self.max_voxels[0] if self.training else self.max_voxels[1]

    def forward(self, points: Tensor) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor]]:
        """One sample, as ``VoxelizationByGridShape.forward``: ``coors [N, 3]`` (dynamic) or
        ``(voxels [M, max_num_points, C], coors [M, 3], num_points [M])``, coors ``(z, y, x)``."""
        if self.dynamic:
            return dynamic_voxelize(points, self.voxel_size, self.point_cloud_range)
        voxels, coors, num_points = hard_voxelize(points, self.voxel_size, self.point_cloud_range,
                                                  self.max_num_points, self.current_max_voxels)
        return voxels, coors[:, 1:].contiguous(), num_points

    def forward_batch(self, points: List[Tensor]) -> Tuple[Tensor, ...]:
        """The samples of a batch at once; coordinates carry the sample index first.

        Args:
            points (list[Tensor]): One ``[N_i, C]`` cloud per sample.

        Returns:
            tuple[Tensor, ...]: Dynamic: ``(points [sum N_i, C], coors [sum N_i, 4])``, a
            dropped point's row being ``(i, -1, -1, -1)``. Hard: ``(voxels [M, max_num_points,
            C], coors [M, 4], num_points [M])``. The rows equal those of
            ``Det3DDataPreprocessor.voxelize``'s per-sample loop.
        """
        if not points:
            raise ValueError('TurboxVoxelization: forward_batch needs at least one sample')
        sizes = [int(p.shape[0]) for p in points]
        cloud = torch.cat(points, dim=0)  # a copy even of one sample, as the stock code makes
        if not self.dynamic:
            return hard_voxelize(cloud, self.voxel_size, self.point_cloud_range,
                                 self.max_num_points, self.current_max_voxels, sample_sizes=sizes)
        coors = dynamic_voxelize(cloud, self.voxel_size, self.point_cloud_range)
        sample = torch.repeat_interleave(
            torch.arange(len(sizes), dtype=torch.int32, device=cloud.device),
            torch.tensor(sizes, device=cloud.device), output_size=cloud.shape[0])
        return cloud, torch.cat([sample[:, None], coors], dim=1)

    def extra_repr(self) -> str:
        return (f'voxel_size={self.voxel_size}, grid_shape={self.grid_shape}, '
                f'point_cloud_range={self.point_cloud_range}, '
                f'max_num_points={self.max_num_points}, max_voxels={self.max_voxels}')
