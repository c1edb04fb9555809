"""Sparse4D v3 tracking at test time: the instance bank's ids (kept by the instance they
belong to, fresh for new ones, none below a threshold, restarted at a new scene), the decoder
and the model that carry them to the predictions."""
import os.path as osp

import numpy as np
import pytest
import torch

from conftest import ROOT, make_sparse4d_tiny
from conftest import build_model as _build, config_with_root as _config
from turbox_mm.models.sparse4d import InstanceBank
from turbox_mm.models.sparse4d.box3d import COS_YAW

TINY_STOCK = osp.join(ROOT, 'configs/sparse4d/sparse4dv3_tiny_stock.py')


# -- the instance bank's ids ------------------------------------------------------------------

def _bank(num_anchor=10, temp=6):
    anchors = np.zeros((num_anchor, 11), np.float32)
    anchors[:, COS_YAW] = 1
    return InstanceBank(num_anchor=num_anchor, embed_dims=4, anchor=anchors,
                        num_temp_instances=temp)


def _frame(bank, ts, tags, cls, threshold=None):
    """One test-time frame of the head's bank calls: get, update (after the single-frame
    layer), cache (after the last), get_instance_id. Feature channel 0 carries a tag naming
    the query it came from, so that carried instances can be followed.

    Returns:
        tuple: the tags after update ``[B, N]`` and the ids ``[B, N]``.
    """
    batch, n = tags.shape
    T = torch.eye(4, dtype=torch.float64).expand(batch, 4, 4).clone()
    bank.get(batch, torch.tensor(ts, dtype=torch.float64), T, T)
    feature = torch.zeros(batch, n, 4)
    feature[..., 0] = tags
    anchor = bank.anchor[None].expand(batch, -1, -1).detach().clone()
    feature, anchor = bank.update(feature, anchor, cls)
    bank.cache(feature, anchor, cls, torch.tensor(ts, dtype=torch.float64), T)
    return feature[..., 0].long(), bank.get_instance_id(cls, threshold)


