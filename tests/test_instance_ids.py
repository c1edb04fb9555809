"""The instance-ids step (turbox_mm.datasets.nuscenes_instance_ids, `tools/create_data.py
instance-ids`): ids from the nuScenes tables for v2 infos that carry none.

On a tiny synthetic nuScenes (whose generator writes the ids itself): infos stripped of their
ids get the generator's ids back; every bad input gets an error naming the file and the key;
temporal denoising runs on the converted infos and not on the stripped ones; and after
mmdet3d's own converter (which writes no ids) the step gives the generator's ids too.
"""
import json
import os
import os.path as osp
import pickle
import shutil
import warnings

import numpy as np
import pytest
import torch
from mmengine.config import Config

from conftest import ROOT, make_sparse4d_tiny, run_python
from turbox_mm.datasets.nuscenes_instance_ids import (InstanceIdError, add_instance_ids,
                                                      command_line, load_tables)
from turbox_mm.datasets.synthetic import InfoFileError

TINY_STOCK = osp.join(ROOT, 'configs/sparse4d/sparse4dv3_tiny_stock.py')
VERSION = 'v1.0-trainval'


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """The tiny Sparse4D data (2 train scenes, 1 val scene, 6 keyframes each, anchors)."""
    return make_sparse4d_tiny(tmp_path_factory.mktemp('ids') / 'nuscenes_tiny').rstrip('/')


def load(path):
    with open(path, 'rb') as f:
        return pickle.load(f)


def dump(path, infos):
    with open(path, 'wb') as f:
        pickle.dump(infos, f, protocol=4)


