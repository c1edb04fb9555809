"""nuScenes tracking evaluation (turbox_mm.NuScenesTrackingMetric and its helpers): the
tracking format as Sparse4D v3 writes it, the checks of a submission, the missing-motmetrics
error, the metric on the synthetic val split, and the tiny Sparse4D configs' tracking
evaluation through tools/test.py."""
import importlib.util
import json
import os.path as osp
import pickle

import numpy as np
import pytest
import torch
from mmengine.config import Config

from conftest import ROOT, make_sparse4d_tiny, run_python
from conftest import build_model as _build, config_with_root as _config

TINY_STOCK = osp.join(ROOT, 'configs/sparse4d/sparse4dv3_tiny_stock.py')
TINY_TURBOX = osp.join(ROOT, 'configs/sparse4d/sparse4dv3_tiny_turbox.py')
FULL_STOCK = osp.join(ROOT, 'configs/sparse4d/sparse4dv3_r50_8xb6-100e_nus-256x704_stock.py')
SPARSE4D_CLASSES = ['car', 'truck', 'construction_vehicle', 'bus', 'trailer', 'barrier',
                    'motorcycle', 'bicycle', 'pedestrian', 'traffic_cone']


# -- the nuScenes tracking format -------------------------------------------------------------

def _info(token='tok0'):
    lidar2ego = np.eye(4)
    lidar2ego[:3, 3] = [1.0, 0.0, 1.8]
    ego2global = np.eye(4)
    ego2global[:2, :2] = [[0.0, -1.0], [1.0, 0.0]]  # 90 degrees about z
    ego2global[:3, 3] = [100.0, 200.0, 0.0]
    return dict(token=token, lidar_points=dict(lidar2ego=lidar2ego.tolist()),
                ego2global=ego2global.tolist())


def _pred(ids=True):
    from mmdet3d.structures import LiDARInstance3DBoxes
    from mmengine.structures import InstanceData
    c = SPARSE4D_CLASSES.index
    boxes = torch.tensor([[10., 2., -1., 4., 2., 1.5, 0.3, 1., 0.],   # car, kept
                          [5., 5., -1., 1., 1., 1., 0., 0., 0.],      # barrier: not tracked
                          [3., -4., -1., .6, .7, 1.8, 0., 0., .5],    # pedestrian, kept
                          [8., 0., -1., 4., 2., 1.5, 0., 0., 0.],     # car, class score 0.1
                          [60., 0., -1., 4., 2., 1.5, 0., 0., 0.],    # car beyond 50 m
                          [9., 9., -1., 8., 3., 3., 0., 0., 0.]])     # truck without an id
    pred = InstanceData()
    pred.bboxes_3d = LiDARInstance3DBoxes(boxes, box_dim=9)
    pred.scores_3d = torch.tensor([0.5, 0.9, 0.3, 0.08, 0.9, 0.9])
    pred.cls_scores = torch.tensor([0.6, 0.9, 0.35, 0.1, 0.9, 0.9])
    pred.labels_3d = torch.tensor([c('car'), c('barrier'), c('pedestrian'), c('car'), c('car'),
                                   c('truck')])
    if ids:
        pred.instance_ids = torch.tensor([7, 8, 9, 10, 11, -1])
    return pred


