"""``turbox.data``: the stock multi-view image pipeline becomes its turbox twin.

A stock camera pipeline loads float images, resizes, crops, flips and rotates them with PIL
(and, Sparse4D style, distorts their colours and normalises them), all in the loader workers.
Its turbox twin, applied here to every pipeline of the config, in one of two styles.

Sparse4D style (upstream's Sparse4D, BEVFormer, StreamPETR):

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

BEVFusion style (mmdet3d 1.4's ``projects/BEVFusion``, turbox_mm's port):

============================================  ==================================================
stock                                         turbox
============================================  ==================================================
``BEVLoadMultiViewImageFromFiles`` (pillow,   ``turbox_mm.BEVLoadMultiViewImagesTurbo``
float32 RGB)                                  (libjpeg-turbo, uint8 RGB, the same matrices;
                                              DCT-scaled decoding where the largest resize
                                              allows)
``ImageAug3D`` (per camera PIL resize, crop,  ``turbox_mm.ImageAug3DTurbo`` (the same draws and
flip, rotate)                                 ``img_aug_matrix``; one warp per image)
``GridMask``, ``BEVFusionGlobalRotScaleTrans``  kept (they do not read pixels, or accept uint8)
``BEVFusionRandomFlip3D``
``Det3DDataPreprocessor`` (already            ``turbox_mm.TurboxDet3DDataPreprocessor``, the
normalising: ``mean``, ``std``, RGB)          same arguments (uint8 in, the same floats out)
============================================  ==================================================

The type names match whatever their scope (``turbox_mm.ImageAug3D``, or ``ImageAug3D`` as
mmdet3d's ``projects/BEVFusion`` registers it: the port has its semantics).

With ``gpu_decode`` the loader does not decode at all: ``decode_on='gpu'`` and
``Pack3DDetInputs`` becomes ``turbox_mm.PackJpegBytes``, and nvJPEG decodes in the data
preprocessor (into BGR: a BEVFusion-style preprocessor then swaps the channels to keep RGB).

The rewrite is all or nothing: it happens only when every pipeline that loads multi-view images
can be rewritten consistently (one style, one normalisation for all of them, every image
transform between loading and packing known to accept uint8 images); otherwise the config is
kept as it is, with a warning that says why. Geometry (``lidar2img``, ``img_aug_matrix`` and
the other matrices) is the same in both pipelines; pixels agree within interpolation tolerance
(``tests/test_fast_transforms.py``, ``tests/test_bevfusion_fast_pipeline.py``); Sparse4D's
photometric draws come from another random stream (same distribution).
"""
import logging
from typing import Dict, Iterator, List, Optional, Tuple

from mmengine.config import Config
from mmengine.logging import print_log

LOADER = 'LoadMultiViewImageFromFiles'
RESIZE = 'ResizeCropFlipImage'
PHOTOMETRIC = 'PhotoMetricDistortionMultiViewImage'
NORMALIZE = 'NormalizeMultiviewImage'
PACK = 'Pack3DDetInputs'
BEV_LOADER = 'BEVLoadMultiViewImageFromFiles'
BEV_AUG = 'ImageAug3D'
GRID_MASK = 'GridMask'
STOCK_PREPROCESSOR = 'Det3DDataPreprocessor'
#: Arguments of the stock loaders that the turbox loaders take as they are.
LOADER_ARGS = ('color_type', 'backend_args', 'num_views', 'num_ref_frames', 'test_mode',
               'set_default_scale')
