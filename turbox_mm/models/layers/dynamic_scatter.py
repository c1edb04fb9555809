"""``TurboxDynamicScatter``: mmcv's ``DynamicScatter`` on turbox_mm's dynamic scatter op."""
from typing import Sequence, Tuple

from mmcv.ops import DynamicScatter
from torch import Tensor

from turbox_mm.ops.dynamic_scatter import dynamic_scatter
from turbox_mm.registry import MODELS


@MODELS.register_module()
class TurboxDynamicScatter(DynamicScatter):
    """mmcv's ``DynamicScatter`` (same arguments, same results) on
    :func:`turbox_mm.ops.dynamic_scatter.dynamic_scatter`.

    ``[N, 4]`` ``(batch, z, y, x)`` coordinates go through in one call, where mmcv's module
    reads the batch size from the last point (a host synchronisation) and loops over the
    samples with a boolean mask each; the voxels come in the same order (by sample, then
    ``(z, y, x)``). On CUDA the op runs its Triton kernels; on the CPU, where mmcv has no
    scatter op at all, its PyTorch reference. Batch indices in any order give every sample's
    voxels (mmcv's loop stops at the last point's batch index and drops the samples after it;
    mmdet3d's preprocessors emit them sorted, where both agree); an empty input gives empty
    outputs (mmcv's module fails on it). mmdet3d's dynamic voxel encoders get this class
    through ``turbox.ops.fast`` (:mod:`turbox_mm.engine.runner.fast_scatter`).

    Args:
        voxel_size (Sequence[float]): ``[vx, vy, vz]`` (kept for mmcv's signature and repr).
        point_cloud_range (Sequence[float]): ``[x_min, y_min, z_min, x_max, y_max, z_max]``.
        average_points (bool): ``'mean'`` reduction if True, else ``'max'``.

    Examples:
        >>> import torch
        >>> scatter = TurboxDynamicScatter([1, 1, 1], [0, 0, 0, 4, 4, 4], True)
        >>> feats = torch.tensor([[1., 2.], [3., 4.], [5., 6.]])
        >>> coors = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1]])
        >>> voxel_feats, voxel_coors = scatter(feats, coors)
        >>> voxel_feats.tolist(), voxel_coors.tolist()
        ([[4.0, 5.0], [1.0, 2.0]], [[0, 0, 0, 1], [1, 0, 0, 0]])
    """

    def __init__(self, voxel_size: Sequence[float], point_cloud_range: Sequence[float],
                 average_points: bool) -> None:
        super().__init__(voxel_size, point_cloud_range, average_points)

    def forward_single(self, points: Tensor, coors: Tensor) -> Tuple[Tensor, Tensor]:
        """Scatter the points of one sample (``[N, 3]`` coordinates) or of a whole batch."""
        return dynamic_scatter(points, coors, 'mean' if self.average_points else 'max')

    def forward(self, points: Tensor, coors: Tensor) -> Tuple[Tensor, Tensor]:
        """Scatter ``points [N, C]`` into the voxels of ``coors [N, 3 or 4]``, in one call.

        Returns:
            tuple[Tensor, Tensor]: ``voxel_feats [M, C]``, ``voxel_coors [M, 3 or 4]``.
        """
        return self.forward_single(points, coors)
