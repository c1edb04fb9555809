"""SyncProneOps, the CPU stand-in for CUDA's synchronisation debug mode: what it reports (host
reads, data-dependent sizes, host data meeting device tensors, copies to the host), with the
line that caused it, and what it leaves alone (arithmetic, host work, pinned uploads, basic
scalar assignment, custom ops)."""
import inspect

import numpy as np
import pytest
import torch

from turbox_mm.benchmark.sync_prone import SyncProneOps
from turbox_mm.utils.upload import upload


def line_of(marker):
    """The line number of the (unique) line of this file that ends with ``marker``."""
    lines = inspect.getsource(inspect.getmodule(line_of)).splitlines()
    hits = [i + 1 for i, text in enumerate(lines) if text.rstrip().endswith(marker)]
    assert len(hits) == 1, (marker, hits)
    return hits[0]


def kinds(found):
    return [(f.kind, f.line) for f in found.findings]


def test_host_reads_are_found_at_their_line():
    x = torch.randn(4, 3)
    with SyncProneOps() as found:
        a = x.sum().item()  # item here
        b = int(x.argmax())  # int here
        if x.sum() > 0:  # bool here
            pass
        c = max(1.0, x.sum())  # max here
    assert kinds(found) == [('sync', line_of('# item here')), ('sync', line_of('# int here')),
                            ('sync', line_of('# bool here')), ('sync', line_of('# max here'))]
    assert found.total == 4 and sum(found.sources.values()) == 4
    assert all(f.file == __file__ and not f.backward for f in found.findings)
    assert found.findings[0].op == 'aten._local_scalar_dense.default'
    del a, b, c


def test_data_dependent_sizes_are_found():
    x = torch.randn(6, 2)
    idx = torch.tensor([0, 2, 2])
    with SyncProneOps() as found:
        x[x[:, 0] > 0]
        torch.nonzero(x > 0)
        torch.where(x > 0)
        x.masked_select(x > 0)
        idx.unique()
        torch.bincount(idx, minlength=3)
        torch.repeat_interleave(idx, idx)
        torch.inverse(torch.eye(3))
    ops = [f.op for f in found.findings]
    assert all(f.kind == 'sync' for f in found.findings)
    assert ops == ['aten.index.Tensor', 'aten.nonzero.default', 'aten.nonzero.default',
                   'aten.masked_select.default', 'aten._unique2.default',
                   'aten.bincount.default', 'aten.repeat_interleave.Tensor',
                   'aten._linalg_check_errors.default']


def test_host_data_on_the_device_is_found():
    x = torch.randn(4, 3)
    idx = torch.tensor([0, 2])
    with SyncProneOps() as found:
        x / x.new_tensor([1.0, 2.0, 4.0])  # new_tensor here
        x / x.new_tensor(2.0)  # scalar new_tensor here
        x[:, [0, 2]]  # list index here
        y = x.clone()
        y[idx] = 1.0  # advanced scalar assignment here
        torch.tensor([1.0, 2.0, 3.0], device=x.device)  # device tensor here
        x * torch.from_numpy(np.ones(3, np.float32)).to(x.device)  # pageable upload here
        host = torch.tensor([1.0, 2.0, 3.0])  # host data here
        x + host * 2  # the host data meets the device data at a later line
    assert kinds(found) == [(kind, line_of(marker)) for kind, marker in [
        ('h2d', '# new_tensor here'), ('h2d', '# scalar new_tensor here'),
        ('h2d', '# list index here'), ('h2d', '# advanced scalar assignment here'),
        ('h2d', '# device tensor here'), ('h2d', '# pageable upload here'),
        ('h2d', '# host data here')]]


def test_device_data_to_the_host_is_found_once():
    x = torch.randn(4, 3)
    with SyncProneOps() as found:
        x.tolist()  # tolist here
        x.detach().cpu().numpy().sum()  # cpu here
        x.detach().to('cpu', torch.float64).tolist()  # to cpu here
        host = torch.from_numpy(np.zeros((4, 3), np.float32))
        host.copy_(x.detach())  # copy into host memory here
        host.tolist()
    assert kinds(found) == [('d2h', line_of('# tolist here')), ('d2h', line_of('# cpu here')),
                            ('d2h', line_of('# to cpu here')),
                            ('d2h', line_of('# copy into host memory here'))]


def test_sync_free_code_is_not_reported():
    x = torch.randn(5, 3, requires_grad=True)
    idx = torch.tensor([1, 3])
    with SyncProneOps() as found:
        y = (x * 2 + 1).exp()
        y = torch.where(y > 1, y, 0.0).masked_fill(x > 2, 0.0)
        z = y.detach().clone()
        z[0] = 1.0  # basic indexing: a fill with a host scalar, no copy
        z[1:3] = 0.0
        z.index_fill_(0, idx, 1.0)
        z[idx] = y.detach()[idx]  # device values
        torch.repeat_interleave(idx, idx, output_size=4)
        torch.linalg.inv_ex(torch.eye(3)).inverse
        x / torch.stack([x.new_full((), 1.0), x.new_full((), 2.0), x.new_full((), 3.0)])
        x * torch.tensor(2.0)  # a 0-dim host tensor is a CPU scalar on CUDA
        upload(np.arange(3, dtype=np.float32), x.device) * x  # pinned and non-blocking
        host = torch.from_numpy(np.arange(6)).view(2, 3).sum(0).tolist()  # host work
        y.sum().backward()
    assert found.findings == [], found.table()
    assert host == [3, 5, 7]


