"""nuScenes tracking results: the submission format, its checks, and the devkit's evaluation.

The pieces :class:`~turbox_mm.evaluation.NuScenesTrackingMetric` is made of, usable on their
own (e.g. to check or evaluate a tracking json written elsewhere):

- :func:`tracking_entries`: one sample's predictions as nuScenes tracking boxes
  (``tracking_name``, ``tracking_score``, ``tracking_id``), the way Sparse4D v3 writes them;
- :func:`split_sample_tokens`: the sample tokens of a split, read from the nuScenes tables;
- :func:`check_tracking_submission`: a result file against a split, with errors that name the
  file, the sample token and the key;
- :func:`evaluate_tracking`: nuscenes-devkit's ``TrackingEval`` (AMOTA, AMOTP, IDS, ...).

The devkit's tracking code needs ``motmetrics`` (1.4.0, what nuscenes-devkit 1.2.0 is written
against; checked with pandas 3 as well): ``pip install 'turbox_mm[tracking]'``.
"""
import importlib.util
import json
import logging
import os.path as osp
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
from mmengine.logging import print_log

#: How to install what the tracking evaluation needs.
TRACKING_EXTRA = "pip install 'turbox_mm[tracking]'  (motmetrics==1.4.0)"

#: The evaluation split of each nuScenes version with annotations (mmdet3d's choice too).
EVAL_SETS = {'v1.0-trainval': 'val', 'v1.0-mini': 'mini_val'}

#: The keys of a tracking box in a nuScenes submission.
TRACKING_BOX_KEYS = ('sample_token', 'translation', 'size', 'rotation', 'velocity',
                     'tracking_name', 'tracking_score', 'tracking_id')

#: The keys of a submission's ``meta``.
META_KEYS = ('use_camera', 'use_lidar', 'use_radar', 'use_map', 'use_external')

#: The devkit's aggregated tracking metrics, in its order (the keys of metrics_summary.json).
TRACKING_METRICS = ('amota', 'amotp', 'recall', 'motar', 'gt', 'mota', 'motp', 'mt', 'ml',
                    'faf', 'tp', 'fp', 'fn', 'ids', 'frag', 'tid', 'lgd')


def require_motmetrics() -> None:
    """Raise a clear ``ImportError`` where ``motmetrics`` is missing.

    nuscenes-devkit's tracking code imports it at import time and, without it, raises
    ``unittest.SkipTest`` (which test runners take for a skip): check before importing it.
    """
    if importlib.util.find_spec('motmetrics') is None:
        raise ImportError('nuScenes tracking evaluation needs the motmetrics package, which '
                          f'nuscenes-devkit imports for it; install it with: {TRACKING_EXTRA}')


def tracking_config(version: str = 'tracking_nips_2019'):
    """The devkit's tracking config (``TrackingConfig``) of that name."""
    from nuscenes.eval.common.config import config_factory
    return config_factory(version)


def submission_meta(modality: Optional[dict]) -> Dict[str, bool]:
    """The ``meta`` of a submission: all five flags nuScenes asks for, False unless given."""
    meta = {key: False for key in META_KEYS}
    meta.update({k: bool(v) for k, v in (modality or {}).items() if k in META_KEYS})
    return meta


