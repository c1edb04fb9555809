"""Generate a synthetic dataset in nuScenes' layout: sensor files, info files and tables.

Work is split per keyframe: a task renders the keyframe's six images and the lidar sweeps up
to it, writes them, and reports what the sensors measured of each agent (lidar points in its
box, visibility). Tasks run in a process pool; each worker rebuilds the scenes it needs from
the seed. The main process then builds the database rows, the info files, the tables and
the map expansion (each scene's street in ``maps/expansion/<location>.json``), so the output
does not depend on the number of workers. Last, the ground-truth database of the
train split is cut from the written point clouds, one task per sample
(:mod:`.gt_database`).
"""
import os
import os.path as osp
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from multiprocessing import get_all_start_methods, get_context
from typing import Optional

import numpy as np

from turbox_mm.utils.atomic_files import atomic_write_bytes
from . import lidar
from .cameras import CAMERA_NAMES, NOMINAL_SIZE
from .ground import GroundRaster
from .gt_database import create_gt_database
from .images import Renderer
from .infos import dump_infos, metainfo, scene_infos
from .map_expansion import (CONFLICT_DISTANCE, MAP_EXPANSION_FOLDER, MAP_EXPANSION_VERSION,
                            NUSCENES_LOCATIONS, assign_locations, scene_map, write_map_expansion)
from .records import LIDAR, SceneRecords, data_filename, lidar_ticks
from .scene import TICKS_PER_KEYFRAME, Scene
from .tables import build_tables, write_tables

VERSIONS = ('v1.0-trainval', 'v1.0-mini')


@dataclass(frozen=True)
class Options:
    """What to generate (see :func:`generate` for the meaning of each field)."""
    scenes: int = 10
    frames: int = 40
    seed: int = 0
    image_size: tuple = NOMINAL_SIZE
    points: int = 34000
    sweeps: int = 10
    version: str = 'v1.0-trainval'
    val_scenes: Optional[int] = None
    jpeg_quality: int = 90

    def validate(self) -> None:
        if self.scenes < 1 or self.frames < 1:
            raise ValueError(f'need at least one scene and one frame, got scenes={self.scenes}, '
                             f'frames={self.frames}')
        width, height = self.image_size
        if width < 16 or height < 16:
            raise ValueError(f'image size {width}x{height} is too small (16x16 at least)')
        if self.points < 32 or self.sweeps < 0:
            raise ValueError(f'points must be >= 32 and sweeps >= 0, got {self.points}, '
                             f'{self.sweeps}')
        if self.version not in VERSIONS:
            raise ValueError(f'version must be one of {VERSIONS}, got {self.version!r}')
        if not 0 <= self.num_val <= self.scenes - 1:
            raise ValueError(f'val_scenes must leave at least one of the {self.scenes} scenes '
                             f'for training, got {self.val_scenes}')

    @property
    def num_val(self) -> int:
        """Scenes of the validation split (the last ones)."""
        if self.val_scenes is not None:
            return self.val_scenes
        return 0 if self.scenes == 1 else max(1, round(self.scenes * 0.2))


