"""The ground-truth database that mmdet3d's ``ObjectSample`` (GT paste) reads.

mmdet3d's nuScenes converter ends with ``create_groundtruth_database`` over
``nuscenes_infos_train.pkl``; this module writes the same files from any v2 nuScenes info file
(ours or the converter's):

* ``<prefix>_gt_database/{sample_idx}_{class}_{i}.bin``: the points inside the ``i``-th box
  of a sample, float32 ``(x, y, z, intensity, time lag)``, shifted by the box's bottom centre
  (``DataBaseSampler`` shifts them back by ``box3d_lidar[:3]``). One file per box, empty ones
  included.
* ``<prefix>_dbinfos_train.pkl``: ``{class: [entry, ...]}``; each entry holds ``name``,
  ``path`` (relative to the data root), ``image_idx`` (the sample's index), ``gt_idx``,
  ``box3d_lidar`` (float32 ``(9,)``: bottom centre, ``l, w, h``, yaw, ``vx, vy``),
  ``num_points_in_gt``, ``difficulty`` (0) and ``group_id`` (one per box, counted over the
  file).

As in the converter, the points are those the training pipeline loads (the converter's
``LoadPointsFromFile`` + ``LoadPointsFromMultiSweeps(sweeps_num=10, use_dim=[0, 1, 2, 3, 4],
pad_empty_sweeps=True, remove_close=True)``), the boxes those ``NuScenesDataset(use_valid_flag=
True)`` gives (valid boxes, NaN velocities set to 0, gravity centre moved to the bottom), and a
point belongs to a box when it lies strictly inside it. :func:`load_points` and
:func:`sample_boxes` reproduce those steps in numpy, so workers need no torch; the tests check
them against mmdet3d's own transforms and the converter's own database.
"""
import io
import os
import os.path as osp
import pickle

import numpy as np

from turbox_mm.utils.atomic_files import atomic_write_bytes

SWEEPS_NUM = 10  # what the converter's LoadPointsFromMultiSweeps loads
LOAD_DIM = 5  # x, y, z, intensity, ring (nuScenes' .pcd.bin)
CLOSE_RADIUS = 1.0  # m: LoadPointsFromMultiSweeps' remove_close drops |x| < 1 and |y| < 1


def create_gt_database(data_root: str, info_file: str, info_prefix: str = 'nuscenes',
                       imap=map) -> dict:
    """Write ``<prefix>_gt_database/`` and ``<prefix>_dbinfos_train.pkl`` under ``data_root``.

    Args:
        data_root (str): The data root (holding ``samples/`` and ``sweeps/``).
        info_file (str): A v2 info file, normally ``<prefix>_infos_train.pkl``.
        info_prefix (str): Prefix of the folder and the dbinfos file. Defaults to 'nuscenes'.
        imap (callable): ``imap(function, tasks)`` yielding the results in task order (a
            pool's ``imap``). Defaults to the builtin ``map``.

    Returns:
        dict: ``dbinfos`` (path), ``folder``, ``objects`` (per class), ``files`` and
        ``bytes`` written.

    Examples:
        >>> from turbox_mm.datasets.synthetic.gt_database import create_gt_database
        >>> summary = create_gt_database('data/nuscenes_synth',
        ...                              'data/nuscenes_synth/nuscenes_infos_train.pkl')
        >>> summary['dbinfos']
        'data/nuscenes_synth/nuscenes_dbinfos_train.pkl'
    """
    with open(info_file, 'rb') as f:
        infos = pickle.load(f)
    categories = infos['metainfo']['categories']
    classes = [name for name, _ in sorted(categories.items(), key=lambda item: item[1])]
    folder = f'{info_prefix}_gt_database'
    os.makedirs(osp.join(data_root, folder), exist_ok=True)
    tasks = [(data_root, folder, classes, _slim(index, info))
             for index, info in enumerate(infos['data_list'])]
    database, files, size = {}, 0, 0
    for entries, written in imap(write_sample_objects, tasks):
        for entry in entries:  # group ids in sample order, whatever the workers did
            entry['group_id'] = files
            database.setdefault(entry['name'], []).append(entry)
            files += 1
        size += written
    path = osp.join(data_root, f'{info_prefix}_dbinfos_train.pkl')
    atomic_write_bytes(path, dumps(database))
    return dict(dbinfos=path, folder=osp.join(data_root, folder),
                objects={name: len(entries) for name, entries in database.items()},
                files=files, bytes=size + osp.getsize(path))


