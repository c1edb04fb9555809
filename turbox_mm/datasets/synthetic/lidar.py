"""The top lidar: a 32-beam spinning scanner, simulated by casting rays at boxes and the ground.

A sweep is one instantaneous revolution (no rolling-shutter skew) at its timestamp. Each ray
returns the nearest of the flat ground and every box within range; points on an agent lie on a
box 5 cm inside its label, so they fall inside the annotated box even with range noise. Points
are ``(x, y, z, intensity, ring)`` in the LIDAR_TOP frame, float32, as in nuScenes' ``.pcd.bin``.

The ray caster is compiled with numba when it is available; a vectorised numpy version gives
the same answer without it (set ``TURBOX_SYNTH_NO_NUMBA=1`` to force it).
"""
import math
import os

import numpy as np

from .agents import CLASSES
from .ground import INTENSITY, GroundRaster
from .road import BUILDING, CROWN, POLE, TRUNK

ELEVATIONS = np.radians(np.linspace(-30.67, 10.67, 32))  # HDL-32E beams, bottom to top
MAX_RANGE = 75.0
SURFACE_INSET = 0.05  # m between an agent's label and the surface the rays hit
RANGE_NOISE = 0.01  # m, standard deviation (clipped to half the inset)
DROPOUT = 0.01  # fraction of returns lost
RETURN_RATE = 0.93  # returns per ray in a town; sets the rays fired for a points target
# Mean intensity of each class, then of each kind of static box.
_AGENT_INTENSITY = dict(car=32.0, truck=36.0, trailer=30.0, bus=38.0, construction_vehicle=42.0,
                        bicycle=16.0, motorcycle=22.0, pedestrian=12.0, traffic_cone=70.0,
                        barrier=48.0)
AGENT_INTENSITY = np.array([_AGENT_INTENSITY[c] for c in CLASSES], dtype=np.float32)
STATIC_INTENSITY = {BUILDING: 22.0, POLE: 40.0, TRUNK: 10.0, CROWN: 6.0}

NO_HIT, GROUND = -2, -1


def _cast_numpy(origin, directions, centers, halves, yaws, max_range, first, count):
    """Nearest hit of each ray with the ground (z = 0) or a box (reference implementation).

    Args:
        origin (np.ndarray): ``(3,)`` ray origin.
        directions (np.ndarray): ``(R, 3)`` unit directions.
        centers (np.ndarray): ``(B, 3)`` box centres.
        halves (np.ndarray): ``(B, 3)`` half sizes along the box axes.
        yaws (np.ndarray): ``(B,)`` box headings.
        max_range (float): Rays that hit nothing nearer return ``NO_HIT``.
        first (np.ndarray): ``(B,)`` first ray each box may be hit by.
        count (np.ndarray): ``(B,)`` how many rays from ``first`` on (modulo ``R``) may hit it.

    Returns:
        tuple[np.ndarray, np.ndarray]: Distances ``(R,)`` and what was hit ``(R,)``: a box
        index, ``GROUND`` or ``NO_HIT``.
    """
    rays = len(directions)
    best = np.full(rays, float(max_range))
    hit = np.full(rays, NO_HIT, np.int64)
    with np.errstate(divide='ignore', invalid='ignore'):
        ground = np.where(directions[:, 2] < -1e-9, -origin[2] / directions[:, 2], np.inf)
    closer = ground < best
    best[closer], hit[closer] = ground[closer], GROUND
    for b in range(len(centers)):
        index = (first[b] + np.arange(count[b])) % rays
        d = directions[index]
        c, s = math.cos(yaws[b]), math.sin(yaws[b])
        p = origin - centers[b]
        local_origin = (c * p[0] + s * p[1], -s * p[0] + c * p[1], p[2])
        local_dir = (c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1], d[:, 2])
        near = np.full(len(index), -np.inf)
        far = np.full(len(index), np.inf)
        with np.errstate(divide='ignore', invalid='ignore'):
            for axis in range(3):
                inverse = 1.0 / local_dir[axis]
                t1 = (-halves[b, axis] - local_origin[axis]) * inverse
                t2 = (halves[b, axis] - local_origin[axis]) * inverse
                near = np.maximum(near, np.minimum(t1, t2))
                far = np.minimum(far, np.maximum(t1, t2))
        closer = (near <= far) & (near > 1e-3) & (near < best[index])
        best[index[closer]], hit[index[closer]] = near[closer], b
    return best, hit