#: Transforms that may stand between loading and packing in a rewritten pipeline: they read
#: geometry, points or boxes only, or accept uint8 images.
IMAGE_SAFE = ('LoadPointsFromFile', 'LoadPointsFromFileChecked', 'LoadPointsFromMultiSweeps',
              'LoadPointsFromMultiSweepsFast',
              'LoadAnnotations3D', 'MultiScaleDepthMapGenerator', 'BBoxRotation',
              'CircleObjectRangeFilter', 'InstanceNameFilter', 'ObjectNameFilter',
              'ObjectRangeFilter', 'NuScenesSparse4DAdaptor', 'PointsRangeFilter',
              'PointShuffle', 'MultiViewAffineAug', 'LoadMultiViewImagesTurbo', 'PackJpegBytes',
              'BEVFusionGlobalRotScaleTrans', 'BEVFusionRandomFlip3D',
              'BEVLoadMultiViewImagesTurbo', 'ImageAug3DTurbo')
#: Per style: the stock loader, the geometric augmentation the rewrite replaces, and the image
#: transforms it removes (their work moves to the data preprocessor).
STYLES = {
    'sparse4d': dict(loader=LOADER, aug=RESIZE, moved=(PHOTOMETRIC, NORMALIZE)),
    'bevfusion': dict(loader=BEV_LOADER, aug=BEV_AUG, moved=()),
}


def _short(type_name) -> str:
    """'mmdet3d.ImageAug3D' -> 'ImageAug3D' (scope prefixes do not matter here)."""
    return type_name.split('.')[-1] if isinstance(type_name, str) else ''


def _types(pipeline: List) -> List[Optional[str]]:
    return [_short(t.get('type')) if isinstance(t, dict) else None for t in pipeline]


def _datasets(dataset) -> Iterator[Dict]:
    """Every dataset config with a pipeline inside ``dataset`` (wrappers included)."""
    if isinstance(dataset, dict):
        if isinstance(dataset.get('pipeline'), list):
            yield dataset
        yield from _datasets(dataset.get('dataset'))
        for inner in dataset.get('datasets') or []:
            yield from _datasets(inner)


def _pipelines(cfg: Config) -> List[Tuple[str, List]]:
    """``(loader name, pipeline)`` of every pipeline that loads multi-view images, each once
    (``test_dataloader = val_dataloader`` shares one)."""
    out, seen = [], set()
    loaders = {style['loader'] for style in STYLES.values()}
    for name in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        loader = cfg.get(name)
        if not isinstance(loader, dict):
            continue
        for dataset in _datasets(loader.get('dataset')):
            pipeline = dataset['pipeline']
            if id(pipeline) not in seen and loaders & set(_types(pipeline)):
                seen.add(id(pipeline))
                out.append((name, pipeline))
    return out


def _style(name: str, types: List[Optional[str]]) -> Tuple[Optional[str], Optional[str]]:
    """(style, None) or (None, reason to skip)."""
    found = [s for s, style in STYLES.items() if style['loader'] in types]
    if len(found) != 1 or types.count(STYLES[found[0]]['loader']) != 1:
        return None, f'{name}: expected one multi-view image loader, found ' + ', '.join(
            t for t in types if any(t == s['loader'] for s in STYLES.values()))
    return found[0], None


def _check_transforms(name: str, style: str, pipeline: List, types: List[Optional[str]],
                      gpu_decode: bool) -> Optional[str]:
    """Why the transforms after the loader cannot take the twin's images; None if they can."""
    spec = STYLES[style]
    start = types.index(spec['loader'])
    allowed = (spec['aug'], PACK, GRID_MASK) + spec['moved'] + IMAGE_SAFE
    augs = [i for i in range(start + 1, len(types)) if types[i] == spec['aug']]
    for i in range(start + 1, len(types)):
        t, kind = pipeline[i], types[i]
        if kind not in allowed:
            return (f'{name}: {kind or t!r} works on the decoded float images; only '
                    f'{", ".join(IMAGE_SAFE)} may stand between loading and packing')
        if kind == GRID_MASK and t.get('prob', 1.0) > 0:
            # It multiplies the images by a float32 mask: uint8 images come out as the stock
            # float32 ones would, but only where they exist, have their final size and are
            # not to be normalised later than in the stock pipeline.
            if style == 'sparse4d':
                return (f'{name}: GridMask(prob={t.get("prob", 1.0)}) masks the images, whose '
                        'normalisation moves to the device')
            if gpu_decode:
                return (f'{name}: GridMask(prob={t.get("prob", 1.0)}) masks the images in the '
                        'workers; with gpu_decode they are decoded on the device')
            if any(j > i for j in augs):
                return (f'{name}: GridMask(prob={t.get("prob", 1.0)}) before {spec["aug"]} '
                        'would mask the images at their decoded size')
    # ImageAug3DTurbo draws from the full-resolution shape, as the stock one: once only.
    if (style == 'bevfusion' and len(augs) > 1) or (gpu_decode and not augs):
        return (f'{name}: expected one {spec["aug"]} after the loader'
                f'{" (gpu_decode warps in it)" if gpu_decode else ""}, found {len(augs)}')
    return None


