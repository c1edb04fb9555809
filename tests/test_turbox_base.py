"""Inheriting configs/_base_/turbox.py is all a config needs, whatever its other bases set.

The base sets no ``custom_imports``: mmdet3d's ``projects/*`` configs have their own, and
mmengine refuses a key that two bases define. turbox_mm is imported by mmengine's registry
when the launcher looks ``runner_type='turbox_mm.TurboxRunner'`` up, so the runs below start
in fresh processes that never import turbox_mm by hand, as mmdet3d's own tools/train.py would.
"""
import os
import os.path as osp
import textwrap
from unittest import mock

import pytest
from mmengine.config import Config

import turbox_mm  # noqa: F401
from conftest import ROOT, run_python
from turbox_mm.engine.runner import TurboxRunner, build
from turbox_mm.engine.runner.build import build_runner

FIXTURES = osp.join(ROOT, 'tests', 'fixtures')
# A config shaped like mmdet3d's projects/BEVFusion ones, with its own custom_imports.
PROJECT_CFG = osp.join(FIXTURES, 'projects', 'ToyFusion', 'configs', 'toyfusion_smoke.py')
PROJECT_IMPORTS = dict(imports=['projects.ToyFusion.toyfusion'], allow_failed_imports=False)
MMDET3D_CFG = 'mmdet3d::pointpillars/pointpillars_hv_secfpn_8xb6-160e_kitti-3d-3class.py'
TURBOX_BASE = osp.join(ROOT, 'configs', '_base_', 'turbox.py')
# FIXTURES holds `projects/`, as mmdet3d's repository root does for its project configs.
ENV = {'CUDA_VISIBLE_DEVICES': '', 'PYTHONPATH': FIXTURES + os.pathsep + ROOT}


def _user_cfg(tmp_path, first_base: str, body: str = '') -> str:
    """Write a user's turbox twin of ``first_base``: that config plus _base_/turbox.py."""
    path = tmp_path / 'user_turbox.py'
    path.write_text(f'_base_ = [{first_base!r}, {TURBOX_BASE!r}]\n{body}')
    return str(path)


