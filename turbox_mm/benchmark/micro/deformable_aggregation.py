"""Micro benchmark: Sparse4D's deformable aggregation, grid_sample reference against the kernel.

Stock is :func:`turbox_mm.ops.deformable_aggregation.deformable_aggregation_reference` (one
``F.grid_sample`` per camera and level, weighted with an einsum): the pure-PyTorch path a
stock install has, since upstream's CUDA extension is not built here. Turbox is
:func:`turbox_mm.ops.deformable_aggregation.deformable_aggregation` (the Triton kernels on
CUDA; on the CPU the op itself runs the reference, so the CPU rows only check that the
benchmark runs). Rows: forward (under ``no_grad``) and forward + backward (gradients of the
features, sampling locations and weights), float32 and, on CUDA, float16 (all inputs).

Size: the stock training config ``sparse4dv3_temporal_r50_1x8_bs6_256x704.py``: batch 6,
900 anchors plus 320 denoising anchors (``num_dn_groups=5`` x ``max_dn_gt=32`` x 2 with
``add_neg_dn=True``, the count whenever a batch holds 32 or more boxes), 13 keypoints (7 fixed,
6 learnable), 6 cameras, 4 levels of strides 4..32 on 256x704 inputs (64x176, 32x88, 16x44,
8x22), 8 groups, 256 channels.

Sampling locations are real projections: boxes around the ego car (centres uniform over a disc
of 55 m, the range of the stock config's object filter; the denoising anchors are noisy copies
of 32 of them, as upstream's ``get_dn_anchors`` draws them), their 13 keypoints placed as
``SparseBox3DKeyPointsGenerator`` places them, projected through the nuScenes-like camera rig
of :func:`turbox_mm.datasets.synthetic.cameras.camera_rig` after the stock test-time image
transform (resize 1600x900 by 0.44, crop the top 140 rows) and divided by the 704x256 image
size, as ``DeformableFeatureAggregation.project_points`` does. Most points then fall into one or
two cameras; the note of each row says how many. Weights are a softmax over cameras, levels and
points per group, as upstream's ``_get_weights``.
"""
import math
from typing import Dict, List, Tuple

import numpy as np
import torch

from turbox_mm.benchmark.micro import _op_rows
from turbox_mm.benchmark.timing import benchmark_device
from turbox_mm.datasets.synthetic.cameras import camera_rig
from turbox_mm.datasets.synthetic.geometry import invert
from turbox_mm.ops.deformable_aggregation import (deformable_aggregation,
                                                  deformable_aggregation_reference,
                                                  feature_maps_format)

STOCK = dict(bs=6, anchors=900 + 5 * 32 * 2, pts=13, cams=6,
             sizes=((64, 176), (32, 88), (16, 44), (8, 22)), groups=8, channels=256)
QUICK = dict(bs=1, anchors=12, pts=13, cams=6, sizes=((8, 22), (4, 11)), groups=2, channels=16)
IMAGE_WH = (704, 256)  # network input of the stock config
RESIZE, CROP_TOP = 0.44, 140  # 1600x900 -> 704x396, then the top 140 rows cropped away
RANGE_M = 55.0  # CircleObjectRangeFilter(class_dist_thred=[55] * 10)
FIX_SCALE = ((0, 0, 0), (0.45, 0, 0), (-0.45, 0, 0), (0, 0.45, 0), (0, -0.45, 0), (0, 0, 0.45),
             (0, 0, -0.45))
NUM_DN_GT, NUM_DN_GROUPS = 32, 5


def _projection_mats(rng: np.random.Generator, cams: int) -> np.ndarray:
    """``[cams, 3, 4]`` ego -> pixel matrices of the 704x256 network input."""
    mats = []
    for camera in camera_rig(rng)[:cams]:
        intrinsic = camera.intrinsic.copy()
        intrinsic[:2] *= RESIZE
        intrinsic[1, 2] -= CROP_TOP
        mats.append(intrinsic @ invert(camera.cam2ego)[:3])
    return np.stack(mats)