def generate(out_dir: str, scenes: int = 10, frames: int = 40, seed: int = 0, workers: int = 0,
             image_size=NOMINAL_SIZE, points: int = 34000, sweeps: int = 10,
             version: str = 'v1.0-trainval', val_scenes: Optional[int] = None,
             jpeg_quality: int = 90, info_prefix: str = 'nuscenes', gt_database: bool = True,
             progress: bool = True) -> dict:
    """Generate a synthetic nuScenes-format dataset.

    Args:
        out_dir (str): Data root to write (created if needed).
        scenes (int): Number of scenes. Defaults to 10.
        frames (int): Keyframes (samples, 2 Hz) per scene. Defaults to 40 (20 s, as nuScenes).
        seed (int): Seed; the same seed and options give byte-identical files. Defaults to 0.
        workers (int): Worker processes; 0 uses every CPU, 1 works in this process.
            Defaults to 0.
        image_size (tuple[int, int]): ``(width, height)`` of the images; intrinsics scale with
            it. Defaults to nuScenes' 1600x900.
        points (int): Lidar returns wanted per sweep (about). Defaults to 34000.
        sweeps (int): Previous lidar sweeps listed per sample, as mmdet3d's ``max_sweeps``.
            The lidar runs at 20 Hz: with 9 or more, all 9 sweeps between keyframes are
            written, as in nuScenes; with fewer, only those listed; 0 writes none.
            Defaults to 10.
        version (str): ``'v1.0-trainval'`` or ``'v1.0-mini'``: the tables' folder and the
            devkit split whose scene names the scenes take. Defaults to 'v1.0-trainval'.
        val_scenes (int, optional): Scenes in the validation split (the last ones). Defaults
            to a fifth of the scenes, at least one when there are two or more.
        jpeg_quality (int): JPEG quality of the images. Defaults to 90.
        info_prefix (str): Info files are ``<prefix>_infos_{train,val}.pkl``. Defaults to
            'nuscenes'.
        gt_database (bool): Also write the ground-truth database of the train split that
            mmdet3d's ``ObjectSample`` reads, as mmdet3d's converter does:
            ``<prefix>_gt_database/`` and ``<prefix>_dbinfos_train.pkl``. Defaults to True.
        progress (bool): Show a progress bar. Defaults to True.

    Returns:
        dict: A summary: counts, bytes written per kind, mean points per sweep and image size,
        seconds taken, the paths of the info files, the ground-truth database's summary
        (``gt_database``, None when not written) and the map expansion's (``map_expansion``:
        each scene's location, and the pairs of scenes left sharing a location nearby, see
        :func:`~.map_expansion.assign_locations`).

    Examples:
        >>> from turbox_mm.datasets.synthetic import generate
        >>> summary = generate('data/nuscenes_synth', scenes=2, frames=3,
        ...                    image_size=(400, 225), points=4000, sweeps=2, progress=False)
        >>> summary['samples']
        {'train': 3, 'val': 3}
    """
    options = Options(scenes=int(scenes), frames=int(frames), seed=int(seed),
                      image_size=tuple(int(v) for v in image_size), points=int(points),
                      sweeps=int(sweeps), version=str(version),
                      val_scenes=None if val_scenes is None else int(val_scenes),
                      jpeg_quality=int(jpeg_quality))
    options.validate()
    names = scene_names(options.version, options.scenes - options.num_val, options.num_val)
    started = time.perf_counter()
    workers = workers or os.cpu_count() or 1
    measured, totals = _render_all(options, out_dir, workers, progress)

    scenes = [_scene(options, index) for index in range(options.scenes)]
    maps = [scene_map(scene) for scene in scenes]
    locations, shared = assign_locations(maps)
    for scene, location in zip(scenes, locations):
        scene.location = location
    if shared:
        warnings.warn(_shared_message(shared, names))
    all_records, infos = [], []
    for index, scene in enumerate(scenes):
        frame_results = [measured[(index, k)] for k in range(options.frames)]
        records = SceneRecords(scene, names[index], frame_results, options.sweeps)
        offset = sum(len(r.instances) for r in all_records)  # instance_id indexes the table
        infos.append(scene_infos(records, options.sweeps, offset))
        all_records.append(records)
    train = options.scenes - options.num_val
    map_bytes = write_map_expansion(out_dir, maps, locations)
    meta = metainfo(options.version, synthetic=dict(asdict(options), scene_names=names),
                    map_expansion=dict(version=MAP_EXPANSION_VERSION,
                                       folder=MAP_EXPANSION_FOLDER,
                                       locations=list(NUSCENES_LOCATIONS)))
    info_paths = {}
    for split, chosen in (('train', infos[:train]), ('val', infos[train:])):
        info_paths[split] = osp.join(out_dir, f'{info_prefix}_infos_{split}.pkl')
        dump_infos(info_paths[split], meta, [info for scene in chosen for info in scene])
    table_bytes = write_tables(out_dir, options.version, build_tables(all_records))
    database = None
    if gt_database:
        train_samples = sum(map(len, infos[:train]))
        with _mapper(workers, train_samples, progress, 'gt database',
                     'sample') as imap:
            database = create_gt_database(out_dir, info_paths['train'], info_prefix, imap)

    sizes = dict(images=totals['images'], lidar_samples=totals['lidar_samples'],
                 lidar_sweeps=totals['lidar_sweeps'],
                 infos=sum(osp.getsize(p) for p in info_paths.values()), tables=table_bytes,
                 map_expansion=sum(map_bytes.values()),
                 gt_database=database['bytes'] if database else 0)
    sizes['total'] = sum(sizes.values())
    keyframes = options.scenes * options.frames
    return dict(
        out_dir=out_dir, version=options.version, seed=options.seed, scenes=options.scenes,
        frames=options.frames,
        samples=dict(train=sum(map(len, infos[:train])), val=sum(map(len, infos[train:]))),
        annotations=sum(len(r.annotations) for r in all_records),
        instances=sum(len(r.instances) for r in all_records),
        files=dict(images=keyframes * len(CAMERA_NAMES), lidar_samples=keyframes,
                   lidar_sweeps=totals['sweeps'] - keyframes),
        bytes=sizes, mean_points_per_sweep=totals['points'] / max(1, totals['sweeps']),
        mean_image_bytes=totals['images'] / (keyframes * len(CAMERA_NAMES)),
        seconds=time.perf_counter() - started, workers=workers, info_files=info_paths,
        gt_database=database,
        map_expansion=dict(locations=dict(zip(names, locations)),
                           shared=[(names[a], names[b], location, n)
                                   for a, b, location, n in shared]))


