"""turbox_mm.engine.runner.fast_model: the loss sum, mmcv's attention and in-place activations on
views, changed on the model."""
import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
from mmcv.cnn.bricks.transformer import MultiheadAttention
from mmengine.model import BaseModel

from turbox_mm.benchmark.op_count import OpCounter
from turbox_mm.engine.runner import fast_model
from turbox_mm.engine.runner.fast_model import (WeightlessMultiheadAttention,
                                                apply_fast_model, math_attention_wanted,
                                                out_of_place_activations,
                                                stacked_parse_losses, weightless_attention)


class Toy(BaseModel):

    def __init__(self):
        super().__init__()
        # explicit dropout_layer: mmcv's default dict is shared and other tests' `dropout=`
        # arguments write into it
        self.attn = MultiheadAttention(16, 4, attn_drop=0.0, proj_drop=0.0, batch_first=True,
                                       dropout_layer=dict(type='Dropout', drop_prob=0.0))
        self.plain = nn.MultiheadAttention(16, 4)  # used directly: keeps its weights
        self.head = nn.Linear(16, 3)

    def forward(self, x, mode='loss'):
        y = self.head(self.attn(x))
        pair = [y[..., 1].abs().mean(), y[..., 2].mean() * 0.5]
        return {'loss_a': y[..., 0].pow(2).mean(), 'loss_b': pair,
                'loss_vec': y[..., 2].flatten()[:4], 'acc': y.detach().mean() * 0 + 0.75}


class OwnParse(Toy):

    def parse_losses(self, losses):
        return super().parse_losses(losses)


def test_stacked_parse_losses_logs_alike_and_gives_bit_identical_gradients():
    torch.manual_seed(0)
    ours, ref = Toy(), Toy()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 16)
    loss, log = stacked_parse_losses(ours(x))
    ref_loss, ref_log = BaseModel.parse_losses(ref, ref(x))
    assert list(log) == list(ref_log) == ['loss', 'loss_a', 'loss_b', 'loss_vec', 'acc']
    for key in ('loss_a', 'loss_b', 'loss_vec', 'acc'):
        assert torch.equal(log[key], ref_log[key]), key
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)  # the order of the adds
    assert log['loss'] is loss and log['acc'] == 0.75  # 'acc' is logged, not summed
    loss.backward()
    ref_loss.backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        if q.grad is not None:
            assert torch.equal(p.grad, q.grad), name


def test_stacked_parse_losses_counts_few_operations():
    terms = {f'loss_{i}': torch.tensor(float(i), requires_grad=True) for i in range(40)}
    with OpCounter() as ours:
        stacked_parse_losses(terms)[0].backward()
    for t in terms.values():
        t.grad = None
    with OpCounter() as ref:
        BaseModel.parse_losses(None, terms)[0].backward()
    assert ours.total <= 4 and ref.total >= 80  # mmengine: a mean and an add a term


def test_stacked_parse_losses_edge_cases():
    half = torch.tensor(1.5, dtype=torch.float16)
    loss, log = stacked_parse_losses({'loss_x': torch.tensor(2.0), 'loss_h': half})
    assert loss.dtype == torch.float32 and loss == 3.5  # mixed dtypes: Python's sum
    assert isinstance(log, OrderedDict)
    # half precision: mmengine's sequential sum, so an overflow stays inf as there
    big = {f'loss_{i}': torch.tensor(v, dtype=torch.float16)
           for i, v in enumerate((60000., 10000., -20000.))}
    assert stacked_parse_losses(big)[0] == BaseModel.parse_losses(None, big)[0] == float('inf')
    assert stacked_parse_losses({'acc': torch.tensor(1.0)})[0] == 0  # no loss terms: 0
    one, _ = stacked_parse_losses({'loss_x': torch.tensor(2.0)})
    assert one == 2.0
    for parse in (stacked_parse_losses, lambda d: BaseModel.parse_losses(None, d)):
        with pytest.raises(RuntimeError, match='mean'):  # integer losses: both refuse
            parse({'loss_n': torch.tensor([1, 3])})
    with pytest.raises(TypeError, match='loss_bad is not a tensor or list of tensors'):
        stacked_parse_losses({'loss_bad': 1.0})


