"""Micro benchmark: multi-scale deformable attention, mmcv's CUDA op against turbox_mm's.

Stock is mmcv 2.1's ``MultiScaleDeformableAttnFunction.apply`` (its CUDA kernels, as mmdet3d,
BEVFormer and MapTR call it; ``im2col_step=64``). Turbox is
:func:`turbox_mm.ops.ms_deform_attn.ms_deform_attn` (the Triton kernels). Rows: forward
(under ``no_grad``) and forward + backward (gradients of value, sampling locations and
attention weights), float32 (MapTR calls the op in float32 always, through BEVFormer's
``MultiScaleDeformableAttnFunction_fp32``) and, for the issue's case, float16 too.

Sizes (``docs/design/maptr.md`` section 8.1; 8 heads of 32 channels and 4 points each):

- issue 18's case, a BEVFormer-like encoder: batch 2, 20000 queries, 4 levels. The issue does
  not give the level sizes; these are BEVFormer-base's FPN on 1600x928 camera images (strides
  8 to 64: 116x200, 58x100, 29x50, 15x25; 30825 values). Reference points uniform.
- MapTR v1's temporal self-attention (batch 4 per GPU, two BEV queues: value batch 8), the
  20000 BEV queries over the 200x100 BEV, reference points at the cell centres.
- MapTR's decoder cross-attention over the BEV (batch 4): 1000 queries (v1; v2 at test) and
  7000 (v2 in training, one-to-many queries included). Reference points uniform.

Sampling locations are each query's reference point plus offsets of N(0, 4 pixels) on each
level, per head and point (as learned offsets spread around a reference point); attention
weights are a softmax over levels and points. mmcv's op runs only on CUDA, so without a GPU
every row is reported as skipped.
"""
from typing import Dict, List, Tuple

import torch

from turbox_mm.benchmark.micro import _op_rows
from turbox_mm.benchmark.timing import benchmark_device
from turbox_mm.ops.ms_deform_attn import ms_deform_attn

#: The four sizes of the module docstring.
CASES = {
    'issue 18 encoder (4 levels)': dict(bs=2, queries=20000, heads=8, dims=32, points=4,
                                        shapes=((116, 200), (58, 100), (29, 50), (15, 25)),
                                        ref='uniform'),
    'MapTR v1 TSA': dict(bs=8, queries=20000, heads=8, dims=32, points=4, shapes=((200, 100), ),
                         ref='grid'),
    'MapTR decoder, 1000 queries': dict(bs=4, queries=1000, heads=8, dims=32, points=4,
                                        shapes=((200, 100), ), ref='uniform'),
    'MapTR v2 decoder, 7000 queries': dict(bs=4, queries=7000, heads=8, dims=32, points=4,
                                           shapes=((200, 100), ), ref='uniform'),
}
#: Cases also timed in float16 (mmcv's kernels take half too).
HALF_CASES = ('issue 18 encoder (4 levels)', )
QUICK = {'quick': dict(bs=1, queries=37, heads=2, dims=8, points=2, shapes=((7, 5), (3, 3)),
                       ref='uniform')}
OFFSET_PX = 4.0


