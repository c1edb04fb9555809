"""SparseDrive's k-means anchors: detection, map, motion and planning.

The recipes of upstream's ``tools/kmeans/kmeans_{det,map,motion,plan}.py`` (swc-17/SparseDrive
@ ffebeb4; docs/design/sparsedrive.md sections 3 item 4, 4 and 6.1), reading our info files
(mmdet3d v2 format, as written by ``tools/create_data.py`` and the synthetic generator).
``tools/sparsedrive_anchors.py`` is the command line over these functions.

- **det** ``[900, 11]``: k-means of the xyz centres of every box (every class, with or without
  lidar points) whose BEV distance to the lidar is below 55 m; the other slots are upstream's
  constants: log sizes 1, 1, 1 (an e-metre cube), sin 1, cos 0, velocity 0. This differs from
  Sparse4D's recipe in ``turbox_mm/models/sparse4d/anchors.py`` (3-D radius, mean log size,
  cos 1).
- **map** ``[100, 20, 2]``: k-means of the mean vertex of every ``map_annos`` polyline (all
  classes); each anchor is a 20-point segment along y, ``y = c_y + linspace(-4, 4, 20)``.
- **motion** ``[10, 6, 12, 2]``: per class (Sparse4D's order), the agents whose 12 future
  steps are all valid and whose BEV distance is below 55 m; their step offsets are summed into
  positions and rotated into the agent's frame (by minus its yaw); k-means with 6 clusters on
  the flattened 24 numbers.
- **plan** ``[3, 6, 6, 2]``: per driving command (``argmax`` of the one-hot ``[right, left,
  straight]``), the ego futures with all 6 steps valid, summed into positions; 6 clusters on
  12 numbers.

Differences from upstream, by choice:

- **Seeded.** Upstream's ``KMeans(n_clusters=K)`` has no ``random_state``; here ``seed``
  (default 0) makes the anchors reproducible. ``n_init`` defaults to 10, what scikit-learn 1.3
  (upstream's ``requirement.txt``) runs by default; scikit-learn >= 1.4 would run 1.
- **Too few samples.** Upstream's motion tool silently *skips* a class with 1 to K - 1
  trajectories, so every later class's anchors move up one row and the head (which indexes
  the anchors by class id) pairs classes with another class's anchors (a class with none
  crashes its ``np.concatenate``); its plan tool crashes on a short command.
  Here such a group raises :class:`TooFewSamplesError` (``short='error'``, the default);
  ``short='pool'`` clusters that group from the samples of all groups together (the anchors
  only seed the mode queries, so a generic set is a sound stand-in; the tiny synthetic data
  needs it); ``short='skip'`` (motion only) reproduces upstream.
- **Output dtype** float32 everywhere (upstream saves float64 for det, map and motion; the
  model casts to float32 on load).
- Infos are visited in timestamp order, as upstream's; it only matters for k-means' seeding.
"""
import pickle
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

#: Sparse4D's / SparseDrive's detection class order: motion anchors are indexed by it.
DET_CLASSES = ('car', 'truck', 'construction_vehicle', 'bus', 'trailer', 'barrier',
               'motorcycle', 'bicycle', 'pedestrian', 'traffic_cone')
#: SparseDrive's map class order (``map_annos`` keys 0, 1, 2 upstream).
MAP_CLASSES = ('ped_crossing', 'divider', 'boundary')
#: Driving commands, in the order of the one-hot ``gt_ego_fut_cmd``.
COMMANDS = ('right', 'left', 'straight')
RADIUS = 55.0
AGENT_STEPS, EGO_STEPS = 12, 6
MAP_POINTS, MAP_HALF_LENGTH = 20, 4.0
SHORT_POLICIES = ('error', 'pool', 'skip')
#: Upstream's cluster counts (and file names ``kmeans_<task>_<num>.npy``).
DEFAULT_NUM = dict(det=900, map=100, motion=6, plan=6)


class TooFewSamplesError(ValueError):
    """A k-means group (a class, a command, or the whole set) has fewer samples than
    clusters."""


