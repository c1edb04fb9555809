"""The TransFusion head's batched (turbox) training targets equal the per-sample stock ones."""
import copy

import pytest
import torch

from test_bevfusion_head import bev, gt_boxes, head_cfg
from turbox_mm.benchmark.syncs import SyncCounter
from turbox_mm.registry import MODELS


def heads(device='cpu', **changes):
    """A stock head and its turbox twin with the same weights."""
    torch.manual_seed(0)
    stock = MODELS.build(head_cfg(**changes)).to(device).train()
    turbox = MODELS.build(head_cfg(op_impl='turbox', **changes)).to(device).train()
    turbox.load_state_dict(stock.state_dict())
    return stock, turbox


def batch_gts(counts, device='cpu', seed=0):
    gts = []
    for i, num in enumerate(counts):
        gt = gt_boxes(num, seed=seed + i)
        gts.append(gt.to(device))
    return gts


def assert_same_targets(stock, turbox):
    names = ('labels', 'label_weights', 'bbox_targets', 'bbox_weights', 'ious', 'num_pos',
             'matched_ious', 'heatmap')
    for name, a, b in zip(names, stock, turbox):
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype, name
            assert a.shape == b.shape, name
        torch.testing.assert_close(torch.as_tensor(b).cpu(), torch.as_tensor(a).cpu(),
                                   rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize('counts,layers,changes', [
    ([4, 0, 7], 1, {}),
    ([5, 0], 1, {}),  # a last sample without boxes: its offset is the box count
    ([5, 3], 2, {}),
    ([0, 0], 1, {}),
    ([6, 1], 1, dict(train_cfg_pos_weight=2)),
])
def test_turbox_targets_equal_the_stock_ones(counts, layers, changes):
    cfg = {}
    if layers > 1:
        cfg['num_decoder_layers'] = layers
    stock, turbox = heads(**cfg)
    if 'train_cfg_pos_weight' in changes:
        for head in (stock, turbox):
            head.train_cfg = copy.deepcopy(head.train_cfg)
            head.train_cfg['pos_weight'] = changes['train_cfg_pos_weight']
    preds = stock(bev(batch=len(counts)))
    gts = batch_gts(counts)
    expected = stock.get_targets(gts, preds)
    got = turbox.get_targets(gts, preds)
    assert_same_targets(expected, got)
    assert isinstance(got[5], int)
    if sum(counts):
        assert got[5] > 0 and got[7].max() == 1  # some positives, Gaussian peaks drawn


def test_turbox_losses_and_gradients_equal_the_stock_ones():
    stock, turbox = heads(num_decoder_layers=2)
    x = bev(batch=3)
    gts = batch_gts([5, 0, 3])
    losses = []
    for head in (stock, turbox):
        head.zero_grad()
        torch.manual_seed(1)  # the decoder's dropout draws
        out = head.loss_by_feat(head(x), gts)
        sum(v for k, v in out.items() if 'loss' in k).backward()
        losses.append(out)
    assert losses[0].keys() == losses[1].keys()
    for key in losses[0]:
        torch.testing.assert_close(losses[1][key], losses[0][key], rtol=1e-5, atol=1e-6,
                                   msg=key)
    for (name, a), (_, b) in zip(stock.named_parameters(), turbox.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_box_loss_of_a_batch_without_boxes_is_zero_with_a_graph():
    _, turbox = heads()
    out = turbox.loss_by_feat(turbox(bev()), batch_gts([0, 0]))
    assert out['layer_-1_loss_bbox'] == 0 and out['layer_-1_loss_bbox'].requires_grad
    assert out['matched_ious'] == 0


@pytest.mark.cuda
@pytest.mark.parametrize('matcher,syncs', [('device', 0), ('host', 2)])
def test_turbox_targets_on_cuda_equal_stock_without_a_sync(matcher, syncs):
    """On CUDA the turbox targets wait for nothing with the device matcher (after the first
    call, whose matching is checked against scipy once a process); with the host matcher once
    per targets (one inside get_targets, one for those loss_by_feat builds again)."""
    stock, turbox = heads('cuda', num_decoder_layers=2)
    turbox.matcher = matcher
    preds = stock(bev(batch=4).cuda())
    gts = batch_gts([12, 0, 30, 7], device='cuda')
    expected = stock.get_targets(gts, preds)
    turbox.get_targets(gts, preds)  # warm-up: caches, the Gaussian table, the matcher check
    torch.cuda.synchronize()
    with SyncCounter() as counted:
        got = turbox.get_targets(gts, preds)
        turbox.loss_by_feat(preds, gts)
    assert_same_targets(expected, got)
    assert counted.total == syncs, '\n'.join(f'{f}:{line} x{n}' for f, line, n in counted.top())


def test_turbox_targets_and_losses_read_nothing_on_the_host(monkeypatch):
    """The CPU stand-in for CUDA's sync debug mode over the turbox targets and losses, on the
    device matcher's path (taken here as on CUDA; the op's own CPU implementation is not what
    runs on the device, so it is not searched): no sync-prone operation at all, and the stock
    targets."""
    import turbox_mm.models.bevfusion.transfusion_targets as targets
    import turbox_mm.models.sparse4d.matching as matching
    from turbox_mm.benchmark.sync_prone import SyncProneOps
    monkeypatch.setattr(targets, 'matches_on_device', lambda cost, matcher: True)
    monkeypatch.setattr(matching, '_CHECKED_DEVICES', {'cpu'})  # the first call's scipy check
    import turbox_mm.models.losses.focal_loss as focal  # the focal loss's CUDA formulas
    monkeypatch.setattr(focal, '_on_gpu', lambda pred: True)
    stock, turbox = heads(num_decoder_layers=2)
    preds = stock(bev(batch=3))
    gts = batch_gts([6, 0, 9])
    expected = stock.get_targets(gts, preds)
    turbox.get_targets(gts, preds)  # the Gaussian table's first upload
    with SyncProneOps() as found:
        got = turbox.get_targets(gts, preds)
        turbox.loss_by_feat(preds, gts)
    assert found.total == 0, found.table()
    assert_same_targets(expected, got)


def test_sync_free_costs_equal_the_stock_ones():
    """The turbox targets' costs (cached range constants, :func:`lidar_iou_3d`) are the stock
    costs (mmdet3d's ``BboxOverlaps3D``), bit for bit, for fp32 and fp64 proposals."""
    from turbox_mm.models.bevfusion.transfusion_assigner import lidar_iou_3d
    stock, _ = heads()
    assigner, cfg = stock.bbox_assigner, stock.train_cfg
    assert assigner._lidar_iou()  # the config's mmdet3d IoU: the sync-free path is taken
    gts = batch_gts([9])[0]
    gen = torch.Generator().manual_seed(3)
    boxes = gts.bboxes_3d.tensor[torch.randint(0, 9, (40, ), generator=gen)]
    boxes = boxes + 0.4 * torch.randn(boxes.shape, generator=gen)  # overlapping, not equal
    boxes[:7, 3:6] = 0  # degenerate sizes: mmdet3d's 1e-4 guard
    logits = torch.randn(stock.num_classes, 40, generator=gen)
    for dtype in (torch.float32, torch.float64):
        props = boxes.to(dtype)
        expected = assigner.cost(props, gts.bboxes_3d.tensor, gts.labels_3d, logits, cfg)
        got = assigner.cost(props, gts.bboxes_3d.tensor, gts.labels_3d, logits, cfg,
                            sync_free=True)
        for a, b in zip(expected, got):
            assert torch.equal(a, b), dtype
    assert (expected[1] > 0).any()  # some pairs overlap: the IoU is exercised
    assert lidar_iou_3d(boxes[:0], boxes).shape == (0, 40)
