"""``turbox.compile.modules`` names submodules (and declared methods) that exist in the model
of every turbox config we ship (tiny and full size), so a turbox run does not stop before its
first step. On the CPU the runner compiles nothing, so without this test a wrong path shows
only on a GPU (the lidar-only BEVFusion's ``'auto'`` once asked for the absent
``fusion_layer``)."""
import os.path as osp

import pytest

from conftest import ROOT, TURBOX_CONFIGS, config_with_root, turbox_applied


def test_every_model_folder_has_a_turbox_config():
    folders = {p.split(osp.sep)[1] for p in TURBOX_CONFIGS}
    assert {'bevfusion', 'maptr', 'sparse4d', 'sparsedrive'} <= folders, folders


@pytest.fixture(scope='module')
def anchor_root(tmp_path_factory):
    """A data root with placeholder k-means anchors of the shapes the Sparse4D and SparseDrive
    models check when built (the tools make the real ones from a training set)."""
    import numpy as np
    root = tmp_path_factory.mktemp('anchors')
    (root / 'kmeans').mkdir()
    rng = np.random.default_rng(0)
    for name, shape in (('nuscenes_kmeans900', (900, 11)), ('kmeans/kmeans_det_900', (900, 11)),
                        ('kmeans/kmeans_map_100', (100, 20, 2)),
                        ('kmeans/kmeans_motion_6', (10, 6, 12, 2)),
                        ('kmeans/kmeans_plan_6', (3, 6, 6, 2))):
        np.save(root / f'{name}.npy', rng.standard_normal(shape).astype(np.float32))
    return str(root) + '/'


@pytest.mark.parametrize('path', TURBOX_CONFIGS)
def test_the_compiled_submodules_exist(path, anchor_root):
    from mmengine.registry import DefaultScope

    from turbox_mm.benchmark.e2e import drop_pretrained
    from turbox_mm.engine.runner.module_compiler import compile_submodules, selected_paths
    from turbox_mm.registry import MODELS
    cfg, _ = turbox_applied(config_with_root(osp.join(ROOT, path), anchor_root))
    modules = cfg.turbox.compile.modules
    drop_pretrained(cfg.model)  # BEVFusion (as upstream's) initialises when built
    with DefaultScope.overwrite_default_scope('mmdet3d'):
        model = MODELS.build(cfg.model)
    paths = selected_paths(model, modules)
    assert paths, f'{path}: turbox.compile.modules={modules!r} selects nothing'
    names = dict(model.named_modules())
    assert all(p in names for p in paths), (path, paths)
    # the whole wrapping as the runner does it, declared methods included (a declared name
    # that is no method raises here; torch.compile is lazy: nothing is traced)
    compile_submodules(model, modules, backend='eager')
    if 'bevfusion_lidar_' in path:  # lidar-only: no camera branch, no fuser
        assert not any(p.startswith(('fusion_layer', 'img_', 'view_transform')) for p in paths)
        assert 'bbox_head' in paths, paths