def _boxes(rng: np.random.Generator, count: int) -> np.ndarray:
    """``[count, 7]`` boxes (x, y, z, w, l, h, yaw) in the ego frame, on the ground."""
    radius = RANGE_M * np.sqrt(rng.uniform(0.002, 1.0, count))
    angle = rng.uniform(-math.pi, math.pi, count)
    size = np.stack([rng.uniform(0.4, 3.0, count), rng.uniform(0.4, 8.0, count),
                     rng.uniform(0.8, 3.5, count)], axis=1)
    centre = np.stack([radius * np.cos(angle), radius * np.sin(angle), size[:, 2] / 2], axis=1)
    return np.concatenate([centre, size, rng.uniform(-math.pi, math.pi, (count, 1))], axis=1)


def _dn_boxes(rng: np.random.Generator, gt: np.ndarray) -> np.ndarray:
    """Denoising anchors: per group, a positive (noise within +-scale) and a negative (noise
    of 1..2 x scale) copy of each ground-truth box; scale 2 m on the centre, 0.5 elsewhere."""
    scale = np.array([2.0, 2.0, 2.0, 0.5, 0.5, 0.5, 0.5])
    out = []
    for _ in range(NUM_DN_GROUPS):
        pos = gt + rng.uniform(-1, 1, gt.shape) * scale
        neg = gt + rng.uniform(1, 2, gt.shape) * rng.choice([-1, 1], gt.shape) * scale
        out += [pos, neg]
    boxes = np.concatenate(out)
    boxes[:, 3:6] = np.abs(boxes[:, 3:6]) + 0.1
    return boxes


def _keypoints(rng: np.random.Generator, boxes: np.ndarray, pts: int) -> np.ndarray:
    """``[n, pts, 3]``: the fixed keypoints, then learnable ones uniform in the box."""
    fixed = np.array(FIX_SCALE, dtype=np.float64)[:pts]
    learn = rng.uniform(-0.5, 0.5, (len(boxes), max(0, pts - len(fixed)), 3))
    scale = np.concatenate([np.broadcast_to(fixed, (len(boxes), len(fixed), 3)), learn], axis=1)
    local = scale * boxes[:, None, 3:6]
    cos, sin = np.cos(boxes[:, 6])[:, None], np.sin(boxes[:, 6])[:, None]
    x = local[..., 0] * cos - local[..., 1] * sin
    y = local[..., 0] * sin + local[..., 1] * cos
    return np.stack([x, y, local[..., 2]], axis=-1) + boxes[:, None, :3]


def sampling_locations(bs: int, anchors: int, pts: int, cams: int,
                       seed: int = 0) -> torch.Tensor:
    """Keypoints of boxes around the car projected through the camera rig (module docstring).

    Returns:
        Tensor: float32 ``[bs, anchors, pts, cams, 2]``, ``(x, y)`` divided by the image size
        (inside the image where in ``(0, 1)``).
    """
    rng = np.random.default_rng(seed)
    proj = _projection_mats(rng, cams)
    locs = []
    for _ in range(bs):
        num_dn = min(anchors, NUM_DN_GROUPS * 2 * NUM_DN_GT) if anchors > 900 else 0
        boxes = _boxes(rng, anchors - num_dn)
        if num_dn:
            gt = _boxes(rng, NUM_DN_GT)
            boxes = np.concatenate([boxes, _dn_boxes(rng, gt)[:num_dn]])
        points = _keypoints(rng, boxes, pts)  # [anchors, pts, 3]
        homo = np.concatenate([points, np.ones_like(points[..., :1])], axis=-1)
        uvz = np.einsum('kij,apj->apki', proj, homo)  # [anchors, pts, cams, 3]
        uv = uvz[..., :2] / np.maximum(uvz[..., 2:3], 1e-5)
        locs.append(uv / np.array(IMAGE_WH))
    return torch.from_numpy(np.stack(locs)).float()


