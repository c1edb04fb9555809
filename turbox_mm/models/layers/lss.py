"""Lift-splat pieces shared by the LSS view transforms: BEVFusion's
:class:`~turbox_mm.models.bevfusion.DepthLSSTransform` and MapTR v2's
:class:`~turbox_mm.models.maptr.LSSTransform`.

Both lift every image-feature pixel to ``D`` points along its ray (one per depth bin), move the
points into the BEV frame and sum ``probability x context`` per BEV cell. What they share:

- :func:`bev_grid`: the grid of ``(min, max, step)`` rows as upstream's ``gen_dx_bx`` (cell
  size ``dx``, first cell centre ``bx``, cell count ``nx``) and :func:`pooling_grid`, the
  ``lower``, ``cell`` and ``cells`` that :func:`turbox_mm.ops.bev_pool.bev_pool` takes, as the
  float32 values of upstream's tensors (``lower = bx - dx / 2`` evaluated in float32);
- :func:`image_frustum`: the ``[D, fH, fW, 3]`` points ``(u, v, d)``;
- :func:`unproject_frustum`: back through the image augmentation, times the depth, through
  ``R K^-1`` and ``t`` of a camera-to-frame pose; the transforms then apply their own last
  step (BEVFusion the lidar augmentation, MapTR ego to lidar);
- :func:`pool_stock`: the pooling the way upstream's PyTorch code does it (the
  ``[B, N, D, fH, fW, C]`` product, a boolean filter, an index sum);
- :func:`conv_bn_relu`.
"""
from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn

from turbox_mm.ops.bev_pool import cell_indices


def bev_grid(xbound: Sequence[float], ybound: Sequence[float],
             zbound: Sequence[float]) -> Tuple[Tensor, Tensor, Tensor]:
    """``dx`` (cell size), ``bx`` (first cell centre), float32, and ``nx`` (cells, int64) of
    three ``(min, max, step)`` rows; ``nx = int((max - min) / step)`` in double precision.

    Examples:
        >>> dx, bx, nx = bev_grid([-15, 15, 0.15], [-30, 30, 0.15], [-10, 10, 20])
        >>> nx.tolist()
        [200, 400, 1]
    """
    rows = (xbound, ybound, zbound)
    dx = torch.tensor([row[2] for row in rows], dtype=torch.float32)
    bx = torch.tensor([row[0] + row[2] / 2.0 for row in rows], dtype=torch.float32)
    nx = torch.tensor([int((row[1] - row[0]) / row[2]) for row in rows], dtype=torch.long)
    return dx, bx, nx


def pooling_grid(dx: Tensor, bx: Tensor,
                 nx: Tensor) -> Tuple[List[float], List[float], List[int]]:
    """``lower``, ``cell`` and ``cells`` of :func:`turbox_mm.ops.bev_pool.bev_pool` for the
    grid of :func:`bev_grid`: ``lower`` is ``bx - dx / 2`` evaluated in float32, as upstream
    subtracts it from the points."""
    return (bx - dx / 2.0).tolist(), dx.tolist(), [int(n) for n in nx]


def image_frustum(image_size: Sequence[int], feature_size: Sequence[int],
                  dbound: Sequence[float]) -> Tensor:
    """The ``[D, fH, fW, 3]`` frustum ``(u, v, d)``: ``u`` evenly from 0 to ``W - 1`` in
    ``fW`` steps, ``v`` from 0 to ``H - 1`` in ``fH`` steps, ``d = arange(*dbound)``, float32.

    Args:
        image_size (Sequence[int]): ``(H, W)`` of the (augmented, padded) image.
        feature_size (Sequence[int]): ``(fH, fW)``.
        dbound (Sequence[float]): ``(min, max, step)`` of the depth bins.

    Examples:
        >>> f = image_frustum((64, 96), (2, 3), (1.0, 3.0, 1.0))
        >>> f.shape, f[1, 1, 2].tolist()
        (torch.Size([2, 2, 3, 3]), [95.0, 63.0, 2.0])
    """
    (height, width), (fh, fw) = (int(s) for s in image_size), (int(s) for s in feature_size)
    ds = torch.arange(*dbound, dtype=torch.float).view(-1, 1, 1).expand(-1, fh, fw)
    bins = ds.shape[0]
    xs = torch.linspace(0, width - 1, fw, dtype=torch.float).view(1, 1, fw).expand(bins, fh, fw)
    ys = torch.linspace(0, height - 1, fh, dtype=torch.float).view(1, fh, 1).expand(bins, fh, fw)
    return torch.stack((xs, ys, ds), -1)


def inverse(matrices: Tensor, sync_free: bool = False) -> Tensor:
    """``torch.inverse``; with ``sync_free`` the same values from ``torch.linalg.inv_ex``
    without its singularity check (the check waits for the device)."""
    if sync_free:
        return torch.linalg.inv_ex(matrices).inverse
    return torch.inverse(matrices)


