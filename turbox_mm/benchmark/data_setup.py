"""What the data benchmark (:mod:`turbox_mm.benchmark.data`) measures: the settings, their
stock and turbox pipelines and data preprocessors, and the datasets they run on.

- ``sparse4d`` (Sparse4D v3, ``sparse4dv3_temporal_r50_1x8_bs6_256x704.py``): 6 cameras to
  256x704, batch 6, images only. Stock: ``LoadMultiViewImageFromFiles(to_float32=True)``,
  ``ResizeCropFlipImage``, ``PhotoMetricDistortionMultiViewImage`` (mmdet's
  ``PhotoMetricDistortion`` per image) and ``NormalizeMultiviewImage``
  (``mmcv.imnormalize``, to RGB), all on the CPU; the data preprocessor only stacks and
  copies. Turbox: ``LoadMultiViewImagesTurbo(scaled_decode=True)`` and ``MultiViewAffineAug``;
  ``TurboxDet3DDataPreprocessor`` distorts and normalises on the GPU.
- ``bevfusion``: the training pipeline and data preprocessor of
  ``configs/bevfusion/bevfusion_lidar-cam_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d_stock.py``
  (mmdet3d's ``projects/BEVFusion`` lidar-cam config), batch 4: pillow loading
  (``BEVLoadMultiViewImageFromFiles``, float32 RGB), the sweeps
  (``LoadPointsFromMultiSweeps(sweeps_num=9)``), ``ImageAug3D`` (per camera PIL resize 0.38-0.55,
  crop, flip, rotate), BEVFusion's lidar rotation / scale / translation and flips, the range and
  name filters, ``GridMask`` (probability 0), ``PointShuffle``, packing; normalisation in the
  data preprocessor. Turbox: that config as ``turbox.data`` rewrites it
  (:mod:`turbox_mm.engine.runner.fast_pipeline` and ``point_loaders``:
  ``BEVLoadMultiViewImagesTurbo``, ``ImageAug3DTurbo``, the checked and fast point loaders;
  ``gpu_decode`` for the third pipeline).

Both settings load the 3D boxes (``LoadAnnotations3D``) and pack them with the images.
Each sample's augmentation parameters for Sparse4D (``aug_config``, drawn as Sparse4D's
``get_augmentation`` draws them) are a function of ``(seed, index)``, and numpy's and torch's
global generators (the sweep choice, the photometric draws, BEVFusion's camera and lidar
draws, the point shuffle) are seeded from them before the pipeline runs, so every pipeline
sees the same parameters for the same sample. Images of other sizes than 1600x900 (small test
datasets) keep the output's share of the image.
"""
import contextlib
import copy
import logging
import os
import os.path as osp
import shutil
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from mmdet3d.datasets import NuScenesDataset

from turbox_mm.benchmark.micro.image_pipeline import DATA_AUG_CONF, sparse4d_aug_config
from turbox_mm.datasets.sparse4d_dataset import camera_projections

SETTINGS = ('sparse4d', 'bevfusion')
PIPELINES = ('stock', 'turbox', 'turbox_gpu_decode')
CAMERAS = ('CAM_FRONT', 'CAM_FRONT_RIGHT', 'CAM_FRONT_LEFT', 'CAM_BACK', 'CAM_BACK_LEFT',
           'CAM_BACK_RIGHT')
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
# Sparse4D v3's data_aug_conf (HorizonRobotics/Sparse4D,
# projects/configs/sparse4dv3_temporal_r50_1x8_bs6_256x704.py).
SPARSE4D_AUG_CONF = dict(DATA_AUG_CONF)
# The BEVFusion config whose training pipeline and preprocessor the bevfusion setting runs
# (relative to the repository), and its ImageAug3D's output size and ranges (the aug_conf the
# dataset records; BEVFusion draws its own per camera).
BEVFUSION_CONFIG = ('configs/bevfusion/'
                    'bevfusion_lidar-cam_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d_stock.py')
BEVFUSION_AUG_CONF = dict(resize_lim=(0.38, 0.55), final_dim=(256, 704), bot_pct_lim=(0.0, 0.0),
                          rot_lim=(-5.4, 5.4), H=900, W=1600, rand_flip=True)
# Sparse4D's PhotoMetricDistortionMultiViewImage defaults (no saturation clipping).
PHOTOMETRIC = dict(brightness_delta=32, contrast_range=(0.5, 1.5),
                   saturation_range=(0.5, 1.5), hue_delta=18)
