"""Host time per call of turbox_mm's custom ops: the Python and dispatcher path, no GPU work.

Each op is called through its public function on tiny inputs, on its kernel path. By default
the tensors are CPU tensors inside :func:`turbox_mm.ops.dispatch.kernel_on_cpu` and every
Triton launch (``kernel[grid](...)``, autotuned or not) is replaced by a stub that resolves
the grid and returns, so what is timed is everything the host does around the kernels:
``torch.library`` dispatch, autograd, input checks, dispatch, the launchers' arithmetic and
allocations. Not timed: Triton's own launch path (argument binding, the driver call), which
needs a GPU; ``--device cuda`` times the real thing there (kernels run, the host time per call
is still what is measured, as the queue never fills at these sizes).

Rows: ``fwd`` (under ``no_grad``) and ``fwd+bwd`` (floating inputs require gradients, the
output's first tensor is back-propagated) for the differentiable ops; median and 20-80% of
``--calls`` calls after ``--warmup``. ``hard_voxelize`` sizes its outputs from a kernel's
result (one host sync), so with the launches stubbed it is reported, not timed.

Usage::

    python tools/op_overhead.py                       # CPU, launches stubbed
    python tools/op_overhead.py --ops ms_deform_attn --profile   # and a cProfile of fwd+bwd
    python tools/op_overhead.py --device cuda         # on a GPU: real launches
"""
import argparse
import contextlib
import cProfile
import dataclasses
import io
import os
import pstats
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple
from unittest import mock

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: turbox_mm from this checkout
    sys.path.insert(0, ROOT)

from turbox_mm.ops import dispatch  # noqa: E402


@dataclasses.dataclass
class OpCase:
    """One op as the tool calls it.

    Args:
        name (str): The row's name.
        make (Callable): ``make(device) -> tuple`` of the call's arguments.
        call (Callable): The public function, called as ``call(*args)``.
        grad (tuple[int]): Positions of the arguments that require gradients in the
            ``fwd+bwd`` row; empty: no such row.
        skip (str, optional): Why the op is listed but not timed.
    """
    name: str
    make: Callable[[str], tuple]
    call: Callable[..., object]
    grad: Tuple[int, ...] = ()
    skip: Optional[str] = None


