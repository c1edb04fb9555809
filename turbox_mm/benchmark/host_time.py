"""Where a host-bound step's CPU time goes, by kind, from a torch profile.

A step whose GPU idles waits on its host. The profiler's operator table says which operators
cost most; this says which *kind* of work the host spent the step on, which is what decides
the next move: time inside compiled regions (fewer, larger regions help; CUDA graphs remove
their launches), Dynamo's guards, eager operators between them (compile them or remove them),
the autograd engine's eager nodes, turbox_mm's own ops, the optimizer, and the time no
recorded operation covers (Python between operations, waits).

Only top-level CPU events count (an operation's children are part of it), on every thread: on
CUDA the backward runs on the autograd engine's device thread while the main thread waits in
``backward()``, so the uncovered time is the profiled span less the union of every thread's
top-level events.
"""
from typing import Callable, Iterable, List, Tuple

#: The kinds, in the order a top-level event's name is matched against them (first wins).
KINDS: Tuple[Tuple[str, Callable[[str], bool]], ...] = (
    ('compiled regions (forward)', lambda n: n.startswith('Torch-Compiled Region')),
    ('Dynamo guards (cache lookup)', lambda n: n == 'TorchDynamo Cache Lookup'),
    ('compiled backward',
     lambda n: n.startswith('autograd::engine::evaluate_function: CompiledFunctionBackward')),
    ('eager backward nodes', lambda n: n.startswith('autograd::engine::evaluate_function:')),
    ('optimizer', lambda n: n.startswith('Optimizer.')),
    ('data loader', lambda n: n.startswith('enumerate(DataLoader)')),
    ('turbox_mm ops', lambda n: n.startswith('turbox_mm::')),
    ('eager operators', lambda n: '::' in n),
    ('CUDA runtime calls', lambda n: n.startswith('cu')),
    ('other recorded ranges', lambda n: True),
)

#: The name of the time that no top-level event covers.
UNCOVERED = 'not in any recorded operation (Python, waits)'


def _kind(name: str) -> str:
    return next(kind for kind, match in KINDS if match(name))


def _union_length(intervals: List[Tuple[float, float]]) -> float:
    """Total length of the union of ``(start, end)`` intervals.

    Examples:
        >>> _union_length([(0, 2), (1, 3), (5, 6)])
        4
    """
    total, cur_start, cur_end = 0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def host_breakdown(events: Iterable, iters: int) -> List[Tuple[str, float, float]]:
    """CPU milliseconds and calls per iteration of each kind of top-level event.

    Args:
        events: The profiler's events (``profiler.events()``: objects with ``name``,
            ``cpu_parent``, ``device_type`` and ``time_range`` in microseconds).
        iters (int): Iterations the profile covers (the per-iteration divisor).

    Returns:
        list[tuple]: ``(kind, ms per iteration, calls per iteration)`` for the kinds present,
        largest first, then :data:`UNCOVERED` (no calls) and ``'profiled span'``, the wall
        time from the first top-level event's start to the last one's end.
    """
    iters = max(int(iters), 1)
    spans, totals, calls = [], {}, {}
    for event in events:
        if getattr(event, 'cpu_parent', None) is not None:
            continue
        device = str(getattr(event, 'device_type', 'CPU'))
        if not device.endswith('CPU'):
            continue
        start, end = float(event.time_range.start), float(event.time_range.end)
        spans.append((start, end))
        kind = _kind(event.name)
        totals[kind] = totals.get(kind, 0.0) + (end - start)
        calls[kind] = calls.get(kind, 0) + 1
    if not spans:
        return []
    rows = sorted(((k, totals[k] / 1e3 / iters, calls[k] / iters) for k in totals),
                  key=lambda row: -row[1])
    span = max(e for _, e in spans) - min(s for s, _ in spans)
    rows.append((UNCOVERED, max(0.0, span - _union_length(spans)) / 1e3 / iters, 0.0))
    rows.append(('profiled span', span / 1e3 / iters, 0.0))
    return rows


def format_host_breakdown(rows: List[Tuple[str, float, float]]) -> str:
    """:func:`host_breakdown` as a text table (threads overlap: the kinds may add up to more
    than the span)."""
    if not rows:
        return 'host time by kind: no CPU events recorded\n'
    width = max(len(kind) for kind, _, _ in rows)
    lines = ['host time by kind, per iteration (top-level events of every thread; the '
             "backward's thread overlaps the main thread's wait)",
             f"{'kind'.ljust(width)} | ms/iter | calls/iter"]
    for kind, ms, count in rows:
        calls = f'{count:.0f}' if count else '-'
        lines.append(f'{kind.ljust(width)} | {ms:7.2f} | {calls}')
    return '\n'.join(lines) + '\n'
