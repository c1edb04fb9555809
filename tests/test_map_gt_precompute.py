"""The map ground truth precomputed into the infos: the map-gt step
(turbox_mm.datasets.map_gt.precompute, `tools/create_data.py map-gt`), ``map_annotation``
(turbox_mm.datasets.map_gt.annotation), ``LoadMapGT(impl='precomputed')`` and the turbox
switch of ``LoadMapGT(impl='reference')`` (turbox_mm.engine.runner.precomputed_map_gt).

On a tiny synthetic nuScenes: the stored polylines are the reference vectoriser's, bit for bit,
for every sample, whatever the number of workers; ``LoadMapGT(impl='precomputed')`` gives every
output of ``impl='reference'`` bit for bit, the equivalent orders drawn by a seeded or the
global generator included; running the step twice changes nothing, ``--force`` recomputes;
every bad input is named (no map_location, no map file, other classes or patch size, a
malformed annotation), and a failed write leaves the files as they were.
"""
import contextlib
import copy
import logging
import os
import os.path as osp
import pickle
import shutil

import numpy as np
import pytest
from mmengine.config import Config
from mmengine.logging import MMLogger

from conftest import ROOT, run_python
from turbox_mm.datasets import nuscenes_tables
from turbox_mm.datasets.map_gt import (MAP_ANNOTATION, MapAnnotationError, MapExpansionError,
                                       VectorizedLocalMapReference, check_map_annotation,
                                       decode_map_annotation, encode_map_annotation,
                                       lidar2global_of, precompute_map_gt)
from turbox_mm.datasets.map_gt.precompute import command_line, format_results
from turbox_mm.datasets.synthetic import InfoFileError

OUTPUTS = ('gt_map_labels', 'gt_map_pts', 'gt_map_shifts', 'gt_map_bboxes')


# -- data ---------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def generated(tmp_path_factory):
    """3 scenes (2 train, 1 val) of 3 keyframes with tiny sensors, and the map expansion;
    the val scene's patches hold a crossing (a closed ring)."""
    from turbox_mm.datasets.synthetic import generate
    root = str(tmp_path_factory.mktemp('map_gt_precompute') / 'nuscenes')
    generate(root, scenes=3, frames=3, seed=1, image_size=(64, 36), points=300, sweeps=0,
             val_scenes=1, workers=1, gt_database=False, progress=False)  # val sees a crossing
    return root


@pytest.fixture
def data(generated, tmp_path):
    """A copy of the info files and the map expansion to rewrite: (root, train, val)."""
    root = str(tmp_path / 'nuscenes')
    os.makedirs(osp.join(root, 'maps'))
    shutil.copytree(osp.join(generated, 'maps', 'expansion'),
                    osp.join(root, 'maps', 'expansion'))
    for split in ('train', 'val'):
        shutil.copy(osp.join(generated, f'nuscenes_infos_{split}.pkl'), root)
    return (root, osp.join(root, 'nuscenes_infos_train.pkl'),
            osp.join(root, 'nuscenes_infos_val.pkl'))


@pytest.fixture(scope='module')
def annotated(generated, tmp_path_factory):
    """The generated dataset's infos through the map-gt step, next to the originals."""
    root = str(tmp_path_factory.mktemp('annotated') / 'nuscenes')
    shutil.copytree(generated, root, ignore=shutil.ignore_patterns('samples', 'sweeps'))
    for split in ('samples', 'sweeps'):
        if osp.isdir(osp.join(generated, split)):
            os.symlink(osp.join(generated, split), osp.join(root, split))
    precompute_map_gt([osp.join(root, f'nuscenes_infos_{s}.pkl') for s in ('train', 'val')],
                      root, workers=1)
    return root


def load(path):
    with open(path, 'rb') as f:
        return pickle.load(f)


def dump(path, infos):
    with open(path, 'wb') as f:
        pickle.dump(infos, f, protocol=4)


