"""The tracked objects of a scene: what they are, where they start and how they move.

Every agent keeps its lateral offset ``d`` and moves along the street in one of three ways:

* ``LANE``: at a constant speed along its lane (``speed`` 0 makes a queue of stopped traffic);
* ``PLATOON``: in the ego's lane, a fixed arc length ahead of or behind the ego;
* ``STATIC``: parked or standing.

Agents in one lane share one speed, so they never run into each other, and every lateral slot
holds one kind of agent, so boxes never overlap.
"""
from dataclasses import dataclass

import numpy as np

from .road import CARRIAGEWAY, KERB, LANE_WIDTH, SIDEWALK, Road

CLASSES = ('car', 'truck', 'trailer', 'bus', 'construction_vehicle', 'bicycle', 'motorcycle',
           'pedestrian', 'traffic_cone', 'barrier')
# nuScenes category of each class (the tables' names; mmdet3d maps them back to CLASSES).
CATEGORIES = ('vehicle.car', 'vehicle.truck', 'vehicle.trailer', 'vehicle.bus.rigid',
              'vehicle.construction', 'vehicle.bicycle', 'vehicle.motorcycle',
              'human.pedestrian.adult', 'movable_object.trafficcone', 'movable_object.barrier')
# Mean (l, w, h) of each class in nuScenes' train split. A barrier's heading points across
# its long side, as in nuScenes.
MEAN_SIZE = np.array([
    [4.63, 1.96, 1.74], [6.93, 2.51, 2.84], [12.29, 2.90, 3.87], [10.97, 2.94, 3.47],
    [6.37, 2.85, 3.19], [1.72, 0.60, 1.28], [2.11, 0.77, 1.47], [0.73, 0.67, 1.77],
    [0.41, 0.41, 1.07], [0.50, 2.53, 0.98]])
LABEL = {name: i for i, name in enumerate(CLASSES)}
VEHICLES = {LABEL[n] for n in ('car', 'truck', 'trailer', 'bus', 'construction_vehicle')}
CYCLES = {LABEL['bicycle'], LABEL['motorcycle']}

LANE, PLATOON, STATIC = 0, 1, 2
# Lateral slots (|d|) off the carriageway.
STRIP_CENTER = (CARRIAGEWAY + KERB) / 2  # parked vehicles
CONE_LINE = CARRIAGEWAY + 0.35
BARRIER_LINE = KERB - 0.45
PED_STANDING = KERB + 0.4
PED_WALK = (KERB + 1.1, KERB + 2.1)
PARKED_CYCLES = SIDEWALK + 0.8


@dataclass
class Agents:
    """All agents of a scene, one row each (arrays of equal length).

    Attributes:
        label (np.ndarray): Class index into :data:`CLASSES`.
        size (np.ndarray): ``(N, 3)`` as ``(l, w, h)``.
        kind (np.ndarray): ``LANE``, ``PLATOON`` or ``STATIC``.
        s0 (np.ndarray): Arc length at time 0 (``PLATOON``: gap to the ego).
        speed (np.ndarray): Speed along the street, m/s (``LANE`` only).
        direction (np.ndarray): +1 towards ``+s``, -1 towards ``-s``.
        d (np.ndarray): Lateral offset.
        yaw_offset (np.ndarray): Heading relative to the direction of travel.
        color (np.ndarray): ``(N, 3)`` BGR base colour, uint8.
    """
    label: np.ndarray
    size: np.ndarray
    kind: np.ndarray
    s0: np.ndarray
    speed: np.ndarray
    direction: np.ndarray
    d: np.ndarray
    yaw_offset: np.ndarray
    color: np.ndarray

    def __len__(self):
        return len(self.label)

    def arc_length(self, t: float, ego_s: float) -> np.ndarray:
        """Arc length of every agent at scene time ``t`` (the ego is at ``ego_s``)."""
        s = self.s0 + self.direction * self.speed * t
        return np.where(self.kind == PLATOON, ego_s + self.s0, s)

    def boxes(self, road: Road, t: float, ego_s: float):
        """Global boxes of all agents at time ``t``.

        Args:
            road (Road): The street.
            t (float): Scene time in seconds.
            ego_s (float): The ego's arc length at ``t``.

        Returns:
            tuple[np.ndarray, np.ndarray]: Centres ``(N, 3)`` (gravity centre, on flat
            ground) and headings ``(N,)``.
        """
        xy, heading = road.to_global(self.arc_length(t, ego_s), self.d)
        heading = heading + np.where(self.direction < 0, np.pi, 0.0) + self.yaw_offset
        center = np.concatenate([xy, self.size[:, 2:3] / 2], axis=1)
        return center, heading


