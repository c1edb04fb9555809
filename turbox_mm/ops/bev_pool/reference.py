"""BEV pooling (lift-splat) in plain PyTorch: the specification and the CPU path.

The semantics are those of the ``bev_pool`` of mmdet3d 1.4's ``projects/BEVFusion`` as its
view transform calls it, with the depth-times-feature product made inside the op:

* **Points.** Every camera pixel ``(h, w)`` of camera ``n`` of sample ``b`` is lifted to ``D``
  points, one per depth bin ``d``; point ``(b, n, d, h, w)`` lies at ``geom[b, n, d, h, w]``
  (x, y, z in the BEV frame) and carries ``prob[b, n, d, h, w] * feats[b, n, :, h, w]``, where
  ``prob`` is ``depth`` or, with ``depth_logits``, its softmax over ``d``.
* **Cells.** A point's cell is ``trunc((geom - lower) / cell_size)`` per axis, evaluated in
  float32 (``lower`` = the grid's lower bound, ``bx - dx / 2`` upstream), the truncation of
  torch's ``.long()``; so a point up to one cell below the lower bound lands in cell 0, as
  upstream. A point is kept when all three indices lie in ``[0, grid)``; NaN coordinates are
  dropped.
* **Pooling.** A cell's value is the sum of its points' values (no mean).
* **Output.** ``[B, Z * C, X, Y]`` with channel ``z * C + c`` (upstream's ``cat(unbind(z))``),
  in channels-last memory (``[B, X, Y, Z * C]`` contiguous, permuted), float32 sums returned
  in the dtype of ``feats``.

The reference materialises the ``[B, N, D, H, W, C]`` product (upstream's view transform does
too); the kernels never do.
"""
from typing import Sequence, Tuple

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_inputs(depth: Tensor, feats: Tensor, geom: Tensor, lower: Sequence[float],
                 cell_size: Sequence[float], grid: Sequence[int]) -> None:
    """Raise ``ValueError`` naming the argument and shapes unless they make a BEV pooling."""
    if depth.dim() != 5:
        raise ValueError(f'bev_pool: depth must be [B, N, D, H, W], got {tuple(depth.shape)}')
    b, n, d, h, w = depth.shape
    if feats.dim() != 5 or feats.shape[:2] != (b, n) or feats.shape[3:] != (h, w):
        raise ValueError(f'bev_pool: feats must be [B, N, C, H, W] = [{b}, {n}, C, {h}, {w}] '
                         f'to match depth {tuple(depth.shape)}, got {tuple(feats.shape)}')
    if tuple(geom.shape) != (b, n, d, h, w, 3):
        raise ValueError(f'bev_pool: geom must be [B, N, D, H, W, 3] = {(b, n, d, h, w, 3)}, '
                         f'got {tuple(geom.shape)}')
    for name, t in (('depth', depth), ('feats', feats), ('geom', geom)):
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f'bev_pool: {name} must be float16, bfloat16 or float32, got '
                             f'{t.dtype}')
        if t.device != depth.device:
            raise ValueError(f'bev_pool: {name} is on {t.device}, depth on {depth.device}')
    if len(lower) != 3 or len(cell_size) != 3 or len(grid) != 3:
        raise ValueError(f'bev_pool: lower, cell_size and grid need 3 values (x, y, z), got '
                         f'{list(lower)}, {list(cell_size)}, {list(grid)}')
    if any(s <= 0 for s in cell_size) or any(int(g) < 1 for g in grid):
        raise ValueError(f'bev_pool: cell_size must be > 0 and grid >= 1, got '
                         f'{list(cell_size)} and {list(grid)}')


def cell_indices(geom: Tensor, lower: Sequence[float], cell_size: Sequence[float],
                 grid: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """Each point's flat cell ``((b * X + x) * Y + y) * Z + z`` and whether it is kept.

    Args:
        geom (Tensor): ``[B, N, D, H, W, 3]``.
        lower, cell_size (Sequence[float]): Per axis, as float32 values.
        grid (Sequence[int]): ``(X, Y, Z)``.

    Returns:
        tuple[Tensor, Tensor]: ``cells`` int64 and ``kept`` bool, both ``[B, N, D, H, W]``
        (``cells`` is meaningless where not kept).
    """
    low = torch.tensor(lower, dtype=torch.float32, device=geom.device)
    size = torch.tensor(cell_size, dtype=torch.float32, device=geom.device)
    scaled = (geom.float() - low) / size
    # Kept iff the truncated index is in [0, n): -1 < v < n (NaN fails both).
    bound = torch.tensor([float(g) for g in grid], device=geom.device)
    kept = ((scaled > -1) & (scaled < bound)).all(-1)
    index = torch.where(kept[..., None], scaled, torch.zeros_like(scaled)).long()
    x_cells, y_cells, z_cells = (int(g) for g in grid)
    batch = torch.arange(geom.shape[0], device=geom.device).view(-1, 1, 1, 1, 1)
    cells = ((batch * x_cells + index[..., 0]) * y_cells + index[..., 1]) * z_cells + \
        index[..., 2]
    return cells, kept


def bev_pool_reference(depth: Tensor, feats: Tensor, geom: Tensor, lower: Sequence[float],
                       cell_size: Sequence[float], grid: Sequence[int],
                       depth_logits: bool = False) -> Tensor:
    """Pool the lifted camera features into BEV cells (module docstring).

    Args:
        depth (Tensor): ``[B, N, D, H, W]`` probabilities, or logits with ``depth_logits``.
        feats (Tensor): ``[B, N, C, H, W]`` context features.
        geom (Tensor): ``[B, N, D, H, W, 3]`` point coordinates.
        lower (Sequence[float]): The grid's lower bound per axis.
        cell_size (Sequence[float]): The cell size per axis.
        grid (Sequence[int]): ``(X, Y, Z)`` cells.
        depth_logits (bool): Take the softmax of ``depth`` over the bins first.

    Returns:
        Tensor: ``[B, X, Y, Z * C]`` (the op's storage; :func:`turbox_mm.ops.bev_pool.bev_pool`
        returns its ``[B, Z * C, X, Y]`` view).
    """
    check_inputs(depth, feats, geom, lower, cell_size, grid)
    b, _, _, _, _ = depth.shape
    channels = feats.shape[2]
    x_cells, y_cells, z_cells = (int(g) for g in grid)
    prob = depth.float().softmax(2) if depth_logits else depth.float()
    lifted = prob.unsqueeze(-1) * feats.float().permute(0, 1, 3, 4, 2).unsqueeze(2)
    cells, kept = cell_indices(geom, lower, cell_size, grid)
    out = lifted.new_zeros(b * x_cells * y_cells * z_cells, channels)
    out.index_add_(0, cells[kept], lifted[kept])
    return out.view(b, x_cells, y_cells, z_cells * channels).to(feats.dtype)
