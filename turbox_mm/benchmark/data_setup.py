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
- ``maptr``: the training pipeline and data preprocessor of
  ``configs/maptr/maptrv2_nusc_r50_24ep_stock.py`` (MapTR v2), batch 4: mmdet3d's loader
  (float32), ``RandomScaleImageMultiViewImage`` (0.5, cv2 bilinear),
  ``PhotoMetricDistortionMultiViewImage``, ``NormalizeMultiviewImage``, the keyframe points,
  ``PointToMultiViewDepth`` (depth targets), ``PadMultiViewImageDepth`` (to 32),
  ``LoadMapGT(impl='precomputed')``, ``RasterizeMapGT``, ``PackMapTRInputs``; the stock
  ``Det3DDataPreprocessor`` only stacks. Turbox: that config as ``turbox.data`` rewrites it
  (the MapTR style: ``LoadScaledMultiViewImagesTurbo``, uint8 decoded at the scale; the checked
  point loader; ``TurboxDet3DDataPreprocessor`` distorts, normalises and refills the padding on
  the GPU). No ``turbox_gpu_decode`` pipeline: the rewrite refuses ``gpu_decode`` for MapTR
  (:data:`UNSUPPORTED_PIPELINES`). The data needs the map ground truth precomputed into the
  infos (``synthetic_data_root(map_gt=True)``, or ``tools/create_data.py map-gt``); samples
  without map elements are left out (the config's ``LoadMapGT(drop_empty=True)`` would
  re-draw another sample, differently in each pipeline).

The sparse4d and bevfusion settings load the 3D boxes (``LoadAnnotations3D``) and pack them
with the images.
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

SETTINGS = ('sparse4d', 'bevfusion', 'maptr')
PIPELINES = ('stock', 'turbox', 'turbox_gpu_decode')
#: Pipelines a setting does not have, and why.
UNSUPPORTED_PIPELINES = {
    'maptr': {'turbox_gpu_decode': 'the turbox.data rewrite refuses gpu_decode for MapTR (the '
                                   'padding and depth transforms need the decoded images in '
                                   'the workers)'},
}
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
MAPTR_CONFIG = 'configs/maptr/maptrv2_nusc_r50_24ep_stock.py'
# Its RandomScaleImageMultiViewImage scale and PadMultiViewImageDepth size divisor.
MAPTR_SCALE = 0.5
MAPTR_PAD_DIVISOR = 32
BEVFUSION_AUG_CONF = dict(resize_lim=(0.38, 0.55), final_dim=(256, 704), bot_pct_lim=(0.0, 0.0),
                          rot_lim=(-5.4, 5.4), H=900, W=1600, rand_flip=True)
# Sparse4D's PhotoMetricDistortionMultiViewImage defaults (no saturation clipping).
PHOTOMETRIC = dict(brightness_delta=32, contrast_range=(0.5, 1.5),
                   saturation_range=(0.5, 1.5), hue_delta=18)
# The synthetic dataset made when no data root is given: 20 samples at nuScenes' sizes.
DEFAULT_SYNTHETIC = dict(scenes=2, frames=10, image_size=(1600, 900), points=34000, sweeps=10,
                         seed=0)
# What the maptr setting makes instead: keyframe points only (MapTR v2 loads no sweeps), and the
# map ground truth precomputed into the infos.
MAPTR_SYNTHETIC = dict(DEFAULT_SYNTHETIC, sweeps=0, map_gt=True)
CACHE_ENV = 'TURBOX_CACHE_DIR'


# -- data -------------------------------------------------------------------------------------

def synthetic_data_root(cache_dir: Optional[str] = None, progress: bool = False,
                        map_gt: bool = False, **options) -> str:
    """A synthetic nuScenes for the benchmark, generated once and kept in a cache folder.

    Args:
        cache_dir (str, optional): Where datasets are kept. Defaults to
            ``$TURBOX_CACHE_DIR/data_bench`` (``~/.cache/turbox_mm/data_bench``).
        progress (bool): Show the generator's progress bar. Defaults to False.
        map_gt (bool): Also store MapTR's map ground truth in the train infos (the map-gt
            step, ``tools/create_data.py map-gt``: every sample cut once from the generated
            map expansion with the reference vectoriser, as ``map_annotation``), for
            ``LoadMapGT(impl='precomputed')``. Such a dataset is kept under its own name
            (``..._mapgt``). Defaults to False.
        **options: :func:`~turbox_mm.datasets.synthetic.generate` options overriding
            :data:`DEFAULT_SYNTHETIC` (every scene goes to the train split).

    Returns:
        str: The data root, holding ``nuscenes_infos_train.pkl`` (and the map expansion,
        ``maps/expansion/``).
    """
    from turbox_mm.datasets.synthetic import generate
    opts = {**DEFAULT_SYNTHETIC, **options}
    width, height = opts['image_size']
    name = (f"synth_s{opts['scenes']}_f{opts['frames']}_{width}x{height}_p{opts['points']}"
            f"_sw{opts['sweeps']}_seed{opts['seed']}{'_mapgt' if map_gt else ''}")
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
    if map_gt:
        from turbox_mm.datasets.map_gt.precompute import precompute_map_gt
        precompute_map_gt([osp.join(partial, 'nuscenes_infos_train.pkl')], partial,
                          workers=opts.get('workers', 0), progress=progress)
    try:
        os.replace(partial, root)
    except OSError:  # another process finished first
        shutil.rmtree(partial, ignore_errors=True)
    return root


