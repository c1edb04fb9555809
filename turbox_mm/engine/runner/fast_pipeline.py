"""``turbox.data``: the stock multi-view image pipeline becomes its turbox twin.

A stock camera pipeline loads float images, resizes, crops, flips and rotates them with PIL
(and, Sparse4D and MapTR style, distorts their colours and normalises them), all in the loader
workers. Its turbox twin, applied here to every pipeline of the config, in one of three styles.

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

MapTR style (hustvl/MapTR v1 and v2, BEVFormer-like: mmdet3d's loader followed by
``RandomScaleImageMultiViewImage``):

============================================  ==================================================
stock                                         turbox
============================================  ==================================================
``LoadMultiViewImageFromFiles`` (float32)     ``turbox_mm.LoadScaledMultiViewImagesTurbo``
+ ``turbox_mm.RandomScaleImageMultiView       (uint8, decoded straight at the drawn scale: DCT-
Image`` (cv2 bilinear rescale)                scaled where that size is exact, 0.5 of 1600x900;
                                              else full decode + the stock resize; the same
                                              numpy draw and geometry, made at load time)
``turbox_mm.PhotoMetricDistortionMulti        removed; the data preprocessor distorts on the
ViewImage`` (train pipeline)                  GPU (``photometric=...``, training only)
``turbox_mm.NormalizeMultiviewImage``         removed; the data preprocessor normalises on the
                                              GPU (``mean``, ``std``, ``bgr_to_rgb``)
``turbox_mm.PadMultiViewImage`` /             kept: they pad the uint8 images (and ``gt_depth``)
``PadMultiViewImageDepth`` (after             and set ``img_shape``/``pad_shape`` as stock; the
normalisation: 0 in normalised units)         preprocessor sets the padding (outside each
                                              camera's ``ori_shape``) to their ``pad_val`` after
                                              normalising (``refill_padding``)
``LoadMapGT``, ``RasterizeMapGT``,            kept (they read the map, the points, the geometry
``PointToMultiViewDepth``, point loaders      or only the image size)
``Det3DDataPreprocessor``                     ``turbox_mm.TurboxDet3DDataPreprocessor``
============================================  ==================================================

Only ``LoadMapGT`` and the point loaders (and the moved transforms) may stand between the
loader and the rescale (it now happens at load time); ``gpu_decode`` is refused. Pixels against
stock (``tests/test_maptr_fast_pipeline.py``): the 1/2 DCT decode against the float decode and
bilinear 0.5 rescale differs by 0.010 normalised units on average, 0.48 at most (hard edges;
about 0.6 and 27 grey levels). v1 distorts the colours before the rescale, the twin after it
(as v2): with the same draws that changes a pixel by 0.0004 normalised units on average (99th
percentile 0.008, max 0.94 where the hue wraps; measured on 1600x900 camera-like JPEGs).

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
(``tests/test_fast_transforms.py``, ``tests/test_bevfusion_fast_pipeline.py``,
``tests/test_maptr_fast_pipeline.py``); Sparse4D's and MapTR's photometric draws come from
another random stream (same distribution).
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
RESCALE = 'RandomScaleImageMultiViewImage'
PADS = ('PadMultiViewImage', 'PadMultiViewImageDepth')
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
              'BEVLoadMultiViewImagesTurbo', 'ImageAug3DTurbo', 'VectorizeMap',
              'NuScenesSparseDriveAdaptor')
#: MapTR style: transforms that may stand after the loader besides those above: they read the
#: map, the points, the image size or the geometry, or pad uint8 images (``PADS``, whose
#: padding the data preprocessor refills after normalising).
MAPTR_SAFE = ('LoadMapGT', 'RasterizeMapGT', 'PointToMultiViewDepth', 'NuScenesMapTRAdaptor',
              'PackMapTRInputs') + PADS
#: MapTR style: transforms that may stand between the loader and the rescale, which the twin
#: loader performs at load time: they read neither the images nor their geometry and draw
#: nothing from numpy's global generator (the moved transforms aside).
MAPTR_BEFORE_RESCALE = ('LoadMapGT', 'LoadPointsFromFile', 'LoadPointsFromFileChecked')
#: Per style: the stock loader, the geometric augmentation the rewrite replaces, and the image
#: transforms it removes (their work moves to the data preprocessor).
STYLES = {
    'sparse4d': dict(loader=LOADER, aug=RESIZE, moved=(PHOTOMETRIC, NORMALIZE)),
    'bevfusion': dict(loader=BEV_LOADER, aug=BEV_AUG, moved=()),
    'maptr': dict(loader=LOADER, aug=RESCALE, moved=(PHOTOMETRIC, NORMALIZE)),
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
    loaders = {style['loader'] for style in STYLES.values()}
    found = [t for t in types if t in loaders]
    if len(found) != 1:
        return None, f'{name}: expected one multi-view image loader, found ' + ', '.join(found)
    if found[0] == BEV_LOADER:
        return 'bevfusion', None
    # mmdet3d's loader: MapTR's (BEVFormer's) pipelines rescale, Sparse4D's resize and crop.
    return ('maptr' if RESCALE in types else 'sparse4d'), None


def _check_transforms(name: str, style: str, pipeline: List, types: List[Optional[str]],
                      gpu_decode: bool) -> Optional[str]:
    """Why the transforms after the loader cannot take the twin's images; None if they can."""
    spec = STYLES[style]
    start = types.index(spec['loader'])
    if style == 'maptr':
        return _check_maptr(name, pipeline, types, start, gpu_decode)
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


