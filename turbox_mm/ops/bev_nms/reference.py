"""BEV box overlaps and NMS in plain PyTorch: the specification and the CPU path.

Five pair tests, each with mmcv 2.1's semantics (``kind``):

* ``'rotated'``: boxes ``[x, y, w, h, angle]``; the IoU of ``mmcv.ops.box_iou_rotated``, which
  ``mmcv.ops.nms_rotated`` uses, and through it mmdet3d's ``nms_bev``. Per pair both boxes are
  moved by the midpoint of their centres; the corners come from ``cos``/``sin`` of the angle in
  float64, rounded to float32 and halved. The overlap polygon's candidate points are the
  crossings of the 16 edge pairs (both edge parameters in ``[0, 1]``, skipped when the edges
  are parallel, ``|det| <= 1e-14``), then each corner of the first box inside the second, then
  each corner of the second inside the first. Fewer than three candidates: no overlap. A box
  with an area below ``1e-14`` has IoU 0. ``iou = inter / (area_a + area_b - inter)``.
  One deliberate difference: a pair whose corners are equal (a box with itself, or an exact
  duplicate) overlaps by its whole area, so its IoU is 1. mmcv's candidate tests have no
  tolerance, and for such a pair every corner sits exactly on the other box's boundary: its
  result there depends on float rounding, and a machine whose rounding drops one corner gets a
  triangle (IoU about 1/3), so duplicates escape suppression. Only equal corners are caught: a
  near-duplicate (one field an ulp apart) keeps mmcv's arithmetic and can lose a corner the
  same way, in mmcv and here.
* ``'iou3d'``: boxes ``[x, y, z, dx, dy, dz, heading]``; the BEV IoU of ``mmcv.ops.nms3d``
  (``iou3d_nms3d_forward``) and the overlap of ``boxes_overlap_bev``. Corners are the
  axis-aligned ones rotated about the centre by float32 ``cos``/``sin``; candidates are the
  strict crossings of the 16 edge pairs (mmcv's ``intersection``: bounding rectangles touch,
  ``s1 * s2 > 0`` and ``s3 * s4 > 0``), then, corner by corner, the second box's corner inside
  the first and the first's inside the second, where "inside" allows a 1 cm margin. (mmcv
  takes ``cosf``/``sinf``; here, as for ``'rotated'``, float64 values rounded to float32,
  which agree to an ulp.)
  ``iou = overlap / max(area_a + area_b - overlap, 1e-8)``.
* ``'aligned'``: boxes ``[x1, y1, x2, y2]``; ``mmcv.ops.nms`` with ``offset=0`` (mmdet3d's
  ``nms_normal_bev``): suppress when ``inter > thr * (area_a + area_b - inter)``.
* ``'iou3d_normal'``: boxes ``[x, y, z, dx, dy, dz, heading]`` with the heading ignored;
  ``mmcv.ops.nms3d_normal``: ``inter / max(area_a + area_b - inter, 1e-8)``.
* ``'circle'``: ``[x, y, ...]``; mmdet3d's ``circle_nms``: suppress when the squared centre
  distance is ``<= thr`` (``thr`` is a squared radius there, named ``min_radius``).

Overlap area of the two polygon kinds: the candidates, sorted by angle about their centroid
(a stable sort, candidates in the order above), fanned from the first:
``|sum_k cross(p_k - p_0, p_k+1 - p_0)| / 2``. For ``'iou3d'`` this is mmcv's own procedure;
for ``'rotated'`` mmcv takes the convex hull of the candidates, and since every candidate lies
on the boundary of the (convex) overlap, the angular order around their centroid is that hull
with repeated or collinear points, which add no area. The results agree with mmcv's up to
float32 rounding (the order of the operations differs), so a keep decision can differ from
mmcv's only for an IoU within rounding of the threshold.

NMS (all kinds): the boxes are ordered by ``scores.sort(descending=True)`` (mmcv's call, so
equal scores order alike; for ``'circle'`` mmdet3d's ``argsort()[::-1]``, which puts the
higher index first among equal scores); walking that order, a box is kept unless a kept box
before it suppresses it; the kept indices come back in that order. "Suppresses" is
``iou > thr`` as in mmcv's CUDA kernels; mmcv's CPU ``nms_rotated`` tests ``iou >= thr``
instead, which differs only for an IoU exactly at the threshold (at threshold 0, every later box).
"""
import math
from typing import Tuple

import torch
from torch import Tensor