def test_backward_ops_point_at_their_forward_line():
    x = torch.randn(6, requires_grad=True)
    with SyncProneOps() as found:
        y = x[x > 0].sum()  # masked forward here
        y.backward()
    line = line_of('# masked forward here')
    assert [(f.op, f.line, f.backward) for f in found.findings] == [
        ('aten.index.Tensor', line, False), ('aten.index_put.default', line, True)]
    assert found.sources[(__file__, line)] == 2
    assert f'{line}' in found.table()


def test_custom_ops_run_opaque_under_the_mode():
    """turbox_mm's ops are torch.library ops whose CPU path differs from the device's (the
    reference reads the level shapes on the host): the mode runs them as they are, and
    their functorch backward works under it. (On CPU tensors the ops' entry points call the
    reference eagerly instead, whose host reads the mode does see; the registered op is
    what runs on the GPU.)"""
    from turbox_mm.ops.ms_deform_attn.op import ms_deform_attn_op as ms_deform_attn
    value = torch.randn(1, 20, 2, 4, requires_grad=True)
    shapes, start = torch.tensor([[4, 5]]), torch.tensor([0])
    loc = torch.rand(1, 3, 2, 1, 2, 2, requires_grad=True)
    weights = torch.rand(1, 3, 2, 1, 2).softmax(-1)
    expected = ms_deform_attn(value, shapes, start, loc, weights)
    with SyncProneOps() as found:
        out = ms_deform_attn(value, shapes, start, loc, weights)
        out.sum().backward()
    assert torch.equal(out, expected) and value.grad is not None and loc.grad is not None
    assert found.findings == [], found.table()


def test_patches_are_removed_and_other_threads_ignored():
    import threading
    x = torch.randn(3)
    names = ('to', 'cpu', 'tolist', 'numpy', 'new_tensor')
    # what torch.Tensor itself holds under these names before (another library may have
    # patched one already): the block must leave exactly that
    before = {name: vars(torch.Tensor).get(name) for name in names}
    with SyncProneOps(backward_sources=False) as found:
        thread = threading.Thread(target=lambda: x.tolist())
        thread.start()
        thread.join()
    assert found.findings == []
    assert {name: vars(torch.Tensor).get(name) for name in names} == before
    assert torch.tensor is torch._C._VariableFunctions.tensor
    with pytest.raises(ValueError):
        with SyncProneOps():
            raise ValueError('the block fails')
    assert 'to' not in vars(torch.Tensor) and not torch.is_anomaly_enabled()


def test_allow_list_and_table():
    x = torch.randn(3)
    with SyncProneOps() as found:
        x.sum().item()  # allowed line
        x.tolist()
    allowed = found.outside([(__file__.replace('\\', '/').rsplit('/', 1)[1],
                              line_of('# allowed line'))])
    assert [f.op for f in allowed] == ['Tensor.tolist']
    assert found.outside([('tests/test_sync_prone.py', None)]) == []
    assert found.top(1)[0][2] == 1
    table = found.table(iters=1)
    assert 'sync:aten._local_scalar_dense.default' in table and 'd2h:Tensor.tolist' in table


def test_a_later_compiled_graph_traces_the_factories_the_block_wrapped():
    """The block wraps torch.tensor and torch.as_tensor; where the code under it is the first
    to import Dynamo or to use a device context, both must still know the real functions
    afterwards (Dynamo once took the wrapper for the real one and broke every later graph at
    torch.as_tensor; the device context would no longer move them). A fresh interpreter: this
    one has imported Dynamo long ago."""
    import subprocess
    import sys
    code = '\n'.join([
        'import sys, torch',
        'from turbox_mm.benchmark.sync_prone import SyncProneOps',
        "assert 'torch._dynamo' not in sys.modules",
        'x = torch.randn(2)',
        'with SyncProneOps(backward_sources=False):',
        '    torch.as_tensor([1.0, 2.0]) + x',
        '    import torch._dynamo',  # the first import, as a lazy import under the block
        "    with torch.device('meta'):",  # the device context's first use
        '        torch.zeros(1)',
        "@torch.compile(backend='eager', fullgraph=True)",
        'def g(a):',
        '    return torch.as_tensor([1.0, 2.0]) + torch.tensor(3.0) + a',
        'assert torch.equal(g(x), x + torch.tensor([4.0, 5.0]))',
        "with torch.device('meta'):",
        "    assert torch.tensor(1.0).is_meta and torch.as_tensor([1.0]).is_meta",
    ])
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
