"""Image preprocessing: the CPU pipeline's work against TurboxDet3DDataPreprocessor's on the device.

Rows (full size; ``quick=True`` or a CPU device shrinks every size):

- ``H2D + normalise``: a batch of 6 samples x 6 cameras of 256x704. Stock: images normalised to
  float32 in the loader workers (on a CPU device the row includes that normalisation, done
  with mmcv's ``imnormalize`` as ``NormalizeMultiviewImage`` does), copied from pinned memory and
  stacked by mmdet3d's ``Det3DDataPreprocessor``. Turbox: the same images as uint8 (4x fewer
  bytes over PCIe), converted, normalised and stacked on the device. The note gives the bytes
  each side moves and the largest difference of the outputs.
- ``decode + warp``: one 6-camera sample of 1600x900 JPEGs (textured content, about 500 kB
  each, made once with OpenCV) decoded and warped to 256x704 (nuScenes-style resize by 0.44 and
  bottom crop). Stock: OpenCV decode and ``warpAffine`` on one CPU thread, what a loader worker
  spends per sample. Turbox: one batched nvJPEG decode plus ``grid_sample``, one row per
  available decoder (torchvision, nvimgcodec), timed with CUDA events; on a CPU device, the
  OpenCV fallback. The note gives the mean and largest difference to the OpenCV output.
- ``photometric``: the photometric distortion of one 6-camera sample at 256x704 with every op
  on. Stock: mmdet's ``PhotoMetricDistortion`` on each image (CPU, as a worker runs it). Turbox:
  :func:`turbox_mm.ops.photometric.photometric_normalize` (normalising by 0 and 1) on the six
  images at once on the device.
- on CUDA, ``warp`` and ``photometric + normalise``: the two fused Triton kernels of the data
  preprocessor (:mod:`turbox_mm.ops.image_warp`, :mod:`turbox_mm.ops.photometric`) against their
  PyTorch references on the device, for a batch of 6 samples x 6 cameras.
"""
import contextlib
from typing import Dict, List, Tuple

import numpy as np
import torch

from turbox_mm.benchmark.timing import time_fn
from turbox_mm.datasets.transforms.multiview_affine_aug import block_factor, decoded_warp
from turbox_mm.models.data_preprocessors import gpu_image_preprocessor as gip
from turbox_mm.models.data_preprocessors import deferred_images
from turbox_mm.ops import image_warp
from turbox_mm.ops.photometric import photometric_normalize, photometric_normalize_reference

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
_JPEG_CACHE: Dict[Tuple, List[np.ndarray]] = {}


def textured_image(h: int, w: int, seed: int) -> np.ndarray:
    """A BGR uint8 image with smooth colour blobs, stripes and fine noise (camera-like JPEG
    sizes: about 500 kB at 1600x900, quality 90)."""
    import cv2
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    img = cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img += 40 * np.sin(xx * 0.05 + yy * 0.02 + seed)[..., None]
    img += rng.normal(0, 4, (h, w, 3)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def camera_jpegs(n: int, h: int, w: int, quality: int = 90) -> List[np.ndarray]:
    """``n`` JPEG streams (1-D uint8) of ``h`` x ``w`` textured images, made once per size."""
    import cv2
    key = (n, h, w, quality)
    if key not in _JPEG_CACHE:
        _JPEG_CACHE[key] = [
            cv2.imencode('.jpg', textured_image(h, w, i), [cv2.IMWRITE_JPEG_QUALITY, quality])[1]
            .reshape(-1) for i in range(n)
        ]
    return _JPEG_CACHE[key]


def resize_crop_warp(src_hw: Tuple[int, int], out_hw: Tuple[int, int]) -> np.ndarray:
    """Output pixel -> source pixel matrix of a resize to the output width and a bottom crop."""
    scale = out_hw[1] / src_hw[1]
    top = src_hw[0] * scale - out_hw[0]
    forward = np.array([[scale, 0, 0], [0, scale, -top], [0, 0, 1]])
    return np.linalg.inv(forward).astype(np.float32)


@contextlib.contextmanager
def _cv2_threads(n: int):
    import cv2
    before = cv2.getNumThreads()
    cv2.setNumThreads(n)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def _sizes(quick: bool, on_cuda: bool):
    if quick or not on_cuda:
        return dict(batch=2, views=6, out_hw=(32, 88), src_hw=(90, 160), iters=5, warmup=1)
    return dict(batch=6, views=6, out_hw=(256, 704), src_hw=(900, 1600), iters=30, warmup=5)


def _normalise_row(device: str, size: dict) -> Dict:
    import mmcv
    from mmdet3d.models.data_preprocessors import Det3DDataPreprocessor
    on_cuda = str(device).startswith('cuda')
    b, n, (h, w) = size['batch'], size['views'], size['out_hw']
    gen = torch.Generator().manual_seed(0)
    uint8 = [torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=gen)
             for _ in range(b)]
    mean, std = np.array(MEAN, np.float32), np.array(STD, np.float32)

    def cpu_normalise(batch):  # NormalizeMultiviewImage in the workers: HWC float32, to RGB
        return [torch.from_numpy(np.stack([
            mmcv.imnormalize(img.permute(1, 2, 0).numpy(), mean, std, to_rgb=True)
            for img in sample])).permute(0, 3, 1, 2).contiguous() for sample in batch]

    floats = cpu_normalise(uint8)
    if on_cuda:
        uint8 = [t.pin_memory() for t in uint8]
        floats = [t.pin_memory() for t in floats]
    stock = Det3DDataPreprocessor(non_blocking=True).to(device)
    turbox = gip.TurboxDet3DDataPreprocessor(mean=MEAN, std=STD, bgr_to_rgb=True,
                                             non_blocking=True).to(device)

    def run_stock():
        inputs = floats if on_cuda else cpu_normalise(uint8)
        return stock(dict(inputs=dict(img=inputs)))['inputs']['imgs']

    def run_turbox():
        return turbox(dict(inputs=dict(img=uint8)))['inputs']['imgs']

    diff = (run_stock() - run_turbox()).abs().max().item()
    it, wu = size['iters'], size['warmup']
    stock_ms = time_fn(run_stock, it, wu, device)
    turbox_ms = time_fn(run_turbox, it, wu, device)
    moved = sum(t.numel() for t in uint8)
    where = 'H2D from pinned memory' if on_cuda else 'CPU normalise (imnormalize) + stack'
    return dict(component='gpu_preprocess', case=f'H2D + normalise {b}x[{n},3,{h},{w}]',
                stock=stock_ms, turbox=turbox_ms,
                note=f'{where}; stock moves {4 * moved / 1e6:.1f} MB float32, turbox '
                f'{moved / 1e6:.1f} MB uint8; max|stock-turbox|={diff:.1e}')