def _shared_message(shared: list, names: list) -> str:
    pairs = '; '.join(f'{names[a]} and {names[b]} in {location} ({n} keyframes)'
                      for a, b, location, n in shared[:5])
    more = f' and {len(shared) - 5} more' if len(shared) > 5 else ''
    return (f'{len(shared)} pairs of scenes share a map location and come within '
            f'{CONFLICT_DISTANCE:.0f} m of each other: {pairs}{more}. nuScenes has four map '
            'locations; map ground truth cut from maps/expansion near these keyframes also '
            "shows the other scene's street (the info files' map_annos do not). Fewer scenes "
            'avoid it.')


def _render_all(options: Options, out_dir: str, workers: int, progress: bool):
    """Render every keyframe (in a pool unless ``workers`` is 1).

    Returns:
        tuple[dict, dict]: What the sensors measured, by ``(scene, keyframe)``, and the byte
        and point counts summed over all keyframes.
    """
    for channel in CAMERA_NAMES + (LIDAR,):
        os.makedirs(osp.join(out_dir, 'samples', channel), exist_ok=True)
    if options.sweeps:
        os.makedirs(osp.join(out_dir, 'sweeps', LIDAR), exist_ok=True)
    tasks = [(options, out_dir, s, k) for s in range(options.scenes)
             for k in range(options.frames)]
    lidar.warm_up()  # compile once; forked workers inherit it
    measured = {}
    totals = dict(images=0, lidar_samples=0, lidar_sweeps=0, points=0, sweeps=0)
    with _mapper(workers, len(tasks), progress, 'keyframes', 'kf') as imap:
        for result in imap(render_keyframe, tasks):
            measured[(result['scene'], result['frame'])] = result['measured']
            for key in totals:
                totals[key] += result[key]
    return measured, totals


