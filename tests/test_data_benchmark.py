"""turbox_mm.benchmark.data end to end on a tiny synthetic nuScenes, on the CPU."""
import numpy as np
import pytest
import torch

from turbox_mm.benchmark.data import (PIPELINES, build_dataset, format_data_rows,
                                      measure_data_pipelines, synthetic_data_root)

ROW_FIELDS = {
    'setting', 'pipeline', 'data_root', 'image_hw', 'final_dim', 'dataset_len', 'batch_size',
    'cpu_ms', 'cpu_ms_p20', 'cpu_ms_p80', 'cpu_ms_mean', 'cpu_ms_by_transform', 'cpu_samples',
    'cpu_vs_stock', 'samples_per_s', 'samples_per_s_whole', 'bytes_to_gpu', 'bytes_by_key',
    'gpu_ms', 'gpu_ms_batch', 'gpu_host_ms', 'gpu_device', 'decode_backend', 'blas_limited'
}


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp('data_bench'))
    options = dict(scenes=1, frames=3, image_size=(320, 180), points=1500, sweeps=3)
    root = synthetic_data_root(cache_dir=cache, **options)
    assert synthetic_data_root(cache_dir=cache, **options) == root  # generated once
    return root


@pytest.fixture(scope='module')
def rows(data_root):
    return measure_data_pipelines(data_root, 'bevfusion', num_workers_list=(0, 1),
                                  num_samples=3, gpu_device='cpu', gpu_iters=2)


@pytest.mark.filterwarnings('ignore:TurboxDet3DDataPreprocessor')
def test_rows_are_complete(rows):
    assert [r['pipeline'] for r in rows] == list(PIPELINES)
    for row in rows:
        assert set(row) == ROW_FIELDS
        assert row['setting'] == 'bevfusion' and row['batch_size'] == 4
        assert row['cpu_ms'] > 0 and row['cpu_ms_p20'] <= row['cpu_ms'] <= row['cpu_ms_p80']
        assert set(row['samples_per_s']) == {0, 1}
        assert all(v > 0 for v in row['samples_per_s'].values())
        assert row['gpu_ms'] > 0 and row['gpu_device'] == 'cpu'
        assert row['cpu_vs_stock'] == pytest.approx(rows[0]['cpu_ms'] / row['cpu_ms'])
        stages = row['cpu_ms_by_transform']
        assert sum(stages.values()) == pytest.approx(row['cpu_ms_mean'], rel=1e-6)
        assert any(name.startswith('LoadPointsFromFile') for name in stages)
    assert 'LoadPointsFromMultiSweeps' in rows[0]['cpu_ms_by_transform']
    assert 'LoadPointsFromMultiSweepsFast' in rows[1]['cpu_ms_by_transform']
    # the BEVFusion config's camera pipeline and its turbox.data rewrite
    assert {'BEVLoadMultiViewImageFromFiles', 'ImageAug3D', 'GridMask'} <= set(
        rows[0]['cpu_ms_by_transform'])
    for row in rows[1:]:
        assert {'BEVLoadMultiViewImagesTurbo', 'ImageAug3DTurbo', 'GridMask'} <= set(
            row['cpu_ms_by_transform'])
    assert len({r['dataset_len'] for r in rows}) == 1 and rows[0]['dataset_len'] == 3
    assert rows[2]['decode_backend'] == 'cv2'  # no GPU decoder here: OpenCV stands in
    table = format_data_rows(rows, title='data')
    assert table.startswith('data\nbevfusion: 6 cameras 320x180')
    assert all(p in table for p in PIPELINES) and 'samples/s N=1' in table


def test_bytes_to_gpu(rows):
    stock, turbox, deferred = (r['bytes_by_key'] for r in rows)
    assert turbox['img'] * 4 == stock['img']  # uint8 against float32, same shapes
    assert stock['points'] == turbox['points'] == deferred['points'] > 0
    assert 'img' not in deferred and 0 < deferred['img_bytes'] < turbox['img']
    for row in rows:
        assert row['bytes_to_gpu'] == pytest.approx(sum(row['bytes_by_key'].values()))
    assert rows[1]['bytes_to_gpu'] < rows[0]['bytes_to_gpu']


