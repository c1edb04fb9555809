"""Evaluate a checkpoint on a config's test set, with mmdet3d's command-line conventions.

Examples:
    python tools/test.py configs/smoke/smoke_turbox.py work_dirs/smoke/epoch_4.pth
    torchrun --nproc-per-node 8 tools/test.py CONFIG CHECKPOINT --launcher pytorch
"""
import argparse
import os.path as osp

import turbox_mm  # noqa: F401  (registers components, applies compatibility fixes)
from turbox_mm.engine.runner import build_runner
from turbox_mm.utils.pretrained import explain_pretrained_errors

try:  # importable both as tools.test and as a script
    from tools.train import load_cfg, parse_common_args, restart_for_huge_pages
except ImportError:  # pragma: no cover - run as `python tools/test.py`
    from train import load_cfg, parse_common_args, restart_for_huge_pages


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test (and evaluate) a model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the directory to save the evaluation metrics')
    return parse_common_args(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    if not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {args.checkpoint}')
    cfg = load_cfg(args)
    cfg.load_from = args.checkpoint
    cfg.resume = False
    if argv is None:  # a command line to restart
        restart_for_huge_pages(cfg)
    # models that initialise in their constructor load Pretrained weights while the runner
    # is built: a missing one is explained as in tools/train.py
    with explain_pretrained_errors(cfg):
        runner = build_runner(cfg)
        return runner.test()


if __name__ == '__main__':
    main()
