"""Which sparse convolution library mmdet3d's registry builds from here, and the warning for
a model whose sparse layers are mmcv's."""
import logging
import sys
import types

import pytest
from torch import nn

from turbox_mm.utils import sparse_conv
from turbox_mm.utils.sparse_conv import (mmcv_sparse_layers, slow_sparse_conv_warning,
                                         sparse_conv_backend, warn_slow_sparse_conv)

pytest.importorskip('mmdet3d')
import mmdet3d.models.layers.spconv as mmdet3d_spconv  # noqa: E402


def _mmcv_encoder():
    """mmdet3d's SparseEncoder built from mmcv's layers, whatever the registry holds."""
    from mmcv.ops import SparseConv3d, SparseMaxPool3d, SubMConv3d
    return nn.Sequential(nn.Linear(2, 2), nn.Sequential(
        SubMConv3d(4, 8, 3, indice_key='a'), SparseConv3d(8, 8, 3, stride=2),
        SparseMaxPool3d(2)))


@pytest.fixture
def fake_spconv(monkeypatch):
    """Install a fake ``spconv`` of a given version (and with or without ``spconv.pytorch``)
    and set mmdet3d's flag."""
    def install(version, with_pytorch=True, flag=False):
        module = types.ModuleType('spconv')
        module.__version__ = version
        monkeypatch.setitem(sys.modules, 'spconv', module)
        if with_pytorch:
            monkeypatch.setitem(sys.modules, 'spconv.pytorch', types.ModuleType('spconv.pytorch'))
        else:
            monkeypatch.setitem(sys.modules, 'spconv.pytorch', None)  # import raises
        monkeypatch.setattr(mmdet3d_spconv, 'IS_SPCONV2_AVAILABLE', flag)
    return install


def test_backend_without_spconv_names_the_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, 'spconv', None)
    monkeypatch.setattr(mmdet3d_spconv, 'IS_SPCONV2_AVAILABLE', False)
    assert sparse_conv_backend() == ("mmcv's ops (spconv 2 not used: ModuleNotFoundError: "
                                     "import of spconv halted; None in sys.modules)")


def test_backend_names_spconv_2_or_why_not(fake_spconv):
    fake_spconv('2.3.8', flag=True)
    assert sparse_conv_backend() == 'spconv 2.3.8'
    fake_spconv('1.2.1')
    assert sparse_conv_backend() == "mmcv's ops (spconv 2 not used: spconv 1.2.1 is not spconv 2)"
    fake_spconv('2.3.8', with_pytorch=False)
    assert sparse_conv_backend().startswith(
        "mmcv's ops (spconv 2 not used: spconv 2.3.8 is installed but spconv.pytorch fails: "
        'ModuleNotFoundError')


def test_mmcv_layers_are_counted_and_the_warning_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, 'spconv', None)
    monkeypatch.setattr(mmdet3d_spconv, 'IS_SPCONV2_AVAILABLE', False)
    model = _mmcv_encoder()
    assert mmcv_sparse_layers(model) == ['1.0', '1.1', '1.2']  # convolutions and the pool
    message = slow_sparse_conv_warning(model)
    assert message.startswith("3 sparse layers of the model (first: 1.0) are mmcv's")
    assert 'from mmcv\'s ops (spconv 2 not used: ModuleNotFoundError' in message
    assert 'install spconv 2' in message
    assert warn_slow_sparse_conv(model, on_cuda=False) == ''
    logged = []
    monkeypatch.setattr('mmengine.logging.print_log',
                        lambda msg, logger=None, level=None: logged.append((msg, level)))
    assert warn_slow_sparse_conv(model, on_cuda=True) == message
    assert logged == [(f'turbox: {message}', logging.WARNING)]
    assert slow_sparse_conv_warning(model[1][0]).startswith(
        "1 sparse layer of the model (first: the model) is mmcv's")


def test_mmcv_layers_built_directly_while_spconv_2_is_there(fake_spconv):
    fake_spconv('2.3.8', flag=True)  # e.g. Cylinder3D imports mmcv.ops' layers itself
    message = slow_sparse_conv_warning(_mmcv_encoder())
    assert 'spconv 2.3.8 is installed, but these were built from mmcv.ops directly' in message
    assert 'install spconv' not in message


def test_no_warning_without_mmcv_sparse_layers(monkeypatch):
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    assert mmcv_sparse_layers(model) == []
    assert warn_slow_sparse_conv(model, on_cuda=True) == ''
    encoder = _mmcv_encoder()
    monkeypatch.delitem(sys.modules, 'mmcv.ops.sparse_conv')  # mmcv's sparse ops not imported
    monkeypatch.delitem(sys.modules, 'mmcv.ops.sparse_pool')
    assert mmcv_sparse_layers(encoder) == []


def test_benchmark_machine_line_names_the_backend():
    from turbox_mm.benchmark import machine_info, machine_line
    info = machine_info()
    assert info['sparse_conv'] == sparse_conv.sparse_conv_backend()
    assert machine_line(info).endswith(f"mmdet3d's sparse convolutions: {info['sparse_conv']}")


def test_turbox_runner_warns_about_the_built_model(monkeypatch):
    """TurboxRunner.wrap_model hands the built model (before wrapping) to the warning, with
    whether the host has CUDA."""
    import torch

    from turbox_mm.engine.runner import turbox_runner
    calls = []
    monkeypatch.setattr(turbox_runner, 'warn_slow_sparse_conv',
                        lambda model, on_cuda: calls.append((model, on_cuda)) or '')
    runner = types.SimpleNamespace(turbox_options={'ops': {'fast': False}}, distributed=False,
                                   _compile_and_wrap=lambda cfg, model: model)
    model = nn.Linear(2, 2)
    assert turbox_runner.TurboxRunner.wrap_model(runner, None, model) is model
    assert calls == [(model, torch.cuda.is_available())]
