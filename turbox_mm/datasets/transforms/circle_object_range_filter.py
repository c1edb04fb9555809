"""Sparse4D's per-class circular (BEV radius) filter of the ground-truth boxes."""
from typing import Dict, Sequence

import numpy as np
import torch
from mmcv.transforms import BaseTransform

from turbox_mm.registry import TRANSFORMS

#: Upstream's default radii (m) per Sparse4D class, used when none are given.
DEFAULT_CLASS_DIST = (52.5, ) * 5 + (31.5, ) + (42.0, ) * 3 + (31.5, )
#: Per-instance keys filtered along with ``gt_bboxes_3d`` (each where present).
INSTANCE_KEYS = ('gt_labels_3d', 'instance_id', 'gt_agent_fut_trajs', 'gt_agent_fut_masks')


def box_array(boxes, owner: str) -> np.ndarray:
    """The ``(n, d)`` numbers of ``boxes`` as a numpy array (a view where possible).

    Args:
        boxes: mmdet3d ``BaseInstance3DBoxes``, a tensor or an array of shape ``(n, d)``.
        owner (str): The caller, for the error message.

    Returns:
        np.ndarray: ``(n, d)``.
    """
    data = getattr(boxes, 'tensor', boxes)
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] < 7:
        raise ValueError(f'{owner}: gt_bboxes_3d must be (n, >=7), got shape {data.shape}')
    return data


def filter_instances(results: Dict, keep: np.ndarray, owner: str) -> Dict:
    """Keep the ground truths where ``keep`` is True in every per-instance key.

    ``gt_bboxes_3d`` (boxes object, tensor or array), ``gt_labels_3d`` and, when present,
    ``instance_id`` and SparseDrive's agent futures (``gt_agent_fut_trajs`` ``(n, T, 2)``,
    ``gt_agent_fut_masks`` ``(n, T)``) are filtered by the same mask, so they stay aligned.

    Args:
        results (dict): The sample.
        keep (np.ndarray): bool ``(n,)``.
        owner (str): The caller, for error messages.

    Returns:
        dict: ``results``, modified in place.

    Examples:
        >>> results = dict(gt_bboxes_3d=np.zeros((3, 9)), gt_labels_3d=np.array([0, -1, 2]),
        ...                instance_id=np.array([7, 8, 9]))
        >>> out = filter_instances(results, np.array([True, False, True]), 'demo')
        >>> out['gt_labels_3d'].tolist(), out['instance_id'].tolist()
        ([0, 2], [7, 9])
    """
    keep = np.asarray(keep, dtype=bool).reshape(-1)
    num_boxes = len(getattr(results['gt_bboxes_3d'], 'tensor', results['gt_bboxes_3d']))
    if num_boxes != len(keep):
        raise ValueError(f'{owner}: a mask of {len(keep)} for {num_boxes} boxes')
    for key in INSTANCE_KEYS:
        if key in results and len(results[key]) != len(keep):
            raise ValueError(f'{owner}: {key} has {len(results[key])} entries for '
                             f'{len(keep)} boxes in gt_bboxes_3d')
    boxes = results['gt_bboxes_3d']
    if isinstance(boxes, np.ndarray):
        results['gt_bboxes_3d'] = boxes[keep]
    else:
        data = getattr(boxes, 'tensor', boxes)
        results['gt_bboxes_3d'] = boxes[torch.from_numpy(keep).to(data.device)]
    for key in INSTANCE_KEYS:
        if key not in results:
            continue
        value = results[key]
        if isinstance(value, torch.Tensor):
            results[key] = value[torch.from_numpy(keep).to(value.device)]
        else:
            results[key] = np.asarray(value)[keep]
    return results


def labels_array(results: Dict) -> np.ndarray:
    """``results['gt_labels_3d']`` as an int64 numpy array."""
    labels = results['gt_labels_3d']
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    return np.asarray(labels, dtype=np.int64).reshape(-1)


@TRANSFORMS.register_module()
class CircleObjectRangeFilter(BaseTransform):
    """Keep a ground truth of class ``c`` when its BEV distance is at most ``dist[c]``.

    Sparse4D v3's range filter: the distance is ``sqrt(x^2 + y^2)`` of the box centre in the
    (augmented, so run it after ``BBoxRotation``) lidar frame. Labels outside
    ``[0, len(class_dist_thred))`` (e.g. -1) are dropped, as upstream.
    ``gt_bboxes_3d``, ``gt_labels_3d``, ``instance_id`` and SparseDrive's
    ``gt_agent_fut_trajs`` / ``gt_agent_fut_masks`` (each where present) are filtered
    together.

    Args:
        class_dist_thred (sequence[float]): Radius (m) per class index. Defaults to
            upstream's ``[52.5] * 5 + [31.5] + [42] * 3 + [31.5]``; the v3 config uses
            ``[55] * 10``.

    Required keys: ``gt_bboxes_3d`` (mmdet3d boxes, tensor or ``(n, >=7)`` array),
    ``gt_labels_3d``. Modified keys: those, ``instance_id``, ``gt_agent_fut_trajs`` and
    ``gt_agent_fut_masks`` (when present).

    Examples:
        >>> results = dict(gt_bboxes_3d=np.array([[30., 40, 0, 1, 1, 1, 0],
        ...                                       [3., 4, 0, 1, 1, 1, 0]]),
        ...                gt_labels_3d=np.array([0, 0]), instance_id=np.array([5, 6]))
        >>> out = CircleObjectRangeFilter([49.0] * 10)(results)
        >>> out['instance_id'].tolist()
        [6]
    """

    def __init__(self, class_dist_thred: Sequence[float] = DEFAULT_CLASS_DIST) -> None:
        self.class_dist_thred = np.asarray(class_dist_thred, dtype=np.float64).reshape(-1)
        if len(self.class_dist_thred) == 0:
            raise ValueError('CircleObjectRangeFilter: class_dist_thred is empty')

    def transform(self, results: Dict) -> Dict:
        """Filter the ground truths of ``results``.

        Args:
            results (dict): The sample.

        Returns:
            dict: ``results``, modified in place.
        """
        if 'gt_bboxes_3d' not in results:
            return results
        name = type(self).__name__
        boxes = box_array(results['gt_bboxes_3d'], name)
        labels = labels_array(results)
        if len(labels) != len(boxes):
            raise ValueError(f'{name}: {len(labels)} gt_labels_3d for {len(boxes)} boxes')
        dist = np.sqrt(np.sum(boxes[:, :2].astype(np.float64)**2, axis=-1))
        valid = (labels >= 0) & (labels < len(self.class_dist_thred))
        radius = np.full(len(labels), -1.0)
        radius[valid] = self.class_dist_thred[labels[valid]]
        keep = valid & (dist <= radius)
        return filter_instances(results, keep, name)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(class_dist_thred={self.class_dist_thred.tolist()})'
