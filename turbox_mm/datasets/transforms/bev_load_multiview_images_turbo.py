"""``BEVLoadMultiViewImagesTurbo``: the turbox twin of BEVFusion's camera loader."""
from typing import Dict, Optional

import numpy as np

from turbox_mm.registry import TRANSFORMS
from .bev_load_multiview_images import camera_matrices
from .load_multiview_images import LoadMultiViewImagesTurbo


@TRANSFORMS.register_module()
class BEVLoadMultiViewImagesTurbo(LoadMultiViewImagesTurbo):
    """:class:`LoadMultiViewImagesTurbo`'s decoding (libjpeg-turbo, uint8, optionally DCT-scaled
    or deferred to the GPU) with the keys and values of
    :class:`~turbox_mm.datasets.transforms.BEVLoadMultiViewImageFromFiles`.

    The camera matrices are that loader's, from the same function
    (:func:`~turbox_mm.datasets.transforms.bev_load_multiview_images.camera_matrices`): the
    stacked ``cam2img`` (float32), ``ori_cam2img``, ``lidar2cam``, ``cam2lidar`` (float64) and
    ``lidar2img`` (float32), ``[N, 4, 4]`` each; so are ``img_path``, ``filename``,
    ``img_shape``, ``ori_shape`` and ``pad_shape`` (the full-resolution size of the largest
    image, whatever the decode scale), ``scale_factor``, ``img_norm_cfg``, ``num_views`` and
    ``num_ref_frames``. The differences:

    - ``img`` holds uint8 images (``to_float32`` as stock converts them), in RGB order
      (``channel_order='rgb'``, pillow's). libjpeg-turbo through simplejpeg decodes the same
      pixels as pillow (both the accurate integer DCT and fancy upsampling; checked equal on
      4:1:1, 4:2:0, 4:2:2, 4:4:0 and 4:4:4 JPEGs). Non-JPEG files and ``grayscale`` colour
      types go through OpenCV (``mmcv.imfrombytes``): PNGs give the same pixels; a colour
      JPEG under ``grayscale`` does not (OpenCV keeps the JPEG's luma, pillow converts its RGB:
      1% of the pixels differ, by up to 18 levels, on a camera-like image; ``ImageAug3D``
      takes RGB images only).
    - With ``scaled_decode`` the images are decoded at ``1 / d`` of their size
      (``results['img_decode_scale'] = d``, the shapes above stay full-resolution ones), for
      :class:`~turbox_mm.datasets.transforms.ImageAug3DTurbo` to warp from. ``d`` is chosen
      from ``max_resize`` only (the largest resize the pipeline's ``ImageAug3D`` can draw):
      BEVFusion draws its resize after loading, so a sample's ``aug_config`` is not read.
    - With ``decode_on='gpu'`` only the bytes are read (``img_bytes``, ``img=None``); see
      :class:`LoadMultiViewImagesTurbo`.
    - ``img_decode_scale`` and ``img_src_shapes`` are added.

    Errors name the file, the camera, the sample index and, where the info has it, the token.

    Args:
        channel_order (str): ``'rgb'`` (pillow's, as the stock loader) or ``'bgr'``.
            Defaults to ``'rgb'``.
        num_views (int): Recorded in ``results['num_views']`` (upstream's default, 5, with six
            cameras: every camera of the sample is loaded). Defaults to 5.
        **kwargs: :class:`LoadMultiViewImagesTurbo`'s other arguments (``to_float32``,
            ``color_type``, ``backend_args``, ``num_ref_frames``, ``test_mode``,
            ``set_default_scale``, ``decoder``, ``scaled_decode``, ``max_resize``,
            ``max_decode_factor``, ``decode_on``, ``strict``).

    Examples:
        >>> import os, tempfile
        >>> from PIL import Image
        >>> path = os.path.join(tempfile.mkdtemp(), 'front.jpg')
        >>> Image.new('RGB', (32, 24), (255, 0, 0)).save(path, quality=100)
        >>> cam = dict(img_path=path, cam2img=np.eye(3), lidar2cam=np.eye(4))
        >>> loader = BEVLoadMultiViewImagesTurbo(color_type='color')
        >>> out = loader(dict(images=dict(CAM_FRONT=cam), sample_idx=0))
        >>> out['img'][0].shape, out['img'][0].dtype, out['img'][0][0, 0].tolist()
        ((24, 32, 3), dtype('uint8'), [254, 0, 0])
        >>> out['lidar2img'].shape, out['lidar2img'].dtype, out['ori_shape']
        ((1, 4, 4), dtype('float32'), (24, 32))
    """

    def __init__(self, *args, channel_order: str = 'rgb', num_views: int = 5,
                 **kwargs) -> None:
        super().__init__(*args, channel_order=channel_order, num_views=num_views, **kwargs)

    def decode_factor(self, results: Dict) -> int:
        """``d`` from ``max_resize`` alone (see the class docstring); 1 without it."""
        if not self.scaled_decode or self.max_resize is None or not self.max_resize > 0:
            return 1
        for d in (8, 4, 2):
            if d <= self.max_decode_factor and self.max_resize * d <= 1.0:
                return d
        return 1

    def transform(self, results: Dict) -> Dict:
        """Read (and decode) every camera's image and write BEVFusion's camera matrices.

        Args:
            results (dict): The sample; ``images`` maps each camera to a dict with
                ``img_path``, ``cam2img`` and ``lidar2cam``.

        Returns:
            dict: ``results`` with the keys described in the class docstring.
        """
        items = list(results['images'].values())
        matrices = [camera_matrices(item) for item in items]  # before any pixel is read
        results = super().transform(results)
        cam2img, lidar2cam, cam2lidar, lidar2img = (np.stack(m) for m in zip(*matrices))
        results['img_path'] = [item['img_path'] for item in items]
        results['cam2img'] = cam2img
        results['lidar2cam'] = lidar2cam
        results['cam2lidar'] = cam2lidar
        results['lidar2img'] = lidar2img
        results['ori_cam2img'] = cam2img.copy()
        # The stock shapes: every one is the (padded) full-resolution size.
        results['img_shape'] = results['pad_shape'] = results['ori_shape']
        return results

    def _where(self, what: str, path: str, cam: str, results: Dict) -> str:
        token: Optional[str] = results.get('token')
        return (f'{type(self).__name__}: {what}: {path} (camera {cam}, sample_idx '
                f'{results.get("sample_idx")}' + (f', token {token})' if token else ')'))