def make_inputs(size: Dict, device='cpu', dtype: torch.dtype = torch.float32,
                seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """The five tensors of the op at ``size`` (a :data:`CASES` entry), made on the CPU with a
    fixed seed and moved to ``device``.

    ``ref='grid'`` puts query ``q`` at the centre of cell ``q`` of the first level (row-major;
    ``queries`` must be its ``H * W``), ``'uniform'`` draws reference points uniformly.

    Returns:
        tuple[Tensor, ...]: ``value`` ``[bs, num_value, heads, dims]``, ``spatial_shapes``
        ``[levels, 2]`` and ``level_start_index`` ``[levels]`` (int64),
        ``sampling_locations`` ``[bs, queries, heads, levels, points, 2]`` and
        ``attention_weights`` ``[bs, queries, heads, levels, points]``.
    """
    gen = torch.Generator().manual_seed(seed)
    bs, queries, heads, dims, points = (size[k] for k in ('bs', 'queries', 'heads', 'dims',
                                                          'points'))
    shapes = torch.tensor(size['shapes'], dtype=torch.int64)
    levels = len(shapes)
    counts = shapes[:, 0] * shapes[:, 1]
    start = counts.cumsum(0) - counts
    value = torch.randn(bs, int(counts.sum()), heads, dims, generator=gen)
    if size['ref'] == 'grid':
        height, width = size['shapes'][0]
        if queries != height * width:
            raise ValueError(f"make_inputs: ref='grid' needs queries = {height} * {width}")
        rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing='ij')
        ref = torch.stack([(cols.flatten() + 0.5) / width, (rows.flatten() + 0.5) / height], -1)
        ref = ref.expand(bs, queries, 2)
    else:
        ref = torch.rand(bs, queries, 2, generator=gen)
    wh = shapes.flip(-1).to(torch.float32)  # (W, H) per level
    offsets = torch.randn(bs, queries, heads, levels, points, 2, generator=gen) * OFFSET_PX
    loc = ref[:, :, None, None, None, :] + offsets / wh[:, None, :]
    logits = torch.randn(bs, queries, heads, levels * points, generator=gen)
    weights = logits.softmax(-1).reshape(bs, queries, heads, levels, points)
    return (value.to(device, dtype), shapes.to(device), start.to(device), loc.to(device, dtype),
            weights.to(device, dtype))


def mmcv_ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                        attention_weights, im2col_step: int = 64):
    """mmcv's CUDA op, the stock side (``MultiScaleDeformableAttnFunction.apply``)."""
    from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttnFunction
    return MultiScaleDeformableAttnFunction.apply(value, spatial_shapes, level_start_index,
                                                  sampling_locations, attention_weights,
                                                  im2col_step)


def _size_note(size: Dict) -> str:
    levels = '+'.join(f'{h}x{w}' for h, w in size['shapes'])
    return (f"bs {size['bs']}, {size['queries']} queries, levels {levels}, {size['heads']} heads "
            f"x {size['dims']}, {size['points']} points")


def _rows(name: str, size: Dict, dtype: torch.dtype, device: torch.device, iters: int,
          warmup: int) -> List[Dict]:
    value, shapes, start, loc, weights = make_inputs(size, device, dtype)
    grad = torch.randn(size['bs'], size['queries'], size['heads'] * size['dims'],
                       generator=torch.Generator().manual_seed(1)).to(device, dtype)
    args = (value, shapes, start, loc, weights)
    diff = _op_rows.max_abs_diff(ms_deform_attn, mmcv_ms_deform_attn, args)
    note = (f'{_size_note(size)}; stock = mmcv CUDA op; max |turbox - mmcv| of the output '
            f'{diff:.1e}')
    return _op_rows.timed_rows('ms_deform_attn', f"{name} {_op_rows.dtype_name(dtype)}",
                               mmcv_ms_deform_attn, ms_deform_attn, args, (0, 3, 4), grad,
                               device, iters, warmup, note)


def benchmark(device: str, quick: bool = False) -> List[Dict]:
    """Time mmcv's CUDA op and turbox's, forward and forward + backward.

    Args:
        device (str): ``'cuda'`` (or ``'cuda:N'``) or ``'cpu'``. On the CPU every row comes
            back skipped (``stock`` and ``turbox`` None, a note saying why): mmcv's op has no
            CPU implementation.
        quick (bool): A tiny size and a few iterations, for tests. Defaults to False.

    Returns:
        list[dict]: Two rows (fwd, fwd+bwd) per case and dtype, as described in
        :mod:`turbox_mm.benchmark.micro`.

    Examples:
        >>> rows = benchmark('cpu')
        >>> rows[0]['stock'] is None and 'needs CUDA' in rows[0]['note']
        True
    """
    dev = benchmark_device('ms_deform_attn', device)
    cases = QUICK if quick else CASES
    plan = _op_rows.plan(cases, HALF_CASES)
    if dev.type != 'cuda':
        return _op_rows.skipped_rows(
            'ms_deform_attn', plan, lambda size: "skipped: mmcv's op has no CPU implementation, "
            f'needs CUDA ({_size_note(size)})')
    iters, warmup = (3, 1) if quick else (100, 20)
    rows = []
    for name, size, dtype in plan:
        rows += _rows(name, size, dtype, dev, iters, warmup)
    return rows
