"""turbox_mm.datasets.loader_watchdog: a stuck or dead loader worker names its sample."""
import copy
import os
import signal
import time

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from turbox_mm.datasets.loader_watchdog import (WatchedDataLoader, busy_workers,
                                                name_stuck_samples, watch_dataloader)


class Faulty(Dataset):
    """Sample ``bad`` hangs or kills its worker; the others load at once."""

    def __init__(self, bad, how):
        self.bad, self.how = bad, how

    def __len__(self):
        return 12

    def get_data_info(self, index):
        return dict(sample_idx=index, token=f'tok{index}',
                    lidar_points=dict(lidar_path=f'samples/LIDAR_TOP/{index}.bin'))

    def __getitem__(self, index):
        if index == self.bad:
            if self.how == 'hang':
                time.sleep(60)
            elif self.how == 'kill':
                os.kill(os.getpid(), signal.SIGKILL)
            else:
                os._exit(3)
        return torch.tensor([index])


def _loader(dataset, timeout, **kwargs):
    loader = DataLoader(dataset, batch_size=2, num_workers=2, multiprocessing_context='fork',
                        **kwargs)
    return watch_dataloader(loader, timeout)


def test_a_hung_worker_times_out_naming_its_sample():
    loader = _loader(Faulty(5, 'hang'), 2)
    assert isinstance(loader, WatchedDataLoader) and loader.timeout == 2
    start = time.time()
    with pytest.raises(RuntimeError, match=r'timed out after 2.0 seconds\. Loader workers at '
                       r'the time: worker 0: sample index 5 \(sample_idx 5, token tok5, '
                       r'samples/LIDAR_TOP/5\.bin\), for [23] s'):
        list(loader)
    assert time.time() - start < 20


def test_a_dead_worker_is_named_with_its_sample():
    with pytest.raises(RuntimeError, match=r'exited unexpectedly\. Loader workers at the time: '
                       r'worker 1: sample index 7'):
        list(_loader(Faulty(7, 'die'), 30))


def test_a_healthy_loader_gives_the_same_batches_and_leaves_the_workers_idle():
    plain = [b.tolist() for b in DataLoader(Faulty(-1, 'hang'), batch_size=2)]
    loader = _loader(Faulty(-1, 'hang'), 30, persistent_workers=True)
    for _ in range(2):  # a second epoch reuses the persistent workers
        assert [b.tolist() for b in loader] == plain
    assert busy_workers(loader) == []
    assert list(loader._turbox_slots)[::2] == [-1.0, -1.0]


class DictItems(Faulty):
    """Takes the sampler items of GroupInBatchSampler: ``{'idx': i, 'aug_seed': s}``."""

    def __getitem__(self, item):
        return super().__getitem__(item['idx'])


def test_sampler_items_with_an_index_are_recorded_by_it():
    items = [[dict(idx=i, aug_seed=7 * i), dict(idx=i + 1, aug_seed=1)] for i in range(0, 12, 2)]
    loader = DataLoader(DictItems(5, 'hang'), batch_sampler=items, num_workers=2,
                        multiprocessing_context='fork')
    watch_dataloader(loader, 2)
    with pytest.raises(RuntimeError, match=r'worker 0: sample index 5 \(sample_idx 5'):
        list(loader)
    healthy = DataLoader(DictItems(-1, 'hang'), batch_sampler=items, num_workers=2,
                         multiprocessing_context='fork')
    watch_dataloader(healthy, 30)
    assert [b.tolist() for b in healthy] == [[[i], [i + 1]] for i in range(0, 12, 2)]


def test_a_worker_killed_while_the_step_runs_is_named():
    """torch raises "killed by signal" from wherever the main process is (here: the step);
    name_stuck_samples (which TurboxRunner applies to every error) adds the sample."""
    loader = _loader(Faulty(7, 'kill'), 30)
    with pytest.raises(RuntimeError) as info:
        for _ in loader:
            time.sleep(0.5)  # the step
    named = name_stuck_samples(info.value) or info.value
    assert 'worker 1: sample index 7' in str(named), str(named)


def test_loaders_sharing_a_dataset_each_keep_their_record():
    dataset = Faulty(-1, 'hang')
    small = _loader(dataset, 30)
    large = DataLoader(dataset, batch_size=2, num_workers=4, multiprocessing_context='fork')
    watch_dataloader(large, 30)
    assert [b.tolist() for b in large] == [b.tolist() for b in small]
    assert busy_workers(large) == [] and busy_workers(small) == []
    copy.deepcopy(dataset)  # no shared memory on the dataset: it still copies and pickles


def test_a_dataloader_subclass_keeps_its_behaviour():

    class Scaled(DataLoader):

        def __iter__(self):
            return (batch * 100 for batch in super().__iter__())

    loader = watch_dataloader(Scaled(Faulty(-1, 'hang'), batch_size=2, num_workers=1), 30)
    assert isinstance(loader, Scaled) and loader.timeout == 30
    assert next(iter(loader)).tolist() == [[0], [100]]


def test_the_loaders_own_timeout_and_loaders_without_workers_are_kept():
    own = DataLoader(Faulty(-1, 'hang'), num_workers=1, timeout=5)
    assert watch_dataloader(own, 600).timeout == 5
    single = DataLoader(Faulty(-1, 'hang'))
    assert type(watch_dataloader(single, 600)) is DataLoader
    with pytest.raises(ValueError, match='timeout must be > 0'):
        watch_dataloader(DataLoader(Faulty(-1, 'hang'), num_workers=1), 0)


def test_the_runner_watches_its_loaders_and_checks_the_option(tmp_path):
    from mmengine.config import Config

    from turbox_mm.engine.runner import TurboxRunner
    cfg = Config.fromfile('configs/smoke/smoke_turbox.py')
    cfg.work_dir = str(tmp_path)
    cfg.experiment_name = f'watchdog_{os.getpid()}'
    cfg.turbox = dict(cfg.get('turbox', {}), dataloader=dict(timeout=42),
                      system=dict(gc=False, cpu_affinity=False, huge_pages=False),
                      compile=dict(enable=False))
    runner = TurboxRunner.from_cfg(copy.deepcopy(cfg))
    loader_cfg = copy.deepcopy(cfg.train_dataloader)
    loader_cfg['num_workers'] = 1
    loader_cfg.pop('persistent_workers', None)
    loader = runner.build_dataloader(loader_cfg)
    assert isinstance(loader, WatchedDataLoader) and loader.timeout == 42
    cfg.turbox['dataloader'] = dict(timeout=-1)
    with pytest.raises(ValueError, match=r"'turbox.dataloader.timeout' must be None or a number "
                                         r'of seconds > 0, got -1'):
        TurboxRunner.from_cfg(copy.deepcopy(cfg))
