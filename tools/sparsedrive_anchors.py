"""Compute SparseDrive's k-means anchors from a training info file.

    python tools/sparsedrive_anchors.py det    data/nuscenes/nuscenes_infos_train.pkl
    python tools/sparsedrive_anchors.py map    data/nuscenes/nuscenes_infos_train.pkl
    python tools/sparsedrive_anchors.py motion data/nuscenes/nuscenes_infos_train.pkl
    python tools/sparsedrive_anchors.py plan   data/nuscenes/nuscenes_infos_train.pkl \\
        [--out data/kmeans/kmeans_plan_6.npy --num 6 --seed 0 --n-init 10 --short error]

Writes ``[900, 11]`` (det), ``[100, 20, 2]`` (map), ``[10, 6, 12, 2]`` (motion) or
``[3, 6, 6, 2]`` (plan) float32 anchors to ``--out`` (default upstream's
``data/kmeans/kmeans_<task>_<num>.npy``) atomically (a temporary file, then a rename), and
prints the path written. The recipes, and where they differ from upstream's
``tools/kmeans/*.py`` (seeded k-means, named errors for classes or commands with too few
samples), are in ``turbox_mm/models/sparsedrive/anchors.py``.
"""
import argparse
import os.path as osp
import sys

import numpy as np

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DEFAULT_NUM = dict(det=900, map=100, motion=6, plan=6)  # as anchors.DEFAULT_NUM
HELP = dict(det='detection anchors [K, 11] from box centres',
            map='map anchors [K, 20, 2] from polyline mean vertices',
            motion='motion anchors [10, K, 12, 2] per class (agent frame)',
            plan='planning anchors [3, K, 6, 2] per driving command')


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="SparseDrive's k-means anchors")
    tasks = parser.add_subparsers(dest='task', required=True, metavar='TASK')
    for task, text in HELP.items():
        sub = tasks.add_parser(task, help=text, description=text)
        sub.add_argument('infos', help='training info file (.pkl, mmdet3d v2 format)')
        sub.add_argument('--out', help='the .npy file to write (".npy" is appended when '
                         f'missing); default data/kmeans/kmeans_{task}_<num>.npy')
        sub.add_argument('--num', type=int, default=DEFAULT_NUM[task],
                         help=f'clusters (default {DEFAULT_NUM[task]}, upstream)')
        sub.add_argument('--seed', type=int, default=0,
                         help='k-means seed (default 0; upstream is unseeded)')
        sub.add_argument('--n-init', type=int, default=10,
                         help='k-means restarts (default 10, scikit-learn 1.3 as upstream)')
        if task in ('det', 'motion'):
            sub.add_argument('--radius', type=float, default=55.0,
                             help='keep boxes closer than this (m, BEV; default 55)')
        if task in ('motion', 'plan'):
            choices = ['error', 'pool', 'skip'] if task == 'motion' else ['error', 'pool']
            sub.add_argument('--short', choices=choices, default='error',
                             help='a class / command with fewer than --num samples: error '
                                  '(default), pool (cluster it from all samples)' +
                                  (', skip (upstream: drop it, later classes move up)'
                                   if task == 'motion' else ''))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not osp.isfile(args.infos):
        raise SystemExit(f'info file not found: {args.infos}')
    if args.num < 1:
        raise SystemExit(f'--num must be positive, got {args.num}')
    from turbox_mm.models.sparsedrive.anchors import TooFewSamplesError, anchors_for
    from turbox_mm.utils.atomic_files import atomic_write
    out = args.out or osp.join('data', 'kmeans', f'kmeans_{args.task}_{args.num}.npy')
    if not out.endswith('.npy'):
        out = f'{out}.npy'  # what np.save would name it
    try:
        anchors, samples = anchors_for(args.task, args.infos, args.num, args.seed, args.n_init,
                                       getattr(args, 'radius', 55.0),
                                       getattr(args, 'short', 'error'))
    except (TooFewSamplesError, KeyError, ValueError) as exc:
        raise SystemExit(f'{args.task}: {exc}') from exc
    atomic_write(out, lambda f: np.save(f, anchors))
    print(f'{args.task}: {samples} samples -> anchors {list(anchors.shape)} {anchors.dtype}')
    print(osp.abspath(out))
    return 0


if __name__ == '__main__':
    sys.exit(main())
