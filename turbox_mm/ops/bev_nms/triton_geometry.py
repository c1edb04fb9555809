"""Triton device functions of the exact pair tests of :mod:`.triton_kernels` (spec:
:mod:`.reference`).

A group of pairs is laid out as ``[G pairs, 32 candidates]``: lanes 0-15 are the 16 edge
crossings, 16-23 the corner tests, in :mod:`.reference`'s order, 24-31 unused. The overlap area
sorts the candidates by a pseudo-angle about their centroid (monotonic in the angle, no
``atan2``), packed with the lane index into one int64 key for ``tl.sort``, and fans the sorted
polygon from its first point.
"""
import triton
import triton.language as tl


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
def _rotated_corners(cx, cy, w, h, c2, s2):
    """mmcv's ``get_rotated_vertices`` (``c2``, ``s2``: half cosine and sine): 4 corners."""
    x0 = cx - s2 * h - c2 * w
    y0 = cy + c2 * h - s2 * w
    x1 = cx + s2 * h - c2 * w
    y1 = cy - c2 * h - s2 * w
    return x0, y0, x1, y1, 2 * cx - x0, 2 * cy - y0, 2 * cx - x1, 2 * cy - y1


@triton.jit
def _iou_rotated(ax, ay, aw, ah, ac, asn, bx, by, bw, bh, bc, bsn, lane):
    """mmcv's ``box_iou_rotated`` IoU of ``[G, 1]`` pairs; returns ``[G]``."""
    sx = (ax + bx) / 2
    sy = (ay + by) / 2
    acx = ax - sx
    acy = ay - sy
    bcx = bx - sx
    bcy = by - sy
    a0x, a0y, a1x, a1y, a2x, a2y, a3x, a3y = _rotated_corners(acx, acy, aw, ah, ac, asn)
    b0x, b0y, b1x, b1y, b2x, b2y, b3x, b3y = _rotated_corners(bcx, bcy, bw, bh, bc, bsn)
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
    same = (a0x == b0x) & (a0y == b0y) & (a1x == b1x) & (a1y == b1y) & (a2x == b2x) & \
        (a2y == b2y) & (a3x == b3x) & (a3y == b3y)
    iou = tl.where(tl.sum(same.to(tl.int32), 1) > 0, 1.0, iou)
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
def _pair_values(prm_a, prm_b, i_rows, j_rows, live, lane, KIND: tl.constexpr,
                 MARGIN: tl.constexpr, EPS: tl.constexpr):
    """Polygon kinds: IoU (``KIND`` 0) or overlap area (1) of the ``[G, 1]`` pairs of rows
    ``i_rows`` of ``prm_a`` and ``j_rows`` of ``prm_b``."""
    ax, ay, aw, ah, ac, asn = _load_box(prm_a, i_rows, live)
    bx, by, bw, bh, bc, bsn = _load_box(prm_b, j_rows, live)
    if KIND == 0:
        value = _iou_rotated(ax, ay, aw, ah, ac, asn, bx, by, bw, bh, bc, bsn, lane)
    else:
        value = _overlap_iou3d(ax, ay, aw, ah, ac, asn, bx, by, bw, bh, bc, bsn, lane,
                               MARGIN, EPS)
    return value
