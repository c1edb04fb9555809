"""CPU affinity: the layout function, the worker_init_fn and CPUAffinityHook in a real Runner."""
import itertools
import os
import random
from functools import partial
from unittest import mock

import numpy as np
import pytest

from turbox_mm.utils import system
import torch
from mmengine.dataset import worker_init_fn as default_worker_init_fn
from mmengine.hooks import Hook
from mmengine.testing import RunnerTestCase
from torch.utils.data import DataLoader, Dataset

from turbox_mm.engine.hooks.cpu_affinity_hook import CPUAffinityHook
from turbox_mm.registry import FUNCTIONS
from turbox_mm.utils import affinity
from turbox_mm.utils.affinity import (AffinityWorkerInit, format_cpulist, parse_cpu_max,
                                      parse_cpulist, pci_numa_node, plan_affinity,
                                      read_cgroup_cpu_limit, read_numa_nodes)

HAS_AFFINITY = hasattr(os, 'sched_setaffinity')


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(affinity.ENV_ALLOWED, raising=False)
    monkeypatch.delenv(affinity.ENV_GPU_NODES, raising=False)
    monkeypatch.delenv(affinity.ENV_LOCAL, raising=False)
    threads = torch.get_num_threads()
    mask = os.sched_getaffinity(0) if HAS_AFFINITY else None
    yield
    torch.set_num_threads(threads)
    if mask:
        os.sched_setaffinity(0, mask)


# -- parsing ------------------------------------------------------------------------------------


def test_cpulist_round_trip_and_errors():
    assert parse_cpulist('0-3,8,10-11\n') == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpulist('') == []
    assert format_cpulist([11, 0, 1, 2, 3, 8, 10]) == '0-3,8,10-11'
    assert format_cpulist([]) == ''
    with pytest.raises(ValueError, match='not a CPU list'):
        parse_cpulist('3-1')
    with pytest.raises(ValueError, match='not a CPU list'):
        parse_cpulist('a,b')


def test_cgroup_quota_v2_nested_and_v1(tmp_path):
    assert parse_cpu_max('max 100000') is None
    assert parse_cpu_max('150000 100000') == 1.5
    # v2: the process's own cgroup has no limit, its parent allows 3 cores.
    root = tmp_path / 'v2'
    (root / 'job' / 'step').mkdir(parents=True)
    (root / 'cpu.max').write_text('max 100000\n')
    (root / 'job' / 'cpu.max').write_text('300000 100000\n')
    (root / 'job' / 'step' / 'cpu.max').write_text('max 100000\n')
    proc = tmp_path / 'cgroup_v2'
    proc.write_text('0::/job/step\n')
    assert read_cgroup_cpu_limit(str(proc), str(root)) == 3.0
    # v1: quota -1 means none; a quota of 2.5 cores.
    root1 = tmp_path / 'v1'
    (root1 / 'cpu,cpuacct' / 'docker').mkdir(parents=True)
    (root1 / 'cpu,cpuacct' / 'cpu.cfs_quota_us').write_text('-1\n')
    (root1 / 'cpu,cpuacct' / 'cpu.cfs_period_us').write_text('100000\n')
    (root1 / 'cpu,cpuacct' / 'docker' / 'cpu.cfs_quota_us').write_text('250000\n')
    (root1 / 'cpu,cpuacct' / 'docker' / 'cpu.cfs_period_us').write_text('100000\n')
    proc1 = tmp_path / 'cgroup_v1'
    proc1.write_text('4:memory:/docker\n3:cpu,cpuacct:/docker\n')
    assert read_cgroup_cpu_limit(str(proc1), str(root1)) == 2.5
    proc1.write_text('3:cpu,cpuacct:/\n')
    assert read_cgroup_cpu_limit(str(proc1), str(root1)) is None


