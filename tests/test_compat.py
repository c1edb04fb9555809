"""Compatibility fixes: torch.load(weights_only=True) of mmengine checkpoints, config paths."""
import pickle

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.logging import HistoryBuffer, MessageHub

import turbox_mm  # noqa: F401  (applies the fixes)
from turbox_mm.utils.compat import _history_buffer_getattr, mmengine_checkpoint_globals


def _allowed_names():
    return {name for _, name in mmengine_checkpoint_globals()}


def _message_hub_checkpoint(tmp_path):
    hub = MessageHub.get_instance(f'turbox_compat_{tmp_path.name}')
    for i in range(5):
        hub.update_scalar('train/loss', float(i) / 3)
        hub.update_scalar('train/count', np.int64(i))
    hub.update_info('seed', np.int64(7))
    hub.update_info('lr', np.float32(0.5))
    path = str(tmp_path / 'ckpt.pth')
    torch.save(dict(state_dict={'w': torch.ones(2)}, message_hub=hub.state_dict(),
                    meta=dict(epoch=1, iter=5)), path)
    return path


def test_allow_list_covers_a_fresh_checkpoint(tmp_path):
    """Guard the premise: the default allow-list alone rejects an mmengine checkpoint."""
    path = _message_hub_checkpoint(tmp_path)
    added = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path, weights_only=True)
    finally:
        torch.serialization.add_safe_globals(added)
    assert 'mmengine.logging.history_buffer.HistoryBuffer' in needed
    assert needed <= _allowed_names(), needed - _allowed_names()


def test_weights_only_load_roundtrip(tmp_path):
    path = _message_hub_checkpoint(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    hub = MessageHub.get_instance(f'turbox_compat_load_{tmp_path.name}')
    hub.load_state_dict(ckpt['message_hub'])
    buf = hub.get_scalar('train/loss')
    assert isinstance(buf, HistoryBuffer)
    np.testing.assert_allclose(buf.data[0], [0, 1 / 3, 2 / 3, 1, 4 / 3])
    assert buf.mean() == pytest.approx(2 / 3)
    assert hub.get_info('seed') == 7


def test_both_numpy_pickle_names_allowed():
    names = _allowed_names()
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        assert f'{module}._reconstruct' in names and f'{module}.scalar' in names


def test_restricted_getattr():
    assert _history_buffer_getattr(HistoryBuffer, 'mean') is HistoryBuffer.mean
    with pytest.raises(pickle.UnpicklingError, match=r"getattr\(ndarray, 'tofile'\)"):
        _history_buffer_getattr(np.ndarray, 'tofile')
    with pytest.raises(pickle.UnpicklingError, match='__init__'):
        _history_buffer_getattr(HistoryBuffer, '__init__')


class _Evil:
    """Pickles as getattr(numpy.ndarray, 'tofile'): a step towards writing arbitrary files."""

    def __reduce__(self):
        return (getattr, (np.ndarray, 'tofile'))


def test_getattr_still_refused_for_anything_else(tmp_path):
    path = str(tmp_path / 'evil.pth')
    torch.save({'x': _Evil()}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_turbox_config_path_resolves(tmp_path):
    cfg_file = tmp_path / 'user_cfg.py'
    cfg_file.write_text("_base_ = ['turbox_mm::_base_/turbox.py']\n")
    cfg = Config.fromfile(str(cfg_file))
    assert cfg.runner_type == 'turbox_mm.TurboxRunner'
    assert 'custom_imports' not in cfg  # mmengine's registry imports turbox_mm itself


def test_missing_turbox_config_names_file(tmp_path):
    cfg_file = tmp_path / 'user_cfg.py'
    cfg_file.write_text("_base_ = ['turbox_mm::_base_/no_such.py']\n")
    with pytest.raises(FileNotFoundError, match='no_such.py'):
        Config.fromfile(str(cfg_file))


def test_numpy_long_for_mmdet3d_database_sampler():
    """mmdet3d 1.4's DataBaseSampler.sample_all makes its labels with dtype=np.long."""
    from turbox_mm.utils.compat import define_numpy_long

    assert np.dtype(np.long) == np.int64
    assert define_numpy_long() is False  # defined once, by the import, or by numpy 2
    assert np.array([3], dtype=np.long).dtype == np.int64
