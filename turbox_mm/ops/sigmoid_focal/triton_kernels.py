"""Triton kernels of the sigmoid focal loss (spec: :mod:`.reference`).

One program per block of ``BLOCK`` elements of ``[N, C]``: the logit and its row's label are
read once, the loss (forward) or the gradient times the incoming gradient (backward) is
computed in float32 registers and written once. Two launches a loss call in all, where the
torch formulas of the reference take about 35 (a host-bound step pays for each).

Numerics: mmcv's formulas in mmcv's order (``1 - p`` included, with its cancellation for
large logits), in float32 for every input dtype: float16 and bfloat16 logits are more exact
than mmcv's kernel, which computes in half precision and overflows to inf/NaN for logits
above about 8.3; float64 logits get float32 precision (mmcv computes them in double). ``exp``
is Triton's fast ``exp`` and powers are ``exp2(gamma log2(base))``, so values differ from
the reference's by float32 rounding, amplified where ``1 - p`` cancels. A NaN logit gives a
NaN loss and gradient.
"""
import torch
import triton
import triton.language as tl

from .._triton_launch import cdiv
from .reference import FLT_MIN

BLOCK = 1024
_FLT_MIN = tl.constexpr(FLT_MIN)


@triton.jit
def _power(base, gamma):
    """``base ** gamma`` for ``base >= 0`` or NaN, as C's ``pow``: ``x ** 0 = 1`` (NaN too),
    ``0 ** gamma = 0`` for ``gamma > 0``, NaN stays NaN (no ``maximum``: on the GPU it
    would pick the non-NaN operand and hide a NaN logit's loss)."""
    value = tl.exp2(gamma * tl.log2(base))
    return tl.where(gamma == 0, 1.0, tl.where(base == 0, 0.0, value))


@triton.jit(do_not_specialize=['total'])
def _focal_kernel(x_ptr, t_ptr, g_ptr, out_ptr, total, C, sx_n, sx_c, st_n, sg_n, sg_c, gamma,
                  alpha, BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < total
    row = offs // C
    col = offs - row * C
    x = tl.load(x_ptr + row * sx_n + col * sx_c, mask=live, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + row * st_n, mask=live, other=-1)
    p = tl.math.div_rn(1.0, 1.0 + tl.exp(-x))
    q = 1.0 - p
    # clamp(min=FLT_MIN) as the reference's torch.clamp: a NaN stays NaN (tl.maximum is the
    # GPU's maxnum, which would return FLT_MIN for a NaN)
    log_p = tl.log(tl.where(p < _FLT_MIN, _FLT_MIN, p))
    log_q = tl.log(tl.where(q < _FLT_MIN, _FLT_MIN, q))
    positive = t == col
    if BACKWARD:
        term_p = _power(q, gamma) * (q - gamma * p * log_p)
        term_n = _power(p, gamma) * (gamma * q * log_q - p)
        g = tl.load(g_ptr + row * sg_n + col * sg_c, mask=live, other=0.0).to(tl.float32)
        value = g * tl.where(positive, -alpha * term_p, -(1.0 - alpha) * term_n)
    else:
        value = tl.where(positive, -alpha * _power(q, gamma) * log_p,
                         -(1.0 - alpha) * _power(p, gamma) * log_q)
    tl.store(out_ptr + offs, value.to(out_ptr.dtype.element_ty), mask=live)


def _launch(logits: torch.Tensor, target: torch.Tensor, grad, gamma: float,
            alpha: float) -> torch.Tensor:
    # On the GPU the kernel stores every dtype itself. Triton's interpreter (the CPU tests)
    # stores bfloat16 wrongly, so there bfloat16 goes through a float32 buffer.
    interpreted = logits.device.type != 'cuda'
    dtype = torch.float32 if interpreted and logits.dtype == torch.bfloat16 else logits.dtype
    out = torch.empty(logits.shape, dtype=dtype, device=logits.device)
    total = logits.numel()
    if total == 0:
        return out.to(logits.dtype)
    g = logits if grad is None else grad
    _focal_kernel[(cdiv(total, BLOCK), )](
        logits, target, g, out, total, logits.shape[1], logits.stride(0), logits.stride(1),
        target.stride(0), g.stride(0), g.stride(1), float(gamma), float(alpha),
        BACKWARD=grad is not None, BLOCK=BLOCK)
    return out.to(logits.dtype)


def sigmoid_focal_forward(logits: torch.Tensor, target: torch.Tensor, gamma: float,
                          alpha: float) -> torch.Tensor:
    """The per-element loss ``[N, C]`` (contiguous, ``logits``' dtype); any strides in."""
    return _launch(logits, target, None, gamma, alpha)


def sigmoid_focal_backward(grad: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                           gamma: float, alpha: float) -> torch.Tensor:
    """``grad * dloss/dlogits`` ``[N, C]`` (contiguous, ``logits``' dtype)."""
    return _launch(logits, target, grad, gamma, alpha)