def load_infos(infos: Union[str, dict]) -> dict:
    """Load an info file (or pass its content through), samples sorted by timestamp.

    Args:
        infos (str | dict): Path of a ``.pkl`` info file (mmdet3d v2: ``metainfo`` and
            ``data_list``), or its loaded content.

    Returns:
        dict: ``{'metainfo': dict, 'data_list': list}``, ``data_list`` in timestamp order
        (stable).

    Raises:
        KeyError: No ``data_list``; names the file.
    """
    name = infos if isinstance(infos, str) else '<infos>'
    if isinstance(infos, str):
        with open(infos, 'rb') as f:
            infos = pickle.load(f)
    if not isinstance(infos, dict) or 'data_list' not in infos:
        raise KeyError(f'{name}: no data_list; expected mmdet3d 1.x (v2) infos '
                       '(tools/create_data.py)')
    samples = sorted(infos['data_list'], key=lambda s: s.get('timestamp', 0.0))
    return dict(metainfo=infos.get('metainfo', {}), data_list=samples)


def kmeans(points: np.ndarray, num: int, seed: int = 0, n_init: int = 10,
           what: str = 'samples') -> np.ndarray:
    """Cluster centres of ``points`` by scikit-learn's ``KMeans`` (k-means++).

    Args:
        points (np.ndarray): ``[N, D]``.
        num (int): Clusters.
        seed (int): ``random_state``. Defaults to 0.
        n_init (int): Restarts (the best inertia wins). Defaults to 10.
        what (str): Names the samples in the error message. Defaults to 'samples'.

    Returns:
        np.ndarray: float64 ``[num, D]``.

    Raises:
        TooFewSamplesError: ``N < num``.
    """
    from sklearn.cluster import KMeans
    points = np.asarray(points, dtype=np.float64)
    if len(points) < num:
        raise TooFewSamplesError(f'{len(points)} {what}, fewer than the {num} clusters '
                                 'asked for')
    model = KMeans(n_clusters=num, n_init=n_init, random_state=seed).fit(points)
    return model.cluster_centers_


# -- det ------------------------------------------------------------------------------------

def det_centres(infos: dict, radius: float = RADIUS) -> np.ndarray:
    """Centres ``[M, 3]`` of every box (all classes, valid or not) within ``radius`` (BEV).

    Args:
        infos (dict): :func:`load_infos`' result.
        radius (float): Keep boxes with ``hypot(x, y) < radius`` (strict, as upstream).
            Defaults to 55.

    Returns:
        np.ndarray: float64 ``[M, 3]``.
    """
    boxes = [inst['bbox_3d'][:3] for sample in infos['data_list']
             for inst in sample.get('instances', [])]
    centres = np.asarray(boxes, dtype=np.float64).reshape(-1, 3)
    return centres[np.linalg.norm(centres[:, :2], axis=1) < radius]


def det_anchors(centres: np.ndarray, num: int = 900, seed: int = 0,
                n_init: int = 10) -> np.ndarray:
    """Detection anchors ``[num, 11]``: k-means centres and upstream's constant slots.

    Args:
        centres (np.ndarray): ``[M, 3]`` from :func:`det_centres`.
        num (int): Anchors. Defaults to 900.
        seed (int): k-means seed. Defaults to 0.
        n_init (int): k-means restarts. Defaults to 10.

    Returns:
        np.ndarray: float32 ``[num, 11]``: ``x, y, z, 1, 1, 1, 1 (sin), 0 (cos), 0, 0, 0``.

    Raises:
        TooFewSamplesError: Fewer centres than ``num``.

    Examples:
        >>> centres = np.random.default_rng(0).uniform(-30, 30, (40, 3))
        >>> det_anchors(centres, num=4)[:, 3:].tolist()[0]
        [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    """
    anchors = np.zeros((num, 11), dtype=np.float64)
    anchors[:, :3] = kmeans(centres, num, seed, n_init, 'box centres')
    anchors[:, 3:7] = 1.0
    return anchors.astype(np.float32)


# -- map ------------------------------------------------------------------------------------

def _map_key_rank(key) -> tuple:
    if isinstance(key, (int, np.integer)):
        return (int(key), '')
    if key in MAP_CLASSES:
        return (MAP_CLASSES.index(key), '')
    return (len(MAP_CLASSES), str(key))


