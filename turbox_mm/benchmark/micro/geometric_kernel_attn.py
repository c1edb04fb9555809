"""Micro benchmark: geometric kernel attention, the PyTorch reference against turbox_mm's kernels.

MapTR compiles its own CUDA extension for this op (``GeometricKernelAttentionFunc``), which no
package ships and which does not build on today's PyTorch as it is (docs/design/maptr.md
section 8.2). The stock column is therefore the PyTorch reference
:func:`turbox_mm.ops.geometric_kernel_attn.geometric_kernel_attn_reference` (indexing and a
weighted sum, with autograd), labelled as such in every row; the like-for-like model row will
be "stock model + turbox op". Turbox is
:func:`turbox_mm.ops.geometric_kernel_attn.geometric_kernel_attn` (the Triton kernels). Rows:
forward (under ``no_grad``) and forward + backward (gradients of value and attention
weights), float32 (MapTR's spatial cross-attention runs in float32 under ``force_fp32``) and,
for the first case, float16 too.

Size: MapTR v1 (``maptr_tiny_r50_24e``, docs/design/maptr.md section 3.1): batch 4 of 6
cameras (value batch 24), one 15x25 level (the 800x480 padded input at stride 32), 4 heads
(one a pillar anchor) of 64 channels, a 3x5 kernel (15 points). The queries are the BEV cells
of the 200x100 grid over 30 m x 60 m, each a pillar of 4 anchors at z = -1.5, -0.5, 0.5 and
1.5 m, projected as BEVFormer's ``point_sampling`` does through the nuScenes-like camera rig
of :func:`turbox_mm.datasets.synthetic.cameras.camera_rig` (``lidar2img`` with the 0.5 image
scale, depth clamped at 1e-5, divided by 800x480). Two cases:

- ``camera rig``: ``GeometrySptialCrossAttention``'s rebatching: per camera the queries with
  any anchor in view (0 < u, v < 1, in front of the camera), padded with zero reference
  points to the longest camera's count ``max_len`` (padded rows sample the top-left corner;
  their outputs are dropped, so the backward's output gradient is zero there);
- ``20000 queries``: every BEV query through every camera, the bound on ``max_len`` (anchors
  out of view sample the clamped border, as upstream).

Locations are ``round(ref * (25, 15) + offset)`` over the 15 kernel offsets (dx in -2..2
major, dy in -1..1 minor), int64, as ``GeometryKernelAttention.forward``; weights a softmax
over the 15 points. The Triton kernels need CUDA (the interpreter is no timing), so without a
GPU every row is reported as skipped.
"""
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from turbox_mm.benchmark.micro import _op_rows
from turbox_mm.benchmark.timing import benchmark_device
from turbox_mm.datasets.synthetic.cameras import camera_rig, lidar_mount
from turbox_mm.datasets.synthetic.geometry import invert
from turbox_mm.ops.geometric_kernel_attn import (geometric_kernel_attn,
                                                 geometric_kernel_attn_reference)

PC_RANGE = (-15.0, -30.0, -2.0, 15.0, 30.0, 2.0)  # lidar frame: x right, y forward, z up
IMAGE_SCALE = 0.5  # RandomScaleImageMultiViewImage: 1600x900 -> 800x450
IMAGE_WH = (800, 480)  # padded to a multiple of 32: the size point_sampling divides by
EPS = 1e-5

#: The two sizes of the module docstring.
CASES = {
    'MapTR v1 SCA, camera rig': dict(bs=4, cams=6, bev=(200, 100), heads=4, dims=64,
                                     feat=(15, 25), kernel=(3, 5), queries='rebatch'),
    'MapTR v1 SCA, 20000 queries': dict(bs=4, cams=6, bev=(200, 100), heads=4, dims=64,
                                        feat=(15, 25), kernel=(3, 5), queries='all'),
}
#: Cases also timed in float16 (turbox's kernels take 16-bit inputs; upstream's do not).
HALF_CASES = ('MapTR v1 SCA, camera rig', )
QUICK = {'quick': dict(bs=1, cams=2, bev=(20, 10), heads=2, dims=8, feat=(5, 7),
                       kernel=(3, 3), queries='rebatch')}


