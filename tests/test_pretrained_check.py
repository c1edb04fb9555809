"""Pretrained checkpoints offline (turbox_mm.utils.pretrained): where mmengine looks for them,
and the message when one is neither there nor downloadable.

Nothing is downloaded: the torch hub cache is a temporary folder and
``torch.hub.download_url_to_file`` is replaced by a function that fails as an offline machine
does (or that fails the test, where a cached file must be read instead).
"""
import json
import os
import os.path as osp
import textwrap
import urllib.error

import pytest
import torch
import torch.hub
from mmengine.model import BaseModule
from mmengine.runner import checkpoint as mmengine_checkpoint
from torch import nn

from conftest import ROOT, run_python
from turbox_mm.utils.pretrained import (PretrainedCheckpointError, explain_pretrained_errors,
                                        locate_checkpoint, pretrained_checkpoints)

TORCHVISION_JSON = osp.join(osp.dirname(mmengine_checkpoint.__file__), '..', 'hub',
                            'torchvision_0.12.json')


def offline(*args, **kwargs):
    raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache, and no network."""
    folder = tmp_path / 'hub'
    monkeypatch.setattr(torch.hub, '_hub_dir', str(folder))
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    return folder


@pytest.fixture
def torchvision_names(monkeypatch):
    """mmengine's torchvision table as with torchvision installed (it is not in the CPU
    environment; mmengine imports it for the table)."""
    with open(TORCHVISION_JSON) as f:
        urls = json.load(f)
    monkeypatch.setattr(mmengine_checkpoint, 'get_torchvision_models', lambda: dict(urls))
    return urls


class Backbone(BaseModule):

    def __init__(self, init_cfg=None):
        super().__init__(init_cfg)
        self.conv = nn.Conv2d(3, 4, 1)


def config(checkpoint):
    init_cfg = dict(type='Pretrained', checkpoint=checkpoint)
    return dict(model=dict(type='Det', img_backbone=dict(type='mmdet.ResNet',
                                                         init_cfg=init_cfg)))


def init(cfg):
    backbone = Backbone(cfg['model']['img_backbone']['init_cfg'])
    with explain_pretrained_errors(cfg):
        backbone.init_weights()
    return backbone


# -- the walk over the config ------------------------------------------------------------------

def test_walk_finds_every_pretrained_entry_with_its_key():
    cfg = dict(model=dict(
        type='Det',
        img_backbone=dict(init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50')),
        neck=dict(init_cfg=dict(type='Xavier', layer='Conv2d')),
        pts_backbone=dict(init_cfg=[dict(type='Kaiming', layer='Conv2d'),
                                    dict(type='mmengine.Pretrained', checkpoint='a.pth')]),
        heads=[dict(pretrained='open-mmlab://resnet50_v1c'), dict(pretrained=None)]))
    found = pretrained_checkpoints(cfg)
    assert [(c.key, c.checkpoint) for c in found] == [
        ('model.img_backbone.init_cfg.checkpoint', 'torchvision://resnet50'),
        ('model.pts_backbone.init_cfg.1.checkpoint', 'a.pth'),
        ('model.heads.0.pretrained', 'open-mmlab://resnet50_v1c'),
    ]
    assert found[0].off == 'model.img_backbone.init_cfg=None'
    assert 'remove entry 1' in found[1].off and 'model.pts_backbone.init_cfg' in found[1].off
    assert found[2].off == 'model.heads.0.pretrained=None'
    assert pretrained_checkpoints(dict(model=dict(type='Det'))) == []


def test_walk_keys_are_cfg_options_keys():
    """The dotted keys are what --cfg-options sets (mmengine's list-index keys included)."""
    from mmengine.config import Config
    cfg = Config(dict(model=dict(backbone=dict(init_cfg=[
        dict(type='Kaiming'), dict(type='Pretrained', checkpoint='old.pth')]))))
    key = pretrained_checkpoints(cfg)[0].key
    cfg.merge_from_dict({key: '/data/new.pth'})
    assert cfg.model.backbone.init_cfg[1].checkpoint == '/data/new.pth'
    cfg = Config(config('torchvision://resnet50'))
    entry = pretrained_checkpoints(cfg)[0]
    off_key, off_value = entry.off.split('=')
    assert off_value == 'None'
    cfg.merge_from_dict({off_key: None})
    assert cfg.model.img_backbone.init_cfg is None


# -- where mmengine reads each kind ------------------------------------------------------------

def test_locate_follows_mmengine(hub, torchvision_names, tmp_path):
    url = torchvision_names['resnet50']
    loc = locate_checkpoint('torchvision://resnet50')
    assert loc.url == url and loc.path == str(hub / 'checkpoints' / osp.basename(url))
    assert not loc.exists and loc.note == ''
    assert locate_checkpoint('modelzoo://resnet50').path == loc.path
    os.makedirs(osp.dirname(loc.path))
    open(loc.path, 'wb').close()
    assert locate_checkpoint('torchvision://resnet50').exists

    loc = locate_checkpoint('https://example.com/a/b/r50-abc.pth?dl=1')
    assert loc.path == str(hub / 'checkpoints' / 'r50-abc.pth') and not loc.exists
    loc = locate_checkpoint('open-mmlab://resnet50_v1c')
    assert loc.url == mmengine_checkpoint.get_external_models()['resnet50_v1c']
    assert loc.path == str(hub / 'checkpoints' / osp.basename(loc.url))

    local = tmp_path / 'r.pth'
    assert not locate_checkpoint(str(local)).exists
    local.write_bytes(b'x')
    loc = locate_checkpoint(str(local))
    assert loc.exists and loc.url is None and loc.path == str(local)

    assert locate_checkpoint('s3://bucket/r.pth').path is None
    assert locate_checkpoint('torchvision://no_such_net').path is None


def test_locate_without_torchvision(hub, monkeypatch):
    """mmengine imports torchvision for its table; the name still resolves (its torchvision
    0.12 part is a JSON file), with a note saying why mmengine itself cannot."""

    def no_torchvision():
        raise ModuleNotFoundError("No module named 'torchvision'")

    monkeypatch.setattr(mmengine_checkpoint, 'get_torchvision_models', no_torchvision)
    loc = locate_checkpoint('torchvision://resnet50')
    assert loc.url.startswith('https://download.pytorch.org/models/resnet50-')
    assert 'torchvision is not installed' in loc.note


# -- the error ---------------------------------------------------------------------------------

def test_offline_download_is_explained(hub, torchvision_names):
    cfg = config('torchvision://resnet50')
    with pytest.raises(PretrainedCheckpointError) as info:
        init(cfg)
    message = str(info.value)
    url = torchvision_names['resnet50']
    name = osp.basename(url)
    assert "'torchvision://resnet50'" in message
    assert 'model.img_backbone.init_cfg.checkpoint' in message
    assert url in message and str(hub / 'checkpoints' / name) in message
    assert 'URLError' in message and 'offline?' in message
    assert (f'--cfg-options model.img_backbone.init_cfg.checkpoint=/path/to/{name}'
            in message)
    assert '--cfg-options model.img_backbone.init_cfg=None' in message
    assert isinstance(info.value.__cause__, urllib.error.URLError)  # chained, not swallowed
    assert not (hub / 'checkpoints' / name).exists()


def test_offline_url_is_explained(hub):
    url = 'https://example.com/models/swin_tiny-1234abcd.pth'
    with pytest.raises(PretrainedCheckpointError) as info:
        init(config(url))
    message = str(info.value)
    assert f'downloading {url} failed' in message
    assert 'init_cfg.checkpoint=/path/to/swin_tiny-1234abcd.pth' in message
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_missing_local_file_is_explained(hub, tmp_path):
    path = str(tmp_path / 'weights' / 'resnet50.pth')
    with pytest.raises(PretrainedCheckpointError) as info:
        init(config(path))
    message = str(info.value)
    assert f'{path} does not exist' in message
    assert 'model.img_backbone.init_cfg.checkpoint=/path/to/resnet50.pth' in message
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_cached_file_is_read_without_a_download(hub, torchvision_names, monkeypatch):
    """Present in the cache: mmengine reads it and nothing is raised or downloaded."""

    def no_download(*args, **kwargs):
        raise AssertionError('a cached checkpoint was downloaded again')

    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_download)
    path = locate_checkpoint('torchvision://resnet50').path
    os.makedirs(osp.dirname(path))
    weights = Backbone().state_dict()
    torch.save(weights, path)
    backbone = init(config('torchvision://resnet50'))
    torch.testing.assert_close(backbone.conv.weight, weights['conv.weight'])