def test_numa_and_pci_readers(tmp_path):
    for node, cpus in ((0, '0-3'), (1, '4-7')):
        (tmp_path / f'node{node}').mkdir()
        (tmp_path / f'node{node}' / 'cpulist').write_text(cpus + '\n')
    (tmp_path / 'possible').write_text('0-1\n')
    assert read_numa_nodes(str(tmp_path)) == {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}
    pci = tmp_path / 'pci'
    (pci / '0000:18:00.0').mkdir(parents=True)
    (pci / '0000:18:00.0' / 'numa_node').write_text('1\n')
    (pci / '0000:3b:00.0').mkdir()
    (pci / '0000:3b:00.0' / 'numa_node').write_text('-1\n')
    assert pci_numa_node('00000000:18:00.0', str(pci)) == 1  # CUDA's 8-digit domain
    assert pci_numa_node('0000:3B:00.0', str(pci)) is None
    assert pci_numa_node('0000:99:00.0', str(pci)) is None


# -- the plan -----------------------------------------------------------------------------------


def _check_plan(layouts, allowed, size, workers, quota=None):
    usable = len(allowed) if quota is None else min(len(allowed), max(1, int(quota)))
    assert len(layouts) == size
    all_cores = [set(p.cores) for p in layouts]
    for layout in layouts:
        assert layout.main, 'the main process always gets a core'
        assert set(layout.cores) <= set(allowed)
        assert len(layout.workers) == workers
        assert all(w for w in layout.workers)
    if usable >= size:
        for a, b in itertools.combinations(all_cores, 2):
            assert not a & b, 'ranks must not share cores'
        assert len(set().union(*all_cores)) <= usable
        assert len({len(c) for c in all_cores}) == 1, 'equal shares'
        for layout in layouts:
            pool = len(layout.cores) - len(layout.main)
            if pool >= workers > 0:
                sets = [set(w) for w in layout.workers]
                for a, b in itertools.combinations(sets, 2):
                    assert not a & b
                assert not set(layout.main) & set().union(*sets)
            elif workers:
                assert any('share' in n for n in layout.notes)
    else:
        assert any('ranks share' in n for n in layouts[0].notes)


@pytest.mark.parametrize('ncpu,size,workers,quota', [
    (16, 1, 0, None), (16, 1, 4, None), (16, 2, 3, None), (16, 8, 4, None), (16, 4, 8, None),
    (2, 1, 8, None), (2, 4, 2, None), (7, 3, 2, None), (64, 8, 6, 12.5), (16, 2, 4, 0.5),
    (1, 1, 4, None)])
def test_plan_invariants(ncpu, size, workers, quota):
    allowed = list(range(100, 100 + ncpu))  # ids need not start at 0
    layouts = plan_affinity(allowed, size, workers, cpu_limit=quota)
    _check_plan(layouts, allowed, size, workers, quota)
    if quota is not None and quota < ncpu:
        assert any('quota' in n for n in layouts[0].notes)


def test_plan_prefers_each_gpus_numa_node():
    nodes = {0: list(range(0, 8)), 1: list(range(8, 16))}
    layouts = plan_affinity(range(16), 2, 2, numa_nodes=nodes, gpu_nodes=[1, 0])
    _check_plan(layouts, list(range(16)), 2, 2)
    assert set(layouts[0].cores) <= set(nodes[1]) and layouts[0].node == 1
    assert set(layouts[1].cores) <= set(nodes[0]) and layouts[1].node == 0
    # Unknown GPU nodes: ranks spread over nodes in rank order.
    layouts = plan_affinity(range(16), 4, 1, numa_nodes=nodes)
    assert [layout.node for layout in layouts] == [0, 0, 1, 1]
    # All four GPUs on node 0: it is split evenly, the rest comes from node 1, with a note.
    layouts = plan_affinity(range(16), 4, 1, numa_nodes=nodes, gpu_nodes=[0, 0, 0, 0])
    _check_plan(layouts, list(range(16)), 4, 1)
    assert all(len(set(p.cores) & set(nodes[0])) == 2 for p in layouts)
    assert any('another node' in n for n in layouts[0].notes)
    # Allowed CPUs outside the cpuset of a node are never used.
    layouts = plan_affinity([2, 3, 4, 5, 10, 11], 2, 1, numa_nodes=nodes, gpu_nodes=[0, 1])
    assert layouts[0].cores == (2, 3, 4) and set(layouts[1].cores) <= {5, 10, 11}


