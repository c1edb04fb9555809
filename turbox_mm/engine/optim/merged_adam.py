"""Adam and AdamW whose step runs one kernel launch per distinct set of hyper-parameters.

mmengine's ``paramwise_cfg`` builds one parameter group per parameter (for decay and learning
rate multipliers), and torch's ``Adam.step`` calls its (fused) update once per group: about 650
launches a step for Sparse4D, measured on the H200 by the previous profile (issue 14).
:class:`TurboxAdam` and :class:`TurboxAdamW` keep the parameter groups exactly as built (so
parameter schedulers, ``state_dict`` and checkpoints are those of torch's classes, and load
into them both ways) and change only ``step``: the groups are bucketed by the hyper-parameters
the update reads (lr, betas, eps, weight decay, amsgrad, maximize and the kernel flags), as
they are at this step, and each bucket is updated by one call of torch's ``adam`` function.

Only groups with ``fused=True`` are merged: the fused kernel updates each parameter on its
own, whatever shares its call, so the results are torch's bit for bit
(``tests/test_optim.py``). The foreach and for-loop paths choose their code for a whole call
(a foreach fast path needs every tensor of the call to qualify; without ``foreach``/``fused``
torch decides for the whole list), so their groups keep one call each, as in torch. Under
``torch.compile`` the step is torch's own.
"""
from typing import Dict, List, Tuple

import torch
from torch.optim.adam import adam

from turbox_mm.registry import OPTIMIZERS

try:  # the decorator torch's own step carries (grad mode for differentiable optimizers)
    from torch.optim.optimizer import _use_grad_for_differentiable
except ImportError:  # pragma: no cover - older torch
    def _use_grad_for_differentiable(func):
        return func

# Group entries the update reads; everything else (initial_lr, decay_mult, ...) is bookkeeping.
UPDATE_KEYS = ('lr', 'betas', 'eps', 'weight_decay', 'amsgrad', 'maximize', 'foreach',
               'capturable', 'differentiable', 'fused', 'decoupled_weight_decay')


# Values hashed as they are; anything else goes through _hashable (a tensor by its identity).
_PLAIN_TYPES = frozenset((float, int, bool, str, type(None)))


def _hashable(value):
    if torch.is_tensor(value):  # a tensor lr (capturable): only the same tensor merges
        return ('tensor', id(value))
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value


def update_key(group: dict) -> Tuple:
    """The hyper-parameters of ``group`` that its update reads and the device, hashable;
    unique to the group unless it is fused (the module docstring says why).

    Called for every group at every step (hundreds with ``paramwise_cfg``), so the common
    case, plain numbers and a tuple of plain ``betas``, skips the recursive conversion.
    """
    if group.get('fused') is not True or not group['params']:
        return ('group', id(group))
    values = tuple(map(group.get, UPDATE_KEYS))
    betas = values[1]
    # the type checks iterate in C (map, issuperset): this runs some 1,000 times a step
    if not (type(betas) is tuple and _PLAIN_TYPES.issuperset(map(type, betas))
            and _PLAIN_TYPES.issuperset(map(type, values[:1] + values[2:]))):
        values = tuple(_hashable(v) for v in values)
    return values + (group['params'][0].device, )


class MergedStepMixin:
    """``step`` of torch's Adam with one ``adam`` call per bucket of equal hyper-parameters."""

    #: Number of ``adam`` calls of the last step (for tests and the benchmark).
    last_step_calls: int = 0

    @_use_grad_for_differentiable
    def step(self, closure=None):
        """One optimisation step (see the module docstring).

        Args:
            closure (Callable, optional): Re-evaluates the model and returns the loss.
        """
        if torch.compiler.is_compiling():  # dynamo traces torch's own step
            return super().step(closure)
        check = getattr(self, '_accelerator_graph_capture_health_check', None) or getattr(
            self, '_cuda_graph_capture_health_check', None)
        if check is not None:
            check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets: Dict[Tuple, dict] = {}
        for group in self.param_groups:
            key = update_key(group)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = dict(
                    group=group, has_complex=False,
                    lists=tuple([] for _ in range(6)))  # params, grads, m, v, v_max, steps
            bucket['has_complex'] |= self._init_group(group, *bucket['lists'])
        for bucket in buckets.values():
            group = bucket['group']
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = bucket['lists']
            beta1, beta2 = group['betas']
            adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                 amsgrad=group['amsgrad'], has_complex=bucket['has_complex'], beta1=beta1,
                 beta2=beta2, lr=group['lr'], weight_decay=group['weight_decay'],
                 eps=group['eps'], maximize=group['maximize'], foreach=group['foreach'],
                 capturable=group['capturable'], differentiable=group['differentiable'],
                 fused=group['fused'], grad_scale=getattr(self, 'grad_scale', None),
                 found_inf=getattr(self, 'found_inf', None),
                 decoupled_weight_decay=group['decoupled_weight_decay'])
        self.last_step_calls = len(buckets)
        return loss


@OPTIMIZERS.register_module()
class TurboxAdam(MergedStepMixin, torch.optim.Adam):
    """``torch.optim.Adam`` with the merged step of :class:`MergedStepMixin`.

    Examples:
        >>> import torch.nn as nn
        >>> model = nn.Linear(4, 2)
        >>> opt = TurboxAdam([{'params': [model.weight]}, {'params': [model.bias]}], lr=0.1)
        >>> model(torch.ones(1, 4)).sum().backward()
        >>> _ = opt.step()
        >>> opt.last_step_calls
        1
    """


@OPTIMIZERS.register_module()
class TurboxAdamW(MergedStepMixin, torch.optim.AdamW):
    """``torch.optim.AdamW`` with the merged step of :class:`MergedStepMixin`."""


#: torch's class -> its merged twin.
MERGED_TWINS: Dict[type, type] = {torch.optim.Adam: TurboxAdam, torch.optim.AdamW: TurboxAdamW}


def supports_merged_step() -> bool:
    """Whether this torch's Adam has the ``_init_group`` and ``adam`` function the merged step
    reuses (torch >= 2.6: ``decoupled_weight_decay`` in every group)."""
    probe = torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    return (hasattr(torch.optim.Adam, '_init_group')
            and 'decoupled_weight_decay' in probe.param_groups[0])


def bucket_count(param_groups: List[dict]) -> int:
    """How many ``adam`` calls a merged step makes for ``param_groups`` (torch's: one a group)."""
    return len({update_key(g) for g in param_groups})


__all__ = ['TurboxAdam', 'TurboxAdamW', 'MERGED_TWINS', 'update_key', 'bucket_count',
           'supports_merged_step']
