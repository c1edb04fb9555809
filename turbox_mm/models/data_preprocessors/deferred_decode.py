"""Deferred JPEG decoding for :class:`.TurboxDet3DDataPreprocessor` (point 3 of
:mod:`.gpu_image_preprocessor`'s docstring): the batch's compressed camera images decoded on
the device in one call and warped to their output size.

:class:`DeferredDecodeMixin` checks the batch that ``turbox_mm.PackJpegBytes`` packed, picks a
decoder (nvImageCodec, nvJPEG through torchvision, or OpenCV in the main process), decodes on a
private CUDA stream and, under ``decode_backend='auto'``, hands a batch a decoder fails on to
the next one (counted, warned at 1, 2, 4, ... failures; a decoder that fails
:data:`MAX_FAILED_BATCHES_IN_A_ROW` batches in a row is given up for the run). The decoders are
called through this module's names (tests replace them here).
"""
import os
import warnings
from collections import Counter
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .deferred_images import (_decode_warp_cv2, _host_array, _image_names, _name_list,
                              _nvimgcodec_decoder, _nvimgcodec_module, _torchvision_decoder,
                              _warp_on_device)

#: The keys of ``inputs`` that carry a deferred-decode batch.
DEFERRED_KEYS = ('img_bytes', 'img_bytes_offsets', 'img_warp', 'img_warp_size')
#: The keys of ``inputs`` that a deferred-decode batch may carry besides.
OPTIONAL_DEFERRED_KEYS = ('img_valid_box', )
#: Failed batches in a row after which ``'auto'`` gives a GPU decoder up for the run.
MAX_FAILED_BATCHES_IN_A_ROW = 8
#: Valid values of ``decode_backend``.
DECODE_BACKENDS = ('auto', 'torchvision', 'nvimgcodec', 'cv2')
#: Set to one of :data:`DECODE_BACKENDS` to override ``decode_backend`` (e.g. ``cv2`` to debug).
DECODE_BACKEND_ENV = 'TURBOX_DECODE_BACKEND'


