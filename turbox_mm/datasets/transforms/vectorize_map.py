"""SparseDrive's map ground truth: polylines resampled by arc length, with every point order."""
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from mmcv.transforms import BaseTransform

from turbox_mm.registry import TRANSFORMS

#: SparseDrive's map classes, in its label order (MapTR's is divider, ped_crossing, boundary).
SPARSEDRIVE_MAP_CLASSES = ('ped_crossing', 'divider', 'boundary')
#: Value of the order rows an open polyline does not have.
PERMUTE_PADDING = 1e5
#: ``np.allclose`` tolerance (absolute) of upstream's closed-polyline test.
CLOSED_ATOL = 1e-3


def resample_polylines(polylines: Sequence[np.ndarray], num: int) -> np.ndarray:
    """``num`` points at ``linspace(0, length, num)`` along each polyline, all at once.

    The arc-length resampling of shapely's ``LineString.interpolate`` (what upstream calls
    per point), vectorised over every polyline of a sample: the polylines are concatenated,
    one ``searchsorted`` finds each target's segment and the points are interpolated
    linearly on it. Repeated vertices (zero-length segments) are skipped as shapely skips
    them; a polyline of length 0 gives its first point ``num`` times.

    Args:
        polylines (sequence[np.ndarray]): ``G`` float arrays ``(k_i, 2)``, ``k_i >= 2``.
        num (int): Points per polyline.

    Returns:
        np.ndarray: float64 ``(G, num, 2)``.

    Examples:
        >>> lines = [np.array([[0., 0.], [2., 0.], [2., 2.]]), np.array([[5., 5.], [5., 8.]])]
        >>> resample_polylines(lines, 3).tolist()
        [[[0.0, 0.0], [2.0, 0.0], [2.0, 2.0]], [[5.0, 5.0], [5.0, 6.5], [5.0, 8.0]]]
    """
    if len(polylines) == 0:
        return np.zeros((0, num, 2), dtype=np.float64)
    counts = np.array([len(p) for p in polylines], dtype=np.int64)
    vertices = np.concatenate([np.asarray(p, dtype=np.float64) for p in polylines])
    ends = np.cumsum(counts)
    starts = ends - counts
    steps = np.sqrt(np.sum(np.diff(vertices, axis=0) ** 2, axis=-1))
    steps[ends[:-1] - 1] = 0.0  # from one polyline's last vertex to the next one's first
    # Arc length of every vertex on one axis: each polyline's span follows the previous one.
    arc = np.concatenate([[0.0], np.cumsum(steps)])
    base = arc[starts]
    lengths = arc[ends - 1] - base
    local = lengths[:, None] * np.linspace(0.0, 1.0, num)[None, :]  # (G, num)
    targets = base[:, None] + local
    seg = np.searchsorted(arc, targets, side='right') - 1
    seg = np.clip(seg, starts[:, None], ends[:, None] - 2)  # a segment of its own polyline
    seg_len = steps[seg]
    offset = targets - arc[seg]
    frac = np.divide(offset, seg_len, out=np.zeros_like(offset), where=seg_len > 0)
    frac = np.clip(frac, 0.0, 1.0)[..., None]
    return vertices[seg] * (1.0 - frac) + vertices[seg + 1] * frac


def _order_index(num: int) -> np.ndarray:
    """``(2 * (num - 1), num)`` indices into a closed polyline's ``num - 1`` distinct points:
    rows ``k`` = ``np.roll(points, k)`` and rows ``num - 1 + k`` = ``np.roll(points[::-1],
    k)``, each followed by its own first index (re-closed)."""
    distinct = num - 1
    shift = np.arange(distinct)[:, None]
    rolled = (np.arange(distinct)[None, :] - shift) % distinct
    index = np.concatenate([rolled, distinct - 1 - rolled])
    return np.concatenate([index, index[:, :1]], axis=1)