def plain(x):
    """``x`` with dicts as sorted items and NaN as a string, for comparisons."""
    if isinstance(x, dict):
        return sorted((k, plain(v)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, float) and x != x:
        return 'nan'
    return x


def same(a, b):
    """Equal infos (NaN velocities included; the order of an instance's keys aside)."""
    return plain(a) == plain(b)


def ids_of(infos):
    return [[inst['instance_id'] for inst in info['instances']] for info in infos['data_list']]


def stripped(src, dst):
    """A copy of an info file without instance ids, as mmdet3d's converter writes it."""
    infos = load(src)
    for info in infos['data_list']:
        for inst in info['instances']:
            del inst['instance_id']
    dump(dst, infos)
    return str(dst)


@pytest.fixture
def bare(tiny, tmp_path):
    """Id-less copies of the train and val infos, and the generator's ids."""
    paths, ids = [], []
    for split in ('train', 'val'):
        src = f'{tiny}/nuscenes_infos_{split}.pkl'
        paths.append(stripped(src, tmp_path / f'{split}.pkl'))
        ids.append(ids_of(load(src)))
    return paths, ids


def tables_copy(tiny, tmp_path, version=VERSION):
    """A data root holding a copy of the tiny dataset's three tables, under ``version``."""
    root = tmp_path / 'root'
    os.makedirs(root / version)
    for name in ('sample', 'sample_annotation', 'instance'):
        shutil.copy(f'{tiny}/{VERSION}/{name}.json', root / version / f'{name}.json')
    return root


# -- the step ----------------------------------------------------------------------------------

def test_step_gives_the_generators_ids(tiny, bare):
    """Same field, same meaning: the row of the instance in instance.json, stable across
    keyframes and splits."""
    paths, want = bare
    proc = run_python(['tools/create_data.py', 'instance-ids', *paths, '--root-path', tiny])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for path, ids in zip(paths, want):
        assert ids_of(load(path)) == ids
        assert f'{path}: ' in proc.stdout and '(written)' in proc.stdout
    with open(f'{tiny}/{VERSION}/instance.json') as f:
        instances = json.load(f)
    train, val = ({i for sample in ids for i in sample} for ids in want)
    assert not train & val and train | val == set(range(len(instances)))
    # one instance per id within a sample; the same id on consecutive keyframes
    first = want[0]
    assert all(len(set(sample)) == len(sample) for sample in first)
    assert set(first[0]) & set(first[1])
    # the other infos' fields are untouched
    original = load(f'{tiny}/nuscenes_infos_train.pkl')
    assert same(load(paths[0]), original)


def test_step_twice_changes_nothing(tiny, bare):
    paths, _ = bare
    add_instance_ids(paths, tiny)
    before = [open(p, 'rb').read() for p in paths]
    stamps = [os.stat(p).st_mtime_ns for p in paths]
    results = add_instance_ids(paths, tiny)
    assert [r['written'] for r in results] == [False, False]
    assert [r['added'] for r in results] == [0, 0]
    assert [r['kept'] for r in results] == [r['instances'] for r in results] != [0, 0]
    assert [open(p, 'rb').read() for p in paths] == before
    assert [os.stat(p).st_mtime_ns for p in paths] == stamps
    assert not [n for n in os.listdir(osp.dirname(paths[0])) if '.tmp' in n]


def test_other_ids_need_force(tiny, bare):
    paths, want = bare
    infos = load(f'{tiny}/nuscenes_infos_train.pkl')
    infos['data_list'][2]['instances'][1]['instance_id'] += 1000
    dump(paths[0], infos)
    with pytest.raises(InstanceIdError) as info:
        add_instance_ids(paths, tiny)
    message = str(info.value)
    assert paths[0] in message and 'data_list[2].instances[1].instance_id' in message
    assert '--force' in message and infos['data_list'][2]['token'] in message
    assert same(load(paths[0]), infos) and 'instance_id' not in load(paths[1])['data_list'][0][
        'instances'][0]  # checked before anything is written
    results = add_instance_ids(paths, tiny, force=True)
    assert results[0]['overwritten'] == 1 and results[1]['added'] > 0
    assert [ids_of(load(p)) for p in paths] == want


# -- bad input ---------------------------------------------------------------------------------

def test_missing_table(tiny, bare, tmp_path):
    paths, _ = bare
    root = tables_copy(tiny, tmp_path)
    os.remove(root / VERSION / 'instance.json')
    with pytest.raises(InstanceIdError, match='instance.json: missing') as info:
        add_instance_ids(paths, str(root))
    assert str(root / VERSION / 'instance.json') in str(info.value)
    proc = run_python(['tools/create_data.py', 'instance-ids', paths[0], '--root-path',
                       str(root)])
    assert proc.returncode == 2 and 'instance.json: missing' in proc.stderr
    assert 'instance_id' not in load(paths[0])['data_list'][0]['instances'][0]


def test_tables_of_another_version(tiny, bare, tmp_path):
    """Infos of v1.0-trainval (their metainfo.version) and a root holding only v1.0-mini."""
    paths, _ = bare
    root = tables_copy(tiny, tmp_path, version='v1.0-mini')
    with pytest.raises(InstanceIdError) as info:
        add_instance_ids(paths, str(root))
    message = str(info.value)
    assert str(root / VERSION / 'sample.json') in message and 'holds v1.0-mini' in message
    with pytest.raises(InstanceIdError) as info:
        add_instance_ids(paths, str(root), 'v1.0-mini')
    assert paths[0] in str(info.value) and "metainfo.version is 'v1.0-trainval'" in str(
        info.value)
    with pytest.raises(InstanceIdError, match="version 'v1.0': not a nuScenes version"):
        load_tables(str(root), 'v1.0')


def test_infos_of_other_tables(tiny, bare, tmp_path):
    """Tables of the right version but another dataset: the info's sample token is named."""
    paths, _ = bare
    root = tmp_path / 'other'
    os.makedirs(root / VERSION)
    for name, rows in (('sample', [dict(token='s0')]),
                       ('sample_annotation', [dict(token='a0', sample_token='s0',
                                                   instance_token='i0')]),
                       ('instance', [dict(token='i0')])):
        with open(root / VERSION / f'{name}.json', 'w') as f:
            json.dump(rows, f)
    token = load(paths[1])['data_list'][0]['token']
    with pytest.raises(InstanceIdError) as info:
        add_instance_ids([paths[1]], str(root))
    message = str(info.value)
    assert paths[1] in message and f'data_list[0].token {token!r}' in message
    assert str(root / VERSION / 'sample.json') in message


def test_annotation_count_mismatch(tiny, bare):
    paths, _ = bare
    infos = load(paths[0])
    info = infos['data_list'][3]
    del info['instances'][0]
    dump(paths[0], infos)
    with pytest.raises(InstanceIdError) as error:
        add_instance_ids(paths, tiny)
    message = str(error.value)
    assert paths[0] in message and 'data_list[3].instances' in message
    assert info['token'] in message and 'sample_annotation.json' in message
    assert f'has {len(info["instances"])} entries' in message


def test_broken_tables(tiny, bare, tmp_path):
    paths, _ = bare
    root = tables_copy(tiny, tmp_path)
    table = root / VERSION / 'sample_annotation.json'
    rows = json.loads(table.read_text())
    del rows[5]['instance_token']
    table.write_text(json.dumps(rows))
    with pytest.raises(InstanceIdError, match="sample_annotation.json: row 5 has no "
                                              "'instance_token'"):
        add_instance_ids(paths, str(root))
    rows[5]['instance_token'] = 'nope'
    table.write_text(json.dumps(rows))
    with pytest.raises(InstanceIdError, match="row 5 .* instance_token 'nope', which "
                                              'instance.json does not hold'):
        add_instance_ids(paths, str(root))
    table.write_text('{"truncated": ')
    with pytest.raises(InstanceIdError, match='sample_annotation.json: not a JSON table'):
        add_instance_ids(paths, str(root))


def test_not_v2_infos(tiny, tmp_path):
    path = tmp_path / 'v1.pkl'
    dump(path, dict(infos=[dict(token='x')], metadata=dict(version=VERSION)))
    with pytest.raises(InfoFileError, match='v1'):
        add_instance_ids([str(path)], tiny)
    infos = load(f'{tiny}/nuscenes_infos_val.pkl')
    del infos['metainfo']['version']
    dump(path, infos)
    with pytest.raises(InstanceIdError, match='metainfo.version is missing'):
        add_instance_ids([str(path)], tiny)
    assert add_instance_ids([str(path)], tiny, VERSION)[0]['kept'] > 0


# -- the data pipeline and the model -----------------------------------------------------------

def test_dataset_without_ids_warns_with_the_command(monkeypatch):
    from turbox_mm.datasets.transforms import sparse4d_adaptor
    from turbox_mm.datasets.transforms.sparse4d_adaptor import NuScenesSparse4DAdaptor
    monkeypatch.setitem(sparse4d_adaptor._warned, 'instance_id', False)
    sample = dict(lidar2img=[np.eye(4)], img_shape=[(64, 176)], lidar2global=np.eye(4),
                  cam_intrinsic=[np.eye(4)], gt_labels_3d=np.array([0, 1]))
    with pytest.warns(UserWarning) as record:
        out = NuScenesSparse4DAdaptor()(sample)
    assert out['instance_id'].tolist() == [-1, -1]
    assert command_line() in str(record[0].message)


def _temporal_dn(tiny, ann_file, batches=3):
    """Train the tiny model on ``batches`` batches of ``ann_file``.

    Returns:
        tuple: Per call of the sampler's ``update_dn`` (the head calls it only with instance
        ids), how many queries of the cached groups that replaced current ones got a label
        (their instance id was found again in the new frame); the metas' instance ids of the
        first batch; the sampler.
    """
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import DefaultScope

    from turbox_mm.registry import DATA_SAMPLERS, DATASETS, MODELS
    os.environ['NUSCENES_ROOT'] = tiny + '/'
    try:
        cfg = Config.fromfile(TINY_STOCK)
    finally:
        del os.environ['NUSCENES_ROOT']
    cfg.train_dataloader.dataset.ann_file = ann_file
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmdet3d'):
        model = MODELS.build(cfg.model)
        dataset = DATASETS.build(cfg.train_dataloader.dataset)
        sampler = DATA_SAMPLERS.build(dict(cfg.train_dataloader.batch_sampler,
                                           dataset=dataset, seed=0, world_size=1, rank=0,
                                           batch_size=cfg.train_dataloader.batch_size))
    model.init_weights()
    model.train()
    target, temporal = model.head.sampler, []
    real_update = target.update_dn

    def update_dn(*args):
        cached = target.dn_metas
        out = real_update(*args)
        use = args[-1]  # temporal_valid_mask: the previous frame is the same scene's
        if cached is None or use is None or not bool(use.any()):
            temporal.append(0)
            return out
        per_group = out[3].shape[1] // target.num_dn_groups
        cached_queries = out[3][:, :cached['dn_id_target'].shape[1] * per_group]
        temporal.append(int((cached_queries[use] >= 0).sum()))
        return out

    target.update_dn = update_dn
    stream = iter(sampler)
    first_ids = None
    for _ in range(batches):
        data = pseudo_collate([dataset[item] for item in next(stream)])
        data = model.data_preprocessor(data, training=True)
        if first_ids is None:
            first_ids = model.metas(data['data_samples'], torch.device('cpu'),
                                    with_gt=True)['instance_id']
        losses = model.loss(data['inputs'], data['data_samples'])
        assert all(torch.isfinite(v) for v in losses.values()), losses
    return temporal, first_ids, target


@pytest.mark.slow
def test_temporal_denoising_is_active_on_converted_data(tiny, tmp_path, monkeypatch):
    """The head's temporal denoising keeps num_temp_dn_groups denoising groups of a frame
    (SparseBox3DTarget.cache_dn) and, in the next frame of the scene, puts them in place of
    current groups, labelled where their instance id is found again (update_dn). Without ids
    (Sparse4D.metas gives instance_id None, so get_dn_anchors gives no id targets) the head
    neither keeps nor substitutes a group."""
    from turbox_mm.datasets.transforms import sparse4d_adaptor
    bare = stripped(f'{tiny}/nuscenes_infos_train.pkl', tmp_path / 'bare.pkl')
    converted = stripped(f'{tiny}/nuscenes_infos_train.pkl', tmp_path / 'converted.pkl')
    add_instance_ids([converted], tiny)

    monkeypatch.setitem(sparse4d_adaptor._warned, 'instance_id', False)
    with pytest.warns(UserWarning, match='create_data.py instance-ids'):
        temporal, ids, target = _temporal_dn(tiny, bare)
    assert ids is None and temporal == [] and target.dn_metas is None

    monkeypatch.setitem(sparse4d_adaptor._warned, 'instance_id', False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        temporal, ids, target = _temporal_dn(tiny, converted)
    assert not [w for w in caught if 'instance_id' in str(w.message)]
    assert ids is not None and all(bool((x >= 0).all()) for x in ids)
    assert len(temporal) == 3 and temporal[0] == 0  # nothing cached before the first frame
    assert all(n > 0 for n in temporal[1:]), temporal  # then temporal groups, re-targeted
    assert target.dn_metas is not None


@pytest.mark.slow
def test_after_mmdet3d_converter(tmp_path):
    """Real-data path: mmdet3d 1.4's converter rebuilds the infos from the tables (no ids),
    `nuscenes --run --instance-ids` adds them: the generator's ids, in every split."""
    root = tmp_path / 'data' / 'nuscenes'
    proc = run_python(['tools/create_data.py', 'synthetic', '--out', str(root), '--scenes', '2',
                       '--frames', '2', '--version', 'v1.0-mini', '--points', '3000',
                       '--sweeps', '1', '--image-size', '320x180', '--workers', '1',
                       '--no-progress', '--no-gt-database'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = {split: load(f'{root}/nuscenes_infos_{split}.pkl') for split in ('train', 'val')}
    proc = run_python(['tools/create_data.py', 'nuscenes', '--root-path', str(root),
                       '--version', 'v1.0-mini', '--max-sweeps', '1', '--run', '--instance-ids'],
                      timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'instance-ids' in proc.stdout and '(written)' in proc.stdout
    for split, mine in ours.items():
        theirs = load(f'{root}/nuscenes_infos_{split}.pkl')
        assert theirs['metainfo']['version'] == 'v1.0-mini'
        assert 'fut_traj' not in theirs['data_list'][0]['instances'][0]  # mmdet3d's, not ours
        assert ids_of(theirs) == ids_of(mine)
        for a, b in zip(theirs['data_list'], mine['data_list']):
            np.testing.assert_allclose([i['bbox_3d'] for i in a['instances']],
                                       [i['bbox_3d'] for i in b['instances']], atol=1e-5)
