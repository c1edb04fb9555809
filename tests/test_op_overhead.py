"""tools/op_overhead.py: the host-time table of the custom ops, with the launches stubbed;
and the launch path it measures (the autotuner's pick reused).

Quick runs (a few calls): every op reports a row, the differentiable ones a forward and a
forward + backward row, and the stub really stops the kernels. No timing is asserted: the
numbers are the tool's output, goals live in the benchmarks.
"""
import pytest
import torch

from tools import op_overhead
from turbox_mm.ops import dispatch

triton = pytest.importorskip('triton')

DIFFERENTIABLE = ('ms_deform_attn', 'deformable_aggregation', 'geometric_kernel_attn',
                  'bev_pool', 'dynamic_scatter', 'sigmoid_focal')


def test_reports_every_op():
    rows = op_overhead.measure(calls=3, warmup=1)
    names = [c.name for c in op_overhead.op_cases()]
    assert sorted({r['op'] for r in rows}) == sorted(names)
    # Every turbox_mm op registered by now (op_cases imported them all) has its row; the
    # backward ops are timed through their forward's.
    registered = {n.split('::')[1] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith('turbox_mm::')}
    forward_ops = {n for n in registered if not n.startswith('_') and not n.endswith('_backward')}
    assert forward_ops <= set(names), forward_ops - set(names)
    paths = {(r['op'], r['path']) for r in rows}
    for name in DIFFERENTIABLE:
        assert {(name, 'fwd'), (name, 'fwd+bwd')} <= paths
    for r in rows:
        if r['path'] == 'skipped':
            assert r['us'] is None and r['note']
        else:
            assert r['us'] > 0 and r['p20'] <= r['p80']
    table = op_overhead.format_table(rows)
    assert all(name in table for name in names)


def test_stub_takes_the_kernel_path_and_launches_nothing(monkeypatch):
    """Inside ``stubbed_launches`` the ops take their kernel path on CPU tensors and every
    launch reaches the stub: one per forward, two per forward + backward of MSDA."""
    launches = []

    def counting(self, *args, grid, warmup, **kwargs):
        launches.append(self)

    monkeypatch.setattr(op_overhead, '_no_launch', counting)
    with op_overhead.stubbed_launches():
        assert dispatch.fallback_reason(torch.zeros(1), True) is None
        steps = op_overhead._steps(op_overhead.op_cases()[0], 'cpu')  # ms_deform_attn
        launches.clear()
        steps['fwd']()
        assert len(launches) == 1
        steps['fwd+bwd']()
        assert len(launches) == 3


def test_cli_prints_the_table(capsys):
    assert op_overhead.main(['--ops', 'ms_deform_attn', 'bev_pool', '--calls', '2',
                             '--warmup', '1']) == 0
    printed = capsys.readouterr().out
    assert 'launches stubbed' in printed
    assert '| ms_deform_attn | fwd+bwd |' in printed and '| bev_pool | fwd |' in printed


def test_unknown_op_is_an_error():
    with pytest.raises(ValueError, match='unknown'):
        op_overhead.measure(calls=1, warmup=0, ops=['no_such_op'])


def test_autotuned_launch_reuses_the_pick(monkeypatch):
    """On CUDA the autotuner runs once per key (key arguments and dtypes); later launches of
    the key go straight to the kernel with the configuration it picked. Stand-ins for the
    kernel and the autotuner: no GPU needed."""
    from turbox_mm.ops._triton_launch import KernelPair, cdiv
    launches, tuned = [], []

    class Kernel:  # kernel[grid](*args, **kwargs), as a triton.jit function

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(('kernel', grid, kwargs))

    class Tuner:  # the same through triton.autotune, which records its pick

        best_config = triton.Config({'BLOCK': 4}, num_warps=2)

        def __getitem__(self, grid):
            meta = self.best_config.all_kwargs()
            return lambda *args, **kwargs: launches.append(('tuner', grid(meta), kwargs))

    pair = KernelPair(Kernel(), Kernel(), lambda kind, *layout: [], key=['N'], reset_to_zero=[])
    monkeypatch.setattr(pair, 'tuned', lambda kind, *layout: tuned.append(kind) or Tuner())

    def grid(meta):
        return (cdiv(10, meta['BLOCK']), )

    def launch(n=10, dtype=torch.float32):
        pair._launch_cuda('fwd', pair.fwd, (1, ), grid, (torch.zeros(2, dtype=dtype), ),
                          dict(N=n), None)

    for _ in range(3):
        launch()
    assert tuned == ['fwd'] and [entry[0] for entry in launches] == ['tuner', 'kernel', 'kernel']
    _, programs, kwargs = launches[-1]
    assert programs == (3, ) and kwargs['BLOCK'] == 4 and kwargs['num_warps'] == 2
    assert kwargs['N'] == 10
    launch(n=11)
    launch(dtype=torch.float64)
    assert tuned == ['fwd'] * 3
