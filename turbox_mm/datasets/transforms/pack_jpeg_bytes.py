"""Pack3DDetInputs that also carries compressed JPEG bytes to the data preprocessor.

In deferred-decode mode the loader workers do not decode images: the pipeline leaves, per
sample, the JPEG bytes of each camera in ``results['img_bytes']`` (a list of bytes-like
objects, one per camera, or one bytes-like object for a single view), the per-camera affine
warp ``results['img_warp']`` (float32 ``[N, 3, 3]`` or ``[3, 3]``; OUTPUT pixel (x, y, 1) ->
SOURCE pixel, pixel centres at integer coordinates, as ``cv2.warpAffine`` with
``WARP_INVERSE_MAP``), the output size ``results['img_warp_size']`` (H, W) and, where the
pipeline sets it (``MultiViewAffineAug`` does), the per-camera valid box
``results['img_valid_box']`` (float32 ``[N, 4]`` or ``[4]``: ``(x0, y0, x1, y1)`` in source
pixels; a sample at ``(x_src, y_src)`` is kept iff ``x0 <= x_src < x1 and y0 <= y_src <
y1``, else 0: the corners that the stock rotation leaves black). :class:`PackJpegBytes`
packs everything as ``Pack3DDetInputs`` does and adds to ``inputs``::

    img_bytes          np.uint8   [total]    the N streams, concatenated
    img_bytes_offsets  np.int64   [N + 1]    camera i is img_bytes[off[i]:off[i + 1]]
    img_warp           np.float32 [N, 3, 3]  ([3, 3] for a single view)
    img_warp_size      np.int64   [2]        (H, W)
    img_valid_box      np.float32 [N, 4]     ([4] for a single view; only when given)

Why this layout: mmengine's ``pseudo_collate`` keeps numpy arrays as one list entry per sample,
whereas a per-sample list of N buffers would be transposed into N lists over the batch (and
fail when samples have different camera counts); the DataLoader's pin thread and the data
preprocessor's ``cast_data`` leave numpy arrays on the host, where nvJPEG reads its input.
:class:`~turbox_mm.models.data_preprocessors.TurboxDet3DDataPreprocessor` decodes them.

Without ``img_bytes`` in ``results`` it is exactly ``Pack3DDetInputs``, so a config can use it
whether or not decoding is deferred.

Examples:
    >>> import numpy as np, cv2
    >>> ok, jpeg = cv2.imencode('.jpg', np.zeros((8, 8, 3), np.uint8))
    >>> packed = PackJpegBytes(keys=['img'])(dict(
    ...     img_bytes=[jpeg.tobytes()] * 2, img_warp=np.stack([np.eye(3, dtype=np.float32)] * 2),
    ...     img_warp_size=(8, 8)))
    >>> inputs = packed['inputs']
    >>> inputs['img_bytes_offsets'].tolist() == [0, jpeg.size, 2 * jpeg.size]
    True
    >>> inputs['img_warp'].shape, inputs['img_warp_size'].tolist()
    ((2, 3, 3), [8, 8])
"""
from typing import Dict, Sequence, Union

import numpy as np
import torch
from mmdet3d.datasets.transforms import Pack3DDetInputs

from turbox_mm.registry import TRANSFORMS

__all__ = ['PackJpegBytes', 'pack_jpeg_bytes']

BytesLike = Union[bytes, bytearray, memoryview, np.ndarray, torch.Tensor]
_JPEG_SOI = b'\xff\xd8'


def _as_uint8(buf: BytesLike, index: int) -> np.ndarray:
    if isinstance(buf, torch.Tensor):
        buf = buf.detach().cpu().numpy()
    if isinstance(buf, (bytes, bytearray, memoryview)):
        array = np.frombuffer(buf, dtype=np.uint8)
    elif isinstance(buf, np.ndarray) and buf.dtype == np.uint8 and buf.ndim == 1:
        array = buf
    else:
        raise TypeError(f'img_bytes[{index}]: expected bytes or a 1-D uint8 array, got '
                        f'{type(buf).__name__}'
                        + (f' {buf.dtype} {buf.shape}' if hasattr(buf, 'shape') else ''))
    if array.size < 4 or array[:2].tobytes() != _JPEG_SOI:
        raise ValueError(f'img_bytes[{index}] is not a JPEG stream (no SOI marker in its '
                         f'{array.size} bytes); the GPU decoder reads JPEG only')
    return array


