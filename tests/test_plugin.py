"""turbox_mm as a plugin of a plain mmdet3d config, and importing it without a GPU."""
import textwrap

from conftest import run_python

MMDET3D_CFG = 'mmdet3d::pointpillars/pointpillars_hv_secfpn_8xb6-160e_kitti-3d-3class.py'


def test_import_without_gpu():
    proc = run_python(['-c', textwrap.dedent('''
        import torch, turbox_mm
        assert not torch.cuda.is_available()
        assert not torch.cuda.is_initialized()
        print('ok', turbox_mm.__version__)
    ''')], env={'CUDA_VISIBLE_DEVICES': ''})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith('ok ')


def _runner_script(extra: str, work_dir) -> str:
    return textwrap.dedent(f'''
        import sys
        from mmengine.config import Config
        from mmengine.runner import Runner
        import mmdet3d  # the user's stack; turbox_mm is not imported by hand
        user_cfg = sys.argv[1]
        cfg = Config.fromfile(user_cfg)
        assert 'turbox_mm' in sys.modules, 'custom_imports did not import turbox_mm'
        cfg.work_dir = {str(work_dir)!r}
        {extra}
        print('built', type(runner).__name__, type(runner.model).__name__)
    ''')


def test_mmdet3d_config_with_custom_imports_builds(tmp_path):
    user_cfg = tmp_path / 'pp_with_turbox.py'
    user_cfg.write_text(textwrap.dedent(f'''
        _base_ = ['{MMDET3D_CFG}']
        custom_imports = dict(imports=['turbox_mm'], allow_failed_imports=False)
    '''))
    extra = textwrap.dedent('''
        runner = Runner.from_cfg(cfg)
        from mmdet3d.registry import MODELS
        assert MODELS.get('turbox_mm.SmokeModel') is not None
    ''').replace('\n', '\n        ')
    proc = run_python(['-c', _runner_script(extra, tmp_path / 'wd'), str(user_cfg)],
                      env={'CUDA_VISIBLE_DEVICES': ''})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert 'built Runner VoxelNet' in proc.stdout


def test_mmdet3d_config_with_turbox_base_builds_turbox_runner(tmp_path):
    user_cfg = tmp_path / 'pp_turbox.py'
    user_cfg.write_text(textwrap.dedent(f'''
        _base_ = ['{MMDET3D_CFG}', 'turbox_mm::_base_/turbox.py']
    '''))
    extra = textwrap.dedent('''
        from mmdet3d.registry import RUNNERS
        runner = RUNNERS.build(cfg)
        assert runner.turbox_options['report'] is True
    ''').replace('\n', '\n        ')
    # `turbox_mm::` paths need turbox_mm imported first, as tools/train.py does.
    script = _runner_script(extra, tmp_path / 'wd').replace(
        'import mmdet3d  #', 'import turbox_mm, mmdet3d  #')
    proc = run_python(['-c', script, str(user_cfg)], env={'CUDA_VISIBLE_DEVICES': ''})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert 'built TurboxRunner VoxelNet' in proc.stdout
