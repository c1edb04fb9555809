"""MultiheadSDPAttention (turbox_mm/models/layers/sdpa_attention.py): SparseDrive's
``MultiheadFlashAttention`` on PyTorch's SDPA, checked against mmcv 2.1's
``MultiheadAttention`` (same parameter layout, so the weights are copied by state dict) and
``torch.nn.MultiheadAttention``; masks, batch_first, gradients, key defaults, upstream's
``dropout`` argument, fp16 compute, and a Sparse4D head built with it.
"""
import copy
import inspect
import math
import os.path as osp
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mmcv.cnn.bricks.transformer import MultiheadAttention as MmcvMHA

from conftest import ROOT
from turbox_mm.models.layers.sdpa_attention import (MultiheadSDPAttention, SDPAttentionCore,
                                                    sdpa_mask)

E, H = 16, 4
# Upstream FlashMHA's parameters, by name (P/models/attention.py @ ffebeb4).
UPSTREAM_KEYS = ['attn.in_proj_weight', 'attn.in_proj_bias', 'attn.out_proj.weight',
                 'attn.out_proj.bias']


def _pair(batch_first=True, seed=0, **kwargs):
    """Ours and mmcv's, same weights (random biases too, so they are exercised)."""
    torch.manual_seed(seed)
    # dropout_layer spelled out: mmcv's default dict may carry an earlier layer's `dropout`
    # (see test_mmcv_accepts_dropout_and_mutates_its_default).
    kwargs.setdefault('dropout_layer', dict(type='Dropout', drop_prob=0.))
    ref = MmcvMHA(E, H, batch_first=batch_first, **kwargs).eval()
    with torch.no_grad():
        ref.attn.in_proj_bias.normal_()
        ref.attn.out_proj.bias.normal_()
    ours = MultiheadSDPAttention(E, H, batch_first=batch_first, **kwargs).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_parameters_are_named_as_upstream_and_load_from_mmcv_and_torch():
    ours = MultiheadSDPAttention(E, H)
    assert list(ours.state_dict()) == UPSTREAM_KEYS
    assert ours.attn.in_proj_weight.shape == (3 * E, E)
    assert ours.attn.in_proj_bias.shape == (3 * E, )
    # torch's MHA holds the same names (mmcv wraps it as `attn`).
    torch_sd = torch.nn.MultiheadAttention(E, H).state_dict()
    ours.load_state_dict({f'attn.{k}': v for k, v in torch_sd.items()}, strict=True)
    assert list(MultiheadSDPAttention(E, H, bias=False).state_dict()) == [
        'attn.in_proj_weight', 'attn.out_proj.weight']
    # Initialisation as FlashMHA / torch MHA: zero biases, xavier in-projection.
    fresh = MultiheadSDPAttention(E, H)
    assert (fresh.attn.in_proj_bias == 0).all() and (fresh.attn.out_proj.bias == 0).all()
    bound = math.sqrt(6.0 / (E + 3 * E))  # xavier-uniform over the packed [3E, E]
    assert fresh.attn.in_proj_weight.abs().max() <= bound


@pytest.mark.parametrize('batch_first', [True, False])
def test_matches_mmcv_self_attention_with_positions(batch_first):
    ours, ref = _pair(batch_first)
    shape = (2, 7, E) if batch_first else (7, 2, E)
    q, pos = _x(*shape, seed=1), _x(*shape, seed=2)
    want = ref(q, query_pos=pos)
    got = ours(q, query_pos=pos)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # key None -> query, value None -> key (the query *without* its position), key_pos ->
    # query_pos: the same as spelling them out.
    spelled = ours(q, key=q, value=q, query_pos=pos, key_pos=pos)
    torch.testing.assert_close(got, spelled, rtol=0, atol=0)


