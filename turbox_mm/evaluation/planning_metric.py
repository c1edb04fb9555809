"""``SparseDrivePlanningMetric``: SparseDrive's open-loop planning metrics (L2 and collision
rates, ST-P3 / VAD averaging), as an mmengine metric."""
from typing import Dict, Optional, Sequence

import numpy as np
from mmengine.evaluator import BaseMetric
from mmengine.logging import MMLogger

from turbox_mm.registry import METRICS
from .planning_eval import (EGO_FORWARD_OFFSET, EGO_LENGTH, EGO_WIDTH, HORIZONS, NUM_STEPS,
                            ego_collisions, horizon_means)

#: Reported quantities, upstream's names.
PLANNING_METRICS = ('L2', 'obj_col', 'obj_box_col')


def _array(value) -> np.ndarray:
    if hasattr(value, 'detach'):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _name(sample: dict, index: int) -> str:
    ids = [f'{key}={sample[key]}' for key in ('sample_idx', 'token') if key in sample]
    return f'data sample {index} of the batch' + (f' ({", ".join(ids)})' if ids else '')


@METRICS.register_module()
class SparseDrivePlanningMetric(BaseMetric):
    """SparseDrive's planning evaluation (upstream's ``planning_eval`` / ``PlanningMetric``).

    Samples whose ego future is not complete (any of the 6 ``gt_ego_fut_masks`` is 0) are
    skipped. For the others, at each step t = 0.5 s ... 3 s:

    - ``L2``: distance between ``final_planning[t]`` and the cumulative sum of
      ``gt_ego_fut_trajs`` at t;
    - ``obj_col``: whether the ego box on the **true** trajectory collides with a box of
      ``fut_boxes[t]`` (:func:`~turbox_mm.evaluation.planning_eval.ego_collisions`: 4.084 x
      1.85 m, heading from central differences, all pi / 2 when the first and last points
      are within 0.5 m, centre 0.5 m ahead along the heading; every annotated class);
    - ``obj_box_col``: whether the ego box on the **planned** trajectory collides at t while
      the true one does not.

    Per-step values are averaged over the kept samples; the value at horizon t is the mean of
    the per-step values from 0.5 s to t. Reported under ``prefix`` (``SparseDrivePlanning/``
    by default): ``L2``, ``obj_col`` and ``obj_box_col`` (upstream's keys: the mean of the
    1 s, 2 s and 3 s values), and ``{name}_1s``, ``{name}_2s``, ``{name}_3s`` (upstream's
    table columns; collisions as fractions, the table prints them in %). Without a single
    kept sample every value is NaN (upstream divides by zero) and a warning is logged.

    Upstream's ``PlanningMetric.update`` negates x in place on a view of the stored results
    before computing L2 (sign-invariant) and ``evaluate_coll`` negates it back, so the
    collision test runs in the lidar frame, with the 0.5 m shift along the lidar-frame
    heading. This metric computes that result directly; it does not reproduce the side effect
    (a second evaluation of the same results upstream would see x flipped). Upstream computes
    in float32 torch, this metric in float64.

    Each data sample carries:

    - ``pred_planning`` (dict) with ``final_planning`` ``[>= 6, >= 2]`` (cumulative xy,
      lidar frame; the first 6 steps and 2 coordinates are used);
    - ``eval_ann_info`` with ``gt_ego_fut_trajs`` ``[6, 2]`` (per-step offsets),
      ``gt_ego_fut_masks`` ``[6]`` and ``fut_boxes`` (list over future steps of ``[m, 7]``
      ``(x, y, z, l, w, h, yaw)`` in the current lidar frame; the dataset's
      ``with_fut_boxes=True``).

    Args:
        ego_length (float): Defaults to 4.084.
        ego_width (float): Defaults to 1.85.
        forward_offset (float): Defaults to 0.5.
        collect_device (str): ``'cpu'`` or ``'gpu'``. Defaults to 'cpu'.
        prefix (str, optional): Key prefix. Defaults to ``'SparseDrivePlanning'``.

    Examples:
        >>> val_evaluator = dict(type='turbox_mm.SparseDrivePlanningMetric')
    """
    default_prefix = 'SparseDrivePlanning'

    def __init__(self, ego_length: float = EGO_LENGTH, ego_width: float = EGO_WIDTH,
                 forward_offset: float = EGO_FORWARD_OFFSET, collect_device: str = 'cpu',
                 prefix: Optional[str] = None) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.ego_length = float(ego_length)
        self.ego_width = float(ego_width)
        self.forward_offset = float(forward_offset)

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        """Per-step L2 and collisions of each sample with a complete ego future.

        Appends per sample ``None`` (skipped) or ``dict(L2 [6], obj_col [6] bool,
        obj_box_col [6] bool)``.

        Raises:
            KeyError: If a data sample lacks ``pred_planning`` (or its ``final_planning``) or
                ``eval_ann_info`` (or ``gt_ego_fut_trajs``, ``gt_ego_fut_masks``,
                ``fut_boxes``); the message names the key and the sample.
            ValueError: If shapes are wrong or a kept sample has fewer than 6 ``fut_boxes``.
        """
        unpacked = [self._unpack(sample, index) for index, sample in enumerate(data_samples)]
        for item in unpacked:  # all checked first: a bad batch adds nothing
            if item is None:
                self.results.append(None)
                continue
            plan, truth, fut_boxes = item
            truth_col = ego_collisions(truth, fut_boxes, self.ego_length, self.ego_width,
                                       self.forward_offset)
            plan_col = ego_collisions(plan, fut_boxes, self.ego_length, self.ego_width,
                                      self.forward_offset)
            self.results.append(dict(L2=np.linalg.norm(plan - truth, axis=-1),
                                     obj_col=truth_col, obj_box_col=plan_col & ~truth_col))

    def _unpack(self, sample: dict, index: int) -> Optional[tuple]:
        where = _name(sample, index)
        pred = sample.get('pred_planning')
        if hasattr(pred, 'to_dict'):
            pred = pred.to_dict()
        if not isinstance(pred, dict):
            raise KeyError(f'SparseDrivePlanningMetric: {where} has no pred_planning (the '
                           f'planning decoder\'s dict); found keys {sorted(sample)}')
        if 'final_planning' not in pred:
            raise KeyError(f'SparseDrivePlanningMetric: {where}: pred_planning has no '
                           f'\'final_planning\'; found {sorted(pred)}')
        gt = sample.get('eval_ann_info')
        if not isinstance(gt, dict):
            raise KeyError(f'SparseDrivePlanningMetric: {where} has no eval_ann_info (the '
                           'dataset fills it in test mode with load_eval_anns=True); found '
                           f'keys {sorted(sample)}')
        for key in ('gt_ego_fut_trajs', 'gt_ego_fut_masks', 'fut_boxes'):
            if key not in gt:
                hint = ' (the dataset\'s with_fut_boxes=True)' if key == 'fut_boxes' else ''
                raise KeyError(f'SparseDrivePlanningMetric: {where}: eval_ann_info has no '
                               f'{key!r}{hint}; found {sorted(gt)}')
        plan = _array(pred['final_planning']).astype(np.float64)
        offsets = _array(gt['gt_ego_fut_trajs']).astype(np.float64)
        masks = _array(gt['gt_ego_fut_masks']).reshape(-1)
        if plan.ndim != 2 or plan.shape[0] < NUM_STEPS or plan.shape[1] < 2:
            raise ValueError(f'SparseDrivePlanningMetric: {where}: '
                             f'pred_planning.final_planning must be [>= {NUM_STEPS}, >= 2]; '
                             f'got {plan.shape}')
        if offsets.ndim != 2 or offsets.shape[0] < NUM_STEPS or offsets.shape[1] < 2 \
                or masks.shape[0] < NUM_STEPS:
            raise ValueError(f'SparseDrivePlanningMetric: {where}: eval_ann_info needs '
                             f'gt_ego_fut_trajs [{NUM_STEPS}, 2] and gt_ego_fut_masks '
                             f'[{NUM_STEPS}]; got {offsets.shape} and {masks.shape}')
        if not np.all(masks[:NUM_STEPS] != 0):
            return None  # incomplete ground truth: not counted (upstream)
        fut_boxes = list(gt['fut_boxes'])
        if len(fut_boxes) < NUM_STEPS:
            raise ValueError(f'SparseDrivePlanningMetric: {where}: a complete ego future '
                             f'needs {NUM_STEPS} fut_boxes entries; got {len(fut_boxes)}')
        boxes = []
        for step, value in enumerate(fut_boxes[:NUM_STEPS]):
            value = _array(value).astype(np.float64)
            if value.size == 0:
                value = value.reshape(0, 7)
            if value.ndim != 2 or value.shape[1] < 7:
                raise ValueError(f'SparseDrivePlanningMetric: {where}: fut_boxes[{step}] '
                                 f'must be [m, >= 7]; got {value.shape}')
            boxes.append(value[:, :7])
        truth = np.cumsum(offsets[:NUM_STEPS, :2], axis=0)
        return plan[:NUM_STEPS, :2], truth, boxes

    def compute_metrics(self, results: list) -> Dict[str, float]:
        """Mean per-step values over the kept samples, horizon averages (see the class)."""
        kept = [r for r in results if r is not None]
        logger = MMLogger.get_current_instance()
        metrics = {}
        if not kept:
            logger.warning(f'SparseDrivePlanningMetric: none of the {len(results)} samples has '
                           'a complete ego future; every value is NaN')
        rows = [f'{"metric":<12}' + ''.join(f'{(k + 1) / 2:>8.1f}s' for k in range(NUM_STEPS))
                + f'{"avg":>9}']
        for name in PLANNING_METRICS:
            if kept:
                per_step = np.mean([np.asarray(r[name], np.float64) for r in kept], axis=0)
            else:
                per_step = np.full(NUM_STEPS, np.nan)
            horizon = horizon_means(per_step)
            for label, steps in HORIZONS.items():
                metrics[f'{name}_{label}'] = float(horizon[steps - 1])
            metrics[name] = float(np.mean([horizon[s - 1] for s in HORIZONS.values()]))
            scale, fmt = (100.0, '{:>8.3f}%') if 'col' in name else (1.0, '{:>9.4f}')
            rows.append(f'{name:<12}' + ''.join(fmt.format(v * scale) for v in horizon)
                        + fmt.format(metrics[name] * scale))
        logger.info(f'SparseDrive planning ({len(kept)} of {len(results)} samples with a '
                    'complete ego future)\n' + '\n'.join(rows))
        return metrics