def test_weightless_attention_same_output_state_and_fewer_operations():
    torch.manual_seed(0)
    model = Toy().train()
    x = torch.randn(2, 7, 16)
    mask = torch.zeros(7, 7, dtype=torch.bool)
    mask[:, -2:] = True
    with OpCounter() as before:
        want = model.attn(x, attn_mask=mask)
        want.sum().backward()
    keys = list(model.state_dict())
    assert weightless_attention(model) == 1
    assert type(model.attn.attn) is WeightlessMultiheadAttention
    assert type(model.plain) is nn.MultiheadAttention  # not inside mmcv's class: untouched
    assert list(model.state_dict()) == keys
    with OpCounter() as after:
        got = model.attn(x, attn_mask=mask)
        got.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert after.total < before.total
    seq = x.transpose(0, 1)  # the inner module is sequence-first
    _, weights = model.attn.attn(seq, seq, seq, need_weights=True)  # still there when asked
    assert weights.shape == (2, 7, 7)
    twin = copy.deepcopy(model)  # EMA copies, checkpoints: the class travels
    assert type(twin.attn.attn) is WeightlessMultiheadAttention
    assert weightless_attention(model) == 0  # already changed: nothing more


def test_apply_fast_model_respects_a_models_own_parse_losses():
    model = Toy()
    lines = apply_fast_model(model)
    assert model.parse_losses is stacked_parse_losses and len(lines) == 2
    assert copy.deepcopy(model).parse_losses is stacked_parse_losses
    assert apply_fast_model(model) == []  # idempotent
    own = OwnParse()
    assert all('parse_losses' not in line for line in apply_fast_model(own))
    assert 'parse_losses' not in vars(own)


class Subclassed(MultiheadAttention):

    def forward(self, query, *args, **kwargs):
        return self.attn(query, query, query)[1]  # uses the weights


def test_subclass_with_its_own_forward_keeps_the_weights():
    module = nn.Module()
    module.sub = Subclassed(16, 4, dropout_layer=dict(type='Dropout', drop_prob=0.0))
    assert weightless_attention(module) == 0
    assert module.sub(torch.randn(3, 2, 16)) is not None


def test_weightless_attention_compiles_in_one_graph():
    torch.manual_seed(0)
    model = Toy().train()
    x = torch.randn(2, 9, 16)
    want = model.attn(x)
    weightless_attention(model)
    compiled = torch.compile(model.attn, backend='aot_eager', fullgraph=True)
    got = compiled(x)
    got.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert model.attn.attn.in_proj_weight.grad is not None


def test_math_backend_only_for_long_float32_cuda_attention_outside_half_autocast(monkeypatch):
    from types import SimpleNamespace

    from turbox_mm.engine.runner.fast_model import MATH_MIN_KEYS, _sdpa_kernel_traceable
    assert _sdpa_kernel_traceable()  # the pinned torch traces sdpa_kernel (else: no math)
    long_ = MATH_MIN_KEYS
    assert not math_attention_wanted(torch.zeros(2), long_)  # CPU: torch's own choice
    assert not math_attention_wanted(torch.zeros(2, device='meta'), long_)

    def query(dtype):  # a CUDA tensor as the function sees it
        return SimpleNamespace(device=torch.device('cuda'), dtype=dtype)

    autocast = dict(enabled=False, dtype=torch.float16)
    monkeypatch.setattr(torch, 'is_autocast_enabled', lambda device: autocast['enabled'])
    monkeypatch.setattr(torch, 'get_autocast_dtype', lambda device: autocast['dtype'])
    assert math_attention_wanted(query(torch.float32), long_)
    assert not math_attention_wanted(query(torch.float32), long_ - 1)  # Sparse4D's, MapTR's
    assert not math_attention_wanted(query(torch.float16), long_)
    assert not math_attention_wanted(query(torch.bfloat16), long_)
    for dtype, wanted in [(torch.float16, False), (torch.bfloat16, False), (torch.float32, True)]:
        autocast.update(enabled=True, dtype=dtype)  # AmpOptimWrapper(dtype=...)
        assert math_attention_wanted(query(torch.float32), long_) is wanted, dtype