def tracking_entries(pred, info: dict, classes: Sequence[str], tracking_names: Iterable[str],
                     detection_config, threshold: Optional[float] = 0.2,
                     where: str = 'sample') -> List[dict]:
    """One sample's predictions as nuScenes tracking boxes, as Sparse4D v3 writes them.

    Boxes whose class score (``cls_scores``, the score before the centerness product; else
    ``scores_3d``) is below ``threshold`` are dropped; the rest go from the lidar frame to the
    ego frame, leave where they are beyond the detection config's class range, go to the global
    frame, and stay only for the tracking classes. ``tracking_score`` is ``scores_3d``,
    ``tracking_id`` the instance id as a string. Boxes without an id (-1) belong to no track
    and are left out.

    Args:
        pred (InstanceData | dict): ``bboxes_3d`` (LiDAR boxes), ``scores_3d``, ``labels_3d``,
            ``instance_ids`` and optionally ``cls_scores``.
        info (dict): The sample's info (mmdet3d v2: ``token``, ``lidar_points.lidar2ego``,
            ``ego2global``).
        classes (Sequence[str]): The label names.
        tracking_names (Iterable[str]): The classes nuScenes tracks.
        detection_config: The devkit's ``DetectionConfig`` (its ``class_range``).
        threshold (float, optional): See above. Defaults to 0.2 (upstream's
            ``tracking_threshold``); None keeps every box.
        where (str): How errors name the sample. Defaults to ``'sample'``.

    Returns:
        list[dict]: The sample's tracking boxes.

    Raises:
        KeyError: ``pred`` has no ``instance_ids`` (a model that does not track).
    """
    from mmdet3d.evaluation.metrics.nuscenes_metric import (lidar_nusc_box_to_global,
                                                            output_to_nusc_box)
    if 'instance_ids' not in pred:
        raise KeyError(f"{where}: the predictions have no 'instance_ids'; tracking needs a "
                       'model that gives its boxes instance ids (Sparse4D does in test mode)')
    ids = pred['instance_ids']
    if len(ids) != len(pred['scores_3d']):
        raise ValueError(f"{where}: {len(ids)} 'instance_ids' for {len(pred['scores_3d'])} "
                         'boxes')
    gate = pred['cls_scores'] if 'cls_scores' in pred else pred['scores_3d']
    keep = ids >= 0
    if threshold is not None:
        keep = keep & (gate >= threshold)
    boxes, _ = output_to_nusc_box(dict(bboxes_3d=pred['bboxes_3d'][keep],
                                       scores_3d=pred['scores_3d'][keep],
                                       labels_3d=pred['labels_3d'][keep]))
    for box, instance_id in zip(boxes, ids[keep].tolist()):
        box.token = str(int(instance_id))
    boxes = lidar_nusc_box_to_global(info, boxes, list(classes), detection_config)
    names = set(tracking_names)
    entries = []
    for box in boxes:
        name = classes[box.label]
        if name not in names:
            continue
        entries.append(dict(
            sample_token=info['token'],
            translation=[float(x) for x in box.center],
            size=[float(x) for x in box.wlh],
            rotation=[float(x) for x in box.orientation.elements],
            velocity=[float(x) for x in np.asarray(box.velocity, dtype=np.float64)[:2]],
            tracking_name=name,
            tracking_score=float(box.score),
            tracking_id=box.token))
    return entries


#: The tables the split lookup reads, and the keys read from their rows.
_TABLES = {'scene': ('token', 'name'), 'sample': ('token', 'scene_token')}


def _read_table(data_root: str, version: str, table: str) -> list:
    from turbox_mm.datasets.nuscenes_tables import MissingTableError, read_table
    return read_table(data_root, version, table, _TABLES[table], needed=tuple(_TABLES),
                      purpose='the tracking evaluation', missing=MissingTableError)


def split_sample_tokens(data_root: str, version: str, eval_set: str) -> set:
    """The tokens of the samples in the scenes of split ``eval_set`` (the devkit's split
    lists), from ``<data_root>/<version>/{scene,sample}.json``.

    Raises:
        FileNotFoundError: A table is missing (names it).
        ValueError: ``eval_set`` is not one of the devkit's splits; a table that is not
            JSON or a row without a key read (the file, row and key named).
    """
    from nuscenes.utils.splits import create_splits_scenes
    splits = create_splits_scenes()
    if eval_set not in splits:
        raise ValueError(f'unknown nuScenes split {eval_set!r}; one of {sorted(splits)}')
    names = set(splits[eval_set])
    scenes = {s['token'] for s in _read_table(data_root, version, 'scene') if s['name'] in names}
    return {s['token'] for s in _read_table(data_root, version, 'sample')
            if s['scene_token'] in scenes}


def check_tracking_submission(path: str, sample_tokens: Iterable[str],
                              tracking_names: Iterable[str],
                              split: str = 'the evaluation split') -> dict:
    """Check a nuScenes tracking result file before the devkit reads it.

    The devkit needs every sample of the split and nothing else, and each box with the
    tracking keys; its own checks are bare assertions. Here each problem names the file, and
    where it applies the sample token and the key.

    Args:
        path (str): The result json.
        sample_tokens (Iterable[str]): The split's sample tokens
            (:func:`split_sample_tokens`).
        tracking_names (Iterable[str]): Allowed ``tracking_name`` values.
        split (str): How messages name the split. Defaults to ``'the evaluation split'``.

    Returns:
        dict: The loaded submission.

    Raises:
        KeyError: ``meta``, ``results``, a meta flag or a box key is missing (a box without
            ``tracking_id``: results without instance ids).
        ValueError: Unknown or missing sample tokens, a box filed under another sample, an
            unknown ``tracking_name``.
    """
    with open(path) as f:
        submission = json.load(f)
    for key in ('meta', 'results'):
        if key not in submission:
            raise KeyError(f"{path}: no {key!r} in the tracking results")
    missing_meta = [k for k in META_KEYS if k not in submission['meta']]
    if missing_meta:
        raise KeyError(f"{path}: 'meta' lacks {missing_meta}")
    results = submission['results']
    expected = set(sample_tokens)
    unknown = sorted(set(results) - expected)
    if unknown:
        raise ValueError(f'{path}: {len(unknown)} sample token(s) not in {split}, e.g. '
                         f'{unknown[0]!r}; the results must come from the samples of that split')
    absent = sorted(expected - set(results))
    if absent:
        raise ValueError(f'{path}: {len(absent)} sample(s) of {split} have no entry, e.g. '
                         f'{absent[0]!r}; the devkit needs every sample (an empty list for '
                         'a sample without boxes)')
    names = set(tracking_names)
    for token, boxes in results.items():
        for box in boxes:
            missing = [k for k in TRACKING_BOX_KEYS if k not in box]
            if missing:
                hint = (' (results without instance ids cannot be tracked)'
                        if 'tracking_id' in missing else '')
                raise KeyError(f'{path}: a box of sample {token!r} lacks {missing}{hint}')
            if box['sample_token'] != token:
                raise ValueError(f"{path}: a box filed under sample {token!r} names sample_token "
                                 f"{box['sample_token']!r}")
            if box['tracking_name'] not in names:
                raise ValueError(f"{path}: sample {token!r}: tracking_name "
                                 f"{box['tracking_name']!r} is not one of {sorted(names)}")
    return submission


