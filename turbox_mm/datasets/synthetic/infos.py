"""Info files in mmdet3d 1.x's v2 format, derived from a scene's database rows.

The core fields are what ``tools/dataset_converters/update_infos_to_v2.py`` writes for real
nuScenes (same names, frames, units and key order): ``sample_idx``, ``token``, ``timestamp``
(seconds), ``ego2global``, ``images``, ``lidar_points``, ``lidar_sweeps``, ``instances`` and
``cam_instances``. Added to them are the fields the temporal, map and planning models read,
named as their own converters name them (see ``docs/data.md`` for the full reference).

Every value is a plain Python object (lists of floats, ints, strings), so a file pickles the
same under numpy 1 and 2 and loads anywhere.
"""
import os.path as osp
import pickle

import numpy as np
from shapely.geometry import MultiPoint, Polygon
from shapely.geometry import box as shapely_box

from turbox_mm.utils.atomic_files import atomic_write

from .agents import CLASSES
from .cameras import CAMERA_NAMES
from .geometry import (apply, devkit_yaw, invert, matrix_from_quaternion, quaternion_from_matrix,
                       to_list)
from .maps import MAP_CLASSES, ROI_SIZE, vector_map
from .records import ATTRIBUTES, LIDAR, SceneRecords, fixed_token
from .scene import TICKS_PER_KEYFRAME

INFO_VERSION = '1.1'
NUM_POINT_FEATURES = 5  # x, y, z, intensity, ring
# mmdet3d's attribute order (``attr_label`` indexes it; 'None' for no attribute).
NUS_ATTRIBUTES = ('cycle.with_rider', 'cycle.without_rider', 'pedestrian.moving',
                  'pedestrian.standing', 'pedestrian.sitting_lying_down', 'vehicle.moving',
                  'vehicle.parked', 'vehicle.stopped', 'None')
AGENT_FUTURE_KEYFRAMES = 12  # 6 s of agent future (SparseDrive's fut_ts)
EGO_FUTURE_KEYFRAMES = 6  # 3 s of ego future (SparseDrive's ego_fut_ts)
COMMAND_THRESHOLD = 2.0  # m sideways at the end of the ego future that makes a turn command
WHEELBASE = 2.7  # m, for the steering-wheel angle in ego_status
STEERING_RATIO = 15.0


def metainfo(version: str, **extra) -> dict:
    """The ``metainfo`` of an info file: mmdet3d's four keys, then ours."""
    info = dict(categories={name: i for i, name in enumerate(CLASSES)}, dataset='nuscenes',
                version=version, info_version=INFO_VERSION)
    info.update(map_classes=list(MAP_CLASSES), map_roi_size=list(ROI_SIZE))
    info.update(extra)
    return info


def scene_infos(records: SceneRecords, max_sweeps: int, instance_offset: int) -> list:
    """One info dict per keyframe of a scene (``sample_idx`` is set when files are split).

    Args:
        records (SceneRecords): The scene's rows.
        max_sweeps (int): Previous lidar sweeps listed per sample (as the converter's
            ``max_sweeps``).
        instance_offset (int): Rows of the dataset's instance table before this scene's, so
            that ``instance_id`` indexes that table.

    Returns:
        list[dict]: The infos in time order.
    """
    return [_sample_info(records, frame, max_sweeps, instance_offset)
            for frame in range(records.scene.frames)]


def _sample_info(records: SceneRecords, frame: int, max_sweeps: int,
                 instance_offset: int) -> dict:
    scene = records.scene
    sample = records.samples[frame]
    tick = frame * TICKS_PER_KEYFRAME
    lidar_row = records.lidar_data[tick]
    ego2global = records.pose(lidar_row)
    lidar2ego = records.calibration(LIDAR)
    lidar2global = ego2global @ lidar2ego
    global2lidar = invert(lidar2global)
    info = dict(sample_idx=-1, token=sample['token'], timestamp=sample['timestamp'] / 1e6,
                ego2global=to_list(ego2global))
    info['images'] = _images(records, frame, global2lidar)
    info['lidar_points'] = dict(num_pts_feats=NUM_POINT_FEATURES,
                                lidar_path=osp.basename(lidar_row['filename']),
                                lidar2ego=to_list(lidar2ego))
    sweeps = _sweeps(records, tick, max_sweeps, global2lidar)
    if sweeps:
        info['lidar_sweeps'] = sweeps
    info['instances'] = _instances(records, frame, global2lidar, instance_offset)
    info['cam_instances'] = _camera_instances(records, frame)
    # Temporal fields (BEVFormer / MapTR / StreamPETR converters).
    t = scene.tick_time(tick)
    motion = scene.ego_motion(t)
    info.update(scene_token=sample['scene_token'], frame_idx=frame, prev=sample['prev'],
                next=sample['next'], map_location=scene.location)
    info['can_bus'] = _can_bus(ego2global, motion)
    # Planning fields (SparseDrive's converter).
    info['ego_status'] = _ego_status(motion)
    trajs, masks, command = _ego_future(records, frame, global2lidar)
    info.update(gt_ego_fut_trajs=trajs, gt_ego_fut_masks=masks, gt_ego_fut_cmd=command)
    # Vector map (MapTR / SparseDrive), in the lidar frame.
    info['map_annos'] = vector_map(scene.road, float(scene.ego_s(t)), lidar2global)
    return info


