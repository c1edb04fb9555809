"""Triton kernels of BEV box overlaps and NMS (spec: :mod:`.reference`).

NMS in two kernels after one score sort:

1. :func:`_mask_kernel`, one program per 64 x 64 block of box pairs (upper blocks only): for
   each box ``i`` of the row block a 64-bit word whose bit ``k`` says that ``i`` suppresses
   box ``64 * col + k`` (only later boxes), as mmcv's kernels lay it out. The polygon kinds
   first test 16 pairs at a time with the boxes' circumscribed circles (a pair whose circles
   do not meet cannot overlap) and run the exact test only on a group that has a candidate:
   at detection densities most groups have none.
2. :func:`_reduce_kernel`, one program: walks the 64-box blocks in score order, resolves a
   block against itself bit by bit, then ORs the rows of its kept boxes into the removal words
   of the later blocks. The walk stays on the GPU (mmcv copies the mask to the host and walks
   it there).

The exact pair test lays a group of pairs out as ``[16 pairs, 32 candidates]``: lanes 0-15 are
the 16 edge crossings, 16-23 the corner tests, in :mod:`.reference`'s order. The overlap area
sorts the candidates by a pseudo-angle about their centroid (monotonic in the angle, no
``atan2``), packed with the lane index into one int64 key for ``tl.sort``, and fans the sorted
polygon from its first point.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import IOU3D_EPS, IOU3D_MARGIN

#: Boxes per mask word (mmcv's ``threadsPerBlock``); pairs per exact group (the kernels
#: spell both out as literals, with 32 candidate lanes).
WORD, GROUP = 64, 16
KIND_IDS = {'rotated': 0, 'iou3d': 1, 'aligned': 2, 'iou3d_normal': 3, 'circle': 4}
#: Columns of the per-box parameter rows (see :func:`box_params`).
PARAMS = 8


def box_params(boxes: Tensor, kind: str) -> Tensor:
    """``[N, 8]`` float32 rows the kernels read: the box fields, then what a pair test reuses.

    ``'rotated'``: x, y, w, h, cos/2, sin/2 (float64 trigonometry rounded to float32, as mmcv),
    circumradius; ``'iou3d'``: x, y, dx, dy, cos, sin (float32), circumradius; ``'aligned'``:
    x1, y1, x2, y2; ``'iou3d_normal'``: x, y, dx, dy; ``'circle'``: x, y.
    """
    b = boxes.float()
    out = b.new_zeros(b.shape[0], PARAMS)
    if kind == 'rotated':
        out[:, :4] = b[:, :4]
        out[:, 4] = torch.cos(boxes[:, 4].double()).float() * 0.5
        out[:, 5] = torch.sin(boxes[:, 4].double()).float() * 0.5
        out[:, 6] = 0.5 * torch.sqrt(b[:, 2] * b[:, 2] + b[:, 3] * b[:, 3])
    elif kind == 'iou3d':
        out[:, :2] = b[:, :2]
        out[:, 2:4] = b[:, 3:5]
        out[:, 4] = torch.cos(b[:, 6])
        out[:, 5] = torch.sin(b[:, 6])
        out[:, 6] = 0.5 * torch.sqrt(b[:, 3] * b[:, 3] + b[:, 4] * b[:, 4])
    elif kind == 'aligned':
        out[:, :4] = b[:, :4]
    elif kind == 'iou3d_normal':
        out[:, :2] = b[:, :2]
        out[:, 2:4] = b[:, 3:5]
    else:
        out[:, :2] = b[:, :2]
    return out


@triton.jit
def _pick(k, v0, v1, v2, v3):
    """``[v0, v1, v2, v3][k]`` lane by lane."""
    return tl.where(k == 0, v0, tl.where(k == 1, v1, tl.where(k == 2, v2, v3)))


@triton.jit
def _fan_area(px, py, valid, lane):
    """Area of the valid candidates ``[G, 32]`` in angular order about their centroid."""
    cnt = tl.sum(valid.to(tl.int32), 1)
    cx = tl.sum(tl.where(valid, px, 0.0), 1) / tl.maximum(cnt, 1).to(tl.float32)
    cy = tl.sum(tl.where(valid, py, 0.0), 1) / tl.maximum(cnt, 1).to(tl.float32)
    dx = px - cx[:, None]
    dy = py - cy[:, None]
    span = tl.abs(dx) + tl.abs(dy)
    p = tl.where(span > 0, dy / tl.where(span > 0, span, 1.0), 0.0)
    # [0, 1]: x < 0, y < 0; [1, 3]: x >= 0; [3, 4]: x < 0, y >= 0 (atan2's order from -pi)
    key = tl.where(dx >= 0, 2.0 + p, tl.where(dy < 0, 0.0 - p, 4.0 - p))
    bits = tl.where(valid, key.to(tl.int32, bitcast=True), 0x7F800000).to(tl.int64)
    order = tl.sort((bits << 5) | lane.to(tl.int64), dim=1)
    idx = (order & 31).to(tl.int32)
    sx = tl.gather(px, idx, 1)
    sy = tl.gather(py, idx, 1)
    x0 = tl.sum(tl.where(lane == 0, sx, 0.0), 1)[:, None]
    y0 = tl.sum(tl.where(lane == 0, sy, 0.0), 1)[:, None]
    nxt = tl.gather(idx, tl.minimum(lane + 1, 31) + 0 * idx, 1)
    nx = tl.gather(px, nxt, 1)
    ny = tl.gather(py, nxt, 1)
    term = (sx - x0) * (ny - y0) - (nx - x0) * (sy - y0)
    area = tl.abs(tl.sum(tl.where(lane < cnt[:, None] - 1, term, 0.0), 1)) * 0.5
    return tl.where(cnt >= 3, area, 0.0)


@triton.jit
def _load_box(ptr, rows, live):
    """Fields 0-5 of the parameter rows ``rows`` (any shape), 0 where not ``live``."""
    base = ptr + rows.to(tl.int64) * 8
    return (tl.load(base, mask=live, other=0.0), tl.load(base + 1, mask=live, other=0.0),
            tl.load(base + 2, mask=live, other=0.0), tl.load(base + 3, mask=live, other=0.0),
            tl.load(base + 4, mask=live, other=0.0), tl.load(base + 5, mask=live, other=0.0))


@triton.jit
def _iou_rotated(ax, ay, aw, ah, ac, asn, bx, by, bw, bh, bc, bsn, lane):
    """mmcv's ``box_iou_rotated`` IoU of ``[G, 1]`` pairs; returns ``[G]``."""
    sx = (ax + bx) / 2
    sy = (ay + by) / 2
    acx = ax - sx
    acy = ay - sy
    bcx = bx - sx
    bcy = by - sy
    a0x = acx - asn * ah - ac * aw
    a0y = acy + ac * ah - asn * aw
    a1x = acx + asn * ah - ac * aw
    a1y = acy - ac * ah - asn * aw
    a2x = 2 * acx - a0x
    a2y = 2 * acy - a0y
    a3x = 2 * acx - a1x
    a3y = 2 * acy - a1y
    b0x = bcx - bsn * bh - bc * bw
    b0y = bcy + bc * bh - bsn * bw
    b1x = bcx + bsn * bh - bc * bw
    b1y = bcy - bc * bh - bsn * bw
    b2x = 2 * bcx - b0x
    b2y = 2 * bcy - b0y
    b3x = 2 * bcx - b1x
    b3y = 2 * bcy - b1y
    # lanes 0-15: edge i of a (corner i -> i + 1) against edge j of b
    ei = lane // 4
    ej = lane % 4
    pix = _pick(ei, a0x, a1x, a2x, a3x)
    piy = _pick(ei, a0y, a1y, a2y, a3y)
    v1x = _pick((ei + 1) % 4, a0x, a1x, a2x, a3x) - pix
    v1y = _pick((ei + 1) % 4, a0y, a1y, a2y, a3y) - piy
    qjx = _pick(ej, b0x, b1x, b2x, b3x)
    qjy = _pick(ej, b0y, b1y, b2y, b3y)
    v2x = _pick((ej + 1) % 4, b0x, b1x, b2x, b3x) - qjx
    v2y = _pick((ej + 1) % 4, b0y, b1y, b2y, b3y) - qjy
    det = v2x * v1y - v1x * v2y
    ok_det = tl.abs(det) > 1e-14
    den = tl.where(ok_det, det, 1.0)
    d12x = qjx - pix
    d12y = qjy - piy
    t1 = (v2x * d12y - d12x * v2y) / den
    t2 = (v1x * d12y - d12x * v1y) / den
    cross_ok = ok_det & (t1 >= 0) & (t1 <= 1) & (t2 >= 0) & (t2 <= 1) & (lane < 16)
    # lanes 16-19: corner of a inside b; 20-23: corner of b inside a
    of_a = lane < 20
    ck = (lane - 16) % 4
    cpx = tl.where(of_a, _pick(ck, a0x, a1x, a2x, a3x), _pick(ck, b0x, b1x, b2x, b3x))
    cpy = tl.where(of_a, _pick(ck, a0y, a1y, a2y, a3y), _pick(ck, b0y, b1y, b2y, b3y))
    r0x = tl.where(of_a, b0x, a0x)
    r0y = tl.where(of_a, b0y, a0y)
    abx = tl.where(of_a, b1x, a1x) - r0x
    aby = tl.where(of_a, b1y, a1y) - r0y
    dax = r0x - tl.where(of_a, b3x, a3x)
    day = r0y - tl.where(of_a, b3y, a3y)
    apx = cpx - r0x
    apy = cpy - r0y
    ap_ab = apx * abx + apy * aby
    ap_ad = -(apx * dax + apy * day)
    inside = (ap_ab >= 0) & (ap_ad >= 0) & (ap_ab <= abx * abx + aby * aby) & \
        (ap_ad <= dax * dax + day * day) & (lane >= 16) & (lane < 24)
    px = tl.where(lane < 16, pix + v1x * t1, cpx)
    py = tl.where(lane < 16, piy + v1y * t1, cpy)
    inter = _fan_area(px, py, cross_ok | inside, lane)
    area_a = tl.sum(aw * ah, 1)
    area_b = tl.sum(bw * bh, 1)
    iou = inter / (area_a + area_b - inter)
    return tl.where((area_a < 1e-14) | (area_b < 1e-14), 0.0, iou)


