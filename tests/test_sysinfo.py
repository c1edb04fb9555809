"""System report (pure checks, the CLI) and transparent huge pages for torch's CPU allocator."""
import json
import os
import resource
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, run_python
from turbox_mm.utils import hugepages, sysinfo
from turbox_mm.utils.sysinfo import (Finding, assess, check_cpus, check_governor, check_gpus,
                                     check_memlock, check_nofile, check_numa, check_shm,
                                     check_thp, format_report, parse_nvidia_smi, to_json)

GiB = 1 << 30


def test_thp_checks():
    assert check_thp('madvise', 'madvise').suggestion is None
    assert check_thp('always', 'defer+madvise').suggestion is None
    assert 'echo madvise' in check_thp('never', 'madvise').suggestion
    assert 'defer+madvise' in check_thp('always', 'always').suggestion
    assert check_thp(None, None).value == 'not available'


def test_governor_checks():
    assert check_governor(['performance'] * 4).suggestion is None
    bad = check_governor(['powersave', 'performance'], 'acpi-cpufreq')
    assert 'lowest clock' in bad.suggestion and 'performance' in bad.suggestion
    assert 'ramp-up' in check_governor(['powersave'], 'intel_pstate').suggestion
    assert check_governor([]).value.startswith('unknown')
    assert check_governor(['ondemand']).suggestion is not None
    assert check_governor(['schedutil']).suggestion is None


def test_limits_and_sizes():
    assert check_nofile(1024, 4096).suggestion.count('65536') >= 1
    assert check_nofile(65536, 65536).suggestion is None
    assert check_nofile(resource.RLIM_INFINITY, resource.RLIM_INFINITY).value == \
        'soft unlimited, hard unlimited'
    assert 'unlimited' in check_memlock(64 << 10, 64 << 10).suggestion
    assert check_memlock(resource.RLIM_INFINITY, resource.RLIM_INFINITY).suggestion is None
    assert 'shm-size' in check_shm(64 << 20, 2).suggestion
    assert check_shm(16 * GiB, 8).suggestion is None
    assert '16.0 GiB' in check_shm(8 * GiB, 32).suggestion  # 512 MiB per worker
    assert check_shm(None).value == 'missing'
    quota = check_cpus(32, list(range(16)), 4.0)
    assert 'quota (4)' in quota.suggestion and '0-15' in quota.value
    assert check_cpus(16, list(range(16)), None).suggestion is None
    assert check_numa({0: [0, 1], 1: [2, 3]}).suggestion.count('CPUAffinityHook') == 1
    assert check_numa({0: [0, 1]}).suggestion is None
    assert sysinfo.check_memory_limit(8 * GiB, 64 * GiB).suggestion is not None
    assert sysinfo.check_memory_limit(None, 64 * GiB).suggestion is None


def test_gpu_checks_and_nvidia_smi_parsing():
    assert check_gpus([]) == [Finding('GPU', 'no GPU')]
    text = ('0, NVIDIA H100 80GB HBM3, 570.86.15, Disabled, 345, 1980, 2619, 2619, 1410, '
            '00000000:18:00.0\n'
            '1, NVIDIA H100 80GB HBM3, 570.86.15, Enabled, 1980, 1980, 2619, 2619, 1980, '
            '00000000:2A:00.0\n')
    gpus = parse_nvidia_smi(text)
    assert [g['persistence'] for g in gpus] == [False, True]
    assert gpus[0]['sm_clock_max'] == 1980 and gpus[1]['bus_id'] == '00000000:2A:00.0'
    rows = check_gpus(gpus)
    assert 'nvidia-smi -pm 1' in rows[0].suggestion and 'nvidia-smi -rac' in rows[0].suggestion
    assert rows[1].suggestion is None and 'H100' in rows[1].value
    assert parse_nvidia_smi('[N/A]\n') == []


def test_assess_report_and_json():
    info = dict(versions=dict(python='3.12.3', torch='2.11.0', cuda='13.0'),
                thp_mode='never', thp_defrag='madvise', governors=['powersave'],
                cpufreq_driver='acpi-cpufreq', online_cpus=16, allowed_cpus=list(range(16)),
                cpu_quota=None, memory_limit=None, memory_total=128 * GiB,
                numa_nodes={0: list(range(16))}, shm_size=64 << 20, nofile=(1024, 1048576),
                memlock=(resource.RLIM_INFINITY, resource.RLIM_INFINITY), gpus=[])
    rows = assess(info, num_workers=8)
    flagged = [r.name for r in rows if r.suggestion]
    assert flagged == ['transparent huge pages', 'CPU governor', '/dev/shm',
                       'open files (ulimit -n)']
    text = format_report(rows)
    assert '4 setting(s) with a suggestion' in text and 'no GPU' in text
    assert 'torch 2.11.0' in text
    data = json.loads(json.dumps(to_json(rows, info)))
    assert data['raw']['numa_nodes'] == {'0': list(range(16))}
    assert len(data['findings']) == len(rows)


