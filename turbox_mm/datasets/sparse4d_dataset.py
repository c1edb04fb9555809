"""Sparse4D v3's nuScenes dataset on mmdet3d 1.4's v2 info files."""
import copy
import logging
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from mmdet3d.datasets import NuScenesDataset
from mmengine.dataset import BaseDataset
from mmengine.logging import print_log

from turbox_mm.benchmark.micro.image_pipeline import sparse4d_aug_config
from turbox_mm.registry import DATASETS

#: Sparse4D's class order (its configs' ``class_names``); labels index this tuple.
SPARSE4D_CLASSES = ('car', 'truck', 'construction_vehicle', 'bus', 'trailer', 'barrier',
                    'motorcycle', 'bicycle', 'pedestrian', 'traffic_cone')
#: A timestamp jump (seconds) that starts a new sequence when infos carry no ``scene_token``.
SEQUENCE_GAP_S = 4.0
_AUG_KEYS = ('resize_lim', 'final_dim', 'bot_pct_lim', 'rot_lim', 'H', 'W', 'rand_flip')
_SEED_HIGH = 2**63 - 1


@DATASETS.register_module()
class Sparse4DNuScenesDataset(NuScenesDataset):
    """mmdet3d's ``NuScenesDataset`` with what Sparse4D v3's dataset adds to a sample.

    The mmengine counterpart of upstream's ``NuScenes3DDetTrackDataset``
    (HorizonRobotics/Sparse4D), reading mmdet3d 1.4's v2 infos:

    - **Order and sequences.** Samples are kept grouped by ``scene_token`` and in timestamp
      order within a scene (infos that are not are reordered, with a warning), so that
      :class:`~turbox_mm.datasets.samplers.GroupInBatchSampler` and an ordered test sampler
      walk scenes frame after frame. :attr:`flag` is the int64 sequence id of every sample:
      one per scene (without ``scene_token``: a new sequence wherever ``prev`` is ``''`` or
      the timestamp jumps by more than 4 s), each cut into ``sequences_split_num`` pieces of
      ``ceil(n / k)`` frames (``'all'``: one frame each).
    - **Items.** ``dataset[item]`` takes a plain index or the sampler's dict
      (``{'idx', 'aug_seed', 'sequence', 'first'}``, see the sampler's "Dataset contract").
      ``results['aug_config']`` is drawn by :meth:`get_augmentation` from
      ``numpy.random.default_rng(aug_seed)``; a plain index in training takes its seed from
      numpy's global generator (which mmengine seeds per worker), so runs stay reproducible.
      In test mode the augmentation is the deterministic test one. A training sample whose
      pipeline returns None is replaced by a random other one, keeping the augmentation, as
      mmengine's ``BaseDataset`` does.
    - **Per sample** (:meth:`get_data_info`): ``lidar2img`` (list of float64 4x4,
      ``K4 @ lidar2cam`` per camera, in ``images`` order), ``cam_intrinsic`` (list of 4x4
      ``K4``), ``lidar2global`` (float64 4x4, ``ego2global @ lidar_points.lidar2ego``),
      ``timestamp`` (float seconds; values above 1e12 are taken as microseconds) and, in
      training, ``instance_id`` (int64, aligned with ``ann_info``'s boxes after
      ``NuScenesDataset``'s ``num_lidar_pts`` filter; absent when the infos carry none).
      ``sample_idx`` is the sample's row in the info file, what mmdet3d's ``NuScenesMetric``
      looks tokens up by, also after a reordering or a subset.

    Labels follow ``metainfo['classes']`` (mmdet3d remaps the infos' labels by name; other
    classes become -1). Without ``metainfo`` the classes are :data:`SPARSE4D_CLASSES`.

    Args:
        data_aug_conf (dict, optional): Upstream's ``data_aug_conf``: ``resize_lim``,
            ``final_dim`` (H, W), ``bot_pct_lim``, ``rot_lim`` (degrees), ``H``, ``W``,
            ``rand_flip`` and ``rot3d_range`` (radians; ``(0, 0)`` when absent). None: no
            ``aug_config`` (the image transforms pass samples through). Defaults to None.
        sequences_split_num (int | str): Pieces per scene in :attr:`flag`, or ``'all'``.
            Give the sampler ``sequences_split_num=1`` then. Defaults to 1.
        metainfo (dict, optional): As mmengine's. Defaults to
            ``dict(classes=SPARSE4D_CLASSES)``.
        **kwargs: ``NuScenesDataset``'s (``load_type`` must be ``'frame_based'``).

    Examples:
        >>> dataset = Sparse4DNuScenesDataset(  # doctest: +SKIP
        ...     data_root='data/nuscenes_synth/', ann_file='nuscenes_infos_train.pkl',
        ...     data_aug_conf=dict(resize_lim=(0.40, 0.47), final_dim=(256, 704),
        ...                        bot_pct_lim=(0.0, 0.0), rot_lim=(-5.4, 5.4), H=900,
        ...                        W=1600, rand_flip=True, rot3d_range=(-0.3925, 0.3925)),
        ...     modality=dict(use_camera=True, use_lidar=True), pipeline=[])
        >>> sample = dataset[dict(idx=3, aug_seed=7, sequence=0, first=False)]  # doctest: +SKIP
    """

    def __init__(self,
                 *args,
                 data_aug_conf: Optional[Dict] = None,
                 sequences_split_num: Union[int, str] = 1,
                 metainfo: Optional[dict] = None,
                 **kwargs) -> None:
        if kwargs.get('load_type', 'frame_based') != 'frame_based':
            raise ValueError(f'{type(self).__name__} needs load_type="frame_based", got '
                             f'{kwargs["load_type"]!r}')
        if sequences_split_num != 'all' and (
                isinstance(sequences_split_num, bool)
                or not isinstance(sequences_split_num, (int, np.integer))
                or sequences_split_num < 1):
            raise ValueError(f'sequences_split_num must be an int >= 1 or "all", got '
                             f'{sequences_split_num!r}')
        if data_aug_conf is not None:
            missing = [k for k in _AUG_KEYS if k not in data_aug_conf]
            if missing:
                raise KeyError(f'data_aug_conf lacks {missing}; it needs {list(_AUG_KEYS)} '
                               '(and optionally rot3d_range)')
        self.data_aug_conf = data_aug_conf
        self.sequences_split_num = sequences_split_num
        self._flag: Optional[np.ndarray] = None
        self._seq_meta: Optional[List[Tuple]] = None
        if metainfo is None:
            metainfo = dict(classes=SPARSE4D_CLASSES)
        super().__init__(*args, metainfo=metainfo, **kwargs)

    # -- loading and order -------------------------------------------------------------------

    def load_data_list(self) -> List[dict]:
        """Load the infos and record each one's row in the info file (``ann_file_row``)."""
        data_list = super().load_data_list()
        for row, info in enumerate(data_list):
            info['ann_file_row'] = row
        return data_list

    def filter_data(self) -> List[dict]:
        """Put the samples in (scene, timestamp) order and note what the flag needs."""
        data_list = super().filter_data()
        meta = [_sequence_meta(info) for info in data_list]
        order = _temporal_order(meta)
        if order is not None:
            print_log(f'{type(self).__name__}: {self.ann_file} is not in (scene, timestamp) '
                      'order; samples are reordered (sample_idx keeps the info-file row)',
                      logger='current', level=logging.WARNING)
            data_list = [data_list[i] for i in order]
            meta = [meta[i] for i in order]
        self._seq_meta = meta
        return data_list

    def full_init(self) -> None:
        """mmengine's ``full_init``, then the sequence flag."""
        if self._fully_initialized:
            return
        super().full_init()
        if self._indices is None and self._seq_meta is not None:
            meta = self._seq_meta
        else:  # a subset: read the kept samples back
            meta = self._meta_from_infos()
        self._flag = sequence_flag(meta, self.sequences_split_num)

    def get_subset(self, indices: Union[Sequence[int], int]) -> 'Sparse4DNuScenesDataset':
        """mmengine's ``get_subset``, with the subset's own :attr:`flag`."""
        sub = super().get_subset(indices)
        sub._flag = sequence_flag(sub._meta_from_infos(), sub.sequences_split_num)
        return sub

    def _meta_from_infos(self) -> List[Tuple]:
        return [_sequence_meta(BaseDataset.get_data_info(self, i)) for i in range(len(self))]

    @property
    def flag(self) -> np.ndarray:
        """np.ndarray: int64 ``(len(self),)`` sequence id per sample, 0, 1, ... in order."""
        if not self._fully_initialized:
            self.full_init()
        return self._flag

    # -- samples -----------------------------------------------------------------------------

    def get_augmentation(self, rng: Optional[np.random.Generator] = None) -> Optional[Dict]:
        """Draw a sample's ``aug_config`` as upstream's ``get_augmentation``.

        Args:
            rng (np.random.Generator, optional): Source of the draws (train only). Defaults
                to a fresh ``numpy.random.default_rng()``.

        Returns:
            dict or None: ``resize``, ``resize_dims`` (W, H), ``crop`` (left, top, right,
            bottom), ``flip``, ``rotate`` (degrees) and ``rotate_3d`` (radians); the
            deterministic test values in test mode (``rotate_3d = 0``); None without
            ``data_aug_conf``.

        Examples:
            >>> ds = Sparse4DNuScenesDataset.__new__(Sparse4DNuScenesDataset)
            >>> ds.test_mode = True
            >>> ds.data_aug_conf = dict(resize_lim=(0.40, 0.47), final_dim=(256, 704),
            ...                         bot_pct_lim=(0.0, 0.0), rot_lim=(-5.4, 5.4), H=900,
            ...                         W=1600, rand_flip=True)
            >>> aug = ds.get_augmentation()
            >>> aug['resize'], aug['resize_dims'], aug['crop'], aug['rotate_3d']
            (0.44, (704, 396), (0, 140, 704, 396), 0.0)
        """
        conf = self.data_aug_conf
        if conf is None:
            return None
        if rng is None:
            rng = np.random.default_rng()
        aug = sparse4d_aug_config(rng, conf, test_mode=self.test_mode)
        if self.test_mode:
            aug['rotate_3d'] = 0.0
        else:
            low, high = conf.get('rot3d_range', (0.0, 0.0))
            aug['rotate_3d'] = float(rng.uniform(low, high))
        return aug

    def get_data_info(self, idx: int) -> dict:
        """The sample's info, with Sparse4D's per-sample fields (see the class docstring).

        Args:
            idx (int): Index in the dataset.

        Returns:
            dict: The info.

        Raises:
            KeyError: A field the projections or poses are built from is missing.
        """
        info = super().get_data_info(idx)
        if 'ann_file_row' in info:
            info['sample_idx'] = info['ann_file_row']
        where = f'sample {idx} (token {info.get("token")!r})'
        info['lidar2img'], info['cam_intrinsic'] = camera_projections(info.get('images', {}),
                                                                      where)
        if 'ego2global' not in info or 'lidar2ego' not in info.get('lidar_points', {}):
            raise KeyError(f'{where}: needs ego2global and lidar_points.lidar2ego')
        info['lidar2global'] = (np.asarray(info['ego2global'], dtype=np.float64)
                                @ np.asarray(info['lidar_points']['lidar2ego'],
                                             dtype=np.float64))
        info['timestamp'] = _seconds(info['timestamp'])
        ann_info = info.get('ann_info')
        if ann_info is not None:
            num_gt = len(ann_info['gt_labels_3d'])
            if 'instance_id' in ann_info:
                ids = np.asarray(ann_info['instance_id'], dtype=np.int64).reshape(-1)
                if len(ids) != num_gt:
                    raise ValueError(f'{where}: {len(ids)} instance ids for {num_gt} boxes')
                info['instance_id'] = ids
            elif num_gt == 0:
                info['instance_id'] = np.zeros(0, dtype=np.int64)
        return info

    def prepare_data(self, index: int, aug_seed: Optional[int] = None) -> Optional[dict]:
        """Det3DDataset's ``prepare_data`` with ``aug_config`` drawn from ``aug_seed``.

        Args:
            index (int): Index in the dataset.
            aug_seed (int, optional): Seed of the augmentation draw (train). Defaults to
                None (fresh entropy).

        Returns:
            dict or None: The pipeline's output; None in training for an empty sample when
            ``filter_empty_gt``.
        """
        input_dict = self.get_data_info(index)
        ori_input_dict = (copy.deepcopy(input_dict)
                          if getattr(self, 'show_ins_var', False) else None)
        input_dict['aug_config'] = self.get_augmentation(np.random.default_rng(aug_seed))
        input_dict['box_type_3d'] = self.box_type_3d
        input_dict['box_mode_3d'] = self.box_mode_3d
        check_empty = not self.test_mode and self.filter_empty_gt
        if check_empty and len(input_dict['ann_info']['gt_labels_3d']) == 0:
            return None
        example = self.pipeline(input_dict)
        if check_empty and (example is None
                            or len(example['data_samples'].gt_instances_3d.labels_3d) == 0):
            return None
        if ori_input_dict is not None and 'ann_info' in ori_input_dict and example:
            self._show_ins_var(ori_input_dict['ann_info']['gt_labels_3d'],
                               example['data_samples'].gt_instances_3d.labels_3d)
        return example

    def __getitem__(self, item: Union[int, Dict]) -> dict:
        """The pipeline's output for an index or a ``GroupInBatchSampler`` item.

        Args:
            item (int | dict): An index, or ``{'idx', 'aug_seed', ...}``.

        Returns:
            dict: The packed sample.
        """
        if isinstance(item, dict):
            if 'idx' not in item:
                raise KeyError(f'{type(self).__name__}: a dict item needs "idx", got keys '
                               f'{sorted(item)}')
            idx, aug_seed = item['idx'], item.get('aug_seed')
        else:
            idx, aug_seed = item, None
        if isinstance(idx, bool) or not isinstance(idx, (int, np.integer)):
            raise TypeError(f'{type(self).__name__}: index must be an int, got {idx!r}')
        idx = int(idx)
        if not self._fully_initialized:
            print_log('Please call `full_init()` method manually to accelerate the speed.',
                      logger='current', level=logging.WARNING)
            self.full_init()
        if self.test_mode:
            data = self.prepare_data(idx, aug_seed)
            if data is None:
                raise Exception('Test time pipline should not get `None` data_sample')
            return data
        if aug_seed is None:  # reproducible under mmengine's seeding, as upstream's draw
            aug_seed = int(np.random.randint(0, _SEED_HIGH, dtype=np.int64))
        for _ in range(self.max_refetch + 1):
            data = self.prepare_data(idx, aug_seed)
            if data is None:
                idx = self._rand_another()
                continue
            return data
        raise Exception(f'Cannot find valid sample after {self.max_refetch}! Please check '
                        'your data and pipeline (filter_empty_gt, the object filters)')