def test_tracking_entries_follow_upstreams_format():
    from nuscenes.eval.detection.config import config_factory

    from turbox_mm.evaluation.nuscenes_tracking import (TRACKING_BOX_KEYS, tracking_config,
                                                        tracking_entries)
    names = tracking_config().tracking_names
    assert sorted(names) == ['bicycle', 'bus', 'car', 'motorcycle', 'pedestrian', 'trailer',
                             'truck']
    entries = tracking_entries(_pred(), _info(), SPARSE4D_CLASSES, names,
                               config_factory('detection_cvpr_2019'), threshold=0.2)
    assert [(e['tracking_name'], e['tracking_id']) for e in entries] == [('car', '7'),
                                                                         ('pedestrian', '9')]
    car = entries[0]
    assert tuple(car) == TRACKING_BOX_KEYS and car['sample_token'] == 'tok0'
    # gravity centre (10, 2, -0.25) -> ego (+1, 0, +1.8) -> global (rotate 90 deg, translate)
    np.testing.assert_allclose(car['translation'], [100 - 2.0, 200 + 11.0, 1.55], atol=1e-5)
    np.testing.assert_allclose(car['size'], [2.0, 4.0, 1.5])  # w, l, h
    np.testing.assert_allclose(car['velocity'], [0.0, 1.0], atol=1e-6)  # rotated by ego2global
    np.testing.assert_allclose(car['tracking_score'], 0.5)  # scores_3d, not the class score
    every = tracking_entries(_pred(), _info(), SPARSE4D_CLASSES, names,
                             config_factory('detection_cvpr_2019'), threshold=None)
    assert [e['tracking_id'] for e in every] == ['7', '9', '10']  # -1 and out of range: none
    with pytest.raises(KeyError, match=r"sample 'tok0'.*'instance_ids'"):
        tracking_entries(_pred(ids=False), _info(), SPARSE4D_CLASSES, names,
                         config_factory('detection_cvpr_2019'), where="sample 'tok0'")


def _submission(path, results, meta=True):
    body = dict(results=results)
    if meta:
        body['meta'] = dict(use_camera=True, use_lidar=False, use_radar=False, use_map=False,
                            use_external=False)
    with open(path, 'w') as f:
        json.dump(body, f)
    return str(path)


def _box(token, **change):
    box = dict(sample_token=token, translation=[0., 0., 0.], size=[1., 1., 1.],
               rotation=[1., 0., 0., 0.], velocity=[0., 0.], tracking_name='car',
               tracking_score=0.5, tracking_id='3')
    box.update(change)
    return {k: v for k, v in box.items() if v is not None}


def test_a_bad_tracking_submission_names_the_file_token_and_key(tmp_path):
    from turbox_mm.evaluation.nuscenes_tracking import check_tracking_submission
    names, split = ['car', 'pedestrian'], {'a', 'b'}
    good = _submission(tmp_path / 'good.json', {'a': [_box('a')], 'b': []})
    assert check_tracking_submission(good, split, names)['results']['a'][0]['tracking_id'] == '3'
    path = _submission(tmp_path / 'unknown.json', {'a': [], 'b': [], 'zz9': []})
    with pytest.raises(ValueError, match=r"unknown\.json: 1 sample token\(s\) not in .*'zz9'"):
        check_tracking_submission(path, split, names)
    path = _submission(tmp_path / 'missing.json', {'a': []})
    with pytest.raises(ValueError, match=r"missing\.json: 1 sample\(s\) .* 'b'"):
        check_tracking_submission(path, split, names)
    path = _submission(tmp_path / 'noid.json', {'a': [_box('a', tracking_id=None)], 'b': []})
    with pytest.raises(KeyError, match=r"noid\.json: a box of sample 'a' lacks \['tracking_id'\]"
                       r" \(results without instance ids"):
        check_tracking_submission(path, split, names)
    path = _submission(tmp_path / 'cone.json', {'a': [_box('a', tracking_name='barrier')],
                                                'b': []})
    with pytest.raises(ValueError, match=r"cone\.json: sample 'a': tracking_name 'barrier'"):
        check_tracking_submission(path, split, names)
    path = _submission(tmp_path / 'moved.json', {'a': [_box('b')], 'b': []})
    with pytest.raises(ValueError, match=r"filed under sample 'a' names sample_token 'b'"):
        check_tracking_submission(path, split, names)
    path = _submission(tmp_path / 'nometa.json', {'a': [], 'b': []}, meta=False)
    with pytest.raises(KeyError, match=r"nometa\.json: no 'meta'"):
        check_tracking_submission(path, split, names)


