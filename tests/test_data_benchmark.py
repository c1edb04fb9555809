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
