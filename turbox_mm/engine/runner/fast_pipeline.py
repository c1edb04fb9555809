"""``turbox.data``: the stock multi-view image pipeline becomes its turbox twin.

A stock camera pipeline (upstream's Sparse4D, BEVFormer, StreamPETR style) loads float images
with OpenCV, resizes, crops, flips and rotates them with PIL, distorts their colours and
normalises them, all in the loader workers. Its turbox twin, applied here to every pipeline of
the config:

============================================  ==================================================
stock                                         turbox
============================================  ==================================================
``LoadMultiViewImageFromFiles``               ``turbox_mm.LoadMultiViewImagesTurbo``
                                              (libjpeg-turbo, DCT-scaled decoding, uint8)
``turbox_mm.ResizeCropFlipImage``             ``turbox_mm.MultiViewAffineAug`` (one warp)
``turbox_mm.PhotoMetricDistortionMultiView``  removed; the data preprocessor distorts on the GPU
``Image`` (train pipeline)                    (``photometric=...``, training only)
``turbox_mm.NormalizeMultiviewImage``         removed; the data preprocessor normalises on the
                                              GPU (``mean``, ``std``, ``bgr_to_rgb``)
``Det3DDataPreprocessor``                     ``turbox_mm.TurboxDet3DDataPreprocessor``
============================================  ==================================================

With ``gpu_decode`` the loader does not decode at all: ``decode_on='gpu'`` and
``Pack3DDetInputs`` becomes ``turbox_mm.PackJpegBytes``, and nvJPEG decodes in the data
preprocessor.

The rewrite is all or nothing: it happens only when every pipeline that loads multi-view images
can be rewritten consistently (one normalisation for all of them, every image transform
between loading and packing known to accept uint8 images); otherwise the config is kept as it
is, with a warning that says why. Geometry (``lidar2img`` and the other matrices) is the same
in both pipelines; pixels agree within interpolation tolerance (``tests/test_fast_transforms.py``);
the photometric draws come from another random stream (same distribution).
"""
import logging
from typing import Dict, Iterator, List, Optional, Tuple

from mmengine.config import Config
from mmengine.logging import print_log

from .turbox_options import _short

LOADER = 'LoadMultiViewImageFromFiles'
RESIZE = 'ResizeCropFlipImage'
PHOTOMETRIC = 'PhotoMetricDistortionMultiViewImage'
NORMALIZE = 'NormalizeMultiviewImage'
PACK = 'Pack3DDetInputs'
STOCK_PREPROCESSOR = 'Det3DDataPreprocessor'
#: Arguments of the stock loader that the turbox loader takes as they are.
LOADER_ARGS = ('color_type', 'backend_args', 'num_views', 'num_ref_frames', 'test_mode',
               'set_default_scale')
#: Transforms that may stand between loading and packing in a rewritten pipeline: they read
#: geometry or boxes only, or accept uint8 images.
IMAGE_SAFE = ('LoadPointsFromFile', 'LoadPointsFromFileChecked', 'LoadPointsFromMultiSweeps',
              'LoadPointsFromMultiSweepsFast',
              'LoadAnnotations3D', 'MultiScaleDepthMapGenerator', 'BBoxRotation',
              'CircleObjectRangeFilter', 'InstanceNameFilter', 'ObjectNameFilter',
              'ObjectRangeFilter', 'NuScenesSparse4DAdaptor', 'PointsRangeFilter',
              'PointShuffle', 'MultiViewAffineAug', 'LoadMultiViewImagesTurbo', 'PackJpegBytes')


def _datasets(dataset) -> Iterator[Dict]:
    """Every dataset config with a pipeline inside ``dataset`` (wrappers included)."""
    if isinstance(dataset, dict):
        if isinstance(dataset.get('pipeline'), list):
            yield dataset
        yield from _datasets(dataset.get('dataset'))
        for inner in dataset.get('datasets') or []:
            yield from _datasets(inner)


def _pipelines(cfg: Config) -> List[Tuple[str, List]]:
    out = []
    for name in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        loader = cfg.get(name)
        if not isinstance(loader, dict):
            continue
        for dataset in _datasets(loader.get('dataset')):
            if any(isinstance(t, dict) and _short(t.get('type')) == LOADER
                   for t in dataset['pipeline']):
                out.append((name, dataset['pipeline']))
    return out