def _images(records: SceneRecords, frame: int, global2lidar: np.ndarray) -> dict:
    images = {}
    for name in CAMERA_NAMES:
        row = records.camera_data[(frame, name)]
        cam2ego = records.calibration(name)
        cam2lidar = global2lidar @ records.pose(row) @ cam2ego
        images[name] = dict(
            img_path=osp.basename(row['filename']), height=row['height'], width=row['width'],
            cam2img=[list(r) for r in records.calibrated_sensor[name]['camera_intrinsic']],
            cam2ego=to_list(cam2ego), sample_data_token=row['token'],
            timestamp=row['timestamp'] / 1e6, lidar2cam=to_list(invert(cam2lidar)))
    return images


def _sweeps(records: SceneRecords, tick: int, max_sweeps: int, global2lidar) -> list:
    """The lidar sweeps before a keyframe, newest first (previous keyframes included)."""
    ticks = sorted(records.lidar_data)
    position = ticks.index(tick)
    sweeps = []
    for previous in ticks[max(0, position - max_sweeps):position][::-1]:
        row = records.lidar_data[previous]
        ego2global = records.pose(row)
        lidar2ego = records.calibration(LIDAR)
        sensor2lidar = global2lidar @ ego2global @ lidar2ego
        sweeps.append(dict(
            timestamp=row['timestamp'] / 1e6, ego2global=to_list(ego2global),
            lidar_points=dict(num_pts_feats=NUM_POINT_FEATURES, lidar_path=row['filename'],
                              lidar2ego=to_list(lidar2ego),
                              lidar2sensor=to_list(invert(sensor2lidar))),
            sample_data_token=row['token']))
    return sweeps


def _instances(records: SceneRecords, frame: int, global2lidar: np.ndarray,
               instance_offset: int) -> list:
    """3D boxes in the lidar frame: ``(x, y, z, l, w, h, yaw)``, gravity centre."""
    rotation = global2lidar[:3, :3]
    instances = []
    for row in records.frame_annotations[frame]:
        agent = records.agent_of[row['token']]
        label = int(records.scene.agents.label[agent])
        center = apply(global2lidar, np.array(row['translation']))
        yaw = devkit_yaw(rotation @ matrix_from_quaternion(row['rotation']))
        w, l, h = row['size']
        velocity = rotation @ records.velocity(row)
        fut_traj, fut_mask = _agent_future(records, frame, agent, global2lidar)
        instances.append(dict(
            bbox_label=label, bbox_3d=[*center.tolist(), l, w, h, yaw],
            bbox_3d_isvalid=bool(row['num_lidar_pts'] + row['num_radar_pts'] > 0),
            bbox_label_3d=label, num_lidar_pts=row['num_lidar_pts'],
            num_radar_pts=row['num_radar_pts'], velocity=velocity[:2].tolist(),
            instance_id=instance_offset + records.instance_of_agent[agent],
            fut_traj=fut_traj, fut_mask=fut_mask))
    return instances


def _agent_future(records: SceneRecords, frame: int, agent: int, global2lidar) -> tuple:
    """SparseDrive's agent future: 12 steps (6 s) of xy offsets in the current lidar frame.

    The first offset is from the current centre, the others from the previous step; steps
    after the instance stops being annotated (or the scene ends) are zero and masked out.
    """
    by_frame = records.agent_rows[agent]
    current = apply(global2lidar, np.array(by_frame[frame]['translation']))[:2]
    traj = np.zeros((AGENT_FUTURE_KEYFRAMES, 2))
    mask = np.zeros(AGENT_FUTURE_KEYFRAMES)
    previous = current
    for step in range(AGENT_FUTURE_KEYFRAMES):
        row = by_frame.get(frame + step + 1)
        if row is None:
            break
        position = apply(global2lidar, np.array(row['translation']))[:2]
        traj[step] = position - previous
        mask[step] = 1.0
        previous = position
    return traj.tolist(), mask.tolist()