@contextmanager
def _mapper(workers: int, total: int, progress: bool, desc: str, unit: str):
    """An ``imap(function, tasks)`` over a process pool (none when ``workers`` is 1) that
    yields results in task order and advances a progress bar of ``total`` tasks."""
    bar = _progress(total, progress, desc, unit)
    pool = _pool(min(workers, total)) if workers > 1 and total > 0 else None

    def imap(function, tasks):
        results = pool.imap(function, tasks, chunksize=1) if pool else map(function, tasks)
        for result in results:
            bar.update(1)
            yield result

    try:
        yield imap
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()


def scene_names(version: str, train: int, val: int) -> list:
    """Real nuScenes scene names of the right splits, so that the devkit's split lists (and
    so ``NuScenesEval`` and mmdet3d's converter) put each scene where we put it.

    Without nuscenes-devkit the scenes are named ``synthetic-NNNN`` (with a warning): the
    tables still load, but the devkit's splits will not find them.
    """
    try:
        from nuscenes.utils import splits
    except ImportError:
        warnings.warn('nuscenes-devkit is not installed: scenes get names outside its splits, '
                      'so NuScenesEval and mmdet3d\'s converter will not find them')
        return [f'synthetic-{i:04d}' for i in range(train + val)]
    train_names, val_names = ((splits.train, splits.val) if version == 'v1.0-trainval'
                              else (splits.mini_train, splits.mini_val))
    if train > len(train_names) or val > len(val_names):
        raise ValueError(f'{version} has {len(train_names)} train and {len(val_names)} val '
                         f'scenes; asked for {train} and {val}')
    return list(train_names[:train]) + list(val_names[:val])


# --- the worker side -----------------------------------------------------------------------
_cache = {}


def _scene(options: Options, index: int) -> Scene:
    return Scene(options.seed, index, options.frames, preroll_ticks=options.sweeps,
                 image_size=options.image_size)


def _sensors(options: Options, index: int):
    """The scene, its ground raster and renderer, kept for the tasks that follow."""
    key = (options, index)
    if key not in _cache:
        _cache.clear()
        scene = _scene(options, index)
        times = np.linspace(scene.t_min, scene.t_max, 64)
        path = np.array([scene.ego2global(t)[:2, 3] for t in times])
        seeds = np.random.SeedSequence([options.seed, index, 1]).generate_state(2)
        ground = GroundRaster(scene.road, path, np.random.default_rng(seeds[0]))
        _cache[key] = (scene, ground, Renderer(ground, int(seeds[1]), options.jpeg_quality))
    return _cache[key]


def render_keyframe(task) -> dict:
    """Render and write one keyframe: its images, and the lidar ticks since the last one.

    Args:
        task (tuple): ``(options, out_dir, scene index, keyframe)``.

    Returns:
        dict: ``measured`` (``{agent: (num_lidar_pts, visibility)}`` of the agents in
        annotation range) and byte and point counts.
    """
    options, out_dir, index, frame = task
    scene, ground, renderer = _sensors(options, index)
    key_tick = frame * TICKS_PER_KEYFRAME
    after = key_tick - TICKS_PER_KEYFRAME if frame else scene.first_tick - 1
    ticks = [t for t in lidar_ticks(scene, options.sweeps) if after < t <= key_tick]
    out = dict(scene=index, frame=frame, images=0, lidar_samples=0, lidar_sweeps=0, points=0,
               sweeps=0)
    for tick in ticks:
        t = scene.tick_time(tick)
        boxes = scene.all_boxes(t)
        lidar2global = scene.ego2global(t) @ scene.lidar2ego
        rng = np.random.default_rng([options.seed, index, tick + 1_000_000, 7])
        sweep = lidar.scan(boxes, lidar2global, ground, options.points, rng)
        key = scene.is_keyframe(tick)
        name = data_filename(scene, LIDAR, scene.tick_us(tick), key)
        data = sweep['points'].tobytes()
        atomic_write_bytes(osp.join(out_dir, name), data)
        out['lidar_samples' if key else 'lidar_sweeps'] += len(data)
        out['points'] += len(sweep['points'])
        out['sweeps'] += 1
        if key:
            out['measured'] = _measure(scene, boxes, sweep, lidar2global, t)
    for camera in scene.cameras:
        timestamp = scene.camera_us(frame, camera.name)
        t = scene.us_to_time(timestamp)
        rng = np.random.default_rng([options.seed, index, frame, CAMERA_NAMES.index(camera.name)])
        image = renderer.render(camera, scene.ego2global(t), scene.all_boxes(t), rng)
        data = renderer.encode(image)
        atomic_write_bytes(osp.join(out_dir, data_filename(scene, camera.name, timestamp, True)),
                           data)
        out['images'] += len(data)
    return out