def permute_orders(points: np.ndarray, padding: float = PERMUTE_PADDING) -> np.ndarray:
    """Every equivalent point order of resampled polylines (upstream's ``permute_line``).

    A polyline is closed when its first and last points are ``np.allclose`` (atol 1e-3,
    numpy's default rtol, as upstream). Closed: its ``S - 1`` distinct points rolled by
    ``0 .. S - 2``, then the reversed points rolled the same way, each re-closed with its
    first point: ``2 (S - 1)`` orders. Open: forwards, backwards, then ``2 (S - 1) - 2`` rows
    of ``padding`` (far from any prediction, so never the cheapest order).

    Args:
        points (np.ndarray): ``(G, S, 2)``.
        padding (float): Fill of an open polyline's missing orders. Defaults to 1e5.

    Returns:
        np.ndarray: float64 ``(G, 2 (S - 1), S, 2)``.

    Examples:
        >>> ring = np.array([[[0., 0.], [1., 0.], [2., 0.], [0., 0.]]])  # x = 0 1 2 0
        >>> permute_orders(ring)[0, :, :, 0].astype(int).tolist()
        [[0, 1, 2, 0], [2, 0, 1, 2], [1, 2, 0, 1], [2, 1, 0, 2], [0, 2, 1, 0], [1, 0, 2, 1]]
        >>> permute_orders(ring[:, :3])[0, 2:, 0, 0].tolist()
        [100000.0, 100000.0]
    """
    points = np.asarray(points, dtype=np.float64)
    num_lines, num = points.shape[:2]
    rows = 2 * (num - 1)
    out = np.full((num_lines, rows, num, 2), padding, dtype=np.float64)
    if num_lines == 0:
        return out
    closed = np.isclose(points[:, 0], points[:, -1], atol=CLOSED_ATOL).all(axis=-1)
    out[~closed, 0] = points[~closed]
    out[~closed, 1] = points[~closed, ::-1]
    if closed.any():
        out[closed] = points[closed][:, _order_index(num)]
    return out


def _clip_to_roi(points: np.ndarray, half_x: float, half_y: float) -> List[np.ndarray]:
    """The pieces of a polyline inside ``|x| <= half_x, |y| <= half_y`` (shapely)."""
    if (np.abs(points[:, 0]) <= half_x).all() and (np.abs(points[:, 1]) <= half_y).all():
        return [points]
    from shapely.geometry import LineString, box
    clipped = LineString(points).intersection(box(-half_x, -half_y, half_x, half_y))
    parts = getattr(clipped, 'geoms', [clipped])
    return [np.asarray(p.coords, dtype=np.float64) for p in parts
            if p.geom_type == 'LineString' and not p.is_empty and p.length > 0]


