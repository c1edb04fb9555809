"""The static world of a scene: one two-way street along a smooth curve, and what lines it.

Positions along the street are road coordinates ``(s, d)``: ``s`` is the arc length of the
centre line and ``d`` the signed lateral offset, positive to the left of the direction of
increasing ``s``. Traffic keeps to the right, so lanes with ``d < 0`` run towards ``+s``.

Cross-section (``|d|`` in metres)::

    0 ..... 3.5 ..... 7.0 ........ 9.5 ........ 13.0 ...... 14.5 ...
    | inner |  outer  | parking or |  sidewalk  |   verge    | buildings, trees
    | lane  |  lane   | works strip|            |            |
    centre     lane      lane edge    kerb (road
    divider    divider   divider      boundary)
"""
import math
from dataclasses import dataclass

import numpy as np

LANE_WIDTH = 3.5
CARRIAGEWAY = 7.0  # |d| of the outer lane's edge
KERB = 9.5  # |d| of the road boundary
SIDEWALK = 13.0  # |d| of the sidewalk's outer edge
BUILDING_LINE = 14.5  # |d| where building plots start

# Kinds of static boxes; they choose colour (images) and intensity (lidar).
BUILDING, POLE, TRUNK, CROWN = 0, 1, 2, 3


class Road:
    """A street whose centre line bends through smooth turns (one every ~120 m).

    Args:
        rng (np.random.Generator): Source of the street's shape.
        s_min (float): First arc length to build.
        s_max (float): Last arc length to build.
        step (float): Arc-length spacing of the stored centre line. Defaults to 0.5.
    """

    def __init__(self, rng: np.random.Generator, s_min: float, s_max: float,
                 step: float = 0.5):
        self.step = step
        self.s = np.arange(s_min, s_max + step, step)
        curvature = np.zeros_like(self.s)
        for _ in range(int(rng.poisson((s_max - s_min) / 120))):  # a bend every ~120 m
            centre = rng.uniform(s_min + 60, s_max - 60) if s_max - s_min > 150 else 0.0
            length = rng.uniform(25, 70)
            radius = rng.uniform(25, 120)
            window = np.clip(np.abs(self.s - centre) / (length / 2), 0, 1)
            curvature += rng.choice([-1, 1]) / radius * np.cos(window * np.pi / 2) ** 2
        # Radius >= 30 m, so that offset lines up to the sidewalk's edge stay simple.
        curvature = np.clip(curvature, -1 / 30, 1 / 30)
        heading = rng.uniform(-np.pi, np.pi) + np.concatenate(
            [[0.0], np.cumsum((curvature[1:] + curvature[:-1]) / 2 * step)])
        direction = np.stack([np.cos(heading), np.sin(heading)], axis=1)
        xy = np.concatenate([[[0.0, 0.0]],
                             np.cumsum((direction[1:] + direction[:-1]) / 2 * step, axis=0)])
        origin = rng.uniform(300.0, 2000.0, size=2)  # map coordinates are positive in nuScenes
        self.xy = xy - xy[np.searchsorted(self.s, 0.0)] + origin
        self.heading = heading
        self.curvature = curvature
        # Pedestrian crossings, every 90-220 m.
        crossings = []
        s = s_min + rng.uniform(20, 120)
        while s < s_max - 10:
            crossings.append(float(s))
            s += rng.uniform(90, 220)
        self.crossings = np.array(crossings)

    def pose(self, s):
        """Centre-line position and heading at arc lengths ``s``.

        Args:
            s (np.ndarray | float): Arc lengths.

        Returns:
            tuple[np.ndarray, np.ndarray]: ``xy`` of shape ``(..., 2)`` and heading ``(...)``.
        """
        s = np.asarray(s, dtype=np.float64)
        x = np.interp(s, self.s, self.xy[:, 0])
        y = np.interp(s, self.s, self.xy[:, 1])
        return np.stack([x, y], axis=-1), np.interp(s, self.s, self.heading)

    def to_global(self, s, d):
        """Global ``xy`` and road heading of road coordinates ``(s, d)``."""
        xy, heading = self.pose(s)
        normal = np.stack([-np.sin(heading), np.cos(heading)], axis=-1)
        return xy + np.asarray(d, dtype=np.float64)[..., None] * normal, heading

    def polyline(self, d: float, s_start: float, s_end: float, step: float = 1.0) -> np.ndarray:
        """Global polyline at lateral offset ``d`` between two arc lengths.

        Args:
            d (float): Lateral offset.
            s_start (float): First arc length (clipped to the built range).
            s_end (float): Last arc length (clipped to the built range).
            step (float): Spacing of the points. Defaults to 1.0.

        Returns:
            np.ndarray: ``(N, 2)`` points, ``N >= 2`` unless the range is empty.
        """
        s_start, s_end = max(s_start, self.s[0]), min(s_end, self.s[-1])
        if s_end <= s_start:
            return np.zeros((0, 2))
        count = max(2, int(math.ceil((s_end - s_start) / step)) + 1)
        s = np.linspace(s_start, s_end, count)
        return self.to_global(s, np.full_like(s, d))[0]

    def band(self, d_inner: float, d_outer: float, s_start: float, s_end: float,
             step: float = 1.0) -> np.ndarray:
        """Polygon covering lateral offsets ``[d_inner, d_outer]`` between two arc lengths."""
        inner = self.polyline(d_inner, s_start, s_end, step)
        outer = self.polyline(d_outer, s_start, s_end, step)
        return np.concatenate([inner, outer[::-1]])