def _measure(scene: Scene, boxes: dict, sweep: dict, lidar2global, t: float) -> dict:
    """Lidar points in each agent's box and its visibility, for agents in annotation range."""
    agents = scene.agents_near(t)
    xyz = sweep['points'][:, :3].astype(np.float64) @ lidar2global[:3, :3].T + lidar2global[:3, 3]
    counts = lidar.count_points_in_boxes(xyz, boxes['center'][agents], boxes['size'][agents],
                                         boxes['yaw'][agents])
    levels = lidar.visibility_levels(boxes, agents, lidar2global[:3, 3])
    return {int(a): (int(n), str(v)) for a, n, v in zip(agents, counts, levels)}


def _pool(workers: int):
    method = 'fork' if 'fork' in get_all_start_methods() else 'spawn'
    return get_context(method).Pool(workers)


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool, desc: str = 'keyframes', unit: str = 'kf'):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        from mmengine.utils import ProgressBar

        class _Bar(ProgressBar):
            def update(self, n):
                for _ in range(n):
                    super().update()

            def close(self):
                print()

        return _Bar(total)
    return tqdm(total=total, desc=desc, unit=unit, smoothing=0.1)


def format_summary(summary: dict) -> str:
    """Human-readable summary of :func:`generate`'s result."""
    mib = 1024 ** 2
    b = summary['bytes']
    f = summary['files']
    lines = [
        f"wrote {summary['out_dir']} ({summary['version']}, seed {summary['seed']}) in "
        f"{summary['seconds']:.1f} s with {summary['workers']} workers",
        f"  scenes {summary['scenes']} x {summary['frames']} keyframes: "
        f"{summary['samples']['train']} train / {summary['samples']['val']} val samples, "
        f"{summary['annotations']} annotations of {summary['instances']} instances",
        f"  images        {f['images']:7d} files {b['images'] / mib:9.1f} MiB "
        f"(mean {summary['mean_image_bytes'] / 1024:.0f} KiB)",
        f"  lidar samples {f['lidar_samples']:7d} files {b['lidar_samples'] / mib:9.1f} MiB "
        f"(mean {summary['mean_points_per_sweep']:.0f} points)",
        f"  lidar sweeps  {f['lidar_sweeps']:7d} files {b['lidar_sweeps'] / mib:9.1f} MiB",
        f"  infos                     {b['infos'] / mib:9.1f} MiB "
        f"({', '.join(osp.basename(p) for p in summary['info_files'].values())})",
        f"  tables                    {b['tables'] / mib:9.1f} MiB ({summary['version']}/)",
    ]
    if 'map_expansion' in b:
        lines.append(f"  map expansion             {b['map_expansion'] / mib:9.1f} MiB "
                     f"(maps/expansion/, {len(NUSCENES_LOCATIONS)} locations)")
    database = summary.get('gt_database')
    if database:
        lines.append(f"  gt database   {database['files']:7d} files "
                     f"{b['gt_database'] / mib:9.1f} MiB ({osp.basename(database['folder'])}/, "
                     f"{osp.basename(database['dbinfos'])})")
    lines.append(f"  total                     {b['total'] / mib:9.1f} MiB")
    return '\n'.join(lines)


__all__ = ['generate', 'Options', 'format_summary', 'scene_names', 'render_keyframe']