@TRANSFORMS.register_module()
class VectorizeMap(BaseTransform):
    """Turn a sample's map polylines into SparseDrive's map targets (upstream's
    ``VectorizeMap``, same numbers, vectorised).

    Reads ``results[map_key]``, the info's ``map_annos``: a dict from class to a list of
    polylines (``(k, 2)`` or ``(k, 3)`` arrays or nested lists, shapely ``LineString`` s;
    shapely ``Polygon`` s are skipped, as upstream). Classes are keyed by name (our
    synthetic and MapTR infos: ``'divider'``, ``'ped_crossing'``, ``'boundary'``) or by
    label (upstream's converter: ``{0: ped_crossing, 1: divider, 2: boundary}``); names are
    mapped to their index in ``map_classes``, ints are taken as that index. Polylines are
    taken in label order, then in their input order.

    Training (``simplify=False``, ``permute`` on): each polyline is resampled to
    ``sample_num`` points by arc length (:func:`resample_polylines`, equal to shapely's
    ``interpolate`` to rounding) and expanded to its ``2 (sample_num - 1)`` point orders
    (:func:`permute_orders`). Writes ``gt_map_labels`` int64 ``(G,)`` and ``gt_map_pts``
    float32 ``(G, 2 (sample_num - 1), sample_num, 2)`` (``(G, 38, 20, 2)`` by default;
    ``G = 0`` gives ``(0, 38, 20, 2)``), in metres of the lidar frame unless ``normalize``.

    Evaluation (``simplify=True``): each polyline simplified with shapely's
    ``simplify(simplify_tolerance, preserve_topology=True)``, not resampled; writes
    ``vectors``: ``{label: [float64 (k, 2), ...]}`` with every label of ``map_classes``
    (upstream wraps it in a ``DataContainer``). With ``simplify=False, permute=False``,
    ``vectors`` holds the resampled ``(sample_num, 2)`` polylines instead.

    Upstream's ``VectorizeMap`` does not cut polylines to the ROI (its converter clips the
    map to the 30 x 60 m patch, and so does our synthetic generator); ``roi_size`` only
    feeds ``normalize``. ``clip_to_roi=True`` (ours, off by default) cuts each polyline to
    ``|x| <= roi_size[0] / 2, |y| <= roi_size[1] / 2`` first, each piece left becoming a
    polyline of its own, for infos that were not clipped. Upstream's ``sample_dist``
    resampling and ``coords_dim=3`` are not ported (SparseDrive uses neither).

    Args:
        map_classes (sequence[str]): Class names in label order. Defaults to
            :data:`SPARSEDRIVE_MAP_CLASSES`.
        roi_size (tuple[float, float]): ``(x extent, y extent)`` in metres. Defaults to
            (30, 60).
        normalize (bool): Map points to ``(x + X / 2) / (X + 1e-5)``, ``(y + Y / 2) / (Y +
            1e-5)`` (padding rows stay 1e5), as upstream. Defaults to False.
        simplify (bool): The evaluation variant. Defaults to False.
        sample_num (int): Points per resampled polyline, >= 2. Defaults to 20.
        permute (bool, optional): Write ``gt_map_labels`` / ``gt_map_pts`` with every order.
            Defaults to ``not simplify`` (True with ``simplify`` is an error).
        clip_to_roi (bool): Cut polylines to the ROI first. Defaults to False.
        simplify_tolerance (float): Metres. Defaults to 0.2.
        map_key (str): Key of the polylines in ``results``. Defaults to 'map_annos'.

    Required keys: ``map_key``. Added keys: ``gt_map_labels``, ``gt_map_pts`` (``permute``)
    or ``vectors``.

    Raises:
        KeyError: ``results`` has no ``map_key``; a class name not in ``map_classes``.
        ValueError: A label out of range, a polyline with fewer than 2 points, of the wrong
            shape or with non-finite coordinates; bad arguments.
        TypeError: ``map_annos`` is not a dict, or holds an unsupported geometry.

    Examples:
        >>> t = VectorizeMap(sample_num=4)
        >>> out = t(dict(map_annos=dict(divider=[[[0., 0.], [0., 3.]]], ped_crossing=[])))
        >>> out['gt_map_labels'].tolist(), out['gt_map_pts'].shape
        ([1], (1, 6, 4, 2))
        >>> out['gt_map_pts'][0, 1, :, 1].tolist()  # the reversed order
        [3.0, 2.0, 1.0, 0.0]
    """

    def __init__(self,
                 map_classes: Sequence[str] = SPARSEDRIVE_MAP_CLASSES,
                 roi_size: Tuple[float, float] = (30.0, 60.0),
                 normalize: bool = False,
                 simplify: bool = False,
                 sample_num: int = 20,
                 permute: Optional[bool] = None,
                 clip_to_roi: bool = False,
                 simplify_tolerance: float = 0.2,
                 map_key: str = 'map_annos') -> None:
        if isinstance(map_classes, str) or len(map_classes) == 0:
            raise ValueError(f'VectorizeMap: map_classes must be a non-empty sequence of '
                             f'names, got {map_classes!r}')
        if permute is None:
            permute = not simplify
        if simplify and permute:
            raise ValueError('VectorizeMap: simplify=True (evaluation) writes vectors and '
                             'cannot permute; pass permute=False')
        if isinstance(sample_num, bool) or not isinstance(sample_num, (int, np.integer)) \
                or sample_num < 2:
            raise ValueError(f'VectorizeMap: sample_num must be an int >= 2, got '
                             f'{sample_num!r}')
        roi = np.asarray(roi_size, dtype=np.float64).reshape(-1)
        if roi.shape != (2, ) or (roi <= 0).any():
            raise ValueError(f'VectorizeMap: roi_size must be two positive extents, got '
                             f'{roi_size!r}')
        self.map_classes = tuple(map_classes)
        self.class_index = {name: i for i, name in enumerate(self.map_classes)}
        self.roi_size = roi
        self.normalize = bool(normalize)
        self.simplify = bool(simplify)
        self.sample_num = int(sample_num)
        self.permute = bool(permute)
        self.clip_to_roi = bool(clip_to_roi)
        self.simplify_tolerance = float(simplify_tolerance)
        self.map_key = map_key

    # -- input ------------------------------------------------------------------------------

    def _label(self, key) -> int:
        if isinstance(key, str):
            if key not in self.class_index:
                raise KeyError(f'VectorizeMap: unknown map class {key!r} in {self.map_key}; '
                               f'map_classes are {list(self.map_classes)}')
            return self.class_index[key]
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            if not 0 <= int(key) < len(self.map_classes):
                raise ValueError(f'VectorizeMap: map label {int(key)} in {self.map_key} is '
                                 f'outside [0, {len(self.map_classes)}) '
                                 f'(map_classes {list(self.map_classes)})')
            return int(key)
        raise KeyError(f'VectorizeMap: {self.map_key} keys must be class names or int '
                       f'labels, got {key!r}')

    def _polyline(self, geom, where: str) -> Optional[np.ndarray]:
        kind = getattr(geom, 'geom_type', None)
        if kind == 'Polygon':
            return None  # upstream does not vectorise polygons
        if kind is not None and kind != 'LineString':
            raise TypeError(f'VectorizeMap: {where} is a {kind}; map geometries must be '
                            'LineStrings (or Polygons, skipped)')
        points = np.asarray(geom.coords if kind else geom, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] not in (2, 3):
            raise ValueError(f'VectorizeMap: {where} must be a (k, 2) or (k, 3) polyline, '
                             f'got shape {points.shape}')
        if len(points) < 2:
            raise ValueError(f'VectorizeMap: {where} has {len(points)} point(s); a polyline '
                             'needs at least 2')
        if not np.isfinite(points).all():
            raise ValueError(f'VectorizeMap: {where} has non-finite coordinates')
        return points[:, :2]

    def read_polylines(self, map_annos: Mapping) -> Tuple[List[np.ndarray], np.ndarray]:
        """The polylines of ``map_annos`` and their labels, in label order.

        Args:
            map_annos (Mapping): Class name or label -> polylines.

        Returns:
            tuple[list[np.ndarray], np.ndarray]: float64 ``(k_i, 2)`` polylines and their
            int64 labels ``(G,)``.
        """
        if not isinstance(map_annos, Mapping):
            raise TypeError(f'VectorizeMap: {self.map_key} must be a dict of class -> '
                            f'polylines, got {type(map_annos).__name__}')
        by_label: Dict[int, List[np.ndarray]] = {}
        for key, geoms in map_annos.items():
            label = self._label(key)
            lines = by_label.setdefault(label, [])
            for i, geom in enumerate(geoms):
                points = self._polyline(geom, f'{self.map_key}[{key!r}][{i}]')
                if points is None:
                    continue
                if self.clip_to_roi:
                    lines.extend(_clip_to_roi(points, *(self.roi_size / 2)))
                else:
                    lines.append(points)
        polylines, labels = [], []
        for label in sorted(by_label):
            polylines += by_label[label]
            labels += [label] * len(by_label[label])
        return polylines, np.array(labels, dtype=np.int64)

    # -- output -----------------------------------------------------------------------------

    def _normalized(self, points: np.ndarray) -> np.ndarray:
        if not self.normalize:
            return points
        return (points + self.roi_size / 2) / (self.roi_size + 1e-5)

    def transform(self, results: Dict) -> Dict:
        """Add the map targets of ``results``.

        Args:
            results (dict): The sample.

        Returns:
            dict: ``results``, modified in place.
        """
        if self.map_key not in results:
            raise KeyError(f'VectorizeMap: results has no {self.map_key!r} (the infos\' '
                           'map polylines; SparseDriveNuScenesDataset passes them on)')
        polylines, labels = self.read_polylines(results[self.map_key])
        if self.simplify:
            from shapely.geometry import LineString
            lines = [np.asarray(LineString(p).simplify(self.simplify_tolerance,
                                                       preserve_topology=True).coords,
                                dtype=np.float64) for p in polylines]
            results['vectors'] = self._by_label([self._normalized(p) for p in lines], labels)
            return results
        points = self._normalized(resample_polylines(polylines, self.sample_num))
        if not self.permute:
            results['vectors'] = self._by_label(list(points), labels)
            return results
        results['gt_map_labels'] = labels
        results['gt_map_pts'] = permute_orders(points).astype(np.float32)
        return results

    def _by_label(self, lines: List[np.ndarray], labels: np.ndarray) -> Dict[int, list]:
        vectors: Dict[int, list] = {i: [] for i in range(len(self.map_classes))}
        for line, label in zip(lines, labels.tolist()):
            vectors[label].append(line)
        return vectors

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(map_classes={list(self.map_classes)}, '
                f'roi_size={self.roi_size.tolist()}, normalize={self.normalize}, '
                f'simplify={self.simplify}, sample_num={self.sample_num}, '
                f'permute={self.permute}, clip_to_roi={self.clip_to_roi})')
