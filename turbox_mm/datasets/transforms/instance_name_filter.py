"""Sparse4D's filter that keeps the ground truths of the trained classes."""
from typing import Dict, Sequence

import numpy as np  # noqa: F401 (the doctest uses it)
from mmcv.transforms import BaseTransform

from turbox_mm.registry import TRANSFORMS
from .circle_object_range_filter import filter_instances, labels_array


@TRANSFORMS.register_module()
class InstanceNameFilter(BaseTransform):
    """Keep the ground truths whose label indexes ``classes``; instance ids stay aligned.

    Labels are indices into ``classes`` (the dataset's ``metainfo['classes']``), so a
    ground truth is kept when ``0 <= label < len(classes)``: mmdet3d labels the classes
    outside the configured ones -1, and those are dropped. ``gt_bboxes_3d``,
    ``gt_labels_3d`` and, when present, ``instance_id`` and SparseDrive's
    ``gt_agent_fut_trajs`` / ``gt_agent_fut_masks`` are filtered together, which mmdet3d's
    ``ObjectNameFilter`` does not do for the last three.

    Args:
        classes (sequence[str]): The trained classes.

    Required keys: ``gt_bboxes_3d``, ``gt_labels_3d``. Modified keys: those,
    ``instance_id``, ``gt_agent_fut_trajs`` and ``gt_agent_fut_masks`` (when present).

    Examples:
        >>> results = dict(gt_bboxes_3d=np.zeros((3, 9)), gt_labels_3d=np.array([1, -1, 0]),
        ...                instance_id=np.array([4, 5, 6]))
        >>> InstanceNameFilter(['car', 'truck'])(results)['instance_id'].tolist()
        [4, 6]
    """

    def __init__(self, classes: Sequence[str]) -> None:
        if isinstance(classes, str) or len(classes) == 0:
            raise ValueError(f'InstanceNameFilter: classes must be a non-empty sequence of '
                             f'names, got {classes!r}')
        self.classes = tuple(classes)

    def transform(self, results: Dict) -> Dict:
        """Filter the ground truths of ``results``.

        Args:
            results (dict): The sample.

        Returns:
            dict: ``results``, modified in place.
        """
        if 'gt_labels_3d' not in results:
            return results
        labels = labels_array(results)
        keep = (labels >= 0) & (labels < len(self.classes))
        return filter_instances(results, keep, type(self).__name__)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(classes={list(self.classes)})'