#: The pair tests, and the box width each one reads.
KINDS = {'rotated': 5, 'iou3d': 7, 'aligned': 4, 'iou3d_normal': 7, 'circle': 2}
#: Candidate points of a polygon overlap: 16 edge crossings and 8 corners.
NUM_CANDIDATES = 24
#: mmcv's iou3d corner margin (metres) and its division guard.
IOU3D_MARGIN, IOU3D_EPS = 1e-2, 1e-8


def check_boxes(boxes: Tensor, kind: str, name: str = 'boxes') -> None:
    """Raise ``ValueError`` naming the shape, dtype or kind unless ``boxes`` suit ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"bev_nms: kind must be one of {sorted(KINDS)}, got {kind!r}")
    if boxes.dim() != 2 or boxes.shape[1] < KINDS[kind]:
        raise ValueError(f'bev_nms: {name} must be [N, >= {KINDS[kind]}] for kind {kind!r}, got '
                         f'shape {tuple(boxes.shape)}')
    if not boxes.is_floating_point():
        raise ValueError(f'bev_nms: {name} must be floating point, got {boxes.dtype}')


def _corners_rotated(x: Tensor, y: Tensor, w: Tensor, h: Tensor, angle: Tensor) -> Tensor:
    """``[..., 4, 2]`` corners as mmcv's ``get_rotated_vertices``."""
    c2 = torch.cos(angle.double()).float() * 0.5
    s2 = torch.sin(angle.double()).float() * 0.5
    x0 = x - s2 * h - c2 * w
    y0 = y + c2 * h - s2 * w
    x1 = x + s2 * h - c2 * w
    y1 = y - c2 * h - s2 * w
    xs = torch.stack([x0, x1, 2 * x - x0, 2 * x - x1], -1)
    ys = torch.stack([y0, y1, 2 * y - y0, 2 * y - y1], -1)
    return torch.stack([xs, ys], -1)


def _cross(ax: Tensor, ay: Tensor, bx: Tensor, by: Tensor) -> Tensor:
    return ax * by - bx * ay


def _inside_rect(p: Tensor, corners: Tensor) -> Tensor:
    """mmcv's dot-product test of ``p [..., K, 2]`` in the rectangle ``corners [..., 4, 2]``."""
    ab = corners[..., 1:2, :] - corners[..., 0:1, :]
    da = corners[..., 0:1, :] - corners[..., 3:4, :]
    ap = p - corners[..., 0:1, :]
    ap_ab = (ap * ab).sum(-1)
    ap_ad = -(ap * da).sum(-1)
    return (ap_ab >= 0) & (ap_ad >= 0) & (ap_ab <= (ab * ab).sum(-1)) & \
        (ap_ad <= (da * da).sum(-1))


def _candidates_rotated(a: Tensor, b: Tensor
                        ) -> Tuple[Tensor, Tensor, Tuple[Tensor, Tensor], Tensor]:
    """Candidates ``[..., 24, 2]``, their validity, both areas, and whether the pairs' corners
    are equal, for xywhr pairs."""
    shift_x = (a[..., 0] + b[..., 0]) / 2
    shift_y = (a[..., 1] + b[..., 1]) / 2
    pa = _corners_rotated(a[..., 0] - shift_x, a[..., 1] - shift_y, a[..., 2], a[..., 3],
                          a[..., 4])
    pb = _corners_rotated(b[..., 0] - shift_x, b[..., 1] - shift_y, b[..., 2], b[..., 3],
                          b[..., 4])
    va = pa.roll(-1, -2) - pa  # edge i: corner i -> i + 1
    vb = pb.roll(-1, -2) - pb
    # pairs (i, j), i-major: [..., 4, 4]
    v1x, v1y = va[..., :, None, 0], va[..., :, None, 1]
    v2x, v2y = vb[..., None, :, 0], vb[..., None, :, 1]
    det = _cross(v2x, v2y, v1x, v1y)
    d12x = pb[..., None, :, 0] - pa[..., :, None, 0]
    d12y = pb[..., None, :, 1] - pa[..., :, None, 1]
    safe = torch.where(det.abs() <= 1e-14, torch.ones_like(det), det)
    t1 = _cross(v2x, v2y, d12x, d12y) / safe
    t2 = _cross(v1x, v1y, d12x, d12y) / safe
    ok = (det.abs() > 1e-14) & (t1 >= 0) & (t1 <= 1) & (t2 >= 0) & (t2 <= 1)
    px = pa[..., :, None, 0] + v1x * t1
    py = pa[..., :, None, 1] + v1y * t1
    cross_pts = torch.stack([px, py], -1).flatten(-3, -2)
    pts = torch.cat([cross_pts, pa, pb], -2)
    valid = torch.cat([ok.flatten(-2), _inside_rect(pa, pb), _inside_rect(pb, pa)], -1)
    return pts, valid, (a[..., 2] * a[..., 3], b[..., 2] * b[..., 3]), (pa == pb).all(-1).all(-1)