def _cast_kernel(origin, directions, centers, halves, yaws, max_range, first, count, best, hit):
    """The loops of :func:`_cast_numpy`, for numba (results in ``best`` and ``hit``)."""
    rays = directions.shape[0]
    for r in range(rays):
        best[r] = max_range
        hit[r] = NO_HIT
        if directions[r, 2] < -1e-9:
            t = -origin[2] / directions[r, 2]
            if t < max_range:
                best[r] = t
                hit[r] = GROUND
    for b in range(centers.shape[0]):
        c = math.cos(yaws[b])
        s = math.sin(yaws[b])
        px = origin[0] - centers[b, 0]
        py = origin[1] - centers[b, 1]
        local = (c * px + s * py, -s * px + c * py, origin[2] - centers[b, 2])
        for j in range(count[b]):
            r = (first[b] + j) % rays
            dx, dy = directions[r, 0], directions[r, 1]
            ldir = (c * dx + s * dy, -s * dx + c * dy, directions[r, 2])
            near, far = -np.inf, np.inf
            for axis in range(3):
                if ldir[axis] != 0.0:
                    inverse = 1.0 / ldir[axis]
                    t1 = (-halves[b, axis] - local[axis]) * inverse
                    t2 = (halves[b, axis] - local[axis]) * inverse
                    near = max(near, min(t1, t2))
                    far = min(far, max(t1, t2))
                elif abs(local[axis]) > halves[b, axis]:
                    near, far = np.inf, -np.inf
            if near <= far and near > 1e-3 and near < best[r]:
                best[r] = near
                hit[r] = b


_compiled = None


def _numba_kernel():
    """The numba-compiled kernel, or None without numba (or with TURBOX_SYNTH_NO_NUMBA=1)."""
    global _compiled
    if os.environ.get('TURBOX_SYNTH_NO_NUMBA', '0') == '1':
        return None
    if _compiled is None:
        try:
            import numba
        except ImportError:
            _compiled = False
        else:
            _compiled = numba.njit(cache=True, nogil=True)(_cast_kernel)
    return _compiled or None


def cast_rays(origin, directions, centers, halves, yaws, max_range=MAX_RANGE, first=None,
              count=None):
    """Nearest hit of each ray; see :func:`_cast_numpy` (every ray may hit every box unless
    ``first`` and ``count`` narrow it down)."""
    kernel = _numba_kernel()
    args = [np.ascontiguousarray(a, dtype=np.float64)
            for a in (origin, directions, centers.reshape(-1, 3), halves.reshape(-1, 3),
                      np.asarray(yaws).reshape(-1))]
    boxes = len(args[2])
    first = np.zeros(boxes, np.int64) if first is None else np.asarray(first, np.int64)
    count = (np.full(boxes, len(directions), np.int64) if count is None
             else np.asarray(count, np.int64))
    if kernel is None:
        return _cast_numpy(*args, float(max_range), first, count)
    best = np.empty(len(directions))
    hit = np.empty(len(directions), np.int64)
    kernel(*args, float(max_range), first, count, best, hit)
    return best, hit


def warm_up() -> None:
    """Compile the kernel now (before worker processes fork, so they inherit it)."""
    cast_rays(np.array([0.0, 0.0, 1.8]), np.array([[1.0, 0.0, -0.1]]),
              np.array([[5.0, 0.0, 1.0]]), np.array([[1.0, 1.0, 1.0]]), np.array([0.0]))


def beam_steps(points: int) -> int:
    """Azimuth steps of a revolution that give about ``points`` returns."""
    return max(1, int(math.ceil(points / RETURN_RATE / len(ELEVATIONS))))


def beam_directions(steps: int, phase: float):
    """Unit ray directions of one revolution in the lidar frame, azimuth-major.

    Args:
        steps (int): Azimuth steps per revolution.
        phase (float): Azimuth of the first step, radians.

    Returns:
        tuple[np.ndarray, np.ndarray]: ``(steps * 32, 3)`` directions and their ring indices.
    """
    azimuth = (np.arange(steps) * (2 * np.pi / steps) + phase)[:, None]
    cos_el, sin_el = np.cos(ELEVATIONS)[None], np.sin(ELEVATIONS)[None]
    directions = np.stack([cos_el * np.cos(azimuth), cos_el * np.sin(azimuth),
                           np.broadcast_to(sin_el, (steps, len(ELEVATIONS)))],
                          axis=-1).reshape(-1, 3)
    ring = np.tile(np.arange(len(ELEVATIONS)), steps)
    return directions, ring