def test_collect_reads_this_machine():
    info = sysinfo.collect()
    assert info['allowed_cpus'] and info['nofile'][0] != 0
    assert info['versions']['torch']
    assert info['thp_mode'] in (None, 'always', 'madvise', 'never')
    rows = assess(info)
    assert rows[0].name == 'versions' and format_report(rows)


def test_cli_text_and_json():
    proc = run_python(['tools/sysinfo.py', '--json', '--workers', '4'])
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(proc.stdout)
    names = [f['name'] for f in data['findings']]
    for name in ('transparent huge pages', 'CPUs', '/dev/shm', 'open files (ulimit -n)',
                 'locked memory (ulimit -l)', 'NUMA nodes'):
        assert name in names
    assert any(n.startswith('GPU') for n in names)
    proc = run_python(['tools/sysinfo.py', '--workers', '-1'])
    assert proc.returncode == 2 and '--workers must be >= 0' in proc.stderr


# -- huge pages ---------------------------------------------------------------------------------


def test_parse_thp_files(tmp_path):
    assert hugepages.parse_bracketed('always [madvise] never\n') == 'madvise'
    assert hugepages.parse_bracketed('[always] defer defer+madvise madvise never') == 'always'
    assert hugepages.parse_bracketed('') is None
    (tmp_path / 'enabled').write_text('always madvise [never]\n')
    (tmp_path / 'defrag').write_text('[defer] madvise\n')
    assert hugepages.thp_mode(str(tmp_path)) == 'never'
    assert hugepages.thp_defrag(str(tmp_path)) == 'defer'
    assert hugepages.thp_mode(str(tmp_path / 'missing')) is None


def test_enable_refuses_without_thp(tmp_path, monkeypatch):
    monkeypatch.delenv(hugepages.ENV, raising=False)
    hugepages._warned.clear()
    (tmp_path / 'enabled').write_text('always madvise [never]\n')
    status = hugepages.enable_huge_pages(root=str(tmp_path))
    assert not status.env_set and 'never' in status.message
    assert hugepages.ENV not in os.environ
    status = hugepages.enable_huge_pages(root=str(tmp_path / 'none'))
    assert status.mode is None and 'not offered' in status.message
    monkeypatch.setenv(hugepages.ENV, '0')
    (tmp_path / 'enabled').write_text('always [madvise] never\n')
    status = hugepages.enable_huge_pages(root=str(tmp_path), probe=False)
    assert not status.env_set and 'set by the user' in status.message


# The probe runs in a fresh process: torch reads THP_MEM_ALLOC_ENABLE once, at its first
# allocation, and this process allocated long ago. The module is loaded from its file so the
# child does not import all of turbox_mm.
_CHILD = textwrap.dedent('''
    import importlib.util, json, sys
    spec = importlib.util.spec_from_file_location('hp', sys.argv[1])
    hp = importlib.util.module_from_spec(spec); spec.loader.exec_module(hp)
    import torch
    if sys.argv[2] == 'late':
        torch.zeros(16)  # the allocator reads the variable now, unset
    status = hp.enable_huge_pages(pinned_host_register=sys.argv[3] == 'pinned')
    before = hp.anon_huge_kb()
    big = torch.empty(64 << 20, dtype=torch.uint8, pin_memory=sys.argv[3] == 'pinned')
    big.fill_(1)
    after = hp.anon_huge_kb()
    print(json.dumps(dict(mode=status.mode, effective=status.effective, env=status.env_set,
                          message=status.message, delta_kb=after - before,
                          pinned=big.is_pinned())))
''')


