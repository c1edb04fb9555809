"""Compute Sparse4D's instance-bank anchors from a training info file.

    python tools/sparse4d_anchors.py data/nuscenes_synth/nuscenes_infos_train.pkl \\
        --out data/nuscenes_synth/kmeans900.npy [--num 900 --radius 55 --seed 0]

k-means over the centres of the training boxes within ``--radius`` metres; see
``turbox_mm/models/sparse4d/anchors.py`` for the recipe.
"""
import argparse
import os.path as osp
import sys

import numpy as np

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description='Sparse4D anchors by k-means')
    parser.add_argument('infos', help='mmdet3d v2 training info file (.pkl)')
    parser.add_argument('--out', required=True, help='the .npy file to write')
    parser.add_argument('--num', type=int, default=900, help='number of anchors')
    parser.add_argument('--radius', type=float, default=55.0,
                        help='boxes farther than this (m, 3-D) are left out')
    parser.add_argument('--seed', type=int, default=0, help='k-means seed')
    args = parser.parse_args(argv)
    if not osp.isfile(args.infos):
        raise SystemExit(f'info file not found: {args.infos}')
    from turbox_mm.models.sparse4d.anchors import gather_boxes, kmeans_anchors
    from turbox_mm.utils.atomic_files import atomic_write
    boxes = gather_boxes(args.infos)
    anchors = kmeans_anchors(boxes, args.num, args.radius, args.seed)
    out = args.out if args.out.endswith('.npy') else f'{args.out}.npy'  # np.save's naming
    atomic_write(out, lambda f: np.save(f, anchors))
    print(f'{len(boxes)} boxes, {args.num} anchors -> {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