def test_key_length_reaches_the_rule(monkeypatch):
    """The inner module passes the key sequence length (sequence-first or batch-first)."""
    seen = []
    monkeypatch.setattr(fast_model, 'math_attention_wanted',
                        lambda query, keys: seen.append(keys) or False)
    for batch_first in (False, True):
        module = WeightlessMultiheadAttention(16, 4, batch_first=batch_first).train()
        query = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
        key = torch.randn(2, 11, 16) if batch_first else torch.randn(11, 2, 16)
        module(query, key, key)
    module(torch.randn(5, 16), torch.randn(11, 16), torch.randn(11, 16))  # unbatched
    assert seen == [11, 11, 11]


def _with_dropout(p):
    torch.manual_seed(0)
    return MultiheadAttention(16, 4, attn_drop=p, proj_drop=0.0, batch_first=True,
                              dropout_layer=dict(type='Dropout', drop_prob=0.0)).train()


def _record_sdpa_backends(monkeypatch):
    """Record, at every call of ``F.scaled_dot_product_attention``, the backends allowed."""
    import torch.nn.functional as F
    from torch.nn.attention import _cur_sdpa_kernel_backends
    backends = []
    sdpa = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        backends.append(_cur_sdpa_kernel_backends())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, 'scaled_dot_product_attention', recording)
    return backends


