"""Matching costs of SparseDrive's map head: a focal class cost plus a line cost over every
equivalent point order of each ground-truth polyline (docs/design/sparsedrive.md section 4,
"Targets"; upstream ``P/models/map/match_cost.py`` and ``target.py`` @ ffebeb4).

All costs are plain functions of tensors with any leading batch dimensions, so the same code
prices one sample (the stock path, :meth:`SparsePoint3DTarget.sample`) and every decoder layer
and sample at once (the turbox path, :meth:`SparsePoint3DTarget.sample_layers`).

Upstream builds the assigner and its costs through mmdet 2.x's registries
(``HungarianLinesAssigner`` -> ``MapQueriesCost`` -> ``FocalLossCost`` + ``LinesL1Cost``).
Here :func:`build_lines_cost` reads the same config dict and builds :class:`MapQueriesCost`
directly, without a registry: ``FocalLossCost`` is a registered name of mmdet 3's
``TASK_UTILS`` with another interface (``InstanceData`` in, one sample at a time), and a
``turbox_mm`` class under the same name would shadow it for every ``turbox_mm``-scoped config.
The other three names are not registered anywhere, so nothing can build them by mistake.
"""
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from turbox_mm.utils.upload import device_constant

__all__ = ['normalize_lines', 'focal_class_cost', 'lines_l1_cost', 'MapQueriesCost',
           'build_lines_cost', 'NORM_EPS']

#: Added to the ROI size before dividing (upstream's value; keeps the far edge below 1).
NORM_EPS = 1e-5


def normalize_lines(lines: Tensor, num_sample: int, roi_size: Sequence[float],
                    eps: float = NORM_EPS) -> Tensor:
    """Metric polylines to ROI-relative coordinates, as upstream's ``normalize_line``.

    Each point ``(x, y)`` becomes ``((x + W / 2) / (W + eps), (y + H / 2) / (H + eps))`` with
    ``(W, H) = roi_size``; the divisor is computed in the lines' dtype (``W`` cast, then
    ``eps`` added), as upstream does. The constants are uploaded once per device and dtype
    (upstream's ``new_tensor`` copies them every call).

    Args:
        lines (Tensor): ``[..., 2 * num_sample]`` points, ``x`` and ``y`` interleaved.
        num_sample (int): Points per line.
        roi_size (Sequence[float]): ``(W, H)``: the x and y extents of the ROI in metres.
        eps (float): Added to ``W`` and ``H``. Defaults to :data:`NORM_EPS`.

    Returns:
        Tensor: Same shape and dtype; ``[0, ...]`` inputs come back as they are.

    Raises:
        ValueError: The last dimension is not ``2 * num_sample``.

    Examples:
        >>> out = normalize_lines(torch.tensor([[-15., -30., 0., 0.]]), 2, (30, 60))
        >>> [round(v, 6) for v in out[0].tolist()]
        [0.0, 0.0, 0.5, 0.5]
    """
    if lines.shape[-1] != 2 * num_sample:
        raise ValueError(f'normalize_lines: lines must end in 2 * num_sample = {2 * num_sample} '
                         f'numbers, got shape {tuple(lines.shape)}')
    if lines.shape[0] == 0:
        return lines
    origin = device_constant([-roi_size[0] / 2, -roi_size[1] / 2], lines)
    norm = device_constant([roi_size[0], roi_size[1]], lines) + eps
    points = lines.reshape(lines.shape[:-1] + (num_sample, 2))
    return ((points - origin) / norm).flatten(-2)


def focal_class_cost(logits: Tensor, labels: Tensor, weight: float = 1.0, alpha: float = 0.25,
                     gamma: float = 2.0, eps: float = 1e-12) -> Tensor:
    """mmdet 2.x ``FocalLossCost`` (``binary_input=False``) with leading batch dimensions.

    With ``p = sigmoid(logit)`` of the ground truth's class: ``pos = -log(p + eps) * alpha *
    (1 - p)^gamma``, ``neg = -log(1 - p + eps) * (1 - alpha) * p^gamma``, cost ``(pos - neg) *
    weight``.

    Args:
        logits (Tensor): ``[..., M, C]`` class logits.
        labels (Tensor): ``[..., G]`` long labels in ``[0, C)``.
        weight, alpha, gamma, eps (float): mmdet's parameters and defaults.

    Returns:
        Tensor: ``[..., M, G]`` in the logits' dtype.
    """
    p = logits.sigmoid()
    neg = -(1 - p + eps).log() * (1 - alpha) * p.pow(gamma)
    pos = -(p + eps).log() * alpha * (1 - p).pow(gamma)
    index = labels.unsqueeze(-2).expand(labels.shape[:-1] + (logits.shape[-2], labels.shape[-1]))
    return torch.gather(pos - neg, -1, index) * weight