def camera_projections(images: Dict, where: str = 'sample') -> Tuple[List[np.ndarray],
                                                                     List[np.ndarray]]:
    """Per camera of a v2 info's ``images``, in their order: ``lidar2img = K4 @ lidar2cam``
    and the intrinsics ``K4`` (``cam2img`` in the upper left of a 4x4 identity), float64.

    Args:
        images (dict): ``info['images']``: camera name -> ``cam2img``, ``lidar2cam``, ...
        where (str): Names the sample in errors. Defaults to 'sample'.

    Returns:
        tuple[list, list]: ``lidar2img`` and ``cam_intrinsic``, one 4x4 array per camera.

    Raises:
        KeyError: A camera lacks ``cam2img`` or ``lidar2cam``; names the camera.
    """
    lidar2img, intrinsics = [], []
    for cam, cam_info in images.items():
        for key in ('cam2img', 'lidar2cam'):
            if key not in cam_info:
                raise KeyError(f'{where}: images[{cam!r}] has no {key!r}')
        cam2img = np.asarray(cam_info['cam2img'], dtype=np.float64)
        viewpad = np.eye(4)
        viewpad[:cam2img.shape[0], :cam2img.shape[1]] = cam2img
        intrinsics.append(viewpad)
        lidar2img.append(viewpad @ np.asarray(cam_info['lidar2cam'], dtype=np.float64))
    return lidar2img, intrinsics


