"""``torch.ops.turbox_mm.warp_affine_u8``: the op, its fake, its dispatch.

A ``torch.library.custom_op`` with a fake (shape-only) implementation, so that
``torch.compile`` traces through it. CUDA tensors with Triton run the kernel of
:mod:`.triton_kernels`; anything else runs :func:`.reference.warp_affine_u8_reference` and
warns once (:mod:`turbox_mm.ops.dispatch`). No autograd: the images are integers.
"""
import torch
from torch import Tensor

from .. import dispatch
from .reference import NUM_PARAMS, warp_affine_u8_reference

try:
    from . import triton_kernels
except ImportError:  # no Triton: the reference serves every device
    triton_kernels = None

FACTORS = (1, 2, 4, 8)


_dispatch = dispatch.OpDispatch('warp_affine_u8', triton_kernels, 'avg_pool2d + grid_sample')
#: Why the op would run the reference for a tensor rather than the kernel; None if not.
fallback_reason = _dispatch.fallback_reason


def check_inputs(src: Tensor, params: Tensor, factor: int, out_h: int, out_w: int) -> None:
    """Raise ``ValueError`` naming the argument unless the inputs fit the op."""
    if src.dtype != torch.uint8 or src.dim() != 4 or src.shape[1] != 3:
        raise ValueError(f'warp_affine_u8: src must be uint8 [K, 3, Hs, Ws], got {src.dtype} '
                         f'{tuple(src.shape)}')
    if tuple(params.shape) != (src.shape[0], NUM_PARAMS) or not params.dtype.is_floating_point:
        raise ValueError(f'warp_affine_u8: params must be float [K, {NUM_PARAMS}] with K = '
                         f'{src.shape[0]} images, got {params.dtype} {tuple(params.shape)}')
    if factor not in FACTORS:
        raise ValueError(f'warp_affine_u8: factor must be one of {FACTORS}, got {factor}')
    if out_h < 0 or out_w < 0:
        raise ValueError(f'warp_affine_u8: the output size must not be negative, got '
                         f'({out_h}, {out_w})')
    if src.shape[0] and (src.shape[2] < 1 or src.shape[3] < 1):
        raise ValueError(f'warp_affine_u8: empty source images {tuple(src.shape)}')


@torch.library.custom_op('turbox_mm::warp_affine_u8', mutates_args=())
def warp_affine_u8_op(src: Tensor, params: Tensor, factor: int, out_h: int, out_w: int,
                      reverse_channels: bool) -> Tensor:
    """Block average, bilinear warp, valid box and channel order of uint8 images (see
    :mod:`.reference`): ``[K, 3, out_h, out_w]`` uint8."""
    check_inputs(src, params, factor, out_h, out_w)
    if _dispatch.use_kernel(src):
        return triton_kernels.warp_affine_u8(src, params, factor, out_h, out_w,
                                             reverse_channels)
    return warp_affine_u8_reference(src, params, factor, (out_h, out_w), reverse_channels)


@warp_affine_u8_op.register_fake
def _(src, params, factor, out_h, out_w, reverse_channels):
    check_inputs(src, params, factor, out_h, out_w)
    return src.new_empty((src.shape[0], 3, out_h, out_w))
