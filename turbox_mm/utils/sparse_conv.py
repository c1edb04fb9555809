"""Which sparse convolution library this environment gives mmdet3d, and a warning for a model
whose sparse layers are mmcv's.

mmdet3d 1.4 builds its registry's ``SubMConv3d`` / ``SparseConv3d`` (SECOND, CenterPoint,
BEVFusion's lidar encoder) from spconv 2 when ``spconv`` (version 2 or later) and
``spconv.pytorch`` import, and silently from mmcv's ops otherwise
(``mmdet3d.models.layers.spconv.IS_SPCONV2_AVAILABLE``); a few models (Cylinder3D) import
mmcv's layers directly and use them either way. mmcv's ops are a port of spconv 1: a gather,
one matrix product per kernel offset and a scatter, a dense index grid to find the pairs, and
a host read of the pair counts in every layer's forward and backward. On an H100 the BEVFusion
lidar-camera turbox step ran 46 host syncs an iteration with them, 42 in the sparse layers
(``docs/benchmarks.md``). A benchmark should therefore say what the environment offers
(:func:`sparse_conv_backend`), and a run should say when a model's layers are mmcv's
(:func:`mmcv_sparse_layers`, :func:`warn_slow_sparse_conv`).
"""
import logging
import sys
from typing import List

from torch import nn


def _why_no_spconv2() -> str:
    """Why mmdet3d did not take spconv 2: the import error, or the version found."""
    try:
        import spconv
    except ImportError as exc:
        return f'{type(exc).__name__}: {exc}'
    version = getattr(spconv, '__version__', None)
    if version is None or version < '2.0.0':  # mmdet3d compares the strings so
        return f'spconv {version or "without a version"} is not spconv 2'
    try:
        import spconv.pytorch  # noqa: F401
    except ImportError as exc:
        return f'spconv {version} is installed but spconv.pytorch fails: ' \
               f'{type(exc).__name__}: {exc}'
    return f'spconv {version} imports now, but did not when mmdet3d checked'


def sparse_conv_backend() -> str:
    """The library mmdet3d's registry builds sparse convolutions from here, in words.

    A property of the environment, not of a model (a camera-only model has no sparse layer;
    Cylinder3D uses mmcv's whatever this says).

    Returns:
        str: ``'spconv <version>'``, or ``"mmcv's ops (spconv 2 not used: <why>)"``, or
        ``'unknown (mmdet3d not importable: <why>)'``.
    """
    try:
        from mmdet3d.models.layers.spconv import IS_SPCONV2_AVAILABLE
    except Exception as exc:  # ImportError, or mmdet3d's own version assertion
        return f'unknown (mmdet3d not importable: {type(exc).__name__}: {exc})'
    if IS_SPCONV2_AVAILABLE:
        import spconv
        return f'spconv {spconv.__version__}'
    return f"mmcv's ops (spconv 2 not used: {_why_no_spconv2()})"


def mmcv_sparse_layers(model: nn.Module) -> List[str]:
    """The names of ``model``'s sparse convolution and max-pooling layers that are mmcv's.

    Args:
        model (nn.Module): Any model.

    Returns:
        list[str]: Module names, in ``named_modules`` order (``''`` for the model itself);
        empty when mmcv's sparse ops are not imported or none of the layers is theirs.
    """
    classes = tuple(getattr(sys.modules.get(name), attr)
                    for name, attr in (('mmcv.ops.sparse_conv', 'SparseConvolution'),
                                       ('mmcv.ops.sparse_pool', 'SparseMaxPool'))
                    if hasattr(sys.modules.get(name), attr))
    if not classes:
        return []
    return [name for name, m in model.named_modules() if isinstance(m, classes)]


def slow_sparse_conv_warning(model: nn.Module) -> str:
    """A warning for a model whose sparse layers are mmcv's, or ``''``.

    Args:
        model (nn.Module): The built model.

    Returns:
        str: The warning, naming the count, the first layer, and why: spconv 2 not used by
        mmdet3d (with the reason), or the layers built from ``mmcv.ops`` directly although
        spconv 2 is there; ``''`` when no layer is mmcv's.
    """
    names = mmcv_sparse_layers(model)
    if not names:
        return ''
    layers = f"{len(names)} sparse layer{'s' if len(names) > 1 else ''}"
    backend = sparse_conv_backend()
    if backend.startswith('spconv'):
        why = (f'{backend} is installed, but these were built from mmcv.ops directly, not '
               "through mmdet3d's registry")
    else:
        why = (f'mmdet3d builds its sparse layers from {backend}; install spconv 2 '
               '(pip install spconv-cu126, or the build for your CUDA) to have spconv\'s')
    verb = 'are' if len(names) > 1 else 'is'
    return (f"{layers} of the model (first: {names[0] or 'the model'}) {verb} mmcv's, a port of "
            'spconv 1 with a host synchronisation in every layer\'s forward and backward: '
            f'{why}')


def warn_slow_sparse_conv(model: nn.Module, on_cuda: bool) -> str:
    """Log :func:`slow_sparse_conv_warning` for a model on a CUDA host (a CPU run has no
    host syncs to lose).

    Args:
        model (nn.Module): The built model.
        on_cuda (bool): Whether the host has CUDA (the run's device).

    Returns:
        str: What was logged, or ``''``.
    """
    message = slow_sparse_conv_warning(model) if on_cuda else ''
    if message:
        from mmengine.logging import print_log
        print_log(f'turbox: {message}', logger='current', level=logging.WARNING)
    return message


__all__ = ['sparse_conv_backend', 'mmcv_sparse_layers', 'slow_sparse_conv_warning',
           'warn_slow_sparse_conv']