def test_plan_main_cores_and_auto_share():
    (layout,) = plan_affinity(range(16), 1, 4)
    assert layout.main == (0, 1, 2, 3)  # an equal share: ceil(16 / 5)
    assert layout.workers == ((4, 5, 6), (7, 8, 9), (10, 11, 12), (13, 14, 15))
    (layout,) = plan_affinity(range(16), 1, 4, main_cores=1)
    assert layout.main == (0,) and [len(w) for w in layout.workers] == [4, 4, 4, 3]
    (layout,) = plan_affinity(range(4), 1, 2, main_cores=8)
    assert layout.workers == ((0, 1, 2, 3),) * 2
    assert any('main_cores=8' in n for n in layout.notes)


@pytest.mark.parametrize('kwargs,match', [
    (dict(allowed=[]), 'allowed'),
    (dict(local_world_size=0), 'local_world_size'),
    (dict(num_workers=-1), 'num_workers'),
    (dict(main_cores=0), 'main_cores must be None'),
    (dict(gpu_nodes=[0]), 'gpu_nodes'),
])
def test_plan_rejects_bad_arguments(kwargs, match):
    args = dict(allowed=range(8), local_world_size=2, num_workers=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        plan_affinity(**args)


def test_invalid_options_name_the_valid_values():
    with pytest.raises(ValueError, match="numa is 'gpu'; valid values: 'auto', 'ignore'"):
        CPUAffinityHook(numa='gpu')
    with pytest.raises(ValueError, match='main_cores'):
        CPUAffinityHook(main_cores=True)
    with pytest.raises(ValueError, match="valid values: 'auto', 'ignore'"):
        affinity.current_plan(2, numa='none')


# -- worker_init_fn -----------------------------------------------------------------------------


class _Randoms(Dataset):
    """Each item: the random numbers a worker draws and the CPUs it may run on."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        cpus = sorted(os.sched_getaffinity(0)) if HAS_AFFINITY else []
        return dict(np=float(np.random.rand()), py=random.random(),
                    torch=float(torch.rand(1)), cpus=cpus, threads=torch.get_num_threads())


def _draw(init_fn, workers=2):
    loader = DataLoader(_Randoms(), batch_size=1, num_workers=workers, worker_init_fn=init_fn,
                        multiprocessing_context='fork')
    return [dict(np=b['np'].item(), py=b['py'].item(), torch=b['torch'].item(),
                 cpus=[int(c) for c in b['cpus']], threads=int(b['threads']))
            for b in loader]


def _randoms(items):
    return [(i['np'], i['py'], i['torch']) for i in items]


def test_worker_init_wraps_stock_seeding_and_pins():
    stock = partial(default_worker_init_fn, num_workers=2, rank=0, seed=7)
    cpus = sorted(os.sched_getaffinity(0)) if HAS_AFFINITY else [0]
    cores = [cpus[:1], cpus[-1:]]
    expected = _draw(stock)
    wrapped = _draw(AffinityWorkerInit(stock, cores))
    assert _randoms(wrapped) == _randoms(expected), 'seeding must stay exactly stock'
    if HAS_AFFINITY:
        # Items alternate between workers 0 and 1.
        assert [i['cpus'] for i in wrapped] == [cores[0], cores[1]] * 2
    assert all(i['threads'] == 1 for i in wrapped)


def test_worker_init_calls_the_stock_function_first():
    calls = []
    init = AffinityWorkerInit(lambda wid: calls.append(('seed', wid)), [[0], [1]])
    with mock.patch.object(affinity, 'pin_process',
                           side_effect=lambda cores: calls.append(('pin', cores))):
        init(1)
    assert calls == [('seed', 1), ('pin', (1,))]


def test_registered_worker_init_fn_seeds_like_stock():
    fn = FUNCTIONS.get('turbox_mm.affinity_worker_init_fn')
    assert fn is affinity.affinity_worker_init_fn
    stock = _draw(partial(default_worker_init_fn, num_workers=2, rank=0, seed=3))
    ours = _draw(partial(fn, seed=3, rank=0))
    assert _randoms(ours) == _randoms(stock)
    unseeded = _draw(partial(fn))
    assert len({r[0] for r in _randoms(unseeded)}) == 4  # workers still draw distinct numbers
    if HAS_AFFINITY:
        plan, _ = affinity.current_plan(2)
        assert [i['cpus'] for i in ours] == [list(plan[0].workers[0]),
                                             list(plan[0].workers[1])] * 2


def test_worker_init_fn_from_a_dataloader_config():
    """mmengine's build_dataloader resolves the name and seeds as it does without it."""
    from mmengine.runner import Runner

    def build(**extra):
        cfg = dict(dataset=_Randoms(), sampler=dict(type='DefaultSampler', shuffle=False),
                   batch_size=1, num_workers=2, multiprocessing_context='fork', **extra)
        loader = Runner.build_dataloader(cfg, seed=5)
        return [(b['np'][0], b['py'][0], b['torch'][0]) for b in loader]

    stock = build()
    ours = build(worker_init_fn=dict(type='turbox_mm.affinity_worker_init_fn', seed=5))
    assert ours == stock


def test_pinning_refused_warns_once(caplog):
    system._warned.clear()
    with mock.patch.object(os, 'sched_setaffinity', side_effect=PermissionError(1, 'denied')):
        assert affinity.pin_process([0]) is False
        assert affinity.pin_process([0]) is False
    assert sum('refused' in r.getMessage() for r in caplog.records) <= 1


# -- the hook in a real Runner ------------------------------------------------------------------


class _Probe(Hook):
    """Records the main process's CPUs and the loader workers' CPUs during training."""

    priority = 'LOWEST'

    def __init__(self):
        self.main, self.workers, self.threads, self.init_fn = [], [], [], None

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.main.append(sorted(os.sched_getaffinity(0)))
        self.threads.append(torch.get_num_threads())
        loader = runner.train_loop.dataloader
        self.init_fn = loader.worker_init_fn
        iterator = getattr(getattr(runner.train_loop, 'dataloader_iterator', None),
                           '_iterator', None)
        pids = affinity.running_worker_pids(loader, iterator)
        self.workers.append([sorted(os.sched_getaffinity(p)) for p in pids])


def _shutdown_workers(runner):
    """Stop persistent loader workers now; left to interpreter exit, each costs a 5 s join."""
    loop = runner.train_loop
    iterators = [getattr(loop.dataloader, '_iterator', None),
                 getattr(getattr(loop, 'dataloader_iterator', None), '_iterator', None)]
    for it in iterators:
        if hasattr(it, '_shutdown_workers'):
            it._shutdown_workers()


@pytest.mark.skipif(not HAS_AFFINITY, reason='needs os.sched_setaffinity')
class TestCPUAffinityHook(RunnerTestCase):

    def setUp(self):
        super().setUp()
        self.env = dict(os.environ)
        self.saved_threads = torch.get_num_threads()
        # more threads than any main process gets here, so the hook's lowering of the count
        # is exercised whatever the environment set (OMP_NUM_THREADS=1 would skip it)
        torch.set_num_threads(max(self.saved_threads, os.cpu_count() or 1, 4))
        self.threads = torch.get_num_threads()
        self.mask = os.sched_getaffinity(0)

    def tearDown(self):
        os.environ.clear()
        os.environ.update(self.env)
        torch.set_num_threads(self.saved_threads)
        os.sched_setaffinity(0, self.mask)
        super().tearDown()

    def _run(self, cfg, hook_cfg=None):
        probe = _Probe()
        cfg.custom_hooks = [hook_cfg or dict(type='turbox_mm.CPUAffinityHook')]
        cfg.train_dataloader.num_workers = 2
        cfg.train_dataloader.persistent_workers = True
        cfg.train_dataloader.multiprocessing_context = 'fork'
        runner = self.build_runner(cfg)
        runner.register_hook(probe)
        assert sum(isinstance(h, CPUAffinityHook) for h in runner.hooks) == 1
        with mock.patch('turbox_mm.engine.hooks.cpu_affinity_hook.pin_process',
                        wraps=affinity.pin_process) as pin:
            try:
                runner.train()
            finally:
                _shutdown_workers(runner)
        return runner, probe, pin

    def _expected(self):
        layouts, inputs = affinity.current_plan(2)
        return layouts[inputs['local_rank']]

    def test_epoch_based_pins_main_and_wraps_stock_seeding(self):
        cfg = self.epoch_based_cfg
        cfg.train_cfg.max_epochs = 1
        runner, probe, pin = self._run(cfg)
        layout = self._expected()
        assert probe.main and all(m == sorted(layout.main) for m in probe.main)
        assert probe.workers[-1] == [sorted(w) for w in layout.workers]
        init = probe.init_fn
        assert isinstance(init, AffinityWorkerInit)
        assert init.init_fn.func is default_worker_init_fn  # mmengine's seeding, kept first
        assert init.init_fn.keywords['seed'] == runner.seed
        assert pin.call_args_list[0] == mock.call(layout.main)  # main pinned in before_run
        assert os.sched_getaffinity(0) == self.mask, 'after_run restores the original CPUs'
        assert set(probe.threads) == {min(self.threads, len(layout.main))}
        assert torch.get_num_threads() == self.threads, 'and the thread count'
        assert os.environ[affinity.ENV_ALLOWED] == format_cpulist(sorted(self.mask))

    def test_iter_based_pins_already_running_workers_by_pid(self):
        cfg = self.iter_based_cfg
        cfg.train_cfg.max_iters = 3
        cfg.default_hooks = dict(logger=dict(type='LoggerHook', interval=1))
        runner, probe, pin = self._run(cfg)
        layout = self._expected()
        pids = [c.args[1] for c in pin.call_args_list if len(c.args) > 1]
        assert len(pids) == 2, 'both workers pinned from the main process'
        assert probe.workers[0] == [sorted(w) for w in layout.workers]

    def test_refused_pinning_warns_and_runs_unpinned(self):
        system._warned.clear()
        cfg = self.epoch_based_cfg
        cfg.train_cfg.max_epochs = 1
        with mock.patch.object(os, 'sched_setaffinity',
                               side_effect=PermissionError(1, 'Operation not permitted')):
            runner, probe, _ = self._run(cfg)
        assert all(m == sorted(self.mask) for m in probe.main)
        assert not isinstance(probe.init_fn, AffinityWorkerInit)
        assert 'refused' in ''.join(system._warned)


@pytest.mark.cuda
def test_gpu_numa_nodes_on_a_real_gpu():
    """CUDA device properties carry the PCI ids the plan needs, and sysfs knows them."""
    count = torch.cuda.device_count()
    props = torch.cuda.get_device_properties(0)
    for name in ('pci_domain_id', 'pci_bus_id', 'pci_device_id'):
        assert hasattr(props, name), f'torch {torch.__version__} lacks {name}'
    nodes = affinity.gpu_numa_nodes(count)
    assert nodes is not None and len(nodes) == count
    bus = f'{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0'
    assert os.path.isdir(f'/sys/bus/pci/devices/{bus}'), bus
    print('GPU NUMA nodes:', nodes)
    layouts, inputs = affinity.current_plan(4, local_world_size=count)
    print(affinity.format_plan(layouts, inputs['allowed'], inputs['cpu_limit']))


def test_affinity_micro_benchmark_runs_quick():
    import torch

    from turbox_mm.benchmark.micro import get
    threads = torch.get_num_threads()
    before = os.sched_getaffinity(0)
    rows = get('affinity')('cpu', quick=True)
    assert len(rows) == 1 and rows[0]['stock']['median_ms'] > 0
    assert rows[0]['turbox']['median_ms'] > 0
    assert os.sched_getaffinity(0) == before and torch.get_num_threads() == threads
