"""The turbox path of MapTR's deformable attentions: turbox_mm's MSDA op where it pays, mmcv's
CUDA op for small calls (the decoder's), as measured on the H200."""
from types import SimpleNamespace

import torch

from turbox_mm.models.maptr import deformable_sampling
from turbox_mm.models.maptr.deformable_sampling import (TURBOX_MIN_SAMPLES, deformable_attention,
                                                        turbox_op_pays)


def locations(bs, queries, heads=8, levels=1, points=4):
    return torch.zeros(bs, queries, heads, levels, points, 2)


def test_the_measured_sizes_take_the_measured_winner():
    on_cuda = SimpleNamespace(is_cuda=True)
    assert not turbox_op_pays(on_cuda, locations(4, 1000))  # v1 decoder: mmcv 2.1x faster
    assert not turbox_op_pays(on_cuda, locations(4, 7000))  # v2 decoder: mmcv 1.1x
    assert turbox_op_pays(on_cuda, locations(8, 20000))  # v1 TSA: turbox 2.1x
    assert turbox_op_pays(on_cuda, locations(2, 20000, levels=4))  # encoder: turbox 2.2x
    assert turbox_op_pays(on_cuda, locations(1, TURBOX_MIN_SAMPLES // 32))  # the boundary
    assert not turbox_op_pays(on_cuda, locations(1, TURBOX_MIN_SAMPLES // 32 - 1))
    assert turbox_op_pays(torch.zeros(1), locations(1, 10))  # off CUDA: turbox's op always


def test_under_torch_compile_the_traceable_op_runs(monkeypatch):
    """mmcv's extension call would break the graph in every decoder layer (Dynamo skips
    it); turbox_mm's op traces through its fake."""
    on_cuda = SimpleNamespace(is_cuda=True)
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    assert turbox_op_pays(on_cuda, locations(4, 1000))
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: False)
    assert not turbox_op_pays(on_cuda, locations(4, 1000))


def test_a_small_call_on_cuda_runs_mmcvs_op_in_the_inputs_dtype(monkeypatch):
    calls = []

    class FakeMmcv:
        @staticmethod
        def apply(value, shapes, start, loc, weights, step):
            calls.append((value.dtype, loc.dtype, weights.dtype, step))
            return torch.ones(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])

    monkeypatch.setattr(deformable_sampling, 'MultiScaleDeformableAttnFunction', FakeMmcv)
    monkeypatch.setattr(deformable_sampling, 'turbox_op_pays', lambda value, loc: False)
    value = torch.randn(2, 12, 2, 4, dtype=torch.float64)
    loc = torch.rand(2, 5, 2, 1, 2, 2, dtype=torch.float64)
    weights = torch.rand(2, 5, 2, 1, 2, dtype=torch.float64)
    out = deformable_attention('turbox', value, torch.tensor([[3, 4]]), torch.tensor([0]), loc,
                               weights)
    assert calls == [(torch.float32, torch.float32, torch.float32, 64)]  # BEVFormer's fp32
    assert out.dtype == torch.float64 and out.shape == (2, 5, 8)