def test_without_torchvision_the_cached_file_is_named(hub, monkeypatch):
    """The CPU environment's case: no torchvision, so mmengine cannot resolve
    torchvision://resnet50 even with the file cached; the message points at the file."""

    def no_torchvision():
        raise ModuleNotFoundError("No module named 'torchvision'")

    monkeypatch.setattr(mmengine_checkpoint, 'get_torchvision_models', no_torchvision)
    path = locate_checkpoint('torchvision://resnet50').path
    os.makedirs(osp.dirname(path))
    torch.save(Backbone().state_dict(), path)
    with pytest.raises(PretrainedCheckpointError) as info:
        init(config('torchvision://resnet50'))
    message = str(info.value)
    assert 'Torchvision is not installed' in message
    assert f'--cfg-options model.img_backbone.init_cfg.checkpoint={path}' in message
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_corrupt_cached_file_is_explained(hub):
    url = 'https://example.com/models/r50-1234abcd.pth'
    path = locate_checkpoint(url).path
    os.makedirs(osp.dirname(path))
    with open(path, 'wb') as f:
        f.write(b'<html>proxy login</html>')
    with pytest.raises(PretrainedCheckpointError) as info:
        init(config(url))
    assert f'The file {path} is there but loading it failed' in str(info.value)
    assert info.value.__cause__ is not None


