"""MapTR v2 with the centerline class: the configs differ from the v2 ones exactly as
upstream's maptrv2_nusc_r50_24ep_w_centerline (@ 2bb012a) differs from maptrv2_nusc_r50_24ep,
the synthetic data carries centerlines, one four-class map-gt run serves both config
families, and the tiny configs train and evaluate the four classes on the CPU."""
import math
import os.path as osp
import pickle
import re

import numpy as np
import pytest
from mmengine.config import Config

from conftest import ROOT

BASE = 'configs/maptr/maptrv2_nusc_r50_24ep'
FULL = 'configs/maptr/maptrv2_nusc_r50_24ep_w_centerline'
TINY_BASE = 'configs/maptr/maptrv2_tiny_cpu'
TINY = 'configs/maptr/maptrv2_tiny_cpu_w_centerline'
CLASSES = ['divider', 'ped_crossing', 'boundary', 'centerline']


def load(name):
    return Config.fromfile(osp.join(ROOT, name))


def flat(value, prefix=''):
    """``{dotted.path[i]: leaf}`` of a config."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat(item, f'{prefix}.{key}')
                .items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in flat(item, f'{prefix}[{i}]')
                .items()}
    return {prefix: value}


def differences(base, variant):
    a, b = flat(load(base)._cfg_dict.to_dict()), flat(load(variant)._cfg_dict.to_dict())
    return {key: (a.get(key), b.get(key)) for key in set(a) | set(b)
            if a.get(key, '<none>') != b.get(key, '<none>')}


@pytest.mark.parametrize('base,variant,num_vec', [(BASE, FULL, (50, 70)),
                                                  (TINY_BASE, TINY, (6, 8))])
def test_the_configs_differ_as_upstreams_do(base, variant, num_vec):
    """The class list (config, both LoadMapGT steps, the metric), the head's and the
    coder's class count, and the one-to-one vectors: nothing else."""
    diff = differences(f'{base}_stock.py', f'{variant}_stock.py')
    expected = {'.num_map_classes': (3, 4), '.num_vec': num_vec,
                '.model.pts_bbox_head.num_classes': (3, 4),
                '.model.pts_bbox_head.bbox_coder.num_classes': (3, 4),
                '.model.pts_bbox_head.num_vec_one2one': num_vec}
    for key, value in expected.items():
        assert diff.pop(key) == value, key
    assert diff.pop('.map_classes[3]') == (None, 'centerline')
    assert diff.pop('.map_gt.map_classes[3]') == (None, 'centerline')
    diff.pop('.patch_size[0]', None), diff.pop('.patch_size[1]', None)  # a helper variable
    for key, value in diff.items():  # the pipelines' LoadMapGT steps and the metrics
        assert value == (None, 'centerline') and key.endswith('map_classes[3]') or \
            key.endswith('evaluator.classes[3]'), (key, value)
    cfg = load(f'{variant}_stock.py')
    steps = [t for t in cfg.train_dataloader.dataset.pipeline + cfg.val_dataloader.dataset
             .pipeline if t['type'] == 'turbox_mm.LoadMapGT']
    assert len(steps) == 2 and all(t['map_classes'] == CLASSES for t in steps)
    assert cfg.val_evaluator.classes == CLASSES and cfg.test_evaluator.classes == CLASSES


@pytest.mark.parametrize('stock', [FULL + '_stock.py', TINY + '_stock.py'])
def test_turbox_twins_are_the_stock_configs_plus_the_base(stock):
    twin = stock.replace('_stock.py', '_turbox.py')
    with open(osp.join(ROOT, twin)) as f:
        code = [line for line in f if line.strip() and not line.startswith('#')]
    assert code == [f"_base_ = ['./{osp.basename(stock)}', '../_base_/turbox.py']\n"]