# The synthetic dataset made when no data root is given: 20 samples at nuScenes' sizes.
DEFAULT_SYNTHETIC = dict(scenes=2, frames=10, image_size=(1600, 900), points=34000, sweeps=10,
                         seed=0)
CACHE_ENV = 'TURBOX_CACHE_DIR'


# -- data -------------------------------------------------------------------------------------

def synthetic_data_root(cache_dir: Optional[str] = None, progress: bool = False,
                        **options) -> str:
    """A synthetic nuScenes for the benchmark, generated once and kept in a cache folder.

    Args:
        cache_dir (str, optional): Where datasets are kept. Defaults to
            ``$TURBOX_CACHE_DIR/data_bench`` (``~/.cache/turbox_mm/data_bench``).
        progress (bool): Show the generator's progress bar. Defaults to False.
        **options: :func:`~turbox_mm.datasets.synthetic.generate` options overriding
            :data:`DEFAULT_SYNTHETIC` (every scene goes to the train split).

    Returns:
        str: The data root, holding ``nuscenes_infos_train.pkl``.
    """
    from turbox_mm.datasets.synthetic import generate
    opts = {**DEFAULT_SYNTHETIC, **options}
    width, height = opts['image_size']
    name = (f"synth_s{opts['scenes']}_f{opts['frames']}_{width}x{height}_p{opts['points']}"
            f"_sw{opts['sweeps']}_seed{opts['seed']}")
    if cache_dir is None:
        base = os.environ.get(CACHE_ENV) or osp.join(osp.expanduser('~'), '.cache', 'turbox_mm')
        cache_dir = osp.join(base, 'data_bench')
    root = osp.join(cache_dir, name)
    if osp.exists(osp.join(root, 'nuscenes_infos_train.pkl')):
        return root
    os.makedirs(cache_dir, exist_ok=True)
    partial = f'{root}.partial-{os.getpid()}'
    shutil.rmtree(partial, ignore_errors=True)
    generate(partial, progress=progress, **{**opts, 'val_scenes': 0})
    try:
        os.replace(partial, root)
    except OSError:  # another process finished first
        shutil.rmtree(partial, ignore_errors=True)
    return root


def setting_values(setting: str, image_hw: Tuple[int, int]) -> Dict:
    """Everything that differs between the settings, for images of ``image_hw``: the
    augmentation ranges and output size (``aug_conf``), ``batch_size``, ``use_lidar`` and
    Sparse4D's ``color_type``."""
    if setting not in SETTINGS:
        raise ValueError(f'unknown setting {setting!r}; valid settings: {", ".join(SETTINGS)}')
    height, width = image_hw
    sparse4d = setting == 'sparse4d'
    conf = dict(SPARSE4D_AUG_CONF if sparse4d else BEVFUSION_AUG_CONF)
    # Other image sizes keep the output's share of the image (for small test datasets).
    scale = width / conf['W']
    conf['final_dim'] = tuple(max(8, int(round(d * scale))) for d in conf['final_dim'])
    conf.update(H=height, W=width)
    return dict(aug_conf=conf, batch_size=6 if sparse4d else 4, use_lidar=not sparse4d,
                color_type='unchanged')


def camera_image_hw(data_root: str) -> Tuple[int, int]:
    """``(height, width)`` of the first camera image listed in the train infos."""
    import mmengine
    infos = mmengine.load(osp.join(data_root, 'nuscenes_infos_train.pkl'))
    if not infos.get('data_list'):
        raise ValueError(f'{data_root}/nuscenes_infos_train.pkl lists no samples')
    cam = infos['data_list'][0]['images'][CAMERAS[0]]
    return int(cam['height']), int(cam['width'])


