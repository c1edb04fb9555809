"""A Det3DDataPreprocessor that does the image work of the loader workers on the device.

:class:`TurboxDet3DDataPreprocessor` extends mmdet3d's ``Det3DDataPreprocessor``; everything
it does not mention (points, voxelisation, padding metadata, boxes, batch augmentations) is
the stock code path. It adds three things:

1. **uint8 in, float on the device.** The pipeline stops before normalisation, so images cross
   PCIe as uint8 (4x fewer bytes than float32). The batch is stacked on the device and converted
   in one pass: channel conversion on uint8, then ``(x - mean) / std`` in float32, written
   straight into the (padded) output. These are the stock preprocessor's operations in the stock
   order, so the result is the same to the bit (and within 1e-6 of mmcv's ``imnormalize``, as a
   CPU ``NormalizeMultiviewImage`` computes it).
2. **Photometric distortion on the device** (``photometric=dict(...)``, training only): the
   operations of mmdet's ``PhotoMetricDistortion`` / Sparse4D's and BEVFormer's
   ``PhotoMetricDistortionMultiViewImage`` (brightness, contrast before or after the HSV step,
   saturation, hue, channel swap), applied to every image of the batch at once on BGR pixels
   in [0, 255] before normalisation. The HSV conversions follow OpenCV's float formulas. The
   random parameters are drawn per image from a CPU :class:`torch.Generator` (see
   :class:`PhotometricParams`); that stream differs from the numpy stream of the CPU transform,
   so the two agree in distribution, not draw by draw. With the same parameters the two agree
   to 1e-3 (``tests/test_gpu_preprocessor.py``).
3. **Deferred JPEG decoding.** When the batch carries the compressed bytes of each camera (see
   :mod:`turbox_mm.datasets.transforms.pack_jpeg_bytes`), the whole batch is decoded in one call
   with nvJPEG (``torchvision.io.decode_jpeg(list, device='cuda')`` or NVIDIA's
   ``nvidia.nvimgcodec``) and warped to the output size as the CPU ``MultiViewAffineAug``
   warps: where the warp shrinks by 2 or more (Sparse4D's about 2.2) the source is first
   block-averaged by 2 (4, 8; ``avg_pool2d``, rounded as the CPU's uint8 block average) and
   the warp re-targeted to it, against aliasing; then ``grid_sample`` (bilinear, zero border:
   OpenCV's ``warpAffine`` with ``INTER_LINEAR | WARP_INVERSE_MAP`` and ``BORDER_CONSTANT``
   0), rounded to uint8; samples outside the valid box (the crop, which the rotation turns:
   the black corners of the stock PIL rotate) are zeroed with the CPU transform's rounding;
   the channels are put in BGR order. On CUDA all of that is one Triton kernel per image
   size (``torch.ops.turbox_mm.warp_affine_u8``, :mod:`turbox_mm.ops.image_warp`). That is
   what the CPU ``LoadMultiViewImagesTurbo`` + ``MultiViewAffineAug`` produce, up to
   interpolation rounding (measured on Sparse4D's augmentation: mean below 0.1 grey level,
   99th percentile 1) and decoder differences (none for 4:4:4 JPEGs; chroma upsampling for
   4:2:0). From there on it is the uint8 path above.
   Without CUDA or without a GPU decoder, batches are decoded with OpenCV and warped in the
   main process after one warning: slow, but the CPU transform's operations, so its pixels.
   When the GPU decoder fails on a batch (``decode_backend='auto'``), that batch goes to the
   next GPU decoder or to OpenCV and the next batch tries the GPU decoder again; the failures
   are counted (``decode_fallbacks``; an out-of-memory error is raised, not counted) and
   reported in warnings at the 1st, 2nd, 4th, 8th, ...
   failed batch, with the image files of the batch. After
   :data:`MAX_FAILED_BATCHES_IN_A_ROW` failed batches in a row the decoder is given up for
   the rest of the run, with a warning. An image that no decoder can read raises an error
   naming its file (from the samples' ``img_path``). ``decode_backend`` (or the environment
   variable ``TURBOX_DECODE_BACKEND``) picks a backend explicitly; an explicit GPU backend
   that cannot run, or fails, raises instead of falling back.

With ``refill_padding`` (MapTR's pipelines, ``turbox.data.fast_pipeline``), images that the
pipeline padded as uint8 (``PadMultiViewImage``) get their padding, outside each camera's
metainfo ``ori_shape``, set to that value after normalisation, where the stock pipeline pads
the normalised images.

Deferred data contract (per sample, as ``PackJpegBytes`` packs it; mmengine's
``pseudo_collate`` turns each key into a list over the batch, numpy arrays untouched, and
``cast_data`` leaves numpy arrays on the host, which is what nvJPEG wants)::

    inputs['img_bytes']          np.uint8  [total]   the N JPEG streams, concatenated
    inputs['img_bytes_offsets']  np.int64  [N + 1]   camera i is img_bytes[off[i]:off[i + 1]]
    inputs['img_warp']           np.float32 [N, 3, 3] (multi-view) or [3, 3] (single view):
                                 OUTPUT pixel (x, y, 1) -> SOURCE pixel, pixel centres at
                                 integer coordinates (cv2.warpAffine with WARP_INVERSE_MAP)
    inputs['img_warp_size']      np.int64  [2]       output (H, W)
    inputs['img_valid_box']      np.float32 [N, 4] or [4], optional: (x0, y0, x1, y1) in
                                 SOURCE pixels; a sample at (x_src, y_src) is kept iff
                                 x0 <= x_src < x1 and y0 <= y_src < y1, else 0 (absent: all
                                 kept; see MultiViewAffineAug's deferred mode)

The decoded batch replaces them as ``inputs['img']`` (uint8 [N, 3, H, W] or [3, H, W] per
sample, BGR), so padding metadata and everything after it is the stock code's.

CUDA streams: nvJPEG's hardware engine does not order its writes after work already queued on
the stream it is given (pytorch/vision#9606, meta-pytorch/torchcodec#1634), so a decoder handed
memory that queued kernels still read can overwrite it. Decoding therefore runs on a private
stream that is drained (a host wait for our own previous decode and warp only, never the
training stream) before each decode; the warped output is handed to the caller's stream with
``wait_stream`` and ``record_stream``.

Examples:
    >>> import torch
    >>> pre = TurboxDet3DDataPreprocessor(mean=[123.675, 116.28, 103.53],
    ...                                   std=[58.395, 57.12, 57.375], bgr_to_rgb=True)
    >>> imgs = torch.randint(0, 256, (6, 3, 32, 48), dtype=torch.uint8)
    >>> out = pre(dict(inputs=dict(img=[imgs, imgs.clone()])))
    >>> tuple(out['inputs']['imgs'].shape), out['inputs']['imgs'].dtype
    ((2, 6, 3, 32, 48), torch.float32)
"""
from typing import List, Optional

