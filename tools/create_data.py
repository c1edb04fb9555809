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
    # ... and add the instance ids (Sparse4D's temporal denoising and tracking need them),
    # with the converter (--instance-ids) or later, to existing v2 infos:
    python tools/create_data.py nuscenes --root-path data/nuscenes --run --instance-ids
    python tools/create_data.py instance-ids data/nuscenes/nuscenes_infos_train.pkl \\
        data/nuscenes/nuscenes_infos_val.pkl --root-path data/nuscenes
    # ... and MapTR's scene_token, map_location and can_bus (from the CAN bus expansion,
    # data/nuscenes/can_bus or data/can_bus), with the converter (--map-fields) or later:
    python tools/create_data.py nuscenes --root-path data/nuscenes --run --map-fields
    python tools/create_data.py map-fields data/nuscenes/nuscenes_infos_train.pkl \\
        data/nuscenes/nuscenes_infos_val.pkl --root-path data/nuscenes
    # ... and SparseDrive's planning fields (agent and ego futures, driving command, and
    # ego_status from the CAN bus expansion; scenes without CAN data are an error unless
    # --allow-missing-can-bus writes upstream's zeros):
    python tools/create_data.py planning data/nuscenes/nuscenes_infos_train.pkl \\
        data/nuscenes/nuscenes_infos_val.pkl --root-path data/nuscenes --can-bus data
    # ... and SparseDrive's map_annos (StreamMapNet's extractor, as upstream's converter; after
    # map-fields, which adds map_location):
    python tools/create_data.py sparsedrive-map data/nuscenes/nuscenes_infos_train.pkl \\
        data/nuscenes/nuscenes_infos_val.pkl --data-root data/nuscenes --workers 8
    # ... and MapTR's map ground truth, precomputed (upstream's v2 reads it from its infos):
    # every sample cut once with the reference vectoriser, stored as map_annotation (also
    # after `synthetic`, whose infos do not carry it):
    python tools/create_data.py map-gt data/nuscenes/nuscenes_infos_train.pkl \\
        data/nuscenes/nuscenes_infos_val.pkl --data-root data/nuscenes --workers 8

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


