"""Multi-view resize, crop, flip and rotate as one affine warp per image (turbox twin)."""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from mmcv.transforms import BaseTransform

from turbox_mm.registry import TRANSFORMS
from .jpeg_utils import block_average

INTERPOLATIONS = {
    'nearest': cv2.INTER_NEAREST,
    'bilinear': cv2.INTER_LINEAR,
    'bicubic': cv2.INTER_CUBIC,
}


def _aug_params(aug_config: Dict, height: int, width: int) -> Tuple:
    """Upstream's reading of ``aug_config`` for an image of ``height x width``."""
    resize = aug_config.get('resize', 1)
    resize_dims = (int(width * resize), int(height * resize))
    crop = aug_config.get('crop', [0, 0, *resize_dims])
    flip = bool(aug_config.get('flip', False))
    rotate = float(aug_config.get('rotate', 0))
    return resize, resize_dims, tuple(int(c) for c in crop), flip, rotate


def _forward_affine(scale_x: float, scale_y: float, crop: Sequence[int], flip: bool,
                    rotate: float) -> np.ndarray:
    """3x3 map of continuous image coordinates: source -> resized, cropped, flipped, rotated.

    Continuous coordinates put the centre of pixel ``(row i, column j)`` at ``(j + 0.5,
    i + 0.5)``, as PIL's resampling does. The rotation is PIL's: ``rotate`` degrees
    counter-clockwise on screen (y down) about the centre ``(crop_w / 2, crop_h / 2)``.
    """
    left, top, right, bottom = crop
    crop_w, crop_h = right - left, bottom - top
    sign = -1.0 if flip else 1.0
    # Resize, crop and flip: q = diag(sign * sx, sy) p + b.
    offset = np.array([crop_w + left if flip else -left, -top], dtype=np.float64)
    theta = math.radians(rotate)
    cos, sin = math.cos(theta), math.sin(theta)
    rot = np.array([[cos, sin], [-sin, cos]])
    centre = np.array([crop_w / 2.0, crop_h / 2.0])
    out = np.eye(3)
    out[:2, :2] = rot @ np.diag([sign * scale_x, scale_y])
    out[:2, 2] = rot @ (offset - centre) + centre
    return out


def projection_matrix(aug_config: Dict, height: int, width: int) -> np.ndarray:
    """The 4x4 matrix that the stock ``ResizeCropFlipImage`` applies to ``lidar2img``.

    It maps source pixel coordinates to augmented ones as upstream does: scaled by
    ``aug_config['resize']`` itself (the image is scaled by ``int(W * resize) / W``).

    Args:
        aug_config (dict): ``resize``, ``crop``, ``flip``, ``rotate`` (see
            :class:`MultiViewAffineAug`).
        height (int): Source image height.
        width (int): Source image width.

    Returns:
        np.ndarray: float64 ``(4, 4)``.

    Examples:
        >>> m = projection_matrix(dict(resize=0.5, crop=(10, 20, 110, 70)), 100, 300)
        >>> m[:2, :3].tolist()
        [[0.5, 0.0, -10.0], [0.0, 0.5, -20.0]]
    """
    resize, _, crop, flip, rotate = _aug_params(aug_config, height, width)
    mat = np.eye(4)
    mat[:3, :3] = _forward_affine(resize, resize, crop, flip, rotate)
    return mat