def _ray_windows(centers, sizes, yaws, origin, heading, steps, phase):
    """For each box, the rays of an azimuth-major revolution that can reach it.

    Returns ``(first, count)`` per box: the box's azimuth span seen from ``origin`` (all
    rays when the origin is above its footprint), widened by one step each side.
    """
    beams = len(ELEVATIONS)
    c, s = np.cos(yaws)[:, None], np.sin(yaws)[:, None]
    signs = np.array([[1, 1], [1, -1], [-1, -1], [-1, 1]], dtype=np.float64) / 2
    dx = signs[None, :, 0] * sizes[:, None, 0]
    dy = signs[None, :, 1] * sizes[:, None, 1]
    corners = centers[:, None, :2] + np.stack([c * dx - s * dy, s * dx + c * dy], axis=-1)
    rel = corners - origin[:2]
    middle = np.arctan2(centers[:, 1] - origin[1], centers[:, 0] - origin[0])
    spread = (np.arctan2(rel[..., 1], rel[..., 0]) - middle[:, None] + np.pi) % (2 * np.pi) - np.pi
    step = 2 * np.pi / steps
    start = np.floor((middle + spread.min(axis=1) - heading - phase) / step).astype(np.int64) - 1
    stop = np.ceil((middle + spread.max(axis=1) - heading - phase) / step).astype(np.int64) + 1
    width = np.minimum(stop - start + 1, steps)
    off = origin[:2] - centers[:, :2]
    local_x = c[:, 0] * off[:, 0] + s[:, 0] * off[:, 1]
    local_y = -s[:, 0] * off[:, 0] + c[:, 0] * off[:, 1]
    above = (np.abs(local_x) <= sizes[:, 0] / 2 + 0.5) & (np.abs(local_y) <= sizes[:, 1] / 2 + 0.5)
    width[above] = steps
    return (start % steps) * beams, width * beams


def scan(boxes: dict, lidar2global: np.ndarray, ground: GroundRaster, points: int,
         rng: np.random.Generator) -> dict:
    """Simulate one sweep.

    Args:
        boxes (dict): The scene's boxes at the sweep's time, from ``Scene.all_boxes``.
        lidar2global (np.ndarray): 4x4 pose of the lidar.
        ground (GroundRaster): Materials of the ground, for intensities.
        points (int): Returns wanted (about; rays that escape return nothing).
        rng (np.random.Generator): Source of the sweep's noise.

    Returns:
        dict: ``points`` float32 ``(N, 5)`` in the lidar frame and ``agent`` ``(N,)``: the
        agent each point hit, or -1.
    """
    origin = lidar2global[:3, 3]
    rotation = lidar2global[:3, :3]
    steps = beam_steps(points)
    phase = rng.uniform(0, 2 * np.pi / steps)
    directions, ring = beam_directions(steps, phase)
    world_dirs = directions @ rotation.T
    near = _boxes_in_range(boxes, origin)
    agent = boxes['agent'][near]
    inset = np.where(agent >= 0, SURFACE_INSET, 0.0)[:, None]
    halves = np.maximum(boxes['size'][near] / 2 - inset, 0.01)
    heading = math.atan2(rotation[1, 0], rotation[0, 0])  # the lidar is level
    first, count = _ray_windows(boxes['center'][near], boxes['size'][near], boxes['yaw'][near],
                                origin, heading, steps, phase)
    distance, hit = cast_rays(origin, world_dirs, boxes['center'][near], halves,
                              boxes['yaw'][near], MAX_RANGE, first, count)
    keep = (hit != NO_HIT) & (rng.random(len(hit)) >= DROPOUT)
    distance, hit, directions, ring = distance[keep], hit[keep], directions[keep], ring[keep]
    distance = distance + np.clip(rng.normal(0, RANGE_NOISE, len(distance)),
                                  -SURFACE_INSET / 2, SURFACE_INSET / 2)
    xyz = directions * distance[:, None]

    intensity = np.empty(len(hit), np.float32)
    on_ground = hit == GROUND
    ground_xy = origin[:2] + (directions[on_ground] * distance[on_ground, None]) @ rotation[:2].T
    intensity[on_ground] = INTENSITY[ground.materials_at(ground_xy)]
    on_box = ~on_ground
    intensity[on_box] = _box_intensity(boxes, near)[hit[on_box]]
    hit_agent = np.full(len(hit), -1, np.int64)
    hit_agent[on_box] = np.maximum(agent[hit[on_box]], -1)
    intensity = np.clip(intensity * rng.uniform(0.7, 1.3, len(intensity))
                        + rng.normal(0, 2.0, len(intensity)), 0, 255)
    cloud = np.concatenate([xyz, intensity[:, None], ring[:, None]], axis=1).astype(np.float32)
    return dict(points=cloud, agent=hit_agent)