def spawn_agents(road: Road, rng: np.random.Generator, ego_lane: float, ego_s_range,
                 duration: float) -> Agents:
    """Populate the street around the ego's path.

    Args:
        road (Road): The street.
        rng (np.random.Generator): Source of the placement.
        ego_lane (float): The ego's lateral offset (its lane).
        ego_s_range (tuple[float, float]): Arc lengths the ego covers during the scene.
        duration (float): Seconds from the first to the last moment simulated.

    Returns:
        Agents: Every agent of the scene.
    """
    rows = []
    lo, hi = ego_s_range[0] - 110, ego_s_range[1] + 110

    def add(label, kind, s0, d, speed=0.0, direction=1.0, yaw_offset=0.0):
        scale = rng.uniform(0.9, 1.1, size=3)
        rows.append((label, MEAN_SIZE[label] * scale, kind, s0, speed, direction, d, yaw_offset,
                     _color(rng, label)))
        return MEAN_SIZE[label][0] * scale[0]

    # Ego's lane: a platoon ahead and behind.
    for sign in (1.0, -1.0):
        gap = rng.uniform(10, 25)
        while gap < 110:
            label = _vehicle(rng, slow_ok=False, wide_ok=True)
            length = MEAN_SIZE[label][0]
            add(label, PLATOON, sign * (gap + length / 2), ego_lane)
            gap += length + rng.uniform(8, 40)
    # The three other lanes: traffic at one speed per lane, or a stopped queue.
    for d in (-LANE_WIDTH / 2, -1.5 * LANE_WIDTH, LANE_WIDTH / 2, 1.5 * LANE_WIDTH):
        if d == ego_lane:
            continue
        direction = 1.0 if d < 0 else -1.0
        speed = 0.0 if rng.random() < 0.12 else rng.uniform(3, 13)
        travel = speed * duration
        start, end = (lo - travel, hi) if direction > 0 else (lo, hi + travel)
        s = start + rng.uniform(0, 20)
        while s < end:
            label = _vehicle(rng, slow_ok=speed <= 8, wide_ok=abs(d) > LANE_WIDTH)
            length = add(label, LANE, s, d, speed, direction)
            s += length + rng.uniform(6, 45)
    # Parking / works strips between the outer lanes and the kerbs.
    for side in (-1.0, 1.0):
        direction = -side  # parked with the traffic of that side
        s = lo + rng.uniform(0, 15)
        while s < hi:
            length = rng.uniform(25, 70)
            kind = rng.choice(3, p=[0.5, 0.2, 0.3])
            if kind == 0:  # parking
                t = s
                while t < s + length:
                    label = rng.choice([LABEL['car']] * 8 + [LABEL['truck'], LABEL['trailer']])
                    size = MEAN_SIZE[label][0]
                    add(label, STATIC, t + size / 2, side * STRIP_CENTER, direction=direction)
                    t += size * 1.1 + rng.uniform(1, 8)
            elif kind == 1:  # road works: cones, barriers, one construction vehicle
                middle = s + length / 2
                add(LABEL['construction_vehicle'], STATIC, middle, side * STRIP_CENTER,
                    direction=direction)
                clear = MEAN_SIZE[LABEL['construction_vehicle']][0] / 2 + 1.5
                for t in np.arange(s, s + length, rng.uniform(3, 5)):
                    if abs(t - middle) > clear:
                        add(LABEL['traffic_cone'], STATIC, t, side * CONE_LINE)
                for t in np.arange(s, s + length, 2.8):
                    if abs(t - middle) > clear:
                        add(LABEL['barrier'], STATIC, t, side * BARRIER_LINE,
                            yaw_offset=np.pi / 2)
            s += length + rng.uniform(2, 10)
    # Sidewalks: two walking lines per side, people standing by the kerb, parked cycles.
    for side in (-1.0, 1.0):
        for d in PED_WALK:
            direction = rng.choice([-1.0, 1.0])
            speed = rng.uniform(0.9, 1.6)
            s = lo - speed * duration + rng.uniform(0, 20)
            while s < hi + speed * duration:
                add(LABEL['pedestrian'], LANE, s, side * d, speed, direction)
                s += rng.uniform(8, 60)
        s = lo + rng.uniform(0, 30)
        while s < hi:
            add(LABEL['pedestrian'], STATIC, s, side * PED_STANDING,
                yaw_offset=rng.uniform(-np.pi, np.pi))
            s += rng.uniform(15, 70)
        s = lo + rng.uniform(0, 60)
        while s < hi:
            label = rng.choice([LABEL['bicycle'], LABEL['motorcycle']])
            add(label, STATIC, s, side * PARKED_CYCLES, yaw_offset=np.pi / 2)
            s += rng.uniform(20, 90)
    return Agents(
        label=np.array([r[0] for r in rows], dtype=np.int64),
        size=np.array([r[1] for r in rows]),
        kind=np.array([r[2] for r in rows], dtype=np.int64),
        s0=np.array([r[3] for r in rows], dtype=np.float64),
        speed=np.array([r[4] for r in rows], dtype=np.float64),
        direction=np.array([r[5] for r in rows], dtype=np.float64),
        d=np.array([r[6] for r in rows], dtype=np.float64),
        yaw_offset=np.array([r[7] for r in rows], dtype=np.float64),
        color=np.array([r[8] for r in rows], dtype=np.uint8))


