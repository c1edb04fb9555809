"""``RasterizeMapGT``: MapTR v2's auxiliary segmentation targets, the map ground truth drawn
in the BEV grid and in each camera's feature map."""
from typing import Dict, Tuple

import numpy as np
from mmcv.transforms import BaseTransform

from turbox_mm.datasets.map_gt.seg_masks import PV_NUM_POINTS, PV_Z, bev_seg_mask, pv_seg_mask
from turbox_mm.registry import TRANSFORMS


@TRANSFORMS.register_module()
class RasterizeMapGT(BaseTransform):
    """Draw the sample's map instances as masks, as upstream's ``vectormap_pipeline`` with
    ``aux_seg`` (hustvl/MapTR ``nuscenes_offlinemap_dataset.py`` @ 69ab751; the drawing is
    :mod:`turbox_mm.datasets.map_gt.seg_masks`).

    Upstream draws after its whole pipeline; here the transform goes after
    :class:`LoadMapGT` (the instances' own vertices ``gt_map_polylines`` and their
    ``gt_map_labels``) and, for the PV mask, after :class:`RandomScaleImageMultiViewImage`
    and :class:`PadMultiViewImage` / :class:`PadMultiViewImageDepth` (the final ``lidar2img``
    and ``pad_shape``).

    The arguments after ``patch_size`` are upstream's ``aux_seg`` dict, so a config can pass
    ``**aux_seg_cfg``; ``bev_size`` is upstream's dataset ``bev_size``, ``patch_size`` comes
    from its ``pc_range`` as ``(y extent, x extent)``.

    Adds:

    - ``gt_map_bev_seg`` (np.ndarray): ``[seg_classes, bev_h, bev_w]`` uint8, if ``bev_seg``;
      row = y cell (row 0 at ``y = -patch_h / 2``), column = x cell;
    - ``gt_map_pv_seg`` (np.ndarray): ``[N, seg_classes, fH, fW]`` uint8, if ``pv_seg``;
      ``(fH, fW)`` = the first camera's padded ``(h, w) // feat_down_sample`` (upstream).

    Args:
        bev_size (tuple[int, int]): ``(bev_h, bev_w)`` of the BEV mask. Defaults to (200, 100).
        patch_size (tuple[float, float]): ``(patch_h, patch_w)`` in metres, as
            :class:`LoadMapGT`'s. Defaults to (60, 30).
        use_aux_seg (bool): Draw anything at all. Defaults to True.
        bev_seg (bool): Draw ``gt_map_bev_seg``. Defaults to True.
        pv_seg (bool): Draw ``gt_map_pv_seg``. Defaults to True.
        seg_classes (int): 1: every class in one channel (upstream's configs); otherwise one
            channel per label (upstream makes it ``len(map_classes)``; pass that number).
            Defaults to 1.
        feat_down_sample (int): Stride of the camera features the PV mask matches.
            Defaults to 32.
        pv_thickness (int): PV line thickness in feature cells. Defaults to 1.
        bev_thickness (int): BEV line thickness in cells (upstream's ``VectorizedLocalMap``
            default). Defaults to 3.
        pv_z (float): Height of the lines in the lidar frame for the PV mask (m).
            Defaults to -1.6.
        pv_num_points (int): Points sampled along each line for the PV mask. Defaults to 200.

    Examples:
        >>> t = RasterizeMapGT(bev_size=(20, 10), pv_seg=False)
        >>> line = np.array([[0.0, -30.0], [0.0, 30.0]])  # along y at x = 0
        >>> out = t(dict(gt_map_polylines=[line], gt_map_labels=np.array([0])))
        >>> mask = out['gt_map_bev_seg']
        >>> mask.shape, mask.dtype.name, mask[0, :, 5].all()
        ((1, 20, 10), 'uint8', True)
        >>> mask[0, 0].tolist()  # cv2's thickness 3: 5 cells across
        [0, 0, 0, 1, 1, 1, 1, 1, 0, 0]
    """

    def __init__(self, bev_size: Tuple[int, int] = (200, 100),
                 patch_size: Tuple[float, float] = (60.0, 30.0), use_aux_seg: bool = True,
                 bev_seg: bool = True, pv_seg: bool = True, seg_classes: int = 1,
                 feat_down_sample: int = 32, pv_thickness: int = 1, bev_thickness: int = 3,
                 pv_z: float = PV_Z, pv_num_points: int = PV_NUM_POINTS) -> None:
        if int(seg_classes) < 1:
            raise ValueError(f'RasterizeMapGT: seg_classes must be >= 1, got {seg_classes}')
        if int(feat_down_sample) < 1:
            raise ValueError('RasterizeMapGT: feat_down_sample must be >= 1, got '
                             f'{feat_down_sample}')
        self.bev_size = (int(bev_size[0]), int(bev_size[1]))
        self.patch_size = (float(patch_size[0]), float(patch_size[1]))
        self.use_aux_seg = bool(use_aux_seg)
        self.bev_seg = bool(bev_seg)
        self.pv_seg = bool(pv_seg)
        self.seg_classes = int(seg_classes)
        self.feat_down_sample = int(feat_down_sample)
        self.pv_thickness = int(pv_thickness)
        self.bev_thickness = int(bev_thickness)
        self.pv_z = float(pv_z)
        self.pv_num_points = int(pv_num_points)

    def transform(self, results: Dict) -> Dict:
        """Add the masks.

        Args:
            results (dict): The sample.

        Returns:
            dict: ``results`` with ``gt_map_bev_seg`` and / or ``gt_map_pv_seg``.
        """
        if not self.use_aux_seg or not (self.bev_seg or self.pv_seg):
            return results
        name = type(self).__name__
        token = results.get('token', results.get('sample_idx'))
        missing = [k for k in ('gt_map_polylines', 'gt_map_labels') if k not in results]
        if missing:
            raise KeyError(f'{name}: sample {token} has no {missing} (LoadMapGT must come '
                           'first)')
        polylines, labels = results['gt_map_polylines'], results['gt_map_labels']
        if self.bev_seg:
            results['gt_map_bev_seg'] = bev_seg_mask(
                polylines, labels, self.bev_size, self.patch_size, self.seg_classes,
                self.bev_thickness)
        if self.pv_seg:
            lidar2img, feat_shape = self._cameras(results, name, token)
            results['gt_map_pv_seg'] = pv_seg_mask(
                polylines, labels, lidar2img, feat_shape, self.feat_down_sample,
                self.seg_classes, self.pv_thickness, self.pv_z, self.pv_num_points)
        return results

    def _cameras(self, results: Dict, name: str, token) -> tuple:
        """``lidar2img`` ``[N, 4, 4]`` and the feature size, checked against the pipeline."""
        if 'lidar2img' not in results:
            raise KeyError(f'{name}: sample {token} has no "lidar2img" (NuScenesMapTRAdaptor '
                           'and RandomScaleImageMultiViewImage must come first)')
        padded = 'pad_size_divisor' in results
        if not padded or not isinstance(results.get('pad_shape'), (list, tuple)):
            raise KeyError(f'{name}: sample {token} has no per-camera "pad_shape" '
                           '(PadMultiViewImage or PadMultiViewImageDepth must come first)')
        pad_shapes = list(results['pad_shape'])
        lidar2img = np.asarray(results['lidar2img'], np.float64)
        if len(lidar2img) != len(pad_shapes):
            raise ValueError(f'{name}: sample {token}: {len(lidar2img)} lidar2img for '
                             f'{len(pad_shapes)} cameras in pad_shape')
        imgs = results.get('img')
        if isinstance(imgs, (list, tuple)) and [tuple(i.shape[:2]) for i in imgs] != [
                tuple(s[:2]) for s in pad_shapes]:
            raise ValueError(f'{name}: sample {token}: the images are not of their pad_shape '
                             '(the padding must come after RandomScaleImageMultiViewImage)')
        height, width = pad_shapes[0][:2]
        return lidar2img, (height // self.feat_down_sample, width // self.feat_down_sample)

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(bev_size={self.bev_size}, '
                f'patch_size={self.patch_size}, use_aux_seg={self.use_aux_seg}, '
                f'bev_seg={self.bev_seg}, pv_seg={self.pv_seg}, '
                f'seg_classes={self.seg_classes}, feat_down_sample={self.feat_down_sample}, '
                f'pv_thickness={self.pv_thickness}, bev_thickness={self.bev_thickness}, '
                f'pv_z={self.pv_z}, pv_num_points={self.pv_num_points})')
