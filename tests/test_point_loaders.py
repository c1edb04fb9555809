"""turbox.data.point_loaders: mmdet3d's lidar loaders -> turbox twins; named file errors."""
import copy

import numpy as np
import pytest
from mmengine.config import Config

pytest.importorskip('mmdet3d')
from mmdet3d.datasets.transforms import LoadPointsFromFile  # noqa: E402

from turbox_mm.datasets.transforms import LoadPointsFromFileChecked  # noqa: E402
from turbox_mm.engine.runner import TURBOX_OPTIONS, apply_turbox_options  # noqa: E402
from turbox_mm.utils.options import check_options  # noqa: E402

ARGS = dict(coord_type='LIDAR', load_dim=5, use_dim=[0, 1, 2, 3, 4])


def _results(path):
    return dict(lidar_points=dict(lidar_path=str(path)))


def test_the_checked_loader_gives_mmdet3ds_points(tmp_path):
    path = tmp_path / 'cloud.bin'
    np.random.default_rng(0).standard_normal((100, 5)).astype(np.float32).tofile(path)
    want = LoadPointsFromFile(**ARGS)(_results(path))['points'].tensor
    got = LoadPointsFromFileChecked(**ARGS)(_results(path))['points'].tensor
    assert got.shape == (100, 5) and bool((got == want).all())


@pytest.mark.parametrize('content, error, match', [
    (None, FileNotFoundError, r'point file not found: .*gone\.bin'),
    (b'\0' * 22, ValueError, r'cannot read points from .*cut\.bin: buffer size must be a '
                             r'multiple of element size'),
    (b'\0' * 28, ValueError, r'cut\.bin holds 7 float32 values, not a whole number of points '
                             r'of load_dim=5'),
])
def test_a_missing_or_cut_file_is_named(tmp_path, content, error, match):
    path = tmp_path / ('gone.bin' if content is None else 'cut.bin')
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(error, match=match):
        LoadPointsFromFileChecked(**ARGS)(_results(path))


def _untyped(node):
    if isinstance(node, dict):
        return {k: _untyped(v) for k, v in node.items() if k != 'type'}
    if isinstance(node, (list, tuple)):
        return [_untyped(v) for v in node]
    return node


def test_every_pipeline_of_an_mmdet3d_config_gets_the_twins():
    cfg = Config.fromfile(
        'configs/mmdet3d/centerpoint_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d_turbox.py')
    before = copy.deepcopy(cfg)
    changes = apply_turbox_options(cfg, check_options(cfg.turbox, TURBOX_OPTIONS))
    text = '\n'.join(changes)
    train = cfg.train_dataloader.dataset
    train = train.get('dataset', train)  # CBGSDataset wraps it
    types = [t['type'] for t in train.pipeline]
    assert 'turbox_mm.LoadPointsFromFileChecked' in types
    assert 'turbox_mm.LoadPointsFromMultiSweepsFast' in types
    assert 'LoadPointsFromFile' not in types and 'LoadPointsFromMultiSweeps' not in types
    sample = next(t for t in train.pipeline if t['type'] == 'ObjectSample')
    assert sample['db_sampler']['points_loader']['type'] == \
        'turbox_mm.LoadPointsFromFileChecked'
    assert 'db_sampler.points_loader = turbox_mm.LoadPointsFromFileChecked' in text
    assert 'test_dataloader.dataset.pipeline[0] = turbox_mm.LoadPointsFromFileChecked' in text
    # Arguments stay as they were.
    old = before.train_dataloader.dataset
    old = old.get('dataset', old)
    assert _untyped(train.pipeline) == _untyped(old.pipeline)
    off = copy.deepcopy(before)
    off.turbox = dict(off.turbox, data=dict(point_loaders=False))
    apply_turbox_options(off, check_options(off.turbox, TURBOX_OPTIONS))
    off_train = off.train_dataloader.dataset
    off_train = off_train.get('dataset', off_train)
    assert 'LoadPointsFromFile' in [t['type'] for t in off_train.pipeline]
