"""Print the machine settings that matter to training, with a suggestion for each bad one.

Examples:
    python tools/sysinfo.py
    python tools/sysinfo.py --workers 8      # judge /dev/shm for 8 loader workers per GPU
    python tools/sysinfo.py --json > sysinfo.json
"""
import argparse
import json
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--workers', type=int, default=8,
                        help='loader workers per process, for the /dev/shm check (default 8)')
    parser.add_argument('--json', action='store_true', help='print JSON instead of text')
    args = parser.parse_args(argv)
    if args.workers < 0:
        parser.error(f'--workers must be >= 0, got {args.workers}')
    from turbox_mm.utils.sysinfo import assess, collect, format_report, to_json
    info = collect()
    rows = assess(info, num_workers=args.workers)
    if args.json:
        print(json.dumps(to_json(rows, info), indent=2, default=str))
    else:
        print(format_report(rows))
    return 0


if __name__ == '__main__':
    sys.exit(main())