def _check_maptr(name: str, pipeline: List, types: List[Optional[str]], start: int,
                 gpu_decode: bool) -> Optional[str]:
    """:func:`_check_transforms` of the MapTR style."""
    if gpu_decode:
        return (f'{name}: MapTR style: gpu_decode is not supported (the padding and depth '
                'transforms need the images in the workers)')
    safe = IMAGE_SAFE + MAPTR_SAFE
    allowed = (RESCALE, PACK, PHOTOMETRIC, NORMALIZE) + safe
    for i in range(start + 1, len(types)):
        if types[i] not in allowed:
            return (f'{name}: {types[i] or pipeline[i]!r} works on the decoded float images; '
                    f'only {", ".join(safe)} may stand between loading and packing')
    rescales = [i for i, t in enumerate(types) if t == RESCALE]
    if len(rescales) != 1 or rescales[0] < start:
        return f'{name}: expected one {RESCALE} after the loader, found {len(rescales)}'
    rescale = rescales[0]
    early = [t for t in types[start + 1:rescale]
             if t not in MAPTR_BEFORE_RESCALE + (PHOTOMETRIC, NORMALIZE)]
    if early:
        return (f'{name}: {early[0]} stands between the loader and {RESCALE}, which the twin '
                f'loader performs at load time; only {", ".join(MAPTR_BEFORE_RESCALE)} may')
    pads = [i for i, t in enumerate(types) if t in PADS]
    if len(pads) > 1 or (pads and pads[0] < rescale):
        return f'{name}: expected at most one padding transform, after {RESCALE}'
    norm = [i for i, t in enumerate(types) if t == NORMALIZE]
    if pads and norm and pads[0] < norm[0]:
        return f'{name}: {types[pads[0]]} pads the images before NormalizeMultiviewImage'
    return None


def _maptr_padding(pipelines) -> Tuple[Optional[str], Optional[float]]:
    """(reason to skip, the normalised-space pad value to refill or None)."""
    values = {float(t.get('pad_val', 0)) for _, pipeline in pipelines
              for t, k in zip(pipeline, _types(pipeline)) if k in PADS}
    if len(values) > 1:
        return f'the pipelines pad with different values {sorted(values)}', None
    return None, (values.pop() if values else None)


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
    style = styles.pop()
    if style == 'maptr':
        reason, refill = _maptr_padding(pipelines)
        if reason is not None:
            return reason, None, None, None
        norm = dict(norms[0], refill_padding=refill)
    else:
        norm = norms[0] if norms else None
    return None, style, norm, photometric


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
    rewrite = dict(sparse4d=_rewrite_sparse4d, bevfusion=_rewrite_bevfusion,
                   maptr=_rewrite_maptr)[style]
    changes = [rewrite(name, pipeline, opts['gpu_decode']) for name, pipeline in pipelines]
    if style in ('sparse4d', 'maptr'):
        preprocessor = dict(preprocessor, type='turbox_mm.TurboxDet3DDataPreprocessor',
                            mean=norm['mean'], std=norm['std'],
                            bgr_to_rgb=norm.get('to_rgb', True))
        if photometric is not None:
            preprocessor['photometric'] = photometric
        refill = norm.get('refill_padding')
        if refill is not None:
            preprocessor['refill_padding'] = refill
        changes.append('model.data_preprocessor = turbox_mm.TurboxDet3DDataPreprocessor (uint8 '
                       'in; normalisation' + (' and photometric distortion'
                                              if photometric is not None else '') +
                       ' on the device' +
                       (f'; the padding set to {refill:g} after normalising'
                        if refill is not None else '') + ')')
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


def _rewrite_maptr(name: str, pipeline: List, gpu_decode: bool) -> str:
    types = _types(pipeline)
    rescale = pipeline[types.index(RESCALE)]
    new = []
    for t, kind in zip(pipeline, types):
        if kind == LOADER:
            args = {k: t[k] for k in LOADER_ARGS if k in t}
            args.update(type='turbox_mm.LoadScaledMultiViewImagesTurbo', scaled_decode=True)
            if 'scales' in rescale:
                args['scales'] = list(rescale['scales'])
            new.append(args)
        elif kind in (RESCALE, PHOTOMETRIC, NORMALIZE):
            continue
        else:
            new.append(t)
    pipeline[:] = new
    return (f'{name}: image pipeline -> LoadScaledMultiViewImagesTurbo (uint8, decoded at the '
            'scale: DCT-scaled where exact); photometric distortion and normalisation on the '
            'GPU')


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