def make_inputs(size: Dict, device, dtype: torch.dtype = torch.float32,
                seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """The five inputs of the op at ``size`` (:data:`STOCK` or :data:`QUICK` style dict)."""
    gen = torch.Generator().manual_seed(seed)
    bs, anchors, pts, cams = size['bs'], size['anchors'], size['pts'], size['cams']
    groups, channels, levels = size['groups'], size['channels'], len(size['sizes'])
    maps = [torch.randn(bs, cams, channels, h, w, generator=gen) for h, w in size['sizes']]
    feat, shape, start = feature_maps_format(maps)
    loc = sampling_locations(bs, anchors, pts, cams, seed)
    logits = torch.randn(bs, anchors, cams * levels * pts, groups, generator=gen)
    weights = logits.softmax(dim=-2).reshape(bs, anchors, cams, levels, pts, groups)
    weights = weights.permute(0, 1, 4, 2, 3, 5).contiguous()
    return (feat.to(device, dtype), shape.to(device), start.to(device), loc.to(device, dtype),
            weights.to(device, dtype))


def _inside_note(loc: torch.Tensor) -> str:
    inside = ((loc > 0) & (loc < 1)).all(dim=-1)  # [bs, anchors, pts, cams]
    per_point = inside.sum(dim=-1).float()
    return (f'{100 * inside.float().mean().item():.0f}% of (point, camera) pairs inside; '
            f'{100 * (per_point > 0).float().mean().item():.0f}% of points in a camera, '
            f'{per_point[per_point > 0].mean().item():.2f} cameras each')


def _rows(size: Dict, dtype: torch.dtype, device: torch.device, iters: int,
          warmup: int) -> List[Dict]:
    feat, shape, start, loc, weights = make_inputs(size, device, dtype)
    grad = torch.randn(size['bs'], size['anchors'], size['channels'],
                       generator=torch.Generator().manual_seed(1)).to(device, dtype)
    name = 'x'.join(map(str, (size['bs'], size['anchors'], size['pts'], size['cams'])))
    levels = '+'.join(f'{h}x{w}' for h, w in size['sizes'])
    base = f"{name} L{levels} C{size['channels']} G{size['groups']} {_op_rows.dtype_name(dtype)}"
    note = _inside_note(loc)
    if device.type != 'cuda':
        note += '; on the CPU the op runs the reference too'
    return _op_rows.timed_rows('deformable_aggregation', base, deformable_aggregation_reference,
                               deformable_aggregation, (feat, shape, start, loc, weights),
                               (0, 3, 4), grad, device, iters, warmup,
                               f'stock = grid_sample reference; {note}')


def benchmark(device: str, quick: bool = False) -> List[Dict]:
    """Time the grid_sample reference and the op, forward and forward + backward.

    Args:
        device (str): ``'cuda'`` (or ``'cuda:N'``) or ``'cpu'``.
        quick (bool): A tiny size and a few iterations, for tests. Defaults to False.

    Returns:
        list[dict]: Two rows (fwd, fwd+bwd) per dtype, as described in
        :mod:`turbox_mm.benchmark.micro`.

    Examples:
        >>> rows = benchmark('cpu', quick=True)  # doctest: +SKIP
        >>> [row['case'].split()[-1] for row in rows]  # doctest: +SKIP
        ['fwd', 'fwd+bwd']
    """
    dev = benchmark_device('deformable_aggregation', device)
    size = QUICK if quick else STOCK
    iters, warmup = (3, 1) if quick else (30, 5)
    dtypes = [torch.float32] + ([torch.float16] if dev.type == 'cuda' else [])
    rows = []
    for dtype in dtypes:
        rows += _rows(size, dtype, dev, iters, warmup)
    return rows
