"""One scene: the street, its agents, the ego's drive, the sensor rig and the clock.

Everything is a pure function of ``(seed, scene index, options)``, so a worker process can
rebuild the scene it needs without receiving it. Time ``t`` is in seconds from the scene's
first keyframe; the lidar ticks at 20 Hz and every 10th tick (2 Hz) is a keyframe, as in
nuScenes.
"""
import hashlib

import numpy as np

from turbox_mm.datasets.map_gt.expansion_file import NUSCENES_LOCATIONS
from .agents import Agents, spawn_agents
from .cameras import CAMERA_DELAY_US, camera_rig, lidar_mount
from .geometry import make_transform, rot_z
from .road import LANE_WIDTH, Road, StaticBoxes, roadside_objects

LIDAR_PERIOD = 0.05  # s, 20 Hz
TICKS_PER_KEYFRAME = 10  # keyframes at 2 Hz
ANNOTATION_RANGE = 60.0  # m around the ego within which agents are annotated
_FIRST_TIMESTAMP_US = 1_533_000_000_000_000  # scenes start an hour apart from here
# A scene's log names one of nuScenes' four map locations (the devkit's NuScenesMap knows no
# others); the generator writes the street as that location's map expansion
# (map_expansion.py), moving a scene to another location where its preferred one
# (index % 4) already holds a street near it.


def make_token(seed: int, *parts) -> str:
    """A 32-hex-digit token, like nuScenes', that depends only on its inputs."""
    text = '/'.join(str(p) for p in (seed, *parts))
    return hashlib.md5(text.encode()).hexdigest()


