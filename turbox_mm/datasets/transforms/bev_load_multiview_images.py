"""``BEVLoadMultiViewImageFromFiles``: BEVFusion's camera loader, with the camera matrices its
view transform reads."""
from typing import Dict, List, Tuple

import mmcv
import numpy as np
from mmdet3d.datasets.transforms import LoadMultiViewImageFromFiles
from mmengine.fileio import get

from turbox_mm.registry import TRANSFORMS


def camera_matrices(cam_item: Dict) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four matrices of one camera, in the dtypes mmdet3d 1.4's BEVFusion loader gives them.

    ``lidar2cam = [R | t]`` comes from the info as it is (float64 for the lists of v2 infos).
    The intrinsics (a 3 x 3, or a larger block up to 4 x 4) are written into a float32
    identity: ``cam2img``. ``cam2lidar = [R^T | -R^T t]`` (the rigid inverse) is computed
    from the float32 rounding of ``lidar2cam`` and stored in a float64 array;
    ``lidar2img = cam2img @ lidar2cam`` in float32.

    Args:
        cam_item (dict): One camera of ``results['images']``: ``cam2img`` and ``lidar2cam``.

    Returns:
        tuple[np.ndarray]: ``(cam2img, lidar2cam, cam2lidar, lidar2img)``, each 4 x 4.

    Examples:
        >>> lidar2cam = [[0, -1, 0, 1], [0, 0, -1, 2], [1, 0, 0, 3], [0, 0, 0, 1]]
        >>> item = dict(cam2img=[[100, 0, 50], [0, 100, 40], [0, 0, 1]], lidar2cam=lidar2cam)
        >>> cam2img, l2c, cam2lidar, lidar2img = camera_matrices(item)
        >>> cam2lidar[:3, 3].tolist(), lidar2img.dtype, (cam2lidar @ l2c == np.eye(4)).all()
        ([-3.0, 1.0, 2.0], dtype('float32'), True)
    """
    lidar2cam = np.asarray(cam_item['lidar2cam'])
    rigid = lidar2cam.astype(np.float32)
    rotation, translation = rigid[:3, :3], rigid[:3, 3:4]
    cam2lidar = np.eye(4)
    cam2lidar[:3, :3] = rotation.T
    cam2lidar[:3, 3:4] = -(rotation.T @ translation)
    intrinsic = np.asarray(cam_item['cam2img'], dtype=np.float32)
    cam2img = np.eye(4, dtype=np.float32)
    cam2img[:intrinsic.shape[0], :intrinsic.shape[1]] = intrinsic
    return cam2img, lidar2cam, cam2lidar, cam2img @ rigid


@TRANSFORMS.register_module()
class BEVLoadMultiViewImageFromFiles(LoadMultiViewImageFromFiles):
    """Load every camera image of a sample with pillow (RGB) and write the camera matrices, as
    mmdet3d 1.4's ``projects/BEVFusion`` ``BEVLoadMultiViewImageFromFiles``.

    The cameras are taken in the order of ``results['images']`` (the info file's: front,
    front right, front left, back, back left, back right on nuScenes). Written keys:

    - ``img``: a list of ``[H, W, 3]`` RGB arrays (float32 with ``to_float32``, else uint8);
      images of different sizes are zero-padded at the bottom and right to the largest.
    - ``img_path`` and ``filename``: the file paths.
    - ``cam2img`` (``[N, 4, 4]`` float32), ``ori_cam2img`` (a copy of it), ``lidar2cam``
      (``[N, 4, 4]`` as in the info), ``cam2lidar`` (``[N, 4, 4]`` float64),
      ``lidar2img`` (``[N, 4, 4]`` float32): see :func:`camera_matrices`.
    - ``img_shape``, ``ori_shape``, ``pad_shape``: ``(H, W)`` of the (padded) images;
      ``scale_factor = 1.0`` with ``set_default_scale``; ``img_norm_cfg`` (zero mean, unit
      std); ``num_views`` and ``num_ref_frames`` as given.

    ``num_views`` defaults to 5, as upstream, whose lidar-camera config leaves it there with six
    cameras: it is only recorded, and every camera of the sample is loaded. A missing or
    unreadable image file raises an error naming the file, the camera and the sample.

    Upstream's previous-frame branch (``num_ref_frames > 0``) reads ``img_filename``, which
    mmdet3d 1.4's datasets do not write; it is refused here.

    Args:
        to_float32 (bool): Convert the images to float32. Defaults to False.
        color_type (str): mmcv's ``flag`` for decoding (``'color'``, ``'unchanged'``, ...).
            Defaults to 'unchanged'.
        backend_args (dict, optional): mmengine file backend arguments. Defaults to None.
        num_views (int): Recorded in ``results['num_views']``. Defaults to 5.
        num_ref_frames (int): Only values <= 0 (no previous frames). Defaults to -1.
        test_mode (bool): Kept for the signature. Defaults to False.
        set_default_scale (bool): Set ``scale_factor = 1.0``. Defaults to True.

    Examples:
        >>> import os, tempfile
        >>> from PIL import Image
        >>> path = os.path.join(tempfile.mkdtemp(), 'front.jpg')
        >>> Image.new('RGB', (32, 24), (255, 0, 0)).save(path, quality=100)
        >>> cam = dict(img_path=path, cam2img=np.eye(3), lidar2cam=np.eye(4))
        >>> loader = BEVLoadMultiViewImageFromFiles(to_float32=True, color_type='color')
        >>> out = loader(dict(images=dict(CAM_FRONT=cam), sample_idx=0))
        >>> out['img'][0].shape, out['img'][0].dtype, out['img'][0][0, 0].round().tolist()
        ((24, 32, 3), dtype('float32'), [254.0, 0.0, 0.0])
        >>> out['lidar2img'].shape, out['ori_shape']
        ((1, 4, 4), (24, 32))
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.num_ref_frames > 0:
            raise NotImplementedError(
                f'{type(self).__name__}: num_ref_frames={self.num_ref_frames} (previous '
                'frames) is not supported: upstream reads results["img_filename"], which '
                "mmdet3d 1.4's datasets do not write")

    def transform(self, results: Dict) -> Dict:
        """Load the images and write the keys listed in the class docstring.

        Args:
            results (dict): The sample; ``images`` maps each camera to a dict with
                ``img_path``, ``cam2img`` and ``lidar2cam``.

        Returns:
            dict: ``results`` with the images and matrices.
        """
        cams = list(results['images'])
        items = [results['images'][cam] for cam in cams]
        filenames = [item['img_path'] for item in items]
        cam2img, lidar2cam, cam2lidar, lidar2img = zip(*map(camera_matrices, items))
        results['img_path'] = filenames
        results['cam2img'] = np.stack(cam2img)
        results['lidar2cam'] = np.stack(lidar2cam)
        results['cam2lidar'] = np.stack(cam2lidar)
        results['lidar2img'] = np.stack(lidar2img)
        results['ori_cam2img'] = results['cam2img'].copy()

        imgs = [self._load(path, cam, results) for path, cam in zip(filenames, cams)]
        imgs = self._pad_to_largest(imgs, results)
        if self.to_float32:
            imgs = [img.astype(np.float32) for img in imgs]
        shape = imgs[0].shape[:2]
        results['filename'] = filenames
        results['img'] = imgs
        results['img_shape'] = shape
        results['ori_shape'] = shape
        results['pad_shape'] = shape
        if self.set_default_scale:
            results['scale_factor'] = 1.0
        # Upstream counts the channels of its (H, W, C, N) stack: N for 2-D (grey) images.
        channels = imgs[0].shape[2] if imgs[0].ndim == 3 else len(imgs)
        results['img_norm_cfg'] = dict(mean=np.zeros(channels, dtype=np.float32),
                                       std=np.ones(channels, dtype=np.float32), to_rgb=False)
        results['num_views'] = self.num_views
        results['num_ref_frames'] = self.num_ref_frames
        return results

    def _where(self, path: str, cam: str, results: Dict) -> str:
        token = results.get('token')
        sample = f'sample_idx {results.get("sample_idx")}' + (f', token {token}' if token else '')
        return f'{path} (camera {cam}, {sample})'

    def _load(self, path: str, cam: str, results: Dict) -> np.ndarray:
        """One image, RGB, decoded by pillow (as upstream); errors name the file and sample."""
        name = type(self).__name__
        try:
            data = get(path, backend_args=self.backend_args)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f'{name}: image file not found: {self._where(path, cam, results)}') from error
        try:
            return mmcv.imfrombytes(data, flag=self.color_type, backend='pillow',
                                    channel_order='rgb')
        except OSError as error:  # PIL: not an image, or a truncated one
            raise OSError(f'{name}: cannot decode image {self._where(path, cam, results)}: '
                          f'{error}') from error

    def _pad_to_largest(self, imgs: List[np.ndarray], results: Dict) -> List[np.ndarray]:
        """Zero-pad every image to the largest height and width, as upstream."""
        shapes = {img.shape for img in imgs}
        if len(shapes) == 1:
            return imgs
        if len({shape[2:] for shape in shapes}) > 1:
            raise ValueError(f'{type(self).__name__}: the cameras of sample_idx '
                             f'{results.get("sample_idx")} decode to different numbers of '
                             f'channels: {[img.shape for img in imgs]}')
        largest = tuple(int(v) for v in np.max([img.shape[:2] for img in imgs], axis=0))
        return [mmcv.impad(img, shape=largest, pad_val=0) for img in imgs]
