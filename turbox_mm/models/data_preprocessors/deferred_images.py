"""Deferred JPEG decoding for :class:`.TurboxDet3DDataPreprocessor`: the decoders and the warps.

- the GPU decoders (``torchvision.io.decode_jpeg`` on CUDA, NVIDIA's ``nvidia.nvimgcodec``) and
  the OpenCV decode + warp that stands in for them (:func:`_decode_warp_cv2`, the CPU
  ``MultiViewAffineAug``'s operations);
- the warp of decoded images on the device (:func:`_warp_on_device`) and the valid-box masks;
- the unpacking helpers of a deferred batch (file names for messages, host arrays).

The data contract is in :mod:`.gpu_image_preprocessor`'s docstring.
"""
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from turbox_mm.datasets.transforms.jpeg_utils import block_average
from turbox_mm.datasets.transforms.multiview_affine_aug import (block_factor,
                                                                block_factors, decoded_warp)
from turbox_mm.ops.image_warp import NUM_PARAMS as NUM_WARP_PARAMS
from turbox_mm.ops.image_warp import warp_affine_u8


# -- deferred decode: warps -------------------------------------------------------------------

def valid_box_matrix(warp: np.ndarray, box: Sequence[float],
                     out_hw: Tuple[int, int]) -> Optional[np.ndarray]:
    """Output pixel -> index in the valid box resampled to the output grid; None if all valid.

    The deferred contract keeps a sample at source position ``(x, y) = warp @ [u, v, 1]``
    iff ``x0 <= x < x1 and y0 <= y < y1`` (``box``). With ``s = W / (x1 - x0)``, the box
    index ``q = s (x - x0) - 1/2`` (likewise in y) rounds to ``0 .. W - 1`` exactly there,
    so the test is the one that the CPU transform makes by warping a ones image with
    nearest-neighbour sampling (:func:`~turbox_mm.datasets.transforms.multiview_affine_aug.
    rotation_mask`): for the warps of ``MultiViewAffineAug`` (box = the crop, output size =
    the crop size), ``q`` is the index in the flipped crop that it rounds, and the returned
    matrix is its matrix up to the float32 rounding of the packed warp. Counting from the
    right where the warp mirrors (``det < 0``) reproduces the flipped crop.

    Args:
        warp (np.ndarray): ``[3, 3]`` output pixel -> full-resolution source pixel.
        box (sequence[float]): ``(x0, y0, x1, y1)`` in source pixels.
        out_hw (tuple[int, int]): Output (H, W).

    Returns:
        np.ndarray or None: ``[2, 3]`` float64, or None when every sample is kept: the four
        output corners lie inside the box by more than 0.01 pixel (far beyond OpenCV's
        rounding to 1/1024 pixel).
    """
    matrices, masked = valid_box_matrices(np.asarray(warp)[None],
                                          np.asarray(box, dtype=np.float64).reshape(1, 4), out_hw)
    return matrices[0] if masked[0] else None