def _seconds(timestamp) -> float:
    """A timestamp in seconds; values above 1e12 are microseconds (nuScenes' tables)."""
    value = float(timestamp)
    return value / 1e6 if value > 1e12 else value


def _sequence_meta(info: dict) -> Tuple:
    """``(scene_token or None, timestamp s, prev or None)`` of one info."""
    if 'timestamp' not in info:
        raise KeyError(f'sample with token {info.get("token")!r} has no timestamp')
    return info.get('scene_token'), _seconds(info['timestamp']), info.get('prev')


def _temporal_order(meta: List[Tuple]) -> Optional[List[int]]:
    """The (scene, timestamp) order of the samples; None when they are in it already.

    With scene tokens everywhere, scenes keep the order of their first sample; without,
    samples are sorted by timestamp alone (upstream's order).
    """
    n = len(meta)
    if all(m[0] is not None for m in meta):
        rank: Dict = {}
        for scene, _, _ in meta:
            rank.setdefault(scene, len(rank))
        keys = [(rank[m[0]], m[1], i) for i, m in enumerate(meta)]
    else:
        keys = [(0, m[1], i) for i, m in enumerate(meta)]
    order = [k[2] for k in sorted(keys)]
    return None if order == list(range(n)) else order


def sequence_flag(meta: List[Tuple], split: Union[int, str] = 1) -> np.ndarray:
    """Sequence ids of samples in temporal order.

    Args:
        meta (list[tuple]): Per sample ``(scene_token or None, timestamp s, prev or None)``.
            With every scene token present, a sequence is a run of one scene; otherwise a
            new sequence starts where ``prev == ''`` or the timestamp jumps by more than
            :data:`SEQUENCE_GAP_S` (or goes back).
        split (int | str): Cut each sequence of ``n`` samples into pieces of
            ``ceil(n / split)``; ``'all'``: every sample its own sequence. Defaults to 1.

    Returns:
        np.ndarray: int64 ``(len(meta),)``, ids 0, 1, ... in order.

    Examples:
        >>> meta = [('a', 0.0, ''), ('a', 0.5, 'x'), ('a', 1.0, 'y'), ('b', 9.0, '')]
        >>> sequence_flag(meta).tolist(), sequence_flag(meta, 2).tolist()
        ([0, 0, 0, 1], [0, 0, 1, 2])
    """
    n = len(meta)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    use_scene = all(m[0] is not None for m in meta)
    starts = np.zeros(n, dtype=bool)
    starts[0] = True
    for i in range(1, n):
        if use_scene:
            starts[i] = meta[i][0] != meta[i - 1][0]
        else:
            gap = meta[i][1] - meta[i - 1][1]
            starts[i] = meta[i][2] == '' or gap > SEQUENCE_GAP_S or gap < 0
    flag = np.cumsum(starts).astype(np.int64) - 1
    if split == 'all':
        return np.arange(n, dtype=np.int64)
    if split == 1:
        return flag
    sizes = np.bincount(flag)
    out = np.empty(n, dtype=np.int64)
    next_id, begin = 0, 0
    for size in sizes.tolist():
        piece = math.ceil(size / split)
        within = np.arange(size) // piece
        out[begin:begin + size] = next_id + within
        next_id += int(within[-1]) + 1
        begin += size
    return out


__all__ = ['SPARSE4D_CLASSES', 'Sparse4DNuScenesDataset', 'sequence_flag']
