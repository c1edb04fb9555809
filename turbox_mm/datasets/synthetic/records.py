"""The nuScenes database rows of one scene: the single source of truth for tables and infos.

Rows use the devkit's schema (``scene``, ``sample``, ``sample_data``, ``ego_pose``,
``calibrated_sensor``, ``sample_annotation``, ``instance``, ``log``); the dataset-wide tables
(``sensor``, ``category``, ``attribute``, ``visibility``, ``map``) are in :mod:`.tables`.
The info files are then derived from these rows the way mmdet3d's converter derives them from
real nuScenes, so both describe exactly the same data.
"""
import numpy as np

from .agents import CATEGORIES, attribute
from .cameras import CAMERA_NAMES
from .geometry import matrix_from_quaternion, quaternion_from_matrix, rot_z
from .scene import TICKS_PER_KEYFRAME, Scene, make_token

LIDAR = 'LIDAR_TOP'
CHANNELS = (LIDAR,) + CAMERA_NAMES
ATTRIBUTES = ('vehicle.moving', 'vehicle.stopped', 'vehicle.parked', 'cycle.with_rider',
              'cycle.without_rider', 'pedestrian.sitting_lying_down', 'pedestrian.standing',
              'pedestrian.moving')
VISIBILITIES = (('1', 'v0-40'), ('2', 'v40-60'), ('3', 'v60-80'), ('4', 'v80-100'))


def fixed_token(kind: str, name: str) -> str:
    """Token of a dataset-wide row (sensor, category, attribute, map): seed independent."""
    return make_token('nuscenes', kind, name)


def log_name(scene: Scene) -> str:
    """Log file name of a scene; it prefixes every file the scene writes."""
    return f'synthetic-seed{scene.seed}-scene{scene.index:04d}'


def data_filename(scene: Scene, channel: str, timestamp: int, key_frame: bool) -> str:
    """Path of a sensor file relative to the data root, nuScenes style.

    Examples:
        ``samples/CAM_FRONT/<log>__CAM_FRONT__<timestamp>.jpg``,
        ``sweeps/LIDAR_TOP/<log>__LIDAR_TOP__<timestamp>.pcd.bin``.
    """
    folder = 'samples' if key_frame else 'sweeps'
    suffix = '.pcd.bin' if channel == LIDAR else '.jpg'
    return f'{folder}/{channel}/{log_name(scene)}__{channel}__{timestamp}{suffix}'


def lidar_ticks(scene: Scene, max_sweeps: int) -> list:
    """The lidar ticks that get a file: each keyframe and the ``max_sweeps`` ticks before it.

    The lidar runs at 20 Hz, so with ``max_sweeps >= 9`` every tick has a file, as in
    nuScenes; fewer sweeps leave out the ticks no sample lists.
    """
    ticks = set()
    for key in range(0, scene.last_tick + 1, TICKS_PER_KEYFRAME):
        ticks.update(range(max(scene.first_tick, key - max_sweeps), key + 1))
    return sorted(ticks)


def keep_annotation(num_lidar_pts: int, visibility: str) -> bool:
    """Whether an agent in range is annotated: hit by the lidar or at least partly visible."""
    return num_lidar_pts > 0 or visibility != '1'


