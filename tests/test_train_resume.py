"""Train, stop, resume and test through tools/train.py and tools/test.py, in fresh processes.

Every torch.load in these runs is forced to ``weights_only=True``: the resume must work
through turbox_mm's allow-list, never by turning the safety off.
"""
import os
import os.path as osp
import re

import pytest
import torch

import turbox_mm  # noqa: F401  (the allow-list that the checkpoint loads below rely on)
from conftest import logged_losses, run_python

SMOKE = 'configs/smoke/smoke_turbox.py'
ENV = {'TORCH_FORCE_WEIGHTS_ONLY_LOAD': '1', 'CUDA_VISIBLE_DEVICES': ''}
LOG_EVERY_ITER = ['default_hooks.logger.interval=1', 'log_processor.window_size=1']


def _train(work_dir, *extra):
    env = dict(ENV)
    os.environ.pop('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', None)
    proc = run_python(['tools/train.py', SMOKE, '--work-dir', str(work_dir), *extra], env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


_losses = logged_losses


def _weights(path):
    return torch.load(path, map_location='cpu', weights_only=True)['state_dict']


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """One uninterrupted 4-epoch run, and one stopped after 2 epochs then resumed to 4."""
    full = tmp_path_factory.mktemp('full')
    parted = tmp_path_factory.mktemp('parted')
    opts = ['--cfg-options', *LOG_EVERY_ITER]
    _train(full, *opts)
    _train(parted, '--cfg-options', 'train_cfg.max_epochs=2', *LOG_EVERY_ITER)
    resumed = _train(parted, '--resume', *opts)
    return full, parted, resumed


def test_resume_continues_from_checkpoint(runs):
    _, parted, resumed = runs
    log = resumed.stdout + resumed.stderr
    assert 'resumed epoch: 2, iter: 16' in log, log[-3000:]
    assert osp.isfile(osp.join(parted, 'epoch_4.pth'))


def test_resumed_run_matches_uninterrupted_run(runs):
    full, parted, _ = runs
    full_losses, parted_losses = _losses(full), _losses(parted)
    assert sorted(full_losses) == list(range(1, 33))
    assert sorted(parted_losses) == sorted(full_losses)
    for it in full_losses:
        assert parted_losses[it] == pytest.approx(full_losses[it], rel=1e-5, abs=1e-7), it
    # The loss falls: the machinery really trains.
    first = sum(full_losses[i] for i in range(1, 5))
    last = sum(full_losses[i] for i in range(29, 33))
    assert last < 0.2 * first
    a, b = _weights(osp.join(full, 'epoch_4.pth')), _weights(osp.join(parted, 'epoch_4.pth'))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


def test_turbox_runner_reports_changes(runs):
    full, _, resumed = runs
    log = resumed.stdout + resumed.stderr
    assert 'turbox_mm: config changes' in log
    assert 'train_dataloader.persistent_workers = True' in log
    # No CUDA here: pinned memory is skipped with a warning, not silently.
    assert 'keeps pageable memory' in log


def test_test_tool_evaluates_checkpoint(runs, tmp_path):
    full, _, _ = runs
    proc = run_python(['tools/test.py', SMOKE, osp.join(full, 'epoch_4.pth'), '--work-dir',
                       str(tmp_path)], env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.findall(r'smoke/mse: ([0-9.]+)', proc.stdout + proc.stderr)
    assert found, proc.stdout[-2000:]
    # The same checkpoint gave this metric in the training run's last validation.
    train_log = ''.join(
        open(osp.join(full, d, f'{d}.log')).read() for d in os.listdir(full)
        if osp.isfile(osp.join(full, d, f'{d}.log')))
    val = re.findall(r'Epoch\(val\) \[4\].*?smoke/mse: ([0-9.]+)', train_log)
    assert val and float(found[-1]) == pytest.approx(float(val[-1]), rel=1e-4)


def test_resume_from_missing_checkpoint_names_it(tmp_path):
    missing = str(tmp_path / 'nope.pth')
    proc = run_python(['tools/train.py', SMOKE, '--work-dir', str(tmp_path), '--resume',
                       missing], env=ENV)
    assert proc.returncode != 0
    assert f'checkpoint to resume from not found: {missing}' in proc.stderr


def test_unknown_turbox_key_fails_before_training(tmp_path):
    proc = run_python(['tools/train.py', SMOKE, '--work-dir', str(tmp_path), '--cfg-options',
                       'turbox.dataloader.pin_memroy=False'], env=ENV)
    assert proc.returncode != 0
    assert "Unknown config key 'turbox.dataloader.pin_memroy'" in proc.stderr
    assert "did you mean 'pin_memory'" in proc.stderr
    assert not any(f.endswith('.pth') for f in os.listdir(tmp_path))
