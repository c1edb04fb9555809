"""Sparse convolution: a CPU path for mmcv's sparse convolution layers.

- :mod:`.reference`: the rulebook and the convolution in plain PyTorch (the specification
  and the CPU path; the GPU path stays mmcv's or spconv's CUDA kernels).
- :mod:`.cpu_path`: installs the reference behind mmcv's functions for CPU tensors, when
  turbox_mm is imported.

No ``torch.library`` op: the CPU path is made of torch ops (``torch.compile`` traces them),
and the GPU path is mmcv's / spconv's own.
"""
from . import cpu_path
from .reference import get_indice_pairs, indice_conv, indice_conv_backward

__all__ = ['cpu_path', 'get_indice_pairs', 'indice_conv', 'indice_conv_backward']