class SceneRecords:
    """Build the rows of one scene.

    Args:
        scene (Scene): The scene.
        name (str): Scene name (a real nuScenes name, so the devkit's splits find it).
        frame_results (list[dict]): Per keyframe, ``{agent: (num_lidar_pts, visibility)}`` for
            the agents in annotation range, as measured by the sensors.
        max_sweeps (int): Sweeps listed per sample (see :func:`lidar_ticks`).
    """

    def __init__(self, scene: Scene, name: str, frame_results: list, max_sweeps: int):
        self.scene = scene
        seed, index = scene.seed, scene.index
        self.log = dict(token=make_token(seed, 'log', index), logfile=log_name(scene),
                        vehicle='n000', date_captured='2018-08-01', location=scene.location)
        self.calibrated_sensor = {LIDAR: self._calibration(LIDAR, scene.lidar2ego, [])}
        for camera in scene.cameras:
            self.calibrated_sensor[camera.name] = self._calibration(
                camera.name, camera.cam2ego, camera.intrinsic.tolist())
        self.ego_pose, self.sample_data = [], []
        self.samples = [dict(token=make_token(seed, 'sample', index, k),
                             timestamp=scene.tick_us(k * TICKS_PER_KEYFRAME), prev='', next='',
                             scene_token=make_token(seed, 'scene', index))
                        for k in range(scene.frames)]
        _link(self.samples)
        self.lidar_data = {}  # tick -> sample_data row
        for tick in lidar_ticks(scene, max_sweeps):
            key = scene.is_keyframe(tick)
            frame = max(0, -(-tick // TICKS_PER_KEYFRAME))  # sweeps belong to the next sample
            self.lidar_data[tick] = self._sample_data(
                LIDAR, scene.tick_us(tick), key, frame, make_token(seed, 'lidar', index, tick))
        _link(list(self.lidar_data.values()))
        self.camera_data = {}  # (frame, camera) -> sample_data row
        for camera in scene.cameras:
            rows = [self._sample_data(camera.name, scene.camera_us(k, camera.name), True, k,
                                      make_token(seed, camera.name, index, k),
                                      (camera.width, camera.height))
                    for k in range(scene.frames)]
            _link(rows)
            self.camera_data.update({(k, camera.name): row for k, row in enumerate(rows)})
        self._poses = {row['token']: row for row in self.ego_pose}
        self._annotate(frame_results)
        self.scene_row = dict(
            token=make_token(seed, 'scene', index), log_token=self.log['token'],
            nbr_samples=scene.frames, first_sample_token=self.samples[0]['token'],
            last_sample_token=self.samples[-1]['token'], name=name,
            description=f'synthetic scene {index} of seed {seed}, {scene.location}')

    # --- rows --------------------------------------------------------------------------------
    def _calibration(self, channel: str, sensor2ego: np.ndarray, intrinsic: list) -> dict:
        return dict(token=make_token(self.scene.seed, 'calibrated_sensor', self.scene.index,
                                     channel),
                    sensor_token=fixed_token('sensor', channel),
                    translation=sensor2ego[:3, 3].tolist(),
                    rotation=quaternion_from_matrix(sensor2ego[:3, :3]),
                    camera_intrinsic=intrinsic)

    def _sample_data(self, channel, timestamp, key, frame, token, size=(0, 0)) -> dict:
        pose = self.scene.ego2global(self.scene.us_to_time(timestamp))
        pose_row = dict(token=make_token(self.scene.seed, 'ego_pose', token), timestamp=timestamp,
                        rotation=quaternion_from_matrix(pose[:3, :3]),
                        translation=pose[:3, 3].tolist())
        self.ego_pose.append(pose_row)
        row = dict(token=token, sample_token=self.samples[frame]['token'],
                   ego_pose_token=pose_row['token'],
                   calibrated_sensor_token=self.calibrated_sensor[channel]['token'],
                   timestamp=timestamp, fileformat='pcd' if channel == LIDAR else 'jpg',
                   is_key_frame=bool(key), height=size[1], width=size[0],
                   filename=data_filename(self.scene, channel, timestamp, key), prev='', next='')
        self.sample_data.append(row)
        return row

    def _annotate(self, frame_results: list) -> None:
        """Annotation and instance rows from the agents' boxes at each keyframe."""
        scene, agents = self.scene, self.scene.agents
        self.annotations = []  # all rows, by keyframe then agent
        self.frame_annotations = []  # per keyframe: rows
        self.agent_of = {}  # annotation token -> agent index
        chains = {}  # agent -> its rows, in time order
        for k, measured in enumerate(frame_results):
            t = scene.tick_time(k * TICKS_PER_KEYFRAME)
            center, yaw = scene.agent_boxes(t)
            speed = np.linalg.norm(scene.agent_velocities(t)[:, :2], axis=1)
            rows = []
            for agent in sorted(measured):
                points, visibility = measured[agent]
                if not keep_annotation(points, visibility):
                    continue
                label = int(agents.label[agent])
                attr = attribute(label, int(agents.kind[agent]), float(speed[agent]))
                l, w, h = agents.size[agent]
                row = dict(
                    token=make_token(scene.seed, 'annotation', scene.index, k, agent),
                    sample_token=self.samples[k]['token'],
                    instance_token=make_token(scene.seed, 'instance', scene.index, agent),
                    visibility_token=visibility,
                    attribute_tokens=[fixed_token('attribute', attr)] if attr else [],
                    translation=center[agent].tolist(), size=[float(w), float(l), float(h)],
                    rotation=quaternion_from_matrix(rot_z(float(yaw[agent]))),
                    prev='', next='', num_lidar_pts=int(points), num_radar_pts=0)
                rows.append(row)
                self.agent_of[row['token']] = agent
                chains.setdefault(agent, []).append(row)
            self.frame_annotations.append(rows)
            self.annotations += rows
        self.agent_rows = {agent: {} for agent in chains}  # agent -> {keyframe: row}
        for k, rows in enumerate(self.frame_annotations):
            for row in rows:
                self.agent_rows[self.agent_of[row['token']]][k] = row
        self.instances = []
        self.instance_of_agent = {}
        for agent in sorted(chains):
            rows = chains[agent]
            _link(rows)
            self.instance_of_agent[agent] = len(self.instances)
            self.instances.append(dict(
                token=rows[0]['instance_token'],
                category_token=fixed_token('category', CATEGORIES[agents.label[agent]]),
                nbr_annotations=len(rows), first_annotation_token=rows[0]['token'],
                last_annotation_token=rows[-1]['token']))
        self._by_token = {row['token']: row for row in self.annotations}
        self._sample_time = {row['token']: row['timestamp'] for row in self.samples}

    # --- what the devkit computes from the rows ----------------------------------------------
    def velocity(self, annotation: dict, max_time_diff: float = 1.5) -> np.ndarray:
        """Global velocity of an annotation, as ``NuScenes.box_velocity`` estimates it.

        A central difference over the neighbouring annotations of the instance (one-sided at
        the ends), NaN when there is no neighbour or they are too far apart in time.
        """
        prev, nxt = annotation['prev'], annotation['next']
        if not prev and not nxt:
            return np.full(3, np.nan)
        first = self._by_token[prev] if prev else annotation
        last = self._by_token[nxt] if nxt else annotation
        seconds = 1e-6 * (self._sample_time[last['sample_token']]
                          - self._sample_time[first['sample_token']])
        if prev and nxt:
            max_time_diff *= 2
        if seconds > max_time_diff:
            return np.full(3, np.nan)
        return (np.array(last['translation']) - np.array(first['translation'])) / seconds

    def pose(self, sample_data: dict) -> np.ndarray:
        """4x4 ego2global of a sample_data row, from its ego_pose row."""
        row = self._poses[sample_data['ego_pose_token']]
        return _transform(row['rotation'], row['translation'])

    def calibration(self, channel: str) -> np.ndarray:
        """4x4 sensor2ego of a channel, from its calibrated_sensor row."""
        row = self.calibrated_sensor[channel]
        return _transform(row['rotation'], row['translation'])


def _transform(quaternion, translation) -> np.ndarray:
    mat = np.eye(4)
    mat[:3, :3] = matrix_from_quaternion(quaternion)
    mat[:3, 3] = translation
    return mat


def _link(rows: list) -> None:
    """Fill ``prev``/``next`` of rows in time order."""
    for a, b in zip(rows[:-1], rows[1:]):
        a['next'], b['prev'] = b['token'], a['token']
