"""``PointToMultiViewDepth``: MapTR v2's depth ground truth, the keyframe lidar points
projected into every camera image."""
from typing import Dict, Sequence

import numpy as np
from mmcv.transforms import BaseTransform

from turbox_mm.registry import TRANSFORMS
from .normalize_multiview_image import image_list


def multiview_depth_maps(points: np.ndarray, cam2img: np.ndarray, img_aug: np.ndarray,
                         height: int, width: int, depth_range: Sequence[float] = (1.0, 35.0),
                         downsample: int = 1) -> np.ndarray:
    """Sparse depth maps of lidar points in ``N`` cameras: per pixel the depth of the nearest
    point, 0 where none lands.

    Per camera, as upstream's ``CustomPointToMultiViewDepth``: ``(u d, v d, d) = cam2img @
    (x, y, z, 1)``; ``(u, v, d)`` then goes through the image augmentation (its ``3 x 3``
    block and translation: ``A (u, v, d) + t``); the pixel is ``round((u, v) /
    downsample)`` (half to even, as ``torch.round``); kept when ``0 <= u < width //
    downsample``, ``0 <= v < height // downsample`` and ``depth_range[0] <= d <
    depth_range[1]`` (points behind the camera have ``d < 0``).

    Args:
        points (np.ndarray): ``(P, 3+)`` lidar points; the first three columns are used.
        cam2img (np.ndarray): ``[N, 4, 4]`` lidar -> pixels before augmentation
            (intrinsics ``@ lidar2cam``).
        img_aug (np.ndarray): ``[N, 4, 4]`` image augmentation (``img_aug_matrix``).
        height (int): Image height (after augmentation, before padding).
        width (int): Image width.
        depth_range (Sequence[float]): ``[min, max)`` depths kept. Defaults to (1, 35).
        downsample (int): Output stride. Defaults to 1.

    Returns:
        np.ndarray: ``[N, height // downsample, width // downsample]`` float32.

    Examples:
        >>> cam2img = np.eye(4)[None]  # camera = lidar frame, unit focal length
        >>> points = np.array([[4.0, 4.0, 4.0], [2.0, 2.0, 2.0], [0.0, 0.0, 0.5]])
        >>> depth = multiview_depth_maps(points, cam2img, np.eye(4)[None], 3, 3)
        >>> depth[0].tolist()  # pixel (1, 1) at 4 m and 2 m; 0.5 m is too near
        [[0.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]]
    """
    height, width = height // downsample, width // downsample
    cam2img = np.asarray(cam2img, np.float64).reshape(-1, 4, 4)
    img_aug = np.asarray(img_aug, np.float64).reshape(-1, 4, 4)
    num_cams = len(cam2img)
    out = np.zeros((num_cams, height, width), np.float32)
    xyz = np.asarray(points, np.float64)[:, :3]
    if len(xyz) == 0 or num_cams == 0:
        return out
    # [N, P, 3]: (u d, v d, d), then (u, v, d), then the image augmentation
    cam = np.einsum('nij,pj->npi', cam2img[:, :3, :3], xyz) + cam2img[:, None, :3, 3]
    with np.errstate(divide='ignore', invalid='ignore'):  # d = 0: inf / nan, dropped below
        pixel = np.concatenate([cam[..., :2] / cam[..., 2:3], cam[..., 2:3]], axis=-1)
    pixel = np.einsum('nij,npj->npi', img_aug[:, :3, :3], pixel) + img_aug[:, None, :3, 3]
    u = np.round(pixel[..., 0] / downsample)
    v = np.round(pixel[..., 1] / downsample)
    depth = pixel[..., 2]
    with np.errstate(invalid='ignore'):  # nan compares False: dropped
        kept = ((u >= 0) & (u < width) & (v >= 0) & (v < height)
                & (depth >= depth_range[0]) & (depth < depth_range[1]))
    cam_index, _ = np.nonzero(kept)
    flat = (cam_index * height + v[kept].astype(np.int64)) * width + u[kept].astype(np.int64)
    depth = depth[kept]
    # nearest first within each pixel, then the first of each pixel's run
    order = np.lexsort((depth, flat))
    flat, depth = flat[order], depth[order]
    first = np.ones(len(flat), bool)
    first[1:] = flat[1:] != flat[:-1]
    out.reshape(-1)[flat[first]] = depth[first]
    return out