@triton.jit
def _corner3d(k, x, y, hx, hy, c, s):
    """Corner ``k`` (lane-wise) of an iou3d box: mmcv's rotate_around_center."""
    px = tl.where((k == 1) | (k == 2), x + hx, x - hx)
    py = tl.where(k >= 2, y + hy, y - hy)
    return (px - x) * c - (py - y) * s + x, (px - x) * s + (py - y) * c + y


@triton.jit
def _cross3(ux, uy, vx, vy, ox, oy):
    """mmcv's ``cross(p1, p2, p0)``."""
    return (ux - ox) * (vy - oy) - (vx - ox) * (uy - oy)


@triton.jit
def _overlap_iou3d(ax, ay, adx, ady, ac, asn, bx, by, bdx, bdy, bc, bsn, lane,
                   MARGIN: tl.constexpr, EPS: tl.constexpr):
    """mmcv's iou3d ``box_overlap`` of ``[G, 1]`` pairs; returns the areas ``[G]``."""
    ahx = adx / 2
    ahy = ady / 2
    bhx = bdx / 2
    bhy = bdy / 2
    ei = lane // 4
    ej = lane % 4
    p0x, p0y = _corner3d(ei, ax, ay, ahx, ahy, ac, asn)
    p1x, p1y = _corner3d((ei + 1) % 4, ax, ay, ahx, ahy, ac, asn)
    q0x, q0y = _corner3d(ej, bx, by, bhx, bhy, bc, bsn)
    q1x, q1y = _corner3d((ej + 1) % 4, bx, by, bhx, bhy, bc, bsn)
    rect = (tl.minimum(p0x, p1x) <= tl.maximum(q0x, q1x)) & \
        (tl.minimum(q0x, q1x) <= tl.maximum(p0x, p1x)) & \
        (tl.minimum(p0y, p1y) <= tl.maximum(q0y, q1y)) & \
        (tl.minimum(q0y, q1y) <= tl.maximum(p0y, p1y))
    s1 = _cross3(q0x, q0y, p1x, p1y, p0x, p0y)
    s2 = _cross3(p1x, p1y, q1x, q1y, p0x, p0y)
    s3 = _cross3(p0x, p0y, q1x, q1y, q0x, q0y)
    s4 = _cross3(q1x, q1y, p1x, p1y, q0x, q0y)
    s5 = _cross3(q1x, q1y, p1x, p1y, p0x, p0y)
    cross_ok = rect & (s1 * s2 > 0) & (s3 * s4 > 0) & (lane < 16)
    by_area = tl.abs(s5 - s1) > EPS
    den = tl.where(by_area, s5 - s1, 1.0)
    l0a = p0y - p1y
    l0b = p1x - p0x
    l0c = p0x * p1y - p1x * p0y
    l1a = q0y - q1y
    l1b = q1x - q0x
    l1c = q0x * q1y - q1x * q0y
    d = l0a * l1b - l1a * l0b
    d = tl.where(d == 0, 1.0, d)
    ix = tl.where(by_area, (s5 * q0x - s1 * q1x) / den, (l0b * l1c - l1b * l0c) / d)
    iy = tl.where(by_area, (s5 * q0y - s1 * q1y) / den, (l1a * l0c - l0a * l1c) / d)
    # lanes 16-23, corner k = (lane - 16) // 2: even lane b's corner in a, odd lane a's in b
    ck = (lane - 16) // 2
    of_b = (lane % 2) == 0
    bkx, bky = _corner3d(ck, bx, by, bhx, bhy, bc, bsn)
    akx, aky = _corner3d(ck, ax, ay, ahx, ahy, ac, asn)
    cpx = tl.where(of_b, bkx, akx)
    cpy = tl.where(of_b, bky, aky)
    ox = tl.where(of_b, ax, bx) + 0.0 * cpx
    oy = tl.where(of_b, ay, by) + 0.0 * cpy
    oc = tl.where(of_b, ac, bc)
    osn = tl.where(of_b, asn, bsn)
    # check_in_box2d rotates by -heading: cos(-h) = cos(h), sin(-h) = -sin(h)
    rot_x = (cpx - ox) * oc + (cpy - oy) * osn
    rot_y = (cpx - ox) * (0.0 - osn) + (cpy - oy) * oc
    inside = (tl.abs(rot_x) < tl.where(of_b, ahx, bhx) + MARGIN) & \
        (tl.abs(rot_y) < tl.where(of_b, ahy, bhy) + MARGIN) & (lane >= 16) & (lane < 24)
    px = tl.where(lane < 16, ix, cpx)
    py = tl.where(lane < 16, iy, cpy)
    return _fan_area(px, py, cross_ok | inside, lane)


