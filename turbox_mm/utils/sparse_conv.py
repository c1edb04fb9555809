"""Which sparse convolution library a model's sparse layers run, and a warning for the slow one.

mmdet3d 1.4 builds ``SubMConv3d`` / ``SparseConv3d`` (SECOND, CenterPoint, BEVFusion's lidar
encoder) from spconv 2 when ``import spconv`` succeeds, and silently from mmcv's ops otherwise
(``mmdet3d.models.layers.spconv.IS_SPCONV2_AVAILABLE``). mmcv's ops are a port of spconv 1: a
gather, one matrix product per kernel offset and a scatter, a dense index grid to find the
pairs, and a host synchronisation in every layer's forward and backward. On an H100 the
BEVFusion lidar-camera turbox step ran 46 host syncs an iteration with them (42 in the sparse
layers; ``docs/benchmarks.md``). A benchmark or a training run should therefore say which one
ran; :func:`sparse_conv_backend` names it and :func:`mmcv_sparse_layers` counts the layers of a
model that run mmcv's.
"""
import logging
from typing import List

from torch import nn


def sparse_conv_backend() -> str:
    """The library mmdet3d builds its sparse convolutions from, in words.

    Returns:
        str: ``'spconv <version>'``, or ``"mmcv's ops (spconv 2 not importable: <why>)"``, or
        ``'none (mmdet3d not importable)'``.
    """
    try:
        from mmdet3d.models.layers.spconv import IS_SPCONV2_AVAILABLE
    except ImportError:
        return 'none (mmdet3d not importable)'
    if IS_SPCONV2_AVAILABLE:
        import spconv
        return f'spconv {spconv.__version__}'
    try:
        import spconv  # noqa: F401
        why = f'spconv {getattr(spconv, "__version__", "?")} is older than 2.0'
    except ImportError as exc:
        why = f'{type(exc).__name__}: {exc}'
    return f"mmcv's ops (spconv 2 not importable: {why})"


def mmcv_sparse_layers(model: nn.Module) -> List[str]:
    """The names of ``model``'s sparse convolution layers that are mmcv's (``mmcv.ops``).

    Args:
        model (nn.Module): Any model.

    Returns:
        list[str]: Module names, in ``named_modules`` order; empty when mmcv's ops are not
        imported or none of the layers is theirs.
    """
    import sys
    module = sys.modules.get('mmcv.ops.sparse_conv')
    if module is None:
        return []
    return [name for name, m in model.named_modules()
            if isinstance(m, module.SparseConvolution)]


def slow_sparse_conv_warning(model: nn.Module) -> str:
    """A warning for a model whose sparse layers run mmcv's ops, or ``''``.

    Args:
        model (nn.Module): The built model.

    Returns:
        str: The warning, naming the first layer, the count and the reason spconv 2 was not
        used; ``''`` when no layer is mmcv's.
    """
    names = mmcv_sparse_layers(model)
    if not names:
        return ''
    return (f"{len(names)} sparse convolution layers (first: {names[0] or 'the model'}) run "
            f"{sparse_conv_backend()}. mmcv's are a port of spconv 1, slower and "
            'with a host synchronisation in every layer; mmdet3d uses spconv 2 where it '
            'imports (pip install spconv-cu126, or the build for your CUDA)')


def warn_slow_sparse_conv(model: nn.Module, on_cuda: bool) -> str:
    """Log :func:`slow_sparse_conv_warning` once for a model trained on CUDA (mmcv's ops are
    the only CPU path, so no warning there); return what was logged, or ``''``."""
    message = slow_sparse_conv_warning(model) if on_cuda else ''
    if message:
        from mmengine.logging import print_log
        print_log(f'turbox: {message}', logger='current', level=logging.WARNING)
    return message


__all__ = ['sparse_conv_backend', 'mmcv_sparse_layers', 'slow_sparse_conv_warning',
           'warn_slow_sparse_conv']