def bevfusion_config(pipeline: str, final_dim: Tuple[int, int] = (256, 704)):
    """:data:`BEVFUSION_CONFIG`, rewritten by ``turbox.data`` for the turbox pipelines.

    Args:
        pipeline (str): ``'stock'``, ``'turbox'`` or ``'turbox_gpu_decode'``.
        final_dim (tuple[int, int]): ``ImageAug3D``'s output size (the config's for 1600x900
            images). Defaults to (256, 704).

    Returns:
        mmengine.Config: The config; its ``train_dataloader`` pipeline and
        ``model.data_preprocessor`` are what the setting runs.
    """
    from mmengine.config import Config

    from turbox_mm.engine.runner.fast_pipeline import apply_fast_pipeline
    from turbox_mm.engine.runner.point_loaders import apply_point_loaders
    root = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
    path = osp.join(root, BEVFUSION_CONFIG)
    if not osp.isfile(path):
        raise FileNotFoundError(f'the bevfusion setting runs the pipeline of {path}, which is '
                                'missing (run from a checkout of the repository)')
    cfg = Config.fromfile(path)
    for t in cfg.train_dataloader.dataset.dataset.pipeline:
        if t['type'].split('.')[-1] == 'ImageAug3D':
            t['final_dim'] = list(final_dim)
    if pipeline != 'stock':
        with _quiet_mmengine():
            changes = apply_fast_pipeline(cfg, dict(fast_pipeline=True,
                                                    gpu_decode=pipeline == 'turbox_gpu_decode'))
            changes += apply_point_loaders(cfg, dict(point_loaders=True))
        if not any(c.startswith('train_dataloader: image pipeline') for c in changes):
            raise RuntimeError(f'turbox.data did not rewrite the camera pipeline of {path}')
    return cfg


def build_pipeline(setting: str, pipeline: str, image_hw: Tuple[int, int] = (900, 1600)) -> List:
    """The transforms of one pipeline of one setting (see the module docstring).

    Args:
        setting (str): ``'sparse4d'`` or ``'bevfusion'``.
        pipeline (str): ``'stock'``, ``'turbox'`` or ``'turbox_gpu_decode'``.
        image_hw (tuple[int, int]): Camera image size. Defaults to (900, 1600).

    Returns:
        list: Transform objects, for a dataset's ``pipeline``.
    """
    from mmdet3d.datasets.transforms import (LoadAnnotations3D, LoadMultiViewImageFromFiles,
                                             Pack3DDetInputs)
    from mmdet3d.registry import TRANSFORMS
    from mmengine.registry import init_default_scope

    from turbox_mm.datasets.transforms import (LoadMultiViewImagesTurbo, MultiViewAffineAug,
                                               PackJpegBytes, ResizeCropFlipImage)
    from turbox_mm.datasets.transforms.normalize_multiview_image import \
        NormalizeMultiviewImage
    from turbox_mm.datasets.transforms.photometric_multiview import \
        PhotoMetricDistortionMultiViewImage
    if pipeline not in PIPELINES:
        raise ValueError(f'unknown pipeline {pipeline!r}; valid pipelines: '
                         f'{", ".join(PIPELINES)}')
    cfg = setting_values(setting, image_hw)
    if setting == 'bevfusion':
        init_default_scope('mmdet3d')
        config = bevfusion_config(pipeline, cfg['aug_conf']['final_dim'])
        return [TRANSFORMS.build(copy.deepcopy(t))
                for t in config.train_dataloader.dataset.dataset.pipeline]
    views = dict(num_views=len(CAMERAS), color_type=cfg['color_type'])
    keys = ['img', 'gt_bboxes_3d', 'gt_labels_3d']
    if pipeline == 'stock':
        transforms = [LoadMultiViewImageFromFiles(to_float32=True, **views)]
    elif pipeline == 'turbox':
        transforms = [LoadMultiViewImagesTurbo(scaled_decode=True, **views)]
    else:
        transforms = [LoadMultiViewImagesTurbo(decode_on='gpu', **views)]
    transforms.append(LoadAnnotations3D(with_bbox_3d=True, with_label_3d=True))
    if pipeline == 'stock':
        transforms.append(ResizeCropFlipImage())
        transforms.append(PhotoMetricDistortionMultiViewImage(**PHOTOMETRIC))
        transforms.append(NormalizeMultiviewImage(MEAN, STD, to_rgb=True))
        transforms.append(Pack3DDetInputs(keys=keys))
    else:
        transforms += [MultiViewAffineAug(), PackJpegBytes(keys=keys)]
    return transforms


