"""Count the operations one training step of a config dispatches, by the Python line.

Host-bound steps (GPU busy well under 100%) are made of many small operations, each costing
the host a roughly fixed time in eager PyTorch. This counts them without a GPU: the config's
model and optimizer wrapper are built, run a few steps on the config's first training batch,
and the last step's operations are counted per phase (forward, backward, optimizer), with the
busiest source lines (backward operations by the forward line that recorded them). On the CPU
turbox_mm's ops and losses take their CUDA route. A ``turbox`` section is applied as
TurboxRunner applies it, without ``torch.compile`` (compiled graphs are not dispatched
eagerly). See :mod:`turbox_mm.benchmark.op_count` for what is and is not counted.

Usage::

    NUSCENES_ROOT=data/nuscenes_tiny/ python tools/step_ops.py \\
        configs/sparse4d/sparse4dv3_tiny_stock.py configs/sparse4d/sparse4dv3_tiny_turbox.py \\
        --cfg-options model.head.num_decoder=6 --top 20 --out step_ops.json
"""
import argparse
import json
import os
import os.path as osp
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: turbox_mm from this checkout
    sys.path.insert(0, ROOT)


def parse_args(argv=None):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('configs', nargs='+', help='training configs')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help='overrides applied to every config, key=value')
    parser.add_argument('--steps', type=int, default=2,
                        help='steps to run; the last is counted (default 2)')
    parser.add_argument('--top', type=int, default=15, help='busiest lines shown per phase')
    parser.add_argument('--no-backward-sources', action='store_true',
                        help='attribute backward operations to the backward call (faster)')
    parser.add_argument('--outside-compiled', action='store_true',
                        help='count apart the operations of the modules the turbox section '
                             'compiles: the rest is what a compiled step still dispatches '
                             'eagerly')
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    parser.add_argument('--out', help='also write the counts as JSON here')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from mmengine.config import Config

    import turbox_mm  # noqa: F401  (registers everything)
    from turbox_mm.benchmark.op_count import count_step_ops, format_counts
    from turbox_mm.utils.atomic_files import atomic_write_text
    if args.device == 'cuda' and not torch.cuda.is_available():
        print('step_ops: --device cuda, but CUDA is not available', file=sys.stderr)
        return 2
    results = {}
    for path in args.configs:
        cfg = Config.fromfile(path)
        cfg.merge_from_dict(args.cfg_options)
        counters = count_step_ops(cfg, steps=args.steps, device=args.device,
                                  backward_sources=not args.no_backward_sources,
                                  outside_compiled=args.outside_compiled)
        print(f'== {path}' + (f' with {args.cfg_options}' if args.cfg_options else ''))
        print(format_counts(counters, top=args.top, root=ROOT))
        print()
        results[path] = {name: dict(operations=c.total, free=c.free, compiled=c.compiled,
                                    ops=dict(c.ops),
                                    lines=[dict(file=f, line=line, backward=bwd, count=n)
                                           for f, line, bwd, n in c.top(args.top)])
                         for name, c in counters.items()}
    if len(args.configs) > 1:
        first = sum(p['operations'] for p in results[args.configs[0]].values())
        for path in args.configs[1:]:
            total = sum(p['operations'] for p in results[path].values())
            print(f'{osp.basename(path)}: {total} operations a step, '
                  f'{total / max(first, 1):.2f}x of {osp.basename(args.configs[0])} ({first})')
    if args.out:
        os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
        atomic_write_text(args.out, json.dumps(dict(device=args.device, steps=args.steps,
                                                    cfg_options=args.cfg_options,
                                                    results=results), indent=1))
        print(f'counts: {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