def annotations(infos):
    """The map_annotation of every sample (the infos' other values hold NaNs)."""
    infos = load(infos) if isinstance(infos, str) else infos
    return [info[MAP_ANNOTATION] for info in infos['data_list']]


def read(*paths):
    return [open(p, 'rb').read() for p in paths]


@contextlib.contextmanager
def logged():
    """The warnings mmengine's current logger emits meanwhile."""
    logger = MMLogger.get_current_instance()
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def assert_identical(a, b, what=''):
    """Same dtype, shape and bits."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    assert a.tobytes() == b.tobytes(), what


# -- the annotation ---------------------------------------------------------------------------
def test_annotation_keeps_every_bit():
    rng = np.random.default_rng(0)
    polylines = [rng.standard_normal((k, 2)) * 30 for k in (2, 7, 1)]
    polylines.append(np.concatenate([polylines[1], polylines[1][:1]]))  # a closed ring
    labels = np.array([0, 1, 2, 2])
    annotation = encode_map_annotation(polylines, labels, ('divider', 'ped_crossing',
                                                           'boundary'), (60, 30))
    assert annotation['classes'] == ['divider', 'ped_crossing', 'boundary']
    assert annotation['patch_size'] == [60.0, 30.0] and annotation['labels'] == [0, 1, 2, 2]
    assert annotation['num_vertices'] == [2, 7, 1, 8] and len(annotation['vertices']) == 18 * 16
    # plain Python values: the info files load under numpy 1 and 2
    assert {type(v) for v in annotation.values()} == {list, bytes}
    lists = ('classes', 'patch_size', 'labels', 'num_vertices')
    assert all(type(v) in (int, float, str) for k in lists for v in annotation[k])
    out, out_labels = decode_map_annotation(pickle.loads(pickle.dumps(annotation)))
    assert len(out) == 4 and out_labels.dtype == np.int64 and out_labels.tolist() == [0, 1, 2, 2]
    for got, want in zip(out, polylines):
        assert_identical(got, want)
        assert got.flags.writeable and got.flags.c_contiguous
    empty = encode_map_annotation([], np.zeros(0, np.int64), ['divider'], (60, 30))
    out, out_labels = decode_map_annotation(empty)
    assert out == [] and out_labels.shape == (0, ) and out_labels.dtype == np.int64


@pytest.mark.parametrize('edit, match', [
    (lambda a: a.pop('vertices'), r'sample 7: map_annotation\.vertices is missing'),
    (lambda a: a.update(vertices=a['vertices'][:-8]), r'vertices holds 24 bytes, not the 32'),
    (lambda a: a.update(labels=[0, 0]), r'labels has 2 entries for 1 instances'),
])
def test_malformed_annotation_is_named(edit, match):
    annotation = encode_map_annotation([np.zeros((2, 2))], [0], ['divider'], (60, 30))
    edit(annotation)
    with pytest.raises(MapAnnotationError, match=match) as error:
        decode_map_annotation(annotation, 'sample 7')
    assert 'map-gt --force' in str(error.value)


def test_classes_and_patch_size_are_checked():
    annotation = encode_map_annotation([], [], ['divider', 'boundary'], (60, 30))
    check_map_annotation(annotation, ('divider', 'boundary'), (60.0, 30.0), 's')
    # some of the stored classes, in any order, are served (select_map_classes)
    check_map_annotation(annotation, ('boundary', 'divider'), (60, 30), 's')
    check_map_annotation(annotation, ('boundary', ), (60, 30), 's')
    with pytest.raises(MapAnnotationError, match=r"s: map_annotation was cut for classes "
                                                 r"\['divider', 'boundary'\], not "
                                                 r"\['boundary', 'centerline'\].*--classes "
                                                 r"boundary centerline --force"):
        check_map_annotation(annotation, ('boundary', 'centerline'), (60, 30), 's')
    with pytest.raises(MapAnnotationError, match=r'patch_size \[60\.0, 30\.0\], not '
                                                 r'\[100\.0, 50\.0\].*--patch-size 100 50'):
        check_map_annotation(annotation, ('divider', 'boundary'), (100, 50), 's')


# -- the step -----------------------------------------------------------------------------------
def test_step_stores_the_reference_polylines(data, tmp_path):
    """Every sample's annotation is the reference vectoriser's output, bit for bit; two
    workers write the same bytes as one."""
    root, train, val = data
    results = precompute_map_gt([train, val], root, workers=1)
    assert [(r['samples'], r['added'], r['kept'], r['overwritten'], r['written'])
            for r in results] == [(6, 6, 0, 0, True), (3, 3, 0, 0, True)]
    reference = VectorizedLocalMapReference(root)
    instances, seen = 0, set()
    for path in (train, val):
        for info in load(path)['data_list']:
            annotation = info[MAP_ANNOTATION]
            assert annotation['classes'] == ['divider', 'ped_crossing', 'boundary']
            assert annotation['patch_size'] == [60.0, 30.0]
            polylines, labels = decode_map_annotation(annotation)
            want, want_labels = reference(info['map_location'], lidar2global_of(info))
            assert_identical(labels, want_labels)
            assert len(polylines) == len(want) > 5
            for got, expected in zip(polylines, want):
                assert_identical(got, expected)
            seen |= set(labels.tolist())
            instances += len(labels)
    assert seen == {0, 1, 2}
    assert sum(r['instances'] for r in results) == instances
    text = format_results(results)
    assert f'{train}: 6 samples: 6 map annotations added, 0 kept, 0 overwritten (written)' in text
    assert f'cut 9 samples ({instances} instances) with the reference vectoriser' in text

    again = tmp_path / 'two_workers'
    os.makedirs(again)
    copies = [str(again / osp.basename(p)) for p in (train, val)]
    for path, info_path in zip(copies, ('train', 'val')):
        shutil.copy(osp.join(osp.dirname(train), f'nuscenes_infos_{info_path}.pkl'), path)
        infos = load(path)
        for info in infos['data_list']:
            del info[MAP_ANNOTATION]
        dump(path, infos)
    results = precompute_map_gt(copies, root, workers=2)
    assert results[0]['workers'] == 2
    assert read(*copies) == read(train, val)


def test_twice_changes_nothing_and_force_recomputes(data):
    root, train, val = data
    precompute_map_gt([train, val], root, workers=1)
    before = read(train, val)
    stamps = [os.stat(p).st_mtime_ns for p in (train, val)]
    results = precompute_map_gt([train, val], root, workers=1)
    assert [(r['added'], r['kept'], r['written'])
            for r in results] == [(0, 6, False), (0, 3, False)]
    assert read(train, val) == before and [os.stat(p).st_mtime_ns for p in (train, val)] == stamps
    assert 'unchanged' in format_results(results) and 'cut' not in format_results(results)

    # one sample without it: only that one is cut
    infos = load(val)
    del infos['data_list'][1][MAP_ANNOTATION]
    dump(val, infos)
    results = precompute_map_gt(val, root, workers=1)
    assert (results[0]['added'], results[0]['kept'], results[0]['written']) == (1, 2, True)
    assert annotations(val) == annotations(pickle.loads(before[1]))

    # --force: every sample cut again, the same values
    results = precompute_map_gt([train, val], root, workers=1, force=True)
    assert [(r['overwritten'], r['written']) for r in results] == [(6, True), (3, True)]
    assert [annotations(p) for p in (train, val)] == [annotations(pickle.loads(b))
                                                      for b in before]


def test_other_classes_or_patch_size_need_force(data):
    root, train, _ = data
    precompute_map_gt(train, root, workers=1)
    with pytest.raises(MapAnnotationError) as error:
        precompute_map_gt(train, root, patch_size=(40, 20), workers=1)
    message = str(error.value)
    assert train in message and 'data_list[0]' in message and '--force' in message
    assert 'patch_size [60.0, 30.0], not [40.0, 20.0]' in message
    # fewer classes are served by the stored ones (select_map_classes): kept as they are
    before = read(train)
    results = precompute_map_gt(train, root, classes=['divider'], workers=1)
    assert results[0]['kept'] == 6 and read(train) == before
    with pytest.raises(MapAnnotationError, match=r"classes \['divider', 'ped_crossing', "
                                                 r"'boundary'\], not \['divider', "
                                                 r"'centerline'\]"):
        precompute_map_gt(train, root, classes=['divider', 'centerline'], workers=1)
    results = precompute_map_gt(train, root, patch_size=(40, 20), classes=['divider'],
                                force=True, workers=1)
    assert results[0]['overwritten'] == 6
    reference = VectorizedLocalMapReference(root, (40, 20), ('divider', ))
    for info in load(train)['data_list']:
        assert info[MAP_ANNOTATION]['patch_size'] == [40.0, 20.0]
        polylines, labels = decode_map_annotation(info[MAP_ANNOTATION])
        want, want_labels = reference(info['map_location'], lidar2global_of(info))
        assert_identical(labels, want_labels) and set(labels.tolist()) == {0}
        for got, expected in zip(polylines, want):
            assert_identical(got, expected)
    # a malformed one is named too, and --force replaces it
    infos = load(train)
    del infos['data_list'][4][MAP_ANNOTATION]['num_vertices']
    dump(train, infos)
    with pytest.raises(MapAnnotationError, match=r'data_list\[4\].*num_vertices is missing'):
        precompute_map_gt(train, root, patch_size=(40, 20), classes=['divider'], workers=1)
    with pytest.raises(MapAnnotationError, match='expected some of'):
        precompute_map_gt(train, root, classes=['stop_line'])


def test_missing_map_location_names_the_map_fields_step(data):
    root, train, val = data
    before = read(train, val)
    infos = load(val)
    del infos['data_list'][1]['map_location']
    dump(val, infos)
    with pytest.raises(MapAnnotationError) as error:
        precompute_map_gt([train, val], root, workers=1)
    message = str(error.value)
    assert val in message and 'data_list[1]' in message and '1 of 3 samples' in message
    assert 'tools/create_data.py map-fields' in message and f'--root-path {root}' in message
    assert read(train) == before[:1]  # nothing written


def test_missing_map_expansion_file_is_named(data):
    root, train, val = data
    before = read(train, val)
    location = load(val)['data_list'][0]['map_location']
    path = osp.join(root, 'maps', 'expansion', f'{location}.json')
    os.remove(path)
    with pytest.raises(MapExpansionError) as error:
        precompute_map_gt([train, val], root, workers=1)
    message = str(error.value)
    assert path in message and repr(location) in message and 'samples to cut use it' in message
    assert val in message and read(train, val) == before
    with pytest.raises(InfoFileError):  # not an info file
        precompute_map_gt(path + '.pkl', root)


def test_the_write_is_atomic(data, monkeypatch):
    """A write that fails half way (a full disk) leaves every info file as it was."""
    root, train, val = data
    before = read(train, val)

    def full_disk(obj, f, protocol=None):
        f.write(b'\x80\x04partial')
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(nuscenes_tables.pickle, 'dump', full_disk)
    with pytest.raises(OSError, match='No space left'):
        precompute_map_gt([train, val], root, workers=1)
    assert read(train, val) == before
    assert sorted(os.listdir(root)) == ['maps', 'nuscenes_infos_train.pkl',
                                        'nuscenes_infos_val.pkl']


def test_command_line(data):
    root, train, val = data
    proc = run_python(['tools/create_data.py', 'map-gt', train, val, '--data-root', root,
                       '--workers', '2', '--no-progress'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'{train}: 6 samples: 6 map annotations added' in proc.stdout
    assert 'with the reference vectoriser' in proc.stdout
    reference = VectorizedLocalMapReference(root)
    info = load(val)['data_list'][2]
    polylines, _ = decode_map_annotation(info[MAP_ANNOTATION])
    for got, want in zip(polylines, reference(info['map_location'], lidar2global_of(info))[0]):
        assert_identical(got, want)
    # the other steps' --root-path works as well; present annotations are kept
    proc = run_python(['tools/create_data.py', 'map-gt', val, '--root-path', root,
                       '--no-progress'])
    assert proc.returncode == 0 and '0 map annotations added, 3 kept' in proc.stdout
    proc = run_python(['tools/create_data.py', 'map-gt', val, '--data-root', root,
                       '--patch-size', '40', '20', '--no-progress'])
    assert proc.returncode == 2 and 'data_list[0]' in proc.stderr and '--force' in proc.stderr
    proc = run_python(['tools/create_data.py', 'map-gt', val, '--data-root', root,
                       '--patch-size', '40', '20', '--classes', 'divider', 'boundary',
                       '--force', '--workers', '1', '--no-progress'])
    assert proc.returncode == 0 and '3 overwritten (written)' in proc.stdout, proc.stderr
    assert load(val)['data_list'][0][MAP_ANNOTATION]['classes'] == ['divider', 'boundary']
    proc = run_python(['tools/create_data.py', 'map-gt', train, '--data-root',
                       osp.join(root, 'elsewhere'), '--force', '--no-progress'])
    assert proc.returncode == 2 and 'does not exist' in proc.stderr
    assert command_line([val], root, ['divider', 'boundary'], (40, 20)) == (
        f'python tools/create_data.py map-gt {val} --data-root {root} --patch-size 40 20 '
        '--classes divider boundary')


# -- LoadMapGT(impl='precomputed') ---------------------------------------------------------------
def _dataset_outputs(root, split, seed, **kwargs):
    """Every sample of a split through mmdet3d's NuScenesDataset with one LoadMapGT, in test
    mode (so with eval_ann_info)."""
    from mmdet3d.datasets import NuScenesDataset
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet3d')
    pipeline = [dict(type='turbox_mm.LoadMapGT', data_root=root, seed=seed, **kwargs)]
    dataset = NuScenesDataset(root, f'nuscenes_infos_{split}.pkl', pipeline=pipeline,
                              modality=dict(use_lidar=True, use_camera=True), test_mode=True)
    np.random.seed(0)  # the draws of seed=None
    return [dataset[i] for i in range(len(dataset))]


@pytest.mark.parametrize('fixed_num, seed', [(20, 0), (4, 0), (2, 0), (2, None)])
def test_precomputed_equals_reference_bit_for_bit(annotated, fixed_num, seed):
    """Every sample, every output array. With 4 points a crossing's ring of 4 vertices has
    more equivalent orders (4) than are kept (3), with 2 points every open line (2 orders, 1
    kept): the seeded or the global generator draws, the same draws in the same order."""
    drawn = False
    for split in ('train', 'val'):
        reference = _dataset_outputs(annotated, split, seed, impl='reference',
                                     fixed_num=fixed_num)
        precomputed = _dataset_outputs(annotated, split, seed, impl='precomputed',
                                       fixed_num=fixed_num)
        assert len(reference) == len(precomputed) > 0
        for want, got in zip(reference, precomputed):
            assert MAP_ANNOTATION in got
            for key in OUTPUTS:
                assert_identical(got[key], want[key], key)
            assert len(got['gt_map_polylines']) == len(want['gt_map_polylines']) > 5
            for a, b in zip(got['gt_map_polylines'], want['gt_map_polylines']):
                assert_identical(a, b, 'gt_map_polylines')
            assert got['eval_ann_info']['gt_map_labels'] is got['gt_map_labels']
            assert got['eval_ann_info']['gt_map_polylines'] is got['gt_map_polylines']
            drawn |= any((len(p) - 1 if (p[0] == p[-1]).all() else 2) > fixed_num - 1
                         for p in want['gt_map_polylines'])
    assert drawn == (fixed_num < 20)


def test_precomputed_empty_patch_and_drop_empty(annotated):
    from turbox_mm.datasets.transforms import LoadMapGT
    info = load(osp.join(annotated, 'nuscenes_infos_train.pkl'))['data_list'][0]
    far = dict(info, ego2global=(np.array(info['ego2global'])
                                 + np.pad([[5000.0], [5000.0], [0.0]], ((0, 1), (3, 0)))).tolist())
    polylines, labels = VectorizedLocalMapReference(annotated)(far['map_location'],
                                                               lidar2global_of(far))
    far[MAP_ANNOTATION] = encode_map_annotation(polylines, labels, info[MAP_ANNOTATION][
        'classes'], (60, 30))
    want = LoadMapGT(annotated, impl='reference')(copy.deepcopy(far))
    got = LoadMapGT(annotated, impl='precomputed')(copy.deepcopy(far))
    for key in OUTPUTS:
        assert_identical(got[key], want[key], key)
    assert got['gt_map_pts'].shape == (0, 20, 2) and got['gt_map_polylines'] == []
    assert LoadMapGT(annotated, impl='precomputed', drop_empty=True)(copy.deepcopy(far)) is None


def test_precomputed_checks_classes_and_patch_size(annotated):
    from turbox_mm.datasets.transforms import LoadMapGT
    info = load(osp.join(annotated, 'nuscenes_infos_train.pkl'))['data_list'][0]
    with pytest.raises(MapAnnotationError, match=rf"LoadMapGT, sample {info['token']}: "
                                                 r"map_annotation was cut for classes"):
        LoadMapGT(annotated, impl='precomputed', map_classes=['centerline'])(dict(info))
    with pytest.raises(MapAnnotationError, match=r'not \[40\.0, 20\.0\].*--patch-size 40 20'):
        LoadMapGT(annotated, impl='precomputed', patch_size=(40, 20))(dict(info))


def test_sample_without_annotation_is_named_or_falls_back_with_one_warning(generated):
    """Infos without map_annotation (the synthetic generator's): a KeyError naming the sample
    and the command; with fallback='reference' the reference's outputs and one warning."""
    from turbox_mm.datasets.transforms import LoadMapGT
    samples = load(osp.join(generated, 'nuscenes_infos_train.pkl'))['data_list']
    assert MAP_ANNOTATION not in samples[0]
    with pytest.raises(KeyError) as error:
        LoadMapGT(generated, impl='precomputed')(dict(samples[0]))
    message = str(error.value)
    assert samples[0]['token'] in message and "fallback='reference'" in message
    assert command_line(None, generated) in message

    reference = LoadMapGT(generated, impl='reference', seed=0)
    fallback = LoadMapGT(generated, impl='precomputed', fallback='reference', seed=0)
    with logged() as records:
        for info in samples[:3]:
            want, got = reference(dict(info)), fallback(dict(info))
            for key in OUTPUTS:
                assert_identical(got[key], want[key], key)
    warnings = [r for r in records if 'fallback' in r]
    assert len(warnings) == 1, records
    assert samples[0]['token'] in warnings[0] and command_line(None, generated) in warnings[0]
    assert 'cut online with the reference' in warnings[0]
    assert "fallback='reference'" in repr(fallback)


def test_load_map_gt_arguments():
    from turbox_mm.datasets.transforms import LoadMapGT
    with pytest.raises(ValueError, match='fallback must be one of'):
        LoadMapGT('data', impl='precomputed', fallback='fast')
    with pytest.raises(ValueError, match="applies to impl='precomputed' only"):
        LoadMapGT('data', impl='reference', fallback='reference')
    with pytest.raises(ValueError, match='impl must be one of'):
        LoadMapGT('data', impl='annotation')


# -- turbox.data: LoadMapGT(impl='reference') -> precomputed with the reference as fallback -----
def test_turbox_reads_the_precomputed_map_gt_where_stock_cuts_it_online():
    from turbox_mm.engine.runner import TURBOX_OPTIONS, apply_turbox_options
    from turbox_mm.engine.runner.precomputed_map_gt import apply_precomputed_map_gt
    from turbox_mm.utils.options import check_options

    # v1: the stock config cuts online (as upstream's v1); its turbox twin reads map_annotation
    cfg = Config.fromfile(osp.join(ROOT, 'configs/maptr/maptr_tiny_r50_24e_turbox.py'))
    changes = apply_turbox_options(cfg, check_options(cfg.turbox, TURBOX_OPTIONS))
    lines = [c for c in changes if 'LoadMapGT' in c]
    # its index in the rewritten pipeline (fast_pipeline's MapTR style drops the photometric
    # distortion before it)
    assert len(lines) == 3 and lines[0].startswith('train_dataloader.dataset.pipeline[2]: '
                                                   "turbox_mm.LoadMapGT(impl='reference') -> "
                                                   "impl='precomputed', fallback='reference'")
    for name in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        steps = [t for t in cfg[name].dataset.pipeline if t['type'] == 'turbox_mm.LoadMapGT']
        assert len(steps) == 1 and (steps[0].impl, steps[0].fallback) == ('precomputed',
                                                                          'reference')
        assert steps[0].fixed_num == 20 and steps[0].patch_size == (60.0, 30.0)

    # v2: stock reads it precomputed already (as upstream's v2): nothing to change
    cfg = Config.fromfile(osp.join(ROOT, 'configs/maptr/maptrv2_nusc_r50_24ep_turbox.py'))
    changes = apply_turbox_options(cfg, check_options(cfg.turbox, TURBOX_OPTIONS))
    assert not [c for c in changes if 'LoadMapGT' in c]
    step = [t for t in cfg.train_dataloader.dataset.pipeline if 'LoadMapGT' in t['type']][0]
    assert step.impl == 'precomputed' and 'fallback' not in step

    # other impls, other transforms and wrapped datasets; off with fast_pipeline=False
    cfg = Config(dict(
        train_dataloader=dict(dataset=dict(type='CBGSDataset', dataset=dict(pipeline=[
            dict(type='LoadMapGT', data_root='d', impl='reference'),
            dict(type='turbox_mm.LoadMapGT', data_root='d'),  # 'fast' by default
            dict(type='turbox_mm.LoadMapGT', data_root='d', impl='fast'),
            dict(type='turbox_mm.LoadMapGT', data_root='d', impl='precomputed'),
            dict(type='other.LoadMapGT', impl='reference'),
            dict(type='turbox_mm.RasterizeMapGT', impl='reference')]))),
        val_dataloader=dict(dataset=dict(pipeline=[
            dict(type='turbox_mm.LoadMapGT', data_root='d', impl='reference')]))))
    before = copy.deepcopy(cfg.to_dict())
    assert apply_precomputed_map_gt(cfg, dict(fast_pipeline=False)) == []
    assert cfg.to_dict() == before
    changes = apply_precomputed_map_gt(cfg, dict(fast_pipeline=True))
    assert [c.split(':')[0] for c in changes] == [
        'train_dataloader.dataset.dataset.pipeline[0]', 'val_dataloader.dataset.pipeline[0]']
    pipeline = cfg.train_dataloader.dataset.dataset.pipeline
    assert dict(pipeline[0]) == dict(type='LoadMapGT', data_root='d', impl='precomputed',
                                     fallback='reference')
    assert [dict(t) for t in pipeline[1:]] == before['train_dataloader']['dataset']['dataset'][
        'pipeline'][1:]
    assert cfg.val_dataloader.dataset.pipeline[0].fallback == 'reference'