def _plan(pipelines) -> Tuple[Optional[str], Optional[Dict], Optional[Dict]]:
    """Check that all pipelines can be rewritten; return (reason to skip, norm, photometric)."""
    norms, photometric = [], None
    seen = set()
    for name, pipeline in pipelines:
        if id(pipeline) in seen:  # test_dataloader = val_dataloader
            continue
        seen.add(id(pipeline))
        types = [_short(t.get('type')) if isinstance(t, dict) else None for t in pipeline]
        start = types.index(LOADER)
        for t, kind in zip(pipeline[start + 1:], types[start + 1:]):
            if kind in (RESIZE, PHOTOMETRIC, NORMALIZE, PACK) or kind in IMAGE_SAFE:
                continue
            return (f'{name}: {kind or t!r} works on the decoded float images; only '
                    f'{", ".join(IMAGE_SAFE)} may stand between loading and packing', None, None)
        norm = [t for t, k in zip(pipeline, types) if k == NORMALIZE]
        if len(norm) != 1:
            return (f'{name}: expected one NormalizeMultiviewImage, found {len(norm)}', None,
                    None)
        norms.append({k: v for k, v in norm[0].items() if k != 'type'})
        photo = [t for t, k in zip(pipeline, types) if k == PHOTOMETRIC]
        if photo and name != 'train_dataloader':
            return (f'{name}: photometric distortion outside the training pipeline', None, None)
        if photo:
            # The stock transform runs mmdet's PhotoMetricDistortion, which clips the
            # saturation; the GPU twin clips only when told to.
            photometric = dict(saturation_clip=True,
                               **{k: v for k, v in photo[0].items() if k != 'type'})
    if any(n != norms[0] for n in norms):
        return 'the pipelines normalise differently', None, None
    return None, norms[0], photometric


def apply_fast_pipeline(cfg: Config, opts: Dict) -> List[str]:
    """Rewrite the camera pipelines and the data preprocessor of ``cfg`` in place.

    Args:
        cfg (Config): The full config.
        opts (dict): The validated ``turbox.data`` options (``fast_pipeline``, ``gpu_decode``).

    Returns:
        list[str]: One line per change.
    """
    if not opts['fast_pipeline']:
        return []
    pipelines = _pipelines(cfg)
    if not pipelines:
        return []
    model = cfg.get('model') or {}
    preprocessor = model.get('data_preprocessor') or {}
    kind = _short(preprocessor.get('type'))
    if kind not in (STOCK_PREPROCESSOR, 'TurboxDet3DDataPreprocessor'):
        reason = f'model.data_preprocessor {preprocessor.get("type")!r} is not mmdet3d\'s'
    else:
        reason, norm, photometric = _plan(pipelines)
    if reason is not None:
        print_log(f'turbox.data.fast_pipeline: the image pipelines are kept as they are: '
                  f'{reason}', logger='current', level=logging.WARNING)
        return []

    changes = []
    done = set()
    for name, pipeline in pipelines:
        if id(pipeline) in done:
            continue
        done.add(id(pipeline))
        new = []
        for t in pipeline:
            kind = _short(t.get('type')) if isinstance(t, dict) else None
            if kind == LOADER:
                args = {k: t[k] for k in LOADER_ARGS if k in t}
                args.update(type='turbox_mm.LoadMultiViewImagesTurbo',
                            decode_on='gpu' if opts['gpu_decode'] else 'cpu',
                            scaled_decode=not opts['gpu_decode'])
                new.append(args)
            elif kind == RESIZE:
                new.append(dict(type='turbox_mm.MultiViewAffineAug'))
            elif kind in (PHOTOMETRIC, NORMALIZE):
                continue
            elif kind == PACK and opts['gpu_decode']:
                new.append(dict(t, type='turbox_mm.PackJpegBytes'))
            else:
                new.append(t)
        pipeline[:] = new
        changes.append(f'{name}: image pipeline -> LoadMultiViewImagesTurbo'
                       f"{' (decode on the GPU)' if opts['gpu_decode'] else ''} + "
                       'MultiViewAffineAug; photometric distortion and normalisation on the GPU')
    preprocessor = dict(preprocessor, type='turbox_mm.TurboxDet3DDataPreprocessor',
                        mean=norm['mean'], std=norm['std'], bgr_to_rgb=norm.get('to_rgb', True))
    if photometric is not None:
        preprocessor['photometric'] = photometric
    model['data_preprocessor'] = preprocessor
    changes.append('model.data_preprocessor = turbox_mm.TurboxDet3DDataPreprocessor (uint8 in; '
                   'normalisation' + (' and photometric distortion' if photometric is not None
                                      else '') + ' on the device)')
    return changes
