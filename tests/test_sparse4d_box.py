"""Sparse4D's 11-number box state and its k-means anchors."""
import math

import numpy as np
import pytest
import torch

from conftest import make_tiny_synthetic, run_python
from turbox_mm.models.sparse4d import (decode_boxes, encode_boxes, gather_boxes, kmeans_anchors,
                                       to_lidar_boxes)
from turbox_mm.models.sparse4d.box3d import COS_YAW, SIN_YAW


def _boxes(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, 3, generator=gen) * 100 - 50
    size = torch.rand(n, 3, generator=gen) * 10 + 0.1
    yaw = (torch.rand(n, 1, generator=gen) * 2 - 1) * math.pi * 0.999
    vel = torch.randn(n, 2, generator=gen)
    return torch.cat([centre, size, yaw, vel], dim=1).double()


def test_encode_decode_round_trip():
    boxes = _boxes(64)
    state = encode_boxes(boxes)
    assert state.shape == (64, 11)
    torch.testing.assert_close(state[:, 3:6], boxes[:, 3:6].log())
    torch.testing.assert_close(state[:, SIN_YAW] ** 2 + state[:, COS_YAW] ** 2,
                               torch.ones(64, dtype=torch.float64))
    decoded = decode_boxes(state)
    assert decoded.shape == (64, 10)
    torch.testing.assert_close(decoded[:, :9], boxes)
    assert (decoded[:, 9] == 0).all()  # vz
    # 7-number boxes carry no velocity; an explicit one overrides.
    state7 = encode_boxes(boxes[:, :7], velocity=torch.ones(64, 3, dtype=torch.float64))
    assert (state7[:, 8:] == 1).all()


def test_decode_accepts_unnormalised_angles_and_batches():
    state = encode_boxes(_boxes(6)).reshape(2, 3, 11)
    scaled = state.clone()
    scaled[..., SIN_YAW:COS_YAW + 1] *= 3.0  # a network's raw outputs need not be unit length
    torch.testing.assert_close(decode_boxes(scaled), decode_boxes(state))


def test_encode_rejects_bad_boxes():
    with pytest.raises(ValueError, match=r'shape \[\.\.\., 7\] or \[\.\.\., 9\], got \(2, 8\)'):
        encode_boxes(torch.zeros(2, 8))
    bad = _boxes(2)
    bad[1, 4] = 0
    with pytest.raises(ValueError, match='sizes must be positive'):
        encode_boxes(bad)
    with pytest.raises(ValueError, match=r'shape \[\.\.\., 11\]'):
        decode_boxes(torch.zeros(3, 10))