def valid_box_matrices(warps: np.ndarray, boxes: np.ndarray,
                       out_hw: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`valid_box_matrix` of ``K`` images at once (one numpy pass, not ``K``).

    Args:
        warps (np.ndarray): ``[K, 3, 3]`` output pixel -> full-resolution source pixel.
        boxes (np.ndarray): ``[K, 4]`` ``(x0, y0, x1, y1)`` in source pixels.
        out_hw (tuple[int, int]): Output (H, W).

    Returns:
        tuple[np.ndarray, np.ndarray]: ``[K, 2, 3]`` float64 matrices and ``[K]`` bool, False
        where every sample is kept (the matrix is then not needed).
    """
    warps, boxes = np.asarray(warps, dtype=np.float64), np.asarray(boxes, dtype=np.float64)
    if warps.ndim != 3 or warps.shape[1:] not in ((2, 3), (3, 3)) or \
            boxes.shape != (len(warps), 4):
        raise ValueError(f'valid_box_matrices: expected warps [K, 3, 3] (or [K, 2, 3]) and '
                         f'boxes [K, 4], got {warps.shape} and {boxes.shape}')
    if warps.shape[1] == 2:
        warps = np.concatenate([warps, np.broadcast_to([[[0.0, 0.0, 1.0]]],
                                                       (len(warps), 1, 3))], axis=1)
    x0, y0, x1, y1 = boxes.T
    h, w = out_hw
    sx, sy = w / (x1 - x0), h / (y1 - y0)
    mirror = warps[:, 0, 0] * warps[:, 1, 1] - warps[:, 0, 1] * warps[:, 1, 0] < 0
    to_box = np.zeros((len(warps), 2, 3))
    to_box[:, 0, 0] = np.where(mirror, -sx, sx)
    to_box[:, 0, 2] = np.where(mirror, sx * x0 + w - 0.5, -sx * x0 - 0.5)
    to_box[:, 1, 1] = sy
    to_box[:, 1, 2] = -sy * y0 - 0.5
    matrices = np.einsum('kij,kjl->kil', to_box, warps)
    corners = np.einsum('kij,jl->kil', matrices,
                        np.array([[0, w - 1, 0, w - 1], [0, 0, h - 1, h - 1], [1, 1, 1, 1]]))
    margin = 0.01
    inside = (corners >= -0.5 + margin) & (corners <= np.array([[w], [h]]) - 0.5 - margin)
    return matrices, ~inside.all(axis=(1, 2))


def _valid_mask_cv2(matrix: np.ndarray, out_hw: Tuple[int, int]) -> np.ndarray:
    """:func:`valid_mask` of one image with OpenCV itself (the CPU transform's call)."""
    import cv2
    h, w = out_hw
    return cv2.warpAffine(np.ones((h, w), np.uint8), matrix, (w, h),
                          flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _warp_on_device(decoded: List[Tensor], warps: List[np.ndarray],
                    out_sizes: List[Tuple[int, int]], rgb: bool,
                    boxes: Optional[List[Optional[np.ndarray]]] = None) -> List[Tensor]:
    """Warp decoded uint8 CHW images as the CPU ``MultiViewAffineAug``, one op call per
    (source size, block size, output size).

    Where the warp shrinks by 2 or more the source is block-averaged first (block size from
    :func:`~turbox_mm.datasets.transforms.multiview_affine_aug.block_factor`) and sampled with
    the warp re-targeted to it (``decoded_warp``); samples outside each image's valid box
    (``boxes[i]``, None for none) are zeroed. All of it is
    :func:`turbox_mm.ops.image_warp.warp_affine_u8`: one Triton kernel on CUDA, its PyTorch
    reference elsewhere.

    Returns one uint8 BGR ``[3, H, W]`` tensor per image, rounded half up as OpenCV rounds.
    """
    count = len(decoded)
    boxes = boxes if boxes is not None else [None] * count
    full = np.stack([np.asarray(warp, dtype=np.float64).reshape(3, 3) for warp in warps])
    factors = block_factors(full)
    groups: Dict[Tuple, List[int]] = {}
    for i, (img, size) in enumerate(zip(decoded, out_sizes)):
        groups.setdefault((tuple(img.shape[-2:]), int(factors[i]), tuple(size)), []).append(i)
    results: List[Optional[Tensor]] = [None] * count
    for (_, factor, out_hw), index in groups.items():
        src = torch.stack([decoded[i] for i in index])
        params = np.zeros((len(index), NUM_WARP_PARAMS))
        params[:, 0:6] = decoded_warp(full[index], factor)[:, :2].reshape(-1, 6)
        boxed = [k for k, i in enumerate(index) if boxes[i] is not None]
        if boxed:
            matrices, masked = valid_box_matrices(
                full[[index[k] for k in boxed]],
                np.stack([np.asarray(boxes[index[k]], dtype=np.float64) for k in boxed]), out_hw)
            params[boxed, 6:12] = matrices.reshape(-1, 6)
            params[boxed, 12] = masked
        params = torch.from_numpy(params).to(src.device, non_blocking=True)
        out = warp_affine_u8(src, params, factor, out_hw, reverse_channels=rgb)
        for k, i in enumerate(index):
            results[i] = out[k]
    return results


def _decode_warp_cv2(streams: List[np.ndarray], warps: List[np.ndarray],
                     out_sizes: List[Tuple[int, int]],
                     boxes: Optional[List[Optional[np.ndarray]]] = None,
                     names: Optional[List[str]] = None) -> List[Tensor]:
    """OpenCV decode (BGR, EXIF orientation ignored) and warp, one image at a time.

    The CPU ``MultiViewAffineAug``'s operations: block average where the warp shrinks by 2
    or more, ``cv2.warpAffine`` with the re-targeted warp, and the valid box's mask made by
    warping a ones image (:func:`valid_box_matrix`), so that the result equals that
    transform's on the same decoded pixels.
    """
    import cv2
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    boxes = boxes if boxes is not None else [None] * len(streams)
    results = []
    for i, (stream, warp, (h, w), box) in enumerate(zip(streams, warps, out_sizes, boxes)):
        img = cv2.imdecode(stream, flags)
        if img is None:
            name = names[i] if names is not None else f'image {i} of the batch'
            raise ValueError(f'deferred decode: {name} is not a decodable JPEG ({stream.size} '
                             'bytes)')
        factor = block_factor(warp)
        if factor > 1:
            img = block_average(img, factor)
        out = cv2.warpAffine(img, decoded_warp(warp, factor)[:2], (int(w), int(h)),
                             flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        matrix = None if box is None else valid_box_matrix(warp, box, (int(h), int(w)))
        if matrix is not None:
            out *= _valid_mask_cv2(matrix, (int(h), int(w)))[..., None]
        results.append(torch.from_numpy(out).permute(2, 0, 1))
    return results


def _torchvision_decoder():
    """``torchvision.io.decode_jpeg`` if it decodes batches on CUDA (torchvision >= 0.19)."""
    try:
        import torchvision
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception:  # ImportError, or a torchvision built for another torch
        return None
    version = tuple(int(p) for p in torchvision.__version__.split('+')[0].split('.')[:2]
                    if p.isdigit())
    if version < (0, 19):
        return None
    return lambda tensors, device: decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)


def _nvimgcodec_decoder(module, device_id: int):
    """An nvImageCodec decoder that tries the hardware JPEG engine first.

    Measured on the H200 for 36 1600x900 JPEGs: 6.4 ms with the hardware backend against
    15.0 ms with the library's default set of backends. Images the engine cannot take
    (progressive JPEGs, for one) fall through to the hybrid CPU + GPU decoder, then to the
    CPU one, so that none comes back undecoded; where the library refuses that list, its
    default decoder is used.
    """
    names = ('HW_GPU_ONLY', 'HYBRID_CPU_GPU', 'CPU_ONLY')
    kinds = [getattr(getattr(module, 'BackendKind', None), name, None) for name in names]
    if all(kind is not None for kind in kinds) and hasattr(module, 'Backend'):
        try:
            return module.Decoder(device_id=device_id,
                                  backends=[module.Backend(kind) for kind in kinds])
        except Exception as error:  # an older library or a missing extension
            warnings.warn(f'nvImageCodec refused the backends {names} ({error}); using its '
                          'default decoder', stacklevel=2)
    return module.Decoder(device_id=device_id)


def _nvimgcodec_module():
    try:
        from nvidia import nvimgcodec
    except Exception:
        return None
    return nvimgcodec


# -- unpacking a deferred batch ---------------------------------------------------------------

def _image_names(data_samples, counts: List[int]) -> List[str]:
    """The file of each image of a deferred batch, from the samples' ``img_path`` metainfo
    (``Pack3DDetInputs`` keeps it by default); ``'image i of sample b'`` where it is absent."""
    names = []
    for b, n in enumerate(counts):
        sample = data_samples[b] if data_samples is not None and b < len(data_samples) else None
        paths = getattr(sample, 'img_path', None) if sample is not None else None
        paths = [paths] if isinstance(paths, str) else paths
        if isinstance(paths, (list, tuple)) and len(paths) == n:
            names += [str(p) for p in paths]
        else:
            names += [f'image {i} of sample {b}' for i in range(n)]
    return names


def _name_list(names: List[str], limit: int = 6) -> str:
    """``names`` joined, the first ``limit`` of them and a count of the rest."""
    shown = ', '.join(names[:limit])
    return shown + (f' and {len(names) - limit} more' if len(names) > limit else '')


def _host_array(value, dtype) -> np.ndarray:
    """A numpy array on the host from a numpy array, tensor, sequence or bytes-like value."""
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    elif isinstance(value, (bytes, bytearray, memoryview)):
        value = np.frombuffer(value, dtype=np.uint8)
    array = np.asarray(value)
    if array.dtype != dtype:
        array = array.astype(dtype)
    if dtype == np.uint8 and not array.flags.writeable:
        array = array.copy()  # torch.from_numpy warns on read-only buffers
    return array