def test_the_full_model_builds_with_four_classes():
    import torch

    import turbox_mm  # noqa: F401
    from mmdet3d.registry import MODELS
    from mmengine.registry import init_default_scope
    cfg = load(FULL + '_stock.py')
    cfg.model.img_backbone.init_cfg = None
    init_default_scope('mmdet3d')
    head = MODELS.build(cfg.model).pts_bbox_head
    assert (head.num_vec_one2one, head.num_vec_one2many) == (70, 300)
    assert head.cls_branches[0](torch.zeros(1, 256)).shape == (1, 4)
    assert head.bbox_coder.num_classes == 4 and head.bbox_coder.max_num == 50


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    """The tiny MapTR data with the map ground truth of the four classes precomputed."""
    from conftest import make_maptr_tiny
    return make_maptr_tiny(tmp_path_factory.mktemp('maptrv2_centerline') / 'nuscenes',
                           map_gt=True, map_classes=CLASSES)


def _infos(root, split):
    with open(osp.join(root, f'nuscenes_infos_{split}.pkl'), 'rb') as f:
        return pickle.load(f)['data_list']


def test_the_data_has_centerlines_and_serves_both_config_families(tiny_data):
    """Every sample's annotation holds centerlines (the synthetic lanes, label 3), the fast
    cut gives them too, and the three-class transform reads the same annotation as the
    reference's three-class cut."""
    from turbox_mm.datasets.map_gt import (VectorizedLocalMapReference, lidar2global_of,
                                           select_map_classes)
    from turbox_mm.datasets.transforms import LoadMapGT
    reference3 = VectorizedLocalMapReference(tiny_data, (60.0, 30.0), CLASSES[:3])
    for split in ('train', 'val'):
        for info in _infos(tiny_data, split):
            annotation = info['map_annotation']
            assert annotation['classes'] == CLASSES
            assert 3 in annotation['labels'], info['token']
            three = LoadMapGT(tiny_data, impl='precomputed', map_classes=CLASSES[:3])(
                dict(info))
            want, want_labels = reference3(info['map_location'], lidar2global_of(info))
            np.testing.assert_array_equal(three['gt_map_labels'], want_labels)
            for got, line in zip(three['gt_map_polylines'], want):
                np.testing.assert_array_equal(got, line)
            four = LoadMapGT(tiny_data, impl='precomputed', map_classes=CLASSES)(dict(info))
            fast = LoadMapGT(tiny_data, impl='fast', map_classes=CLASSES)(dict(info))
            centre = four['gt_map_labels'] == 3
            assert np.array_equal(fast['gt_map_labels'] == 3, centre)
            for got, line in zip(np.asarray(fast['gt_map_polylines'], object)[centre],
                                 np.asarray(four['gt_map_polylines'], object)[centre]):
                np.testing.assert_array_equal(got, line)
            # a centerline keeps its forward order only
            assert (four['gt_map_shifts'][centre, 1:] == -10000).all()
            np.testing.assert_array_equal(four['gt_map_shifts'][centre, 0],
                                          four['gt_map_pts'][centre])
            reordered, labels = select_map_classes(
                four['gt_map_polylines'], four['gt_map_labels'], CLASSES,
                ['centerline', 'divider'])
            assert labels.tolist() == sorted(labels.tolist(), key=lambda v: v != 3)


@pytest.mark.slow
def test_tiny_configs_train_and_evaluate_the_four_classes(tiny_data, tmp_path):
    """Stock and turbox: 8 iterations, finite and falling losses, the Chamfer AP of each of
    the four classes and the mAP on the synthetic val split; the first step agrees."""
    from conftest import run_python
    first = {}
    for name in ('stock', 'turbox'):
        proc = run_python(['tools/train.py', f'{TINY}_{name}.py', '--work-dir',
                           str(tmp_path / name)], env={'NUSCENES_ROOT': tiny_data},
                          timeout=900)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-4000:]
        lines = re.findall(r'Iter\(train\) \[\d+/\d+\][^\n]*', log)
        assert len(lines) == 8, log[-3000:]
        losses = [float(re.search(r' loss: ([0-9.]+)', line).group(1)) for line in lines]
        assert all(math.isfinite(v) for v in losses)
        assert sum(losses[-3:]) < sum(losses[:3]), losses
        for cls in CLASSES:
            found = re.search(rf'NuscMap_chamfer/{cls}_AP: \d\.\d{{4}}', log)
            assert found, (cls, log[-3000:])
        assert re.search(r'NuscMap_chamfer/mAP: \d\.\d{4}', log), log[-3000:]
        first[name] = losses[0]
    assert first['turbox'] == pytest.approx(first['stock'], rel=0.03)
