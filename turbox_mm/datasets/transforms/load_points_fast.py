"""Multi-sweep lidar loading into one preallocated buffer (turbox twin)."""
import os
from typing import Dict, List, Optional, Union

import mmengine
import numpy as np
import torch
from mmcv.transforms import BaseTransform
from mmengine.fileio import get, get_file_backend

from turbox_mm.registry import TRANSFORMS


def _write_numpy(rotated: np.ndarray, rows: np.ndarray, cols: np.ndarray, shift: np.ndarray,
                 dt: float, out: np.ndarray) -> None:
    """Write the ``cols`` of one transformed sweep into ``out`` (the reference for numba).

    As stock: ``xyz = float32(rotated)``, then ``float32(float64(xyz) - shift)``; column 4 is
    ``float32(dt)``; other columns are copied from ``rows``.
    """
    for k, c in enumerate(cols):
        if c < 3:
            out[:, k] = rotated[:, c].astype(np.float32).astype(np.float64) - shift[c]
        elif c == 4:
            out[:, k] = dt
        else:
            out[:, k] = rows[:, c]


def _write_kernel(rotated, rows, cols, shift, dt, out):  # pragma: no cover - numba compiles
    """:func:`_write_numpy` as one loop, for numba."""
    dt32 = np.float32(dt)
    for i in range(rotated.shape[0]):
        for k in range(cols.shape[0]):
            c = cols[k]
            if c < 3:
                out[i, k] = np.float32(np.float64(np.float32(rotated[i, c])) - shift[c])
            elif c == 4:
                out[i, k] = dt32
            else:
                out[i, k] = rows[i, c]


_compiled = {}


def _sweep_writer():
    """The numba-compiled :func:`_write_kernel`, or None without numba."""
    if 'kernel' not in _compiled:
        try:
            import numba
        except ImportError:  # pragma: no cover - numba is a dependency
            _compiled['kernel'] = None
        else:
            _compiled['kernel'] = numba.njit(cache=True, nogil=True)(_write_kernel)
    return _compiled['kernel']