def _rand(*shape, device='cpu', seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


def _multi_scale(device, int_locations=False):
    """``value [1, 6, 2, 4]`` on one 2x3 level, 3 queries of 2 points: mmcv's layout."""
    value = _rand(1, 6, 2, 4, device=device)
    shapes = torch.tensor([[2, 3]], device=device)
    start = torch.tensor([0], device=device)
    loc = _rand(1, 3, 2, 1, 2, 2, device=device, seed=1)
    if int_locations:
        loc = (loc * 2).long()
    return value, shapes, start, loc, _rand(1, 3, 2, 1, 2, device=device, seed=2)


def _aggregation(device):
    """Two cameras of one 2x3 map, 4 channels in 2 groups, 3 anchors of 2 points."""
    feat = _rand(1, 12, 4, device=device)
    shapes = torch.tensor([[[2, 3]], [[2, 3]]], device=device)
    start = torch.tensor([[0], [6]], device=device)
    return (feat, shapes, start, _rand(1, 3, 2, 2, 2, device=device, seed=1),
            _rand(1, 3, 2, 2, 1, 2, device=device, seed=2))


def _bev_pool(device):
    """One camera of 2x2 pixels, 2 depth bins, 3 channels, into 2x2x1 cells."""
    return (_rand(1, 1, 2, 2, 2, device=device), _rand(1, 1, 3, 2, 2, device=device, seed=1),
            _rand(1, 1, 2, 2, 2, 3, device=device, seed=2) * 2, [0.0, 0.0, 0.0],
            [1.0, 1.0, 1.0], [2, 2, 1], True)


def _images(device):
    """Two uint8 images of 3 x 4 x 6."""
    return (_rand(2, 3, 4, 6, device=device) * 255).to(torch.uint8)


def _points(device):
    """8 points ``(x, y, z, intensity)`` in a 4 m cube."""
    return _rand(8, 4, device=device) * 4


def _boxes(device):
    """5 rotated boxes ``(x, y, w, h, angle)`` and their scores."""
    boxes = _rand(5, 5, device=device) * torch.tensor([10, 10, 2, 2, 3.0], device=device)
    return boxes, _rand(5, device=device, seed=1)


def op_cases() -> List[OpCase]:
    """Every turbox_mm custom op, in the order of the table."""
    from turbox_mm.ops import bev_nms as nms
    from turbox_mm.ops import (bev_pool, deformable_aggregation, dynamic_scatter,
                               geometric_kernel_attn, image_warp, lsap, ms_deform_attn,
                               photometric, sigmoid_focal, voxelize)
    voxel, pcr = [1.0, 1.0, 4.0], [0.0, 0.0, 0.0, 4.0, 4.0, 4.0]
    mean_std = (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0]))
    return [
        OpCase('ms_deform_attn', _multi_scale, ms_deform_attn.ms_deform_attn, (0, 3, 4)),
        OpCase('deformable_aggregation', _aggregation,
               deformable_aggregation.deformable_aggregation, (0, 3, 4)),
        OpCase('geometric_kernel_attn', lambda d: _multi_scale(d, int_locations=True),
               geometric_kernel_attn.geometric_kernel_attn, (0, 4)),
        OpCase('bev_pool', _bev_pool, bev_pool.bev_pool, (0, 1)),
        OpCase('sigmoid_focal',
               lambda d: (_rand(6, 3, device=d), torch.tensor([0, 1, 2, 3, 1, 0], device=d)),
               sigmoid_focal.sigmoid_focal, (0, )),
        OpCase('dynamic_scatter',
               lambda d: (_points(d), (_points(d)[:, :3] / 2).int(), 'mean'),
               dynamic_scatter.dynamic_scatter, (0, )),
        OpCase('dynamic_voxelize', lambda d: (_points(d), voxel, pcr),
               voxelize.dynamic_voxelize),
        OpCase('hard_voxelize', lambda d: (_points(d), voxel, pcr), voxelize.hard_voxelize,
               skip='sizes its outputs from a kernel result (host sync): not timed stubbed'),
        OpCase('bev_nms', lambda d: (*_boxes(d), 0.5, 'rotated'), nms.bev_nms),
        OpCase('bev_iou', lambda d: (_boxes(d)[0], _boxes(d)[0]), nms.box_iou_rotated),
        OpCase('lsap', lambda d: (_rand(2, 6, 4, device=d), torch.tensor([6, 3], device=d),
                                  torch.tensor([4, 4], device=d)),
               lsap.linear_sum_assignment),
        OpCase('warp_affine_u8',
               lambda d: (_images(d), _rand(2, image_warp.NUM_PARAMS, device=d), 1, (4, 6)),
               image_warp.warp_affine_u8),
        OpCase('photometric_normalize',
               lambda d: (_images(d), _rand(2, photometric.NUM_PARAMS, device=d),
                          *(t.to(d) for t in mean_std)),
               photometric.photometric_normalize),
    ]


def _no_launch(self, *args, grid, warmup, **kwargs):
    """Stands for ``JITFunction.run``: resolve the launch grid as Triton would, run nothing."""
    if callable(grid):
        grid(dict(zip(self.arg_names, args), **kwargs))