def test_missing_motmetrics_names_the_package_and_extra(monkeypatch, tmp_path):
    from turbox_mm.evaluation import NuScenesTrackingMetric
    from turbox_mm.evaluation.nuscenes_tracking import evaluate_tracking
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *a: None if name == 'motmetrics' else real(name, *a))
    message = r"motmetrics .*pip install 'turbox_mm\[tracking\]'"
    with pytest.raises(ImportError, match=message):
        NuScenesTrackingMetric(data_root='data/', ann_file='data/val.pkl')
    with pytest.raises(ImportError, match=message):
        evaluate_tracking(str(tmp_path / 'r.json'), 'data/', 'v1.0-trainval')
    # Detection alone, or writing the tracking json only, needs no motmetrics.
    NuScenesTrackingMetric(data_root='data/', ann_file='data/val.pkl', metric='bbox')
    NuScenesTrackingMetric(data_root='data/', ann_file='data/val.pkl', format_only=True,
                           jsonfile_prefix=str(tmp_path))
    with pytest.raises(ValueError, match="metric must be among"):
        NuScenesTrackingMetric(data_root='data/', ann_file='data/val.pkl', metric='segm')


def test_the_configs_evaluate_detection_and_tracking():
    cfg = Config.fromfile(FULL_STOCK)
    for key in ('val_evaluator', 'test_evaluator'):
        metric = cfg[key].metrics
        assert metric.type == 'turbox_mm.NuScenesTrackingMetric'
        assert metric.metric == ['bbox', 'tracking'] and metric.tracking_threshold == 0.2
    tiny = Config.fromfile(TINY_STOCK)
    assert tiny.val_evaluator.metrics.type == 'turbox_mm.NuScenesTrackingMetric'
    assert tiny.val_evaluator.metrics.tracking_threshold == 0.0


# -- on the synthetic val split ---------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_root(tmp_path_factory):
    return make_sparse4d_tiny(tmp_path_factory.mktemp('data') / 'nuscenes_tiny')


def _val_infos(root):
    with open(osp.join(root, 'nuscenes_infos_val.pkl'), 'rb') as f:
        data = pickle.load(f)
    classes = sorted(data['metainfo']['categories'], key=data['metainfo']['categories'].get)
    return data['data_list'], classes


def _ground_truth_as_tracks(infos, relabel=None):
    """Each val sample's ground truth as predictions with its instance ids (optionally
    renamed per row by ``relabel(row, ids)``)."""
    from mmdet3d.structures import LiDARInstance3DBoxes
    from mmengine.structures import InstanceData
    results = []
    for row, info in enumerate(infos):
        inst = [i for i in info['instances'] if i['bbox_label_3d'] >= 0]
        boxes = torch.tensor([i['bbox_3d'] + list(i['velocity']) for i in inst],
                             dtype=torch.float32).view(-1, 9)
        pred = InstanceData()
        pred.bboxes_3d = LiDARInstance3DBoxes(boxes, box_dim=9)
        pred.labels_3d = torch.tensor([i['bbox_label_3d'] for i in inst], dtype=torch.long)
        pred.scores_3d = torch.full((len(inst), ), 0.9)
        ids = torch.tensor([i['instance_id'] for i in inst], dtype=torch.long)
        pred.instance_ids = relabel(row, ids) if relabel else ids
        results.append(dict(pred_instances_3d=pred, sample_idx=row))
    return results


def _metric(root, classes, **kwargs):
    from turbox_mm.evaluation import NuScenesTrackingMetric
    metric = NuScenesTrackingMetric(data_root=root, ann_file=root + 'nuscenes_infos_val.pkl',
                                    metric='tracking', **kwargs)
    metric.dataset_meta = dict(classes=classes, version='v1.0-trainval')
    return metric


