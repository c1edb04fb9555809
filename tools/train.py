"""Train a model from a config, with mmdet3d's command-line conventions.

Examples:
    python tools/train.py configs/smoke/smoke_turbox.py --work-dir work_dirs/smoke
    python tools/train.py CONFIG --amp --cfg-options train_cfg.max_epochs=2
    python tools/train.py CONFIG --resume                 # latest checkpoint in the work dir
    python tools/train.py CONFIG --resume path/to/epoch_3.pth
    torchrun --nproc-per-node 8 tools/train.py CONFIG --launcher pytorch
"""
import argparse
import logging
import os
import os.path as osp

from mmengine.config import Config, DictAction
from mmengine.logging import print_log

import turbox_mm  # noqa: F401  (registers components, applies compatibility fixes)
from turbox_mm.engine.runner import build_runner
from turbox_mm.engine.runner.turbox_options import TURBOX_OPTIONS
from turbox_mm.utils.hugepages import reexec_for_huge_pages
from turbox_mm.utils.options import check_options
from turbox_mm.utils.pretrained import explain_pretrained_errors


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a detector with turbox_mm available')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--amp', action='store_true', help='enable automatic mixed precision (fp16) training')
    parser.add_argument(
        '--auto-scale-lr', action='store_true',
        help='scale the learning rate by the actual total batch size (auto_scale_lr in config)')
    parser.add_argument(
        '--sync_bn', choices=['none', 'torch', 'mmcv'], default='none',
        help='convert BatchNorm layers to SyncBatchNorm of this flavour')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from this checkpoint, or from the latest one in the work dir when no '
        'path is given')
    return parse_common_args(parser, argv)


def parse_common_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Add the options train and test share, parse, and export ``LOCAL_RANK``."""
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings of the config, as key=value pairs (xxx=yyy), nested keys '
        'dotted (a.b=1), lists as key="[a,b]" (quotes needed, no spaces)')
    parser.add_argument(
        '--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
        help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def load_cfg(args) -> Config:
    """Load ``args.config`` and apply the options train and test share.

    Those are ``--launcher``, ``--cfg-options`` and ``--work-dir`` (default:
    ``./work_dirs/<config name>``).
    """
    if not osp.isfile(args.config) and '::' not in args.config:
        raise FileNotFoundError(f'config file not found: {args.config}')
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    return cfg


def build_cfg(args) -> Config:
    """Load the config and apply the training command-line options to it."""
    cfg = load_cfg(args)

    if args.amp:
        wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
        if wrapper == 'AmpOptimWrapper':
            print_log('AMP is already enabled in the config.', logger='current',
                      level=logging.WARNING)
        else:
            if wrapper not in ('OptimWrapper', 'mmengine.OptimWrapper'):
                raise ValueError(f'--amp only replaces OptimWrapper, but optim_wrapper.type is '
                                 f'{wrapper!r}; set the precision in the config instead')
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.loss_scale = 'dynamic'

    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in cfg.auto_scale_lr:
            raise KeyError('--auto-scale-lr needs auto_scale_lr=dict(base_batch_size=...) in '
                           f'the config {args.config}')
        cfg.auto_scale_lr.enable = True

    if args.sync_bn != 'none':
        cfg.sync_bn = args.sync_bn

    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        if not osp.isfile(args.resume):
            raise FileNotFoundError(f'checkpoint to resume from not found: {args.resume}')
        cfg.resume = True
        cfg.load_from = args.resume
    return cfg


def restart_for_huge_pages(cfg: Config, argv=None) -> None:
    """Restart once with THP_MEM_ALLOC_ENABLE=1 where the config wants huge pages and
    torch has already latched the setting off (see turbox_mm.utils.hugepages)."""
    if str(cfg.get('runner_type', '')).split('.')[-1] != 'TurboxRunner':
        return
    options = check_options(cfg.get('turbox'), TURBOX_OPTIONS)
    reexec_for_huge_pages(options['system']['huge_pages'], argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = build_cfg(args)
    if argv is None:  # a command line to restart
        restart_for_huge_pages(cfg)
    # a pretrained checkpoint that is neither there nor downloadable gets a message naming its
    # config key and the --cfg-options way out, instead of urllib's network error
    with explain_pretrained_errors(cfg):
        runner = build_runner(cfg)
        runner.train()
    return runner


if __name__ == '__main__':
    main()