@triton.jit
def _pair_values(prm, i_rows, j_rows, live, lane, KIND: tl.constexpr,
                 MARGIN: tl.constexpr, EPS: tl.constexpr):
    """Polygon kinds: IoU (``KIND`` 0) or overlap area (1) of the ``[G, 1]`` row pairs."""
    ax, ay, aw, ah, ac, asn = _load_box(prm, i_rows, live)
    bx, by, bw, bh, bc, bsn = _load_box(prm, j_rows, live)
    if KIND == 0:
        value = _iou_rotated(ax, ay, aw, ah, ac, asn, bx, by, bw, bh, bc, bsn, lane)
    else:
        value = _overlap_iou3d(ax, ay, aw, ah, ac, asn, bx, by, bw, bh, bc, bsn, lane,
                               MARGIN, EPS)
    return value


@triton.jit
def _word(bits, pos):
    """OR of ``1 << pos`` over the lanes where ``bits``: one int64 word."""
    one = tl.full(pos.shape, 1, tl.int64)
    return tl.reduce(tl.where(bits, one << pos.to(tl.int64), 0), 0, _or)


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _mask_kernel(prm_ptr, mask_ptr, n, col_blocks, threshold,
                 KIND: tl.constexpr, MARGIN: tl.constexpr, EPS: tl.constexpr):
    row_block = tl.program_id(1)
    col_block = tl.program_id(0)
    if col_block >= row_block:
        cols = col_block * 64 + tl.arange(0, 64)
        gpos = tl.arange(0, 16)
        lane = tl.arange(0, 32)[None, :]
        for r in range(0, 64):
            i = row_block * 64 + r
            if i < n:
                word = tl.zeros((), tl.int64)
                if KIND <= 1:
                    xi = tl.load(prm_ptr + i * 8)
                    yi = tl.load(prm_ptr + i * 8 + 1)
                    ri = tl.load(prm_ptr + i * 8 + 6)
                    for g in tl.static_range(4):
                        j = col_block * 64 + g * 16 + gpos
                        live = (j > i) & (j < n)
                        xj = tl.load(prm_ptr + j * 8, mask=live, other=0.0)
                        yj = tl.load(prm_ptr + j * 8 + 1, mask=live, other=0.0)
                        rj = tl.load(prm_ptr + j * 8 + 6, mask=live, other=0.0)
                        reach = ri + rj + 0.05  # iou3d's 1 cm margin fits in the slack
                        near = live & ((xi - xj) * (xi - xj) + (yi - yj) * (yi - yj) <=
                                       reach * reach)
                        if threshold < 0:
                            near = live
                        if tl.max(near.to(tl.int32), 0) > 0:
                            val = _pair_values(prm_ptr, i + 0 * j[:, None], j[:, None],
                                               near[:, None], lane, KIND, MARGIN, EPS)
                            if KIND == 1:  # overlap -> IoU, mmcv's iou_bev
                                wi = tl.load(prm_ptr + i * 8 + 2) * tl.load(prm_ptr + i * 8 + 3)
                                wj = tl.load(prm_ptr + j * 8 + 2, mask=live, other=0.0) * \
                                    tl.load(prm_ptr + j * 8 + 3, mask=live, other=0.0)
                                val = val / tl.maximum(wi + wj - val, EPS)
                            word = word | _word(near & (val > threshold), g * 16 + gpos)
                        # pairs whose circles do not meet have IoU 0: suppressed iff 0 > thr
                        word = word | _word(live & (~near) & (0.0 > threshold), g * 16 + gpos)
                else:
                    live = (cols > i) & (cols < n)
                    p0 = tl.load(prm_ptr + i * 8)
                    p1 = tl.load(prm_ptr + i * 8 + 1)
                    p2 = tl.load(prm_ptr + i * 8 + 2)
                    p3 = tl.load(prm_ptr + i * 8 + 3)
                    q0 = tl.load(prm_ptr + cols * 8, mask=live, other=0.0)
                    q1 = tl.load(prm_ptr + cols * 8 + 1, mask=live, other=0.0)
                    q2 = tl.load(prm_ptr + cols * 8 + 2, mask=live, other=0.0)
                    q3 = tl.load(prm_ptr + cols * 8 + 3, mask=live, other=0.0)
                    if KIND == 4:  # circle: squared distance <= threshold
                        dist = (p0 - q0) * (p0 - q0) + (p1 - q1) * (p1 - q1)
                        hit = dist <= threshold
                    elif KIND == 2:  # mmcv's nms, offset 0
                        w = tl.maximum(tl.minimum(p2, q2) - tl.maximum(p0, q0), 0.0)
                        h = tl.maximum(tl.minimum(p3, q3) - tl.maximum(p1, q1), 0.0)
                        inter = w * h
                        union = (p2 - p0) * (p3 - p1) + (q2 - q0) * (q3 - q1) - inter
                        hit = inter > threshold * union
                    else:  # iou3d_normal
                        w = tl.maximum(tl.minimum(p0 + p2 / 2, q0 + q2 / 2) -
                                       tl.maximum(p0 - p2 / 2, q0 - q2 / 2), 0.0)
                        h = tl.maximum(tl.minimum(p1 + p3 / 2, q1 + q3 / 2) -
                                       tl.maximum(p1 - p3 / 2, q1 - q3 / 2), 0.0)
                        inter = w * h
                        iou = inter / tl.maximum(p2 * p3 + q2 * q3 - inter, EPS)
                        hit = iou > threshold
                    word = _word(live & hit, tl.arange(0, 64))
                tl.store(mask_ptr + i.to(tl.int64) * col_blocks + col_block, word)