def _slim(index: int, info: dict) -> dict:
    """What a worker needs of an info (so that tasks pickle small)."""
    return dict(sample_idx=index, timestamp=info['timestamp'],
                lidar_points=info['lidar_points'], lidar_sweeps=info.get('lidar_sweeps'),
                instances=info['instances'])


def write_sample_objects(task) -> tuple:
    """Write the object files of one sample.

    Args:
        task (tuple): ``(data_root, folder, classes, info)``; ``folder`` is relative to the
            data root, ``info`` a sample's info (``sample_idx`` being its index in the file).

    Returns:
        tuple[list[dict], int]: The sample's dbinfo entries (without ``group_id``), in box
        order, and the bytes written.
    """
    data_root, folder, classes, info = task
    points = load_points(data_root, info)
    boxes, labels = sample_boxes(info)
    entries, written = [], 0
    for i, inside in enumerate(points_in_boxes(points[:, :3], boxes)):
        name = classes[labels[i]]
        path = f"{folder}/{info['sample_idx']}_{name}_{i}.bin"
        obj = points[inside]
        obj[:, :3] -= boxes[i, :3]
        data = obj.tobytes()
        atomic_write_bytes(osp.join(data_root, path), data)
        written += len(data)
        entries.append(dict(name=name, path=path, image_idx=int(info['sample_idx']), gt_idx=i,
                            box3d_lidar=boxes[i].copy(), num_points_in_gt=len(obj),
                            difficulty=0))
    return entries, written


def load_points(data_root: str, info: dict, sweeps_num: int = SWEEPS_NUM) -> np.ndarray:
    """The keyframe and its sweeps, as mmdet3d 1.4's ``LoadPointsFromMultiSweeps`` gives them.

    The keyframe's fifth column becomes 0 and each sweep's the time lag (s); sweeps lose the
    points within 1 m (in x and y) of the sensor and are brought into the keyframe's lidar
    frame the way mmdet3d 1.4 does it, ``xyz @ R - t`` with ``R, t`` of ``lidar2sensor``
    (its translation is off while the ego turns, see docs/data.md; the database keeps what
    training loads). The newest ``sweeps_num`` sweeps are taken (the converter draws them at
    random when an info lists more). An info without ``lidar_sweeps`` repeats its keyframe
    ``sweeps_num`` times, as ``pad_empty_sweeps`` does.

    Args:
        data_root (str): The data root.
        info (dict): A sample's info (file names as in the info file).
        sweeps_num (int): Sweeps to load. Defaults to 10.

    Returns:
        np.ndarray: ``(N, 5)`` float32 points in the keyframe's lidar frame.
    """
    keyframe = _read(osp.join(data_root, 'samples', 'LIDAR_TOP',
                              osp.basename(info['lidar_points']['lidar_path'])))
    keyframe[:, 4] = 0
    clouds = [keyframe]
    sweeps = info.get('lidar_sweeps')
    if sweeps is None:
        clouds += [_remove_close(keyframe)] * sweeps_num
    for sweep in (sweeps or [])[:sweeps_num]:
        path = sweep['lidar_points']['lidar_path']
        folder = 'samples' if 'samples' in path else 'sweeps'  # as Det3DDataset decides
        points = _remove_close(_read(osp.join(data_root, folder, 'LIDAR_TOP',
                                              osp.basename(path))))
        lidar2sensor = np.array(sweep['lidar_points']['lidar2sensor'])
        points[:, :3] = points[:, :3] @ lidar2sensor[:3, :3]
        points[:, :3] -= lidar2sensor[:3, 3]
        points[:, 4] = info['timestamp'] - sweep['timestamp']
        clouds.append(points)
    return np.concatenate(clouds)


def _read(path: str) -> np.ndarray:
    return np.fromfile(path, np.float32).reshape(-1, LOAD_DIM)