def test_lidar_boxes_keep_the_gravity_centre():
    boxes = _boxes(5)
    lidar = to_lidar_boxes(decode_boxes(encode_boxes(boxes)))
    torch.testing.assert_close(lidar.gravity_center.double(), boxes[:, :3], rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(lidar.dims.double(), boxes[:, 3:6], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lidar.yaw.double(), boxes[:, 6], rtol=1e-5, atol=1e-5)
    # mmdet3d stores the bottom centre, half a height below.
    torch.testing.assert_close(lidar.bottom_center[:, 2].double(),
                               boxes[:, 2] - boxes[:, 5] / 2, rtol=1e-5, atol=1e-5)


def test_kmeans_anchors_follow_the_recipe():
    boxes = _boxes(400, seed=1).numpy()[:, :7]
    anchors = kmeans_anchors(boxes, num_anchors=20, radius=40.0, seed=3)
    assert anchors.shape == (20, 11) and anchors.dtype == np.float32
    near = boxes[np.linalg.norm(boxes[:, :3], axis=1) <= 40.0]
    np.testing.assert_allclose(anchors[:, 3:6], np.log(near[:, 3:6].mean(0))[None].repeat(20, 0),
                               rtol=1e-6)
    assert (anchors[:, COS_YAW] == 1).all() and (anchors[:, SIN_YAW] == 0).all()
    assert (anchors[:, 8:] == 0).all()
    # Centres are means of kept boxes: inside the kept boxes' bounding box.
    assert (anchors[:, :3] >= near[:, :3].min(0) - 1e-4).all()
    assert (anchors[:, :3] <= near[:, :3].max(0) + 1e-4).all()
    np.testing.assert_array_equal(anchors, kmeans_anchors(boxes, 20, 40.0, seed=3))
    with pytest.raises(ValueError, match='fewer than the 10000 anchors'):
        kmeans_anchors(boxes, num_anchors=10000)


def test_anchor_tool_on_synthetic_infos(tmp_path):
    root = make_tiny_synthetic(tmp_path / 'synth', frames=4, sweeps=0)
    infos = root / 'nuscenes_infos_train.pkl'
    boxes = gather_boxes(str(infos))
    assert boxes.ndim == 2 and boxes.shape[1] == 7 and len(boxes) > 16
    out = tmp_path / 'anchors.npy'
    proc = run_python(['tools/sparse4d_anchors.py', str(infos), '--out', str(out), '--num',
                       '16'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    anchors = np.load(out)
    assert anchors.shape == (16, 11)
    np.testing.assert_array_equal(anchors, kmeans_anchors(boxes, 16, 55.0, 0))
    # --out without the suffix: the file written is the one printed
    bare = tmp_path / 'bare'
    proc = run_python(['tools/sparse4d_anchors.py', str(infos), '--out', str(bare), '--num',
                       '16'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith(f'-> {bare}.npy') and not bare.exists()
    np.testing.assert_array_equal(np.load(f'{bare}.npy'), anchors)
    proc = run_python(['tools/sparse4d_anchors.py', str(tmp_path / 'nope.pkl'), '--out',
                       str(out)])
    assert proc.returncode != 0 and 'info file not found' in proc.stderr


def _hand_anchor(yaw_scale=1.0):
    # Centre (10, 5, 1), extent (4, 2, 1.5), yaw 90 degrees (sin 1, cos 0).
    state = encode_boxes(torch.tensor([[[10., 5., 1., 4., 2., 1.5, math.pi / 2]]]))
    return state * torch.tensor([1.] * 6 + [yaw_scale] * 2 + [1.] * 3)


def test_keypoints_hand_case():
    from turbox_mm.models.sparse4d import SparseBox3DKeyPointsGenerator
    gen = SparseBox3DKeyPointsGenerator(embed_dims=4)
    with torch.no_grad():
        gen.learnable_fc.weight.zero_()
    points = gen(_hand_anchor(), torch.randn(1, 1, 4))
    assert points.shape == (1, 1, 13, 3)
    expected = torch.tensor([[10, 5, 1], [10, 6.8, 1], [10, 3.2, 1], [9.1, 5, 1], [10.9, 5, 1],
                             [10, 5, 1.675], [10, 5, 0.325]] + [[10, 5, 1]] * 6)
    torch.testing.assert_close(points[0, 0], expected, rtol=0, atol=1e-5)
    # Upstream rotates by (sin, cos) as they are: doubling them doubles horizontal offsets.
    doubled = gen(_hand_anchor(2.0), torch.randn(1, 1, 4))[0, 0]
    torch.testing.assert_close(doubled[1] - doubled[0], 2 * (expected[1] - expected[0]),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(doubled[5] - doubled[0], expected[5] - expected[0], rtol=0,
                               atol=1e-5)


def test_learned_keypoints_stay_inside_the_box_and_get_gradients():
    from turbox_mm.models.sparse4d import SparseBox3DKeyPointsGenerator
    gen = SparseBox3DKeyPointsGenerator(embed_dims=8)
    anchor = _hand_anchor().expand(2, 5, 11)
    feature = torch.randn(2, 5, 8, requires_grad=True) * 100
    points = gen(anchor, feature)
    # Back into the box frame: rotate by -yaw around the centre.
    local = points - anchor[..., None, :3]
    box_x = local[..., 1]  # yaw 90 degrees: the box's x axis is the lidar y axis
    box_y = -local[..., 0]
    assert (box_x[..., 7:].abs() <= 2.0 + 1e-5).all()
    assert (box_y[..., 7:].abs() <= 1.0 + 1e-5).all()
    assert (local[..., 7:, 2].abs() <= 0.75 + 1e-5).all()
    points.sum().backward()
    assert gen.learnable_fc.weight.grad is not None
    assert 'fix_scale' in gen.state_dict() and not any(
        n == 'fix_scale' for n, _ in gen.named_parameters())
    with pytest.raises(ValueError, match='need the instance features'):
        gen(anchor)


def test_anchor_encoder_layout_and_parts():
    from turbox_mm.models.sparse4d import SparseBox3DEncoder
    torch.manual_seed(0)
    enc = SparseBox3DEncoder()
    state = encode_boxes(_boxes(10)).float().reshape(2, 5, 11)
    out = enc(state)
    assert out.shape == (2, 5, 256)
    # 4 blocks of Linear+ReLU+LN per part, the first Linear taking the part's inputs.
    linears = [m for m in enc.pos_fc if isinstance(m, torch.nn.Linear)]
    assert [m.in_features for m in linears] == [3, 128, 128, 128]
    assert enc.yaw_fc[0].in_features == 2 and enc.vel_fc[0].in_features == 3
    # Each part sees only its own slots: changing the velocity moves only the last 64 features.
    moved = state.clone()
    moved[..., 8:] += 1.0
    diff = (enc(moved) - out).abs().amax(dim=(0, 1))
    assert (diff[:192] == 0).all() and (diff[192:] > 0).any()
    with pytest.raises(ValueError, match='needs 4 sizes'):
        SparseBox3DEncoder(embed_dims=(128, 32))


def test_decoder_top_k_and_centerness_order():
    from turbox_mm.models.sparse4d import SparseBox3DDecoder
    logits = torch.full((1, 4, 3), -10.0)
    logits[0, 0, 2] = 2.0   # best class score
    logits[0, 1, 0] = 1.0
    logits[0, 2, 1] = 0.0
    logits[0, 3, 1] = -1.0  # lowest, dropped by top-3
    boxes = encode_boxes(_boxes(4).float())[None]
    quality = torch.zeros(1, 4, 2)
    quality[0, 0, 0] = -6.0  # poor centerness: anchor 0 falls to last place
    out = SparseBox3DDecoder(num_output=3).decode(logits, boxes, quality)[0]
    assert out['indices'].tolist() == [1, 2, 0]
    assert out['labels_3d'].tolist() == [0, 1, 2]
    cls = torch.sigmoid(torch.tensor([1.0, 0.0, 2.0]))
    torch.testing.assert_close(out['scores_3d'],
                               cls * torch.sigmoid(torch.tensor([0.0, 0.0, -6.0])))
    torch.testing.assert_close(out['cls_scores'], cls)
    torch.testing.assert_close(out['boxes_3d'], decode_boxes(boxes[0, [1, 2, 0]]))
    kept = SparseBox3DDecoder(num_output=3, score_threshold=0.6).decode(logits, boxes,
                                                                        quality)[0]
    assert kept['indices'].tolist() == [1, 0]
    inst = SparseBox3DDecoder.to_instance_data(out)
    torch.testing.assert_close(inst.bboxes_3d.gravity_center, out['boxes_3d'][:, :3])
    with pytest.raises(ValueError, match='must agree'):
        SparseBox3DDecoder().decode(logits, boxes[:, :3])
