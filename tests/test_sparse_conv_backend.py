"""Which sparse convolution library mmdet3d's layers run, and the warning for mmcv's ops."""
import logging

import pytest
from torch import nn

from turbox_mm.utils.sparse_conv import (mmcv_sparse_layers, slow_sparse_conv_warning,
                                         sparse_conv_backend, warn_slow_sparse_conv)

pytest.importorskip('mmdet3d')


def _spconv2():
    from mmdet3d.models.layers.spconv import IS_SPCONV2_AVAILABLE
    return IS_SPCONV2_AVAILABLE


def _encoder():
    from mmdet3d.models.middle_encoders import SparseEncoder
    return SparseEncoder(4, [41, 64, 64])


def test_backend_names_the_library_mmdet3d_uses():
    name = sparse_conv_backend()
    if _spconv2():
        import spconv
        assert name == f'spconv {spconv.__version__}'
    else:
        assert name.startswith("mmcv's ops (spconv 2 not importable: "), name


@pytest.mark.skipif('_spconv2()', reason='spconv 2 builds the layers here')
def test_mmcv_layers_are_counted_and_named_in_the_warning(caplog):
    model = nn.Sequential(nn.Linear(2, 2), _encoder())
    names = mmcv_sparse_layers(model)
    # SparseEncoder's default: conv_input + 1 + 3 + 3 + 3 encoder convs + conv_out
    assert len(names) == 12 and names[0] == '1.conv_input.0', names
    message = slow_sparse_conv_warning(model)
    assert message.startswith("12 sparse convolution layers (first: 1.conv_input.0) run mmcv's")
    assert 'not importable' in message
    with caplog.at_level(logging.WARNING):
        assert warn_slow_sparse_conv(model, on_cuda=False) == ''
        assert warn_slow_sparse_conv(model, on_cuda=True) == message


def test_no_warning_without_mmcv_sparse_layers():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    assert mmcv_sparse_layers(model) == []
    assert slow_sparse_conv_warning(model) == ''
    assert warn_slow_sparse_conv(model, on_cuda=True) == ''
    if _spconv2():  # spconv 2's layers are not mmcv's
        assert mmcv_sparse_layers(_encoder()) == []


def test_benchmark_machine_line_says_which_sparse_convolutions_ran():
    from turbox_mm.benchmark import machine_info, machine_line
    info = machine_info()
    assert info['sparse_conv'] == sparse_conv_backend()
    assert machine_line(info).endswith(f"sparse convolutions: {info['sparse_conv']}")