class DeferredDecodeMixin:
    """Decoding of deferred-JPEG batches for a data preprocessor that has ``device``
    (module docstring). The host class calls :meth:`_setup_deferred_decode` in its
    ``__init__`` and :meth:`_decode_deferred` on a batch that carries :data:`DEFERRED_KEYS`.

    Attributes:
        decode_counts (Counter): Images decoded so far, by backend.
        decode_fallbacks (Counter): Batches a GPU decoder failed on so far, by that decoder.
        last_decode_backend (str or None): The backend of the latest deferred batch.
    """

    # Handles of the device and of native libraries: rebuilt on first use, never copied (the
    # EMA hook deep-copies the model, data preprocessor included).
    _RUNTIME_STATE = ('_decode_stream', '_nvimgcodec_decoder', '_keepalive')

    def _setup_deferred_decode(self, decode_backend: str) -> None:
        if decode_backend not in DECODE_BACKENDS:
            raise ValueError(f'decode_backend must be one of {DECODE_BACKENDS}, got '
                             f'{decode_backend!r}')
        self.decode_backend = decode_backend
        self.decode_counts: Counter = Counter()
        self.decode_fallbacks: Counter = Counter()
        self.last_decode_backend: Optional[str] = None
        self._failed_in_a_row = 0
        self._backend: Optional[str] = None
        self._fallbacks: List[str] = []
        self._warned = False
        self._decode_stream = None
        self._nvimgcodec_decoder = None
        self._keepalive = None

    def _decode_deferred(self, data: dict) -> dict:
        inputs = dict(data['inputs'])
        missing = [k for k in DEFERRED_KEYS if k not in inputs]
        if missing:
            present = [k for k in DEFERRED_KEYS if k in inputs]
            raise KeyError(f'deferred decode: inputs has {present} but lacks {missing}; pack '
                           'the batch with turbox_mm.PackJpegBytes')
        if 'img' in inputs:
            raise ValueError('deferred decode: a batch carries both decoded images ("img") and '
                             'JPEG bytes ("img_bytes"); the pipeline must produce one of them')
        columns = [inputs.pop(k) for k in DEFERRED_KEYS]
        box_column = inputs.pop(OPTIONAL_DEFERRED_KEYS[0], None)
        if box_column is not None:
            columns.append(box_column)
        if not all(isinstance(c, (list, tuple)) for c in columns) or \
                len({len(c) for c in columns}) != 1:
            raise ValueError('deferred decode: img_bytes, img_bytes_offsets, img_warp, '
                             'img_warp_size (and img_valid_box) must be lists of one entry per '
                             "sample (as pseudo_collate makes them), got "
                             f'{[type(c).__name__ for c in columns]}')
        if box_column is None:
            box_column = [None] * len(columns[0])
        streams, warps, sizes, boxes, counts, single = [], [], [], [], [], []
        for b, (buf, offsets, warp, size, box) in enumerate(zip(*columns[:4], box_column)):
            buf, offsets = _host_array(buf, np.uint8), _host_array(offsets, np.int64)
            warp, size = _host_array(warp, np.float64), _host_array(size, np.int64)
            single.append(warp.ndim == 2)
            warp = warp.reshape(-1, 3, 3) if warp.ndim in (2, 3) else warp
            n = offsets.size - 1
            if buf.ndim != 1 or offsets.ndim != 1 or n < 1 or warp.shape != (n, 3, 3) or \
                    size.shape != (2, ) or (size < 1).any():
                raise ValueError(f'deferred decode: sample {b} has img_bytes {buf.shape}, '
                                 f'offsets {offsets.shape}, img_warp {warp.shape} and '
                                 f'img_warp_size {size.tolist()}; expected [total], [N + 1], '
                                 '[N, 3, 3] (or [3, 3]) and (H, W)')
            if offsets[0] != 0 or offsets[-1] != buf.size or (np.diff(offsets) <= 0).any():
                raise ValueError(f'deferred decode: sample {b} has offsets {offsets.tolist()} '
                                 f'that do not split its {buf.size} bytes')
            if not np.allclose(warp[:, 2], [0, 0, 1], atol=1e-6):
                raise ValueError(f'deferred decode: sample {b} has a non-affine img_warp (last '
                                 f'row {warp[:, 2].tolist()})')
            if box is not None:
                box = _host_array(box, np.float64)
                box = box.reshape(-1, 4) if box.ndim in (1, 2) else box
                if box.shape != (n, 4) or not np.isfinite(box).all() or \
                        (box[:, 2] <= box[:, 0]).any() or (box[:, 3] <= box[:, 1]).any():
                    raise ValueError(f'deferred decode: sample {b} has img_valid_box '
                                     f'{box.tolist()}; expected {n} boxes (x0, y0, x1, y1) '
                                     'with x0 < x1 and y0 < y1')
            streams += [buf[offsets[i]:offsets[i + 1]] for i in range(n)]
            warps += list(warp)
            boxes += [None] * n if box is None else list(box)
            sizes += [tuple(int(s) for s in size)] * n
            counts.append(n)
        if len(set(single)) != 1:
            raise ValueError('deferred decode: the batch mixes single-view ([3, 3] img_warp) and '
                             'multi-view ([N, 3, 3]) samples')
        names = _image_names(data.get('data_samples'), counts)
        decoded = self._decode(streams, warps, sizes, boxes, names)
        per_sample, start = [], 0
        for n in counts:
            views = decoded[start:start + n]
            start += n
            if single[0]:
                per_sample.append(views[0])
            elif len({tuple(v.shape) for v in views}) != 1:
                raise ValueError('deferred decode: the views of one sample have different '
                                 f'output sizes {[tuple(v.shape) for v in views]}')
            else:
                per_sample.append(torch.stack(views))
        inputs['img'] = per_sample
        return {**data, 'inputs': inputs}

    def _resolve_backend(self) -> str:
        if self._backend is not None:
            return self._backend
        choice = os.environ.get(DECODE_BACKEND_ENV) or self.decode_backend
        if choice not in DECODE_BACKENDS:
            raise ValueError(f'{DECODE_BACKEND_ENV}={choice!r}: must be one of '
                             f'{DECODE_BACKENDS}')
        on_cuda = self.device.type == 'cuda' and torch.cuda.is_available()
        # nvImageCodec first: on the H200 its hardware decoder took 6.3 ms for 36 1600x900
        # JPEGs against torchvision's 7.3 ms, and its pixels match OpenCV's (mean difference
        # 0.00 grey levels against 2.05 for torchvision's 4:2:0 chroma upsampling).
        available = dict(nvimgcodec=on_cuda and _nvimgcodec_module() is not None,
                         torchvision=on_cuda and _torchvision_decoder() is not None)
        if choice in available and not available[choice]:
            raise RuntimeError(
                f'deferred decode: decode_backend={choice!r} needs a CUDA device and '
                f"{'torchvision >= 0.19' if choice == 'torchvision' else 'nvidia-nvimgcodec'}; "
                f'the preprocessor is on {self.device}. Use decode_backend="auto" to fall back '
                'to OpenCV.')
        if choice == 'auto':
            # The GPU decoders to try in turn: one that fails hands over to the next.
            self._fallbacks = [k for k, ok in available.items() if ok][1:]
            choice = next((k for k, ok in available.items() if ok), None)
            if choice is None:
                self._warn('no GPU JPEG decoder (needs CUDA and torchvision >= 0.19 or '
                           f'nvidia-nvimgcodec; device is {self.device})')
                choice = 'cv2'
        self._backend = choice
        return choice

    def _warn(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f'TurboxDet3DDataPreprocessor: {why}; decoding JPEG batches with '
                          'OpenCV in the main process instead (correct but slow).',
                          stacklevel=3)

    def _decode(self, streams: List[np.ndarray], warps: List[np.ndarray],
                sizes: List[Tuple[int, int]],
                boxes: Optional[List[Optional[np.ndarray]]] = None,
                names: Optional[List[str]] = None) -> List[Tensor]:
        """Decode and warp the images of a batch (``boxes``: valid boxes, None for none;
        ``names``: the images' files, for messages)."""
        names = names if names is not None else [f'image {i} of the batch'
                                                 for i in range(len(streams))]
        backend = self._resolve_backend()
        if backend != 'cv2':
            try:
                out = self._decode_gpu(backend, streams, warps, sizes, boxes)
            except torch.cuda.OutOfMemoryError:
                raise  # the process is out of memory, not the decoder broken
            except Exception as error:
                if (os.environ.get(DECODE_BACKEND_ENV) or self.decode_backend) != 'auto':
                    raise
                return self._decode_after_failure(backend, error, streams, warps, sizes, boxes,
                                                  names)
            self._failed_in_a_row = 0
            self._count(backend, len(streams))
            return out
        return self._decode_cv2(streams, warps, sizes, boxes, names)

    def _decode_after_failure(self, backend: str, error: Exception, streams, warps, sizes,
                              boxes, names) -> List[Tensor]:
        """This batch through the next decoders in turn (GPU fallbacks, then OpenCV); the
        failing decoder stays the first choice unless it failed too many batches in a row."""
        self.decode_fallbacks[backend] += 1
        self._failed_in_a_row += 1
        failed = self.decode_fallbacks[backend]
        order = [*self._fallbacks, 'cv2']
        why = (f'the {backend} GPU decoder failed ({type(error).__name__}: {error}) on a batch '
               f'of {len(streams)} images ({_name_list(names)}); {failed} failed batch'
               f'{"es" if failed > 1 else ""} so far')
        if self._failed_in_a_row >= MAX_FAILED_BATCHES_IN_A_ROW:
            warnings.warn(f'TurboxDet3DDataPreprocessor: {why}, {self._failed_in_a_row} in a '
                          f'row: decoding with {order[0]} for the rest of the run.',
                          stacklevel=3)
            self._backend, self._fallbacks = order[0], order[1:-1]
            self._failed_in_a_row = 0
        elif failed & (failed - 1) == 0:  # 1, 2, 4, 8, ...
            warnings.warn(f'TurboxDet3DDataPreprocessor: {why}; this batch: trying '
                          f"{', then '.join(order)} (the next batch tries {backend} again).",
                          stacklevel=3)
        for fallback in order[:-1]:
            try:
                out = self._decode_gpu(fallback, streams, warps, sizes, boxes)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception:  # noqa: BLE001  (counted; the next decoder takes the batch)
                self.decode_fallbacks[fallback] += 1
                continue
            self._count(fallback, len(streams))
            return out
        try:
            return self._decode_cv2(streams, warps, sizes, boxes, names)
        except ValueError as undecodable:  # no decoder reads it: the GPU error goes along
            raise undecodable from error

    def _decode_cv2(self, streams, warps, sizes, boxes, names) -> List[Tensor]:
        out = [img.to(self.device)
               for img in _decode_warp_cv2(streams, warps, sizes, boxes, names)]
        self._count('cv2', len(streams))
        return out

    def _count(self, backend: str, images: int) -> None:
        self.decode_counts[backend] += images
        self.last_decode_backend = backend

    def _decode_gpu(self, backend: str, streams: List[np.ndarray], warps: List[np.ndarray],
                    sizes: List[Tuple[int, int]],
                    boxes: Optional[List[Optional[np.ndarray]]] = None) -> List[Tensor]:
        """Decode and warp on the private decode stream; hand the output to the caller's."""
        device = self.device
        if device.type != 'cuda':  # only with a stand-in decoder (the CPU tests)
            return self._decode_and_warp(backend, streams, warps, sizes, boxes,
                                         cuda_stream=0)
        if self._decode_stream is None:
            self._decode_stream = torch.cuda.Stream(device=device)
        stream = self._decode_stream
        current = torch.cuda.current_stream(device)
        # Our own previous decode and warp only: nvJPEG's engine ignores stream order.
        stream.synchronize()
        self._keepalive = None
        with torch.cuda.stream(stream):
            out = self._decode_and_warp(backend, streams, warps, sizes, boxes,
                                        stream.cuda_stream)
        current.wait_stream(stream)
        for img in out:
            img.record_stream(current)
        return out

    def _decode_and_warp(self, backend: str, streams: List[np.ndarray],
                         warps: List[np.ndarray], sizes: List[Tuple[int, int]],
                         boxes: Optional[List[Optional[np.ndarray]]],
                         cuda_stream: int) -> List[Tensor]:
        device = self.device
        if backend == 'torchvision':
            decode = _torchvision_decoder()
            decoded = decode([torch.from_numpy(s) for s in streams], device)
        else:
            if self._nvimgcodec_decoder is None:
                index = device.index if device.index is not None else (
                    torch.cuda.current_device() if device.type == 'cuda' else 0)
                self._nvimgcodec_decoder = _nvimgcodec_decoder(_nvimgcodec_module(), index)
            images = self._nvimgcodec_decoder.decode(streams, cuda_stream=cuda_stream)
            bad = [i for i, img in enumerate(images) if img is None]
            if bad or len(images) != len(streams):
                raise RuntimeError(f'nvimgcodec could not decode images {bad} of '
                                   f'{len(streams)}')
            decoded = [torch.from_dlpack(img).permute(2, 0, 1) for img in images]
            # nvimgcodec owns that memory: keep it until the decode stream has read it.
            self._keepalive = images
        bad = [tuple(d.shape) for d in decoded if d.dim() != 3 or d.shape[0] != 3]
        if bad:
            raise RuntimeError(f'the {backend} decoder returned non-RGB images of shapes {bad}')
        return _warp_on_device(decoded, warps, sizes, rgb=True, boxes=boxes)
