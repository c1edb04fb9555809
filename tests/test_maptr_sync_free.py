"""MapTR v1 and v2's turbox training step waits for the device once: one training step (loss
and backward) of the tiny CPU configs with the turbox op switch (``turbox.ops.fast``, what the
turbox twins apply) has no sync-prone operation (:class:`SyncProneOps`, the CPU stand-in for
CUDA's sync debug mode) outside the one Hungarian transfer, while the stock step has many
(so the check can fail)."""
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.dataset import pseudo_collate

from conftest import ROOT, make_maptr_tiny

#: What the turbox step may do: the one device-to-host copy of every cost matrix of the step
#: (and its extras, non-blocking on CUDA), turbox_mm.models.sparse4d.matching.solve_batched.
ALLOWED = [('turbox_mm/models/sparse4d/matching.py', None)]


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    """3 scenes of 3 frames, 320 x 180 images, lidar points, the map, and the map ground truth
    precomputed (v2's configs read it; v1's computes it in its pipeline)."""
    return make_maptr_tiny(tmp_path_factory.mktemp('maptr_sync') / 'nuscenes', map_gt=True)


def step_findings(data_root, name, impl):
    """Findings of the first training step (loss and backward) of the tiny ``name`` config
    with ``impl`` ops (the turbox caches of host data are uploaded without a wait, so the first
    step is as clean as the steady state the H200 benchmark counts)."""
    import turbox_mm  # noqa: F401
    from mmdet3d.registry import DATASETS, MODELS
    from mmengine.registry import init_default_scope

    from turbox_mm.benchmark.sync_prone import SyncProneOps
    from turbox_mm.engine.runner.fast_ops import _set_op_impls
    init_default_scope('mmdet3d')
    cfg = Config.fromfile(osp.join(ROOT, f'configs/maptr/{name}_tiny_cpu_stock.py'))
    cfg.train_dataloader.dataset.data_root = data_root
    for t in cfg.train_dataloader.dataset.pipeline:
        if t['type'] == 'turbox_mm.LoadMapGT':
            t['data_root'] = data_root
    if impl == 'turbox':  # the model part of the turbox twin (turbox.ops.fast)
        _set_op_impls(cfg.model, 'mmdet3d', [])
    np.random.seed(0)
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.train()
    assert model.pts_bbox_head.op_impl == impl and model.bev_encoder.op_impl == impl
    data = model.data_preprocessor(pseudo_collate([dataset[0], dataset[1]]), training=True)

    with SyncProneOps() as found:
        losses = model.loss(data['inputs'], data['data_samples'])
        sum(value for key, value in losses.items() if 'loss' in key).backward()
    return found, losses


@pytest.fixture
def cuda_focal_path(monkeypatch):
    """The turbox focal loss as it runs on CUDA (its torch formulas; on CPU tensors it defers
    to mmdet's own path), and the attention ops' CUDA route."""
    import turbox_mm.models.losses.focal_loss as focal
    monkeypatch.setattr(focal, '_on_gpu', lambda pred: True)
    # the attention ops by CUDA's route too: the registered op (the kernel on the GPU; here
    # the reference inside it), not the eager reference their entry points call on the CPU,
    # which reads the level shapes on the host
    from turbox_mm.ops.dispatch import OpDispatch
    monkeypatch.setattr(OpDispatch, 'reference_in_eager', lambda self, tensor: False)


@pytest.mark.parametrize('name', ['maptr', 'maptrv2'])
def test_turbox_step_syncs_only_for_the_matching(data_root, name, cuda_focal_path):
    found, losses = step_findings(data_root, name, 'turbox')
    assert found.outside(ALLOWED) == [], found.table(root=ROOT)
    assert 1 <= found.total <= 2, found.table(root=ROOT)  # the costs (+ the extras' copy)
    if name == 'maptrv2':  # the whole v2 step ran: one-to-many, segmentation, depth
        assert {'loss_cls_one2many', 'loss_seg', 'loss_pv_seg', 'loss_depth'} <= set(losses)


@pytest.mark.parametrize('name', ['maptr', 'maptrv2'])
def test_stock_step_is_full_of_them(data_root, name):
    found, _ = step_findings(data_root, name, 'stock')
    outside = found.outside(ALLOWED)
    files = {osp.basename(f.file) for f in outside}
    assert len(outside) >= 50, found.table(root=ROOT)
    assert {'maptr_head.py', 'maptr_assigner.py', 'geometry.py'} <= files
    assert {'sync', 'h2d', 'd2h'} <= {f.kind for f in outside}


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_sync_free_normalisation_is_upstreams_bit_for_bit(dtype):
    """The extent filled on the device divides exactly as upstream's ``new_tensor``."""
    from turbox_mm.benchmark.sync_prone import SyncProneOps
    from turbox_mm.models.maptr.geometry import normalize_2d_bbox, normalize_2d_pts
    torch.manual_seed(0)
    pts = (torch.rand(7, 20, 2, dtype=dtype) - 0.5) * 70
    boxes = torch.cat([pts[:, 0], pts[:, 1] + 3.3], -1)
    for pc_range in ([-15.0, -30.0, -2.0, 15.0, 30.0, 2.0],
                     [-15.3, -29.85, -10, 15.15, 30.45, 10]):
        with SyncProneOps(backward_sources=False) as stock:
            expected = (normalize_2d_pts(pts, pc_range), normalize_2d_bbox(boxes, pc_range))
        with SyncProneOps(backward_sources=False) as turbox:
            got = (normalize_2d_pts(pts, pc_range, sync_free=True),
                   normalize_2d_bbox(boxes, pc_range, sync_free=True))
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
        assert got[0].dtype == dtype and got[1].dtype == dtype
        assert stock.total == 2 and turbox.total == 0