def _child(when, pinned=''):
    env = dict(os.environ)
    env.pop(hugepages.ENV, None)
    proc = subprocess.run([sys.executable, '-c', _CHILD,
                           os.path.join(ROOT, 'turbox_mm', 'utils', 'hugepages.py'), when,
                           pinned], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _usable_thp():
    return hugepages.thp_mode() in ('always', 'madvise') and hugepages.anon_huge_kb() is not None


@pytest.mark.skipif(not _usable_thp(), reason='kernel without usable THP or /proc smaps')
def test_huge_pages_for_large_cpu_tensors():
    result = _child('early')
    assert result['env'] and result['effective'] is True, result
    assert result['delta_kb'] >= 32 << 10, result  # most of the 64 MiB is in 2 MiB pages


@pytest.mark.skipif(hugepages.thp_mode() != 'madvise' or hugepages.anon_huge_kb() is None,
                    reason='the latch is only visible under THP mode madvise')
def test_too_late_is_detected_and_said():
    result = _child('late')
    assert result['env'] and result['effective'] is False, result
    assert 'launcher' in result['message']
    assert result['delta_kb'] < 32 << 10, result


@pytest.mark.cuda
def test_pinned_buffers_with_host_register():
    """Pinned memory through malloc + cudaHostRegister; huge pages only under mode always."""
    result = _child('early', 'pinned')
    print(result)
    assert result['pinned'] and 'cudaHostRegister' in result['message']
    if result['mode'] == 'always':
        assert result['delta_kb'] >= 32 << 10, result


@pytest.mark.cuda
def test_report_sees_the_gpus():
    info = sysinfo.collect()
    assert info['gpus'], 'NVML or nvidia-smi should find the GPU'
    gpu = info['gpus'][0]
    assert gpu['name'] and gpu['driver']
    assert info['versions']['cuda']
    print(format_report(assess(info)))


@pytest.mark.skipif(not _usable_thp(), reason='kernel without usable THP or /proc smaps')
def test_hugepages_micro_benchmark_backs_only_the_turbox_side():
    """The two sides run in fresh processes with the variable 0 and 1: only the turbox
    side's collated batch sits in 2 MiB pages."""
    from turbox_mm.benchmark.micro import get
    rows = get('hugepages')('cpu', quick=True)
    assert [r['component'] for r in rows] == ['hugepages']
    note = rows[0]['note']
    stock_kb = int(note.split('stock ')[1].split(' kB')[0])
    turbox_kb = int(note.split('turbox ')[1].split(' kB')[0])
    assert stock_kb == 0 and turbox_kb >= 2048, note
    assert rows[0]['stock']['iters'] == rows[0]['turbox']['iters'] == 5


LAUNCHER = textwrap.dedent('''
    import ctypes, json, os, sys
    if os.environ.get('NO_THP'):  # this process may not have huge pages at all
        ctypes.CDLL(None, use_errno=True).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE
    import torch
    from turbox_mm.utils import hugepages
    torch.ones(4)  # the first allocation latches THP_MEM_ALLOC_ENABLE (unset) off
    restarted = bool(os.environ.get(hugepages.REEXEC_MARK))
    again = hugepages.reexec_for_huge_pages(True)
    print(json.dumps(dict(restarted=restarted, again=again, argv=sys.argv[1:],
                          unbuffered='-u' in sys.orig_argv,
                          effective=hugepages.probe_torch_thp())))
''')


def _launch(args, no_thp=False):
    env = {k: v for k, v in os.environ.items()
           if k not in (hugepages.ENV, hugepages.REEXEC_MARK)}
    if no_thp:
        env['NO_THP'] = '1'
    proc = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.skipif(hugepages.thp_mode() != 'madvise' or hugepages.anon_huge_kb() is None,
                    reason='the latch is only visible under THP mode madvise')
def test_launcher_restarts_once_when_torch_latched_the_setting_off(tmp_path):
    """A process that allocated before the variable was set restarts itself with it (same
    interpreter options and arguments, script or ``-c`` form) and then gets huge pages; a
    second restart never happens, and none where the process cannot have huge pages."""
    script = tmp_path / 'launcher.py'
    script.write_text(LAUNCHER)
    result, err = _launch(['-u', str(script), 'cfg.py', '--x'])
    assert result == dict(restarted=True, again=False, argv=['cfg.py', '--x'], unbuffered=True,
                          effective=True)
    assert err.count('restarting') == 1
    result, _ = _launch(['-c', LAUNCHER, 'cfg.py'])
    assert result['restarted'] and result['argv'] == ['cfg.py'] and result['effective']
    result, err = _launch([str(script)], no_thp=True)
    assert not result['restarted'] and 'restarting' not in err


def test_launcher_does_not_restart_when_not_wanted_or_set(monkeypatch):
    monkeypatch.delenv(hugepages.REEXEC_MARK, raising=False)
    assert hugepages.reexec_for_huge_pages(False) is False
    monkeypatch.setenv(hugepages.ENV, '0')
    assert hugepages.reexec_for_huge_pages(True) is False