@pytest.mark.parametrize('batch_first', [True, False])
def test_matches_mmcv_cross_attention_identity_and_value(batch_first):
    ours, ref = _pair(batch_first)

    def t(x):
        return x if batch_first else x.transpose(0, 1)

    q, qp = t(_x(3, 5, E, seed=1)), t(_x(3, 5, E, seed=2))
    k, kp, v = t(_x(3, 9, E, seed=3)), t(_x(3, 9, E, seed=4)), t(_x(3, 9, E, seed=5))
    ident = t(_x(3, 5, E, seed=6))
    kwargs = dict(key=k, value=v, identity=ident, query_pos=qp, key_pos=kp)
    torch.testing.assert_close(ours(q, **kwargs), ref(q, **kwargs), rtol=1e-5, atol=1e-5)
    # value None -> the key without key_pos.
    torch.testing.assert_close(ours(q, key=k, query_pos=qp, key_pos=kp),
                               ref(q, key=k, query_pos=qp, key_pos=kp), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours(q, key=k, query_pos=qp, key_pos=kp),
                               ours(q, key=k, value=k, query_pos=qp, key_pos=kp), rtol=0, atol=0)


def test_residual_is_mmcvs_deprecated_name_of_identity():
    """``residual=`` works as mmcv's decorated forward makes it work (a DeprecationWarning,
    then ``identity``), without mmengine's decorator: its one wrapper code object is shared by
    every decorated forward, so Dynamo's recompile limit would count them together."""
    ours, ref = _pair(True)
    q, ident = _x(2, 5, E, seed=1), _x(2, 5, E, seed=2)
    with pytest.warns(DeprecationWarning, match='"residual" is deprecated'):
        got = ours(q, residual=ident)
    with pytest.warns(DeprecationWarning, match='"residual" is deprecated'):
        want = ref(q, residual=ident)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, ours(q, identity=ident), rtol=0, atol=0)
    with pytest.raises(ValueError, match='both "residual"'):
        ours(q, residual=ident, identity=ident)
    assert ours.forward.__code__.co_filename.endswith('sdpa_attention.py')


def test_key_pos_falls_back_to_query_pos_only_when_shapes_match():
    ours, ref = _pair()
    q, qp, k = _x(2, 5, E, seed=1), _x(2, 5, E, seed=2), _x(2, 5, E, seed=3)
    # Same shape: query_pos is added to the key too.
    torch.testing.assert_close(ours(q, key=k, query_pos=qp),
                               ours(q, key=k, query_pos=qp, key_pos=qp), rtol=0, atol=0)
    # Other shape: a warning, and the key goes without position (as mmcv).
    k9 = _x(2, 9, E, seed=3)
    with pytest.warns(UserWarning, match='positional encoding'):
        got = ours(q, key=k9, query_pos=qp)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        want = ref(q, key=k9, query_pos=qp)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _masks():
    g = torch.Generator().manual_seed(7)
    attn = torch.rand(5, 9, generator=g) < 0.4
    attn[:, 0] = False  # every query keeps a key: no all-masked row
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[0, 6:] = True
    pad[2, 3:5] = True
    attn3 = torch.rand(3 * H, 5, 9, generator=g) < 0.4
    attn3[..., 0] = False
    return attn, pad, attn3