@TRANSFORMS.register_module()
class PointToMultiViewDepth(BaseTransform):
    """Depth ground truth of MapTR v2's LSS encoder: the keyframe lidar points in every
    camera, the nearest point per pixel (hustvl/MapTR ``CustomPointToMultiViewDepth``,
    ``pipelines/loading.py`` @ 69ab751; see :func:`multiview_depth_maps`).

    Upstream projects each point along lidar -> lidar ego -> global -> camera ego -> camera
    with both ego poses, then the intrinsics, then ``img_aug_matrix``. mmdet3d 1.4's nuScenes
    infos (and ``tools/create_data.py synthetic``) store that same chain as each camera's
    ``lidar2cam``, so here the projection is ``camera_intrinsics @ lidar2cam`` (the
    intrinsics padded to ``4 x 4`` by :class:`NuScenesMapTRAdaptor`, ``lidar2cam`` from
    ``results['images']``, in the cameras' order) followed by ``img_aug_matrix``. After
    :class:`RandomScaleImageMultiViewImage` that is projecting with ``lidar2img``
    (tests/test_maptr_v2_data.py).

    The maps have the size of the images when this runs (after the rescale, before the
    padding: :class:`PadMultiViewImageDepth` pads them with the images).

    Deviations from upstream, both at the margins: (1) where several points land on one
    pixel, the nearest is kept exactly; upstream sorts on the float32 key ``pixel index +
    depth / 100``, which from about image row 328 of an 800-wide image resolves depth only to
    about 3 m, so it may keep a farther point (tests/test_maptr_v2_data.py shows such a tie);
    (2) the projection is float64 where upstream's is float32, which can move a point by one
    pixel at a rounding boundary or across the 1 m / 35 m limits. The depth loss sees either
    only where that pixel holds its patch's smallest depth.

    Args:
        grid_config (dict): Upstream's grid config; only ``depth`` (``[min, max, step]``) is
            read: depths in ``[min, max)`` are kept.
        downsample (int): Output stride. Defaults to 1.

    Required keys: ``points`` (mmdet3d ``LiDARPoints`` or an array; ``LoadPointsFromFile``),
    ``img`` (list of ``(H, W, C)``, all one size), ``images`` (per camera ``lidar2cam``),
    ``camera_intrinsics`` and ``img_aug_matrix`` (lists of ``4 x 4``,
    :class:`NuScenesMapTRAdaptor`, rescaled by :class:`RandomScaleImageMultiViewImage`).
    Added key: ``gt_depth`` (np.ndarray ``[N, H // downsample, W // downsample]`` float32,
    metres, 0 = no point).

    Examples:
        >>> t = PointToMultiViewDepth(grid_config=dict(depth=[1.0, 35.0, 0.5]))
        >>> cam = dict(lidar2cam=np.eye(4).tolist())  # camera = lidar frame
        >>> out = t(dict(points=np.array([[0.0, 0.0, 5.0]]), img=[np.zeros((4, 4, 3))],
        ...              images=dict(CAM_FRONT=cam), camera_intrinsics=[np.eye(4)],
        ...              img_aug_matrix=[np.eye(4)]))
        >>> out['gt_depth'].shape, float(out['gt_depth'][0, 0, 0])
        ((1, 4, 4), 5.0)
    """

    def __init__(self, grid_config: Dict, downsample: int = 1) -> None:
        depth = grid_config.get('depth') if isinstance(grid_config, dict) else None
        if depth is None or len(depth) < 2 or not depth[0] < depth[1]:
            raise ValueError('PointToMultiViewDepth: grid_config needs depth=[min, max, step] '
                             f'with min < max, got {grid_config!r}')
        if int(downsample) < 1:
            raise ValueError(f'PointToMultiViewDepth: downsample must be >= 1, got {downsample}')
        self.grid_config = grid_config
        self.depth_range = (float(depth[0]), float(depth[1]))
        self.downsample = int(downsample)

    def transform(self, results: Dict) -> Dict:
        """Add ``gt_depth``.

        Args:
            results (dict): The sample.

        Returns:
            dict: ``results`` with ``gt_depth``.
        """
        name = type(self).__name__
        token = results.get('token', results.get('sample_idx'))
        if 'points' not in results:
            raise KeyError(f'{name}: sample {token} has no "points" (LoadPointsFromFile must '
                           'come first)')
        imgs = image_list(results, name)
        shapes = {img.shape[:2] for img in imgs}
        if len(shapes) != 1:
            raise ValueError(f'{name}: sample {token}: the images differ in size '
                             f'({sorted(shapes)}); the depth maps are stacked')
        height, width = shapes.pop()
        for key in ('camera_intrinsics', 'img_aug_matrix'):
            if key not in results:
                raise KeyError(f'{name}: sample {token} has no "{key}" (NuScenesMapTRAdaptor '
                               'must come first)')
        cameras = list((results.get('images') or {}).values())
        counts = dict(img=len(imgs), images=len(cameras),
                      camera_intrinsics=len(results['camera_intrinsics']),
                      img_aug_matrix=len(results['img_aug_matrix']))
        if 'lidar2img' in results:  # not read, but a different count means a broken sample
            counts['lidar2img'] = len(results['lidar2img'])
        if len(set(counts.values())) != 1:
            raise ValueError(f'{name}: sample {token}: camera counts differ: {counts}')
        missing = [i for i, cam in enumerate(cameras) if 'lidar2cam' not in cam]
        if missing:
            raise KeyError(f'{name}: sample {token}: images of cameras {missing} have no '
                           '"lidar2cam"')
        intrinsics = np.asarray(results['camera_intrinsics'], np.float64)
        lidar2cam = np.asarray([cam['lidar2cam'] for cam in cameras], np.float64)
        points = results['points']
        points = points.tensor.numpy() if hasattr(points, 'tensor') else np.asarray(points)
        results['gt_depth'] = multiview_depth_maps(
            points, intrinsics @ lidar2cam, np.asarray(results['img_aug_matrix'], np.float64),
            height, width, self.depth_range, self.downsample)
        return results

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(grid_config={self.grid_config}, '
                f'downsample={self.downsample})')