@triton.jit
def _reduce_kernel(mask_ptr, removed_ptr, keep_ptr, n, col_blocks, CHUNK: tl.constexpr):
    rows = tl.arange(0, 64)
    chunk = tl.arange(0, CHUNK)
    for b in range(0, col_blocks):
        rem = tl.load(removed_ptr + b)
        kept = tl.zeros((), tl.int64)
        for k in tl.static_range(64):
            i = b * 64 + k
            diag = tl.load(mask_ptr + i.to(tl.int64) * col_blocks + b, mask=i < n, other=0)
            take = (((rem >> k) & 1) == 0) & (i < n)
            rem = tl.where(take, rem | diag, rem)
            kept = tl.where(take, kept | (tl.full((), 1, tl.int64) << k), kept)
        tl.store(keep_ptr + b * 64 + rows, ((kept >> rows.to(tl.int64)) & 1).to(tl.int8),
                 mask=b * 64 + rows < n)
        row_kept = ((kept >> rows.to(tl.int64)) & 1) != 0
        for c0 in range(b + 1, col_blocks, CHUNK):
            cols = c0 + chunk
            ok = row_kept[:, None] & (cols < col_blocks)[None, :]
            tile = tl.load(mask_ptr + (b * 64 + rows).to(tl.int64)[:, None] * col_blocks +
                           cols[None, :], mask=ok, other=0)
            merged = tl.reduce(tile, 0, _or)
            old = tl.load(removed_ptr + cols, mask=cols < col_blocks, other=0)
            tl.store(removed_ptr + cols, old | merged, mask=cols < col_blocks)
        tl.debug_barrier()


