"""A damaged info file (``ann_file``) fails naming itself (issue 16).

mmengine unpickles a dataset's info file when ``TurboxRunner.build_dataloader`` builds the
dataset (at once, or in ``full_init`` with ``lazy_init=True``); a truncated file gave a bare
``UnpicklingError('pickle data was truncated')`` (or ``EOFError``) naming nothing. The runner
now raises :class:`~turbox_mm.datasets.synthetic.InfoFileError` naming the file as the dataset
resolves it (``data_root`` + ``ann_file``) and the check to run, chained to the original
error, for the train, val and test loaders alike; any other error passes unchanged.

Most cases train the smoke model on a dataset that lists its samples in an mmengine-format
info file (seconds); one builds turbox_mm's ``Sparse4DNuScenesDataset`` from the tiny Sparse4D
config on a one-sample info file.
"""
import copy
import os
import pickle

import pytest
from conftest import config_with_root
from mmengine.config import Config
from mmengine.dataset import BaseDataset

from turbox_mm.datasets.synthetic import InfoFileError
from turbox_mm.registry import DATASETS
from turbox_mm.testing import SmokeDataset

SMOKE = 'configs/smoke/smoke_turbox.py'
SPARSE4D_TINY = 'configs/sparse4d/sparse4dv3_tiny_turbox.py'
NUM = 16  # samples of each info file: 2 iterations of 8


@DATASETS.register_module(name='InfoFileSmokeDataset', force=True)
class InfoFileSmokeDataset(BaseDataset):
    """The smoke dataset's samples, listed in an info file (``{'metainfo', 'data_list'}``
    with one ``{'index': i}`` per sample) that mmengine's ``BaseDataset`` loads."""

    _smoke = SmokeDataset(num_samples=NUM)

    def prepare_data(self, idx):
        return self._smoke[self.get_data_info(idx)['index']]


def _write_infos(path, cut=None):
    data = pickle.dumps({'metainfo': {}, 'data_list': [{'index': i} for i in range(NUM)]})
    with open(path, 'wb') as f:
        f.write(data if cut is None else data[:int(len(data) * cut)])


def _cfg(tmp_path, lazy=False):
    """The smoke config, one epoch of 2 iterations, each loader on its own info file of
    ``tmp_path`` (``train.pkl``, ``val.pkl``, ``test.pkl``; relative to ``data_root``)."""
    cfg = Config.fromfile(SMOKE)
    cfg.work_dir = str(tmp_path / 'work')
    _cfg.runs = getattr(_cfg, 'runs', 0) + 1  # mmengine names loggers by the second: unique
    cfg.experiment_name = f'infofile_{os.getpid()}_{_cfg.runs}'
    cfg.train_cfg.max_epochs = 1
    cfg.train_cfg.val_interval = 1
    for split in ('train', 'val', 'test'):
        _write_infos(tmp_path / f'{split}.pkl')
        dataset = dict(type='turbox_mm.InfoFileSmokeDataset', data_root=str(tmp_path),
                       ann_file=f'{split}.pkl', data_prefix={}, lazy_init=lazy)
        cfg[f'{split}_dataloader'] = dict(copy.deepcopy(cfg[f'{split}_dataloader']),
                                          num_workers=0, dataset=dataset)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=1)
    cfg.default_hooks.logger.interval = 100
    cfg.log_level = 'WARNING'
    cfg.turbox = dict(cfg.get('turbox', {}))
    # In-process runs: leave the test process's GC and cores alone, and skip compiling.
    cfg.turbox['system'] = dict(gc=False, cpu_affinity=False, huge_pages=False)
    cfg.turbox['compile'] = dict(enable=False)
    cfg.turbox['loop'] = dict(pipelined=False)
    return cfg


def _runner(cfg):
    from turbox_mm.engine.runner import TurboxRunner
    return TurboxRunner.from_cfg(copy.deepcopy(cfg))


def _assert_named(error, path):
    message = str(error.value)
    assert f'cannot read the info file {path} ' in message, message
    assert f'python tools/create_data.py check {path}`' in message, message
    assert isinstance(error.value.__cause__, (pickle.UnpicklingError, EOFError))