def _vehicle(rng: np.random.Generator, slow_ok: bool, wide_ok: bool) -> int:
    """Draw the class of a vehicle in traffic."""
    names = ['car', 'truck', 'bus', 'motorcycle']
    weights = [0.74, 0.09, 0.04, 0.05]
    if wide_ok:
        names += ['trailer', 'construction_vehicle']
        weights += [0.03, 0.02]
    if slow_ok:
        names.append('bicycle')
        weights.append(0.05)
    weights = np.array(weights) / np.sum(weights)
    return LABEL[names[rng.choice(len(names), p=weights)]]


# Colour schemes (BGR) per class: a few typical paints each.
_PALETTES = {
    'car': [(40, 40, 40), (200, 200, 200), (230, 230, 230), (60, 60, 160), (140, 90, 40),
            (120, 120, 120), (40, 70, 30), (30, 30, 120)],
    'truck': [(230, 230, 230), (60, 120, 200), (150, 150, 150), (40, 60, 160)],
    'trailer': [(220, 220, 220), (160, 160, 160), (90, 110, 140)],
    'bus': [(40, 160, 230), (200, 200, 200), (60, 60, 200), (160, 110, 40)],
    'construction_vehicle': [(0, 180, 240), (20, 140, 230)],
    'bicycle': [(40, 40, 40), (50, 50, 180), (150, 80, 30)],
    'motorcycle': [(30, 30, 30), (40, 40, 170), (160, 160, 160)],
    'pedestrian': [(60, 50, 40), (40, 40, 40), (130, 90, 60), (70, 70, 150), (180, 180, 180)],
    'traffic_cone': [(0, 110, 250)],
    'barrier': [(60, 60, 210), (200, 200, 200)],
}


def _color(rng: np.random.Generator, label: int) -> np.ndarray:
    palette = _PALETTES[CLASSES[label]]
    base = np.array(palette[rng.integers(len(palette))], dtype=np.float64)
    return np.clip(base + rng.uniform(-15, 15, size=3), 0, 255)


def attribute(label: int, kind: int, speed: float) -> str:
    """The nuScenes attribute of an agent moving at ``speed`` (m/s); '' for none."""
    moving = speed > 0.3
    if label in VEHICLES:
        if moving:
            return 'vehicle.moving'
        return 'vehicle.parked' if kind == STATIC else 'vehicle.stopped'
    if label in CYCLES:
        return 'cycle.with_rider' if kind != STATIC else 'cycle.without_rider'
    if label == LABEL['pedestrian']:
        return 'pedestrian.moving' if moving else 'pedestrian.standing'
    return ''