def _box_intensity(boxes: dict, rows: np.ndarray) -> np.ndarray:
    """Mean intensity of the given boxes: by class for agents, by kind for static boxes."""
    agent = boxes['agent'][rows]
    static = np.array([STATIC_INTENSITY[int(k)] for k in np.maximum(-1 - agent, 0)],
                      dtype=np.float32).reshape(-1)
    by_class = AGENT_INTENSITY[np.maximum(boxes['label'][rows], 0)]
    return np.where(agent >= 0, by_class, static)


def _boxes_in_range(boxes: dict, origin: np.ndarray) -> np.ndarray:
    """Indices of boxes that a ray from ``origin`` can reach within ``MAX_RANGE``."""
    radius = np.linalg.norm(boxes['size'] / 2, axis=1)
    distance = np.linalg.norm(boxes['center'][:, :2] - origin[:2], axis=1)
    return np.flatnonzero(distance - radius < MAX_RANGE)


def count_points_in_boxes(xyz: np.ndarray, centers: np.ndarray, sizes: np.ndarray,
                          yaws: np.ndarray) -> np.ndarray:
    """Points inside each box (closed boxes; any frame, as long as all inputs share it).

    Args:
        xyz (np.ndarray): ``(N, 3)`` points.
        centers (np.ndarray): ``(B, 3)`` gravity centres.
        sizes (np.ndarray): ``(B, 3)`` as ``(l, w, h)``.
        yaws (np.ndarray): ``(B,)`` headings about z.

    Returns:
        np.ndarray: ``(B,)`` counts, int64.
    """
    counts = np.zeros(len(centers), np.int64)
    for b in range(len(centers)):
        offset = xyz - centers[b]
        radius = np.linalg.norm(sizes[b]) / 2
        near = np.flatnonzero(np.abs(offset[:, 0]) <= radius)
        near = near[np.abs(offset[near, 1]) <= radius]
        c, s = math.cos(yaws[b]), math.sin(yaws[b])
        local_x = c * offset[near, 0] + s * offset[near, 1]
        local_y = -s * offset[near, 0] + c * offset[near, 1]
        inside = ((np.abs(local_x) <= sizes[b, 0] / 2) & (np.abs(local_y) <= sizes[b, 1] / 2)
                  & (np.abs(offset[near, 2]) <= sizes[b, 2] / 2))
        counts[b] = int(inside.sum())
    return counts


def visibility_levels(boxes: dict, agents: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """nuScenes visibility token ('1' to '4') of agents, seen from ``origin``.

    nuScenes rates the visible fraction of an object over all six cameras in four bins
    (0-40 %, 40-60 %, 60-80 %, 80-100 %). We approximate it with nine probe points inside the
    box (its centre and its corners pulled 30 % towards it): the fraction whose line of sight
    from the roof reaches this box before any other.

    Args:
        boxes (dict): The scene's boxes, from ``Scene.all_boxes``.
        agents (np.ndarray): Agent indices to rate.
        origin (np.ndarray): ``(3,)`` viewpoint (the lidar).

    Returns:
        np.ndarray: ``(len(agents),)`` visibility tokens (str).
    """
    if len(agents) == 0:
        return np.zeros(0, dtype='<U1')
    near = _boxes_in_range(boxes, origin)
    index_of = {int(a): i for i, a in enumerate(boxes['agent'][near]) if a >= 0}
    unit = np.array([[0, 0, 0]] + [[x, y, z] for x in (-1, 1) for y in (-1, 1)
                                   for z in (-1, 1)], dtype=np.float64) * 0.35
    levels = []
    for a in agents:
        row = int(np.flatnonzero(boxes['agent'] == a)[0])
        c, s = math.cos(boxes['yaw'][row]), math.sin(boxes['yaw'][row])
        local = unit * boxes['size'][row]
        probes = boxes['center'][row] + np.stack(
            [c * local[:, 0] - s * local[:, 1], s * local[:, 0] + c * local[:, 1], local[:, 2]],
            axis=1)
        rays = probes - origin
        rays /= np.linalg.norm(rays, axis=1, keepdims=True)
        _, hit = cast_rays(origin, rays, boxes['center'][near], boxes['size'][near] / 2,
                           boxes['yaw'][near])
        seen = float(np.mean(hit == index_of.get(int(a), -3)))
        levels.append('1' if seen <= 0.4 else '2' if seen <= 0.6 else '3' if seen <= 0.8
                      else '4')
    return np.array(levels)
