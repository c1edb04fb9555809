"""An Evaluator that collects every rank's results in rank order."""
from typing import List

from mmengine.dist import all_gather_object, broadcast_object_list, is_main_process
from mmengine.evaluator import Evaluator
from mmengine.evaluator.metric import _to_cpu

from turbox_mm.registry import EVALUATOR


def gather_in_rank_order(results: List) -> List:
    """Every rank's ``results`` list, concatenated in rank order (on every rank)."""
    gathered = []
    for part in all_gather_object(list(results)):
        gathered.extend(part)
    return gathered


@EVALUATOR.register_module()
class OrderedEvaluator(Evaluator):
    """mmengine's ``Evaluator`` for samplers that give each rank one contiguous block.

    mmengine's metrics collect their results with ``collect_results``, which assumes the
    ``DefaultSampler``'s interleaving: it zips the ranks' lists (stopping at the shortest)
    and cuts the padding at ``size``. With :class:`~turbox_mm.datasets.samplers.SequenceSampler`
    the ranks hold contiguous blocks of different lengths, so that would put the results in
    the wrong order and drop the longer ranks' tails. Here each metric's results are gathered
    from all ranks and concatenated in rank order, which is the dataset's order; the count
    must equal ``size`` (each sample evaluated exactly once), else a ``RuntimeError`` names
    the sampler to use. Rank 0 computes the metrics and broadcasts them, as mmengine does.

    Args:
        metrics (dict | BaseMetric | list): The metrics, as for mmengine's ``Evaluator``.

    Examples:
        >>> val_evaluator = dict(type='turbox_mm.OrderedEvaluator',
        ...                      metrics=dict(type='NuScenesMetric', data_root='data/nuscenes/',
        ...                                   ann_file='data/nuscenes/nuscenes_infos_val.pkl'))
    """

    def evaluate(self, size: int) -> dict:
        """Gather each metric's results in rank order, compute on rank 0, broadcast.

        Args:
            size (int): Length of the whole evaluation dataset.

        Returns:
            dict: The metrics of all metric objects, on every rank.
        """
        metrics = {}
        for metric in self.metrics:
            results = gather_in_rank_order(metric.results)
            metric.results.clear()
            if len(results) != size:
                raise RuntimeError(
                    f'OrderedEvaluator: the ranks hold {len(results)} results of '
                    f'{type(metric).__name__} for a dataset of {size} samples; it needs a '
                    'sampler that gives every sample to exactly one rank, in order '
                    "(val_dataloader.sampler=dict(type='turbox_mm.SequenceSampler'))")
            if is_main_process():
                values = metric.compute_metrics(_to_cpu(results))
                if metric.prefix:
                    values = {'/'.join((metric.prefix, k)): v for k, v in values.items()}
                payload = [values]
            else:
                payload = [None]
            broadcast_object_list(payload)
            for name in payload[0]:
                if name in metrics:
                    raise ValueError(f'OrderedEvaluator: two metrics report {name!r}; give '
                                     'them different prefixes')
            metrics.update(payload[0])
        return metrics