@triton.jit
def _iou_kernel(pa_ptr, pb_ptr, out_ptr, m, n, KIND: tl.constexpr, MARGIN: tl.constexpr,
                EPS: tl.constexpr):
    i = tl.program_id(1)
    j = tl.program_id(0) * 16 + tl.arange(0, 16)
    live = (j < n) & (i < m)
    lane = tl.arange(0, 32)[None, :]
    ax, ay, aw, ah, ac, asn = _load_box(pa_ptr, i + 0 * j[:, None], live[:, None])
    bx, by, bw, bh, bc, bsn = _load_box(pb_ptr, j[:, None], live[:, None])
    if KIND == 0:
        val = _iou_rotated(ax, ay, aw, ah, ac, asn, bx, by, bw, bh, bc, bsn, lane)
    else:
        val = _overlap_iou3d(ax, ay, aw, ah, ac, asn, bx, by, bw, bh, bc, bsn, lane,
                             MARGIN, EPS)
    tl.store(out_ptr + i.to(tl.int64) * n + j, val, mask=live)


def nms_keep(boxes: Tensor, scores: Tensor, threshold: float, kind: str) -> Tensor:
    """Kept indices, highest score first; one host sync (the count)."""
    order = scores.sort(0, descending=True)[1]
    num = order.numel()
    if num == 0:
        return order
    prm = box_params(boxes[order], kind).contiguous()
    col_blocks = triton.cdiv(num, WORD)
    mask = torch.empty(num, col_blocks, dtype=torch.int64, device=boxes.device)
    grid = (col_blocks, col_blocks)
    _mask_kernel[grid](prm, mask, num, col_blocks, float(threshold), KIND=KIND_IDS[kind],
                       MARGIN=IOU3D_MARGIN, EPS=IOU3D_EPS, num_warps=4)
    removed = torch.zeros(col_blocks, dtype=torch.int64, device=boxes.device)
    keep = torch.empty(num, dtype=torch.int8, device=boxes.device)
    chunk = min(triton.next_power_of_2(col_blocks), 64)
    _reduce_kernel[(1,)](mask, removed, keep, num, col_blocks, CHUNK=chunk, num_warps=4)
    return order[keep.bool()]


def iou_matrix(boxes_a: Tensor, boxes_b: Tensor, kind: str) -> Tensor:
    """``[M, N]`` float32: IoU (``'rotated'``) or BEV overlap area (``'iou3d'``)."""
    m, n = boxes_a.shape[0], boxes_b.shape[0]
    out = torch.empty(m, n, dtype=torch.float32, device=boxes_a.device)
    if m == 0 or n == 0:
        return out
    pa = box_params(boxes_a, kind).contiguous()
    pb = box_params(boxes_b, kind).contiguous()
    grid = (triton.cdiv(n, GROUP), m)
    _iou_kernel[grid](pa, pb, out, m, n, KIND=KIND_IDS[kind], MARGIN=IOU3D_MARGIN,
                      EPS=IOU3D_EPS, num_warps=4)
    return out
