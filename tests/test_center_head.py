"""TurboxCenterHead's batched targets against mmdet3d's CenterHead loop, element for element.

The head settings are those of mmdet3d 1.4's nuScenes CenterPoint configs (6 tasks, 0.075 m
voxels or 0.2 m pillars, out_size_factor 8 / 4, gaussian_overlap 0.1, min_radius 2,
max_objs 500); the boxes cover the cases mmdet3d's loop treats specially: centres outside the
map, centres in (-1, 0) cells (truncated to cell 0), boxes of zero size, windows clipped at
the edges, more boxes of one task than ``max_objs``, empty samples and overlapping Gaussians.
"""
import copy
import os
from unittest import mock

import pytest
import torch
from mmengine.config import Config
from mmengine.structures import InstanceData

from turbox_mm.engine.runner.fast_ops import apply_fast_ops
from turbox_mm.models.dense_heads import TurboxCenterHead
from turbox_mm.models.dense_heads.center_targets import gaussian_radius

mmdet3d = pytest.importorskip('mmdet3d')
from mmdet3d.models.dense_heads import CenterHead  # noqa: E402
from mmdet3d.models.utils import gaussian_radius as mmdet3d_gaussian_radius  # noqa: E402
from mmdet3d.structures import LiDARInstance3DBoxes  # noqa: E402

CONFIGS = {
    'voxel0075': 'centerpoint/centerpoint_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d.py',
    'pillar02': 'centerpoint/centerpoint_pillar02_second_secfpn_8xb4-cyclic-20e_nus-3d.py',
}


def shipped(name):
    return Config.fromfile(os.path.join(os.path.dirname(mmdet3d.__file__), '.mim', 'configs',
                                        CONFIGS[name]))


def head_cfg(name, max_objs=None):
    cfg = shipped(name).model.pts_bbox_head.to_dict()
    cfg.pop('type')
    train = shipped(name).model.train_cfg.pts.to_dict()
    if max_objs is not None:
        train['max_objs'] = max_objs
    cfg['train_cfg'] = train
    return cfg


def random_instances(num_samples=3, seed=0, sizes=(60, 0, 45)):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in range(num_samples):
        n = sizes[s % len(sizes)]
        centre = (torch.rand(n, 3, generator=gen) * 2 - 1) * torch.tensor([60.0, 60.0, 2.0])
        dims = torch.rand(n, 3, generator=gen) * torch.tensor([10.0, 3.0, 3.0]) + 0.05
        yaw = (torch.rand(n, 1, generator=gen) * 2 - 1) * 3.14
        vel = torch.randn(n, 2, generator=gen)
        boxes = torch.cat([centre, dims, yaw, vel], 1)
        if n > 10:
            boxes[0, :2] = torch.tensor([-54.2, -54.3])  # in cell (-0.x): truncated to 0
            boxes[1, 3] = 0.0  # zero length: skipped
            boxes[2, :2] = torch.tensor([53.9, -53.95])  # at the edge: clipped window
            boxes[3, :2] = torch.tensor([70.0, 0.0])  # outside the map
            boxes[4] = boxes[5]  # the same box twice
            boxes[6, :2] = boxes[7, :2] + 0.3  # overlapping Gaussians
        labels = torch.randint(0, 10, (n, ), generator=gen)
        out.append(InstanceData(bboxes_3d=LiDARInstance3DBoxes(boxes, box_dim=9),
                                labels_3d=labels))
    return out


def assert_same_targets(got, want):
    for name, a_list, b_list in zip(('heatmap', 'anno_box', 'ind', 'mask'), got, want):
        assert len(a_list) == len(b_list)
        for task, (a, b) in enumerate(zip(a_list, b_list)):
            assert a.dtype == b.dtype and a.shape == b.shape, (name, task)
            assert torch.equal(a, b), (name, task, (a != b).sum().item())


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_batched_targets_equal_centerhead_loop(name):
    cfg = head_cfg(name)
    stock = CenterHead(**cfg)
    turbox = TurboxCenterHead(op_impl='turbox', **cfg)
    instances = random_instances()
    want = stock.get_targets(copy.deepcopy(instances))
    got = turbox.get_targets(instances)
    assert_same_targets(got, want)
    assert sum(int(h.eq(1).sum()) for h in want[0]) > 50  # boxes were drawn
    assert TurboxCenterHead(**cfg).get_targets(instances)[0][0].shape == want[0][0].shape