def _remove_close(points: np.ndarray) -> np.ndarray:
    close = (np.abs(points[:, 0]) < CLOSE_RADIUS) & (np.abs(points[:, 1]) < CLOSE_RADIUS)
    return points[~close]


def sample_boxes(info: dict) -> tuple:
    """A sample's boxes and labels as ``NuScenesDataset(use_valid_flag=True)`` gives them.

    Returns:
        tuple[np.ndarray, np.ndarray]: ``(B, 9)`` float32 boxes ``(x, y, z_bottom, l, w, h,
        yaw, vx, vy)`` in the lidar frame (NaN velocities are 0) and ``(B,)`` labels.
    """
    instances = [inst for inst in info['instances'] if inst['bbox_3d_isvalid']]
    if not instances:
        return np.zeros((0, 9), np.float32), np.zeros(0, np.int64)
    boxes = np.concatenate([np.array([inst['bbox_3d'] for inst in instances], np.float32),
                            np.array([inst['velocity'] for inst in instances], np.float32)],
                           axis=1)
    boxes[np.isnan(boxes[:, 7]), 7:9] = 0.0
    boxes[:, 2] += boxes[:, 5] * np.float32(-0.5)  # gravity centre to bottom, in float32
    return boxes, np.array([inst['bbox_label_3d'] for inst in instances], np.int64)


def points_in_boxes(xyz: np.ndarray, boxes: np.ndarray) -> list:
    """Indices of the points strictly inside each box (mmdet3d's LiDAR boxes).

    A box ``(x, y, z_bottom, l, w, h, yaw, ...)`` spans ``l`` along its heading, which is
    ``yaw`` counter-clockwise from the x axis, ``w`` across and ``h`` up from ``z_bottom``.

    Args:
        xyz (np.ndarray): ``(N, 3)`` points.
        boxes (np.ndarray): ``(B, >=7)`` boxes in the same frame.

    Returns:
        list[np.ndarray]: Per box, the indices of its points in increasing order.
    """
    order = np.argsort(xyz[:, 0])
    by_x = xyz[order]  # a box's slab of x is then a slice
    found = []
    for box in boxes.astype(np.float64):
        reach = 0.5 * np.hypot(box[3], box[4])  # half the diagonal: a circle round the box
        lo, hi = np.searchsorted(by_x[:, 0], [box[0] - reach, box[0] + reach], side='right')
        slab = by_x[lo:hi]
        keep = np.flatnonzero(np.abs(slab[:, 1] - box[1]) < reach)
        candidates = order[lo:hi][keep]
        near = slab[keep].astype(np.float64) - box[:3]
        c, s = np.cos(box[6]), np.sin(box[6])
        inside = ((np.abs(c * near[:, 0] + s * near[:, 1]) < box[3] / 2)
                  & (np.abs(-s * near[:, 0] + c * near[:, 1]) < box[4] / 2)
                  & (near[:, 2] > 0) & (near[:, 2] < box[5]))
        found.append(np.sort(candidates[inside]))
    return found


class _Pickler(pickle.Pickler):
    """Pickles arrays as ``numpy.array(values, dtype)``, which numpy 1 and 2 both load (their
    own pickles name ``numpy.core`` or ``numpy._core``)."""

    def reducer_override(self, obj):
        if type(obj) is np.ndarray:
            return np.array, (obj.tolist(), obj.dtype.name)
        return NotImplemented


def dumps(obj) -> bytes:
    """Pickle ``obj`` (protocol 4) so that its arrays load under numpy 1 and 2, and so that
    the bytes depend on the values only.

    The pickler's memo writes an object seen before as a reference to it, so equal strings
    made in different processes (entries from a pool) would pickle longer than the same
    strings shared in one process: fast mode turns the memo off (``obj`` must not contain
    itself).
    """
    buffer = io.BytesIO()
    pickler = _Pickler(buffer, protocol=4)
    pickler.fast = True
    pickler.dump(obj)
    return buffer.getvalue()


__all__ = ['create_gt_database', 'write_sample_objects', 'load_points', 'sample_boxes',
           'points_in_boxes', 'dumps']