@dataclass
class StaticBoxes:
    """Unlabelled boxes that line the street (global frame, centre of the box).

    Attributes:
        center (np.ndarray): ``(N, 3)`` box centres.
        size (np.ndarray): ``(N, 3)`` sizes as ``(l, w, h)``, ``l`` along the box's heading.
        yaw (np.ndarray): ``(N,)`` headings.
        kind (np.ndarray): ``(N,)`` one of ``BUILDING, POLE, TRUNK, CROWN``.
        color (np.ndarray): ``(N, 3)`` BGR colours, uint8.
    """
    center: np.ndarray
    size: np.ndarray
    yaw: np.ndarray
    kind: np.ndarray
    color: np.ndarray


def roadside_objects(road: Road, rng: np.random.Generator) -> StaticBoxes:
    """Place buildings, street lights and trees along both sides of the street.

    Buildings give the lidar's upper beams something to hit, as in a town; stretches without
    them are parks with trees.

    Args:
        road (Road): The street.
        rng (np.random.Generator): Source of the placement.

    Returns:
        StaticBoxes: All static boxes of the scene.
    """
    rows = []  # (s, d, l, w, h, z_bottom, yaw_offset, kind, color)
    s_min, s_max = road.s[0], road.s[-1]
    for side in (-1.0, 1.0):
        s = s_min
        while s < s_max:
            length = rng.uniform(25, 90)
            if rng.random() < 0.75:  # a block of buildings
                t = s
                while t < min(s + length, s_max):
                    b_len = rng.uniform(8, 35)
                    depth = rng.uniform(8, 20)
                    setback = rng.uniform(0, 4)
                    height = rng.uniform(4, 25)
                    tone = rng.uniform(90, 210)
                    tint = rng.uniform(-25, 25, size=3)
                    color = np.clip(tone + tint, 40, 235)
                    d = side * (BUILDING_LINE + setback + depth / 2)
                    rows.append((t + b_len / 2, d, b_len, depth, height, 0.0, 0.0, BUILDING, color))
                    t += b_len + rng.uniform(0, 12)
            else:  # a park: trees set back from the street
                for _ in range(int(length / 8)):
                    ts = rng.uniform(s, s + length)
                    td = side * rng.uniform(BUILDING_LINE + 1, BUILDING_LINE + 12)
                    rows.extend(_tree(rng, ts, td))
            s += length
        # Street trees and lights on the sidewalk's outer edge, alternating.
        s = s_min + rng.uniform(0, 10)
        while s < s_max:
            if rng.random() < 0.5:
                rows.extend(_tree(rng, s, side * (SIDEWALK - 0.5)))
            else:
                rows.append((s, side * (SIDEWALK - 0.5), 0.25, 0.25, rng.uniform(5, 8), 0.0, 0.0,
                             POLE, np.array([120.0, 120.0, 125.0])))
            s += rng.uniform(12, 35)
    s = np.array([r[0] for r in rows])
    d = np.array([r[1] for r in rows])
    xy, heading = road.to_global(s, d)
    size = np.array([[r[2], r[3], r[4]] for r in rows])
    z_bottom = np.array([r[5] for r in rows])
    center = np.concatenate([xy, (z_bottom + size[:, 2] / 2)[:, None]], axis=1)
    return StaticBoxes(
        center=center, size=size,
        yaw=heading + np.array([r[6] for r in rows]),
        kind=np.array([r[7] for r in rows], dtype=np.int64),
        color=np.array([r[8] for r in rows]).astype(np.uint8))


def _tree(rng: np.random.Generator, s: float, d: float) -> list:
    """A trunk and a crown, as two boxes."""
    trunk_h = rng.uniform(2.0, 3.5)
    crown = rng.uniform(2.5, 5.0)
    green = np.array([rng.uniform(40, 70), rng.uniform(100, 140), rng.uniform(50, 80)])
    yaw = rng.uniform(0, np.pi / 2)
    return [
        (s, d, 0.4, 0.4, trunk_h, 0.0, yaw, TRUNK, np.array([50.0, 70.0, 90.0])),
        (s, d, crown, crown, crown * rng.uniform(0.8, 1.2), trunk_h, yaw, CROWN, green),
    ]