def _trig(angle: Tensor) -> Tuple[Tensor, Tensor]:
    """``cos`` and ``sin`` of float32 angles, taken in float64 and rounded to float32 (mmcv's
    ``cosf`` / ``sinf`` agree to an ulp)."""
    angle = angle.double()
    return torch.cos(angle).float(), torch.sin(angle).float()


def _corners_iou3d(box: Tensor) -> Tensor:
    """``[..., 4, 2]`` corners as mmcv's iou3d ``box_overlap``."""
    x, y, angle = box[..., 0], box[..., 1], box[..., 6]
    hx, hy = box[..., 3] / 2, box[..., 4] / 2
    xs = torch.stack([x - hx, x + hx, x + hx, x - hx], -1) - x[..., None]
    ys = torch.stack([y - hy, y - hy, y + hy, y + hy], -1) - y[..., None]
    cos, sin = _trig(angle)
    cos, sin = cos[..., None], sin[..., None]
    return torch.stack([xs * cos - ys * sin + x[..., None], xs * sin + ys * cos + y[..., None]],
                       -1)


def _inside_iou3d(box: Tensor, p: Tensor) -> Tensor:
    """mmcv's ``check_in_box2d``: ``p [..., K, 2]`` in ``box`` with a 1 cm margin."""
    cos, sin = _trig(box[..., 6])  # of the heading; mmcv rotates by its negative
    cos, sin = cos[..., None], sin[..., None]
    dx, dy = p[..., 0] - box[..., 0, None], p[..., 1] - box[..., 1, None]
    rot_x = dx * cos + dy * sin
    rot_y = dx * (-sin) + dy * cos
    return (rot_x.abs() < box[..., 3, None] / 2 + IOU3D_MARGIN) & \
        (rot_y.abs() < box[..., 4, None] / 2 + IOU3D_MARGIN)


def _candidates_iou3d(a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor, Tuple[Tensor, Tensor]]:
    """Candidates ``[..., 24, 2]`` and their validity for iou3d pairs (mmcv's order)."""
    ca, cb = _corners_iou3d(a), _corners_iou3d(b)
    p0, p1 = ca[..., :, None, :], ca.roll(-1, -2)[..., :, None, :]  # edge i of a
    q0, q1 = cb[..., None, :, :], cb.roll(-1, -2)[..., None, :, :]  # edge j of b

    def cross3(u, v, o):  # mmcv's cross(p1, p2, p0)
        return (u[..., 0] - o[..., 0]) * (v[..., 1] - o[..., 1]) - \
            (v[..., 0] - o[..., 0]) * (u[..., 1] - o[..., 1])

    rect = (torch.minimum(p0[..., 0], p1[..., 0]) <= torch.maximum(q0[..., 0], q1[..., 0])) & \
        (torch.minimum(q0[..., 0], q1[..., 0]) <= torch.maximum(p0[..., 0], p1[..., 0])) & \
        (torch.minimum(p0[..., 1], p1[..., 1]) <= torch.maximum(q0[..., 1], q1[..., 1])) & \
        (torch.minimum(q0[..., 1], q1[..., 1]) <= torch.maximum(p0[..., 1], p1[..., 1]))
    s1, s2 = cross3(q0, p1, p0), cross3(p1, q1, p0)
    s3, s4 = cross3(p0, q1, q0), cross3(q1, p1, q0)
    s5 = cross3(q1, p1, p0)
    ok = rect & (s1 * s2 > 0) & (s3 * s4 > 0)
    den = s5 - s1
    by_area = (den.abs() > IOU3D_EPS)
    den_safe = torch.where(by_area, den, torch.ones_like(den))
    ax = (s5 * q0[..., 0] - s1 * q1[..., 0]) / den_safe
    ay = (s5 * q0[..., 1] - s1 * q1[..., 1]) / den_safe
    # parallel-ish edges: the crossing of the two lines
    a0, b0 = p0[..., 1] - p1[..., 1], p1[..., 0] - p0[..., 0]
    c0 = p0[..., 0] * p1[..., 1] - p1[..., 0] * p0[..., 1]
    a1, b1 = q0[..., 1] - q1[..., 1], q1[..., 0] - q0[..., 0]
    c1 = q0[..., 0] * q1[..., 1] - q1[..., 0] * q0[..., 1]
    d = a0 * b1 - a1 * b0
    lx, ly = (b0 * c1 - b1 * c0) / d, (a1 * c0 - a0 * c1) / d
    cross_pts = torch.stack([torch.where(by_area, ax, lx), torch.where(by_area, ay, ly)], -1)
    corners = torch.stack([cb, ca], -2).flatten(-3, -2)  # b0, a0, b1, a1, ...
    inside = torch.stack([_inside_iou3d(a, cb), _inside_iou3d(b, ca)], -1).flatten(-2)
    pts = torch.cat([cross_pts.flatten(-3, -2), corners], -2)
    valid = torch.cat([ok.flatten(-2), inside], -1)
    return pts, valid, (a[..., 3] * a[..., 4], b[..., 3] * b[..., 4])