def test_max_objs_cuts_each_task_and_sample_as_the_loop():
    cfg = head_cfg('voxel0075', max_objs=4)
    instances = random_instances(num_samples=2, seed=3, sizes=(80, 70))
    want = CenterHead(**cfg).get_targets(copy.deepcopy(instances))
    got = TurboxCenterHead(op_impl='turbox', **cfg).get_targets(instances)
    assert_same_targets(got, want)
    assert int(got[3][0].sum()) > 0


def test_only_empty_samples():
    cfg = head_cfg('pillar02')
    instances = random_instances(num_samples=2, sizes=(0, ))
    assert_same_targets(TurboxCenterHead(op_impl='turbox', **cfg).get_targets(instances),
                        CenterHead(**cfg).get_targets(copy.deepcopy(instances)))


def test_gaussian_radius_equals_mmdet3d_elementwise():
    gen = torch.Generator().manual_seed(1)
    h, w = torch.rand(200, generator=gen) * 20 + 0.01, torch.rand(200, generator=gen) * 20 + 0.01
    got = gaussian_radius(h, w, min_overlap=0.1)
    want = torch.stack([mmdet3d_gaussian_radius((a, b), min_overlap=0.1) for a, b in zip(h, w)])
    assert torch.equal(got, want)


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.cuda)])
def test_gaussians_of_every_radius_are_mmdet3ds_bit_for_bit(device):
    """:func:`gaussian_values` over each kernel's square and beyond: the table's values up to
    its radius, the device formula's above (the same float64 operations; on CUDA its own
    ``exp``), both equal to mmdet3d's ``gaussian_2d`` in float32; zero outside the square."""
    from mmdet3d.models.utils import gaussian_2d

    from turbox_mm.models.dense_heads.center_targets import TABLE_RADIUS, gaussian_values
    for r in list(range(TABLE_RADIUS + 3)) + [47, 80, 121]:
        d = torch.arange(-r - 2, r + 3, device=device)
        got = gaussian_values(d[:, None], d[None, :], torch.tensor(r, device=device)).cpu()
        want = torch.zeros_like(got)
        want[2:-2, 2:-2] = torch.from_numpy(gaussian_2d((2 * r + 1, 2 * r + 1),
                                                        sigma=(2 * r + 1) / 6)).float()
        assert torch.equal(got, want), r


def test_targets_with_large_boxes_and_small_chunks(monkeypatch):
    """Boxes whose radius passes the table's (the device formula draws them) and chunks of a
    few boxes each (``CHUNK_CELLS`` lowered): still the loop's targets."""
    import turbox_mm.models.dense_heads.center_targets as targets
    cfg = head_cfg('pillar02')
    instances = random_instances(num_samples=2, seed=5, sizes=(30, 12))
    boxes = instances[0].bboxes_3d.tensor  # 50-90 m across, centres inside the map
    boxes[:4, :2] = torch.tensor([[0.0, 0.0], [10.0, -5.0], [-20.0, 15.0], [30.0, 30.0]])
    boxes[:4, 3:5] = torch.tensor([[80.0, 85.0], [90.0, 70.0], [70.0, 65.0], [75.0, 80.0]])
    cells = 0.2 * 4  # pillar02: 0.2 m pillars, out_size_factor 4
    radii = gaussian_radius(boxes[:4, 4] / cells, boxes[:4, 3] / cells, min_overlap=0.1)
    assert (radii > targets.TABLE_RADIUS + 1).all(), radii  # the device formula draws them
    want = CenterHead(**cfg).get_targets(copy.deepcopy(instances))
    monkeypatch.setattr(targets, 'CHUNK_CELLS', 3 * 128 * 128)
    got = TurboxCenterHead(op_impl='turbox', **cfg).get_targets(instances)
    assert_same_targets(got, want)


