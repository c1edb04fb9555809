"""Batched voxelization in the data preprocessor, and ``ops.fast`` on mmdet3d's own configs.

``TurboxDet3DDataPreprocessor(op_impl='turbox')`` must return the voxel dictionary of mmdet3d's
``Det3DDataPreprocessor`` (mmcv's op, one call per sample) key for key, bit for bit; and
``ops.fast`` must switch a shipped mmdet3d lidar config to it without any other change.
"""
import copy
import os

import pytest
import torch
from mmengine.config import Config

from turbox_mm.engine.runner.fast_ops import apply_fast_ops
from turbox_mm.models.data_preprocessors import TurboxDet3DDataPreprocessor
from turbox_mm.models.layers import TurboxVoxelization
from turbox_mm.ops import dispatch

pytest.importorskip('mmcv.ops')
Det3DDataPreprocessor = pytest.importorskip(
    'mmdet3d.models.data_preprocessors').Det3DDataPreprocessor
VoxelizationByGridShape = pytest.importorskip(
    'mmdet3d.models.data_preprocessors.voxelize').VoxelizationByGridShape

HARD = dict(max_num_points=5, point_cloud_range=[-5, -5, -1, 5, 5, 1], voxel_size=[0.4, 0.4, 0.5],
            max_voxels=(150, 400))
DYNAMIC = dict(max_num_points=-1, point_cloud_range=[-5, -5, -1, 5, 5, 1],
               voxel_size=[0.4, 0.4, 0.5], max_voxels=(-1, -1))


def clouds(sizes=(900, 0, 1300), seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        pts = torch.rand(n, 4, generator=gen) * torch.tensor([14, 14, 3, 1]) - \
            torch.tensor([7, 7, 1.5, 0])
        out.append(pts)
    return out


def batch(points):
    return dict(inputs=dict(points=points), data_samples=None)


@pytest.mark.parametrize('layer_cfg, voxel_type', [(HARD, 'hard'), (DYNAMIC, 'dynamic')])
@pytest.mark.parametrize('training', [True, False])
def test_turbox_preprocessor_gives_the_stock_voxel_dict(layer_cfg, voxel_type, training):
    stock = Det3DDataPreprocessor(voxel=True, voxel_type=voxel_type, voxel_layer=layer_cfg)
    fast = TurboxDet3DDataPreprocessor(voxel=True, voxel_type=voxel_type, voxel_layer=layer_cfg,
                                       op_impl='turbox')
    assert isinstance(fast.voxel_layer, TurboxVoxelization)
    stock.train(training)
    fast.train(training)
    points = clouds()
    want = stock(batch(points), training)['inputs']['voxels']
    with dispatch.kernel_on_cpu():
        got = fast(batch(copy.deepcopy(points)), training)['inputs']['voxels']
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key
    if voxel_type == 'hard':  # the per-sample budget really cut in training
        counts = torch.bincount(want['coors'][:, 0].long(), minlength=3).tolist()
        assert counts[1] == 0 and (max(counts) == 150) == training


def test_stock_op_impl_keeps_mmdet3d_layer():
    pre = TurboxDet3DDataPreprocessor(voxel=True, voxel_layer=HARD)
    assert isinstance(pre.voxel_layer, VoxelizationByGridShape)
    with pytest.raises(ValueError, match="op_impl must be 'stock' or 'turbox'"):
        TurboxDet3DDataPreprocessor(voxel=True, voxel_layer=HARD, op_impl='fast')


def test_layer_matches_mmdet3d_layer_attributes_and_results():
    for cfg in (HARD, dict(HARD, voxel_size=[], grid_shape=[26, 26, 5])):
        ours, theirs = TurboxVoxelization(**cfg), VoxelizationByGridShape(**cfg)
        assert ours.voxel_size == theirs.voxel_size
        assert ours.max_voxels == tuple(theirs.max_voxels)
        for mode in (True, False):
            ours.train(mode)
            theirs.train(mode)
            pts = clouds((2000, ))[0]
            with dispatch.kernel_on_cpu():
                got = ours(pts)
            for a, b in zip(got, theirs(pts)):
                assert torch.equal(a, b)
    with pytest.raises(ValueError, match='exclusive'):
        TurboxVoxelization(**dict(HARD, grid_shape=[26, 26, 5]))
    with pytest.raises(ValueError, match='point_cloud_range'):
        TurboxVoxelization(**dict(HARD, point_cloud_range=[5, 5, 1, -5, -5, -1]))


MMDET3D_LIDAR_CONFIGS = [
    'centerpoint/centerpoint_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d.py',
    'centerpoint/centerpoint_pillar02_second_secfpn_8xb4-cyclic-20e_nus-3d.py',
    'pointpillars/pointpillars_hv_secfpn_sbn-all_8xb4-2x_nus-3d.py',
]


def shipped_config(path):
    """A config shipped inside the installed mmdet3d package."""
    import mmdet3d
    return Config.fromfile(os.path.join(os.path.dirname(mmdet3d.__file__), '.mim', 'configs',
                                        path))


@pytest.mark.parametrize('path', MMDET3D_LIDAR_CONFIGS)
def test_fast_ops_rewrites_mmdet3d_lidar_configs(path):
    cfg = shipped_config(path)
    before = copy.deepcopy(cfg.model.data_preprocessor.to_dict())
    changes = apply_fast_ops(cfg, dict(fast=True))
    pre = cfg.model.data_preprocessor
    assert pre.type == 'turbox_mm.TurboxDet3DDataPreprocessor' and pre.op_impl == 'turbox'
    assert any('TurboxDet3DDataPreprocessor' in c for c in changes)
    rest = {k: v for k, v in pre.to_dict().items() if k not in ('type', 'op_impl')}
    assert rest == {k: v for k, v in before.items() if k != 'type'}  # nothing else changed
    from turbox_mm.registry import MODELS
    built = MODELS.build(pre)
    assert isinstance(built.voxel_layer, TurboxVoxelization)
    assert built.voxel_layer.max_voxels == tuple(before['voxel_layer']['max_voxels'])
    # ops.fast off: untouched
    cfg = shipped_config(path)
    assert apply_fast_ops(cfg, dict(fast=False)) == []
    assert cfg.model.data_preprocessor.type == 'Det3DDataPreprocessor'