def source_warp(aug_config: Dict, height: int, width: int) -> Tuple[np.ndarray, Tuple[int, int]]:
    """The warp from output pixels to source pixels that reproduces the stock images.

    The stock chain scales the image by ``int(W * resize) / W`` horizontally and
    ``int(H * resize) / H`` vertically (PIL's ``resize``), then crops, flips and rotates; the
    warp composes those exactly, in PIL's pixel-centre convention.

    **Convention.** Pixel indices, pixel ``(row i, column j)`` at ``(x=j, y=i)`` (OpenCV's
    convention). For an output pixel ``(x, y)`` the source position is
    ``warp @ [x, y, 1]``, in pixels of the full-resolution source image (``height x
    width``). That is ``cv2.warpAffine(src, warp[:2], (out_w, out_h),
    flags=interpolation | cv2.WARP_INVERSE_MAP, borderValue=0)``. Positions outside the
    source read 0, as PIL's crop and rotate fill. For ``torch.nn.functional.grid_sample``
    with ``align_corners=False``, normalise ``(x_src + 0.5) / width * 2 - 1`` (same for y).

    Args:
        aug_config (dict): ``resize``, ``crop``, ``flip``, ``rotate``.
        height (int): Source image height (full resolution).
        width (int): Source image width (full resolution).

    Returns:
        tuple: ``warp`` (float64 ``(3, 3)``, last row ``[0, 0, 1]``) and the output size
        ``(out_h, out_w)``.

    Examples:
        >>> warp, size = source_warp(dict(resize=0.5, crop=(0, 0, 50, 40)), 100, 100)
        >>> size, warp[:2].tolist()
        ((40, 50), [[2.0, 0.0, 0.5], [0.0, 2.0, 0.5]])
    """
    _, (new_w, new_h), crop, flip, rotate = _aug_params(aug_config, height, width)
    if new_w <= 0 or new_h <= 0:
        raise ValueError(f'aug_config resizes a {height}x{width} image to {new_h}x{new_w}')
    forward = _forward_affine(new_w / width, new_h / height, crop, flip, rotate)
    to_centre = np.array([[1.0, 0, 0.5], [0, 1.0, 0.5], [0, 0, 1.0]])
    from_centre = np.array([[1.0, 0, -0.5], [0, 1.0, -0.5], [0, 0, 1.0]])
    warp = from_centre @ _invert_affine(forward) @ to_centre
    out_size = (crop[3] - crop[1], crop[2] - crop[0])
    return warp, out_size


def _invert_affine(m: np.ndarray) -> np.ndarray:
    """Inverse of a 3x3 affine matrix in closed form.

    LAPACK (``np.linalg.inv``) would do, but OpenBLAS then wakes its worker threads, whose
    spinning doubles the CPU time a loader worker spends here.
    """
    (a, b, tx), (c, d, ty) = m[0].tolist(), m[1].tolist()
    det = a * d - b * c
    if det == 0.0:
        raise ValueError('MultiViewAffineAug: the augmentation collapses the image (resize 0)')
    ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
    return np.array([[ia, ib, -(ia * tx + ib * ty)], [ic, id_, -(ic * tx + id_ * ty)],
                     [0.0, 0.0, 1.0]])


def crop_box(aug_config: Dict, height: int, width: int) -> np.ndarray:
    """The crop box in full-resolution source pixel coordinates, where samples are kept.

    The stock chain rotates the *cropped* image, so corners rotated in from outside the crop
    are 0 even where the source has pixels. The crop is axis-aligned in the source, so a
    sample at source position ``(x, y)`` (the convention of :func:`source_warp`) is kept iff
    ``x0 <= x < x1 and y0 <= y < y1``; elsewhere the output is 0.

    Args:
        aug_config (dict): ``resize``, ``crop``, ``flip``, ``rotate``.
        height (int): Source image height (full resolution).
        width (int): Source image width (full resolution).

    Returns:
        np.ndarray: float64 ``(x0, y0, x1, y1)``.

    Examples:
        >>> crop_box(dict(resize=0.5, crop=(10, 20, 60, 40)), 100, 200).tolist()
        [19.5, 39.5, 119.5, 79.5]
    """
    params = _aug_params(aug_config, height, width)
    (new_w, new_h), (left, top, right, bottom) = params[1], params[2]
    sx, sy = new_w / width, new_h / height
    return np.array([left / sx, top / sy, right / sx, bottom / sy]) - 0.5