def polygon_area(pts: Tensor, valid: Tensor) -> Tensor:
    """Area of the valid candidates sorted by angle about their centroid, fanned from the first.

    Args:
        pts (Tensor): ``[..., K, 2]`` candidate points.
        valid (Tensor): ``[..., K]`` bool.

    Returns:
        Tensor: ``[...]`` areas (0 with fewer than three candidates).
    """
    count = valid.sum(-1)
    live_pts = torch.where(valid[..., None], pts, torch.zeros_like(pts))  # invalid ones may be NaN
    centre = live_pts.sum(-2) / count.clamp(min=1)[..., None].to(pts.dtype)
    angle = torch.atan2(pts[..., 1] - centre[..., None, 1], pts[..., 0] - centre[..., None, 0])
    angle = torch.where(valid, angle, torch.full_like(angle, math.inf))  # invalid ones last
    order = angle.argsort(dim=-1, stable=True)
    sp = torch.gather(pts, -2, order[..., None].expand_as(pts))
    rel = sp - sp[..., :1, :]
    terms = _cross(rel[..., :-1, 0], rel[..., :-1, 1], rel[..., 1:, 0], rel[..., 1:, 1])
    live = torch.arange(pts.shape[-2] - 1, device=pts.device) < (count[..., None] - 1)
    area = torch.where(live, terms, torch.zeros_like(terms)).sum(-1).abs() / 2
    return torch.where(count >= 3, area, torch.zeros_like(area))


