"""Sparse4D's instance bank: anchor projection between frames and the temporal cache."""
import math

import numpy as np
import pytest
import torch

from turbox_mm.models.sparse4d import InstanceBank, encode_boxes, project_anchors
from turbox_mm.models.sparse4d.box3d import COS_YAW, SIN_YAW, VX, VZ


def _state(centre, vel=(0., 0., 0.), yaw=0.0):
    box = torch.tensor([[*centre, 4., 2., 1.5, yaw]])
    return encode_boxes(box, velocity=torch.tensor([vel]))[None]


def _transform(yaw=0.0, t=(0., 0., 0.)):
    c, s = math.cos(yaw), math.sin(yaw)
    T = torch.eye(4)
    T[:2, :2] = torch.tensor([[c, -s], [s, c]])
    T[:3, 3] = torch.tensor(t)
    return T[None]


def test_projection_moves_by_velocity_then_transform():
    out = project_anchors(_state((10., 5., 1.), vel=(4., 0., 0.)), _transform(t=(-2., 0., 0.)),
                          torch.tensor([0.5]))
    torch.testing.assert_close(out[0, 0, :3], torch.tensor([10., 5., 1.]))
    torch.testing.assert_close(out[0, 0, 3:6], _state((0., 0., 0.))[0, 0, 3:6])  # sizes kept


def test_projection_rotates_yaw_and_velocity_and_can_keep_upstreams_slot_swap():
    anchor = _state((1., 0., 0.), vel=(1., 0., 0.))  # yaw 0: (sin, cos) = (0, 1)
    out = project_anchors(anchor, _transform(yaw=math.pi / 2), torch.tensor([0.0]))
    torch.testing.assert_close(out[0, 0, :3], torch.tensor([0., 1., 0.]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0, 0, [SIN_YAW, COS_YAW]], torch.tensor([1., 0.]),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0, 0, 8:], torch.tensor([0., 1., 0.]), atol=1e-6, rtol=0)
    swapped = project_anchors(anchor, _transform(yaw=math.pi / 2), torch.tensor([0.0]),
                              upstream_yaw_order=True)
    torch.testing.assert_close(swapped[0, 0, [SIN_YAW, COS_YAW]], torch.tensor([0., 1.]),
                               atol=1e-6, rtol=0)


def _bank(**kwargs):
    rng = np.random.default_rng(0)
    anchors = np.zeros((12, 11), np.float32)
    anchors[:, :3] = rng.uniform(-20, 20, (12, 3))
    anchors[:, COS_YAW] = 1
    return InstanceBank(num_anchor=10, embed_dims=4, anchor=anchors, num_temp_instances=6,
                        **kwargs)


def _frame(bank, batch, ts, seed):
    gen = torch.Generator().manual_seed(seed)
    T = torch.eye(4).expand(batch, 4, 4).clone()
    out = bank.get(batch, torch.tensor(ts, dtype=torch.float64), T, T)
    feature = torch.randn(batch, 10, 4, generator=gen)
    anchor = bank.anchor[None].expand(batch, -1, -1).detach().clone()
    anchor[..., 8] = 2.0  # vx: cached anchors move by 2 m/s * dt
    cls = torch.randn(batch, 10, 3, generator=gen)
    return out, feature, anchor, cls, T


def test_first_frame_has_no_cache_and_default_interval():
    bank = _bank()
    (feat, anchor, cf, ca, dt), *_ = _frame(bank, 2, [100.0, 200.0], 0)
    assert feat.shape == (2, 10, 4) and anchor.shape == (2, 10, 11)
    assert cf is None and ca is None
    torch.testing.assert_close(dt, torch.tensor([0.5, 0.5]))
    feature, anchor, cls = torch.ones(2, 12, 4), torch.zeros(2, 12, 11), torch.zeros(2, 12, 3)
    assert bank.update(feature, anchor, cls)[0] is feature  # no cache: unchanged