def pack_jpeg_bytes(img_bytes: Union[BytesLike, Sequence[BytesLike]], img_warp,
                    img_warp_size, img_valid_box=None) -> Dict[str, np.ndarray]:
    """The ``inputs`` entries of one deferred-decode sample.

    Args:
        img_bytes (bytes-like or list): The JPEG stream of each camera, or of the only one.
        img_warp (array-like): ``[N, 3, 3]`` (``[3, 3]`` with a single stream), output pixel ->
            source pixel.
        img_warp_size (sequence[int]): Output (H, W).
        img_valid_box (array-like, optional): ``[N, 4]`` (``[4]`` with a single stream),
            ``(x0, y0, x1, y1)`` in source pixels. Defaults to None (every sample kept).

    Returns:
        dict: ``img_bytes``, ``img_bytes_offsets``, ``img_warp``, ``img_warp_size`` and, when
        given, ``img_valid_box`` (see the module docstring).

    Raises:
        TypeError: A stream is neither bytes-like nor a 1-D uint8 array.
        ValueError: A stream is not a JPEG, or the warps, size or boxes do not match the
            streams.
    """
    single = not isinstance(img_bytes, (list, tuple))
    streams = [_as_uint8(b, i) for i, b in enumerate([img_bytes] if single else img_bytes)]
    if not streams:
        raise ValueError('img_bytes is an empty list')
    warp = np.asarray(img_warp, dtype=np.float32)
    expected = (3, 3) if single else (len(streams), 3, 3)
    if warp.shape != expected:
        raise ValueError(f'img_warp has shape {warp.shape}; {len(streams)} '
                         f"{'stream' if single else 'streams'} need {expected}")
    size = np.asarray(img_warp_size, dtype=np.int64).reshape(-1)
    if size.shape != (2, ) or (size < 1).any():
        raise ValueError(f'img_warp_size must be (H, W) with positive sizes, got '
                         f'{img_warp_size!r}')
    offsets = np.zeros(len(streams) + 1, dtype=np.int64)
    np.cumsum([s.size for s in streams], out=offsets[1:])
    packed = dict(img_bytes=np.concatenate(streams), img_bytes_offsets=offsets, img_warp=warp,
                  img_warp_size=size)
    if img_valid_box is not None:
        box = np.asarray(img_valid_box, dtype=np.float32)
        expected = (4, ) if single else (len(streams), 4)
        if box.shape != expected:
            raise ValueError(f'img_valid_box has shape {box.shape}; {len(streams)} '
                             f"{'stream' if single else 'streams'} need {expected}")
        corners = box.reshape(-1, 4)
        if not np.isfinite(corners).all() or (corners[:, 2] <= corners[:, 0]).any() or \
                (corners[:, 3] <= corners[:, 1]).any():
            raise ValueError(f'img_valid_box must hold finite (x0, y0, x1, y1) with x0 < x1 '
                             f'and y0 < y1, got {corners.tolist()}')
        packed['img_valid_box'] = box
    return packed


@TRANSFORMS.register_module()
class PackJpegBytes(Pack3DDetInputs):
    """``Pack3DDetInputs`` plus the deferred-decode keys ``img_bytes``, ``img_warp``,
    ``img_warp_size`` and (where present) ``img_valid_box``, packed into ``inputs`` whenever
    ``results`` has ``img_bytes`` (they need not be listed in ``keys``). Arguments are
    ``Pack3DDetInputs``'s.

    The images' files always reach the sample's metainfo as ``img_path`` (from ``img_path``,
    else the loaders' ``filename``), also where ``meta_keys`` omits them (Sparse4D's and
    SparseDrive's configs list their own): a decode failure on the GPU names the file.
    """

    DEFERRED_KEYS = ('img_bytes', 'img_warp', 'img_warp_size')
    OPTIONAL_KEYS = ('img_valid_box', )

    def pack_single_results(self, results: dict) -> dict:
        """Pack one sample (see ``Pack3DDetInputs.pack_single_results``).

        Raises:
            KeyError: ``img_bytes`` comes without ``img_warp`` or ``img_warp_size``.
            ValueError: ``results`` has both ``img`` (not None) and ``img_bytes``.
        """
        if 'img_bytes' not in results:
            return super().pack_single_results(results)
        missing = [k for k in self.DEFERRED_KEYS if k not in results]
        if missing:
            raise KeyError(f'PackJpegBytes: results has img_bytes but lacks {missing}')
        if results.get('img') is not None:
            raise ValueError('PackJpegBytes: results has both decoded images ("img") and JPEG '
                             'bytes ("img_bytes"); a deferred-decode pipeline must not load '
                             'pixels')
        results = dict(results)
        results.pop('img', None)  # a deferred loader may leave img=None
        deferred = pack_jpeg_bytes(*(results.pop(k) for k in self.DEFERRED_KEYS),
                                   *(results.pop(k, None) for k in self.OPTIONAL_KEYS))
        packed = super().pack_single_results(results)
        packed['inputs'].update(deferred)
        sample = packed.get('data_samples')
        if sample is not None and 'img_path' not in sample.metainfo:
            paths = results.get('img_path', results.get('filename'))
            paths = [paths] if isinstance(paths, str) else paths
            if isinstance(paths, (list, tuple)) and \
                    len(paths) == len(deferred['img_bytes_offsets']) - 1:
                sample.set_metainfo(dict(img_path=[str(p) for p in paths]))
        return packed