def _table_step(sub, name: str, help_text: str, tables: str):
    """A sub-command that rewrites v2 info files from the nuScenes tables: its ``infos``,
    ``--root-path`` and ``--version`` arguments (the caller adds ``--force`` and the rest)."""
    step = sub.add_parser(name, help=help_text)
    step.add_argument('infos', nargs='+', help='.pkl v2 info files (rewritten in place)')
    step.add_argument('--root-path', default='data/nuscenes',
                      help=f'nuScenes data root, holding <version>/{tables}')
    step.add_argument('--version', default=None,
                      help="the tables' version, v1.0-trainval, v1.0-test or v1.0-mini "
                           "(default: the infos' metainfo.version)")
    return step


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
    nus.add_argument('--instance-ids', action='store_true',
                     help='then add instances[k].instance_id to the train and val infos (the '
                          'instance-ids step)')
    nus.add_argument('--map-fields', action='store_true',
                     help="then add MapTR's scene_token, map_location and can_bus to the train "
                          'and val infos (the map-fields step, with the CAN bus expansion at '
                          'its default place)')

    ids = _table_step(sub, 'instance-ids',
                      'add instances[k].instance_id (the row of the annotation\'s instance in '
                      'instance.json) to v2 info files, from the nuScenes tables',
                      'sample.json, sample_annotation.json and instance.json')
    ids.add_argument('--force', action='store_true',
                     help='overwrite ids that differ from the tables (else an error; equal '
                          'ids are kept, so running the step twice changes nothing)')

    maps = _table_step(sub, 'map-fields',
                       "add MapTR's scene_token, map_location (the scene's log location) and "
                       'can_bus (from the CAN bus expansion) to v2 info files, from the '
                       'nuScenes tables', 'sample.json, scene.json and log.json')
    maps.add_argument('--can-bus-root', default=None,
                      help='the folder holding can_bus/ (upstream\'s --canbus; default: '
                           '<root-path>/can_bus, then can_bus next to <root-path>); without '
                           'it can_bus is not written (a warning; the MapTR adaptor uses '
                           'zeros for the motion values)')
    maps.add_argument('--force', action='store_true',
                      help='overwrite values that differ from the tables (else an error; '
                           'equal values are kept, so running the step twice changes nothing)')

    plan = _table_step(sub, 'planning',
                       "add SparseDrive's planning fields (instances[k].fut_traj / fut_mask, "
                       'gt_ego_fut_trajs / _masks / _cmd, ego_status) to v2 info files, from '
                       'the nuScenes tables and the CAN bus expansion, as upstream\'s '
                       'converter computes them', 'sample.json, sample_data.json, '
                       'ego_pose.json, calibrated_sensor.json, sensor.json, '
                       'sample_annotation.json and scene.json')
    plan.add_argument('--can-bus', '--can-bus-root', dest='can_bus_root', default=None,
                      help="the folder holding can_bus/ (upstream's --canbus), or can_bus/ "
                           'itself (default: <root-path>/can_bus, then can_bus next to '
                           '<root-path>)')
    plan.add_argument('--allow-missing-can-bus', action='store_true',
                      help="write upstream's zeros as ego_status for scenes without CAN bus "
                           'data (named in the output) instead of failing')
    plan.add_argument('--force', action='store_true',
                      help='recompute and overwrite the fields samples already carry (else '
                           'they are kept, so running the step twice changes nothing)')
    plan.add_argument('--no-progress', action='store_true', help='no progress bar')

    mgt = sub.add_parser('map-gt',
                         help="store MapTR's map ground truth in v2 info files: every "
                              "sample's polylines cut with the reference vectoriser "
                              "(upstream's VectorizedLocalMap, LoadMapGT impl='reference') "
                              "as map_annotation, for LoadMapGT impl='precomputed'")
    mgt.add_argument('infos', nargs='+', help='.pkl v2 info files (rewritten in place)')
    mgt.add_argument('--data-root', '--root-path', dest='data_root', default='data/nuscenes',
                     help='nuScenes data root, holding maps/expansion/<location>.json')
    mgt.add_argument('--patch-size', type=float, nargs=2, default=[60.0, 30.0],
                     metavar=('PATCH_H', 'PATCH_W'),
                     help="LoadMapGT's patch_size: metres along the lidar's y, then x axis "
                          '(default: 60 30)')
    mgt.add_argument('--classes', nargs='+', default=['divider', 'ped_crossing', 'boundary'],
                     choices=['divider', 'ped_crossing', 'boundary', 'centerline'],
                     help="LoadMapGT's map_classes, in order (default: divider ped_crossing "
                          'boundary; MapTR v2 _w_centerline configs add centerline)')
    mgt.add_argument('--force', action='store_true',
                     help='cut and rewrite every sample (else samples that carry a '
                          'map_annotation for the same classes and patch size are kept, and '
                          'one for others is an error)')
    mgt.add_argument('--workers', type=int, default=0,
                     help='worker processes (0: one per CPU, 1: no pool)')
    mgt.add_argument('--no-progress', action='store_true', help='no progress bar')

    sdm = sub.add_parser('sparsedrive-map',
                         help="store SparseDrive's map_annos in v2 info files: each sample's "
                              "ped crossings, dividers and boundaries around the lidar "
                              "(upstream's NuscMapExtractor, StreamMapNet's procedure), keyed "
                              '0, 1, 2')
    sdm.add_argument('infos', nargs='+', help='.pkl v2 info files (rewritten in place)')
    sdm.add_argument('--data-root', '--root-path', dest='data_root', default='data/nuscenes',
                     help='nuScenes data root, holding maps/expansion/<location>.json')
    sdm.add_argument('--roi-size', type=float, nargs=2, default=[30.0, 60.0],
                     metavar=('X', 'Y'),
                     help='the patch in metres along the lidar x, then y axis (default: 30 60)')
    sdm.add_argument('--force', action='store_true',
                     help='recompute every sample (else samples that carry map_annos in this '
                          "format are kept, and any other map_annos, e.g. the synthetic "
                          "generator's, is an error)")
    sdm.add_argument('--workers', type=int, default=1,
                     help='worker processes (1: no pool)')
    sdm.add_argument('--no-progress', action='store_true', help='no progress bar')

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


def instance_ids(args) -> int:
    """Exit status 2 with the named problem if ids cannot be added, else 0."""
    from turbox_mm.datasets.nuscenes_instance_ids import (InstanceIdError, add_instance_ids,
                                                          format_results)
    from turbox_mm.datasets.synthetic import InfoFileError
    try:
        results = add_instance_ids(args.infos, args.root_path, args.version, args.force)
    except (InstanceIdError, InfoFileError, OSError) as error:
        print(f'create_data.py instance-ids: {error}', file=sys.stderr)
        return 2
    print(format_results(results))
    return 0


def map_fields(args) -> int:
    """Exit status 2 with the named problem if the fields cannot be added, else 0."""
    import warnings

    from turbox_mm.datasets.nuscenes_map_fields import add_map_fields, format_results
    from turbox_mm.datasets.nuscenes_tables import NuScenesTableError
    from turbox_mm.datasets.synthetic import InfoFileError
    try:
        with warnings.catch_warnings():
            # the missing CAN bus expansion is reported in the results' lines
            warnings.filterwarnings('ignore', message='no nuScenes CAN bus expansion')
            results = add_map_fields(args.infos, args.root_path, args.version, args.force,
                                     args.can_bus_root)
    except (NuScenesTableError, InfoFileError, OSError) as error:
        print(f'create_data.py map-fields: {error}', file=sys.stderr)
        return 2
    print(format_results(results))
    return 0