Plan = Tuple[Optional[str], Optional[str], Optional[Dict], Optional[Dict]]


def _plan(pipelines, gpu_decode: bool) -> Plan:
    """Check that all pipelines can be rewritten; return (reason to skip, style, norm,
    photometric). ``norm`` is None for the BEVFusion style (the preprocessor normalises
    already)."""
    styles, norms, photometric = set(), [], None
    for name, pipeline in pipelines:
        types = _types(pipeline)
        style, reason = _style(name, types)
        reason = reason or _check_transforms(name, style, pipeline, types, gpu_decode)
        if reason is not None:
            return reason, None, None, None
        styles.add(style)
        if style == 'bevfusion':
            continue
        norm = [t for t, k in zip(pipeline, types) if k == NORMALIZE]
        if len(norm) != 1:
            return (f'{name}: expected one NormalizeMultiviewImage, found {len(norm)}', None,
                    None, None)
        norms.append({k: v for k, v in norm[0].items() if k != 'type'})
        photo = [t for t, k in zip(pipeline, types) if k == PHOTOMETRIC]
        if photo and name != 'train_dataloader':
            return (f'{name}: photometric distortion outside the training pipeline', None,
                    None, None)
        if photo:
            # The stock transform runs mmdet's PhotoMetricDistortion, which clips the
            # saturation; the GPU twin clips only when told to.
            photometric = dict(saturation_clip=True,
                               **{k: v for k, v in photo[0].items() if k != 'type'})
    if len(styles) > 1:
        return ('the pipelines load images in different styles (' +
                ' and '.join(STYLES[s]['loader'] for s in sorted(styles)) + ')', None, None,
                None)
    if any(n != norms[0] for n in norms):
        return 'the pipelines normalise differently', None, None, None
    return None, styles.pop(), (norms[0] if norms else None), photometric


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
        reason, style, norm, photometric = _plan(pipelines, opts['gpu_decode'])
    if reason is not None:
        print_log(f'turbox.data.fast_pipeline: the image pipelines are kept as they are: '
                  f'{reason}', logger='current', level=logging.WARNING)
        return []
    rewrite = _rewrite_sparse4d if style == 'sparse4d' else _rewrite_bevfusion
    changes = [rewrite(name, pipeline, opts['gpu_decode']) for name, pipeline in pipelines]
    if style == 'sparse4d':
        preprocessor = dict(preprocessor, type='turbox_mm.TurboxDet3DDataPreprocessor',
                            mean=norm['mean'], std=norm['std'],
                            bgr_to_rgb=norm.get('to_rgb', True))
        if photometric is not None:
            preprocessor['photometric'] = photometric
        changes.append('model.data_preprocessor = turbox_mm.TurboxDet3DDataPreprocessor (uint8 '
                       'in; normalisation' + (' and photometric distortion'
                                              if photometric is not None else '') +
                       ' on the device)')
    else:
        preprocessor = _bevfusion_preprocessor(preprocessor, opts['gpu_decode'])
        changes.append('model.data_preprocessor = turbox_mm.TurboxDet3DDataPreprocessor (uint8 '
                       'in; the same normalisation' +
                       (', bgr_to_rgb swapped: nvJPEG decodes to BGR' if opts['gpu_decode']
                        else '') + ')')
    model['data_preprocessor'] = preprocessor
    return changes