def lines_l1_cost(lines: Tensor, gt_lines: Tensor, weight: float = 1.0,
                  beta: float = 0.0) -> Tuple[Tensor, Tensor]:
    """Upstream's ``LinesL1Cost`` with ``permute=True``, with leading batch dimensions.

    The distance of a prediction to one order of a ground truth is the smooth-L1 (``beta >
    0``; torch's ``smooth_l1_loss``) or L1 distance summed over the ``D`` coordinates, divided
    by the number of points ``D // 2``; the cost of the pair is its minimum over the orders,
    times ``weight``. The broadcast is not materialised as upstream's ``repeat`` copies are;
    the per-element values and the sum over ``D`` are the same. Ties between orders go to the
    first (``torch.min``), so padding orders placed after the real ones never win.

    Args:
        lines (Tensor): ``[..., M, D]`` normalised predicted lines.
        gt_lines (Tensor): ``[..., G, O, D]`` normalised ground truth, ``O`` orders each.
        weight (float): Multiplies the cost. Defaults to 1.0.
        beta (float): Smooth-L1 threshold; 0 gives L1. Defaults to 0.0.

    Returns:
        tuple[Tensor, Tensor]: ``[..., M, G]`` cost and ``[..., M, G]`` long index of the
        order that reaches it.
    """
    num_pred = lines.shape[-2]
    num_gt, num_orders, dims = gt_lines.shape[-3:]
    shape = torch.broadcast_shapes(lines.shape[:-2], gt_lines.shape[:-3]) + (
        num_pred, num_gt, num_orders, dims)
    pred = lines[..., :, None, None, :].expand(shape)
    gt = gt_lines[..., None, :, :, :].expand(shape)
    if beta > 0:
        dist = F.smooth_l1_loss(pred, gt, reduction='none', beta=beta).sum(-1)
    else:
        dist = F.l1_loss(pred, gt, reduction='none').sum(-1)
    dist = dist / (dims // 2)
    dist, order = dist.min(-1)
    return dist * weight, order


def _type_name(cfg: dict, where: str) -> str:
    if not isinstance(cfg, dict) or 'type' not in cfg:
        raise TypeError(f'SparsePoint3DTarget: {where} must be a config dict with a "type" key, '
                        f'got {cfg!r}')
    name = cfg['type']
    if not isinstance(name, str):
        raise TypeError(f'SparsePoint3DTarget: {where}.type must be a name, got {name!r}')
    return name.rsplit('.', 1)[-1]  # 'mmdet.FocalLossCost' and 'FocalLossCost' alike


def _options(cfg: dict, where: str, allowed: Sequence[str]) -> dict:
    extra = sorted(set(cfg) - {'type'} - set(allowed))
    if extra:
        raise ValueError(f'SparsePoint3DTarget: {where} does not take {extra}; it takes '
                         f'{sorted(allowed)}')
    return {k: v for k, v in cfg.items() if k != 'type'}


class MapQueriesCost:
    """Upstream's ``MapQueriesCost``: the focal class cost plus the permutation-invariant line
    cost (``cls + reg``), priced for many matrices at once.

    Args:
        cls_cost (dict): ``type='FocalLossCost'`` (any scope prefix) with mmdet's ``weight``,
            ``alpha``, ``gamma``, ``eps`` (defaults 1.0, 0.25, 2.0, 1e-12); ``binary_input``
            must be False.
        reg_cost (dict): ``type='LinesL1Cost'`` with ``weight`` (1.0), ``beta`` (0.0) and
            ``permute`` (False; the map head uses True).
        iou_cost (dict, optional): Must be None (upstream's map configs set none).

    Raises:
        ValueError, TypeError: An unknown type or option, or a negative weight or beta.

    Examples:
        >>> cost = MapQueriesCost(dict(type='FocalLossCost', weight=1.0),
        ...                       dict(type='LinesL1Cost', weight=10.0, beta=0.01, permute=True))
        >>> c, order = cost(torch.zeros(4, 3), torch.zeros(4, 40), torch.tensor([1]),
        ...                 torch.zeros(1, 38, 40))
        >>> tuple(c.shape), tuple(order.shape)
        ((4, 1), (4, 1))
    """

    def __init__(self, cls_cost: dict, reg_cost: dict, iou_cost: Optional[dict] = None) -> None:
        if iou_cost is not None:
            raise ValueError('SparsePoint3DTarget: MapQueriesCost.iou_cost is not supported '
                             '(upstream map configs set none)')
        name = _type_name(cls_cost, 'cls_cost')
        if name != 'FocalLossCost':
            raise ValueError(f'SparsePoint3DTarget: cls_cost type must be FocalLossCost, got '
                             f'{cls_cost["type"]!r}')
        opts = _options(cls_cost, 'cls_cost',
                        ('weight', 'alpha', 'gamma', 'eps', 'binary_input'))
        if opts.pop('binary_input', False):
            raise ValueError('SparsePoint3DTarget: cls_cost binary_input=True (mask costs) is '
                             'not supported')
        self.cls_weight = float(opts.get('weight', 1.0))
        self.alpha = float(opts.get('alpha', 0.25))
        self.gamma = float(opts.get('gamma', 2.0))
        self.eps = float(opts.get('eps', 1e-12))
        name = _type_name(reg_cost, 'reg_cost')
        if name != 'LinesL1Cost':
            raise ValueError(f'SparsePoint3DTarget: reg_cost type must be LinesL1Cost, got '
                             f'{reg_cost["type"]!r}')
        opts = _options(reg_cost, 'reg_cost', ('weight', 'beta', 'permute'))
        self.reg_weight = float(opts.get('weight', 1.0))
        self.beta = float(opts.get('beta', 0.0))
        self.permute = bool(opts.get('permute', False))
        if self.beta < 0 or self.reg_weight < 0 or self.cls_weight < 0:
            raise ValueError(f'SparsePoint3DTarget: cost weights and beta must be >= 0, got '
                             f'cls weight {self.cls_weight}, reg weight {self.reg_weight}, '
                             f'beta {self.beta}')

    def __call__(self, logits: Tensor, lines: Tensor, labels: Tensor,
                 gt_lines: Tensor) -> Tuple[Tensor, Tensor]:
        """Price every (prediction, ground truth) pair.

        Args:
            logits (Tensor): ``[..., M, C]`` class logits.
            lines (Tensor): ``[..., M, D]`` normalised predicted lines.
            labels (Tensor): ``[..., G]`` long labels in ``[0, C)``.
            gt_lines (Tensor): ``[..., G, O, D]`` normalised ground truth (``O = 1`` without
                ``permute``).

        Returns:
            tuple[Tensor, Tensor]: ``[..., M, G]`` costs (class + line) and the best order of
            each pair (long).
        """
        cls = focal_class_cost(logits, labels, self.cls_weight, self.alpha, self.gamma,
                               self.eps)
        reg, order = lines_l1_cost(lines, gt_lines, self.reg_weight, self.beta)
        return cls + reg, order


def build_lines_cost(assigner: Union[dict, MapQueriesCost]) -> MapQueriesCost:
    """The cost of upstream's ``assigner`` config:
    ``dict(type='HungarianLinesAssigner', cost=dict(type='MapQueriesCost', cls_cost=...,
    reg_cost=..., iou_cost=None))``; a :class:`MapQueriesCost` passes through.

    Raises:
        ValueError, TypeError: A type other than those named, or an unknown option.
    """
    if isinstance(assigner, MapQueriesCost):
        return assigner
    if _type_name(assigner, 'assigner') != 'HungarianLinesAssigner':
        raise ValueError(f'SparsePoint3DTarget: assigner type must be HungarianLinesAssigner, '
                         f'got {assigner["type"]!r}')
    opts = _options(assigner, 'assigner', ('cost', ))
    cost = opts.get('cost')
    if isinstance(cost, MapQueriesCost):
        return cost
    if cost is None or _type_name(cost, 'assigner.cost') != 'MapQueriesCost':
        raise ValueError(f'SparsePoint3DTarget: assigner.cost must be a MapQueriesCost config, '
                         f'got {cost!r}')
    opts = _options(cost, 'assigner.cost', ('cls_cost', 'reg_cost', 'iou_cost'))
    for key in ('cls_cost', 'reg_cost'):
        if key not in opts:
            raise ValueError(f'SparsePoint3DTarget: assigner.cost needs {key!r}')
    return MapQueriesCost(**opts)