def rotation_mask(aug_config: Dict, out_size: Tuple[int, int]) -> Optional[np.ndarray]:
    """Where the stock rotation finds a pixel of the cropped image: uint8 0/1, or None.

    PIL's ``rotate`` (nearest) keeps output pixel ``(x, y)`` iff the pre-image of its centre
    lies inside the crop, ``0 <= q < (crop_w, crop_h)`` in continuous coordinates. This is
    the same test as :func:`crop_box` in the source, made on the output grid by warping a
    ones image (OpenCV's nearest rounds as PIL's truncation of ``q``).

    Args:
        aug_config (dict): ``rotate`` (degrees).
        out_size (tuple[int]): ``(crop_h, crop_w)``.

    Returns:
        np.ndarray or None: ``(crop_h, crop_w)`` uint8, or None when nothing is masked
        (no rotation).
    """
    rotate = float(aug_config.get('rotate', 0))
    if rotate % 360.0 == 0.0:
        return None
    h, w = out_size
    theta = math.radians(rotate)
    cos, sin = math.cos(theta), math.sin(theta)
    # Output index -> crop index: q = R^T (p + 0.5 - c) + c - 0.5, R = [[cos, sin], [-sin, cos]].
    cx, cy = w / 2.0, h / 2.0
    inv = np.array([[cos, -sin, 0.0], [sin, cos, 0.0]])
    inv[:, 2] = inv[:, :2] @ np.array([0.5 - cx, 0.5 - cy]) + np.array([cx - 0.5, cy - 0.5])
    ones = np.ones((h, w), np.uint8)
    return cv2.warpAffine(ones, inv, (w, h), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def decoded_warp(warp: np.ndarray, factor: int) -> np.ndarray:
    """Re-target a full-resolution ``warp`` to a source decoded at ``1 / factor`` scale.

    A JPEG decoded at ``1 / factor`` in the DCT domain maps full-resolution pixel centre
    ``x + 0.5`` to ``(x + 0.5) / factor``.

    Args:
        warp (np.ndarray): ``(3, 3)`` from :func:`source_warp`.
        factor (int): 1, 2, 4 or 8.

    Returns:
        np.ndarray: float64 ``(3, 3)``.
    """
    if factor == 1:
        return np.asarray(warp, dtype=np.float64)
    f = float(factor)
    scale = np.array([[1 / f, 0, 0.5 / f - 0.5], [0, 1 / f, 0.5 / f - 0.5], [0, 0, 1.0]])
    return scale @ np.asarray(warp, dtype=np.float64)


def block_factor(warp: np.ndarray, decode_factor: int = 1) -> int:
    """The block size to average a source by before sampling it bilinearly with ``warp``.

    Bilinear sampling aliases when it shrinks by 2 or more, so a source decoded at
    ``1 / decode_factor`` is further reduced by the largest of 2, 4 (or 8) that keeps at
    least one source pixel per output pixel: ``extra`` doubles while the shrink
    ``sqrt(|det(warp[:2, :2])|) / decode_factor`` is at least ``2 * extra`` and
    ``decode_factor * extra < 8``. The CPU warp of :class:`MultiViewAffineAug` and the
    deferred (GPU) decode both use it.

    Args:
        warp (np.ndarray): ``(3, 3)`` from :func:`source_warp` (full-resolution source).
        decode_factor (int): The source's decode scale denominator. Defaults to 1.

    Returns:
        int: 1 (no averaging), 2, 4 or 8.

    Examples:
        >>> block_factor(np.diag([2.2, 2.2, 1.0])), block_factor(np.diag([1.9, 1.9, 1.0]))
        (2, 1)
    """
    return int(block_factors(np.asarray(warp)[None], decode_factor)[0])


def block_factors(warps: np.ndarray, decode_factor: int = 1) -> np.ndarray:
    """:func:`block_factor` of ``K`` warps ``[K, 3, 3]`` (or ``[K, 2, 3]``) at once: ``[K]``
    int64."""
    warps = np.asarray(warps, dtype=np.float64)
    if warps.ndim < 2 or warps.shape[-2:] not in ((2, 3), (3, 3)):
        raise ValueError(f'block_factors: warps must be [K, 3, 3] or [K, 2, 3], got shape '
                         f'{warps.shape}')
    warps = warps.reshape(-1, *warps.shape[-2:])
    det = warps[:, 0, 0] * warps[:, 1, 1] - warps[:, 0, 1] * warps[:, 1, 0]
    shrink = np.sqrt(np.abs(det)) / decode_factor
    extra = np.ones(len(warps), dtype=np.int64)
    for _ in range(3):
        grow = (extra < 8) & (shrink >= 2 * extra) & (decode_factor * extra < 8)
        extra = np.where(grow, extra * 2, extra)
    return extra


def warp_image(img: np.ndarray, warp: np.ndarray, factor: int, out_size: Tuple[int, int],
               interpolation: str) -> np.ndarray:
    """One camera's image through ``warp`` (of full-resolution pixels; the image decoded
    ``factor`` times smaller) into ``out_size`` ``(H, W)``, as uint8, zero outside.

    Bilinear sampling aliases beyond a 2x shrink, so blocks are averaged first, as the
    loader's scaled decoding would have (source pixels per output pixel >= 2).
    """
    if img.dtype != np.uint8:
        img = img.astype(np.uint8)  # the stock transforms' cast
    extra = block_factor(warp, factor)
    if extra > 1:
        img = block_average(img, extra)
        factor *= extra
    m = decoded_warp(warp.astype(np.float64), factor)
    out_h, out_w = out_size
    out = cv2.warpAffine(img, m[:2], (out_w, out_h),
                         flags=INTERPOLATIONS[interpolation] | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if img.ndim == 3 and out.ndim == 2:  # OpenCV drops a trailing axis of size 1
        out = out[..., None]
    return out


@TRANSFORMS.register_module()
class MultiViewAffineAug(BaseTransform):
    """Resize, crop, flip and rotate each camera image with one ``cv2.warpAffine``.

    The turbox twin of :class:`~turbox_mm.datasets.transforms.ResizeCropFlipImage`
    (Sparse4D v3's): the same ``aug_config`` in, the same geometry out (``lidar2img``,
    ``cam_intrinsic`` and ``img_shape`` as the stock transform sets them, plus
    ``img_aug_matrix``), and images that match the stock ones within interpolation
    tolerance. Where the stock chain makes four PIL passes (bicubic resize from full
    resolution, crop, flip, nearest-neighbour rotate) and float32 copies, this makes one
    affine warp (:func:`source_warp`, PIL's pixel-centre convention) straight from the
    decoded image to the output size, zeroes the corners that the stock rotation leaves
    empty (:func:`rotation_mask`), and keeps uint8; normalisation belongs on the GPU.

    **Anti-aliasing.** Bilinear sampling aliases when it shrinks by more than 2, so the
    source is first reduced by 2, 4 or 8 (keeping at least one source pixel per output
    pixel): by the loader's DCT-scaled decoding
    (:class:`~turbox_mm.datasets.transforms.LoadMultiViewImagesTurbo` with
    ``scaled_decode=True``, free), else here by block averaging (:func:`block_average`).

    **Tolerance** against the stock chain, measured on ``image_pipeline.textured_image``
    JPEGs (1600x900, quality 90, about 340 kB) with Sparse4D v3's augmentation to 256x704
    (8 samples x 6 cameras; grey levels 0-255):

    ===========================================  ======  =====  =======
    turbox source                                mean    p99    p99.9
    ===========================================  ======  =====  =======
    1/2-scale DCT decode, no rotation            1.06    9      20
    1/2-scale DCT decode, rotation +-5.4 deg     1.90    19     54
    full decode + 2x2 block average, no rotation 1.01    7      17
    ===========================================  ======  =====  =======

    With rotation, most of the difference is the stock chain's: its rotation is
    nearest-neighbour (up to half a pixel off), this one interpolates (replaying the stock
    rotation with nearest-neighbour sampling matches PIL on 99.7% of the pixels). Hard
    edges differ most (max about 50 without rotation). ``interpolation='bicubic'`` is
    further from PIL (mean 1.18, p99 11), not closer.

    **Sources.** ``results['img']`` holds uint8 images decoded at ``1 / d`` scale where
    ``results['img_decode_scale'] == d`` (set by the turbox loader; 1 when absent). The
    geometry is always that of the full-resolution image the stock chain sees: its shape is
    ``results['ori_shape']`` when ``d > 1`` or in deferred mode, else each image's own.

    **Deferred mode** (the loader's ``decode_on='gpu'``: ``results['img_bytes']`` and no
    ``results['img']``): no pixel is touched; per camera ``n``:

    - ``results['img_warp'][n]`` (float32 ``(N, 3, 3)``) maps output pixel coordinates to
      full-resolution source pixel coordinates, pixel ``(row i, column j)`` at
      ``(x=j, y=i)`` in both: ``[x_src, y_src, 1] = img_warp[n] @ [x, y, 1]`` (OpenCV's
      ``WARP_INVERSE_MAP`` convention; see :func:`source_warp` for ``grid_sample``);
    - sample bilinearly, reading 0 outside the source, and keep the sample only where
      ``x0 <= x_src < x1 and y0 <= y_src < y1`` with ``(x0, y0, x1, y1) =
      results['img_valid_box'][n]`` (float32 ``(N, 4)``, :func:`crop_box`), else 0;
    - where the warp shrinks by 2 or more (``sqrt(|det(img_warp[n][:2, :2])|) >= 2``),
      sample a source reduced by 2 (or 4, 8) instead, e.g. nvJPEG's scaled decode, and
      re-target the warp with :func:`decoded_warp` (the CPU mode does exactly this);
    - ``results['img_warp_size'] = (H, W)`` is the output size (all cameras alike).

    ``img_shape`` is set to the output sizes, as if the images were there; ``img_bytes``
    stays.

    Args:
        interpolation (str): ``'bilinear'``, ``'bicubic'`` or ``'nearest'``.
            Defaults to ``'bilinear'``.
        to_float32 (bool): Return float32 images (the stock transform's dtype), for CPU
            transforms downstream that insist on it (Sparse4D's
            ``PhotoMetricDistortionMultiViewImage``); keep False when normalisation and
            photometric augmentation run on the GPU. Defaults to False.

    Required keys: ``aug_config`` (``resize``, ``crop``, ``flip``, ``rotate``: see
    :class:`ResizeCropFlipImage`; None or absent passes the sample through), ``img`` or
    ``img_bytes``, ``lidar2img`` (list of 4x4; optional here, required by the stock twin).

    Modified keys: ``img`` (uint8, or float32 with ``to_float32``; ``(crop_h, crop_w, C)``),
    ``img_shape``, ``lidar2img``,
    ``cam_intrinsic`` (if present), ``img_decode_scale`` (1 after the warp).

    Added keys: ``img_aug_matrix`` (float32 ``(N, 4, 4)``, source to augmented pixel
    coordinates as the stock ``mat``; composed with an existing one), and in deferred mode
    ``img_warp``, ``img_valid_box`` and ``img_warp_size``.

    Examples:
        >>> import numpy as np
        >>> t = MultiViewAffineAug()
        >>> results = dict(img=[np.zeros((90, 160, 3), np.uint8)], lidar2img=[np.eye(4)],
        ...                aug_config=dict(resize=0.5, crop=(4, 13, 74, 45), flip=True,
        ...                                rotate=2.0))
        >>> out = t(results)
        >>> out['img'][0].shape, out['img'][0].dtype, out['img_aug_matrix'].shape
        ((32, 70, 3), dtype('uint8'), (1, 4, 4))
    """

    def __init__(self, interpolation: str = 'bilinear', to_float32: bool = False) -> None:
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f'MultiViewAffineAug: interpolation must be one of '
                             f'{sorted(INTERPOLATIONS)}, got {interpolation!r}')
        self.interpolation = interpolation
        self.to_float32 = to_float32

    def transform(self, results: Dict) -> Dict:
        """Warp every camera image (or only compute the warps) and update the projections.

        Args:
            results (dict): The sample; see the class docstring for the keys.

        Returns:
            dict: ``results``, modified in place.
        """
        aug_config = results.get('aug_config')
        if aug_config is None:
            return results
        deferred = results.get('img') is None and 'img_bytes' in results
        factor = int(results.get('img_decode_scale', 1))
        sources = results['img_bytes'] if deferred else results['img']
        shapes = self._full_shapes(results, sources, deferred or factor != 1)

        mats, warps, boxes, out_imgs, out_shapes = [], [], [], [], []
        masks = {}
        for i, (height, width) in enumerate(shapes):
            mat = projection_matrix(aug_config, height, width)
            warp, out_size = source_warp(aug_config, height, width)
            # float32 is what travels to the GPU; the CPU warp uses the same numbers.
            warp = warp.astype(np.float32)
            mats.append(mat)
            warps.append(warp)
            out_shapes.append(out_size)
            if deferred:
                boxes.append(crop_box(aug_config, height, width))
            else:
                out_imgs.append(self._warp_one(results, i, warp, factor, out_size, masks))
            if 'lidar2img' in results:
                results['lidar2img'][i] = mat @ results['lidar2img'][i]
            if 'cam_intrinsic' in results:
                results['cam_intrinsic'][i][:3, :3] = (
                    mat[:3, :3] @ results['cam_intrinsic'][i][:3, :3])

        aug = np.stack(mats).astype(np.float32) if mats else np.zeros((0, 4, 4), np.float32)
        if results.get('img_aug_matrix') is not None:
            aug = np.matmul(aug, np.asarray(results['img_aug_matrix'], np.float32))
        results['img_aug_matrix'] = aug
        results['img_shape'] = out_shapes
        if deferred:
            results['img_warp'] = (np.stack(warps) if warps else np.zeros((0, 3, 3), np.float32))
            results['img_valid_box'] = (np.stack(boxes).astype(np.float32) if boxes else
                                        np.zeros((0, 4), np.float32))
            sizes = set(out_shapes)
            if len(sizes) > 1:
                raise ValueError(f'MultiViewAffineAug: cameras of one sample give different '
                                 f'output sizes {sorted(sizes)}')
            results['img_warp_size'] = out_shapes[0] if out_shapes else (0, 0)
        else:
            if self.to_float32:
                out_imgs = [img.astype(np.float32) for img in out_imgs]
            results['img'] = out_imgs
            results['img_decode_scale'] = 1
        return results

    @staticmethod
    def _full_shapes(results: Dict, sources: List, from_ori_shape: bool) -> List[Tuple]:
        """Full-resolution ``(H, W)`` per camera, as the stock chain would see it."""
        if from_ori_shape:
            if 'ori_shape' not in results:
                raise KeyError('MultiViewAffineAug: results has no ori_shape (the '
                               'full-resolution image size); load images with '
                               'turbox_mm.LoadMultiViewImagesTurbo')
            hw = tuple(int(v) for v in results['ori_shape'][:2])
            return [hw] * len(sources)
        return [tuple(img.shape[:2]) for img in sources]

    def _warp_one(self, results: Dict, index: int, warp: np.ndarray, factor: int,
                  out_size: Tuple[int, int], masks: Dict) -> np.ndarray:
        """Warp camera ``index``; zero what the stock rotation leaves empty."""
        out = warp_image(results['img'][index], warp, factor, out_size, self.interpolation)
        channels = 1 if out.ndim == 2 else out.shape[2]
        key = (out_size, channels)
        if key not in masks:
            mask = rotation_mask(results['aug_config'], out_size)
            if mask is not None and out.ndim == 3:
                mask = np.repeat(mask[..., None], channels, axis=2)
            masks[key] = mask
        if masks[key] is not None:
            if channels <= 4:
                cv2.multiply(out, masks[key], dst=out)
            else:
                np.multiply(out, masks[key], out=out)
        return out

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}(interpolation={self.interpolation!r}, '
                f'to_float32={self.to_float32})')