def test_ids_follow_their_instances_and_restart_at_a_new_scene():
    """Random scores over 5 frames, 2 batch slots; slot 1 starts a new scene (20 s later) at
    frame 3. A query that continues a cached instance keeps that instance's id, every other
    query gets an id never used before, numbered in (sample, query) order from one counter."""
    bank = _bank()
    gen = torch.Generator().manual_seed(0)
    times = [[0.0, 0.0], [0.5, 0.5], [1.0, 1.0], [1.5, 21.0], [2.0, 21.5]]
    id_of_tag, used = {}, set()
    for frame, ts in enumerate(times):
        tags = torch.arange(20).view(2, 10) + 100 * frame
        cls = torch.randn(2, 10, 3, generator=gen)
        carried_tags, ids = _frame(bank, ts, tags, cls)
        assert (ids >= 0).all()  # no threshold (upstream's v3): every query has an id
        fresh = []
        for b in range(2):
            for q in range(10):
                tag, i = int(carried_tags[b, q]), int(ids[b, q])
                if tag // 100 < frame:  # carried from an earlier frame
                    assert q < 6 and id_of_tag[tag] == i, (frame, b, q)
                else:
                    assert i not in used, (frame, b, q)
                    fresh.append(i)
                id_of_tag[tag] = i
        assert fresh == list(range(min(fresh), min(fresh) + len(fresh)))
        used.update(ids.flatten().tolist())
        carried = (carried_tags // 100 < frame).sum(dim=1).tolist()
        if frame == 0:
            assert carried == [0, 0]
        elif frame == 3:
            assert carried == [6, 0]  # slot 1 starts a new scene: all its ids are new
        else:
            assert carried == [6, 6]
        # The bank keeps the ids of what it cached, in the cache's order.
        cached_tags = bank.cached_feature[..., 0].long()
        for b in range(2):
            assert bank.instance_id[b].tolist() == [id_of_tag[int(t)] for t in cached_tags[b]]


def test_threshold_gives_weak_new_queries_no_id():
    bank = _bank()
    cls = torch.full((1, 10, 3), -4.0)
    cls[0, :5, 0] = 3.0  # five confident queries, five weak ones (sigmoid(-4) < 0.2)
    _, ids = _frame(bank, [0.0], torch.arange(10)[None], cls, threshold=0.2)
    assert ids[0].tolist() == [0, 1, 2, 3, 4] + [-1] * 5  # query q (tag q) has id q
    # Next frame, every score weak: the carried instances keep their ids (the threshold gates
    # fresh ids only); the weak one carried without an id and the new queries get none.
    tags, ids2 = _frame(bank, [0.5], torch.arange(10)[None] + 100, torch.full((1, 10, 3), -4.0),
                        threshold=0.2)
    carried = tags[0, :6].tolist()
    assert sorted(carried[:5]) == [0, 1, 2, 3, 4] and 5 <= carried[5] < 10
    assert ids2[0, :5].tolist() == carried[:5]
    assert ids2[0, 5:].tolist() == [-1] * 5


def test_a_reset_starts_without_ids_and_never_reuses_one():
    bank = _bank()
    gen = torch.Generator().manual_seed(1)
    _, first = _frame(bank, [0.0, 0.0], torch.arange(20).view(2, 10), torch.randn(2, 10, 3,
                                                                                  generator=gen))
    # A batch of 1 resets the bank (as upstream): nothing carried, fresh ids after the old.
    _, second = _frame(bank, [0.5], torch.arange(10)[None] + 100, torch.randn(1, 10, 3,
                                                                              generator=gen))
    assert second[0].tolist() == list(range(20, 30))
    assert not set(second.flatten().tolist()) & set(first.flatten().tolist())


def test_training_frames_leave_ids_alone():
    """In training, cache() drops the ids (get_instance_id is a test-time call): a carried id
    never outlives the cache it was given for, and training does no id work."""
    bank = _bank()
    _frame(bank, [0.0], torch.arange(10)[None], torch.randn(1, 10, 3))
    assert bank.instance_id is not None
    T = torch.eye(4, dtype=torch.float64)[None]
    bank.get(1, torch.tensor([0.5], dtype=torch.float64), T, T)
    feature, anchor = bank.update(torch.zeros(1, 10, 4), bank.anchor[None].detach(),
                                  torch.zeros(1, 10, 3))
    bank.cache(feature, anchor, torch.zeros(1, 10, 3),
               torch.tensor([0.5], dtype=torch.float64), T)
    assert bank.instance_id is None
    with pytest.raises(RuntimeError, match='cache'):
        _bank().get_instance_id(torch.zeros(1, 10, 3))


def test_decoder_keeps_each_box_id():
    from turbox_mm.models.sparse4d import SparseBox3DDecoder, encode_boxes
    logits = torch.full((1, 4, 3), -10.0)
    logits[0, 0, 2], logits[0, 1, 0], logits[0, 2, 1], logits[0, 3, 1] = 2.0, 1.0, 0.0, -1.0
    boxes = encode_boxes(torch.tensor([[i, 0., 0., 4., 2., 1.5, 0.] for i in range(4)]))[None]
    ids = torch.tensor([[40, 41, 42, 43]])
    out = SparseBox3DDecoder(num_output=3).decode(logits, boxes, torch.zeros(1, 4, 2), ids)[0]
    assert out['instance_ids'].tolist() == (out['indices'] + 40).tolist()
    kept = SparseBox3DDecoder(num_output=3, score_threshold=0.6).decode(logits, boxes,
                                                                        instance_id=ids)[0]
    assert kept['instance_ids'].tolist() == [40, 41]
    inst = SparseBox3DDecoder.to_instance_data(out)
    assert inst.instance_ids.tolist() == out['instance_ids'].tolist()
    torch.testing.assert_close(inst.cls_scores, out['cls_scores'])
    with pytest.raises(ValueError, match='instance_id must be'):
        SparseBox3DDecoder().decode(logits, boxes, instance_id=ids[:, :2])


# -- the model -----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_root(tmp_path_factory):
    return make_sparse4d_tiny(tmp_path_factory.mktemp('data') / 'nuscenes_tiny')


def test_predictions_carry_ids_from_frame_to_frame(tiny_root):
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import DefaultScope

    from turbox_mm.registry import DATASETS
    cfg = _config(TINY_STOCK, tiny_root)
    torch.manual_seed(0)
    model = _build(cfg).eval()
    with DefaultScope.overwrite_default_scope('mmdet3d'):
        dataset = DATASETS.build(cfg.val_dataloader.dataset)
    previous = None
    for index in range(3):  # the val scene's first frames, in order
        data = model.data_preprocessor(pseudo_collate([dataset[index]]), training=False)
        with torch.no_grad():
            pred = model.predict(data['inputs'], data['data_samples'])[0].pred_instances_3d
        ids = pred.instance_ids.tolist()
        assert len(ids) == 16 and len(set(ids)) == 16 and min(ids) >= 0
        assert pred.cls_scores.shape == pred.scores_3d.shape
        if previous is not None:
            assert set(ids) & previous  # some boxes continue an instance of the last frame
        previous = set(ids)
        # 32 queries take ids in the first frame; then the 16 that are not carried.
        assert int(model.head.instance_bank._next_id) == 32 + 16 * index
