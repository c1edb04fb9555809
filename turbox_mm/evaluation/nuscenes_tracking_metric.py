"""mmdet3d's nuScenes metric with nuScenes tracking (AMOTA, AMOTP, IDS, ...) beside detection."""
import os
import os.path as osp
import tempfile
from typing import Dict, List, Optional, Sequence, Union

from mmdet3d.evaluation.metrics import NuScenesMetric
from mmengine.fileio import dump, load
from mmengine.logging import MMLogger

from turbox_mm.registry import METRICS
from turbox_mm.utils.atomic_files import atomic_write_text
from .nuscenes_tracking import (TRACKING_METRICS, evaluate_tracking, format_tracking_summary,
                                require_motmetrics, submission_meta, tracking_config,
                                tracking_entries)

#: The metrics this class computes.
METRIC_NAMES = ('bbox', 'tracking')


@METRICS.register_module()
class NuScenesTrackingMetric(NuScenesMetric):
    """nuScenes detection and tracking, as Sparse4D v3 evaluates its test set.

    ``metric='bbox'`` is mmdet3d's ``NuScenesMetric`` unchanged (NDS, mAP, ...);
    ``'tracking'`` writes the predictions in nuScenes' tracking format and runs
    nuscenes-devkit's ``TrackingEval``: every box whose class score (``cls_scores``; else
    ``scores_3d``) reaches ``tracking_threshold`` and whose class is one nuScenes tracks
    (car, truck, bus, trailer, motorcycle, bicycle, pedestrian) becomes a tracking box with
    ``tracking_score = scores_3d`` and ``tracking_id`` = its instance id
    (:func:`~turbox_mm.evaluation.nuscenes_tracking.tracking_entries`). The predictions must
    carry ``instance_ids`` (Sparse4D's head gives them in test mode).

    The tracking json is checked against the split before the devkit reads it (unknown or
    missing sample tokens, boxes without ``tracking_id``: errors that name the file, the
    token and the key). It is ``<jsonfile_prefix>/pred_instances_3d_tracking/results_nusc.json``
    (the detection json stays in ``pred_instances_3d/``). Metrics are reported as
    ``pred_instances_3d_NuScenes/AMOTA`` etc. (upper case, the devkit's names), per class as
    ``pred_instances_3d_NuScenes/car_AMOTA`` and ``car_AMOTP``, and the devkit's tables are
    logged.

    The devkit's tracking code needs ``motmetrics``: ``pip install 'turbox_mm[tracking]'``;
    without it the metric refuses to be built (unless ``format_only``).

    Args:
        data_root (str): nuScenes root (with the ``<version>/`` tables).
        ann_file (str): The evaluated info file.
        metric (str | list[str]): ``'bbox'``, ``'tracking'`` or both. Defaults to both, what
            upstream's ``tracking=True`` evaluation runs.
        tracking_threshold (float): Class-score threshold of tracking boxes. Defaults to 0.2
            (upstream's ``tracking_threshold``).
        tracking_eval_version (str): The devkit's tracking config. Defaults to
            ``'tracking_nips_2019'``.
        modality (dict, optional): The submissions' ``meta`` (missing flags are False).
            Defaults to camera only (Sparse4D's input).
        **kwargs: The rest of ``NuScenesMetric``'s arguments (``prefix``, ``format_only``,
            ``jsonfile_prefix``, ``eval_version``, ``collect_device``, ``backend_args``).

    Examples:
        >>> val_evaluator = dict(
        ...     type='turbox_mm.OrderedEvaluator',
        ...     metrics=dict(type='turbox_mm.NuScenesTrackingMetric',
        ...                  data_root='data/nuscenes/',
        ...                  ann_file='data/nuscenes/nuscenes_infos_val.pkl'))
    """

    def __init__(self,
                 data_root: str,
                 ann_file: str,
                 metric: Union[str, List[str]] = ('bbox', 'tracking'),
                 tracking_threshold: float = 0.2,
                 tracking_eval_version: str = 'tracking_nips_2019',
                 modality: Optional[dict] = None,
                 **kwargs) -> None:
        metrics = [metric] if isinstance(metric, str) else list(metric)
        unknown = [m for m in metrics if m not in METRIC_NAMES]
        if unknown or not metrics:
            raise ValueError(f'NuScenesTrackingMetric: metric must be among {METRIC_NAMES}, '
                             f'got {metric!r}')
        if modality is None:
            modality = dict(use_camera=True, use_lidar=False)
        super().__init__(data_root=data_root, ann_file=ann_file, metric=metrics,
                         modality=modality, **kwargs)
        self.tracking_threshold = tracking_threshold
        self.tracking_eval_version = tracking_eval_version
        self.eval_tracking_configs = tracking_config(tracking_eval_version)
        if 'tracking' in self.metrics and not self.format_only:
            require_motmetrics()  # before a test run, not after it

    def compute_metrics(self, results: List[dict]) -> Dict[str, float]:
        """Detection and/or tracking metrics of the whole split.

        Args:
            results (list[dict]): Per sample ``pred_instances_3d`` and ``sample_idx`` (the
                info file's row), in the dataset's order.

        Returns:
            dict[str, float]: The metrics (nothing with ``format_only``).
        """
        logger = MMLogger.get_current_instance()
        classes = self.dataset_meta['classes']
        self.version = self.dataset_meta['version']
        self.data_infos = load(self.ann_file, backend_args=self.backend_args)['data_list']
        tmp_dir = None
        prefix = self.jsonfile_prefix
        if prefix is None:
            tmp_dir = tempfile.TemporaryDirectory()
            prefix = osp.join(tmp_dir.name, 'results')
        metrics = {}
        try:
            if 'bbox' in self.metrics:
                result_dict, _ = self.format_results(results, classes, prefix)
                if not self.format_only:
                    metrics.update(self.nus_evaluate(result_dict, classes=classes,
                                                     logger=logger))
            if 'tracking' in self.metrics:
                path = self.format_tracking_results(results, classes, prefix)
                if self.format_only:
                    logger.info(f'tracking results are saved in {path}')
                else:
                    metrics.update(self.tracking_evaluate(path, logger))
        finally:
            if tmp_dir is not None:
                tmp_dir.cleanup()
        return metrics

    def format_tracking_results(self, results: List[dict], classes: Sequence[str],
                                jsonfile_prefix: str) -> str:
        """Write the predictions as a nuScenes tracking submission; return its path.

        Every evaluated sample gets an entry (an empty list where no box passes), keyed by its
        sample token.

        Raises:
            KeyError: A sample's predictions have no ``instance_ids`` (names the sample).
        """
        names = self.eval_tracking_configs.tracking_names
        annos = {}
        for result in results:
            info = self.data_infos[result['sample_idx']]
            where = (f"{self.ann_file}: sample {info['token']!r} (row {result['sample_idx']})")
            annos[info['token']] = tracking_entries(
                result['pred_instances_3d'], info, classes, names, self.eval_detection_configs,
                threshold=self.tracking_threshold, where=where)
        folder = osp.join(jsonfile_prefix, 'pred_instances_3d_tracking')
        path = osp.join(folder, 'results_nusc.json')
        os.makedirs(folder, exist_ok=True)
        # whole or absent: the devkit may read it again later
        atomic_write_text(path, dump(dict(meta=submission_meta(self.modality), results=annos),
                                     file_format='json'))
        return path

    def tracking_evaluate(self, result_path: str,
                          logger: Optional[MMLogger] = None) -> Dict[str, float]:
        """The devkit's tracking metrics of a submission, as ``pred_instances_3d_NuScenes/...``
        entries; the devkit's tables go to the log."""
        summary = evaluate_tracking(result_path, self.data_root, self.version,
                                    config_version=self.tracking_eval_version)
        if logger is not None:
            logger.info('nuScenes tracking (%s):\n%s', self.tracking_eval_version,
                        format_tracking_summary(summary))
        prefix = 'pred_instances_3d_NuScenes'
        detail = {f'{prefix}/{k.upper()}': float(summary[k]) for k in TRACKING_METRICS
                  if k in summary}
        for key in ('amota', 'amotp'):
            for name, value in summary['label_metrics'].get(key, {}).items():
                detail[f'{prefix}/{name}_{key.upper()}'] = float(value)
        return detail