def _run_script(script: str, *args):
    proc = run_python(['-c', textwrap.dedent(script), *map(str, args)], env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def test_turbox_base_sets_no_custom_imports():
    cfg = Config.fromfile(TURBOX_BASE)
    assert set(cfg.to_dict()) == {'runner_type', 'turbox'}


def test_project_config_with_own_custom_imports_trains_with_turbox(tmp_path):
    user_cfg = _user_cfg(tmp_path, PROJECT_CFG,
                         'train_cfg = dict(max_epochs=1, val_interval=10)\n')
    log = _run_script('''
        import sys
        from mmengine.config import Config
        from mmengine.registry import RUNNERS  # as mmdet3d's tools/train.py builds runners
        cfg = Config.fromfile(sys.argv[1])
        print('custom_imports', cfg.custom_imports.to_dict())
        assert 'projects.ToyFusion.toyfusion' in sys.modules, 'custom_imports not honoured'
        assert 'turbox_mm' not in sys.modules, 'turbox_mm imported before the runner lookup'
        cfg.work_dir = sys.argv[2]
        runner = RUNNERS.build(cfg)
        from turbox_mm.engine.runner.turbox_options import TURBOX_OPTIONS
        from turbox_mm.utils.options import check_options
        assert runner.turbox_options == check_options({}, TURBOX_OPTIONS)
        print('built', type(runner).__name__, type(runner.model).__name__)
        print('train_cfg.type', runner.cfg.train_cfg.type)
        print('optim_wrapper', runner.cfg.optim_wrapper.type, runner.cfg.optim_wrapper.constructor)
        print('hooks', [h['type'] for h in runner.cfg.custom_hooks])
        runner.train()
        print('trained', type(runner.train_loop).__name__, type(runner.optim_wrapper).__name__,
              runner.iter)
    ''', user_cfg, tmp_path / 'wd')
    assert f'custom_imports {PROJECT_IMPORTS}' in log
    assert 'built TurboxRunner ToyFusionNet' in log
    assert 'train_cfg.type turbox_mm.PipelinedEpochBasedTrainLoop' in log
    assert ('optim_wrapper turbox_mm.TurboxOptimWrapper '
            'turbox_mm.TurboxOptimWrapperConstructor') in log
    assert "'turbox_mm.GCHook'" in log
    assert 'turbox_mm: config changes' in log
    assert 'trained PipelinedEpochBasedTrainLoop TurboxOptimWrapper 8' in log


def test_shipped_mmdet3d_config_finds_turbox_runner_without_importing_turbox_mm(tmp_path):
    user_cfg = _user_cfg(tmp_path, MMDET3D_CFG)
    log = _run_script('''
        import sys
        import mmdet3d  # the user's stack; turbox_mm is not imported by hand
        from mmengine.config import Config
        from mmengine.registry import RUNNERS  # as mmdet3d's tools/train.py builds runners
        cfg = Config.fromfile(sys.argv[1])
        assert 'custom_imports' not in cfg, cfg.custom_imports
        assert 'turbox_mm' not in sys.modules, 'turbox_mm imported at config load'
        cfg.work_dir = sys.argv[2]
        runner = RUNNERS.build(cfg)
        # Importing turbox_mm.registry ran turbox_mm/__init__.py: the compatibility fixes are
        # in place before the runner could load a checkpoint.
        import torch
        from mmengine.logging import HistoryBuffer
        path = sys.argv[2] + '/history.pth'
        history = HistoryBuffer()
        history.update(1.0)
        history.update(2.0)
        torch.save(dict(history=history), path)
        assert torch.load(path, weights_only=True)['history'].mean() == 1.5
        print('built', type(runner).__name__, type(runner.model).__name__)
        print('train_cfg.type', runner.cfg.train_cfg.type)
    ''', user_cfg, tmp_path / 'wd')
    assert 'built TurboxRunner VoxelNet' in log
    assert 'train_cfg.type turbox_mm.PipelinedEpochBasedTrainLoop' in log


def _mmdet3d_train_script() -> str:
    import mmdet3d
    path = osp.join(osp.dirname(mmdet3d.__file__), '.mim', 'tools', 'train.py')
    if not osp.isfile(path):
        pytest.skip(f"mmdet3d's tools/train.py is not installed at {path}")
    return path


def test_resume_through_mmdet3ds_train_tool(tmp_path):
    """mmdet3d's own launcher, every torch.load forced to weights_only: the resume reads
    mmengine's checkpoint only through turbox_mm's allow-list, which must be in place
    although nothing but the runner lookup imported turbox_mm."""
    tool = _mmdet3d_train_script()
    user_cfg = _user_cfg(tmp_path, PROJECT_CFG, 'train_cfg = dict(val_interval=10)\n')
    env = dict(ENV, TORCH_FORCE_WEIGHTS_ONLY_LOAD='1')
    work_dir = str(tmp_path / 'wd')
    first = run_python([tool, user_cfg, '--work-dir', work_dir, '--cfg-options',
                        'train_cfg.max_epochs=1'], env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    assert osp.isfile(osp.join(work_dir, 'epoch_1.pth'))
    resumed = run_python([tool, user_cfg, '--work-dir', work_dir, '--resume', '--cfg-options',
                          'train_cfg.max_epochs=2'], env=env)
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert 'resumed epoch: 1, iter: 8' in log, log[-3000:]
    assert 'turbox_mm: config changes' in log
    assert osp.isfile(osp.join(work_dir, 'epoch_2.pth'))


def _smoke_cfg(tmp_path, name='smoke_turbox.py', **overrides) -> Config:
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'smoke', name))
    cfg.work_dir = str(tmp_path)
    cfg.merge_from_dict(overrides)
    return cfg


@pytest.mark.parametrize('runner_type', ['Runner', 'mmengine.Runner'])
def test_turbox_section_under_another_runner_warns(tmp_path, runner_type):
    cfg = _smoke_cfg(tmp_path, runner_type=runner_type,
                     experiment_name=f'ignored_{runner_type}')
    with mock.patch.object(build, 'print_log') as print_log:
        runner = build_runner(cfg)
    assert not isinstance(runner, TurboxRunner)
    messages = [c.args[0] for c in print_log.call_args_list]
    assert len(messages) == 1, messages
    assert f"runner_type='{runner_type}'" in messages[0]
    assert 'mmengine.runner.runner.Runner, which ignores it' in messages[0]


def test_turbox_section_without_runner_type_warns(tmp_path):
    cfg = _smoke_cfg(tmp_path, 'smoke_stock.py', experiment_name='ignored_no_runner_type',
                     turbox=dict(report=True))
    assert 'runner_type' not in cfg
    with mock.patch.object(build, 'print_log') as print_log:
        build_runner(cfg)
    (message, ), _ = print_log.call_args
    assert 'no runner_type (mmengine.runner.Runner)' in message


def test_turbox_runner_does_not_warn(tmp_path):
    cfg = _smoke_cfg(tmp_path)
    runner = TurboxRunner.__new__(TurboxRunner)  # built as it is elsewhere; here only its type
    with mock.patch.object(build.RUNNERS, 'build', return_value=runner) as build_fn, \
            mock.patch.object(build, 'print_log') as print_log:
        assert build_runner(cfg) is runner
    build_fn.assert_called_once_with(cfg)
    print_log.assert_not_called()