def _decode_rows(device: str, size: dict) -> List[Dict]:
    on_cuda = str(device).startswith('cuda')
    n, src_hw, out_hw = size['views'], size['src_hw'], size['out_hw']
    streams = camera_jpegs(n, *src_hw)
    warps = [resize_crop_warp(src_hw, out_hw)] * n
    sizes = [out_hw] * n
    it, wu = max(3, size['iters'] // 3), size['warmup']
    with _cv2_threads(1):
        decode_cv2 = deferred_images._decode_warp_cv2
        reference = torch.stack(decode_cv2(streams, warps, sizes)).float()
        stock_ms = time_fn(lambda: decode_cv2(streams, warps, sizes), it, wu, 'cpu')
    kb = sum(s.size for s in streams) / n / 1e3
    case = f'decode + warp {n}x{src_hw[1]}x{src_hw[0]} JPEG -> {out_hw[0]}x{out_hw[1]}'
    backends = ['torchvision', 'nvimgcodec'] if on_cuda else ['cv2']
    rows = []
    for backend in backends:
        pre = gip.TurboxDet3DDataPreprocessor(decode_backend=backend).to(device)
        try:
            out = pre._decode(streams, warps, sizes)
        except Exception as error:  # a missing or failing decoder is a row, not a crash
            rows.append(dict(component='gpu_preprocess', case=f'{case} [{backend}]',
                             stock=stock_ms, turbox=None,
                             note=f'{backend} unavailable: {str(error)[:120]}'))
            continue
        diff = (torch.stack(out).float().cpu() - reference).abs()
        turbox_ms = time_fn(lambda: pre._decode(streams, warps, sizes), it * 3, wu, device)
        rows.append(dict(
            component='gpu_preprocess', case=f'{case} [{backend}]', stock=stock_ms,
            turbox=turbox_ms,
            note=f'stock: cv2 on 1 thread; {kb:.0f} kB/JPEG; decoded by {pre.last_decode_backend}; '
            f'vs cv2 mean|d|={diff.mean().item():.2f} max|d|={diff.max().item():.0f} levels'))
    return rows


def _photometric_row(device: str, size: dict) -> Dict:
    from mmdet.datasets.transforms import PhotoMetricDistortion
    n, (h, w) = size['views'], size['out_hw']
    imgs = [textured_image(h, w, i) for i in range(n)]
    # mode, five flags, delta, alpha, saturation, hue, permutation (mmdet's _random_flags order)
    draws = (1, 1, 1, 1, 1, 1, 20.0, 1.2, 0.8, 10.0, np.array([2, 0, 1]))
    stock_op = PhotoMetricDistortion()
    stock_op._random_flags = lambda: draws

    def run_stock():
        return [stock_op.transform(dict(img=img))['img'] for img in imgs]

    params = gip.PhotometricParams.from_draws(*[np.full(n, d) for d in draws[:10]],
                                              np.tile(draws[10], (n, 1))).packed().to(device)
    batch = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).to(device)
    zero, one = torch.zeros(3, device=device), torch.ones(3, device=device)

    def run_turbox():  # normalisation by (0, 1): the distortion alone
        return photometric_normalize(batch, params, zero, one)

    ref = torch.from_numpy(np.stack(run_stock())).permute(0, 3, 1, 2)
    diff = (run_turbox().cpu() - ref).abs().max().item()
    it, wu = size['iters'], size['warmup']
    with _cv2_threads(1):
        stock_ms = time_fn(run_stock, it, wu, 'cpu')
    turbox_ms = time_fn(run_turbox, it, wu, device)
    return dict(component='gpu_preprocess', case=f'photometric {n}x[3,{h},{w}]', stock=stock_ms,
                turbox=turbox_ms,
                note=f'stock: mmdet PhotoMetricDistortion per image, 1 thread; every op on; '
                f'max|stock-turbox|={diff:.1e}')