def _ego_future(records: SceneRecords, frame: int, global2lidar: np.ndarray) -> tuple:
    """SparseDrive's ego future: 6 steps (3 s) of lidar-origin offsets, mask and command.

    The command is one-hot ``[right, left, straight]``, chosen by where the lidar origin ends
    up sideways (lidar x points right) at the last available future keyframe.
    """
    positions = [np.zeros(2)]
    mask = []
    lidar2ego = records.calibration(LIDAR)
    for step in range(1, EGO_FUTURE_KEYFRAMES + 1):
        future = frame + step
        if future < records.scene.frames:
            pose = records.pose(records.lidar_data[future * TICKS_PER_KEYFRAME]) @ lidar2ego
            positions.append(apply(global2lidar, pose[:3, 3])[:2])
            mask.append(1.0)
        else:
            positions.append(positions[-1])
            mask.append(0.0)
    positions = np.array(positions)
    sideways = positions[-1, 0]
    if sideways >= COMMAND_THRESHOLD:
        command = [1.0, 0.0, 0.0]
    elif sideways <= -COMMAND_THRESHOLD:
        command = [0.0, 1.0, 0.0]
    else:
        command = [0.0, 0.0, 1.0]
    return np.diff(positions, axis=0).tolist(), mask, command


def _can_bus(ego2global: np.ndarray, motion: dict) -> list:
    """BEVFormer's 18 CAN-bus numbers: position, orientation (w, x, y, z), acceleration,
    rotation rate and velocity in the ego frame, then two zeros (the converter leaves them
    for the dataset to fill with the patch angle)."""
    return [*ego2global[:3, 3].tolist(), *quaternion_from_matrix(ego2global[:3, :3]),
            *motion['acceleration'].tolist(), 0.0, 0.0, motion['yaw_rate'],
            *motion['velocity'].tolist(), 0.0, 0.0]


def _ego_status(motion: dict) -> list:
    """SparseDrive's 10 ego-status numbers: acceleration (3), rotation rate (3), velocity (3)
    in the ego frame, and the steering-wheel angle (rad, positive to the left)."""
    steering = float(np.arctan(WHEELBASE * motion['curvature']) * STEERING_RATIO)
    return [*motion['acceleration'].tolist(), 0.0, 0.0, motion['yaw_rate'],
            *motion['velocity'].tolist(), steering]


def _camera_instances(records: SceneRecords, frame: int) -> dict:
    """Per camera, the boxes whose projection meets the image, as the converter writes them.

    Boxes are in the camera frame at the image's timestamp: ``bbox_3d`` is the gravity centre,
    ``(l, h, w)`` and minus the devkit yaw; ``bbox`` is the 2D extent of the projected corners
    in front of the camera, clipped to the image; ``velocity`` is ``(vx, vz)``.
    """
    scene = records.scene
    out = {}
    for camera in scene.cameras:
        row = records.camera_data[(frame, camera.name)]
        global2cam = invert(records.pose(row) @ records.calibration(camera.name))
        rotation = global2cam[:3, :3]
        intrinsic = np.array(records.calibrated_sensor[camera.name]['camera_intrinsic'])
        canvas = shapely_box(0, 0, camera.width, camera.height)
        found = []
        for ann in records.frame_annotations[frame]:
            center = apply(global2cam, np.array(ann['translation']))
            box_rotation = rotation @ matrix_from_quaternion(ann['rotation'])
            w, l, h = ann['size']
            corners = center + (_UNIT_CORNERS * [l, w, h]) @ box_rotation.T
            corners = corners[corners[:, 2] > 0]
            if len(corners) == 0:
                continue
            projected = corners @ intrinsic.T
            hull = MultiPoint((projected[:, :2] / projected[:, 2:3]).tolist()).convex_hull
            if not hull.intersects(canvas):
                continue
            clipped = hull.intersection(canvas)
            if not isinstance(clipped, Polygon):
                continue
            x0, y0, x1, y1 = clipped.bounds
            if center[2] <= 0:
                continue
            agent = records.agent_of[ann['token']]
            label = int(scene.agents.label[agent])
            velocity = rotation @ records.velocity(ann)
            center_2d = intrinsic @ center
            attrs = ann['attribute_tokens']
            attr_name = _ATTRIBUTE_NAME[attrs[0]] if attrs else 'None'
            found.append(dict(
                bbox_label=label, bbox_label_3d=label, bbox=[x0, y0, x1, y1],
                bbox_3d_isvalid=True,
                bbox_3d=[*center.tolist(), l, h, w, -devkit_yaw(box_rotation)],
                velocity=velocity[0::2].tolist(),
                center_2d=(center_2d[:2] / center_2d[2]).tolist(), depth=float(center[2]),
                attr_label=NUS_ATTRIBUTES.index(attr_name)))
        out[camera.name] = found
    return out


_UNIT_CORNERS = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5)
                          for z in (-0.5, 0.5)])


_ATTRIBUTE_NAME = {fixed_token('attribute', name): name for name in ATTRIBUTES}


def dump_infos(path: str, metainfo: dict, data_list: list) -> None:
    """Write an info file (pickle protocol 4, atomically), numbering ``sample_idx`` in list
    order."""
    for index, info in enumerate(data_list):
        info['sample_idx'] = index
    # whole or not at all: a reused dataset never meets a truncated info file
    atomic_write(path, lambda f: pickle.dump(dict(metainfo=metainfo, data_list=data_list), f,
                                             protocol=4))
