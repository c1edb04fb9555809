"""SparseDrive's nuScenes dataset: Sparse4D's, plus the map, ego and trajectory fields."""
import logging
from typing import Dict, List, Tuple

import numpy as np
from mmengine.dataset import BaseDataset
from mmengine.logging import print_log

from turbox_mm.registry import DATASETS
from .sparse4d_dataset import Sparse4DNuScenesDataset
from .transforms.vectorize_map import SPARSEDRIVE_MAP_CLASSES, VectorizeMap

#: Length of SparseDrive's ``ego_status``: acceleration (3), rotation rate (3), velocity (3)
#: and steering angle (1), from the CAN bus.
EGO_STATUS_DIM = 10
#: Driving commands, one-hot in this order.
COMMANDS = ('right', 'left', 'straight')
_warned = {'ego_status': False}


@DATASETS.register_module()
class SparseDriveNuScenesDataset(Sparse4DNuScenesDataset):
    """:class:`Sparse4DNuScenesDataset` with what SparseDrive adds to a sample (upstream's
    ``NuScenes3DDataset``, swc-17/SparseDrive).

    Added to :meth:`get_data_info`'s output (our infos name the fields as SparseDrive's
    converter does; ``docs/design/sparsedrive.md`` section 7):

    - ``map_annos``: the info's map polylines, passed on as they are for
      :class:`~turbox_mm.datasets.transforms.vectorize_map.VectorizeMap` (keyed by class
      name or by SparseDrive label, lidar frame).
    - ``ego_status``: float32 ``(10,)``.
    - ``lidar2ego``: float64 ``(4, 4)`` (the motion metric measures class ranges from the
      ego origin, as upstream).
    - ``gt_ego_fut_trajs`` float32 ``(T_e, 2)`` (per-step xy offsets of the lidar origin in
      the current lidar frame), ``gt_ego_fut_masks`` float32 ``(T_e,)``, ``gt_ego_fut_cmd``
      float32 ``(3,)`` one-hot over (right, left, straight); ``T_e = ego_fut_ts``.
    - With ground truth (training): ``gt_agent_fut_trajs`` float32 ``(n, T, 2)`` and
      ``gt_agent_fut_masks`` float32 ``(n, T)`` from the instances' ``fut_traj`` /
      ``fut_mask``, aligned row for row with ``ann_info``'s boxes and ``instance_id``
      (mmdet3d's ``num_lidar_pts > 0`` or valid-flag filter applies to every instance key
      alike). ``CircleObjectRangeFilter`` and ``InstanceNameFilter`` keep them aligned.
    - ``fut_boxes`` (only with ``with_fut_boxes``, for the planning evaluation): for each of
      the ``sum(gt_ego_fut_masks)`` next samples of the same scene, its boxes (the same
      point / valid-flag filter, every class) as float32 ``(m, 7)`` ``(x, y, z, l, w, h,
      yaw)``, gravity centre, moved into the current lidar frame (centre by
      ``T_fut2cur``, yaw by its 2x2 rotation block), as upstream's ``get_ann_info``.
      Upstream builds them for training samples too, where they go unused.

    In test mode with ``load_eval_anns``, ``eval_ann_info`` also gets the agent futures,
    the ego future, the command, (with ``with_fut_boxes``) ``fut_boxes``, and the map ground
    truth that ``SparseDriveMapMetric`` reads: ``gt_map_polylines`` (float64 ``(k, 2)``
    vertices, lidar frame, as in the info) and ``gt_map_labels`` int64 ``(G,)`` (labels in
    ``map_classes`` order).

    Bad input raises (issue 19): a missing ``ego_status``, one not of length 10 or not
    finite, a missing or mis-shaped ego future, a command that is not one-hot over 3, a
    missing ``map_annos``, instances without ``fut_traj`` / ``fut_mask``. Upstream's
    converter silently writes zeros for scenes without CAN-bus data;
    ``allow_missing_ego_status=True`` reproduces that (zeros for a missing ``ego_status``,
    with one warning per process).

    Args:
        with_fut_boxes (bool): Add ``fut_boxes`` (planning evaluation). Defaults to False.
        allow_missing_ego_status (bool): Zero-fill a missing ``ego_status`` instead of
            raising. Defaults to False.
        fut_ts (int): Agent future steps. Defaults to 12.
        ego_fut_ts (int): Ego future steps. Defaults to 6.
        map_classes (sequence[str]): Map class names in label order (names in
            ``map_annos`` map to these labels). Defaults to SparseDrive's
            ``('ped_crossing', 'divider', 'boundary')``.
        *args, **kwargs: :class:`Sparse4DNuScenesDataset`'s.

    Examples:
        >>> dataset = SparseDriveNuScenesDataset(  # doctest: +SKIP
        ...     data_root='data/nuscenes_synth/', ann_file='nuscenes_infos_train.pkl',
        ...     data_aug_conf=dict(resize_lim=(0.40, 0.47), final_dim=(256, 704),
        ...                        bot_pct_lim=(0.0, 0.0), rot_lim=(-5.4, 5.4), H=900,
        ...                        W=1600, rand_flip=True, rot3d_range=(0, 0)),
        ...     modality=dict(use_camera=True, use_lidar=True), pipeline=[])
        >>> info = dataset.get_data_info(0)  # doctest: +SKIP
        >>> info['gt_agent_fut_trajs'].shape[1:], info['ego_status'].shape  # doctest: +SKIP
        ((12, 2), (10,))
    """

    def __init__(self,
                 *args,
                 with_fut_boxes: bool = False,
                 allow_missing_ego_status: bool = False,
                 fut_ts: int = 12,
                 ego_fut_ts: int = 6,
                 map_classes=SPARSEDRIVE_MAP_CLASSES,
                 **kwargs) -> None:
        for name, value in (('fut_ts', fut_ts), ('ego_fut_ts', ego_fut_ts)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                    or value < 1:
                raise ValueError(f'{name} must be an int >= 1, got {value!r}')
        self.with_fut_boxes = bool(with_fut_boxes)
        self.allow_missing_ego_status = bool(allow_missing_ego_status)
        self.fut_ts = int(fut_ts)
        self.ego_fut_ts = int(ego_fut_ts)
        self.map_reader = VectorizeMap(map_classes=map_classes)
        super().__init__(*args, **kwargs)

    def get_data_info(self, idx: int) -> dict:
        """The sample's info: Sparse4D's fields and SparseDrive's (see the class docstring).

        Args:
            idx (int): Index in the dataset.

        Returns:
            dict: The info.

        Raises:
            KeyError: A field SparseDrive needs is missing.
            ValueError: A field has the wrong shape or value.
        """
        info = super().get_data_info(idx)
        where = f'sample {idx} (token {info.get("token")!r})'
        if 'map_annos' not in info:
            raise KeyError(f'{where}: the info has no map_annos (SparseDrive\'s map '
                           'polylines in the lidar frame)')
        info['ego_status'] = self._ego_status(info, where)
        # the motion metric measures nuScenes' class ranges from the ego, as upstream
        info['lidar2ego'] = np.asarray(info['lidar_points']['lidar2ego'], np.float64)
        trajs, masks, command = ego_future(info, self.ego_fut_ts, where)
        info.update(gt_ego_fut_trajs=trajs, gt_ego_fut_masks=masks, gt_ego_fut_cmd=command)
        ann_info = info.get('ann_info')
        if ann_info is not None:
            trajs, masks = agent_futures(ann_info, self.fut_ts, where)
            info.update(gt_agent_fut_trajs=trajs, gt_agent_fut_masks=masks)
        if self.with_fut_boxes:
            info['fut_boxes'] = self.future_boxes(idx, info)
        eval_ann = info.get('eval_ann_info')
        if eval_ann is not None:
            trajs, masks = agent_futures(eval_ann, self.fut_ts, where)
            eval_ann.update(gt_agent_fut_trajs=trajs, gt_agent_fut_masks=masks)
            for key in ('gt_ego_fut_trajs', 'gt_ego_fut_masks', 'gt_ego_fut_cmd', 'fut_boxes'):
                if key in info:
                    eval_ann[key] = info[key]
            polylines, labels = self.map_reader.read_polylines(info['map_annos'])
            eval_ann.update(gt_map_polylines=polylines, gt_map_labels=labels)
        return info

    def _ego_status(self, info: dict, where: str) -> np.ndarray:
        if info.get('ego_status') is None:
            if not self.allow_missing_ego_status:
                raise KeyError(f'{where}: the info has no ego_status (10 CAN-bus numbers); '
                               'pass allow_missing_ego_status=True for upstream\'s zeros')
            if not _warned['ego_status']:
                _warned['ego_status'] = True
                print_log(f'{type(self).__name__}: {where} and maybe others have no '
                          'ego_status; using zeros (allow_missing_ego_status=True, '
                          'upstream\'s fill for scenes without CAN-bus data)',
                          logger='current', level=logging.WARNING)
            return np.zeros(EGO_STATUS_DIM, dtype=np.float32)
        status = np.asarray(info['ego_status'], dtype=np.float32)
        if status.shape != (EGO_STATUS_DIM, ):
            raise ValueError(f'{where}: ego_status must have {EGO_STATUS_DIM} numbers, got '
                             f'shape {status.shape}')
        if not np.isfinite(status).all():
            raise ValueError(f'{where}: ego_status has non-finite values {status.tolist()}')
        return status

    def _box_mask(self, info: dict) -> np.ndarray:
        """Which raw instances the parent keeps (mmdet3d's ``_filter_with_mask``)."""
        instances = info.get('instances', [])
        if self.use_valid_flag:
            return np.array([bool(inst['bbox_3d_isvalid']) for inst in instances], dtype=bool)
        return np.array([inst['num_lidar_pts'] > 0 for inst in instances], dtype=bool)

    def future_boxes(self, idx: int, info: dict) -> List[np.ndarray]:
        """The boxes of the next samples of the scene, in this sample's lidar frame.

        Args:
            idx (int): The sample's index.
            info (dict): Its info (from :meth:`get_data_info`, with ``lidar2global`` and
                ``gt_ego_fut_masks``).

        Returns:
            list[np.ndarray]: float32 ``(m_i, 7)`` per future step ``i = 1 ..
            sum(gt_ego_fut_masks)``; fewer where the scene or the dataset ends first.
        """
        where = f'sample {idx} (token {info.get("token")!r})'
        if info.get('scene_token') is None:
            raise KeyError(f'{where}: fut_boxes need scene_token in the infos')
        steps = int(round(float(np.sum(info['gt_ego_fut_masks']))))
        cur2global = np.asarray(info['lidar2global'], dtype=np.float64)
        global2cur = np.linalg.inv(cur2global)
        out = []
        for step in range(1, steps + 1):
            if idx + step >= len(self):
                break
            fut = BaseDataset.get_data_info(self, idx + step)
            if fut.get('scene_token') != info['scene_token']:
                break
            keep = self._box_mask(fut)
            boxes = np.array([inst['bbox_3d'] for inst in fut.get('instances', [])],
                             dtype=np.float64).reshape(-1, 7)[keep]
            fut2global = (np.asarray(fut['ego2global'], dtype=np.float64)
                          @ np.asarray(fut['lidar_points']['lidar2ego'], dtype=np.float64))
            fut2cur = global2cur @ fut2global
            boxes[:, :3] = boxes[:, :3] @ fut2cur[:3, :3].T + fut2cur[:3, 3]
            heading = np.stack([np.cos(boxes[:, 6]), np.sin(boxes[:, 6])], axis=-1)
            heading = heading @ fut2cur[:2, :2].T
            boxes[:, 6] = np.arctan2(heading[:, 1], heading[:, 0])
            out.append(boxes.astype(np.float32))
        return out


def ego_future(info: dict, steps: int,
               where: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ego future and command of an info, checked.

    Args:
        info (dict): The info, with ``gt_ego_fut_trajs``, ``gt_ego_fut_masks`` and
            ``gt_ego_fut_cmd``.
        steps (int): Expected future steps.
        where (str): Names the sample in errors.

    Returns:
        tuple[np.ndarray, np.ndarray, np.ndarray]: float32 ``(steps, 2)`` offsets,
        ``(steps,)`` mask and ``(3,)`` one-hot command.

    Raises:
        KeyError: A field is missing.
        ValueError: A wrong shape, or a command that is not one-hot over 3.

    Examples:
        >>> info = dict(gt_ego_fut_trajs=[[0., 1.]] * 6, gt_ego_fut_masks=[1.] * 6,
        ...             gt_ego_fut_cmd=[0, 0, 1])
        >>> [a.shape for a in ego_future(info, 6, 'demo')]
        [(6, 2), (6,), (3,)]
    """
    missing = [k for k in ('gt_ego_fut_trajs', 'gt_ego_fut_masks', 'gt_ego_fut_cmd')
               if info.get(k) is None]
    if missing:
        raise KeyError(f'{where}: the info has no {missing} (SparseDrive\'s ego future)')
    trajs = np.asarray(info['gt_ego_fut_trajs'], dtype=np.float32)
    masks = np.asarray(info['gt_ego_fut_masks'], dtype=np.float32)
    if trajs.shape != (steps, 2) or masks.shape != (steps, ):
        raise ValueError(f'{where}: gt_ego_fut_trajs must be ({steps}, 2) and '
                         f'gt_ego_fut_masks ({steps},), got {trajs.shape} and {masks.shape}')
    command = np.asarray(info['gt_ego_fut_cmd'], dtype=np.float32)
    if command.shape != (len(COMMANDS), ) or not np.isin(command, (0.0, 1.0)).all() \
            or command.sum() != 1:
        raise ValueError(f'{where}: gt_ego_fut_cmd must be one-hot over {COMMANDS}, got '
                         f'{np.asarray(info["gt_ego_fut_cmd"]).tolist()}')
    return trajs, masks, command


def agent_futures(ann_info: Dict, steps: int, where: str) -> Tuple[np.ndarray, np.ndarray]:
    """The agent futures of an ``ann_info``, aligned with its boxes.

    mmdet3d's ``parse_ann_info`` stacks every instance key and filters them all by the same
    mask, so ``fut_traj`` / ``fut_mask`` arrive row-aligned with ``gt_labels_3d``.

    Args:
        ann_info (dict): With ``gt_labels_3d`` and, when there are boxes, ``fut_traj``
            ``(n, steps, 2)`` and ``fut_mask`` ``(n, steps)``.
        steps (int): Expected future steps.
        where (str): Names the sample in errors.

    Returns:
        tuple[np.ndarray, np.ndarray]: float32 ``(n, steps, 2)`` and ``(n, steps)``.

    Raises:
        KeyError: Boxes without ``fut_traj`` / ``fut_mask``.
        ValueError: Wrong shapes.

    Examples:
        >>> ann = dict(gt_labels_3d=np.zeros(0, np.int64))
        >>> [a.shape for a in agent_futures(ann, 12, 'demo')]
        [(0, 12, 2), (0, 12)]
    """
    num = len(ann_info['gt_labels_3d'])
    if num == 0 and 'fut_traj' not in ann_info:
        return (np.zeros((0, steps, 2), dtype=np.float32),
                np.zeros((0, steps), dtype=np.float32))
    missing = [k for k in ('fut_traj', 'fut_mask') if k not in ann_info]
    if missing:
        raise KeyError(f'{where}: the instances have no {missing} (SparseDrive\'s agent '
                       'futures, instances[k].fut_traj / fut_mask in the infos)')
    trajs = np.asarray(ann_info['fut_traj'], dtype=np.float32)
    masks = np.asarray(ann_info['fut_mask'], dtype=np.float32)
    if trajs.shape != (num, steps, 2) or masks.shape != (num, steps):
        raise ValueError(f'{where}: instances need fut_traj ({steps}, 2) and fut_mask '
                         f'({steps},) each; got {trajs.shape} and {masks.shape} for {num} '
                         'boxes')
    return trajs, masks


__all__ = ['EGO_STATUS_DIM', 'COMMANDS', 'SparseDriveNuScenesDataset', 'agent_futures',
           'ego_future']