import torch
from mmdet3d.models.data_preprocessors import Det3DDataPreprocessor
from mmdet3d.models.data_preprocessors.utils import multiview_img_stack_batch
from mmengine.model import stack_batch
from torch import Tensor

from turbox_mm.ops.photometric import (PhotometricParams, apply_photometric, bgr_to_hsv,
                                       hsv_to_bgr, photometric_normalize)
from turbox_mm.ops.image_warp import block_average_tensor, valid_mask, warp_to_theta
from turbox_mm.registry import MODELS
from .deferred_decode import (DECODE_BACKEND_ENV, DECODE_BACKENDS,  # noqa: F401
                              DEFERRED_KEYS, MAX_FAILED_BATCHES_IN_A_ROW,
                              OPTIONAL_DEFERRED_KEYS, DeferredDecodeMixin)
from .deferred_images import _valid_mask_cv2  # noqa: F401  (tests reach it through here)
from .deferred_images import valid_box_matrices, valid_box_matrix
from .fast_voxelize import FastVoxelizeMixin

__all__ = [
    'TurboxDet3DDataPreprocessor', 'PhotometricParams', 'bgr_to_hsv', 'hsv_to_bgr',
    'apply_photometric', 'warp_to_theta', 'block_average_tensor', 'valid_box_matrix',
    'valid_box_matrices',
    'valid_mask', 'DEFERRED_KEYS', 'OPTIONAL_DEFERRED_KEYS', 'DECODE_BACKENDS'
]


