"""Time the stock and the turbox map ground truth per sample, on a synthetic location.

``python -m turbox_mm.datasets.map_gt.benchmark --streets 60`` writes the streets of that many
synthetic scenes into one location's map expansion (a temporary folder; streets may cross,
as in a city) and times, on the keyframes of the first scenes, both implementations' cut
(``vector_map(location, lidar2global)``) and targets (fixed-num points, 'v2' orders, boxes),
after checking that they give the same instances. It prints the machine it ran on.

Examples:
    python -m turbox_mm.datasets.map_gt.benchmark --streets 2
    python -m turbox_mm.datasets.map_gt.benchmark --streets 60 --samples 200
    python -m turbox_mm.datasets.map_gt.benchmark --classes divider ped_crossing boundary \
        centerline
"""
import argparse
import platform
import tempfile
import time

import numpy as np


def _cpu() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


def run(streets: int, samples: int, seed: int = 11, classes=None) -> dict:
    """Build the location, check both paths agree on every sample, and time them.

    Returns:
        dict: Milliseconds per sample (``cut`` and ``targets`` of each implementation), the
        per-location preparation and devkit load in seconds, and instance counts.
    """
    from turbox_mm.datasets.synthetic.map_expansion import scene_map, write_map_expansion
    from turbox_mm.datasets.synthetic.scene import Scene
    from . import (MAP_CLASSES, FastVectorizedLocalMap, VectorizedLocalMapReference,
                   bboxes_reference, fixed_num_points_reference, map_targets,
                   shift_orders_v2_reference)
    classes = MAP_CLASSES if classes is None else tuple(classes)

    root = tempfile.mkdtemp(prefix='map_gt_benchmark_')
    scenes = [Scene(seed, i, 40, preroll_ticks=0, image_size=(64, 36)) for i in range(streets)]
    location = 'boston-seaport'
    write_map_expansion(root, [scene_map(s) for s in scenes], [location] * streets)
    poses = [s.ego2global(s.tick_time(10 * k)) @ s.lidar2ego for s in scenes
             for k in range(0, 40, 2)][:samples]
    reference = VectorizedLocalMapReference(root, map_classes=classes)
    fast = FastVectorizedLocalMap(root, map_classes=classes)
    started = time.perf_counter()
    fast.geometry(location)
    if 'centerline' in classes:
        fast.lanes(location)
    prepare = time.perf_counter() - started
    started = time.perf_counter()
    reference.explorer(location)
    load = time.perf_counter() - started
    times = dict(reference_cut=0.0, fast_cut=0.0, reference_targets=0.0, fast_targets=0.0)
    counts = np.zeros(4, np.int64)
    for pose in poses:
        t0 = time.perf_counter()
        lines, labels = reference(location, pose)
        t1 = time.perf_counter()
        fixed_num_points_reference(lines)
        shift_orders_v2_reference(lines, rng=np.random.RandomState(0), labels=labels)
        bboxes_reference(lines)
        t2 = time.perf_counter()
        fast_lines, fast_labels = fast(location, pose)
        t3 = time.perf_counter()
        map_targets(fast_lines, fast_labels, rng=np.random.RandomState(0))
        t4 = time.perf_counter()
        if labels.tolist() != fast_labels.tolist():
            raise AssertionError(f'the two paths disagree at pose\n{pose}')
        times['reference_cut'] += t1 - t0
        times['reference_targets'] += t2 - t1
        times['fast_cut'] += t3 - t2
        times['fast_targets'] += t4 - t3
        counts += np.bincount(labels, minlength=4)
    out = {k: 1e3 * v / len(poses) for k, v in times.items()}
    out.update(prepare_s=prepare, devkit_load_s=load, samples=len(poses),
               instances=counts.tolist(), classes=classes)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--streets', type=int, default=60, help='streets in the location')
    parser.add_argument('--samples', type=int, default=200, help='patches timed')
    parser.add_argument('--classes', nargs='+', default=None,
                        choices=['divider', 'ped_crossing', 'boundary', 'centerline'],
                        help='map classes (default: divider ped_crossing boundary)')
    args = parser.parse_args(argv)
    result = run(args.streets, args.samples, classes=args.classes)
    print(f'{_cpu()}, Python {platform.python_version()}, numpy {np.__version__}')
    print(f"{args.streets} streets, {result['samples']} samples, classes "
          f"{' '.join(result['classes'])}, instances per label (0-3) {result['instances']}")
    print(f"per-location preparation: fast {result['prepare_s']:.2f} s, devkit load "
          f"{result['devkit_load_s']:.2f} s")
    print(f"{'ms per sample':<16}{'cut':>8}{'targets':>9}{'total':>8}")
    for name in ('reference', 'fast'):
        cut, targets = result[f'{name}_cut'], result[f'{name}_targets']
        print(f'{name:<16}{cut:>8.2f}{targets:>9.2f}{cut + targets:>8.2f}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