def _rewrite_sparse4d(name: str, pipeline: List, gpu_decode: bool) -> str:
    new = []
    for t, kind in zip(pipeline, _types(pipeline)):
        if kind == LOADER:
            args = {k: t[k] for k in LOADER_ARGS if k in t}
            args.update(type='turbox_mm.LoadMultiViewImagesTurbo',
                        decode_on='gpu' if gpu_decode else 'cpu', scaled_decode=not gpu_decode)
            new.append(args)
        elif kind == RESIZE:
            new.append(dict(type='turbox_mm.MultiViewAffineAug'))
        elif kind in (PHOTOMETRIC, NORMALIZE):
            continue
        elif kind == PACK and gpu_decode:
            new.append(dict(t, type='turbox_mm.PackJpegBytes'))
        else:
            new.append(t)
    pipeline[:] = new
    return (f'{name}: image pipeline -> LoadMultiViewImagesTurbo'
            f"{' (decode on the GPU)' if gpu_decode else ''} + MultiViewAffineAug; photometric "
            'distortion and normalisation on the GPU')


def _largest_resize(aug: Optional[Dict]) -> Optional[float]:
    """The largest resize factor ``ImageAug3D`` draws (its mean at test time)."""
    if aug is None or 'resize_lim' not in aug:
        return None
    limits = [float(v) for v in aug['resize_lim']]
    return max(limits) if aug.get('is_train', True) else sum(limits) / len(limits)


def _rewrite_bevfusion(name: str, pipeline: List, gpu_decode: bool) -> str:
    types = _types(pipeline)
    aug = next((t for t, k in zip(pipeline, types) if k == BEV_AUG), None)
    max_resize = _largest_resize(aug)
    new, scaled = [], False
    for t, kind in zip(pipeline, types):
        if kind == BEV_LOADER:
            args = {k: t[k] for k in LOADER_ARGS if k in t}
            scaled = not gpu_decode and max_resize is not None and max_resize <= 0.5
            args.update(type='turbox_mm.BEVLoadMultiViewImagesTurbo',
                        decode_on='gpu' if gpu_decode else 'cpu', scaled_decode=scaled)
            if scaled:
                args['max_resize'] = max_resize
            new.append(args)
        elif kind == BEV_AUG:
            new.append(dict(t, type='turbox_mm.ImageAug3DTurbo'))
        elif kind == PACK and gpu_decode:
            new.append(dict(t, type='turbox_mm.PackJpegBytes'))
        else:
            new.append(t)
    pipeline[:] = new
    decode = (' (decode on the GPU)' if gpu_decode else
              f' (uint8; DCT-scaled decode, resize <= {max_resize:g})' if scaled else ' (uint8)')
    return (f'{name}: image pipeline -> BEVLoadMultiViewImagesTurbo{decode}' +
            (' + ImageAug3DTurbo (the same draws, one warp per image)' if aug else ''))


def _bevfusion_preprocessor(preprocessor: Dict, gpu_decode: bool) -> Dict:
    """The stock preprocessor's arguments on turbox_mm's: the twin's uint8 RGB images give the
    stock float32 RGB ones' values, so only the type changes; nvJPEG's BGR images need the
    channel swap flipped."""
    swap = bool(preprocessor.get('bgr_to_rgb') or preprocessor.get('rgb_to_bgr'))
    out = {k: v for k, v in preprocessor.items() if k != 'rgb_to_bgr'}
    out.update(type='turbox_mm.TurboxDet3DDataPreprocessor', bgr_to_rgb=swap != gpu_decode)
    return out