@MODELS.register_module()
class TurboxDet3DDataPreprocessor(DeferredDecodeMixin, FastVoxelizeMixin,
                                  Det3DDataPreprocessor):
    """``Det3DDataPreprocessor`` with uint8 inputs, device-side photometric distortion,
    deferred (nvJPEG) decoding and batched voxelization. See the module docstring for the data
    contract.

    Args:
        photometric (dict, optional): Photometric distortion applied in training, with keys
            ``brightness_delta`` (32), ``contrast_range`` ((0.5, 1.5)), ``saturation_range``
            ((0.5, 1.5)), ``hue_delta`` (18), ``prob`` (0.5: each op's probability),
            ``saturation_clip`` (False; True for mmdet 3's clipping) and ``seed`` (None: drawn
            once from torch's global generator, which the runner seeds). Each rank adds
            ``1_000_003 * rank`` to the seed. Defaults to None (off).
        decode_backend (str): ``'auto'`` (nvImageCodec's hardware JPEG decoder if
            ``nvidia-nvimgcodec-cu13`` is installed, else nvJPEG through torchvision, else
            OpenCV with one warning), ``'torchvision'``, ``'nvimgcodec'`` or ``'cv2'``.
            Defaults to 'auto'.
        op_impl (str): ``'turbox'`` voxelizes the batch in one call of turbox_mm's voxelize
            ops (hard and dynamic voxel types; :mod:`.fast_voxelize`); ``'stock'`` keeps
            mmcv's per-sample op. Defaults to 'stock'.
        refill_padding (float, optional): The images come padded from the pipeline (MapTR's
            ``PadMultiViewImage`` on uint8 images), where the stock pipeline pads after
            normalising: pixels outside each image's unpadded size, the sample's metainfo
            ``ori_shape`` (one ``(h, w[, c])`` per camera, or one for all, as
            ``PadMultiViewImage`` records it), are set to this value after the
            normalisation. Defaults to None (off).
        **kwargs: ``Det3DDataPreprocessor``'s arguments (``mean``, ``std``, ``bgr_to_rgb``,
            ``pad_size_divisor``, ``voxel``, ...).

    Attributes:
        decode_counts (Counter): Images decoded so far, by backend.
        decode_fallbacks (Counter): Batches a GPU decoder failed on so far, by that decoder.
        last_decode_backend (str or None): The backend of the latest deferred batch.
    """

    _PHOTOMETRIC_DEFAULTS = dict(brightness_delta=32, contrast_range=(0.5, 1.5),
                                 saturation_range=(0.5, 1.5), hue_delta=18, prob=0.5,
                                 saturation_clip=False, seed=None)

    def __init__(self, photometric: Optional[dict] = None, decode_backend: str = 'auto',
                 op_impl: str = 'stock', refill_padding: Optional[float] = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.refill_padding = None if refill_padding is None else float(refill_padding)
        self._setup_fast_voxelize(op_impl, kwargs.get('voxel_layer'))
        self.photometric = self._check_photometric(photometric)
        self._setup_deferred_decode(decode_backend)
        self._generator: Optional[torch.Generator] = None
        self._augment = False

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update({k: None for k in self._RUNTIME_STATE})
        return state

    # -- configuration ------------------------------------------------------------------------

    @classmethod
    def _check_photometric(cls, cfg: Optional[dict]) -> Optional[dict]:
        if cfg is None:
            return None
        unknown = sorted(set(cfg) - set(cls._PHOTOMETRIC_DEFAULTS))
        if unknown:
            raise ValueError(f'photometric: unknown keys {unknown}; valid keys: '
                             f'{sorted(cls._PHOTOMETRIC_DEFAULTS)}')
        full = {**cls._PHOTOMETRIC_DEFAULTS, **cfg}
        if not 0 <= full['prob'] <= 1:
            raise ValueError(f"photometric: prob must be in [0, 1], got {full['prob']}")
        for key in ('contrast_range', 'saturation_range'):
            lo, hi = full[key]
            if lo > hi:
                raise ValueError(f'photometric: {key} must be (low, high), got {full[key]}')
        return full

    def photometric_generator(self) -> torch.Generator:
        """The CPU generator of the photometric draws, seeded on first use."""
        if self._generator is None:
            seed = self.photometric['seed']
            if seed is None:
                seed = int(torch.randint(0, 2**31 - 1, (1, )).item())
            from mmengine.dist import get_rank
            self._generator = torch.Generator().manual_seed(int(seed) + 1_000_003 * get_rank())
        return self._generator

    # -- entry points -------------------------------------------------------------------------

    def simple_process(self, data: dict, training: bool = False) -> dict:
        """Decode a deferred batch if there is one, then the stock processing (which calls
        :meth:`collate_data`), with photometric distortion when ``training``."""
        inputs = data.get('inputs') if isinstance(data, dict) else None
        if isinstance(inputs, dict) and any(k in inputs for k in DEFERRED_KEYS):
            data = self._decode_deferred(data)
        self._augment = bool(training and self.photometric is not None)
        try:
            return super().simple_process(data, training)
        finally:
            self._augment = False

    def collate_data(self, data: dict) -> dict:
        """Copy to the device, then stack, convert, distort, normalise and pad the images in
        one batch (per sample where sizes differ, padded by the stock stacking functions)."""
        data = self.cast_data(data)
        imgs = data['inputs'].get('img')
        if imgs is None:
            return super().collate_data(data)
        if isinstance(imgs, Tensor):
            if imgs.dim() != 4:
                raise ValueError('TurboxDet3DDataPreprocessor: a collated image batch must be '
                                 f'[B, C, H, W], got {tuple(imgs.shape)}')
            self._check_channels(imgs.shape)
            batch_imgs = self._process(imgs)
        elif isinstance(imgs, (list, tuple)) and imgs and all(
                isinstance(i, Tensor) for i in imgs):
            batch_imgs = self._process_list(list(imgs))
        else:
            raise TypeError('TurboxDet3DDataPreprocessor: inputs["img"] must be a tensor or a '
                            f'non-empty list of tensors, got {type(imgs).__name__}')
        data.setdefault('data_samples', None)
        if self.refill_padding is not None:
            self._refill_padding(batch_imgs, data['data_samples'])
        data['inputs']['imgs'] = batch_imgs
        return data

    # -- images -------------------------------------------------------------------------------

    def _check_channels(self, shape) -> None:
        channels = shape[-3]
        if channels == 3:
            return
        needs_three = (self._channel_conversion or self.photometric is not None
                       or (self._enable_normalize and self.mean.shape[0] == 3))
        if needs_three:
            raise ValueError('TurboxDet3DDataPreprocessor: images must have 3 channels at dim '
                             f'-3 (for bgr_to_rgb, 3-value mean/std or photometric), got shape '
                             f'{tuple(shape)}')

    def _process_list(self, imgs: List[Tensor]) -> Tensor:
        dims = {i.dim() for i in imgs}
        if len(dims) != 1 or dims.pop() not in (3, 4):
            raise ValueError('TurboxDet3DDataPreprocessor: every sample must be [C, H, W] '
                             '(single view) or [N, C, H, W] (multi-view), got shapes '
                             f'{[tuple(i.shape) for i in imgs]}')
        multiview = imgs[0].dim() == 4
        if multiview and len({i.shape[0] for i in imgs}) != 1:
            raise ValueError('TurboxDet3DDataPreprocessor: samples have different numbers of '
                             f'views: {[i.shape[0] for i in imgs]}')
        if len({i.shape[-3] for i in imgs}) != 1:
            raise ValueError('TurboxDet3DDataPreprocessor: samples have different numbers of '
                             f'channels: {[tuple(i.shape) for i in imgs]}')
        for img in imgs:
            self._check_channels(img.shape)
        if len({tuple(i.shape) for i in imgs}) == 1:
            return self._process(torch.stack(imgs))
        # Mixed image sizes: process per sample, pad and stack as the stock code does.
        processed = [self._process(img[None])[0] for img in imgs]
        if multiview:
            return multiview_img_stack_batch(processed, self.pad_size_divisor, self.pad_value)
        return stack_batch(processed, self.pad_size_divisor, self.pad_value)

    def _process(self, batch: Tensor) -> Tensor:
        """``[B, (N,) C, H, W]`` of any dtype -> float32, distorted, converted, normalised, padded
        to ``pad_size_divisor``.

        Three-channel images go through :func:`turbox_mm.ops.photometric.photometric_normalize`
        (one Triton kernel on CUDA: distortion, channel conversion and normalisation in one
        pass); other channel counts through the same operations as tensor arithmetic.
        """
        if batch.dtype not in (torch.uint8, torch.float32):
            batch = batch.float()
        h, w = batch.shape[-2:]
        if batch.shape[-3] == 3:
            flat = batch.reshape(-1, *batch.shape[-3:])
            if self._augment:
                params = PhotometricParams.sample(
                    flat.shape[0], self.photometric_generator(),
                    **{k: v for k, v in self.photometric.items() if k != 'seed'})
                packed = params.packed().to(flat.device, non_blocking=True)
            else:
                packed = flat.new_zeros((flat.shape[0], 8), dtype=torch.float32)
            if self._enable_normalize:  # one value or three (mmengine allows both)
                mean, std = self.mean.reshape(-1).expand(3), self.std.reshape(-1).expand(3)
            else:
                mean = torch.zeros(3, device=flat.device)
                std = torch.ones(3, device=flat.device)
            clip = bool(self._augment and self.photometric['saturation_clip'])
            processed = photometric_normalize(flat, packed, mean, std, saturation_clip=clip,
                                              reverse_channels=self._channel_conversion,
                                              augment=self._augment).reshape(batch.shape)
            return self._pad(processed, normalized=True)
        if self._channel_conversion:
            batch = batch[..., [2, 1, 0], :, :]
        return self._pad(batch, normalized=False)

    def _pad(self, batch: Tensor, normalized: bool) -> Tensor:
        """Pad to ``pad_size_divisor`` with ``pad_value``, normalising first unless done."""
        h, w = batch.shape[-2:]
        div = self.pad_size_divisor
        ph, pw = -(-h // div) * div, -(-w // div) * div
        if normalized and (ph, pw) == (h, w):
            return batch
        shape = (*batch.shape[:-2], ph, pw)
        if (ph, pw) == (h, w):
            out = torch.empty(shape, dtype=torch.float32, device=batch.device)
            view = out
        else:
            out = torch.full(shape, float(self.pad_value), dtype=torch.float32,
                             device=batch.device)
            view = out[..., :h, :w]
        if self._enable_normalize and not normalized:
            torch.sub(batch, self.mean, out=view)
            view.div_(self.std)
        else:
            view.copy_(batch)
        return out

    def _refill_padding(self, batch: Tensor, data_samples) -> None:
        """Set the pipeline's padding (outside each image's ``ori_shape``) to
        ``refill_padding``, in place: one fill per side where the whole batch shares a size."""
        name = type(self).__name__
        if data_samples is None or len(data_samples) != batch.shape[0]:
            raise ValueError(f'{name}: refill_padding needs one data sample per image batch '
                             'entry (their metainfo ori_shape is the unpadded size)')
        views = batch.shape[1] if batch.dim() == 5 else 1
        sizes = []
        for sample in data_samples:
            shape = sample.metainfo.get('ori_shape')
            if shape is None:
                raise KeyError(f'{name}: refill_padding needs ori_shape in the metainfo (the '
                               'unpadded image sizes, as PadMultiViewImage records them)')
            per_view = (list(shape) if shape and isinstance(shape[0], (tuple, list)) else
                        [shape] * views)
            if len(per_view) != views:
                raise ValueError(f'{name}: ori_shape has {len(per_view)} shapes for {views} '
                                 'views')
            sizes.append([(int(s[0]), int(s[1])) for s in per_view])
        height, width = batch.shape[-2:]
        if any(h > height or w > width for row in sizes for h, w in row):
            raise ValueError(f'{name}: ori_shape {sizes} exceeds the images ({height}, {width})')
        value = self.refill_padding
        if len({hw for row in sizes for hw in row}) == 1:
            h, w = sizes[0][0]
            batch[..., h:, :].fill_(value)
            batch[..., :h, w:].fill_(value)
            return
        for b, row in enumerate(sizes):
            for n, (h, w) in enumerate(row):
                img = batch[b, n] if batch.dim() == 5 else batch[b]
                img[..., h:, :].fill_(value)
                img[..., :h, w:].fill_(value)
