"""Float32 precision policy for matmuls and convolutions (TF32) from ``env_cfg``."""
import importlib.util
from typing import Dict, List

import torch

VALID_MATMUL_PRECISION = ('highest', 'high', 'medium')


def apply_precision(env_cfg: Dict) -> List[str]:
    """Apply the precision keys of ``env_cfg`` to torch's global settings.

    mmengine's ``Runner.setup_env`` reads ``env_cfg.cudnn_benchmark``; this reads the keys it
    does not know (a stock runner ignores them):

    - ``allow_tf32`` (bool): float32 matmuls and cuDNN convolutions may use TF32 tensor
      cores (10-bit mantissa products, float32 accumulation): about 3-8x the float32
      throughput of an H100 for these ops, at the precision most training already accepts.
    - ``matmul_precision`` (str): ``'highest'``, ``'high'`` or ``'medium'`` as for
      :func:`torch.set_float32_matmul_precision`; overrides ``allow_tf32`` for matmuls.

    Matmuls go through :func:`torch.set_float32_matmul_precision`, which keeps torch's
    per-backend ``fp32_precision`` settings consistent; convolutions through
    ``torch.backends.cudnn.conv.fp32_precision`` where it exists (torch >= 2.9), else
    ``torch.backends.cudnn.allow_tf32``. Sparse convolutions go through spconv 2's own flag
    (``spconv.constants.SPCONV_ALLOW_TF32``, off by default) where spconv is importable: mmdet3d
    1.4 then runs every sparse convolution layer of a config on spconv 2, whose float32 implicit
    GEMM uses TF32 tensor cores only with that flag.

    Args:
        env_cfg (dict): The config's ``env_cfg``.

    Returns:
        list[str]: What was set, for the start-up report.

    Raises:
        ValueError: ``matmul_precision`` is not one of the valid values.

    Examples:
        >>> apply_precision(dict(allow_tf32=False))
        ['float32 matmul precision: highest', 'cuDNN float32 convolution: ieee']
    """
    done = []
    tf32 = env_cfg.get('allow_tf32')
    matmul = env_cfg.get('matmul_precision')
    if matmul is not None and matmul not in VALID_MATMUL_PRECISION:
        raise ValueError(f'env_cfg.matmul_precision: {matmul!r} is not one of '
                         f'{VALID_MATMUL_PRECISION}')
    if matmul is None and tf32 is not None:
        matmul = 'high' if tf32 else 'highest'
    if matmul is not None:
        # Sets every backend consistently (torch >= 2.9 refuses to report a mixed state).
        torch.set_float32_matmul_precision(matmul)
        done.append(f'float32 matmul precision: {matmul}')
    if tf32 is not None:
        conv = getattr(torch.backends.cudnn, 'conv', None)
        if conv is not None and hasattr(conv, 'fp32_precision'):
            conv.fp32_precision = 'tf32' if tf32 else 'ieee'
        else:
            torch.backends.cudnn.allow_tf32 = bool(tf32)
        done.append(f'cuDNN float32 convolution: {"tf32" if tf32 else "ieee"}')
        constants = _spconv_constants()
        if constants is not None:
            constants.SPCONV_ALLOW_TF32 = bool(tf32)
            done.append(f'spconv float32 convolution: {"tf32" if tf32 else "ieee"}')
    return done


def _spconv_constants():
    """spconv 2's ``constants`` module, or None where spconv does not import (mmdet3d then
    runs mmcv's sparse convolutions, which have no such flag)."""
    if importlib.util.find_spec('spconv') is None:
        return None
    try:
        from spconv import constants
    except ImportError:  # as mmdet3d: a broken spconv means mmcv's sparse ops
        return None
    return constants if hasattr(constants, 'SPCONV_ALLOW_TF32') else None