def test_batched_targets_read_nothing_on_the_host():
    """The targets wait for no device value and upload nothing (the CPU stand-in for CUDA's
    sync debug mode): no radius bound read to size windows, no scalar assigned by indexing."""
    from turbox_mm.benchmark.sync_prone import SyncProneOps
    cfg = head_cfg('voxel0075')
    head = TurboxCenterHead(op_impl='turbox', **cfg)
    instances = random_instances()
    head.get_targets(instances)  # the Gaussian table's first upload
    with SyncProneOps() as found:
        head.get_targets(instances)
    assert found.total == 0, found.table()


def test_bad_op_impl():
    with pytest.raises(ValueError, match="op_impl must be 'stock' or 'turbox'"):
        TurboxCenterHead(op_impl='fast', **head_cfg('pillar02'))


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_fast_ops_moves_centerpoint_configs_to_the_batched_head(name):
    cfg = shipped(name)
    before = cfg.model.pts_bbox_head.to_dict()
    changes = apply_fast_ops(cfg, dict(fast=True))
    head = cfg.model.pts_bbox_head
    assert head.type == 'turbox_mm.TurboxCenterHead' and head.op_impl == 'turbox'
    assert {k: v for k, v in head.to_dict().items() if k not in ('type', 'op_impl')} == \
        {k: v for k, v in before.items() if k != 'type'}
    assert any('TurboxCenterHead' in c for c in changes)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_cuda_batched_targets_equal_centerhead_loop(name):
    cfg = head_cfg(name)
    instances = [i.to('cuda') for i in random_instances(num_samples=4, sizes=(120, 0, 45, 300))]
    want = CenterHead(**cfg).cuda().get_targets(copy.deepcopy(instances))
    got = TurboxCenterHead(op_impl='turbox', **cfg).cuda().get_targets(instances)
    assert got[0][0].is_cuda
    assert_same_targets(got, want)


def test_boxes_without_velocity_take_the_stock_path():
    cfg = head_cfg('pillar02')
    instances = random_instances(num_samples=1, sizes=(0, ))
    for gt in instances:  # 7-value boxes, as configs without velocity have
        gt.bboxes_3d = LiDARInstance3DBoxes(torch.zeros(0, 7), box_dim=7)
    head = TurboxCenterHead(op_impl='turbox', **cfg)
    with mock.patch.object(CenterHead, 'get_targets', return_value='stock') as stock:
        assert head.get_targets(instances) == 'stock'
    stock.assert_called_once()


def test_fast_ops_keeps_a_centerhead_registered_by_a_project():
    from mmdet3d.registry import MODELS as MMDET3D_MODELS

    class ProjectCenterHead(CenterHead):
        pass

    cfg = shipped('pillar02')
    original = MMDET3D_MODELS._module_dict['CenterHead']
    MMDET3D_MODELS._module_dict['CenterHead'] = ProjectCenterHead
    try:
        apply_fast_ops(cfg, dict(fast=True))
    finally:
        MMDET3D_MODELS._module_dict['CenterHead'] = original
    assert cfg.model.pts_bbox_head.type == 'CenterHead'


def test_boxes_not_drawn_leave_every_map_as_it_was():
    """Boxes marked not valid (another task's classes, cut by max_objs) reduce nothing into
    any map, wherever their (spread) scatter target lands."""
    from turbox_mm.models.dense_heads.center_targets import draw_gaussians
    gen = torch.Generator().manual_seed(0)
    heatmap = torch.rand(2, 3, 9, 11, generator=gen)
    num = 40
    image = torch.randint(0, 2, (num, ), generator=gen)
    cls = torch.randint(0, 3, (num, ), generator=gen)
    center = torch.stack([torch.randint(0, 11, (num, ), generator=gen),
                          torch.randint(0, 9, (num, ), generator=gen)], 1)
    radius = torch.randint(0, 4, (num, ), generator=gen)
    valid = torch.rand(num, generator=gen) > 0.6
    got = draw_gaussians(heatmap.clone(), image, cls, center, radius, valid)
    want = draw_gaussians(heatmap.clone(), image[valid], cls[valid], center[valid],
                          radius[valid], valid[valid])
    assert torch.equal(got, want) and not torch.equal(got, heatmap)
    untouched = draw_gaussians(heatmap.clone(), image, cls, center, radius, valid & False)
    assert torch.equal(untouched, heatmap)