@TRANSFORMS.register_module()
class LoadPointsFromMultiSweepsFast(BaseTransform):
    """Load the previous lidar sweeps as mmdet3d's ``LoadPointsFromMultiSweeps`` does, faster.

    Same arguments, same random draws (``np.random.choice`` on the global generator, called
    exactly when stock calls it) and bit-identical points. The stock transform makes about
    eight copies of every sweep (the file's bytes, ``np.copy``, float64 temporaries of the
    transform, a tensor per sweep and its clone, ``torch.cat`` and its clone, the column
    selection and its clone). Here each local sweep file is read into a reused scratch
    buffer (``readinto``; other mmengine backends and ``.npy`` files go through ``get``), its
    rotation is the very numpy expression stock evaluates, on rows of the same layout (so
    the float64 rounding is the same), and one pass (numba, or numpy) subtracts the translation,
    rounds as stock does, writes the time lag and gathers the ``use_dim`` columns straight
    into the output, which becomes the points' tensor without a further copy.

    Semantics (those of mmdet3d 1.4): the key frame's column 4 is set to 0; with
    ``lidar_sweeps`` absent, ``pad_empty_sweeps`` repeats the key frame ``sweeps_num`` times;
    otherwise all sweeps are used when there are at most ``sweeps_num``, the first
    ``sweeps_num`` in ``test_mode``, else a random choice without replacement. Each sweep's
    points (optionally without those within 1 m in x and y, ``remove_close``) are moved
    into the key frame with ``p @ R - t`` (``R, t`` from the sweep's ``lidar2sensor``, as
    stock), and column 4 becomes ``timestamp - sweep['timestamp']``. Finally ``use_dim``
    columns are kept.

    Args:
        sweeps_num (int): Number of sweeps. Defaults to 10.
        load_dim (int): Values per point in the files. Defaults to 5.
        use_dim (list[int] | int): Columns to keep. Defaults to [0, 1, 2, 4].
        backend_args (dict, optional): mmengine file backend arguments. Defaults to None.
        pad_empty_sweeps (bool): Repeat the key frame when there are no sweeps.
            Defaults to False.
        remove_close (bool): Drop sweep points within 1 m of the origin in x and y.
            Defaults to False.
        test_mode (bool): Take the nearest sweeps instead of a random choice.
            Defaults to False.
        use_numba (bool): Write the transformed sweeps with a numba kernel (numpy
            otherwise; the results are equal). Defaults to True.

    Required keys: ``points`` (:obj:`BasePoints`, at least 5 columns), ``timestamp``,
    ``lidar_sweeps`` (optional: list of dicts with ``timestamp`` and ``lidar_points`` =
    dict(``lidar_path``, ``lidar2sensor``)).

    Modified keys: ``points``.

    Examples:
        >>> import numpy as np
        >>> from mmdet3d.structures import LiDARPoints
        >>> t = LoadPointsFromMultiSweepsFast(sweeps_num=2, pad_empty_sweeps=True)
        >>> points = LiDARPoints(np.ones((4, 5), np.float32), points_dim=5)
        >>> out = t(dict(points=points, timestamp=1.0))
        >>> out['points'].tensor.shape
        torch.Size([12, 4])
    """

    def __init__(self,
                 sweeps_num: int = 10,
                 load_dim: int = 5,
                 use_dim: Union[int, List[int]] = [0, 1, 2, 4],
                 backend_args: Optional[dict] = None,
                 pad_empty_sweeps: bool = False,
                 remove_close: bool = False,
                 test_mode: bool = False,
                 use_numba: bool = True) -> None:
        if isinstance(use_dim, int):
            use_dim = list(range(use_dim))
        if max(use_dim) >= load_dim:
            raise ValueError(f'{type(self).__name__}: expect all used dimensions < '
                             f'{load_dim}, got {use_dim}')
        self.sweeps_num = sweeps_num
        self.load_dim = load_dim
        self.use_dim = list(use_dim)
        self.backend_args = backend_args
        self.pad_empty_sweeps = pad_empty_sweeps
        self.remove_close = remove_close
        self.test_mode = test_mode
        self.use_numba = use_numba

    @staticmethod
    def _close_mask(points: np.ndarray, radius: float = 1.0) -> np.ndarray:
        """True for the points to keep (stock's ``_remove_close`` test)."""
        x_filt = np.abs(points[:, 0]) < radius
        y_filt = np.abs(points[:, 1]) < radius
        return np.logical_not(np.logical_and(x_filt, y_filt))

    def _is_local(self, path: str) -> bool:
        if self.backend_args is not None or path.endswith('.npy'):
            return False
        try:
            return type(get_file_backend(path)).__name__ == 'LocalBackend'
        except Exception:  # noqa: BLE001  (unknown prefix: let get() report it)
            return False

    def _sizes(self, paths: List[str]) -> List[Optional[int]]:
        """Number of points of each local file (None: read it through ``get``)."""
        row = 4 * self.load_dim
        sizes = []
        for path in paths:
            if not self._is_local(path):
                sizes.append(None)
                continue
            try:
                nbytes = os.path.getsize(path)
            except OSError as e:
                raise FileNotFoundError(f'{type(self).__name__}: cannot read sweep {path}: '
                                        f'{e}') from e
            if nbytes % row:
                raise ValueError(f'{type(self).__name__}: {path} holds {nbytes} bytes, not a '
                                 f'whole number of {self.load_dim} float32 values per point')
            sizes.append(nbytes // row)
        return sizes

    def _load_other(self, path: str) -> np.ndarray:
        """A sweep through mmengine's backends (stock's ``_load_points``), as (N, load_dim)."""
        try:
            points = np.frombuffer(get(path, backend_args=self.backend_args), np.float32)
        except ConnectionError:
            mmengine.check_file_exist(path)
            points = (np.load(path) if path.endswith('.npy') else
                      np.fromfile(path, dtype=np.float32))
        return points.reshape(-1, self.load_dim)

    @staticmethod
    def _read_into(path: str, out: np.ndarray) -> None:
        view = memoryview(out.reshape(-1).view(np.uint8))
        with open(path, 'rb', buffering=0) as f:
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise ValueError(f'LoadPointsFromMultiSweepsFast: {path} ended early')
                done += n

    def transform(self, results: Dict) -> Dict:
        """Load the sweeps and concatenate them to the key frame's points.

        Args:
            results (dict): The sample; see the class docstring for the keys.

        Returns:
            dict: ``results`` with ``points`` replaced.
        """
        points = results['points']
        points.tensor[:, 4] = 0
        key = points.tensor.numpy()
        cols = np.asarray(self.use_dim, np.int64)

        if 'lidar_sweeps' not in results:
            parts = []
            if self.pad_empty_sweeps:
                pad = key[self._close_mask(key)] if self.remove_close else key
                parts = [pad] * self.sweeps_num
            out = np.empty((len(key) + sum(len(p) for p in parts), len(cols)), np.float32)
            start = 0
            for part in [key] + parts:
                np.take(part, cols, axis=1, out=out[start:start + len(part)])
                start += len(part)
            return self._finish(results, points, out)

        sweeps = results['lidar_sweeps']
        if len(sweeps) <= self.sweeps_num:
            choices = np.arange(len(sweeps))
        elif self.test_mode:
            choices = np.arange(self.sweeps_num)
        else:
            choices = np.random.choice(len(sweeps), self.sweeps_num, replace=False)
        chosen = [sweeps[idx] for idx in choices]
        paths = [s['lidar_points']['lidar_path'] for s in chosen]
        sizes = self._sizes(paths)
        loaded = [None if n is not None else self._load_other(p) for p, n in zip(paths, sizes)]
        counts = [n if n is not None else len(arr) for n, arr in zip(sizes, loaded)]

        out = np.empty((len(key) + sum(counts), len(cols)), np.float32)
        np.take(key, cols, axis=1, out=out[:len(key)])
        filled = len(key)
        write = _sweep_writer() if self.use_numba else None
        ts = results['timestamp']
        for sweep, path, count, arr in zip(chosen, paths, counts, loaded):
            if arr is None:
                rows = self._scratch(count)
                self._read_into(path, rows)
            else:
                rows = arr
            if self.remove_close:
                rows = rows[self._close_mask(rows)]
            # The rotation is stock's very expression on an array of the same dtype, shape
            # and strides ((n, load_dim) float32 rows), so numpy computes it the same way
            # (float64, BLAS) and rounds the same; the rest is elementwise.
            lidar2sensor = np.array(sweep['lidar_points']['lidar2sensor'])
            rotated = rows[:, :3] @ lidar2sensor[:3, :3]
            shift = np.ascontiguousarray(lidar2sensor[:3, 3], dtype=np.float64)
            dst = out[filled:filled + len(rows)]
            dt = float(ts - sweep['timestamp'])
            if write is not None:
                write(rotated, rows, cols, shift, dt, dst)
            else:
                _write_numpy(rotated, rows, cols, shift, dt, dst)
            filled += len(rows)
        return self._finish(results, points, out[:filled])

    def _scratch(self, count: int) -> np.ndarray:
        """A reused ``(count, load_dim)`` float32 buffer (no page faults after the first)."""
        buf = getattr(self, '_buffer', None)
        if buf is None or len(buf) < count:
            buf = np.empty((max(count, int(len(buf) * 1.25) if buf is not None else 0),
                            self.load_dim), np.float32)
            self._buffer = buf
        return buf[:count]

    def _finish(self, results: Dict, points, out: np.ndarray) -> Dict:
        """Wrap ``out`` as the new points, of the key frame's class."""
        new = type(points)(
            torch.empty((0, out.shape[1])), points_dim=out.shape[1],
            attribute_dims=self._attribute_dims(points))
        new.tensor = torch.from_numpy(out)  # the constructor would clone: ``out`` is ours
        results['points'] = new
        return results

    def _attribute_dims(self, points) -> Optional[dict]:
        """``attribute_dims`` after stock's ``points[:, use_dim]``."""
        if points.attribute_dims is None:
            return None
        keep = set(self.use_dim).intersection(range(3, points.tensor.shape[1]))
        dims = dict(points.attribute_dims)
        for name, value in points.attribute_dims.items():
            value = [value] if isinstance(value, int) else value
            common = list(set(value).intersection(keep))
            if len(common) == 1:
                dims[name] = common[0]
            elif common:
                dims[name] = common
            else:
                dims.pop(name)
        return dims

    def __repr__(self) -> str:
        return f'{self.__class__.__name__}(sweeps_num={self.sweeps_num})'