def test_metric_on_the_synthetic_val_split(tiny_root, tmp_path):
    infos, classes = _val_infos(tiny_root)
    metric = _metric(tiny_root, classes, jsonfile_prefix=str(tmp_path / 'out'))
    good = metric.compute_metrics(_ground_truth_as_tracks(infos))
    key = 'pred_instances_3d_NuScenes/'
    assert good[key + 'AMOTA'] > 0.5 and good[key + 'IDS'] == 0
    assert {key + k for k in ('AMOTP', 'RECALL', 'MOTA', 'FP', 'FN', 'car_AMOTA')} <= set(good)
    written = json.load(open(tmp_path / 'out' / 'pred_instances_3d_tracking' /
                             'results_nusc.json'))
    assert set(written['results']) == {i['token'] for i in infos}
    # Ids that change hands half way through the scene: identity switches, a lower AMOTA.
    half = len(infos) // 2
    swapped = metric.compute_metrics(_ground_truth_as_tracks(
        infos, relabel=lambda row, ids: ids.flip(0) if row >= half else ids))
    assert swapped[key + 'IDS'] > 0 and swapped[key + 'AMOTA'] < good[key + 'AMOTA']


def test_metric_refuses_results_without_ids(tiny_root):
    infos, classes = _val_infos(tiny_root)
    results = _ground_truth_as_tracks(infos)
    del results[2]['pred_instances_3d'].instance_ids
    with pytest.raises(KeyError, match=rf"nuscenes_infos_val\.pkl: sample "
                       rf"'{infos[2]['token']}' \(row 2\).*'instance_ids'"):
        _metric(tiny_root, classes).compute_metrics(results)


def test_evaluation_names_unknown_tokens_and_missing_tables(tiny_root, tmp_path):
    from turbox_mm.evaluation.nuscenes_tracking import evaluate_tracking
    infos, _ = _val_infos(tiny_root)
    results = {i['token']: [] for i in infos}
    results['not-a-sample'] = []
    path = _submission(tmp_path / 'extra.json', results)
    with pytest.raises(ValueError, match=r"extra\.json: 1 sample token\(s\) not in the val split "
                       r"of v1\.0-trainval.*'not-a-sample'"):
        evaluate_tracking(path, tiny_root, 'v1.0-trainval')
    with pytest.raises(FileNotFoundError, match=r'v1\.0-trainval/scene\.json'):
        evaluate_tracking(path, str(tmp_path), 'v1.0-trainval')
    with pytest.raises(ValueError, match="version 'v1.0-test'"):
        evaluate_tracking(path, tiny_root, 'v1.0-test')
    # A submission without a box: the devkit's values for no tracks.
    del results['not-a-sample']
    empty = evaluate_tracking(_submission(tmp_path / 'empty.json', results), tiny_root,
                              'v1.0-trainval')
    assert (empty['amota'], empty['amotp'], empty['recall']) == (0.0, 2.0, 0.0)


@pytest.mark.slow
@pytest.mark.parametrize('config', [TINY_STOCK, TINY_TURBOX], ids=['stock', 'turbox'])
def test_tiny_config_tracks_on_the_synthetic_val_split(tiny_root, tmp_path, config):
    """The issue's done-criterion on the CPU: tools/test.py with the tiny config evaluates
    tracking on the synthetic val split and prints AMOTA, AMOTP, IDS, ..."""
    torch.manual_seed(0)
    checkpoint = tmp_path / 'init.pth'
    torch.save(dict(state_dict=_build(_config(TINY_STOCK, tiny_root)).state_dict(), meta={}),
               checkpoint)
    prefix = tmp_path / 'results'
    proc = run_python(['tools/test.py', config, str(checkpoint), '--work-dir',
                       str(tmp_path / 'work'), '--cfg-options',
                       f'test_evaluator.metrics.jsonfile_prefix={prefix}'],
                      env={'NUSCENES_ROOT': tiny_root}, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    for name in ('AMOTA', 'AMOTP', 'RECALL', 'MOTA', 'IDS', 'FRAG', 'car_AMOTA', 'NDS'):
        assert f'NuScenes metric/pred_instances_3d_NuScenes/{name}:' in log, name
    assert 'Aggregated results:' in log  # the devkit's table, logged
    written = json.load(open(prefix / 'pred_instances_3d_tracking' / 'results_nusc.json'))
    infos, _ = _val_infos(tiny_root)
    order = sorted(infos, key=lambda i: i['timestamp'])
    ids = [{b['tracking_id'] for b in written['results'][i['token']]} for i in order]
    assert all(ids) and any(a & b for a, b in zip(ids, ids[1:]))  # tracks span frames
