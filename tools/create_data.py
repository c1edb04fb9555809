"""Create the data the configs read: a synthetic nuScenes, or info files for real nuScenes.

Examples:
    # A synthetic dataset in nuScenes' format (no download; minutes on a laptop):
    python tools/create_data.py synthetic --out data/nuscenes_synth --scenes 10 --frames 40 \\
        --seed 0 --workers 2
    python tools/create_data.py synthetic --out data/tiny --scenes 2 --frames 3 \\
        --image-size 800x450 --points 8000 --sweeps 2
    # It also writes the GT database (nuscenes_gt_database/, nuscenes_dbinfos_train.pkl) that
    # ObjectSample reads; --no-gt-database skips it.

    # Real nuScenes: print (or --run) mmdet3d's own converter for data/nuscenes:
    python tools/create_data.py nuscenes --root-path data/nuscenes
    python tools/create_data.py nuscenes --root-path data/nuscenes --version v1.0-mini --run

See docs/data.md for what is generated and how the configs find it.
"""
import argparse
import os
import os.path as osp
import shlex
import subprocess
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Create datasets and info files')
    sub = parser.add_subparsers(dest='dataset', required=True)

    syn = sub.add_parser('synthetic', help='generate a synthetic dataset in nuScenes format')
    syn.add_argument('--out', default='data/nuscenes_synth', help='data root to write')
    syn.add_argument('--scenes', type=int, default=10, help='number of scenes')
    syn.add_argument('--frames', type=int, default=40, help='keyframes (2 Hz) per scene')
    syn.add_argument('--seed', type=int, default=0, help='seed (same seed: same bytes)')
    syn.add_argument('--workers', type=int, default=0,
                     help='worker processes (0: one per CPU, 1: no pool)')
    syn.add_argument('--image-size', default='1600x900', type=_size,
                     help='WIDTHxHEIGHT of the camera images')
    syn.add_argument('--points', type=int, default=34000, help='lidar returns per sweep')
    syn.add_argument('--sweeps', type=int, default=10,
                     help='previous sweeps listed per sample (0: write no sweep files)')
    syn.add_argument('--version', default='v1.0-trainval',
                     choices=['v1.0-trainval', 'v1.0-mini'], help='nuScenes version to mimic')
    syn.add_argument('--val-scenes', type=int, default=None,
                     help='scenes in the val split (default: a fifth)')
    syn.add_argument('--jpeg-quality', type=int, default=90, help='JPEG quality')
    syn.add_argument('--no-gt-database', dest='gt_database', action='store_false',
                     help="skip the ground-truth database that mmdet3d's ObjectSample reads "
                          '(nuscenes_gt_database/ and nuscenes_dbinfos_train.pkl, written by '
                          "default from the train split's lidar, as mmdet3d's converter does)")
    syn.add_argument('--no-progress', action='store_true', help='no progress bar')

    nus = sub.add_parser('nuscenes', help="real nuScenes: mmdet3d's converter")
    nus.add_argument('--root-path', default='data/nuscenes', help='nuScenes data root')
    nus.add_argument('--version', default='v1.0', choices=['v1.0', 'v1.0-mini'],
                     help="'v1.0' converts trainval and test, 'v1.0-mini' the mini split")
    nus.add_argument('--max-sweeps', type=int, default=10, help='sweeps listed per sample')
    nus.add_argument('--extra-tag', default='nuscenes', help='info file prefix')
    nus.add_argument('--run', action='store_true', help='run the command instead of printing')

    chk = sub.add_parser('check', help="check info files (mmdet3d v2 format and the fields "
                                       "mmdet3d's nuScenes dataset reads) before reusing them")
    chk.add_argument('infos', nargs='+', help='.pkl info files')
    return parser.parse_args(argv)


def check(args) -> int:
    """Exit status 2 with the named problem if an info file fails the check, else 0."""
    from turbox_mm.datasets.synthetic import InfoFileError, check_infos
    for path in args.infos:
        try:
            check_infos(path)
        except (InfoFileError, OSError) as error:
            print(f'create_data.py check: {error}\n{path} cannot be reused; delete its folder '
                  'to regenerate it', file=sys.stderr)
            return 2
    return 0


def _size(text: str):
    try:
        width, height = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected WIDTHxHEIGHT, e.g. 1600x900, got {text!r}')
    return width, height


def synthetic(args) -> int:
    from turbox_mm.datasets.synthetic import format_summary, generate

    summary = generate(args.out, scenes=args.scenes, frames=args.frames, seed=args.seed,
                       workers=args.workers, image_size=args.image_size, points=args.points,
                       sweeps=args.sweeps, version=args.version, val_scenes=args.val_scenes,
                       jpeg_quality=args.jpeg_quality, gt_database=args.gt_database,
                       progress=not args.no_progress)
    print(format_summary(summary))
    return 0


def nuscenes_command(args) -> tuple:
    """mmdet3d's converter command for a nuScenes root, and the folder to run it in.

    mmdet3d 1.4 ships its tools inside the package (``mmdet3d/.mim/tools``); they import
    ``tools.dataset_converters``, so their parent goes on PYTHONPATH. Its v2 update step opens
    the tables at ``./data/nuscenes``, so it runs from the folder that holds ``data/nuscenes``.
    """
    import mmdet3d

    mim = osp.join(osp.dirname(mmdet3d.__file__), '.mim')
    root = osp.abspath(args.root_path)
    workdir = osp.dirname(osp.dirname(root))
    command = [sys.executable, osp.join(mim, 'tools', 'create_data.py'), 'nuscenes',
               '--root-path', root, '--out-dir', root, '--extra-tag', args.extra_tag,
               '--version', args.version, '--max-sweeps', str(args.max_sweeps)]
    return command, workdir, mim


def nuscenes(args) -> int:
    command, workdir, mim = nuscenes_command(args)
    root = osp.abspath(args.root_path)
    if osp.join(workdir, 'data', 'nuscenes') != root:
        print(f'note: mmdet3d\'s converter reads the tables from ./data/nuscenes; put (or link) '
              f'the dataset there, e.g. ln -s {root} <dir>/data/nuscenes, and run from <dir>.')
    line = f'cd {shlex.quote(workdir)} && PYTHONPATH={shlex.quote(mim)} ' + shlex.join(command)
    print(line)
    if not args.run:
        print('(add --run to run it; then point the configs\' data_root at the same folder, '
              'see docs/data.md)')
        return 0
    # mmdet3d's folder first; entries holding another ``tools`` package (this repository has
    # one) are dropped, since they would shadow mmdet3d's, which has no __init__.py. Other
    # entries stay: on some machines the OpenMMLab packages themselves live on PYTHONPATH.
    kept = [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep)
            if p and not osp.isfile(osp.join(p, 'tools', '__init__.py'))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([mim] + kept))
    return subprocess.call(command, cwd=workdir, env=env)


def main(argv=None) -> int:
    args = parse_args(argv)
    return {'synthetic': synthetic, 'nuscenes': nuscenes, 'check': check}[args.dataset](args)


if __name__ == '__main__':
    sys.exit(main())