def setting_pipelines(setting: str) -> Tuple[str, ...]:
    """The pipelines of :data:`PIPELINES` that ``setting`` has (all but those of
    :data:`UNSUPPORTED_PIPELINES`)."""
    _check_setting(setting)
    return tuple(p for p in PIPELINES if p not in UNSUPPORTED_PIPELINES.get(setting, {}))


def synthetic_options(setting: str) -> Dict:
    """:func:`synthetic_data_root` options of the dataset made for ``setting`` when no data
    root is given."""
    _check_setting(setting)
    return dict(MAPTR_SYNTHETIC if setting == 'maptr' else DEFAULT_SYNTHETIC)


def _check_setting(setting: str) -> None:
    if setting not in SETTINGS:
        raise ValueError(f'unknown setting {setting!r}; valid settings: {", ".join(SETTINGS)}')


def setting_values(setting: str, image_hw: Tuple[int, int]) -> Dict:
    """Everything that differs between the settings, for images of ``image_hw``: the
    augmentation ranges and output size (``aug_conf``; MapTR's: ``H``, ``W`` and the padded
    ``final_dim`` of the 0.5 rescale), ``batch_size``, ``use_lidar`` and Sparse4D's
    ``color_type``."""
    _check_setting(setting)
    height, width = image_hw
    if setting == 'maptr':
        final = tuple(-(-int(d * MAPTR_SCALE) // MAPTR_PAD_DIVISOR) * MAPTR_PAD_DIVISOR
                      for d in (height, width))
        return dict(aug_conf=dict(H=height, W=width, final_dim=final), batch_size=4,
                    use_lidar=True, color_type='unchanged')
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


def maptr_config(pipeline: str, data_root: Optional[str] = None):
    """:data:`MAPTR_CONFIG`, rewritten by ``turbox.data`` for the turbox pipeline.

    Args:
        pipeline (str): ``'stock'`` or ``'turbox'`` (the rewrite refuses ``gpu_decode``).
        data_root (str, optional): The data root ``LoadMapGT`` is given (it reads the
            precomputed polylines from the infos; the root only names the map-gt command in
            its errors). Defaults to the config's.

    Returns:
        mmengine.Config: The config; its ``train_dataloader`` pipeline and
        ``model.data_preprocessor`` are what the setting runs.
    """
    from mmengine.config import Config

    from turbox_mm.engine.runner.fast_pipeline import apply_fast_pipeline
    from turbox_mm.engine.runner.point_loaders import apply_point_loaders
    from turbox_mm.engine.runner.precomputed_map_gt import apply_precomputed_map_gt
    if pipeline in UNSUPPORTED_PIPELINES['maptr']:
        raise ValueError(f'maptr has no {pipeline} pipeline: '
                         f'{UNSUPPORTED_PIPELINES["maptr"][pipeline]}')
    path = _repository_file(MAPTR_CONFIG, 'maptr')
    cfg = Config.fromfile(path)
    if data_root is not None:
        for t in cfg.train_dataloader.dataset.pipeline:
            if t['type'].split('.')[-1] == 'LoadMapGT':
                t['data_root'] = data_root
    if pipeline != 'stock':
        opts = dict(fast_pipeline=True, gpu_decode=False, point_loaders=True)
        with _quiet_mmengine():  # as turbox_options applies them
            changes = apply_fast_pipeline(cfg, opts)
            changes += apply_precomputed_map_gt(cfg, opts)
            changes += apply_point_loaders(cfg, opts)
        if not any(c.startswith('train_dataloader: image pipeline') for c in changes):
            raise RuntimeError(f'turbox.data did not rewrite the camera pipeline of {path}')
    return cfg


def _repository_file(relative: str, setting: str) -> str:
    root = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
    path = osp.join(root, relative)
    if not osp.isfile(path):
        raise FileNotFoundError(f'the {setting} setting runs the pipeline of {path}, which is '
                                'missing (run from a checkout of the repository)')
    return path


def build_pipeline(setting: str, pipeline: str, image_hw: Tuple[int, int] = (900, 1600),
                   data_root: Optional[str] = None) -> List:
    """The transforms of one pipeline of one setting (see the module docstring).

    Args:
        setting (str): ``'sparse4d'``, ``'bevfusion'`` or ``'maptr'``.
        pipeline (str): ``'stock'``, ``'turbox'`` or ``'turbox_gpu_decode'`` (not for maptr).
        image_hw (tuple[int, int]): Camera image size. Defaults to (900, 1600).
        data_root (str, optional): The data root (maptr: ``LoadMapGT``'s). Defaults to None.

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
    if setting == 'maptr':
        init_default_scope('mmdet3d')
        config = maptr_config(pipeline, data_root)
        return [TRANSFORMS.build(copy.deepcopy(t))
                for t in config.train_dataloader.dataset.pipeline]
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
        setting (str): ``'sparse4d'``, ``'bevfusion'`` or ``'maptr'``.
        seed (int): Seed of the GPU photometric draws (Sparse4D, MapTR).

    Returns:
        dict: ``{pipeline: data preprocessor}`` for the setting's pipelines.
    """
    from mmdet3d.models.data_preprocessors import Det3DDataPreprocessor

    from turbox_mm.models.data_preprocessors import TurboxDet3DDataPreprocessor
    if setting == 'maptr':
        out = {}
        for name in setting_pipelines(setting):
            kwargs = copy.deepcopy(dict(maptr_config(name).model.data_preprocessor))
            kind = kwargs.pop('type').split('.')[-1]
            cls = Det3DDataPreprocessor if name == 'stock' else TurboxDet3DDataPreprocessor
            assert cls.__name__ == kind, (name, kind)
            if kwargs.get('photometric') is not None:
                kwargs['photometric'] = dict(kwargs['photometric'], seed=seed)
            out[name] = cls(non_blocking=True, **kwargs)
        return out
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
        aug_conf (dict, optional): Sparse4D's ``data_aug_conf``. None adds none of the above
            (MapTR: its pipeline makes its own camera matrices). Defaults to None.
        seed (int): Seed. Defaults to 0.
        map_nonempty (bool): Keep only the samples whose precomputed map ground truth
            (``map_annotation``) holds map elements; a sample without one is an error naming
            the map-gt command. Defaults to False.
        **kwargs: ``NuScenesDataset``'s.
    """

    def __init__(self, *args, aug_conf: Optional[Dict] = None, seed: int = 0,
                 map_nonempty: bool = False, **kwargs) -> None:
        self.aug_conf = aug_conf
        self.seed = seed
        self.map_nonempty = map_nonempty
        super().__init__(*args, **kwargs)

    def filter_data(self) -> List[dict]:
        """``NuScenesDataset``'s, then (``map_nonempty``) the samples with map elements."""
        data_list = super().filter_data()
        if not self.map_nonempty:
            return data_list
        from turbox_mm.datasets.map_gt import MAP_ANNOTATION
        from turbox_mm.datasets.map_gt.precompute import command_line
        missing = [info.get('token', i) for i, info in enumerate(data_list)
                   if MAP_ANNOTATION not in info]
        if missing:
            raise KeyError(f'{len(missing)} of {len(data_list)} samples of {self.ann_file} '
                           f'have no {MAP_ANNOTATION} (e.g. {missing[0]}): the maptr setting '
                           'reads the map ground truth precomputed; add it with '
                           f'{command_line([self.ann_file], self.data_root)}')
        return [info for info in data_list if len(info[MAP_ANNOTATION]['labels'])]

    def get_data_info(self, idx: int) -> dict:
        """The sample's info with ``lidar2img``, ``cam_intrinsic`` and ``aug_config``."""
        info = super().get_data_info(idx)
        if self.aug_conf is None:
            return info
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
        data_root (str): A nuScenes-format data root (e.g. from :func:`synthetic_data_root`;
            maptr: with the map ground truth precomputed, ``map_gt=True``).
        setting (str): ``'sparse4d'``, ``'bevfusion'`` or ``'maptr'``.
        pipeline (str): ``'stock'``, ``'turbox'`` or ``'turbox_gpu_decode'`` (not for maptr).
        seed (int): Seed of the per-sample augmentation parameters. Defaults to 0.

    Returns:
        BenchNuScenesDataset: Samples without boxes are kept (``filter_empty_gt=False``);
        maptr: only those with map elements.
    """
    image_hw = camera_image_hw(data_root)
    cfg = setting_values(setting, image_hw)
    maptr = setting == 'maptr'
    prefix = dict(pts='samples/LIDAR_TOP', sweeps='sweeps/LIDAR_TOP',
                  **{cam: f'samples/{cam}' for cam in CAMERAS})
    with _quiet_mmengine():  # the dataset logs a table of class counts
        return BenchNuScenesDataset(
            data_root=data_root, ann_file='nuscenes_infos_train.pkl', data_prefix=prefix,
            pipeline=build_pipeline(setting, pipeline, image_hw, data_root),
            modality=dict(use_lidar=cfg['use_lidar'], use_camera=True), test_mode=False,
            filter_empty_gt=False, box_type_3d='LiDAR',
            aug_conf=None if maptr else cfg['aug_conf'], seed=seed, map_nonempty=maptr)


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