@pytest.mark.parametrize('case', ['attn2d', 'attn3d', 'padding', 'both', 'float'])
def test_masks_match_mmcv(case):
    ours, ref = _pair()
    q, qp = _x(3, 5, E, seed=1), _x(3, 5, E, seed=2)
    k, kp = _x(3, 9, E, seed=3), _x(3, 9, E, seed=4)
    attn, pad, attn3 = _masks()
    kwargs = dict(
        attn2d=dict(attn_mask=attn), attn3d=dict(attn_mask=attn3),
        padding=dict(key_padding_mask=pad), both=dict(attn_mask=attn, key_padding_mask=pad),
        float=dict(attn_mask=torch.randn(5, 9, generator=torch.Generator().manual_seed(3)),
                   key_padding_mask=pad))[case]
    want = ref(q, key=k, query_pos=qp, key_pos=kp, **kwargs)
    got = ours(q, key=k, query_pos=qp, key_pos=kp, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    unmasked = ours(q, key=k, query_pos=qp, key_pos=kp)
    assert not torch.allclose(got, unmasked)  # the mask did something


def test_masked_keys_have_no_influence():
    """A hand check of the True = masked convention: changing masked keys and values leaves
    the output bit-identical."""
    ours, _ = _pair()
    q, k = _x(3, 5, E, seed=1), _x(3, 9, E, seed=3)
    _, pad, _ = _masks()
    k2 = k.clone()
    k2[pad] = 100.0
    torch.testing.assert_close(ours(q, key=k2, key_padding_mask=pad),
                               ours(q, key=k, key_padding_mask=pad), rtol=0, atol=0)


def test_all_masked_query_gives_zero_attention():
    """Documented difference: torch/mmcv MHA give NaN for a query whose keys are all masked;
    SDPA gives a zero attention output, so the result is the projection bias plus identity."""
    ours, _ = _pair()
    q, k = _x(2, 5, E, seed=1), _x(2, 9, E, seed=3)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1] = True
    out = ours(q, key=k, key_padding_mask=pad)
    torch.testing.assert_close(out[1], q[1] + ours.attn.out_proj.bias, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(out).all()


def test_gradients_match_mmcv():
    ours, ref = _pair()
    ours.train()
    ref.train()  # all dropouts are 0
    _, pad, _ = _masks()
    grads = []
    for model in (ours, ref):
        q = _x(3, 5, E, seed=1).requires_grad_()
        qp = _x(3, 5, E, seed=2).requires_grad_()
        k = _x(3, 9, E, seed=3).requires_grad_()
        kp = _x(3, 9, E, seed=4).requires_grad_()
        out = model(q, key=k, query_pos=qp, key_pos=kp, key_padding_mask=pad)
        (out * _x(3, 5, E, seed=9)).sum().backward()
        grads.append([q.grad, qp.grad, k.grad, kp.grad] + [p.grad for p in model.parameters()])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_gradcheck_float64():
    attn = MultiheadSDPAttention(8, 2).double()
    q = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[False, False, True, False]] * 3)
    assert torch.autograd.gradcheck(lambda a, b: attn(a, key=b, attn_mask=mask), (q, k))