def planning(args) -> int:
    """Exit status 2 with the named problem if the fields cannot be added, else 0."""
    import warnings

    from turbox_mm.datasets.nuscenes_planning_fields import (add_planning_fields,
                                                             format_results)
    from turbox_mm.datasets.nuscenes_tables import NuScenesTableError
    from turbox_mm.datasets.synthetic import InfoFileError
    try:
        with warnings.catch_warnings():
            # the scenes given zeros are named in the results' lines
            warnings.filterwarnings('ignore', message='ego_status is zeros')
            results = add_planning_fields(
                args.infos, args.root_path, args.version, args.force, args.can_bus_root,
                args.allow_missing_can_bus, progress=not args.no_progress)
    except (NuScenesTableError, InfoFileError, OSError) as error:
        print(f'create_data.py planning: {error}', file=sys.stderr)
        return 2
    print(format_results(results))
    return 0


def map_gt(args) -> int:
    """Exit status 2 with the named problem if the map ground truth cannot be stored, else
    0."""
    from turbox_mm.datasets.map_gt import MapAnnotationError, MapExpansionError
    from turbox_mm.datasets.map_gt.precompute import format_results, precompute_map_gt
    from turbox_mm.datasets.synthetic import InfoFileError
    try:
        results = precompute_map_gt(args.infos, args.data_root, args.patch_size, args.classes,
                                    args.force, args.workers, progress=not args.no_progress)
    except (MapAnnotationError, MapExpansionError, InfoFileError, OSError) as error:
        print(f'create_data.py map-gt: {error}', file=sys.stderr)
        return 2
    print(format_results(results))
    return 0


def sparsedrive_map(args) -> int:
    """Exit status 2 with the named problem if the map_annos cannot be stored, else 0."""
    from turbox_mm.datasets.map_gt import MapAnnotationError, MapExpansionError
    from turbox_mm.datasets.map_gt.sparsedrive_annos_file import (add_sparsedrive_map_annos,
                                                                  format_results)
    from turbox_mm.datasets.synthetic import InfoFileError
    try:
        results = add_sparsedrive_map_annos(args.infos, args.data_root, force=args.force,
                                            workers=args.workers,
                                            progress=not args.no_progress,
                                            roi_size=tuple(args.roi_size))
    except (MapAnnotationError, MapExpansionError, InfoFileError, KeyError, ValueError,
            OSError) as error:
        print(f'create_data.py sparsedrive-map: {error}', file=sys.stderr)
        return 2
    print(format_results(results))
    return 0


def _converted_infos(args) -> list:
    """The train and val info files mmdet3d's converter writes (its test infos carry no
    instances)."""
    root = osp.abspath(args.root_path)
    return [osp.join(root, f'{args.extra_tag}_infos_{split}.pkl') for split in ('train', 'val')]


def nuscenes(args) -> int:
    command, workdir, mim = nuscenes_command(args)
    root = osp.abspath(args.root_path)
    if osp.join(workdir, 'data', 'nuscenes') != root:
        print(f'note: mmdet3d\'s converter reads the tables from ./data/nuscenes; put (or link) '
              f'the dataset there, e.g. ln -s {root} <dir>/data/nuscenes, and run from <dir>.')
    line = f'cd {shlex.quote(workdir)} && PYTHONPATH={shlex.quote(mim)} ' + shlex.join(command)
    print(line)
    ids_line = shlex.join([sys.executable, osp.abspath(__file__), 'instance-ids',
                           *_converted_infos(args), '--root-path', root])
    if args.instance_ids:
        print(ids_line)
    if args.map_fields:
        print(shlex.join([sys.executable, osp.abspath(__file__), 'map-fields',
                          *_converted_infos(args), '--root-path', root]))
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
    status = subprocess.call(command, cwd=workdir, env=env)
    if status == 0 and args.instance_ids:
        status = instance_ids(argparse.Namespace(infos=_converted_infos(args), root_path=root,
                                                 version=None, force=False))
    if status == 0 and args.map_fields:
        status = map_fields(argparse.Namespace(infos=_converted_infos(args), root_path=root,
                                               version=None, force=False, can_bus_root=None))
    return status


def main(argv=None) -> int:
    args = parse_args(argv)
    return {'synthetic': synthetic, 'nuscenes': nuscenes, 'check': check,
            'instance-ids': instance_ids, 'map-fields': map_fields,
            'planning': planning, 'map-gt': map_gt,
            'sparsedrive-map': sparsedrive_map}[args.dataset](args)


if __name__ == '__main__':
    sys.exit(main())
