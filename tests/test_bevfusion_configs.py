"""BEVFusion lidar-only configs: the full stock config builds, the turbox twin is the stock
config plus the turbox base, and the tiny configs train with falling loss on the CPU and
evaluate through mmdet3d's NuScenesMetric on the synthetic val split."""
import os.path as osp
import re

import pytest
from mmengine.config import Config

from conftest import ROOT, run_python

FULL = 'configs/bevfusion/bevfusion_lidar_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d'


def test_full_config_builds_the_upstream_model():
    import turbox_mm  # noqa: F401
    from mmdet3d.registry import MODELS
    from mmengine.registry import init_default_scope
    cfg = Config.fromfile(osp.join(ROOT, FULL + '_stock.py'))
    init_default_scope('mmdet3d')
    model = MODELS.build(cfg.model)
    assert type(model).__name__ == 'BEVFusion' and model.op_impl == 'stock'
    assert model.pts_middle_encoder.sparse_shape == [1440, 1440, 41]
    assert model.bbox_head.num_proposals == 200 and model.bbox_head.bev_pos.shape == (1, 32400, 2)
    assert cfg.optim_wrapper.optimizer.lr == 1e-4 and cfg.optim_wrapper.clip_grad.max_norm == 35
    assert cfg.train_cfg.max_epochs == 20


def test_turbox_twins_are_the_stock_configs_plus_the_base():
    for stock in (FULL + '_stock.py', 'configs/bevfusion/bevfusion_lidar_tiny_stock.py'):
        turbox = stock.replace('_stock.py', '_turbox.py')
        text = open(osp.join(ROOT, turbox)).read()
        bases = re.findall(r"'([^']+\.py)'", text)
        assert bases == ['./' + osp.basename(stock), '../_base_/turbox.py'], turbox
        assert Config.fromfile(osp.join(ROOT, turbox)).runner_type == 'turbox_mm.TurboxRunner'


@pytest.fixture(scope='module')
def tiny_lidar(tmp_path_factory):
    """3 scenes (2 train, 1 val) of 3 frames with 2 sweeps of 16k points: every class is in
    the GT database with enough points for ObjectSample's filters."""
    root = str(tmp_path_factory.mktemp('bevfusion') / 'nuscenes') + '/'
    proc = run_python(['tools/create_data.py', 'synthetic', '--out', root, '--scenes', '3',
                       '--frames', '3', '--image-size', '320x180', '--points', '16000',
                       '--sweeps', '2', '--val-scenes', '1', '--workers', '1', '--no-progress'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize('name', ['stock', 'turbox'])
def test_tiny_config_trains_and_evaluates_on_the_cpu(tiny_lidar, tmp_path, name):
    proc = run_python(['tools/train.py', f'configs/bevfusion/bevfusion_lidar_tiny_{name}.py',
                       '--work-dir', str(tmp_path)], env={'NUSCENES_ROOT': tiny_lidar},
                      timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    losses = [float(v) for v in re.findall(r'\] +lr: [^\n]*? loss: ([0-9.]+)', log)]
    assert len(losses) == 12, log[-3000:]
    assert sum(losses[-3:]) < sum(losses[:3])  # falling
    assert re.search(r'NDS: \d\.\d{4}', log) and 'mAP:' in log
