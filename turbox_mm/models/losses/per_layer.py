"""mmdet's ``'mean'`` reduction with an ``avg_factor``, for several decoder layers in one call.

A head that computes the same loss for ``L`` decoder layers can stack the layers' rows,
compute the element losses once (``reduction_override='none'``) and reduce each layer's block
of rows with its own normaliser. mmdet reduces one layer as ``loss.sum() / (avg_factor +
eps)`` (``mmdet.models.losses.utils.weight_reduce_loss``, ``eps`` float32's); this does the
same per block, so the values equal a call per layer up to the order of float32 summation.
"""
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ['check_layer_blocks', 'layer_means', 'reduces_by_mean']


def layer_means(elements: Tensor, layers: int, avg_factor: Tensor) -> Tensor:
    """Each layer's block of element losses summed and divided by its ``avg_factor``.

    The division adds float32's eps to the normaliser, as mmdet's ``'mean'`` reduction does
    for one layer.

    Args:
        elements (Tensor): Element losses (weights applied), ``layers`` equal blocks of rows
            along dimension 0, layer-major.
        layers (int): Number of blocks.
        avg_factor (Tensor): ``[layers]`` normalisers.

    Returns:
        Tensor: ``[layers]`` losses.

    Raises:
        ValueError: Rows that do not split into ``layers`` blocks, or an ``avg_factor`` of
            another length.

    Examples:
        >>> layer_means(torch.ones(4, 3), 2, torch.tensor([2.0, 3.0]))
        tensor([3., 2.])
    """
    if layers < 1 or elements.dim() == 0 or elements.shape[0] % layers:
        raise ValueError(f'layer_means: {tuple(elements.shape)} element losses do not split '
                         f'into {layers} layers along dimension 0')
    if tuple(avg_factor.shape) != (layers, ):
        raise ValueError(f'layer_means: avg_factor must be [{layers}] (one per layer), got '
                         f'{tuple(avg_factor.shape)}')
    eps = torch.finfo(torch.float32).eps
    return elements.reshape(layers, -1).sum(1) / (avg_factor + eps)


def check_layer_blocks(owner: str, layers: int, rows: int, avg_factor) -> None:
    """Raise unless ``rows`` split into ``layers`` blocks and ``avg_factor`` is a
    ``[layers]`` tensor: the input of :func:`layer_means`, checked by a loss before its
    work, with the loss's name in the message.

    Raises:
        ValueError: ``{owner}: R rows in L layers need ...``.
    """
    if rows % layers or not isinstance(avg_factor, Tensor) or \
            tuple(avg_factor.shape) != (layers, ):
        raise ValueError(f'{owner}: {rows} rows in {layers} layers need a row count divisible '
                         f'by the layers and a [{layers}] avg_factor, got {avg_factor!r}')


def reduces_by_mean(loss: Optional[nn.Module]) -> bool:
    """Whether ``loss`` (a configured mmdet-style loss, or None for an absent term) reduces by
    ``'mean'``.

    That is the only reduction that takes an ``avg_factor`` and so the one
    :func:`layer_means` stands in for. The loss must also take ``reduction_override='none'``
    (mmdet's losses do).
    """
    return loss is None or getattr(loss, 'reduction', None) == 'mean'
