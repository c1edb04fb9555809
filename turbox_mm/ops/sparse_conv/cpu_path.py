"""mmcv's sparse convolution layers on CPU tensors (process-wide, applied when turbox_mm is
imported).

mmcv's ``SubMConv3d`` / ``SparseConv3d`` / ``SparseInverseConv3d`` (the layers mmdet3d builds
where spconv is not installed) call ``mmcv.ops.sparse_ops.get_indice_pairs``,
``indice_conv`` and ``indice_conv_backward``, whose kernels exist for CUDA only: on CPU
tensors they raise. :func:`install` wraps the three so that CPU tensors run
:mod:`.reference` and everything else runs mmcv's functions as before; nothing changes on the
GPU. :func:`uninstall` restores them.
"""
from typing import Callable, Dict

from . import reference

_originals: Dict[str, Callable] = {}


def _cpu_or_mmcv(name: str, original: Callable) -> Callable:
    fallback = getattr(reference, name)

    def call(first, *args, **kwargs):
        if first.device.type == 'cpu':
            if name == 'get_indice_pairs':
                kwargs.pop('grid', None)
                if len(args) > 9:  # grid, positionally
                    args = args[:9]
            return fallback(first, *args, **kwargs)
        return original(first, *args, **kwargs)

    call.__wrapped__ = original
    call.__name__ = name
    return call


def install() -> bool:
    """Give mmcv's sparse convolution a CPU path; False where mmcv's ops do not import."""
    try:
        from mmcv.ops import sparse_ops
    except ImportError:
        return False
    for name in ('get_indice_pairs', 'indice_conv', 'indice_conv_backward'):
        if name not in _originals:
            _originals[name] = getattr(sparse_ops, name)
            setattr(sparse_ops, name, _cpu_or_mmcv(name, _originals[name]))
    return True


def uninstall() -> None:
    """Restore mmcv's functions."""
    from mmcv.ops import sparse_ops
    for name, original in list(_originals.items()):
        setattr(sparse_ops, name, original)
        del _originals[name]
