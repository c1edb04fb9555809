"""The anchors of Sparse4D's instance bank: k-means centres of the training boxes.

The recipe of upstream's anchor tool (docs/design/sparse4d.md, 1.4): gather every training box
(``[x, y, z, l, w, h, yaw]``, gravity centre, lidar frame), keep those whose centre lies within
``radius`` metres (3-D norm), cluster the centres with k-means into ``num_anchors`` clusters;
each anchor is a cluster centre with the logarithm of the mean box size over all boxes, yaw 0
(sin 0, cos 1) and no velocity. ``tools/sparse4d_anchors.py`` writes the ``.npy`` file.
"""
import pickle
from typing import Union

import numpy as np

from .box3d import COS_YAW, SIZE_X, SIZE_Z, STATE_DIM, X, Z


def gather_boxes(infos: Union[str, dict]) -> np.ndarray:
    """All valid boxes ``[M, 7]`` of an mmdet3d v2 info file (or its loaded dict).

    Args:
        infos (str | dict): Path of a ``.pkl`` info file, or its content.

    Returns:
        np.ndarray: float64 ``[M, 7]``.

    Raises:
        KeyError: The file is not in mmdet3d's v2 format (no ``data_list``); names the file.
    """
    name = infos if isinstance(infos, str) else '<infos>'
    if isinstance(infos, str):
        with open(infos, 'rb') as f:
            infos = pickle.load(f)
    if 'data_list' not in infos:
        raise KeyError(f'{name}: no data_list; expected mmdet3d 1.x (v2) infos '
                       '(tools/create_data.py)')
    boxes = [inst['bbox_3d'] for sample in infos['data_list']
             for inst in sample.get('instances', []) if inst.get('bbox_3d_isvalid', True)]
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 7)


def kmeans_anchors(boxes: np.ndarray, num_anchors: int = 900, radius: float = 55.0,
                   seed: int = 0) -> np.ndarray:
    """Anchors ``[num_anchors, 11]`` from boxes ``[M, 7]``.

    Args:
        boxes (np.ndarray): ``[M, 7]`` boxes (``x, y, z, l, w, h, yaw``).
        num_anchors (int): Clusters. Defaults to 900 (Sparse4D v3).
        radius (float): Boxes whose centre is farther (3-D) are left out. Defaults to 55.
        seed (int): k-means seed; the same seed gives the same anchors. Defaults to 0.

    Returns:
        np.ndarray: float32 ``[num_anchors, 11]``.

    Raises:
        ValueError: Fewer boxes within ``radius`` than ``num_anchors``.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> boxes = np.concatenate([rng.uniform(-30, 30, (50, 3)), np.ones((50, 3)),
        ...                         np.zeros((50, 1))], axis=1)
        >>> kmeans_anchors(boxes, num_anchors=8).shape
        (8, 11)
    """
    try:
        from sklearn.cluster import KMeans
    except ImportError as exc:  # pragma: no cover - scikit-learn comes with mmdet3d's deps
        raise ImportError('kmeans_anchors needs scikit-learn (pip install scikit-learn)') from exc
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    kept = boxes[np.linalg.norm(boxes[:, :3], axis=1) <= radius]
    if len(kept) < num_anchors:
        raise ValueError(f'kmeans_anchors: {len(kept)} boxes lie within {radius} m, fewer than '
                         f'the {num_anchors} anchors asked for')
    centres = KMeans(n_clusters=num_anchors, n_init=1, random_state=seed).fit(
        kept[:, :3]).cluster_centers_
    anchors = np.zeros((num_anchors, STATE_DIM), dtype=np.float64)
    anchors[:, X:Z + 1] = centres
    anchors[:, SIZE_X:SIZE_Z + 1] = np.log(kept[:, 3:6].mean(axis=0))
    anchors[:, COS_YAW] = 1.0
    return anchors.astype(np.float32)