def test_cache_update_and_stale_samples():
    bank = _bank()
    _, feature, anchor, cls, T = _frame(bank, 2, [100.0, 200.0], 0)
    bank.cache(feature, anchor, cls, torch.tensor([100.0, 200.0], dtype=torch.float64), T)
    conf = cls.max(-1).values.sigmoid()
    top, idx = conf.topk(6, dim=1)
    torch.testing.assert_close(bank.confidence, top)
    torch.testing.assert_close(bank.cached_feature,
                               feature.gather(1, idx[..., None].expand(-1, -1, 4)))
    # Next frame: sample 0 is 0.5 s later, sample 1 is a new sequence (10 s later).
    (_, _, cf, ca, dt), feature2, anchor2, cls2, T = _frame(bank, 2, [100.5, 210.0], 1)
    torch.testing.assert_close(dt, torch.tensor([0.5, 0.5]))  # stale: the default interval
    assert bank.mask.tolist() == [True, False]
    expected = anchor.gather(1, idx[..., None].expand(-1, -1, 11))
    torch.testing.assert_close(ca[0, :, 0], expected[0, :, 0] + 2.0 * 0.5)  # moved by vx * dt
    torch.testing.assert_close(ca[1, :, 0], expected[1, :, 0] + 2.0 * 10.0)  # still returned
    dn = torch.full((2, 3, 4), 7.0)  # rows after num_anchor (denoising) pass through
    f, a = bank.update(torch.cat([feature2, dn], 1), torch.cat([anchor2, torch.zeros(2, 3, 11)], 1),
                       torch.cat([cls2, torch.zeros(2, 3, 3)], 1))
    assert f.shape == (2, 13, 4) and (f[:, 10:] == 7).all()
    keep = cls2[0].max(-1).values.topk(4).indices
    torch.testing.assert_close(f[0, :10], torch.cat([cf[0], feature2[0, keep]]))
    torch.testing.assert_close(f[1, :10], feature2[1])  # stale sample keeps its own queries
    # Caching again decays the carried confidences.
    bank.cache(f, a, torch.cat([cls2, torch.zeros(2, 3, 3)], 1),
               torch.tensor([100.5, 210.0], dtype=torch.float64), T)
    conf2 = cls2.max(-1).values.sigmoid()
    conf2[:, :6] = torch.maximum(top * 0.6, conf2[:, :6])
    torch.testing.assert_close(bank.confidence, conf2.topk(6, dim=1).values)


def test_batch_size_change_resets_and_bad_anchors_are_named():
    bank = _bank()
    _, feature, anchor, cls, T = _frame(bank, 2, [1.0, 2.0], 0)
    bank.cache(feature, anchor, cls, torch.tensor([1.0, 2.0], dtype=torch.float64), T)
    (_, _, cf, ca, _), *_ = _frame(bank, 3, [1.5, 2.5, 3.5], 1)
    assert cf is None and ca is None and bank.cached_anchor is None
    with pytest.raises(ValueError, match=r'anchors must be \[>= 10, 11\]'):
        InstanceBank(num_anchor=10, embed_dims=4, anchor=np.zeros((5, 11)))
    with pytest.raises(ValueError, match='anchor .* is required'):
        InstanceBank(num_anchor=10, embed_dims=4)


def test_projection_is_float32_multiply_adds_of_the_product():
    """No matrix product (TF32 could move a centre 50 m away by centimetres): the float64
    products' values within float32 rounding."""
    from conftest import no_matrix_products
    gen = torch.Generator().manual_seed(0)
    anchor = torch.randn(2, 9, 11, generator=gen) * 30.0
    transform = torch.stack([_transform(yaw=0.3, t=(1.5, -2.0, 0.1))[0],
                             _transform(yaw=-1.2, t=(0.0, 4.0, 0.0))[0]])
    dt = torch.tensor([0.5, 0.25])
    with no_matrix_products():
        got = project_anchors(anchor, transform, dt)
    rot, trans = transform[:, None, :3, :3].double(), transform[:, None, :3, 3].double()
    a = anchor.double()
    velocity = a[..., VX:VZ + 1]
    centre = a[..., :3] + velocity * dt.double()[:, None, None]
    want = a.clone()
    want[..., :3] = (rot @ centre[..., None])[..., 0] + trans
    cos_sin = torch.stack([a[..., COS_YAW], a[..., SIN_YAW]], -1)
    want[..., COS_YAW], want[..., SIN_YAW] = (rot[..., :2, :2] @ cos_sin[..., None])[..., 0] \
        .unbind(-1)
    want[..., VX:VZ + 1] = (rot @ velocity[..., None])[..., 0]
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-4)