def test_other_errors_pass_through_untouched():
    error = ValueError('not about checkpoints')
    with pytest.raises(ValueError) as info:
        with explain_pretrained_errors(config('torchvision://resnet50')):
            raise error
    assert info.value is error


def test_checkpoint_set_in_code_is_still_named(hub, tmp_path):
    path = str(tmp_path / 'r.pth')
    backbone = Backbone(dict(type='Pretrained', checkpoint=path))
    with pytest.raises(PretrainedCheckpointError, match='set in code') as info:
        with explain_pretrained_errors(dict(model=dict(type='Det'))):
            backbone.init_weights()
    assert f'{path} does not exist' in str(info.value)


# -- through tools/train.py --------------------------------------------------------------------

DRIVER = textwrap.dedent('''
    import sys
    import urllib.error

    import torch
    import torch.hub
    from mmengine.model import BaseModule
    from mmengine.registry import MODELS
    from torch import nn

    from turbox_mm.testing.smoke_model import SmokeModel


    def offline(*args, **kwargs):
        raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')


    torch.hub.set_dir(sys.argv[1])
    torch.hub.download_url_to_file = offline


    class Backbone(BaseModule):
        def __init__(self, init_cfg=None):
            super().__init__(init_cfg)
            self.conv = nn.Conv2d(3, 4, 1)


    @MODELS.register_module(force=True)
    class PretrainedCheckSmoke(SmokeModel):
        def __init__(self, img_backbone, **kwargs):
            super().__init__(**kwargs)
            self.img_backbone = Backbone(**img_backbone)


    from tools.train import main
    from turbox_mm.utils.pretrained import PretrainedCheckpointError

    try:
        runner = main(sys.argv[2:])
    except PretrainedCheckpointError as error:
        print('PretrainedCheckpointError:', error)
        print('cause:', repr(error.__cause__))
        sys.exit(3)
    print('trained; conv weight sum', float(runner.model.img_backbone.conv.weight.sum()))
''')


def _train(tmp_path, base, checkpoint, *options):
    config = tmp_path / 'pretrained_smoke.py'
    config.write_text(textwrap.dedent(f'''
        _base_ = ['{ROOT}/configs/smoke/{base}']
        model = dict(_delete_=True, type='PretrainedCheckSmoke', channels=8, num_blocks=1,
                     img_backbone=dict(init_cfg=dict(type='Pretrained',
                                                     checkpoint='{checkpoint}')))
        train_dataloader = dict(num_workers=0)
        val_dataloader = dict(num_workers=0)
        train_cfg = dict(max_epochs=1, val_interval=10)
    '''))
    driver = tmp_path / 'driver.py'
    driver.write_text(DRIVER)
    return run_python([str(driver), str(tmp_path / 'hub'), str(config), '--work-dir',
                       str(tmp_path / 'work'), *options], timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize('base', ['smoke_stock.py', 'smoke_turbox.py'])
def test_train_offline_names_the_key_and_the_way_out(tmp_path, base):
    url = 'https://example.com/models/backbone-1234abcd.pth'
    proc = _train(tmp_path, base, url)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'PretrainedCheckpointError' in proc.stdout
    assert f"'{url}' (model.img_backbone.init_cfg.checkpoint)" in proc.stdout
    assert '--cfg-options model.img_backbone.init_cfg.checkpoint=/path/to/' \
        'backbone-1234abcd.pth' in proc.stdout
    assert "cause: URLError" in proc.stdout


@pytest.mark.slow
def test_train_with_the_advised_local_copy(tmp_path):
    """The advice works: --cfg-options pointing at a local copy trains from it."""
    weights = Backbone().state_dict()
    for value in weights.values():
        value.fill_(0.25)
    local = tmp_path / 'backbone.pth'
    torch.save(weights, local)
    proc = _train(tmp_path, 'smoke_stock.py', 'https://example.com/models/backbone-1.pth',
                  '--cfg-options', f'model.img_backbone.init_cfg.checkpoint={local}')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f'conv weight sum {0.25 * 12}' in proc.stdout  # loaded, and the conv is not trained
