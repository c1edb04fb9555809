"""Mean squared error of :class:`~turbox_mm.testing.SmokeModel` predictions."""
from typing import Dict, List, Sequence

import torch  # noqa: F401  (the doctest uses it)
from mmengine.evaluator import BaseMetric

from turbox_mm.registry import METRICS


@METRICS.register_module()
class SmokeMetric(BaseMetric):
    """Mean squared error over all predictions.

    Args:
        collect_device (str): As for :class:`mmengine.evaluator.BaseMetric`.
            Defaults to ``'cpu'``.
        prefix (str): Prefix of the metric names. Defaults to ``'smoke'``.

    Examples:
        >>> metric = SmokeMetric()
        >>> metric.process({}, [dict(pred=torch.ones(3), target=torch.zeros(3))])
        >>> metric.compute_metrics(metric.results)
        {'mse': 1.0}
    """

    default_prefix = 'smoke'

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for sample in data_samples:
            err = (sample['pred'].float() - sample['target'].float()).pow(2).sum()
            self.results.append((err.item(), sample['target'].numel()))

    def compute_metrics(self, results: List) -> Dict[str, float]:
        total = sum(err for err, _ in results)
        count = sum(n for _, n in results)
        return dict(mse=total / max(count, 1))
