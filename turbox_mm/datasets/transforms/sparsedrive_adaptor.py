"""The last SparseDrive transform: Sparse4D's model arrays plus the map, trajectory and ego
arrays, ready to be packed as metainfo."""
from typing import Dict

import numpy as np
import torch

from turbox_mm.registry import TRANSFORMS
from .sparse4d_adaptor import SPARSE4D_META_KEYS, NuScenesSparse4DAdaptor

#: SparseDrive's ground truth and ego inputs, carried in each sample's metainfo.
SPARSEDRIVE_KEYS = ('gt_map_labels', 'gt_map_pts', 'gt_agent_fut_trajs', 'gt_agent_fut_masks',
                    'gt_ego_fut_trajs', 'gt_ego_fut_masks', 'gt_ego_fut_cmd', 'ego_status')
#: ``meta_keys`` for ``Pack3DDetInputs`` after :class:`NuScenesSparseDriveAdaptor`.
SPARSEDRIVE_META_KEYS = SPARSE4D_META_KEYS + SPARSEDRIVE_KEYS


def _array(value, dtype) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(value, dtype=dtype))


@TRANSFORMS.register_module()
class NuScenesSparseDriveAdaptor(NuScenesSparse4DAdaptor):
    """:class:`NuScenesSparse4DAdaptor`, then SparseDrive's fields as numpy arrays.

    It takes the Sparse4D adaptor's place in the pipeline (upstream has one adaptor that
    does both), so a SparseDrive pipeline reads as upstream's: ... filters,
    ``VectorizeMap``, ``NuScenesSparseDriveAdaptor``, ``Pack3DDetInputs(meta_keys=
    SPARSEDRIVE_META_KEYS)``. Running it after ``NuScenesSparse4DAdaptor`` also works (the
    Sparse4D part is idempotent). mmdet3d's ``Pack3DDetInputs`` has no field for these keys
    (naming one in ``keys`` raises ``NotImplementedError``) and copies ``meta_keys`` into
    the data sample's metainfo unchanged, so they travel as numpy arrays and the detector
    stacks them (upstream: ``DataContainer`` s, stacked for the ego keys, lists for the
    others).

    Written (each where its source is present), with ``G`` map instances, ``n`` boxes:

    - ``gt_map_labels`` int64 ``(G,)``, ``gt_map_pts`` float32 ``(G, R, S, 2)`` (``(G, 38,
      20, 2)`` from ``VectorizeMap``); both or neither.
    - ``gt_agent_fut_trajs`` float32 ``(n, T, 2)``, ``gt_agent_fut_masks`` float32 ``(n,
      T)``, row-aligned with ``gt_labels_3d`` (required with ground-truth boxes).
    - ``gt_ego_fut_trajs`` float32 ``(T_e, 2)``, ``gt_ego_fut_masks`` float32 ``(T_e,)``,
      ``gt_ego_fut_cmd`` float32 ``(3,)``, ``ego_status`` float32 ``(10,)``.

    Upstream's SparseDrive configs set ``rot3d_range=[0, 0]``: ``BBoxRotation`` rotates
    boxes, projections and poses but not map points or trajectories. This adaptor refuses a
    sample whose ``aug_config['rotate_3d']`` is not 0 while it carries map or trajectory
    targets (``allow_rotate_3d=True`` lets it through, targets unrotated).

    Args:
        allow_rotate_3d (bool): Accept a BEV rotation with unrotated map and trajectory
            targets. Defaults to False.

    Required keys: the Sparse4D adaptor's. Optional: the keys above, ``aug_config``.

    Raises:
        KeyError: Ground-truth boxes without agent futures; map labels without points.
        ValueError: Mis-shaped or misaligned fields; a non-zero ``rotate_3d``.

    Examples:
        >>> out = NuScenesSparseDriveAdaptor()(dict(
        ...     lidar2img=[np.eye(4)], img_shape=[(256, 704)], lidar2global=np.eye(4),
        ...     cam_intrinsic=[np.eye(4)], ego_status=[0.0] * 10, gt_ego_fut_cmd=[0, 0, 1]))
        >>> out['ego_status'].dtype, out['gt_ego_fut_cmd'].tolist()
        (dtype('float32'), [0.0, 0.0, 1.0])
    """

    def __init__(self, allow_rotate_3d: bool = False) -> None:
        self.allow_rotate_3d = bool(allow_rotate_3d)

    def transform(self, results: Dict) -> Dict:
        """Add the model's arrays to ``results``.

        Args:
            results (dict): The sample.

        Returns:
            dict: ``results``, modified in place.
        """
        results = super().transform(results)
        name = type(self).__name__
        self._check_rotation(results, name)
        self._map(results, name)
        self._agents(results, name)
        self._ego(results, name)
        return results

    def _check_rotation(self, results: Dict, owner: str) -> None:
        angle = float((results.get('aug_config') or {}).get('rotate_3d', 0.0) or 0.0)
        carried = [k for k in ('gt_map_pts', 'map_annos', 'gt_agent_fut_trajs',
                               'gt_ego_fut_trajs') if k in results]
        if angle != 0.0 and carried and not self.allow_rotate_3d:
            raise ValueError(f'{owner}: rotate_3d = {angle} rotated the lidar frame, but '
                             f'{carried} are not rotated; use rot3d_range=(0, 0) as '
                             'SparseDrive\'s configs do (or allow_rotate_3d=True)')

    @staticmethod
    def _map(results: Dict, owner: str) -> None:
        has = [k in results for k in ('gt_map_labels', 'gt_map_pts')]
        if not any(has):
            return
        if not all(has):
            raise KeyError(f'{owner}: gt_map_labels and gt_map_pts come together '
                           '(VectorizeMap with permute writes both)')
        labels = _array(results['gt_map_labels'], np.int64)
        pts = _array(results['gt_map_pts'], np.float32)
        if labels.ndim != 1 or pts.ndim != 4 or pts.shape[-1] != 2 \
                or len(pts) != len(labels):
            raise ValueError(f'{owner}: gt_map_labels must be (G,) and gt_map_pts (G, R, S, '
                             f'2), got {labels.shape} and {pts.shape}')
        results['gt_map_labels'], results['gt_map_pts'] = labels, pts

    @staticmethod
    def _agents(results: Dict, owner: str) -> None:
        keys = ('gt_agent_fut_trajs', 'gt_agent_fut_masks')
        present = [k for k in keys if k in results]
        if 'gt_labels_3d' not in results and not present:
            return
        if len(present) != 2:
            raise KeyError(f'{owner}: results has {present} of {list(keys)}; with ground-'
                           'truth boxes both are needed (SparseDriveNuScenesDataset adds '
                           'them, the object filters keep them aligned)')
        trajs = _array(results['gt_agent_fut_trajs'], np.float32)
        masks = _array(results['gt_agent_fut_masks'], np.float32)
        if trajs.ndim != 3 or trajs.shape[-1] != 2 or masks.shape != trajs.shape[:2]:
            raise ValueError(f'{owner}: gt_agent_fut_trajs must be (n, T, 2) and '
                             f'gt_agent_fut_masks (n, T), got {trajs.shape} and '
                             f'{masks.shape}')
        if 'gt_labels_3d' in results and len(results['gt_labels_3d']) != len(trajs):
            raise ValueError(f'{owner}: {len(trajs)} agent futures for '
                             f'{len(results["gt_labels_3d"])} boxes; filter boxes with '
                             'CircleObjectRangeFilter / InstanceNameFilter, which keep them '
                             'aligned')
        results['gt_agent_fut_trajs'], results['gt_agent_fut_masks'] = trajs, masks

    @staticmethod
    def _ego(results: Dict, owner: str) -> None:
        shapes = dict(gt_ego_fut_cmd=(3, ), ego_status=(10, ))
        if 'gt_ego_fut_trajs' in results:
            trajs = _array(results['gt_ego_fut_trajs'], np.float32)
            if trajs.ndim != 2 or trajs.shape[1] != 2:
                raise ValueError(f'{owner}: gt_ego_fut_trajs must be (T_e, 2), got '
                                 f'{trajs.shape}')
            results['gt_ego_fut_trajs'] = trajs
            shapes['gt_ego_fut_masks'] = (len(trajs), )
        elif 'gt_ego_fut_masks' in results:
            shapes['gt_ego_fut_masks'] = (np.size(results['gt_ego_fut_masks']), )
        for key, shape in shapes.items():
            if key not in results:
                continue
            value = _array(results[key], np.float32)
            if value.shape != shape:
                raise ValueError(f'{owner}: {key} must have shape {shape}, got {value.shape}')
            results[key] = value

    def __repr__(self) -> str:
        return f'{type(self).__name__}(allow_rotate_3d={self.allow_rotate_3d})'