@pytest.mark.parametrize('setting', ['sparse4d', 'bevfusion'])
def test_pipelines_agree_on_geometry(data_root, setting):
    datasets = [build_dataset(data_root, setting, p, seed=3) for p in PIPELINES]
    assert len({len(d) for d in datasets}) == 1
    for idx in range(len(datasets[0])):
        configs = [d.get_data_info(idx)['aug_config'] for d in datasets]
        assert configs[0] == configs[1] == configs[2]
        samples = [d[idx] for d in datasets]
        reference = np.stack(samples[0]['data_samples'].lidar2img)
        for sample in samples[1:]:
            np.testing.assert_allclose(np.stack(sample['data_samples'].lidar2img), reference,
                                       rtol=1e-9, atol=1e-6)
        shapes = [s['inputs']['img'].shape for s in samples[:2]]
        assert shapes[0] == shapes[1] and shapes[0][:2] == (6, 3)
        assert samples[1]['inputs']['img'].dtype == torch.uint8
        assert samples[0]['inputs']['img'].dtype == torch.float32
        if setting == 'bevfusion':  # same sweeps drawn, bit-identical points
            assert torch.equal(samples[0]['inputs']['points'], samples[1]['inputs']['points'])


def test_benchmark_tool_data_mode(tmp_path):
    import json

    from conftest import make_tiny_synthetic, run_python
    root = make_tiny_synthetic(tmp_path / 'synth', frames=3, sweeps=3)
    proc = run_python(['tools/benchmark.py', '--data', 'sparse4d', '--data-root', str(root),
                       '--workers', '0', '1', '--data-samples', '3', '--out', str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'turbox_gpu_decode' in proc.stdout and 'command: ' in proc.stdout
    report = json.load(open(tmp_path / 'data_sparse4d.json'))
    assert [r['pipeline'] for r in report['rows']] == list(PIPELINES)


# -- maptr: MapTR v2's training pipeline and its turbox.data rewrite --------------------------

@pytest.fixture(scope='module')
def maptr_root(tmp_path_factory):
    """Two scenes of 320x180 images, keyframe points, the map expansion and the map ground
    truth precomputed into the infos (the map-gt step)."""
    cache = str(tmp_path_factory.mktemp('data_bench_maptr'))
    options = dict(scenes=2, frames=2, image_size=(320, 180), points=1500, sweeps=0,
                   workers=1)
    root = synthetic_data_root(cache_dir=cache, map_gt=True, **options)
    assert root.endswith('_mapgt')
    assert synthetic_data_root(cache_dir=cache, map_gt=True, **options) == root
    return root


@pytest.fixture(scope='module')
def maptr_rows(maptr_root):
    return measure_data_pipelines(maptr_root, 'maptr', num_workers_list=(0, ),
                                  num_samples=3, gpu_device='cpu', gpu_iters=2)


@pytest.mark.filterwarnings('ignore:turbox_mm.ops.photometric')
def test_maptr_rows(maptr_rows):
    from turbox_mm.benchmark.data import setting_pipelines
    assert setting_pipelines('maptr') == ('stock', 'turbox')  # no gpu_decode for MapTR
    assert [r['pipeline'] for r in maptr_rows] == ['stock', 'turbox']
    stock, turbox = maptr_rows
    for row in maptr_rows:
        assert set(row) == ROW_FIELDS
        assert row['setting'] == 'maptr' and row['batch_size'] == 4
        assert row['image_hw'] == (180, 320) and row['final_dim'] == (96, 160)  # 0.5, padded
        assert row['cpu_ms'] > 0 and row['cpu_ms_p20'] <= row['cpu_ms'] <= row['cpu_ms_p80']
        assert set(row['samples_per_s']) == {0} and row['samples_per_s'][0] > 0
        assert row['gpu_ms'] > 0 and row['gpu_device'] == 'cpu'
        assert row['decode_backend'] is None
        stages = row['cpu_ms_by_transform']
        assert sum(stages.values()) == pytest.approx(row['cpu_ms_mean'], rel=1e-6)
        assert {'NuScenesMapTRAdaptor', 'PointToMultiViewDepth', 'PadMultiViewImageDepth',
                'LoadMapGT', 'RasterizeMapGT', 'PackMapTRInputs'} <= set(stages)
    assert stock['dataset_len'] == turbox['dataset_len'] > 0
    # the v2 config's camera pipeline and its rewrite (the checked point loader too)
    assert {'LoadMultiViewImageFromFiles', 'RandomScaleImageMultiViewImage',
            'PhotoMetricDistortionMultiViewImage', 'NormalizeMultiviewImage',
            'LoadPointsFromFile'} <= set(stock['cpu_ms_by_transform'])
    assert {'LoadScaledMultiViewImagesTurbo', 'LoadPointsFromFileChecked'} <= set(
        turbox['cpu_ms_by_transform'])
    assert not {'RandomScaleImageMultiViewImage', 'PhotoMetricDistortionMultiViewImage',
                'NormalizeMultiviewImage'} & set(turbox['cpu_ms_by_transform'])
    # the images only: uint8 against float32, the same padded shapes
    assert set(stock['bytes_by_key']) == set(turbox['bytes_by_key']) == {'img'}
    assert turbox['bytes_by_key']['img'] * 4 == stock['bytes_by_key']['img']
    assert stock['bytes_by_key']['img'] == 6 * 3 * 96 * 160 * 4
    table = format_data_rows(maptr_rows, title='data')
    assert table.startswith('data\nmaptr: 6 cameras 320x180 -> 96x160, batch 4')
    assert 'turbox_gpu_decode' in table and 'refuses gpu_decode for MapTR' in table


def test_maptr_refuses_gpu_decode(maptr_root):
    with pytest.raises(ValueError, match='maptr has no turbox_gpu_decode'):
        measure_data_pipelines(maptr_root, 'maptr', pipelines=('stock', 'turbox_gpu_decode'),
                               num_workers_list=(0, ), num_samples=1)


def test_maptr_pipelines_see_the_same_samples_and_draws(maptr_root):
    """The same samples (those with map elements), the same rescale draw and geometry, the
    same depth, map and segmentation targets; the images uint8 against float32, and the
    preprocessed batches of the same shape."""
    from mmengine.dataset import pseudo_collate

    import mmengine

    from turbox_mm.benchmark.data_setup import build_preprocessors
    stock, turbox = (build_dataset(maptr_root, 'maptr', p, seed=3) for p in ('stock', 'turbox'))
    infos = mmengine.load(f'{maptr_root}/nuscenes_infos_train.pkl')['data_list']
    nonempty = [i['token'] for i in infos if len(i['map_annotation']['labels'])]
    assert len(stock) == len(turbox) == len(nonempty) > 0
    batches = {}
    for idx in range(len(stock)):
        a, b = stock[idx], turbox[idx]
        meta_a, meta_b = a['data_samples'].metainfo, b['data_samples'].metainfo
        assert meta_a['token'] == meta_b['token'] == nonempty[idx]
        assert meta_a['scale_factor'] == meta_b['scale_factor'] == 0.5
        assert meta_a['img_shape'] == meta_b['img_shape'] == [(96, 160, 3)] * 6
        np.testing.assert_allclose(np.stack(meta_b['lidar2img']), np.stack(meta_a['lidar2img']),
                                   rtol=1e-9, atol=1e-6)
        for field in ('gt_depth', 'gt_map_bev_seg', 'gt_map_pv_seg'):
            assert torch.equal(torch.as_tensor(a['data_samples'].get(field)),
                               torch.as_tensor(b['data_samples'].get(field))), field
        gt_a, gt_b = a['data_samples'].gt_instances_3d, b['data_samples'].gt_instances_3d
        assert gt_a.keys() == gt_b.keys() and len(gt_a) > 0
        for key in gt_a.keys():
            assert torch.equal(torch.as_tensor(np.asarray(gt_a[key])),
                               torch.as_tensor(np.asarray(gt_b[key]))), key
        assert a['inputs']['img'].dtype == torch.float32
        assert b['inputs']['img'].dtype == torch.uint8
        assert a['inputs']['img'].shape == b['inputs']['img'].shape == (6, 3, 96, 160)
        batches.setdefault('stock', []).append(a)
        batches.setdefault('turbox', []).append(b)
    preprocessors = build_preprocessors('maptr', seed=0)
    assert set(preprocessors) == {'stock', 'turbox'}
    assert type(preprocessors['turbox']).__name__ == 'TurboxDet3DDataPreprocessor'
    assert preprocessors['turbox'].photometric is not None
    outs = {name: preprocessors[name](pseudo_collate(batches[name]), False)['inputs']['imgs']
            for name in preprocessors}
    assert outs['stock'].shape == outs['turbox'].shape == (len(stock), 6, 3, 96, 160)
    assert outs['turbox'].dtype == torch.float32
    # the padding (rows 90 on) is 0 in normalised units in both: the stock pipeline pads the
    # normalised images, the turbox preprocessor refills it after normalising
    assert (outs['stock'][..., 90:, :] == 0).all() and (outs['turbox'][..., 90:, :] == 0).all()