def map_centres(infos: dict) -> np.ndarray:
    """The mean vertex ``[M, 2]`` of every ``map_annos`` polyline, all classes.

    ``map_annos`` may be keyed by SparseDrive's ints (0 ped_crossing, 1 divider, 2 boundary)
    or by names (our infos); classes are visited in SparseDrive's order.

    Args:
        infos (dict): :func:`load_infos`' result.

    Returns:
        np.ndarray: float64 ``[M, 2]``.

    Raises:
        KeyError: A sample has no ``map_annos``.
        ValueError: A polyline is not ``[k >= 1, 2]``.
    """
    centres = []
    for sample in infos['data_list']:
        if 'map_annos' not in sample:
            raise KeyError(f"sample {sample.get('token', '?')}: no 'map_annos' (vector map)")
        annos = sample['map_annos']
        for key in sorted(annos, key=_map_key_rank):
            for line in annos[key]:
                line = np.asarray(line, dtype=np.float64)
                if line.ndim != 2 or line.shape[1] < 2 or len(line) == 0:
                    raise ValueError(f"sample {sample.get('token', '?')}: map_annos[{key!r}] "
                                     f'polyline must be [k >= 1, 2], got {list(line.shape)}')
                centres.append(line[:, :2].mean(axis=0))
    return np.asarray(centres, dtype=np.float64).reshape(-1, 2)


def map_anchors(centres: np.ndarray, num: int = 100, num_points: int = MAP_POINTS,
                half_length: float = MAP_HALF_LENGTH, seed: int = 0,
                n_init: int = 10) -> np.ndarray:
    """Map anchors ``[num, num_points, 2]``: a segment along y through each cluster centre.

    Args:
        centres (np.ndarray): ``[M, 2]`` from :func:`map_centres`.
        num (int): Anchors. Defaults to 100.
        num_points (int): Points per anchor. Defaults to 20.
        half_length (float): The segment runs from ``c_y - half_length`` to
            ``c_y + half_length``. Defaults to 4 m.
        seed (int): k-means seed. Defaults to 0.
        n_init (int): k-means restarts. Defaults to 10.

    Returns:
        np.ndarray: float32 ``[num, num_points, 2]`` (x, y in metres).

    Raises:
        TooFewSamplesError: Fewer polylines than ``num``.
    """
    centre = kmeans(centres, num, seed, n_init, 'map polylines')
    offsets = np.zeros((num_points, 2))
    offsets[:, 1] = np.linspace(-half_length, half_length, num_points)
    return (centre[:, None, :] + offsets[None]).astype(np.float32)


# -- motion ---------------------------------------------------------------------------------

