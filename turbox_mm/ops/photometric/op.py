"""``torch.ops.turbox_mm.photometric_normalize``: the op, its fake, its dispatch.

A ``torch.library.custom_op`` with a fake (shape-only) implementation, so that
``torch.compile`` traces through it. CUDA tensors with Triton run the kernel of
:mod:`.triton_kernels`; anything else runs :func:`.reference.photometric_normalize_reference`
and warns once (:mod:`turbox_mm.ops.dispatch`). No autograd: it is a data transform.
"""
import torch
from torch import Tensor

from .. import dispatch
from .reference import NUM_PARAMS, photometric_normalize_reference

try:
    from . import triton_kernels
except ImportError:  # no Triton: the reference serves every device
    triton_kernels = None


_dispatch = dispatch.OpDispatch('photometric_normalize', triton_kernels,
                                'elementwise torch ops')
#: Why the op would run the reference for a tensor rather than the kernel; None if not.
fallback_reason = _dispatch.fallback_reason


def check_inputs(imgs: Tensor, params: Tensor, mean: Tensor, std: Tensor) -> None:
    """Raise ``ValueError`` naming the argument unless the inputs fit the op."""
    if imgs.dim() != 4 or imgs.shape[1] != 3 or imgs.dtype not in (torch.uint8, torch.float32):
        raise ValueError(f'photometric_normalize: imgs must be uint8 or float32 [M, 3, H, W], '
                         f'got {imgs.dtype} {tuple(imgs.shape)}')
    if tuple(params.shape) != (imgs.shape[0], NUM_PARAMS) or not params.dtype.is_floating_point:
        raise ValueError(f'photometric_normalize: params must be float [M, {NUM_PARAMS}] with '
                         f'M = {imgs.shape[0]} images, got {params.dtype} {tuple(params.shape)}')
    for name, t in (('mean', mean), ('std', std)):
        if t.numel() != 3:
            raise ValueError(f'photometric_normalize: {name} must have 3 values, got shape '
                             f'{tuple(t.shape)}')


@torch.library.custom_op('turbox_mm::photometric_normalize', mutates_args=())
def photometric_normalize_op(imgs: Tensor, params: Tensor, mean: Tensor, std: Tensor,
                             saturation_clip: bool, reverse_channels: bool,
                             augment: bool) -> Tensor:
    """Photometric distortion, channel reversal and normalisation (see :mod:`.reference`):
    ``[M, 3, H, W]`` float32."""
    check_inputs(imgs, params, mean, std)
    if _dispatch.use_kernel(imgs):
        return triton_kernels.photometric_normalize(imgs, params, mean, std, saturation_clip,
                                                    reverse_channels, augment)
    return photometric_normalize_reference(imgs, params, mean, std, saturation_clip,
                                           reverse_channels, augment)


@photometric_normalize_op.register_fake
def _(imgs, params, mean, std, saturation_clip, reverse_channels, augment):
    check_inputs(imgs, params, mean, std)
    return imgs.new_empty(imgs.shape, dtype=torch.float32)
