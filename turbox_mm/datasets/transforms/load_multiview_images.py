"""Multi-view image loading through libjpeg-turbo, with DCT-scaled and deferred decoding."""
import copy
import warnings
from typing import Dict, List, Optional, Tuple

import cv2
import mmcv
import numpy as np
from mmcv.transforms import BaseTransform
from mmengine.fileio import get

from turbox_mm.registry import TRANSFORMS

from .jpeg_utils import block_average, jpeg_info, jpeg_scan_complete  # noqa: F401 (public here)

try:  # libjpeg-turbo shipped inside the wheel
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    simplejpeg = None

DECODERS = ('auto', 'simplejpeg', 'cv2')
COLOR_TYPES = ('unchanged', 'color', 'color_ignore_orientation', 'grayscale',
               'grayscale_ignore_orientation')
# color_type values under which OpenCV applies a JPEG's EXIF orientation.
_ORIENTING = ('color', 'grayscale')
_CV2_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                8: cv2.IMREAD_REDUCED_COLOR_8}
_warned = {'fallback': False}


@TRANSFORMS.register_module()
class LoadMultiViewImagesTurbo(BaseTransform):
    """Load the images of all cameras through libjpeg-turbo; optionally smaller, or later.

    The turbox twin of mmdet3d 1.4's ``LoadMultiViewImageFromFiles``: it reads the same keys
    and writes the same keys and values (``filename``, ``cam2img``, ``lidar2cam``,
    ``ori_cam2img``, ``img``, ``img_shape``, ``ori_shape``, ``pad_shape``, ``scale_factor``,
    ``img_norm_cfg``, ``num_views``, ``num_ref_frames``), with three differences:

    - **Decoder.** JPEGs are decoded by libjpeg-turbo through ``simplejpeg`` (accurate
      integer DCT and fancy upsampling, OpenCV's settings: the pixels equal
      ``mmcv.imfrombytes``'s exactly). Without ``simplejpeg`` it warns once and decodes with
      OpenCV. Files that are not baseline/progressive 3-component JPEGs, ``grayscale`` color
      types and JPEGs whose EXIF orientation OpenCV would apply go through
      ``mmcv.imfrombytes`` as stock. Images stay uint8 (each its own contiguous array; stock
      returns views of one stacked array) unless ``to_float32=True``.
    - **DCT-scaled decoding** (``scaled_decode=True``). When the sample's resize factor ``r``
      (``results['aug_config']['resize']``, else ``max_resize``) allows it, each JPEG is
      decoded at ``1 / d`` scale in the DCT domain, ``d`` the largest of 2, 4, 8 (up to
      ``max_decode_factor``) with ``r * d <= 1``: the decoded image still has at least as
      many pixels as the resized one the stock chain makes, and the coefficients the scaled
      IDCT drops lie above the frequencies that the stock resize (antialiased, from full
      resolution) keeps, so nothing the stock output holds is lost. Decoding skips most of
      the IDCT and colour conversion work (about 20% less time at 1/2 for a 1600x900
      quality-90 JPEG; entropy decoding dominates). ``results['img']`` then holds the
      smaller images, ``results['img_decode_scale'] = d`` and ``ori_shape`` stays the
      full-resolution shape: follow with :class:`MultiViewAffineAug`, which maps from the
      scaled source (the stock ``ResizeCropFlipImage`` would not know and must not follow).
      The result differs slightly from the stock chain's; see :class:`MultiViewAffineAug` for
      the measured tolerance. ``aug_config`` present but None (no augmentation) means
      ``d = 1``.
    - **Deferred decoding** (``decode_on='gpu'``). Only the file bytes are read:
      ``results['img_bytes']`` (list of bytes, one per camera) and no ``img``; the sizes come
      from the JPEG headers: ``img_src_shapes`` (list of ``(H, W, C)`` per camera) and
      ``img_shape``/``ori_shape``/``pad_shape`` as stock would set them (the largest size).
      :class:`MultiViewAffineAug` then computes the warps for the GPU. Every file must be a
      JPEG; EXIF orientation is not applied (nvJPEG does not), so an oriented JPEG under an
      orienting ``color_type`` is refused.

    All modes set ``results['img_decode_scale']`` (1 unless scaled) and ``img_src_shapes``.
    A missing, unreadable or corrupt file raises an error that names the file, the camera
    and ``results['sample_idx']``.

    Args:
        to_float32 (bool): Convert the images to float32, as stock. Defaults to False.
        color_type (str): As stock: ``'unchanged'``, ``'color'``, ``'grayscale'``, or those
            with ``'_ignore_orientation'``. Defaults to ``'unchanged'``.
        backend_args (dict, optional): mmengine file backend arguments. Defaults to None.
        num_views (int): Number of cameras, recorded in ``results``. Defaults to 5.
        num_ref_frames (int): Only -1 (no previous frames); use the stock loader for
            multi-frame image loading. Defaults to -1.
        test_mode (bool): Kept for the stock signature; unused with ``num_ref_frames=-1``.
            Defaults to False.
        set_default_scale (bool): Set ``scale_factor = 1.0``, as stock. Defaults to True.
        channel_order (str): ``'bgr'`` (stock) or ``'rgb'``. Defaults to ``'bgr'``.
        decoder (str): ``'auto'`` (simplejpeg, else OpenCV with a warning), ``'simplejpeg'``
            or ``'cv2'``. Defaults to ``'auto'``.
        scaled_decode (bool): Decode at 1/2, 1/4 or 1/8 scale where the resize allows.
            Defaults to False.
        max_resize (float, optional): The largest resize factor the pipeline applies, for
            samples without ``aug_config`` (e.g. ``resize_lim[1]``). Defaults to None.
        max_decode_factor (int): The largest ``d`` to use (1, 2, 4 or 8). Defaults to 8.
        decode_on (str): ``'cpu'`` or ``'gpu'`` (deferred). Defaults to ``'cpu'``.
        strict (bool): Raise on JPEGs that libjpeg-turbo can only partly decode (e.g.
            truncated files; OpenCV would return them with grey rows). Defaults to True.

    Examples:
        >>> import os, tempfile, cv2, numpy as np
        >>> d = tempfile.mkdtemp()
        >>> path = os.path.join(d, 'cam.jpg')
        >>> _ = cv2.imwrite(path, np.full((90, 160, 3), 100, np.uint8))
        >>> results = dict(images=dict(CAM_FRONT=dict(img_path=path, cam2img=np.eye(3),
        ...                                           lidar2cam=np.eye(4))))
        >>> out = LoadMultiViewImagesTurbo(num_views=1)(results)
        >>> out['img'][0].shape, out['img'][0].dtype, out['ori_shape']
        ((90, 160, 3), dtype('uint8'), (90, 160))
    """

    def __init__(self,
                 to_float32: bool = False,
                 color_type: str = 'unchanged',
                 backend_args: Optional[dict] = None,
                 num_views: int = 5,
                 num_ref_frames: int = -1,
                 test_mode: bool = False,
                 set_default_scale: bool = True,
                 channel_order: str = 'bgr',
                 decoder: str = 'auto',
                 scaled_decode: bool = False,
                 max_resize: Optional[float] = None,
                 max_decode_factor: int = 8,
                 decode_on: str = 'cpu',
                 strict: bool = True) -> None:
        name = type(self).__name__
        if num_ref_frames > 0:
            raise NotImplementedError(
                f'{name}: num_ref_frames={num_ref_frames} (previous frames) is not supported; '
                f'use the stock LoadMultiViewImageFromFiles for multi-frame image loading')
        if color_type not in COLOR_TYPES:
            raise ValueError(f'{name}: color_type must be one of {COLOR_TYPES}, '
                             f'got {color_type!r}')
        if channel_order not in ('bgr', 'rgb'):
            raise ValueError(f"{name}: channel_order must be 'bgr' or 'rgb', "
                             f'got {channel_order!r}')
        if decoder not in DECODERS:
            raise ValueError(f'{name}: decoder must be one of {DECODERS}, got {decoder!r}')
        if decode_on not in ('cpu', 'gpu'):
            raise ValueError(f"{name}: decode_on must be 'cpu' or 'gpu', got {decode_on!r}")
        if max_decode_factor not in (1, 2, 4, 8):
            raise ValueError(f'{name}: max_decode_factor must be 1, 2, 4 or 8, '
                             f'got {max_decode_factor!r}')
        if decode_on == 'gpu' and (to_float32 or scaled_decode):
            raise ValueError(f'{name}: decode_on="gpu" keeps the bytes; to_float32 and '
                             f'scaled_decode apply to CPU decoding only')
        if decoder == 'simplejpeg' and simplejpeg is None:
            raise ImportError(f"{name}: decoder='simplejpeg' but simplejpeg is not installed "
                              f'(pip install simplejpeg)')
        self.to_float32 = to_float32
        self.color_type = color_type
        self.backend_args = backend_args
        self.num_views = num_views
        self.num_ref_frames = num_ref_frames
        self.test_mode = test_mode
        self.set_default_scale = set_default_scale
        self.channel_order = channel_order
        self.decoder = decoder
        self.scaled_decode = scaled_decode
        self.max_resize = max_resize
        self.max_decode_factor = max_decode_factor
        self.decode_on = decode_on
        self.strict = strict

    @property
    def use_simplejpeg(self) -> bool:
        """Whether JPEGs go through simplejpeg (else OpenCV)."""
        if self.decoder == 'cv2':
            return False
        if simplejpeg is not None:
            return True
        if not _warned['fallback']:
            _warned['fallback'] = True
            warnings.warn(f'{type(self).__name__}: simplejpeg is not installed, decoding '
                          f'with OpenCV (a few percent slower; pip install simplejpeg)')
        return False

    def decode_factor(self, results: Dict) -> int:
        """The DCT scale denominator ``d`` for this sample (1 = full resolution).

        Args:
            results (dict): The sample; ``aug_config['resize']`` is read when present.

        Returns:
            int: 1, 2, 4 or 8.
        """
        if not self.scaled_decode:
            return 1
        if 'aug_config' in results:
            aug = results['aug_config']
            resize = None if aug is None else aug.get('resize', 1)
        else:
            resize = self.max_resize
        if resize is None or not resize > 0:
            return 1
        for d in (8, 4, 2):
            if d <= self.max_decode_factor and resize * d <= 1.0:
                return d
        return 1

    def _decode_cameras(self, datas: List, filename: List[str], cams: List[str], factor: int,
                        results: Dict) -> Tuple[List[np.ndarray], List[tuple], tuple]:
        """Decode every camera at ``1 / factor``: the images, their source shapes and the
        largest source ``(h, w)``; cameras decoding to different channel counts are an error
        naming the sample."""
        imgs, src_shapes = [], []
        for data, path, cam in zip(datas, filename, cams):
            img, src_shape = self._decode(data, factor, path, cam, results)
            imgs.append(img)
            src_shapes.append(src_shape)
        if len({img.shape[2:] for img in imgs}) > 1:
            raise ValueError(f'{type(self).__name__}: the cameras of sample '
                             f'{results.get("sample_idx")} decode to different numbers of '
                             f'channels: {[img.shape for img in imgs]}')
        full_shape = tuple(int(v) for v in np.max([s[:2] for s in src_shapes], axis=0))
        return imgs, src_shapes, full_shape

    @staticmethod
    def _camera_lists(results: Dict) -> Tuple[List[str], List[str]]:
        """``(image paths, camera names)`` in the info's camera order; writes mmdet3d's
        ``filename``, ``cam2img``, ``lidar2cam`` and ``ori_cam2img`` into ``results``."""
        items = list(results['images'].items())
        results['filename'] = [item['img_path'] for _, item in items]
        results['cam2img'] = [item['cam2img'] for _, item in items]
        results['lidar2cam'] = [item['lidar2cam'] for _, item in items]
        results['ori_cam2img'] = copy.deepcopy(results['cam2img'])
        return results['filename'], [cam for cam, _ in items]

    def transform(self, results: Dict) -> Dict:
        """Read (and decode) every camera's image.

        Args:
            results (dict): The sample; ``images`` maps each camera to a dict with
                ``img_path``, ``cam2img`` and ``lidar2cam``.

        Returns:
            dict: ``results`` with the keys described in the class docstring.
        """
        filename, cams = self._camera_lists(results)
        datas = [self._read(path, cam, results) for path, cam in zip(filename, cams)]
        if self.decode_on == 'gpu':
            return self._deferred(results, datas, filename, cams)

        factor = self.decode_factor(results)
        imgs, src_shapes, full_shape = self._decode_cameras(datas, filename, cams, factor,
                                                            results)
        if len({img.shape for img in imgs}) > 1:  # as stock: pad to the largest
            pad = tuple(int(v) for v in np.max([img.shape[:2] for img in imgs], axis=0))
            imgs = [mmcv.impad(img, shape=pad, pad_val=0) for img in imgs]
        if self.to_float32:
            imgs = [img.astype(np.float32) for img in imgs]

        results['img'] = imgs
        results['img_shape'] = imgs[0].shape[:2]
        results['ori_shape'] = full_shape if factor > 1 else imgs[0].shape[:2]
        channels = imgs[0].shape[2] if imgs[0].ndim == 3 else None
        self._set_common(results, channels, imgs[0].shape[:2], factor, src_shapes)
        return results

    def _set_common(self, results: Dict, channels: Optional[int], pad_shape: Tuple,
                    factor: int, src_shapes: List) -> None:
        results['pad_shape'] = pad_shape
        if self.set_default_scale:
            results['scale_factor'] = 1.0
        # Stock reads the channels from its stacked (h, w, c, n) array, which for 2-D
        # (grey) images is (h, w, n): it then records n channels. Kept.
        num_channels = len(src_shapes) if channels is None else channels
        results['img_norm_cfg'] = dict(
            mean=np.zeros(num_channels, dtype=np.float32),
            std=np.ones(num_channels, dtype=np.float32),
            to_rgb=False)
        results['num_views'] = self.num_views
        results['num_ref_frames'] = self.num_ref_frames
        results['img_decode_scale'] = factor
        results['img_src_shapes'] = src_shapes

    def _deferred(self, results: Dict, datas: List[bytes], filename: List[str],
                  cams: List[str]) -> Dict:
        src_shapes = []
        for data, path, cam in zip(datas, filename, cams):
            info = self._info(data, path, cam, results)
            if info is None:
                raise ValueError(self._where('decode_on="gpu" needs JPEG files; not a JPEG',
                                             path, cam, results))
            height, width, comps, orientation = info
            if not jpeg_scan_complete(data):
                raise ValueError(self._where(
                    f'truncated JPEG (no end-of-image marker after its scan data; '
                    f'{len(data)} bytes)', path, cam, results))
            if orientation != 1 and self.color_type in _ORIENTING:
                raise ValueError(self._where(
                    f'EXIF orientation {orientation} cannot be applied with decode_on="gpu" '
                    f"(use color_type='color_ignore_orientation' or decode on the CPU)", path,
                    cam, results))
            channels = 1 if self.color_type.startswith('grayscale') else (
                1 if comps == 1 and self.color_type == 'unchanged' else 3)
            src_shapes.append((height, width, channels))
        full = tuple(int(v) for v in np.max([s[:2] for s in src_shapes], axis=0))
        results['img_bytes'] = datas
        results['img'] = None
        results['img_shape'] = full
        results['ori_shape'] = full
        gray_2d = src_shapes[0][2] == 1  # stock decodes those to (H, W)
        self._set_common(results, None if gray_2d else src_shapes[0][2], full, 1,
                         src_shapes)
        return results

    def _where(self, what: str, path: str, cam: str, results: Dict) -> str:
        return (f'{type(self).__name__}: {what}: {path} (camera {cam}, sample_idx '
                f'{results.get("sample_idx")})')

    def _read(self, path: str, cam: str, results: Dict) -> bytes:
        try:
            data = get(path, backend_args=self.backend_args)
        except FileNotFoundError as e:
            raise FileNotFoundError(self._where('image file not found', path, cam,
                                                results)) from e
        except OSError as e:
            raise OSError(self._where(f'cannot read image ({e})', path, cam, results)) from e
        if not data:
            raise ValueError(self._where('empty image file', path, cam, results))
        return data

    def _info(self, data: bytes, path: str, cam: str, results: Dict):
        try:
            return jpeg_info(data)
        except ValueError as e:
            raise ValueError(self._where(f'corrupt JPEG ({e})', path, cam, results)) from e

    def _decode(self, data: bytes, factor: int, path: str, cam: str,
                results: Dict) -> Tuple[np.ndarray, Tuple[int, int, int]]:
        """Decode one image at ``1 / factor``; return it and its full-resolution shape."""
        info = self._info(data, path, cam, results)
        # 3-component JPEGs under a colour type that OpenCV decodes to BGR go through
        # libjpeg-turbo directly, unless OpenCV would rotate them by their EXIF orientation.
        fast = (info is not None and info[2] == 3
                and self.color_type in ('unchanged', 'color', 'color_ignore_orientation')
                and not (info[3] != 1 and self.color_type in _ORIENTING))
        try:
            if fast:
                img = self._decode_jpeg(data, factor, info)
                src_shape = (info[0], info[1], 3)
            else:
                img, src_shape = self._decode_generic(data, factor)
        except ValueError as e:
            raise ValueError(self._where(f'corrupt image ({e})', path, cam, results)) from e
        if img is None:
            raise ValueError(self._where('corrupt image (cannot be decoded)', path, cam,
                                         results))
        return img, src_shape

    def _decode_jpeg(self, data: bytes, factor: int, info: Tuple) -> np.ndarray:
        height, width = info[0], info[1]
        out_h, out_w = -(-height // factor), -(-width // factor)
        if self.use_simplejpeg:
            colorspace = 'BGR' if self.channel_order == 'bgr' else 'RGB'
            kwargs = {} if factor == 1 else dict(min_height=out_h, min_width=out_w)
            img = simplejpeg.decode_jpeg(data, colorspace=colorspace, strict=self.strict,
                                         **kwargs)
        else:
            buf = np.frombuffer(data, np.uint8)
            flag = (cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
                    if factor == 1 else _CV2_REDUCED[factor] | cv2.IMREAD_IGNORE_ORIENTATION)
            img = cv2.imdecode(buf, flag)
            if img is not None and self.channel_order == 'rgb':
                img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        if img is not None and img.shape[:2] != (out_h, out_w):
            raise ValueError(f'decoded {img.shape[:2]}, expected {(out_h, out_w)}')
        return img

    def _decode_generic(self, data: bytes, factor: int) -> Tuple[Optional[np.ndarray], Tuple]:
        """Stock decoding (``mmcv.imfrombytes``), then a block average for ``factor > 1``."""
        img = mmcv.imfrombytes(data, flag=self.color_type)
        if img is None:
            return None, ()
        src_shape = (img.shape[0], img.shape[1], img.shape[2] if img.ndim == 3 else 1)
        if self.channel_order == 'rgb' and img.ndim == 3 and img.shape[2] == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        if factor > 1:
            img = block_average(img, factor)
        return img, src_shape

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}(to_float32={self.to_float32}, '
                f"color_type='{self.color_type}', num_views={self.num_views}, "
                f'num_ref_frames={self.num_ref_frames}, test_mode={self.test_mode}, '
                f'decoder={self.decoder!r}, scaled_decode={self.scaled_decode}, '
                f'decode_on={self.decode_on!r})')