def _rotated_overlap(a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``'rotated'`` overlaps (a pair of equal corners: the first box's area), both areas, and
    whether the corners are equal."""
    pts, valid, (area_a, area_b), same = _candidates_rotated(a, b)
    return torch.where(same, area_a, polygon_area(pts, valid)), area_a, area_b, same


def pair_overlap(a: Tensor, b: Tensor, kind: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Overlap areas of broadcast box pairs ``a [..., D]``, ``b [..., D]`` and both areas."""
    if kind == 'rotated':
        return _rotated_overlap(a, b)[:3]
    if kind == 'iou3d':
        pts, valid, (area_a, area_b) = _candidates_iou3d(a, b)
        return polygon_area(pts, valid), area_a, area_b
    raise ValueError(f'bev_nms: no polygon overlap for kind {kind!r}')


def pair_iou(a: Tensor, b: Tensor, kind: str) -> Tensor:
    """IoU (``'circle'``: squared centre distance) of broadcast pairs, in float32."""
    a, b = a.float(), b.float()
    if kind == 'rotated':
        inter, area_a, area_b, same = _rotated_overlap(a, b)
        # equal corners: exactly 1, as the kernel (the areas may still differ by an ulp)
        iou = torch.where(same, 1.0, inter / (area_a + area_b - inter))
        return torch.where((area_a < 1e-14) | (area_b < 1e-14), torch.zeros_like(iou), iou)
    if kind == 'iou3d':
        inter, area_a, area_b = pair_overlap(a, b, kind)
        return inter / torch.clamp(area_a + area_b - inter, min=IOU3D_EPS)
    if kind == 'circle':
        return (a[..., 0] - b[..., 0])**2 + (a[..., 1] - b[..., 1])**2
    if kind == 'aligned':
        x1, y1, x2, y2 = a[..., 0], a[..., 1], a[..., 2], a[..., 3]
        u1, v1, u2, v2 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    else:  # iou3d_normal: from centres and sizes
        x1, x2 = a[..., 0] - a[..., 3] / 2, a[..., 0] + a[..., 3] / 2
        y1, y2 = a[..., 1] - a[..., 4] / 2, a[..., 1] + a[..., 4] / 2
        u1, u2 = b[..., 0] - b[..., 3] / 2, b[..., 0] + b[..., 3] / 2
        v1, v2 = b[..., 1] - b[..., 4] / 2, b[..., 1] + b[..., 4] / 2
    width = (torch.minimum(x2, u2) - torch.maximum(x1, u1)).clamp(min=0)
    height = (torch.minimum(y2, v2) - torch.maximum(y1, v1)).clamp(min=0)
    inter = width * height
    area_a, area_b = (x2 - x1) * (y2 - y1), (u2 - u1) * (v2 - v1)
    if kind == 'aligned':  # mmcv's nms tests inter > thr * union: return the pieces' ratio
        return inter / (area_a + area_b - inter)
    return inter / torch.clamp(area_a + area_b - inter, min=IOU3D_EPS)


def suppresses(a: Tensor, b: Tensor, kind: str, threshold: float) -> Tensor:
    """Whether box ``a`` (kept, higher score) suppresses ``b``: broadcast bool."""
    a, b = a.float(), b.float()
    if kind == 'circle':
        return pair_iou(a, b, kind) <= threshold
    if kind == 'aligned':
        x1, y1, x2, y2 = a[..., 0], a[..., 1], a[..., 2], a[..., 3]
        u1, v1, u2, v2 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
        inter = (torch.minimum(x2, u2) - torch.maximum(x1, u1)).clamp(min=0) * \
            (torch.minimum(y2, v2) - torch.maximum(y1, v1)).clamp(min=0)
        union = (x2 - x1) * (y2 - y1) + (u2 - u1) * (v2 - v1) - inter
        return inter > threshold * union
    return pair_iou(a, b, kind) > threshold


def iou_matrix_reference(boxes_a: Tensor, boxes_b: Tensor, kind: str,
                         chunk: int = 256) -> Tensor:
    """``[M, N]`` pair values of :func:`pair_iou` (``'iou3d'``: the BEV overlap area, as
    ``mmcv.ops.boxes_overlap_bev``), row chunks of ``chunk``."""
    check_boxes(boxes_a, kind, 'boxes_a')
    check_boxes(boxes_b, kind, 'boxes_b')
    out = boxes_a.new_zeros(boxes_a.shape[0], boxes_b.shape[0], dtype=torch.float32)
    for start in range(0, boxes_a.shape[0], chunk):
        a = boxes_a[start:start + chunk, None].float()
        b = boxes_b[None].float()
        if kind == 'iou3d':
            out[start:start + chunk] = pair_overlap(*torch.broadcast_tensors(a, b), kind)[0]
        else:
            out[start:start + chunk] = pair_iou(*torch.broadcast_tensors(a, b), kind)
    return out


def score_order(scores: Tensor, kind: str) -> Tensor:
    """The walk's order: ``scores.sort(descending=True)`` as mmcv's ops; for ``'circle'``
    mmdet3d's ``scores.argsort()[::-1]`` (equal scores: the higher index first)."""
    if kind == 'circle':
        return torch.argsort(scores, stable=True).flip(0)
    return scores.sort(0, descending=True)[1]


def nms_reference(boxes: Tensor, scores: Tensor, threshold: float, kind: str) -> Tensor:
    """Indices of the kept boxes, highest score first (the module docstring's NMS).

    Args:
        boxes (Tensor): ``[N, D]`` in ``kind``'s layout.
        scores (Tensor): ``[N]``.
        threshold (float): IoU threshold (``'circle'``: squared distance).
        kind (str): One of :data:`KINDS`.

    Returns:
        Tensor: ``[K]`` int64 indices into ``boxes``.
    """
    check_boxes(boxes, kind)
    order = score_order(scores, kind)
    num = order.numel()
    if num == 0:
        return order
    ordered = boxes[order].float()
    removed = torch.zeros(num, dtype=torch.bool, device=boxes.device)
    keep = torch.zeros(num, dtype=torch.bool, device=boxes.device)
    for i in range(num):
        if removed[i]:
            continue
        keep[i] = True
        if i + 1 < num:
            later = ordered[i + 1:]
            removed[i + 1:] |= suppresses(ordered[i:i + 1].expand_as(later), later, kind,
                                          threshold)
    return order[keep]
