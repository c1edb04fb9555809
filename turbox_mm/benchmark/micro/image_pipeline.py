"""Camera and lidar loading: the stock CPU pipeline against turbox's, per sample.

Images (Sparse4D v3's setting): 6 cameras, 1600x900 JPEGs (quality 90, textured so that
they weigh 300-600 kB like real ones), to 256x704.

- stock: mmdet3d's ``LoadMultiViewImageFromFiles(to_float32=True)`` (OpenCV decode), the
  PIL ``ResizeCropFlipImage``, float32 normalisation on the CPU (Sparse4D's
  ``NormalizeMultiviewImage``: ``mmcv.imnormalize``, to RGB) and the stack to
  ``(N, 3, H, W)`` float32 that its ``NuScenesSparse4DAdaptor`` makes;
- turbox: ``LoadMultiViewImagesTurbo(scaled_decode=True)`` (libjpeg-turbo, 1/2-scale DCT
  decode) and ``MultiViewAffineAug`` (one warp per image), stacked to ``(N, H, W, 3)``
  uint8; normalisation happens on the GPU;
- turbox deferred: the same loader with ``decode_on='gpu'`` and the warp matrices only.

Lidar: the key frame and 10 of 12 sweeps of about 34k points (5 float32 each), mmdet3d's
``LoadPointsFromMultiSweeps`` against ``LoadPointsFromMultiSweepsFast``.

Times are **CPU time** of this process per sample (``time.process_time``, all threads),
what a loader worker spends; OpenCV and torch run single-threaded meanwhile, as in a loader
worker, and so do BLAS libraries where ``threadpoolctl`` is installed (OpenBLAS's spinning
worker threads would otherwise double the CPU time of both sides); stock and turbox take
turns at every iteration. The augmentation parameters are drawn as Sparse4D's dataset draws
them (fixed seed).
"""
import contextlib
import copy
import os
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import cv2
import numpy as np
import torch

from turbox_mm.benchmark.timing import summarize_ms

# Sparse4D v3 nuScenes, 256x704.
DATA_AUG_CONF = dict(resize_lim=(0.40, 0.47), final_dim=(256, 704), bot_pct_lim=(0.0, 0.0),
                     rot_lim=(-5.4, 5.4), H=900, W=1600, rand_flip=True)
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
CAMERAS = ('CAM_FRONT', 'CAM_FRONT_RIGHT', 'CAM_FRONT_LEFT', 'CAM_BACK', 'CAM_BACK_LEFT',
           'CAM_BACK_RIGHT')