@contextlib.contextmanager
def stubbed_launches() -> Iterator[None]:
    """Within the block the ops take their kernel path on CPU tensors and every Triton launch
    (compiled or interpreted, autotuned or not) returns at once, running nothing."""
    import triton.runtime.jit
    classes = [triton.runtime.jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:  # an older Triton without the interpreter
        pass
    with contextlib.ExitStack() as stack:
        for cls in classes:
            stack.enter_context(mock.patch.object(cls, 'run', _no_launch))
        stack.enter_context(dispatch.kernel_on_cpu())
        yield


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _steps(case: OpCase, device: str) -> Dict[str, Callable[[], None]]:
    """The timed calls of ``case``: ``{'fwd': ..., 'fwd+bwd': ...}`` (the second only for
    differentiable ops), each one call of the op on its own inputs."""
    args = case.make(device)

    def forward():
        with torch.no_grad():
            case.call(*args)

    steps = {'fwd': forward}
    if case.grad:
        leaves = {i: args[i].detach().clone().requires_grad_() for i in case.grad}
        with_leaves = tuple(leaves.get(i, t) for i, t in enumerate(args))
        grad = torch.ones_like(_first(case.call(*with_leaves)))

        def forward_backward():
            for t in leaves.values():
                t.grad = None
            _first(case.call(*with_leaves)).backward(grad)

        steps['fwd+bwd'] = forward_backward
    return steps


def _time(step: Callable[[], None], calls: int, warmup: int, device: str) -> List[float]:
    """Host microseconds of each of ``calls`` calls of ``step`` after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    if device == 'cuda':
        torch.cuda.synchronize()
    times = []
    clock = time.perf_counter_ns
    for _ in range(calls):
        start = clock()
        step()
        times.append((clock() - start) / 1e3)
    if device == 'cuda':
        torch.cuda.synchronize()
    return times


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(calls: int = 2000, warmup: int = 200, ops: Optional[Sequence[str]] = None,
            device: str = 'cpu') -> List[Dict]:
    """Host time per call of each op (see the module docstring).

    Args:
        calls (int): Timed calls per row. Defaults to 2000.
        warmup (int): Untimed calls before them. Defaults to 200.
        ops (Sequence[str], optional): Only these ops (names of :func:`op_cases`).
        device (str): 'cpu' (launches stubbed) or 'cuda' (real kernels). Defaults to 'cpu'.

    Returns:
        list[dict]: Rows of ``op``, ``path`` ('fwd', 'fwd+bwd' or 'skipped'), ``us``
        (median), ``p20``, ``p80`` (None when skipped) and ``note``.

    Examples:
        >>> rows = measure(calls=3, warmup=1, ops=['ms_deform_attn'])
        >>> [(r['op'], r['path']) for r in rows]
        [('ms_deform_attn', 'fwd'), ('ms_deform_attn', 'fwd+bwd')]
    """
    cases = [c for c in op_cases() if ops is None or c.name in ops]
    unknown = set(ops or ()) - {c.name for c in cases}
    if unknown:
        raise ValueError(f'op_overhead: unknown ops {sorted(unknown)}')
    rows = []
    ctx = stubbed_launches() if device == 'cpu' else contextlib.nullcontext()
    with ctx, warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for case in cases:
            if case.skip and device == 'cpu':
                rows.append(dict(op=case.name, path='skipped', us=None, p20=None, p80=None,
                                 note=case.skip))
                continue
            for path, step in _steps(case, device).items():
                times = _time(step, calls, warmup, device)
                rows.append(dict(op=case.name, path=path, us=statistics.median(times),
                                 p20=_quantile(times, 0.2), p80=_quantile(times, 0.8),
                                 note=''))
    return rows


def format_table(rows: Sequence[Dict]) -> str:
    """The rows as a markdown table: op, path, µs/call (p20-p80)."""
    lines = ['| op | path | us/call (p20-p80) |', '| --- | --- | --- |']
    for r in rows:
        value = r['note'] if r['us'] is None else \
            f"{r['us']:.1f} ({r['p20']:.1f}-{r['p80']:.1f})"
        lines.append(f"| {r['op']} | {r['path']} | {value} |")
    return '\n'.join(lines)


def profile(name: str, calls: int, device: str, top: int = 30) -> str:
    """cProfile of ``calls`` fwd+bwd (or fwd) calls of op ``name``: the ``top`` functions by
    internal time."""
    case = next(c for c in op_cases() if c.name == name)
    ctx = stubbed_launches() if device == 'cpu' else contextlib.nullcontext()
    with ctx, warnings.catch_warnings():
        warnings.simplefilter('ignore')
        steps = _steps(case, device)
        step = steps.get('fwd+bwd', steps['fwd'])
        _time(step, 0, 50, device)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            step()
        prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats('tottime').print_stats(top)
    return out.getvalue()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: print the table (and a profile with ``--profile``); 0 on success."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--ops', nargs='+', help='only these ops (default: all)')
    parser.add_argument('--calls', type=int, default=2000, help='timed calls per row')
    parser.add_argument('--warmup', type=int, default=200, help='untimed calls first')
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu',
                        help='cpu: launches stubbed; cuda: real kernels on the GPU')
    parser.add_argument('--profile', action='store_true',
                        help='also print a cProfile of each op (fwd+bwd where it has one)')
    args = parser.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda needs a CUDA device')
    rows = measure(args.calls, args.warmup, args.ops, args.device)
    print(f'torch {torch.__version__}, {args.device}, '
          f"{'launches stubbed' if args.device == 'cpu' else 'real launches'}, "
          f'median of {args.calls} calls after {args.warmup}')
    print(format_table(rows))
    if args.profile:
        for r in rows:
            if r['us'] is not None and r['path'] == 'fwd':
                print(f"\n## {r['op']}\n" + profile(r['op'], args.calls, args.device))
    return 0


if __name__ == '__main__':
    sys.exit(main())