def test_matches_torch_mha_single_batch_and_unbatched_key_length_one():
    """Against torch.nn.MultiheadAttention directly: batch 1, a single key (the motion
    head's per-instance queues have few keys)."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(E, H, batch_first=True).eval()
    ours = MultiheadSDPAttention(E, H).eval()
    ours.load_state_dict({f'attn.{k}': v for k, v in mha.state_dict().items()})
    for lk in (1, 4):
        q, k, v = _x(1, 3, E, seed=1), _x(1, lk, E, seed=2), _x(1, lk, E, seed=3)
        want = q + mha(q, k, v, need_weights=False)[0]
        torch.testing.assert_close(ours(q, k, v), want, rtol=1e-5, atol=1e-5)


def test_dropout_argument_as_upstream_without_touching_the_default():
    with pytest.warns(DeprecationWarning):
        attn = MultiheadSDPAttention(E, H, dropout=0.1)
    assert attn.attn.dropout_p == 0.1 and attn.dropout_layer.p == 0.1
    assert attn.proj_drop.p == 0.0
    # Our default dict is unchanged: a later layer without `dropout` has no shortcut dropout.
    assert MultiheadSDPAttention(E, H).dropout_layer.p == 0.0
    default = inspect.signature(MultiheadSDPAttention).parameters['dropout_layer'].default
    assert default == dict(type='Dropout', drop_prob=0.)
    # A caller's dict is not written to either.
    cfg = dict(type='Dropout', drop_prob=0.3)
    with pytest.warns(DeprecationWarning):
        MultiheadSDPAttention(E, H, dropout_layer=cfg, dropout=0.2)
    assert cfg['drop_prob'] == 0.3
    # Explicit arguments without `dropout`.
    attn = MultiheadSDPAttention(E, H, attn_drop=0.2, proj_drop=0.3,
                                 dropout_layer=dict(type='Dropout', drop_prob=0.4))
    assert (attn.attn.dropout_p, attn.proj_drop.p, attn.dropout_layer.p) == (0.2, 0.3, 0.4)
    assert isinstance(MultiheadSDPAttention(E, H, dropout_layer=None).dropout_layer,
                      torch.nn.Identity)


def test_mmcv_accepts_dropout_and_mutates_its_default():
    """The quirk our copy avoids, pinned on mmcv 2.1 (upstream's class has the same lines):
    `dropout` is accepted, and it is written into the shared default `dropout_layer`."""
    default = inspect.signature(MmcvMHA.__init__).parameters['dropout_layer'].default
    saved = dict(default)  # an earlier test's `dropout` may already be in it
    try:
        default['drop_prob'] = 0.
        assert MmcvMHA(E, H).dropout_layer.p == 0.0
        with pytest.warns(DeprecationWarning):
            first = MmcvMHA(E, H, dropout=0.1)
        assert first.attn.dropout == 0.1 and first.dropout_layer.p == 0.1
        assert MmcvMHA(E, H).dropout_layer.p == 0.1  # leaked into the next layer
    finally:
        default.clear()
        default.update(saved)


def test_dropout_is_active_in_training_only():
    attn = MultiheadSDPAttention(E, H, attn_drop=0.5)
    q = _x(2, 6, E, seed=1)
    attn.train()
    torch.manual_seed(0)
    a = attn(q)
    torch.manual_seed(1)
    b = attn(q)
    assert not torch.allclose(a, b)
    attn.eval()
    plain = MultiheadSDPAttention(E, H).eval()
    plain.load_state_dict(attn.state_dict())
    torch.testing.assert_close(attn(q), plain(q), rtol=0, atol=0)


def test_fp16_compute_casts_like_upstream():
    ours, ref = _pair()
    q, qp = _x(2, 6, E, seed=1), _x(2, 6, E, seed=2)
    want32 = ours(q, query_pos=qp)
    ours.fp16_compute = True
    got = ours(q, query_pos=qp)
    assert got.dtype == torch.float32
    # A reference of the casts: projections in fp32, attention of half-rounded q, k, v.
    core = ours.attn
    w, b = core.in_proj_weight, core.in_proj_bias
    inputs = (q + qp, q + qp, q)  # the value is the key before its position is added
    qkv = [F.linear(x, wi, bi).view(2, 6, H, E // H).transpose(1, 2).half().double()
           for x, wi, bi in zip(inputs, w.chunk(3), b.chunk(3))]
    att = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) / math.sqrt(E // H), -1) @ qkv[2]
    att = att.transpose(1, 2).reshape(2, 6, E).float()
    want16 = q + core.out_proj(att)
    torch.testing.assert_close(got, want16, rtol=2e-3, atol=2e-3)
    assert not torch.equal(got, want32)  # it really computed in half
    torch.testing.assert_close(got, want32, rtol=1e-2, atol=1e-2)
    # Inputs already in half stay half.
    ours16 = copy.deepcopy(ours).half()
    assert ours16(q.half(), query_pos=qp.half()).dtype == torch.float16


def test_causal_is_bottom_right_aligned():
    attn = MultiheadSDPAttention(E, H, causal=True).eval()
    plain = MultiheadSDPAttention(E, H).eval()
    plain.load_state_dict(attn.state_dict())
    q, k = _x(1, 3, E, seed=1), _x(1, 5, E, seed=2)
    # Query i sees keys j <= i + (5 - 3).
    blocked = torch.tensor([[False, False, False, True, True],
                            [False, False, False, False, True],
                            [False, False, False, False, False]])
    torch.testing.assert_close(attn(q, key=k), plain(q, key=k, attn_mask=blocked),
                               rtol=0, atol=0)


def test_sdpa_mask_combination_by_hand():
    attn = torch.tensor([[False, True], [False, False]])
    pad = torch.tensor([[False, False], [True, False]])
    allowed = sdpa_mask(attn, pad, batch=2, num_heads=3, len_q=2, len_k=2,
                        dtype=torch.float32)
    assert allowed.dtype == torch.bool and allowed.shape == (2, 1, 2, 2)
    assert allowed[0, 0].tolist() == [[True, False], [True, True]]
    assert allowed[1, 0].tolist() == [[False, False], [False, True]]
    additive = sdpa_mask(torch.full((2, 2), 0.5), pad, 2, 3, 2, 2, torch.float64)
    assert additive.dtype == torch.float64
    assert additive[1, 0].tolist() == [[-math.inf, 0.5], [-math.inf, 0.5]]
    assert sdpa_mask(None, None, 2, 3, 2, 2, torch.float32) is None


def test_bad_input_raises_named_errors():
    with pytest.raises(TypeError, match="unknown arguments \\['kdim'\\]"):
        MultiheadSDPAttention(E, H, kdim=8)
    with pytest.raises(ValueError, match='divisible by num_heads'):
        MultiheadSDPAttention(10, 4)
    attn = MultiheadSDPAttention(E, H)
    with pytest.raises(ValueError, match='query must be'):
        attn(_x(2, 5, E + 1))
    with pytest.raises(ValueError, match='attn_mask must be'):
        attn(_x(2, 5, E), attn_mask=torch.zeros(5, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match='key_padding_mask must be'):
        attn(_x(2, 5, E), key_padding_mask=torch.zeros(5, 2, dtype=torch.bool))
    for dtype in (torch.int64, torch.uint8):  # torch MHA refuses byte masks too
        with pytest.raises(TypeError, match='attn_mask must be a bool or floating'):
            attn(_x(2, 5, E), attn_mask=torch.zeros(5, 5, dtype=dtype))
    with pytest.raises(ValueError, match='batch / key lengths'):
        attn(_x(2, 5, E), key=_x(3, 4, E))


def test_registered_under_both_names_without_clash():
    from mmdet3d.registry import MODELS as MMDET3D_MODELS
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmengine.registry import MODELS as ROOT_MODELS

    from turbox_mm.registry import MODELS
    import mmcv.cnn  # noqa: F401  (registers mmcv's layers in the root registry)
    assert MODELS.get('turbox_mm.MultiheadFlashAttention') is MultiheadSDPAttention
    assert MODELS.get('turbox_mm.MultiheadSDPAttention') is MultiheadSDPAttention
    for registry in (ROOT_MODELS, MMDET_MODELS, MMDET3D_MODELS):
        assert 'MultiheadFlashAttention' not in registry.module_dict
        assert 'MultiheadSDPAttention' not in registry.module_dict
    assert isinstance(MultiheadSDPAttention(E, H).attn, SDPAttentionCore)


# ----------------------------------------------------------------------------------------------
# Sparse4DHead with the SDPA layer (the SparseDrive det head's attention)
# ----------------------------------------------------------------------------------------------
FULL_STOCK = osp.join(ROOT, 'configs/sparse4d/sparse4dv3_r50_8xb6-100e_nus-256x704_stock.py')
NUM_ANCHOR = 8
EMBED = 256  # decoupled attention: 512


def _head():
    """The full Sparse4D config's head (embed 256, so the decoupled attention is 512 wide,
    as SparseDrive's) with 8 anchors, one camera and level, 2 decoder layers, and
    upstream's flash attention config for both attention ops."""
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    from turbox_mm.registry import MODELS
    cfg = Config.fromfile(FULL_STOCK).model.head.to_dict()
    attention = dict(type='turbox_mm.MultiheadFlashAttention', embed_dims=512, num_heads=8,
                     batch_first=True, dropout=0.1)
    anchors = np.zeros((NUM_ANCHOR, 11), np.float32)
    anchors[:, :3] = np.random.default_rng(0).uniform(-20, 20, (NUM_ANCHOR, 3))
    anchors[:, 3:6] = 0.5
    anchors[:, 7] = 1.0
    cfg.update(num_decoder=2, temp_graph_model=attention, graph_model=attention)
    cfg['instance_bank'].update(num_anchor=NUM_ANCHOR, num_temp_instances=4, anchor=anchors)
    cfg['deformable_model'].update(num_levels=1, num_cams=1)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmdet3d'), warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)
        head = MODELS.build(cfg)
    head.init_weights()
    return head


def _frame(batch=2):
    g = torch.Generator().manual_seed(0)
    proj = torch.tensor([[8., 0., 8., 0.], [0., 8., 4., 0.], [0., 0., 1., 0.], [0., 0., 0., 1.]])
    boxes, labels, ids = [], [], []
    for b, n in enumerate([3, 1][:batch]):
        box = torch.zeros(n, 9)
        box[:, :2] = torch.rand(n, 2, generator=g) * 40 - 20
        box[:, 3:6] = torch.rand(n, 3, generator=g) * 3 + 0.5
        boxes.append(box)
        labels.append(torch.randint(0, 10, (n, ), generator=g))
        ids.append(torch.arange(n) + 100 * b)
    metas = dict(projection_mat=proj.expand(batch, 1, 4, 4).clone(),
                 image_wh=torch.tensor([16., 8.]).expand(batch, 1, 2).clone(),
                 timestamp=torch.full((batch, ), 1.5e9, dtype=torch.float64),
                 T_global=torch.eye(4).expand(batch, 4, 4).clone(),
                 T_global_inv=torch.eye(4).expand(batch, 4, 4).clone(),
                 gt_bboxes_3d=boxes, gt_labels_3d=labels, instance_id=ids)
    return [torch.randn(batch, 1, EMBED, 4, 8, generator=g)], metas


def test_sparse4d_head_builds_with_upstreams_flash_attention_config():
    head = _head()
    gnn = [layer for op, layer in zip(head.operation_order, head.layers)
           if op in ('gnn', 'temp_gnn')]
    assert len(gnn) == 2 and all(isinstance(m, MultiheadSDPAttention) for m in gnn)
    for m in gnn:
        assert (m.embed_dims, m.num_heads, m.attn.dropout_p, m.dropout_layer.p,
                m.proj_drop.p) == (512, 8, 0.1, 0.1, 0.0)
    # The stock config's denoising is on: the forward passes its boolean attention mask,
    # which upstream's flash layer would reject.
    head.train()
    feature_maps, metas = _frame()
    out = head(feature_maps, metas)
    assert out['prediction'][-1].shape == (2, NUM_ANCHOR, 11)
    assert out['dn_prediction'][-1].shape[1] > 0
    assert all(torch.isfinite(p).all() for p in out['prediction'])
    # The same head on mmcv's layer, weights copied, computes the same in eval mode.
    head.eval()
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope('mmdet3d'):
        ref_layers = [MmcvMHA(512, 8, batch_first=True) for _ in gnn]
    for ours, ref in zip(gnn, ref_layers):
        ref.load_state_dict(ours.state_dict())
    feature_maps, metas = _frame(batch=1)
    head.instance_bank.reset()
    torch.manual_seed(0)
    with torch.no_grad():
        want_ours = head(feature_maps, metas)['prediction'][-1]
    index = [i for i, op in enumerate(head.operation_order) if op in ('gnn', 'temp_gnn')]
    for i, ref in zip(index, ref_layers):
        head.layers[i] = ref.eval()
    head.instance_bank.reset()
    torch.manual_seed(0)
    with torch.no_grad():
        want_ref = head(feature_maps, metas)['prediction'][-1]
    torch.testing.assert_close(want_ours, want_ref, rtol=1e-4, atol=1e-4)