def _kernel_rows(device: str, size: dict) -> List[Dict]:
    """The two fused kernels against their PyTorch references, on the device, for a batch."""
    b, n, src_hw, out_hw = size['batch'], size['views'], size['src_hw'], size['out_hw']
    count = b * n
    gen = torch.Generator().manual_seed(0)
    it, wu = size['iters'], size['warmup']
    src = torch.randint(0, 256, (count, 3, *src_hw), dtype=torch.uint8, generator=gen).to(device)
    full = resize_crop_warp(src_hw, out_hw).astype(np.float64)
    factor = block_factor(full)
    box = (0.0, float(full[1, 2]), float(src_hw[1]), float(src_hw[0]))
    masks = [gip.valid_box_matrix(full + np.array([[0, 0, 0.5 * k], [0, 0, 0], [0, 0, 0]]), box,
                                  out_hw) if k % 2 else None for k in range(count)]
    params = torch.from_numpy(image_warp.pack_params([decoded_warp(full, factor)] * count,
                                                     masks)).to(device)

    def warp_reference():
        return image_warp.warp_affine_u8_reference(src, params, factor, out_hw, True)

    def warp_kernel():
        return image_warp.warp_affine_u8(src, params, factor, out_hw, True)

    warp_diff = (warp_reference().int() - warp_kernel().int()).abs()
    rows = [dict(component='gpu_preprocess',
                 case=f'warp {count}x{src_hw[1]}x{src_hw[0]} -> {out_hw[0]}x{out_hw[1]}',
                 stock=time_fn(warp_reference, it, wu, device),
                 turbox=time_fn(warp_kernel, it, wu, device),
                 note=f'stock: avg_pool2d + affine_grid + grid_sample + float64 box mask (the '
                 f'reference); turbox: one Triton kernel; block {factor}, a valid box on half '
                 f'the images; max|d|={warp_diff.max().item()} level, '
                 f'{(warp_diff > 0).float().mean().item():.1e} of values differ')]
    imgs = torch.randint(0, 256, (count, 3, *out_hw), dtype=torch.uint8, generator=gen)
    packed = gip.PhotometricParams.sample(count, gen, prob=0.5).packed()
    imgs, packed = imgs.to(device), packed.to(device)
    mean, std = torch.tensor(MEAN, device=device), torch.tensor(STD, device=device)

    def photo_reference():
        return photometric_normalize_reference(imgs, packed, mean, std, True, True)

    def photo_kernel():
        return photometric_normalize(imgs, packed, mean, std, True, True)

    photo_diff = (photo_reference() - photo_kernel()).abs().max().item()
    rows.append(dict(component='gpu_preprocess',
                     case=f'photometric + normalise {count}x[3,{out_hw[0]},{out_hw[1]}]',
                     stock=time_fn(photo_reference, it, wu, device),
                     turbox=time_fn(photo_kernel, it, wu, device),
                     note='stock: the elementwise torch reference on the device; turbox: one '
                     f'Triton kernel; each op on with probability 0.5; max|d|={photo_diff:.1e}'))
    return rows


def benchmark(device: str, quick: bool = False) -> List[Dict]:
    """Time image normalisation, JPEG decode + warp and photometric distortion, stock vs turbox.

    Args:
        device (str): ``'cuda'`` (or ``'cuda:N'``) or ``'cpu'``. On the CPU only the CPU sides
            run, at the quick sizes.
        quick (bool): Tiny sizes and few iterations, for tests. Defaults to False.

    Returns:
        list[dict]: Rows ``H2D + normalise``, ``decode + warp`` (one per decoder) and
        ``photometric`` (see the module docstring); on CUDA also ``warp`` and ``photometric +
        normalise``, each fused Triton kernel against its PyTorch reference on a batch.

    Examples:
        >>> rows = benchmark('cpu', quick=True)
        >>> [r['case'].split(' ')[0] for r in rows]
        ['H2D', 'decode', 'photometric']
    """
    on_cuda = str(device).startswith('cuda')
    size = _sizes(quick, on_cuda)
    rows = [_normalise_row(device, size)]
    rows += _decode_rows(device, size)
    rows.append(_photometric_row(device, size))
    if on_cuda:
        rows += _kernel_rows(device, size)
        torch.cuda.empty_cache()
    return rows