@pytest.mark.parametrize('cut, lazy', [(0.5, False), (0.0, True)],
                         ids=['truncated', 'empty-lazy_init'])
def test_a_damaged_train_info_file_is_named(tmp_path, cut, lazy):
    cfg = _cfg(tmp_path, lazy=lazy)
    _write_infos(tmp_path / 'train.pkl', cut=cut)
    with pytest.raises(InfoFileError) as error:
        _runner(cfg).train()
    _assert_named(error, tmp_path / 'train.pkl')
    assert 'InfoFileSmokeDataset' in str(error.value)


@pytest.mark.parametrize('split', ['val', 'test'])
def test_a_damaged_val_or_test_info_file_is_named(tmp_path, split):
    cfg = _cfg(tmp_path, lazy=split == 'test')
    _write_infos(tmp_path / f'{split}.pkl', cut=0.7)
    runner = _runner(cfg)
    with pytest.raises(InfoFileError) as error:
        runner.train() if split == 'val' else runner.test()
    _assert_named(error, tmp_path / f'{split}.pkl')


def test_intact_info_files_train_validate_and_test(tmp_path):
    runner = _runner(_cfg(tmp_path, lazy=True))
    runner.train()
    assert runner.iter == NUM // 8
    assert 'smoke/mse' in runner.test()


def test_other_errors_pass_unchanged(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    with open(tmp_path / 'train.pkl', 'wb') as f:
        pickle.dump(['not', 'a', 'dict'], f)  # whole, but not mmengine's format
    with pytest.raises(TypeError, match='should be a dict'):
        _runner(cfg).train()
    os.remove(tmp_path / 'train.pkl')
    with pytest.raises(FileNotFoundError):
        _runner(cfg).train()

    # an unpickling error where no info file is configured names nothing and stays itself
    cfg = _cfg(tmp_path)
    cfg.train_dataloader.dataset = dict(type='turbox_mm.SmokeDataset', num_samples=NUM)

    def unreadable(self, *args, **kwargs):
        raise pickle.UnpicklingError('injected')

    monkeypatch.setattr(SmokeDataset, '__init__', unreadable)
    with pytest.raises(pickle.UnpicklingError, match='injected'):
        _runner(cfg).train()


def test_sparse4d_dataset_info_file_is_named(tmp_path):
    """turbox_mm's Sparse4D dataset (mmdet3d's NuScenesDataset underneath), as the tiny
    config builds it: data_root + 'nuscenes_infos_train.pkl' (intact: two samples, the
    fewest its batch sampler accepts)."""
    root = str(tmp_path / 'nuscenes') + '/'
    os.makedirs(root)
    loader = config_with_root(SPARSE4D_TINY, root).train_dataloader
    eye = [[float(i == j) for j in range(4)] for i in range(4)]
    sample = dict(sample_idx=0, token='t0', timestamp=0.0, scene_token='s0', ego2global=eye,
                  lidar_points=dict(lidar_path='x.bin', num_pts_feats=5, lidar2ego=eye),
                  images={}, instances=[])
    classes = ('car', 'truck', 'trailer', 'bus', 'construction_vehicle', 'bicycle',
               'motorcycle', 'pedestrian', 'traffic_cone', 'barrier')
    samples = [dict(sample, sample_idx=i, token=f't{i}', scene_token=f's{i}') for i in range(2)]
    data = pickle.dumps({'metainfo': dict(categories={c: i for i, c in enumerate(classes)},
                                          dataset='nuscenes', info_version='1.1'),
                         'data_list': samples})  # 2 scenes: the sampler's batch of 2
    info = root + 'nuscenes_infos_train.pkl'
    with open(info, 'wb') as f:
        f.write(data)
    runner = _runner(_cfg(tmp_path))
    assert len(runner.build_dataloader(loader).dataset) == 2  # intact: builds
    with open(info, 'wb') as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(InfoFileError) as error:
        runner.build_dataloader(loader)
    _assert_named(error, info)
    assert 'Sparse4DNuScenesDataset' in str(error.value)