class Scene:
    """A deterministic scene.

    Args:
        seed (int): Seed of the whole dataset.
        index (int): Index of the scene in the dataset.
        frames (int): Keyframes (samples) in the scene.
        preroll_ticks (int): Lidar ticks recorded before the first keyframe, so that the first
            sample has sweeps too.
        image_size (tuple[int, int]): ``(width, height)`` of the camera images.
    """

    def __init__(self, seed: int, index: int, frames: int, preroll_ticks: int = 10,
                 image_size=(1600, 900)):
        self.location = NUSCENES_LOCATIONS[index % len(NUSCENES_LOCATIONS)]
        self.seed, self.index, self.frames = seed, index, frames
        streams = np.random.SeedSequence([seed, index]).spawn(6)
        rng_ego, rng_road, rng_static, rng_agents, rng_rig, rng_clock = (
            np.random.default_rng(s) for s in streams)
        self.first_tick = -preroll_ticks
        self.last_tick = (frames - 1) * TICKS_PER_KEYFRAME
        self._drive(rng_ego)
        self.road = Road(rng_road, self.ego_s(self.t_min) - 150, self.ego_s(self.t_max) + 150)
        self.static: StaticBoxes = roadside_objects(self.road, rng_static)
        self.agents: Agents = spawn_agents(
            self.road, rng_agents, self.ego_lane,
            (self.ego_s(self.t_min), self.ego_s(self.t_max)), self.t_max - self.t_min)
        self.cameras = camera_rig(rng_rig, image_size)
        self.lidar2ego = lidar_mount(rng_rig)
        self.start_us = _FIRST_TIMESTAMP_US + index * 3_600_000_000 + int(
            rng_clock.integers(0, 600_000_000))

    # --- the ego's drive -------------------------------------------------------------------
    def _drive(self, rng: np.random.Generator) -> None:
        """Choose the ego's lane and a smooth speed profile, and integrate its arc length."""
        self.ego_lane = float(rng.choice([-LANE_WIDTH / 2, -1.5 * LANE_WIDTH]))
        # The simulated span: from the first pre-roll sweep to just after the last keyframe.
        self.t_min = self.first_tick * LIDAR_PERIOD - 1.0
        self.t_max = self.last_tick * LIDAR_PERIOD + 1.0
        t = np.arange(self.t_min, self.t_max + 0.01, 0.01)
        mean = rng.uniform(2.0, 12.0)
        speed = np.full_like(t, mean)
        for _ in range(3):
            period = rng.uniform(6, 30)
            phase = rng.uniform(0, 2 * np.pi)
            speed += rng.uniform(0, 0.25) * mean * np.sin(2 * np.pi * t / period + phase)
        if rng.random() < 0.2:  # a stop: slow to a halt for a few seconds
            centre, width = rng.uniform(t[0], t[-1]), rng.uniform(3, 8)
            speed *= np.clip(np.abs(t - centre) / width, 0, 1) ** 2
        speed = np.clip(speed, 0.0, None)
        s = np.concatenate([[0.0], np.cumsum((speed[1:] + speed[:-1]) / 2 * 0.01)])
        self._t_grid, self._s_grid = t, s - np.interp(0.0, t, s)

    def ego_s(self, t):
        """The ego's arc length at time(s) ``t``."""
        return np.interp(t, self._t_grid, self._s_grid)

    def ego2global(self, t: float) -> np.ndarray:
        """4x4 ego pose at time ``t`` (origin on the ground, heading along its lane)."""
        xy, heading = self.road.to_global(self.ego_s(t), self.ego_lane)
        return make_transform(rot_z(float(heading)), [xy[0], xy[1], 0.0])

    def ego_motion(self, t: float, dt: float = 0.05) -> dict:
        """Velocity, acceleration and yaw rate of the ego at ``t``, in the ego frame.

        Central differences of the pose over ``dt``.

        Returns:
            dict: ``velocity`` (3,), ``acceleration`` (3,) with gravity in z as an IMU reads
            it, ``yaw_rate`` (float) and ``curvature`` (float) of its path.
        """
        poses = [self.ego2global(t + k * dt) for k in (-1, 0, 1)]
        xy = np.array([p[:2, 3] for p in poses])
        yaw = np.unwrap([np.arctan2(p[1, 0], p[0, 0]) for p in poses])
        rot = poses[1][:3, :3]
        velocity = (xy[2] - xy[0]) / (2 * dt)
        accel = (xy[2] - 2 * xy[1] + xy[0]) / dt ** 2
        v_ego = rot[:2, :2].T @ velocity
        a_ego = rot[:2, :2].T @ accel
        yaw_rate = (yaw[2] - yaw[0]) / (2 * dt)
        speed = float(np.linalg.norm(velocity))
        return dict(velocity=np.array([v_ego[0], v_ego[1], 0.0]),
                    acceleration=np.array([a_ego[0], a_ego[1], 9.81]),
                    yaw_rate=float(yaw_rate),
                    curvature=float(yaw_rate / speed) if speed > 0.1 else 0.0)

    # --- the clock -------------------------------------------------------------------------
    def tick_time(self, tick: int) -> float:
        """Scene time of a lidar tick (tick 0 is the first keyframe)."""
        return tick * LIDAR_PERIOD

    def tick_us(self, tick: int) -> int:
        """Timestamp in microseconds of a lidar tick."""
        return self.start_us + tick * int(LIDAR_PERIOD * 1e6)

    def camera_us(self, frame: int, camera: str) -> int:
        """Timestamp in microseconds of a camera's image at keyframe ``frame``."""
        return self.tick_us(frame * TICKS_PER_KEYFRAME) + CAMERA_DELAY_US[camera]

    def us_to_time(self, timestamp_us: int) -> float:
        """Scene time of an absolute timestamp."""
        return (timestamp_us - self.start_us) * 1e-6

    @staticmethod
    def is_keyframe(tick: int) -> bool:
        return tick >= 0 and tick % TICKS_PER_KEYFRAME == 0

    # --- what is where ---------------------------------------------------------------------
    def agent_boxes(self, t: float):
        """Global ``(center (N, 3), yaw (N,))`` of every agent at time ``t``."""
        return self.agents.boxes(self.road, t, float(self.ego_s(t)))

    def agents_near(self, t: float, radius: float = ANNOTATION_RANGE) -> np.ndarray:
        """Indices of the agents whose centre is within ``radius`` of the ego at ``t``."""
        center, _ = self.agent_boxes(t)
        ego = self.ego2global(t)[:2, 3]
        return np.flatnonzero(np.linalg.norm(center[:, :2] - ego, axis=1) <= radius)

    def agent_velocities(self, t: float, dt: float = 0.05) -> np.ndarray:
        """Global velocities ``(N, 3)`` of every agent at ``t`` (central difference)."""
        ahead, _ = self.agent_boxes(t + dt)
        behind, _ = self.agent_boxes(t - dt)
        return (ahead - behind) / (2 * dt)

    def all_boxes(self, t: float) -> dict:
        """Agents and static boxes together, for the sensors.

        Returns:
            dict: ``center (N, 3)``, ``size (N, 3)``, ``yaw (N,)``, ``color (N, 3)``,
            ``agent (N,)``: the agent index, or ``-1 - kind`` for a static box, and
            ``label (N,)``: the agent's class, or -1.
        """
        center, yaw = self.agent_boxes(t)
        return dict(
            center=np.concatenate([center, self.static.center]),
            size=np.concatenate([self.agents.size, self.static.size]),
            yaw=np.concatenate([yaw, self.static.yaw]),
            color=np.concatenate([self.agents.color, self.static.color]),
            agent=np.concatenate([np.arange(len(self.agents)), -1 - self.static.kind]),
            label=np.concatenate([self.agents.label, np.full(len(self.static.kind), -1)]))