def build_preprocessors(setting: str, seed: int) -> Dict:
    """The data preprocessor of each pipeline, as the model configs set it.

    Args:
        setting (str): ``'sparse4d'`` or ``'bevfusion'``.
        seed (int): Seed of the GPU photometric draws (Sparse4D).

    Returns:
        dict: ``{pipeline: data preprocessor}``.
    """
    from mmdet3d.models.data_preprocessors import Det3DDataPreprocessor

    from turbox_mm.models.data_preprocessors import TurboxDet3DDataPreprocessor
    if setting == 'bevfusion':
        out = {}
        for name in PIPELINES:
            kwargs = dict(bevfusion_config(name).model.data_preprocessor)
            kind = kwargs.pop('type').split('.')[-1]
            kwargs.pop('voxelize_cfg', None)  # the detector's, not the preprocessor's
            cls = Det3DDataPreprocessor if name == 'stock' else TurboxDet3DDataPreprocessor
            assert cls.__name__ == kind, (name, kind)
            out[name] = cls(non_blocking=True, **kwargs)
        return out
    pad = dict(pad_size_divisor=1, non_blocking=True)
    turbox = dict(mean=MEAN, std=STD, bgr_to_rgb=True,
                  photometric=dict(PHOTOMETRIC, seed=seed), **pad)
    # Sparse4D: the stock images arrive normalised.
    return dict(stock=Det3DDataPreprocessor(**pad), turbox=TurboxDet3DDataPreprocessor(**turbox),
                turbox_gpu_decode=TurboxDet3DDataPreprocessor(**turbox))


class BenchNuScenesDataset(NuScenesDataset):
    """``NuScenesDataset`` that adds what Sparse4D's dataset adds to every sample.

    Per sample: ``lidar2img`` and ``cam_intrinsic`` (lists of 4x4 over the cameras, as
    Sparse4D's ``get_data_info`` makes them) and ``aug_config`` (Sparse4D's
    ``get_augmentation`` draw from ``aug_conf``, seeded by ``(seed, index)``). Numpy's and
    torch's global generators are seeded from ``(seed, index)`` before the pipeline, so random
    transforms draw the same for the same sample in any pipeline and worker.

    Args:
        *args: ``NuScenesDataset``'s.
        aug_conf (dict): Sparse4D's ``data_aug_conf``.
        seed (int): Seed. Defaults to 0.
        **kwargs: ``NuScenesDataset``'s.
    """

    def __init__(self, *args, aug_conf: Dict, seed: int = 0, **kwargs) -> None:
        self.aug_conf = aug_conf
        self.seed = seed
        super().__init__(*args, **kwargs)

    def get_data_info(self, idx: int) -> dict:
        """The sample's info with ``lidar2img``, ``cam_intrinsic`` and ``aug_config``."""
        info = super().get_data_info(idx)
        info['lidar2img'], info['cam_intrinsic'] = camera_projections(
            info['images'], f'sample {idx}')
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, idx]))
        info['aug_config'] = sparse4d_aug_config(rng, self.aug_conf)
        return info

    def prepare_data(self, idx: int):
        """Seed numpy's and torch's global generators for this sample, then run the pipeline."""
        state = int(np.random.SeedSequence([self.seed, idx, 1]).generate_state(1)[0])
        np.random.seed(state)
        torch.manual_seed(state)  # BEVFusion's PointShuffle
        return super().prepare_data(idx)


def build_dataset(data_root: str, setting: str, pipeline: str, seed: int = 0):
    """mmdet3d's ``NuScenesDataset`` on ``data_root``'s train infos with one pipeline.

    Args:
        data_root (str): A nuScenes-format data root (e.g. from :func:`synthetic_data_root`).
        setting (str): ``'sparse4d'`` or ``'bevfusion'``.
        pipeline (str): ``'stock'``, ``'turbox'`` or ``'turbox_gpu_decode'``.
        seed (int): Seed of the per-sample augmentation parameters. Defaults to 0.

    Returns:
        BenchNuScenesDataset: Empty samples are kept (``filter_empty_gt=False``).
    """
    image_hw = camera_image_hw(data_root)
    cfg = setting_values(setting, image_hw)
    prefix = dict(pts='samples/LIDAR_TOP', sweeps='sweeps/LIDAR_TOP',
                  **{cam: f'samples/{cam}' for cam in CAMERAS})
    with _quiet_mmengine():  # the dataset logs a table of class counts
        return BenchNuScenesDataset(
            data_root=data_root, ann_file='nuscenes_infos_train.pkl', data_prefix=prefix,
            pipeline=build_pipeline(setting, pipeline, image_hw),
            modality=dict(use_lidar=cfg['use_lidar'], use_camera=True), test_mode=False,
            filter_empty_gt=False, box_type_3d='LiDAR', aug_conf=cfg['aug_conf'], seed=seed)


@contextlib.contextmanager
def _quiet_mmengine():
    """Warnings and errors only from mmengine's current logger meanwhile."""
    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