def evaluate_tracking(result_path: str, data_root: str, version: str,
                      output_dir: Optional[str] = None,
                      config_version: str = 'tracking_nips_2019',
                      verbose: bool = False) -> dict:
    """Check a tracking result file and run nuscenes-devkit's ``TrackingEval`` on it.

    Args:
        result_path (str): The result json.
        data_root (str): nuScenes root (the tables under ``<data_root>/<version>/``).
        version (str): ``'v1.0-trainval'`` (split ``val``) or ``'v1.0-mini'`` (``mini_val``).
        output_dir (str, optional): Where the devkit writes metrics_summary.json. Defaults to
            the result file's folder.
        config_version (str): The devkit's tracking config. Defaults to
            ``'tracking_nips_2019'``.
        verbose (bool): The devkit's own printing. Defaults to False.

    Returns:
        dict: The devkit's metrics summary (``amota``, ``amotp``, ``ids``, ...,
        ``label_metrics``). A submission without any box (e.g. a barely trained model whose
        class scores all stay below the tracking threshold) is one the devkit cannot read
        (it fails on finding no box type); its summary is then what the devkit defines for no
        tracks, with a warning: AMOTA 0 and AMOTP 2 (its worst values), recall 0, no TP, FP or
        IDS.

    Raises:
        ImportError: motmetrics is missing (names the extra to install).
        ValueError: A version without a split to evaluate.
    """
    require_motmetrics()
    if version not in EVAL_SETS:
        raise ValueError(f'nuScenes tracking evaluation: version {version!r} has no annotated '
                         f'split to evaluate; one of {sorted(EVAL_SETS)}')
    eval_set = EVAL_SETS[version]
    cfg = tracking_config(config_version)
    tokens = split_sample_tokens(data_root, version, eval_set)
    submission = check_tracking_submission(
        result_path, tokens, cfg.tracking_names,
        split=f'the {eval_set} split of {version} at {data_root}')
    if not any(submission['results'].values()):
        print_log(f'nuScenes tracking: {result_path} holds no box; reporting the devkit\'s '
                  'values for no tracks (AMOTA 0, AMOTP 2)', logger='current',
                  level=logging.WARNING)
        return dict(amota=cfg.metric_worst['amota'], amotp=cfg.metric_worst['amotp'],
                    recall=0.0, tp=0.0, fp=0.0, ids=0.0, label_metrics={})
    from nuscenes.eval.tracking.evaluate import TrackingEval
    output_dir = output_dir or osp.dirname(osp.abspath(result_path))
    evaluator = TrackingEval(config=cfg, result_path=result_path, eval_set=eval_set,
                             output_dir=output_dir, nusc_version=version,
                             nusc_dataroot=data_root, verbose=verbose)
    return evaluator.main(render_curves=False)


def format_tracking_summary(summary: dict) -> str:
    """The devkit's final tables (per class, then aggregated) as text, from its summary."""
    label = summary['label_metrics']
    keys = [k for k in TRACKING_METRICS if k in label]
    classes = sorted(next(iter(label.values())).keys()) if label else []
    lines = ['Per-class results:', 'class'.ljust(11) + '\t'.join(k.upper() for k in keys)]
    for name in classes:
        lines.append(name[:10].ljust(11) + '\t'.join(f'{label[k][name]:.3f}' for k in keys))
    lines.append('Aggregated results:')
    lines.extend(f'{k.upper()}\t{summary[k]:.3f}' for k in TRACKING_METRICS if k in summary)
    return '\n'.join(lines)