def bev_anchors(bev: Tuple[int, int], heads: int) -> np.ndarray:
    """``[H * W, heads, 3]`` lidar-frame anchors: BEV cell centres (row = y cell, row 0 at
    y = -30 m; column = x cell), each a pillar of ``heads`` heights evenly inside the z range
    (BEVFormer's ``get_reference_points``, 3D)."""
    rows, cols = bev
    x0, y0, z0, x1, y1, z1 = PC_RANGE
    ys = y0 + (np.arange(rows) + 0.5) / rows * (y1 - y0)
    xs = x0 + (np.arange(cols) + 0.5) / cols * (x1 - x0)
    zs = z0 + (np.arange(heads) + 0.5) / heads * (z1 - z0)
    yy, xx = np.meshgrid(ys, xs, indexing='ij')
    xy = np.stack([xx.ravel(), yy.ravel()], -1)  # [rows * cols, 2], row-major
    pts = np.concatenate([np.repeat(xy[:, None], heads, 1),
                          np.broadcast_to(zs[None, :, None], (len(xy), heads, 1))], -1)
    return pts


def project(anchors: np.ndarray, cams: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Project lidar-frame ``anchors [n, heads, 3]`` into the rig's first ``cams`` cameras.

    Returns:
        tuple[np.ndarray, np.ndarray]: ``ref [cams, n, heads, 2]`` float32 ``(u, v)``
        normalised by 800x480 (any value for anchors out of view) and ``mask [cams, n,
        heads]`` (in front of the camera and ``0 < u, v < 1``).
    """
    rng = np.random.default_rng(seed)
    lidar2ego = lidar_mount(rng)
    homo = np.concatenate([anchors, np.ones_like(anchors[..., :1])], -1)
    refs, masks = [], []
    for camera in camera_rig(rng)[:cams]:
        intrinsic = np.eye(4)
        intrinsic[:3, :3] = camera.intrinsic
        intrinsic[:2] *= IMAGE_SCALE
        lidar2img = intrinsic @ invert(camera.cam2ego) @ lidar2ego
        cam = homo @ lidar2img.T  # [n, heads, 4]
        depth = cam[..., 2:3]
        uv = cam[..., :2] / np.maximum(depth, EPS) / np.array(IMAGE_WH)
        mask = (depth[..., 0] > EPS) & (uv > 0).all(-1) & (uv < 1).all(-1)
        refs.append(uv.astype(np.float32))
        masks.append(mask)
    return np.stack(refs), np.stack(masks)


def kernel_offsets(kernel: Tuple[int, int]) -> torch.Tensor:
    """``[kh * kw, 2]`` integer ``(dx, dy)`` offsets of a ``(kh, kw)`` kernel, dx major, as
    ``GeometryKernelAttention.grid_offsets``."""
    kh, kw = kernel
    dy = torch.arange(kh) - kh // 2
    dx = torch.arange(kw) - kw // 2
    return torch.stack(torch.meshgrid(dx, dy, indexing='ij'), -1).reshape(kh * kw, 2)


def reference_points(size: Dict, seed: int = 0) -> Tuple[torch.Tensor, Dict]:
    """``[cams, queries, heads, 2]`` reference points of each camera's queries, and facts.

    ``queries='rebatch'``: per camera the BEV queries with an anchor in view, in BEV order,
    zero-padded to the longest camera's count; ``'all'``: every BEV query.
    """
    ref, mask = project(bev_anchors(size['bev'], size['heads']), size['cams'], seed)
    ref, mask = torch.from_numpy(ref), torch.from_numpy(mask)
    seen = mask.any(-1)  # [cams, n]
    facts = dict(in_view=seen.sum(1).tolist())
    if size['queries'] == 'all':
        return ref, facts
    max_len = max(facts['in_view'])
    out = ref.new_zeros(size['cams'], max_len, size['heads'], 2)
    for cam in range(size['cams']):
        index = seen[cam].nonzero().squeeze(-1)
        out[cam, :len(index)] = ref[cam, index]
    return out, facts


def make_inputs(size: Dict, device='cpu', dtype: torch.dtype = torch.float32,
                seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """The five tensors of the op at ``size`` (a :data:`CASES` entry), made on the CPU with a
    fixed seed and moved to ``device``.

    Returns:
        tuple[Tensor, ...]: ``value [bs * cams, 15 * 25, heads, dims]``, ``spatial_shapes``
        ``[[15, 25]]`` and ``level_start_index`` ``[0]`` (int64), ``sampling_loc [bs * cams,
        queries, heads, 1, kh * kw, 2]`` int64 and ``attn_weight [bs * cams, queries, heads,
        1, kh * kw]``.
    """
    gen = torch.Generator().manual_seed(seed)
    bs, cams, heads, dims = size['bs'], size['cams'], size['heads'], size['dims']
    height, width = size['feat']
    ref, _ = reference_points(size, seed)  # [cams, queries, heads, 2]
    queries, points = ref.shape[1], size['kernel'][0] * size['kernel'][1]
    pixel = ref * torch.tensor([width, height], dtype=torch.float32)
    loc = (pixel[:, :, :, None, None, :] + kernel_offsets(size['kernel'])).round().long()
    loc = loc.repeat(bs, 1, 1, 1, 1, 1)  # one rig for the batch: [bs * cams, q, heads, 1, p, 2]
    value = torch.randn(bs * cams, height * width, heads, dims, generator=gen)
    logits = torch.randn(bs * cams, queries, heads, points, generator=gen)
    weights = logits.softmax(-1).reshape(bs * cams, queries, heads, 1, points)
    shapes = torch.tensor([[height, width]])
    start = torch.tensor([0])
    return (value.to(device, dtype), shapes.to(device), start.to(device), loc.to(device),
            weights.to(device, dtype))


def output_grad(size: Dict, queries: int, device='cpu', dtype: torch.dtype = torch.float32,
                seed: int = 1) -> torch.Tensor:
    """``[bs * cams, queries, heads * dims]`` random output gradient, zero on the rows that pad
    a camera's queries (``GeometrySptialCrossAttention`` drops their outputs, so a model's
    gradient is zero there)."""
    bs, cams = size['bs'], size['cams']
    grad = torch.randn(bs * cams, queries, size['heads'] * size['dims'],
                       generator=torch.Generator().manual_seed(seed))
    if size['queries'] == 'rebatch':
        _, facts = reference_points(size)
        for row in range(bs * cams):
            grad[row, facts['in_view'][row % cams]:] = 0
    return grad.to(device, dtype)


def _size_note(size: Dict, queries: Optional[int] = None) -> str:
    kh, kw = size['kernel']
    if queries is None:
        queries = 'max_len' if size['queries'] == 'rebatch' else size['bev'][0] * size['bev'][1]
    return (f"value [{size['bs'] * size['cams']}, {size['feat'][0]}x{size['feat'][1]}, "
            f"{size['heads']}, {size['dims']}], {queries} queries, {kh}x{kw} points")


def _rows(name: str, size: Dict, dtype: torch.dtype, device: torch.device, iters: int,
          warmup: int) -> List[Dict]:
    value, shapes, start, loc, weights = make_inputs(size, device, dtype)
    queries = loc.shape[1]
    grad = output_grad(size, queries, device, dtype)
    args = (value, shapes, start, loc, weights)
    diff = _op_rows.max_abs_diff(geometric_kernel_attn, geometric_kernel_attn_reference, args)
    _, facts = reference_points(size)
    note = (f'{_size_note(size, queries)}; stock = PyTorch reference (upstream compiles its '
            f"own CUDA op, no package ships it); queries in view per camera {facts['in_view']}; "
            f'max |turbox - reference| of the output {diff:.1e}')
    return _op_rows.timed_rows('geometric_kernel_attn', f'{name} {_op_rows.dtype_name(dtype)}',
                               geometric_kernel_attn_reference, geometric_kernel_attn, args,
                               (0, 4), grad, device, iters, warmup, note)


def benchmark(device: str, quick: bool = False) -> List[Dict]:
    """Time the PyTorch reference and turbox's kernels, forward and forward + backward.

    Args:
        device (str): ``'cuda'`` (or ``'cuda:N'``) or ``'cpu'``. On the CPU every row comes
            back skipped (``stock`` and ``turbox`` None, a note saying why): the kernels need
            CUDA, and on the CPU the op runs the reference itself.
        quick (bool): A tiny size and a few iterations, for tests. Defaults to False.

    Returns:
        list[dict]: Two rows (fwd, fwd+bwd) per case and dtype, as described in
        :mod:`turbox_mm.benchmark.micro`.

    Examples:
        >>> rows = benchmark('cpu')
        >>> rows[0]['stock'] is None and 'need CUDA' in rows[0]['note']
        True
    """
    dev = benchmark_device('geometric_kernel_attn', device)
    cases = QUICK if quick else CASES
    plan = _op_rows.plan(cases, HALF_CASES)
    if dev.type != 'cuda':
        return _op_rows.skipped_rows(
            'geometric_kernel_attn', plan,
            lambda size: 'skipped: the Triton kernels need CUDA; on the CPU the op runs the '
            f'PyTorch reference, the stock side itself ({_size_note(size)})')
    iters, warmup = (3, 1) if quick else (100, 20)
    rows = []
    for name, size, dtype in plan:
        rows += _rows(name, size, dtype, dev, iters, warmup)
    return rows