@pytest.mark.parametrize('compiled', [False, True])
@pytest.mark.parametrize('drop', [0.0, 0.3])
def test_math_backend_branch_same_output_and_gradients(monkeypatch, compiled, drop):
    """The float32-on-CUDA training branch (forced here on the CPU): attention runs under the
    math backend alone, with the same output, dropout draw and gradients as mmcv's explicit
    attention (need_weights=True); compiled, the graph holds the math products, not a fused
    attention kernel; in eval the branch is not taken."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs
    from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends
    module = _with_dropout(drop)
    x = torch.randn(2, 9, 16)
    mask = torch.zeros(9, 9, dtype=torch.bool)
    mask[:, -3:] = True
    torch.manual_seed(1)
    want = module(x, attn_mask=mask)
    want.sum().backward()
    want_grad = module.attn.in_proj_weight.grad.clone()
    module.zero_grad()
    holder = nn.Module()
    holder.attn = module
    assert weightless_attention(holder) == 1
    monkeypatch.setattr(fast_model, 'math_attention_wanted', lambda query, keys: True)
    graphs = AotEagerAndRecordGraphs()
    if compiled:
        torch._dynamo.reset()
        call = torch.compile(module, backend=graphs, fullgraph=True)
    else:  # Dynamo would trace the recorder's list append as a side effect
        backends = _record_sdpa_backends(monkeypatch)
        call = module
    before = _cur_sdpa_kernel_backends()
    torch.manual_seed(1)
    got = call(x, attn_mask=mask)
    got.sum().backward()
    assert _cur_sdpa_kernel_backends() == before  # the context was left
    if compiled:
        code = graphs.fw_graphs[0].code
        assert 'bmm' in code and 'flash' not in code and 'efficient' not in code, code
    else:
        assert backends == [[SDPBackend.MATH]]
        module.eval()
        module(x, attn_mask=mask)
        assert len(backends) == 2 and len(backends[1]) > 1  # eval: torch's own choice
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module.attn.in_proj_weight.grad, want_grad, rtol=1e-5,
                               atol=1e-6)


def test_fully_masked_query_is_finite_without_weights():
    """The documented difference: a query whose keys are all masked gets NaN from mmcv's
    explicit softmax and a finite output through scaled_dot_product_attention."""
    torch.manual_seed(0)
    model = Toy().eval()
    x = torch.randn(1, 4, 16)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[2] = True  # query 2 sees no key
    before = model.attn(x, attn_mask=mask)
    weightless_attention(model)
    after = model.attn(x, attn_mask=mask)
    assert torch.isnan(before[0, 2]).all() and torch.isfinite(after[0, 2]).all()
    torch.testing.assert_close(after[0, [0, 1, 3]], before[0, [0, 1, 3]], rtol=1e-5, atol=1e-6)


def test_out_of_place_activations_same_values_fewer_operations():
    """Sparse4D's ``linear_relu_ln`` block and mmcv's FFN on ``[B, Q, C]`` inputs: the ReLUs
    right after a Linear become out of place, with the same outputs and gradients bit for bit
    and fewer backward operations; others (after a LayerNorm, on their own) stay in place."""
    from mmcv.cnn.bricks.transformer import FFN

    from turbox_mm.models.sparse4d.anchor_encoder import linear_relu_ln
    torch.manual_seed(0)
    model = nn.ModuleDict(dict(block=nn.Sequential(*linear_relu_ln(16, 1, 2, 3)),
                               ffn=FFN(16, 32, ffn_drop=0.0), after_norm=nn.Sequential(
                                   nn.LayerNorm(16), nn.ReLU(inplace=True))))
    x = torch.randn(2, 9, 3, requires_grad=True)

    def run():
        model.zero_grad()
        x.grad = None
        out = model['after_norm'](model['ffn'](model['block'](x)))
        with OpCounter() as counted:
            out.square().sum().backward()
        grads = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
        return out.detach(), grads, counted.total

    want, want_grads, before = run()
    keys = list(model.state_dict())
    assert out_of_place_activations(model) == 3  # two in the block, one in the FFN
    assert model['after_norm'][1].inplace  # after a LayerNorm: no view, left in place
    assert list(model.state_dict()) == keys
    got, got_grads, after = run()
    assert torch.equal(got, want)
    assert all(torch.equal(g, w) for g, w in zip(got_grads, want_grads))
    assert after < before, (after, before)
    assert out_of_place_activations(model) == 0

    class Residual(nn.Sequential):  # its own forward reads the linear output afterwards
        def forward(self, x):
            out = self[0](x)
            return out + self[1](out)

    kept = Residual(nn.Linear(3, 3), nn.ReLU(inplace=True))
    hooked = nn.Sequential(nn.Linear(3, 3), nn.ReLU(inplace=True))
    hooked[0].register_forward_hook(lambda mod, args, out: None)  # may keep the output
    assert out_of_place_activations(nn.ModuleList([kept, hooked])) == 0
    changes = apply_fast_model(nn.Sequential(nn.Linear(2, 2), nn.ReLU(inplace=True)))
    assert any('in-place activations' in c for c in changes)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_float32_training_attention_takes_the_math_backend(monkeypatch):
    """On CUDA, float32 training attention over MATH_MIN_KEYS keys runs the math backend with
    mmcv's call's output and gradients; under float16 autocast, and over fewer keys, it keeps
    torch's choice."""
    from torch.nn.attention import SDPBackend

    from turbox_mm.engine.runner.fast_model import MATH_MIN_KEYS
    module = _with_dropout(0.0).cuda()
    query = torch.randn(2, 7, 16, device='cuda')
    key = torch.randn(2, MATH_MIN_KEYS, 16, device='cuda')
    want = module(query, key, key)
    want.sum().backward()
    want_grad = module.attn.in_proj_weight.grad.clone()
    module.zero_grad()
    holder = nn.Module()
    holder.attn = module
    weightless_attention(holder)
    backends = _record_sdpa_backends(monkeypatch)
    got = module(query, key, key)
    got.sum().backward()
    assert backends == [[SDPBackend.MATH]]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(module.attn.in_proj_weight.grad, want_grad, rtol=1e-3, atol=1e-4)
    with torch.autocast('cuda', dtype=torch.float16):
        module(query, key, key)
    module(query, key[:, :100], key[:, :100])
    assert len(backends) == 3 and len(backends[1]) > 1 and len(backends[2]) > 1