def textured_image(seed: int, height: int = 900, width: int = 1600) -> np.ndarray:
    """A camera-like uint8 BGR image: 1/f^1.5 coloured noise, flat boxes, sensor noise.

    At 1600x900 it encodes to about 330 kB at JPEG quality 90.

    Args:
        seed (int): Seed of the image.
        height (int): Height. Defaults to 900.
        width (int): Width. Defaults to 1600.

    Returns:
        np.ndarray: ``(height, width, 3)`` uint8.
    """
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    freq = np.sqrt(fx**2 + fy**2)
    freq[0, 0] = 1.0
    amp = freq**-1.5
    amp[0, 0] = 0.0
    phase = rng.random(amp.shape + (3, ))
    field = np.fft.irfft2(amp[..., None] * np.exp(2j * np.pi * phase), s=(height, width),
                          axes=(0, 1))
    field /= field.std(axis=(0, 1))
    mix = np.array([[1.0, 0.8, 0.6], [0.8, 1.0, 0.8], [0.6, 0.8, 1.0]])
    img = (field @ mix.T) * 35.0 + 128.0
    scale = min(height, width) / 900.0
    for _ in range(40):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1 = x0 + int(rng.integers(10, 300) * scale) + 1
        y1 = y0 + int(rng.integers(10, 200) * scale) + 1
        cv2.rectangle(img, (x0, y0), (x1, y1), [float(v) for v in rng.uniform(0, 255, 3)], -1)
    img += rng.normal(0.0, 5.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_camera_jpegs(dirname: str, num: int, height: int = 900, width: int = 1600,
                       quality: int = 90, seed: int = 0) -> List[str]:
    """Write ``num`` textured JPEGs into ``dirname``; return their paths.

    Args:
        dirname (str): An existing folder.
        num (int): Number of images.
        height (int): Height. Defaults to 900.
        width (int): Width. Defaults to 1600.
        quality (int): JPEG quality. Defaults to 90.
        seed (int): Seed of the first image (then ``seed + 1``, ...). Defaults to 0.

    Returns:
        list[str]: The paths, ``cam{k}.jpg``.
    """
    paths = []
    for k in range(num):
        path = os.path.join(dirname, f'cam{k}.jpg')
        ok, buf = cv2.imencode('.jpg', textured_image(seed + k, height, width),
                               [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError(f'cannot encode {path}')
        with open(path, 'wb') as f:
            f.write(buf.tobytes())
        paths.append(path)
    return paths


def sparse4d_aug_config(rng: np.random.Generator, conf: Dict = DATA_AUG_CONF,
                        test_mode: bool = False) -> Dict:
    """Augmentation parameters as Sparse4D's dataset ``get_augmentation`` draws them.

    Args:
        rng (np.random.Generator): Source of randomness.
        conf (dict): ``data_aug_conf``. Defaults to Sparse4D v3's (256x704).
        test_mode (bool): The deterministic test-time parameters. Defaults to False.

    Returns:
        dict: ``resize``, ``resize_dims``, ``crop``, ``flip``, ``rotate``.
    """
    H, W = conf['H'], conf['W']
    fH, fW = conf['final_dim']
    if test_mode:
        resize = max(fH / H, fW / W)
        new_w, new_h = int(W * resize), int(H * resize)
        crop_h = int((1 - np.mean(conf['bot_pct_lim'])) * new_h) - fH
        crop_w = int(max(0, new_w - fW) / 2)
        flip, rotate = False, 0
    else:
        resize = rng.uniform(*conf['resize_lim'])
        new_w, new_h = int(W * resize), int(H * resize)
        crop_h = int((1 - rng.uniform(*conf['bot_pct_lim'])) * new_h) - fH
        crop_w = int(rng.uniform(0, max(0, new_w - fW)))
        flip = bool(conf['rand_flip'] and rng.choice([0, 1]))
        rotate = rng.uniform(*conf['rot_lim'])
    return dict(resize=resize, resize_dims=(new_w, new_h),
                crop=(crop_w, crop_h, crop_w + fW, crop_h + fH), flip=flip, rotate=rotate)


def camera_results(paths: Sequence[str], aug_config: Optional[Dict],
                   sample_idx: int = 0) -> Dict:
    """A sample's ``results`` as a multi-view dataset hands it to the pipeline.

    Args:
        paths (list[str]): One image per camera.
        aug_config (dict, optional): Put in ``results['aug_config']``.
        sample_idx (int): ``results['sample_idx']``. Defaults to 0.

    Returns:
        dict: ``images`` (per camera ``img_path``, ``cam2img``, ``lidar2cam``),
        ``lidar2img``, ``cam_intrinsic``, ``aug_config``, ``sample_idx``.
    """
    images, lidar2img, intrinsics = {}, [], []
    for k, path in enumerate(paths):
        cam2img = np.array([[1266.0 + k, 0.0, 816.0 - k], [0.0, 1266.0, 491.0 + k],
                            [0.0, 0.0, 1.0]])
        angle = 2 * np.pi * k / max(len(paths), 1)
        lidar2cam = np.eye(4)
        lidar2cam[:3, :3] = [[np.sin(angle), -np.cos(angle), 0.0], [0.0, 0.0, -1.0],
                             [np.cos(angle), np.sin(angle), 0.0]]
        lidar2cam[:3, 3] = (0.01 * k, -0.3, -0.5)
        name = CAMERAS[k] if k < len(CAMERAS) else f'CAM_{k}'
        images[name] = dict(img_path=path, cam2img=cam2img, lidar2cam=lidar2cam)
        viewpad = np.eye(4)
        viewpad[:3, :3] = cam2img
        lidar2img.append(viewpad @ lidar2cam)
        intrinsics.append(viewpad.copy())
    return dict(images=images, lidar2img=lidar2img, cam_intrinsic=intrinsics,
                aug_config=copy.deepcopy(aug_config), sample_idx=sample_idx)


def write_sweeps(dirname: str, num: int, points: int, seed: int = 0) -> Dict:
    """Write a key frame and ``num`` sweeps of ``points`` x 5 float32 into ``dirname``.

    Args:
        dirname (str): An existing folder.
        num (int): Number of sweeps.
        points (int): Points per sweep (each sweep has a few more than the previous).
        seed (int): Seed. Defaults to 0.

    Returns:
        dict: ``key`` (the key frame's points, ``(points, 5)`` float32), ``timestamp`` and
        ``lidar_sweeps`` (as mmdet3d's nuScenes infos give them).
    """
    rng = np.random.default_rng(seed)
    scale = np.array([30.0, 30.0, 2.0, 60.0, 0.0], np.float32)
    sweeps = []
    for k in range(num):
        pts = (rng.standard_normal((points + 7 * k, 5)) * scale).astype(np.float32)
        path = os.path.join(dirname, f'sweep{k}.bin')
        pts.tofile(path)
        theta = rng.uniform(-0.05, 0.05)
        lidar2sensor = np.eye(4)
        lidar2sensor[:3, :3] = [[np.cos(theta), -np.sin(theta), 0.0],
                                [np.sin(theta), np.cos(theta), 0.0], [0.0, 0.0, 1.0]]
        lidar2sensor[:3, 3] = rng.normal(0.0, 1.5, 3)
        sweeps.append(dict(timestamp=1.6e9 - 0.05 * (k + 1),
                           lidar_points=dict(lidar_path=path,
                                             lidar2sensor=lidar2sensor.tolist())))
    key = (rng.standard_normal((points, 5)) * scale).astype(np.float32)
    return dict(key=key, timestamp=1.6e9, lidar_sweeps=sweeps)


def points_results(data: Dict) -> Dict:
    """A fresh ``results`` for the multi-sweep loaders from :func:`write_sweeps`' output."""
    from mmdet3d.structures import LiDARPoints
    return dict(points=LiDARPoints(data['key'].copy(), points_dim=5),
                timestamp=data['timestamp'], lidar_sweeps=copy.deepcopy(data['lidar_sweeps']))


def _cpu_times(fns: Sequence[Callable[[object], object]], make: Callable[[], object],
               iters: int, warmup: int) -> List[Dict[str, float]]:
    """CPU time in ms of each ``fn(make())`` (``make`` untimed), summarised as ``time_fn``
    does. The functions take turns at every iteration, so that a busy machine slows all of
    them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn(make())
    times = [[] for _ in fns]
    for _ in range(iters):
        for fn, out in zip(fns, times):
            arg = make()
            t0 = time.process_time()
            fn(arg)
            out.append((time.process_time() - t0) * 1e3)
    return [summarize_ms(t) for t in times]


def _pipelines(num_cams: int):
    from mmcv import imnormalize
    from mmdet3d.datasets.transforms import LoadMultiViewImageFromFiles

    from turbox_mm.datasets.transforms.load_multiview_images import LoadMultiViewImagesTurbo
    from turbox_mm.datasets.transforms.multiview_affine_aug import MultiViewAffineAug
    from turbox_mm.datasets.transforms.resize_crop_flip_image import ResizeCropFlipImage

    mean, std = np.array(MEAN, np.float32), np.array(STD, np.float32)
    stock_load = LoadMultiViewImageFromFiles(to_float32=True, num_views=num_cams)
    stock_aug = ResizeCropFlipImage()

    def stock(results):
        results = stock_aug(stock_load(results))
        imgs = [imnormalize(img, mean, std, True) for img in results['img']]
        return np.ascontiguousarray(np.stack([img.transpose(2, 0, 1) for img in imgs]))

    turbox_load = LoadMultiViewImagesTurbo(num_views=num_cams, scaled_decode=True)
    turbox_aug = MultiViewAffineAug()

    def turbox(results):
        return np.stack(turbox_aug(turbox_load(results))['img'])

    deferred_load = LoadMultiViewImagesTurbo(num_views=num_cams, decode_on='gpu')

    def deferred(results):
        return turbox_aug(deferred_load(results))['img_warp']

    return stock, turbox, deferred


def _image_rows(tmp: str, quick: bool, iters: int, warmup: int) -> List[Dict]:
    num_cams, (height, width) = (1, (180, 320)) if quick else (6, (900, 1600))
    conf = dict(DATA_AUG_CONF, H=height, W=width)
    if quick:
        conf.update(final_dim=(64, 176), resize_lim=(0.55, 0.6))
    paths = write_camera_jpegs(tmp, num_cams, height, width)
    kb = np.mean([os.path.getsize(p) for p in paths]) / 1e3
    rng = np.random.default_rng(0)
    configs = [sparse4d_aug_config(rng, conf) for _ in range(16)]
    counter = iter(range(10**9))

    def make():
        return camera_results(paths, configs[next(counter) % len(configs)])

    stock_ms, turbox_ms, deferred_ms = _cpu_times(_pipelines(num_cams), make, iters, warmup)
    fh, fw = conf['final_dim']
    f32, u8 = num_cams * 3 * fh * fw * 4, num_cams * 3 * fh * fw
    jpeg = sum(os.path.getsize(p) for p in paths)
    case = f'{num_cams} cams {width}x{height} JPEG ({kb:.0f} kB) -> {fh}x{fw}'
    note = (f'to GPU per sample: stock float32 {f32 / 1e6:.2f} MB, turbox uint8 '
            f'{u8 / 1e6:.2f} MB, deferred JPEG bytes {jpeg / 1e6:.2f} MB')
    return [
        dict(component='image pipeline', case=case, stock=stock_ms, turbox=turbox_ms,
             note=note),
        dict(component='image pipeline', case=case + ', decode_on=gpu', stock=stock_ms,
             turbox=deferred_ms, note='turbox side: bytes + warp matrices, no decode'),
    ]


def _points_rows(tmp: str, quick: bool, iters: int, warmup: int) -> List[Dict]:
    from mmdet3d.datasets.transforms import LoadPointsFromMultiSweeps

    from turbox_mm.datasets.transforms.load_points_fast import LoadPointsFromMultiSweepsFast
    num, points = (3, 2000) if quick else (12, 34000)
    sweeps_num = 2 if quick else 10
    data = write_sweeps(tmp, num, points)
    stock = LoadPointsFromMultiSweeps(sweeps_num=sweeps_num)
    fast = LoadPointsFromMultiSweepsFast(sweeps_num=sweeps_num)
    make = lambda: points_results(data)  # noqa: E731
    np.random.seed(0)
    a = stock(make())['points'].tensor
    np.random.seed(0)
    b = fast(make())['points'].tensor
    same = a.shape == b.shape and bool((a == b).all())
    stock_ms, fast_ms = _cpu_times([stock, fast], make, iters, warmup)
    return [dict(component='multi-sweep points',
                 case=f'{sweeps_num} of {num} sweeps x ~{points} pts', stock=stock_ms,
                 turbox=fast_ms, note=f'{len(a)} points out, identical: {same}')]


def benchmark(device: str = 'cpu', quick: bool = False) -> List[Dict]:
    """Per-sample CPU time of the stock and turbox camera and lidar loading.

    Args:
        device (str): Unused: the loading runs on the CPU wherever the model trains.
        quick (bool): One small camera image and tiny sweeps, few iterations.
            Defaults to False.

    Returns:
        list[dict]: Rows as :mod:`turbox_mm.benchmark.micro` describes.
    """
    del device
    iters, warmup = (3, 1) if quick else (20, 3)
    cv2_threads, torch_threads = cv2.getNumThreads(), torch.get_num_threads()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    try:
        with _one_blas_thread() as limited, \
                tempfile.TemporaryDirectory(prefix='turbox_image_bench_') as tmp:
            rows = _image_rows(tmp, quick, iters, warmup)
            rows += _points_rows(tmp, quick, iters, warmup)
    finally:
        cv2.setNumThreads(cv2_threads)
        torch.set_num_threads(torch_threads)
    if not limited:
        for row in rows:
            row['note'] += '; BLAS threads not limited (no threadpoolctl)'
    return rows


@contextlib.contextmanager
def _one_blas_thread():
    """One BLAS thread meanwhile (threadpoolctl, if installed); yields whether it could.

    OpenBLAS's worker threads spin after each threaded call (the sweeps' matmuls), which
    would add their CPU time to both sides; a loader worker should run with one.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield False
        return
    with threadpool_limits(limits=1, user_api='blas'):
        yield True