def rotate_points(matrices: Tensor, points: Tensor, elementwise: bool = False) -> Tensor:
    """``matrices @ points`` for ``[..., m, k]`` matrices (square in a rotation) broadcast over
    ``[..., k]`` points.

    ``torch.matmul`` of a broadcast ``[..., 3, 3] x [..., 3, 1]`` runs as a batched product of
    one 3 x 3 matrix and one vector per point: on CUDA, cuBLAS batched matrix-vector kernels
    in chunks (about 120 launches of 60 us each for the 8M frustum points of BEVFusion's
    batch, measured in its profile). ``elementwise`` computes the same sums as ``k``
    broadcast multiply-adds over the points' coordinates (:func:`rotate_columns`; float32
    throughout, no TF32: the matrix products of the GPU may round in TF32, which would move
    points by centimetres), so the values differ from the product's only in rounding order.

    Args:
        matrices (Tensor): ``[..., m, k]``, broadcastable against the points' leading shape.
        points (Tensor): ``[..., k]``.
        elementwise (bool): The multiply-adds instead of ``matmul``. Defaults to False.

    Returns:
        Tensor: ``[..., m]`` transformed points.

    Examples:
        >>> m = torch.tensor([[0., -1., 0.], [1., 0., 0.], [0., 0., 1.]])
        >>> rotate_points(m, torch.tensor([[1., 2., 3.]]), elementwise=True).tolist()
        [[-2.0, 1.0, 3.0]]
    """
    if not elementwise:
        return matrices.matmul(points.unsqueeze(-1)).squeeze(-1)
    return rotate_columns(matrices, points.unsqueeze(-1)).squeeze(-1)


def rotate_columns(matrices: Tensor, columns: Tensor) -> Tensor:
    """``matrices @ columns`` for ``[..., m, k]`` matrices and ``[..., k, P]`` columns
    (broadcast), as ``k`` float32 multiply-adds, kept out of TF32 (with ``P = k = m``, the
    product of two square matrices).

    Args:
        matrices (Tensor): ``[..., m, k]``.
        columns (Tensor): ``[..., k, P]``, broadcastable against the matrices' leading shape.

    Returns:
        Tensor: ``[..., m, P]``.

    Examples:
        >>> m = torch.tensor([[0., -1., 0.], [1., 0., 0.], [0., 0., 1.]])
        >>> rotate_columns(m, torch.tensor([[1.], [2.], [3.]])).view(-1).tolist()
        [-2.0, 1.0, 3.0]
    """
    out = matrices[..., :, 0:1] * columns[..., 0:1, :]
    for j in range(1, matrices.shape[-1]):
        out.addcmul_(matrices[..., :, j:j + 1], columns[..., j:j + 1, :])
    return out


def unproject_frustum(frustum: Tensor, rots: Tensor, trans: Tensor, intrins: Tensor,
                      post_rots: Tensor, post_trans: Tensor, sync_free: bool = False) -> Tensor:
    """Every frustum point of every camera in the frame of ``rots``/``trans``:
    ``R K^-1 (A^-1 ((u, v, d) - a) scaled to (x d, y d, d)) + t``.

    Args:
        frustum (Tensor): ``[D, fH, fW, 3]``.
        rots, trans (Tensor): ``[B, N, 3, 3]`` and ``[B, N, 3]``: camera to the target frame.
        intrins (Tensor): ``[B, N, 3, 3]`` camera intrinsics ``K``.
        post_rots, post_trans (Tensor): ``[B, N, 3, 3]`` and ``[B, N, 3]``: the image
            augmentation ``A``, ``a`` (pixel of the original image to the augmented one).
        sync_free (bool): Invert without the host sync of the singularity check (same values),
            and compute the products by float32 multiply-adds (:func:`rotate_points`,
            :func:`rotate_columns`) instead of ``matmul``: no batched matrix-vector launches,
            no TF32 (the same sums, rounded in another order). Defaults to False.

    Returns:
        Tensor: ``[B, N, D, fH, fW, 3]``.
    """
    batch, cams = trans.shape[:2]
    shape = (batch, cams, 1, 1, 1)
    pts = frustum - post_trans.view(*shape, 3)
    pts = rotate_points(inverse(post_rots, sync_free).view(*shape, 3, 3), pts, sync_free)
    pts = torch.cat((pts[..., :2] * pts[..., 2:3], pts[..., 2:3]), -1)
    intrins_inv = inverse(intrins, sync_free)
    combine = rotate_columns(rots, intrins_inv) if sync_free else rots.matmul(intrins_inv)
    pts = rotate_points(combine.view(*shape, 3, 3), pts, sync_free)
    return pts + trans.view(*shape, 3)


def pool_stock(depth: Tensor, context: Tensor, geom: Tensor, lower: Sequence[float],
               cell: Sequence[float], cells: Sequence[int]) -> Tensor:
    """Upstream's PyTorch pooling: the ``[B, N, D, fH, fW, C]`` product ``depth x context``,
    a boolean filter of the points inside the grid (cell ``trunc((p - lower) / cell)``), an
    index sum into ``[B, X, Y, Z, C]``, the z cells stacked into channels.

    Args:
        depth (Tensor): ``[B, N, D, fH, fW]`` probabilities.
        context (Tensor): ``[B, N, C, fH, fW]``.
        geom (Tensor): ``[B, N, D, fH, fW, 3]`` points.
        lower, cell (Sequence[float]), cells (Sequence[int]): :func:`pooling_grid`.

    Returns:
        Tensor: ``[B, Z * C, X, Y]``, channel ``z * C + c``.
    """
    batch = depth.shape[0]
    channels = context.shape[2]
    x_cells, y_cells, z_cells = cells
    lifted = depth.unsqueeze(-1) * context.permute(0, 1, 3, 4, 2).unsqueeze(2)
    index, kept = cell_indices(geom, lower, cell, cells)
    out = lifted.new_zeros(batch * x_cells * y_cells * z_cells, channels)
    out.index_add_(0, index[kept], lifted[kept])
    out = out.view(batch, x_cells, y_cells, z_cells, channels).permute(0, 3, 4, 1, 2)
    return torch.cat(out.unbind(dim=1), 1)


def conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0,
                 bias: bool = True) -> List[nn.Module]:
    """``[Conv2d, BatchNorm2d, ReLU(inplace)]``, to unpack into an ``nn.Sequential``."""
    return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=bias),
            nn.BatchNorm2d(cout), nn.ReLU(True)]
