"""Gaussian heatmap targets of center-based heads, for a whole batch in a few GPU ops.

mmdet3d's ``CenterHead.get_targets`` walks every ground-truth box of every sample in Python:
about ten ``.item()`` reads a box (radius, range checks, window bounds), which measured about
3,200 host synchronisations a CenterPoint training step on the H200. The functions here give
the same tensors without one:

- :func:`gaussian_radius`: mmdet3d's ``gaussian_radius``, elementwise over boxes, the same
  float32 operations in the same order.
- :func:`gaussian_table`: mmdet3d's ``gaussian_2d`` kernels (numpy, float64, then float32) for
  radii ``0..r_max``, centred in one ``[r_max + 1, 2 r_max + 1, 2 r_max + 1]`` table, cached.
- :func:`draw_gaussians`: ``draw_heatmap_gaussian`` for many boxes at once: every box's
  Gaussian over the whole map, reduced with ``amax`` into the heatmaps, which is what the
  sequential ``torch.max`` calls compute (the maximum does not depend on the order). The
  whole map, not a window: a window's size would be the largest radius, a device value the
  host would have to wait for.
"""
import warnings
from functools import lru_cache
from typing import Tuple

import numpy as np
import torch
from torch import Tensor


def gaussian_radius(height: Tensor, width: Tensor, min_overlap: float = 0.5) -> Tensor:
    """The radius of mmdet3d's ``gaussian_radius((height, width), min_overlap)``, elementwise.

    Args:
        height (Tensor): ``[N]`` first size (mmdet3d's CenterHead passes the box width in
            feature-map cells).
        width (Tensor): ``[N]`` second size (the box length in cells).
        min_overlap (float): Defaults to 0.5.

    Returns:
        Tensor: ``[N]`` radii, the minimum of the three quadratic roots.
    """
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + torch.sqrt(b1**2 - 4 * 1 * c1)) / 2
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + torch.sqrt(b2**2 - 4 * 4 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + torch.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


@lru_cache(maxsize=16)
def _gaussian_table_host(r_max: int) -> np.ndarray:
    size = 2 * r_max + 1
    table = np.zeros((r_max + 1, size, size), dtype=np.float32)
    for radius in range(r_max + 1):
        diameter = 2 * radius + 1
        sigma = diameter / 6
        y, x = np.ogrid[-radius:radius + 1, -radius:radius + 1]
        kernel = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
        kernel[kernel < np.finfo(kernel.dtype).eps * kernel.max()] = 0
        table[radius, r_max - radius:r_max + radius + 1,
              r_max - radius:r_max + radius + 1] = kernel.astype(np.float32)
    return table


def gaussian_table(r_max: int, device: torch.device) -> Tensor:
    """mmdet3d's ``gaussian_2d`` kernel of every radius ``0..r_max``, centred, zero-padded.

    Returns:
        Tensor: ``[r_max + 1, 2 r_max + 1, 2 r_max + 1]`` float32 on ``device``.
    """
    return torch.from_numpy(_gaussian_table_host(int(r_max))).to(device, non_blocking=True)


#: Radii up to this take their Gaussian from :func:`gaussian_table` (numpy's values, cached on
#: each device); larger ones (a box some 40 m across at 0.6 m cells) are computed on the device
#: with the same float64 formula.
TABLE_RADIUS = 32
#: Boxes drawn at once: at most about this many map cells a chunk (the chunks' count is known on
#: the host, from the number of boxes and the map size).
CHUNK_CELLS = 1 << 22

_DEVICE_TABLES = {}


def _device_table(device: torch.device) -> Tensor:
    """:func:`gaussian_table` of :data:`TABLE_RADIUS` on ``device``, uploaded once."""
    key = str(device)
    if key not in _DEVICE_TABLES:
        _DEVICE_TABLES[key] = gaussian_table(TABLE_RADIUS, device)
    return _DEVICE_TABLES[key]


def gaussian_values(dy: Tensor, dx: Tensor, radius: Tensor) -> Tensor:
    """mmdet3d's ``gaussian_2d`` of diameter ``2 radius + 1`` at the integer offsets
    ``(dy, dx)`` from its centre, elementwise (broadcast), float32; zero outside the kernel's
    ``(2 radius + 1)^2`` square.

    The formula of :func:`_gaussian_table_host` in float64 on the tensors' device: the same
    operations in the same order, then the cut below ``eps * max`` (the maximum is 1, at the
    centre) and the cast to float32. Radii up to :data:`TABLE_RADIUS` read the table itself.
    """
    within = (dy.abs() <= radius) & (dx.abs() <= radius)
    sigma = (2 * radius + 1).double() / 6
    value = torch.exp((-(dx * dx + dy * dy)).double() / (2 * sigma * sigma))
    value = torch.where(value < np.finfo(np.float64).eps, 0.0, value).float()
    table = _device_table(dy.device)
    cap = TABLE_RADIUS
    looked_up = table[radius.clamp(0, cap), (dy + cap).clamp(0, 2 * cap),
                      (dx + cap).clamp(0, 2 * cap)]
    value = torch.where(radius <= cap, looked_up, value)
    return torch.where(within, value, 0.0)


def draw_gaussians(heatmap: Tensor, image: Tensor, cls: Tensor, center: Tensor, radius: Tensor,
                   valid: Tensor) -> Tensor:
    """Draw each valid box's Gaussian into ``heatmap`` in place (maximum with what is there).

    No host read: each box's Gaussian (:func:`gaussian_values`) is evaluated over the whole
    map, boxes in chunks of about :data:`CHUNK_CELLS` cells, and reduced into its
    ``(sample, channel)`` map with ``amax``. Cells outside a box's kernel get zero, which the
    maximum keeps as it was (the heatmap's values are >= 0).

    Args:
        heatmap (Tensor): ``[B, C, H, W]`` float32, values >= 0.
        image (Tensor): ``[N]`` int64 sample of each box.
        cls (Tensor): ``[N]`` int64 channel of each box.
        center (Tensor): ``[N, 2]`` int64 ``(x, y)`` cell of each box's centre.
        radius (Tensor): ``[N]`` int64 Gaussian radius of each box (>= 0).
        valid (Tensor): ``[N]`` bool, False for boxes not to draw.

    Returns:
        Tensor: ``heatmap``.

    Examples:
        >>> heatmap = torch.zeros(1, 1, 3, 4)
        >>> one = torch.zeros(1, dtype=torch.long)
        >>> _ = draw_gaussians(heatmap, one, one, torch.tensor([[1, 1]]), one + 1,
        ...                    torch.tensor([True]))
        >>> heatmap[0, 0, 1, :3].tolist() == [_gaussian_table_host(1)[1, 1, 0], 1.0,
        ...                                   _gaussian_table_host(1)[1, 1, 2]]
        True
    """
    num = radius.numel()
    if num == 0:
        return heatmap
    batch, channels, height, width = heatmap.shape
    device = heatmap.device
    ys = torch.arange(height, device=device)[None, :, None]
    xs = torch.arange(width, device=device)[None, None, :]
    maps = heatmap.view(batch * channels, height * width)
    # boxes not drawn (other tasks' classes too) reduce zeros into some map, which the maximum
    # keeps as it was; spread over the maps by box, as on CUDA every box reducing into one
    # map made that map's every cell a contended atomic
    target = torch.where(valid, image * channels + cls,
                         torch.arange(num, device=device) % (batch * channels))
    step = max(1, CHUNK_CELLS // (height * width))
    for first in range(0, num, step):
        part = slice(first, first + step)
        r = torch.where(valid[part], radius[part], -1)[:, None, None]  # -1: nothing drawn
        values = gaussian_values(ys - center[part, 1, None, None],
                                 xs - center[part, 0, None, None], r)
        with warnings.catch_warnings():  # torch calls index_reduce_ beta; its amax is needed
            warnings.filterwarnings('ignore', message=r'index_reduce\(\) is in beta')
            maps.index_reduce_(0, target[part], values.view(-1, height * width), 'amax',
                               include_self=True)
    return heatmap


def task_order(labels: Tensor, sample: Tensor, first: int, count: int,
               num_samples: int) -> Tuple[Tensor, Tensor]:
    """Position of each box in its task's per-sample list, as CenterHead builds the list.

    CenterHead lists a task's boxes class by class (in the task's class order), each class in
    ground-truth order: so the key is ``(sample, class position, box index)``.

    Args:
        labels (Tensor): ``[N]`` int64 class labels of the batch's boxes, sample by sample.
        sample (Tensor): ``[N]`` int64 sample of each box.
        first (int): The task's first label.
        count (int): The task's number of classes.
        num_samples (int): Samples in the batch.

    Returns:
        tuple[Tensor, Tensor]: ``in_task [N]`` bool and ``position [N]`` int64 (the box's
        index ``k`` in its sample's task list; meaningless where ``in_task`` is False).
    """
    num = labels.numel()
    class_pos = labels - first
    in_task = (class_pos >= 0) & (class_pos < count)
    index = torch.arange(num, device=labels.device)
    key = torch.where(in_task, (sample * count + class_pos) * (num + 1) + index,
                      torch.full_like(index, num_samples * count * (num + 1)))
    order = torch.argsort(key, stable=True)
    # rank among the task's boxes of the same sample: position in sorted order minus the
    # number of the task's boxes of earlier samples
    rank = torch.empty_like(index)
    rank[order] = index
    per_sample = torch.zeros(num_samples + 1, dtype=torch.int64, device=labels.device)
    per_sample.index_add_(0, sample + 1, in_task.long())
    before = torch.cumsum(per_sample, 0)[:-1]
    return in_task, rank - before[sample]