def to_agent_frame(offsets: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    """Step offsets ``[n, T, 2]`` (lidar frame) to positions in each agent's frame.

    Positions are the running sums of the offsets (relative to the agent's centre), rotated
    by ``-yaw``: ``x' = x cos(yaw) + y sin(yaw)``, ``y' = -x sin(yaw) + y cos(yaw)``, so the
    agent's heading is +x.

    Args:
        offsets (np.ndarray): ``[n, T, 2]``.
        yaw (np.ndarray): ``[n]`` box yaws (lidar frame).

    Returns:
        np.ndarray: float64 ``[n, T, 2]``.
    """
    positions = np.cumsum(np.asarray(offsets, dtype=np.float64), axis=1)
    cos, sin = np.cos(yaw)[:, None], np.sin(yaw)[:, None]
    x, y = positions[..., 0], positions[..., 1]
    return np.stack([x * cos + y * sin, -x * sin + y * cos], axis=-1)


def _label_names(metainfo: dict) -> Dict[int, str]:
    categories = metainfo.get('categories')
    if not categories:
        raise KeyError("metainfo has no 'categories' (name -> label): cannot tell the "
                       'classes of the boxes')
    return {int(v): k for k, v in categories.items()}


def agent_trajectories(infos: dict, radius: float = RADIUS, steps: int = AGENT_STEPS,
                       classes: Sequence[str] = DET_CLASSES) -> List[np.ndarray]:
    """Per class, the agent-frame futures ``[n_c, steps, 2]`` of the agents that qualify.

    An agent qualifies when all ``steps`` entries of ``fut_mask`` are set and its BEV
    distance is below ``radius``; every box counts, with or without lidar points. Labels are
    mapped to ``classes`` by name through ``metainfo['categories']``; other labels are left
    out.

    Args:
        infos (dict): :func:`load_infos`' result; instances carry ``fut_traj`` ``[T, 2]`` and
            ``fut_mask`` ``[T]``.
        radius (float): BEV distance limit (strict). Defaults to 55.
        steps (int): Future steps. Defaults to 12.
        classes (Sequence[str]): Output class order. Defaults to Sparse4D's.

    Returns:
        list[np.ndarray]: ``len(classes)`` arrays, float64 ``[n_c, steps, 2]``.

    Raises:
        KeyError: No ``categories`` in the metainfo, or an instance without
            ``fut_traj`` / ``fut_mask``.
        ValueError: A future is not ``[steps, 2]`` / ``[steps]``.
    """
    names = _label_names(infos['metainfo'])
    per_class = [[] for _ in classes]
    for sample in infos['data_list']:
        for inst in sample.get('instances', []):
            for key in ('fut_traj', 'fut_mask'):
                if key not in inst:
                    raise KeyError(f"sample {sample.get('token', '?')}: an instance has no "
                                   f"'{key}' (agent futures; SparseDrive's infos)")
            traj = np.asarray(inst['fut_traj'], dtype=np.float64)
            mask = np.asarray(inst['fut_mask'], dtype=np.float64)
            if traj.shape != (steps, 2) or mask.shape != (steps, ):
                raise ValueError(f"sample {sample.get('token', '?')}: fut_traj / fut_mask "
                                 f'must be [{steps}, 2] / [{steps}], got {list(traj.shape)} / '
                                 f'{list(mask.shape)}')
            label = inst.get('bbox_label_3d', inst.get('bbox_label', -1))
            name = names.get(int(label))
            if name not in classes or mask.sum() != steps:
                continue
            box = inst['bbox_3d']
            if np.hypot(box[0], box[1]) >= radius:
                continue
            per_class[classes.index(name)].append(to_agent_frame(traj[None], np.array(
                [box[6]]))[0])
    return [np.asarray(t, dtype=np.float64).reshape(-1, steps, 2) for t in per_class]


def _grouped_kmeans(groups: Sequence[np.ndarray], num: int, seed: int, n_init: int,
                    short: str, names: Sequence[str], allow_skip: bool) -> np.ndarray:
    if short not in SHORT_POLICIES or (short == 'skip' and not allow_skip):
        allowed = SHORT_POLICIES if allow_skip else SHORT_POLICIES[:2]
        raise ValueError(f'short must be one of {allowed}, got {short!r}')
    shape = groups[0].shape[1:]
    flat = [g.reshape(len(g), int(np.prod(shape))) for g in groups]
    pool = np.concatenate(flat, axis=0)
    short_groups = [(name, len(g)) for name, g in zip(names, groups) if len(g) < num]
    if short_groups and short == 'error':
        listed = ', '.join(f'{name}: {n}' for name, n in short_groups)
        raise TooFewSamplesError(
            f'fewer samples than the {num} clusters in {listed} (total {len(pool)}); '
            "short='pool' (CLI --short pool) clusters such groups from all samples"
            + (", short='skip' drops them (upstream)" if allow_skip else ''))
    pooled = None
    out = []
    for group in flat:
        if len(group) >= num:
            out.append(kmeans(group, num, seed, n_init))
        elif short == 'pool':
            if pooled is None:
                pooled = kmeans(pool, num, seed, n_init, 'samples in all groups together')
            out.append(pooled)
    if not out:
        raise TooFewSamplesError(f'no group has {num} samples; nothing to write')
    return np.stack(out).reshape(len(out), num, *shape).astype(np.float32)


def motion_anchors(per_class: Sequence[np.ndarray], num: int = 6, seed: int = 0,
                   n_init: int = 10, short: str = 'error',
                   classes: Sequence[str] = DET_CLASSES) -> np.ndarray:
    """Motion anchors ``[C, num, T, 2]`` from :func:`agent_trajectories`.

    Args:
        per_class (Sequence[np.ndarray]): ``[n_c, T, 2]`` per class.
        num (int): Modes per class. Defaults to 6.
        seed (int): k-means seed. Defaults to 0.
        n_init (int): k-means restarts. Defaults to 10.
        short (str): A class with fewer than ``num`` trajectories: ``'error'`` raises,
            ``'pool'`` uses the anchors clustered from every class's trajectories,
            ``'skip'`` drops the class (upstream; later classes move up a row, and C
            shrinks). Defaults to 'error'.
        classes (Sequence[str]): Class names, for messages. Defaults to Sparse4D's.

    Returns:
        np.ndarray: float32 ``[C, num, T, 2]`` (agent frame, metres).

    Raises:
        TooFewSamplesError: See ``short``; names each short class and its count.
        ValueError: Unknown ``short``.
    """
    return _grouped_kmeans(per_class, num, seed, n_init, short, classes, allow_skip=True)


# -- plan -----------------------------------------------------------------------------------

def ego_trajectories(infos: dict, steps: int = EGO_STEPS) -> List[np.ndarray]:
    """Per command, the complete ego futures as positions ``[n_c, steps, 2]``.

    Args:
        infos (dict): :func:`load_infos`' result; samples carry ``gt_ego_fut_trajs``
            ``[steps, 2]`` (step offsets), ``gt_ego_fut_masks`` ``[steps]`` and
            ``gt_ego_fut_cmd`` ``[3]``.
        steps (int): Future steps. Defaults to 6.

    Returns:
        list[np.ndarray]: 3 arrays (right, left, straight), float64 ``[n_c, steps, 2]``.

    Raises:
        KeyError: A sample lacks one of the three keys.
        ValueError: One of them has the wrong shape.
    """
    per_command = [[] for _ in COMMANDS]
    for sample in infos['data_list']:
        token = sample.get('token', '?')
        for key in ('gt_ego_fut_trajs', 'gt_ego_fut_masks', 'gt_ego_fut_cmd'):
            if key not in sample:
                raise KeyError(f"sample {token}: no '{key}' (ego future; SparseDrive's infos)")
        traj = np.asarray(sample['gt_ego_fut_trajs'], dtype=np.float64)
        mask = np.asarray(sample['gt_ego_fut_masks'], dtype=np.float64)
        command = np.asarray(sample['gt_ego_fut_cmd'])
        if traj.shape != (steps, 2) or mask.shape != (steps, ) or command.shape != (3, ):
            raise ValueError(f'sample {token}: gt_ego_fut_trajs / _masks / _cmd must be '
                             f'[{steps}, 2] / [{steps}] / [3], got {list(traj.shape)} / '
                             f'{list(mask.shape)} / {list(command.shape)}')
        if mask.sum() != steps:
            continue
        per_command[int(command.astype(np.int32).argmax())].append(np.cumsum(traj, axis=0))
    return [np.asarray(t, dtype=np.float64).reshape(-1, steps, 2) for t in per_command]


def plan_anchors(per_command: Sequence[np.ndarray], num: int = 6, seed: int = 0,
                 n_init: int = 10, short: str = 'error') -> np.ndarray:
    """Planning anchors ``[3, num, T, 2]`` from :func:`ego_trajectories`.

    Args:
        per_command (Sequence[np.ndarray]): ``[n_c, T, 2]`` for right, left, straight.
        num (int): Modes per command. Defaults to 6.
        seed (int): k-means seed. Defaults to 0.
        n_init (int): k-means restarts. Defaults to 10.
        short (str): ``'error'`` or ``'pool'``, as :func:`motion_anchors` (upstream crashes
            on a short command). Defaults to 'error'.

    Returns:
        np.ndarray: float32 ``[3, num, T, 2]`` (lidar frame, metres).

    Raises:
        TooFewSamplesError: A command has fewer than ``num`` futures (``short='error'``).
        ValueError: Unknown ``short`` (``'skip'`` included).
    """
    return _grouped_kmeans(per_command, num, seed, n_init, short, COMMANDS, allow_skip=False)


def anchors_for(task: str, infos: Union[str, dict], num: Optional[int] = None,
                seed: int = 0, n_init: int = 10, radius: float = RADIUS,
                short: str = 'error') -> Tuple[np.ndarray, int]:
    """One task's anchors from an info file, with upstream's sizes by default.

    Args:
        task (str): ``'det'``, ``'map'``, ``'motion'`` or ``'plan'``.
        infos (str | dict): Info file path or content.
        num (int, optional): Clusters; None: upstream's 900, 100, 6, 6.
        seed (int): k-means seed. Defaults to 0.
        n_init (int): k-means restarts. Defaults to 10.
        radius (float): BEV limit for det and motion. Defaults to 55.
        short (str): Short-group policy for motion and plan. Defaults to 'error'.

    Returns:
        tuple[np.ndarray, int]: float32 anchors, and the number of samples clustered (box
        centres, polylines, trajectories or ego futures).

    Raises:
        ValueError: Unknown task; and the errors of the task's functions.
    """
    if task not in DEFAULT_NUM:
        raise ValueError(f'task must be one of {sorted(DEFAULT_NUM)}, got {task!r}')
    num = DEFAULT_NUM[task] if num is None else num
    infos = load_infos(infos)
    if task == 'det':
        centres = det_centres(infos, radius)
        return det_anchors(centres, num, seed, n_init), len(centres)
    if task == 'map':
        centres = map_centres(infos)
        return map_anchors(centres, num, seed=seed, n_init=n_init), len(centres)
    if task == 'motion':
        groups = agent_trajectories(infos, radius)
        return motion_anchors(groups, num, seed, n_init, short), sum(map(len, groups))
    groups = ego_trajectories(infos)
    return plan_anchors(groups, num, seed, n_init, short), sum(map(len, groups))
