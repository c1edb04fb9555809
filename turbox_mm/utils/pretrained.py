"""Pretrained checkpoints named by a config: where they are, and a clear error when one is missing.

A config names pretrained weights with ``init_cfg=dict(type='Pretrained', checkpoint=...)``
(or a module's deprecated ``pretrained='...'``); mmengine loads them in ``init_weights`` through
``mmengine.runner.checkpoint.CheckpointLoader``:

- a local path is read as it is;
- ``http(s)://`` URLs go through ``torch.hub.load_state_dict_from_url``, which reads
  ``<torch.hub.get_dir()>/checkpoints/<file name of the URL>`` and downloads the file there only
  when it is missing;
- ``torchvision://NAME`` (and the deprecated ``modelzoo://NAME``) is the URL of ``NAME`` in
  ``get_torchvision_models()`` (mmengine's ``hub/torchvision_0.12.json``, plus torchvision's
  weight enums; it imports torchvision), then as a URL;
- ``open-mmlab://NAME`` / ``openmmlab://NAME`` is the entry of ``NAME`` in mmengine's
  ``hub/openmmlab.json`` (overridable by ``<mmengine home>/open_mmlab.json``): a URL, or a path
  relative to the mmengine home; ``mmcls://NAME`` is the URL of ``hub/mmcls.json``.

Offline, a file that is not there yet fails deep inside urllib with a network error that names
neither the config key nor a way out. :func:`explain_pretrained_errors` re-raises such a
failure (chained, never swallowed) as a :class:`PretrainedCheckpointError` naming the
checkpoint, the config key that sets it, where the file was looked for, and the
``--cfg-options`` that point at a local copy or switch the pretrained init off. Nothing is
checked up front: a checkpoint that is neither present nor downloadable only fails where
mmengine loads it (``init_weights``, at build time for models that initialise in their
constructor), and only then is it explained. ``tools/train.py`` and ``tools/test.py`` run
under it, for stock and turbox configs alike.

Examples:
    >>> cfg = dict(model=dict(type='Det', img_backbone=dict(
    ...     type='mmdet.ResNet', init_cfg=dict(type='Pretrained',
    ...                                        checkpoint='torchvision://resnet50'))))
    >>> [(c.key, c.checkpoint) for c in pretrained_checkpoints(cfg)]
    [('model.img_backbone.init_cfg.checkpoint', 'torchvision://resnet50')]
"""
import contextlib
import os.path as osp
import traceback
from dataclasses import dataclass
from typing import Iterator, List, Optional
from urllib.parse import urlparse

__all__ = ['PretrainedCheckpoint', 'CheckpointLocation', 'PretrainedCheckpointError',
           'pretrained_checkpoints', 'locate_checkpoint', 'explain_pretrained_errors']

_URL_PREFIXES = ('http://', 'https://')
_TORCHVISION_PREFIXES = ('torchvision://', 'modelzoo://')
_OPENMMLAB_PREFIXES = ('open-mmlab://', 'openmmlab://')
_MMCLS_PREFIX = 'mmcls://'


@dataclass(frozen=True)
class PretrainedCheckpoint:
    """A pretrained checkpoint a config names.

    Attributes:
        key (str): Dotted config key of the checkpoint string, as ``--cfg-options`` takes it
            (list entries by index): ``'model.img_backbone.init_cfg.checkpoint'``.
        checkpoint (str): The checkpoint as written (path, URL, ``torchvision://...``).
        off (str): The ``--cfg-options`` assignment that switches this pretrained init off,
            or a sentence saying what to remove where no assignment can.
    """
    key: str
    checkpoint: str
    off: str


@dataclass(frozen=True)
class CheckpointLocation:
    """Where mmengine reads a checkpoint from.

    Attributes:
        path (str, optional): The local file mmengine reads (for URLs: the torch hub cache
            file it downloads to), None where it cannot be told (an unknown scheme or name).
        url (str, optional): The URL it downloads from when ``path`` is missing.
        exists (bool): ``path`` is a file.
        note (str): Why ``path`` is None, or what else matters (torchvision missing).
    """
    path: Optional[str]
    url: Optional[str]
    exists: bool
    note: str = ''


class PretrainedCheckpointError(RuntimeError):
    """A pretrained checkpoint of the config could not be loaded; the message says which,
    from which config key, and what to do. The original error is its ``__cause__``."""


def is_pretrained_init(init_cfg) -> bool:
    """Whether ``init_cfg`` is one ``Pretrained`` init config (scoped names included)."""
    if not isinstance(init_cfg, dict):
        return False
    kind = init_cfg.get('type')
    if isinstance(kind, str):
        return kind.split('.')[-1] == 'Pretrained'
    return getattr(kind, '__name__', None) == 'PretrainedInit'


def pretrained_checkpoints(cfg, prefix: str = 'model') -> List[PretrainedCheckpoint]:
    """Every pretrained checkpoint below ``cfg['model']`` (or below ``cfg`` itself when it has
    no ``model`` key), in config order.

    Found: ``init_cfg`` dicts of type ``'Pretrained'`` (also a scoped ``'x.Pretrained'``), alone
    or in a list of init configs, and string values of ``pretrained`` keys (mmdet's deprecated
    backbone argument, which becomes such an ``init_cfg``).

    Args:
        cfg (dict | Config): A full config, or a model config.
        prefix (str): The key path of the node walked. Defaults to ``'model'``.

    Returns:
        list[PretrainedCheckpoint]: With their dotted keys.
    """
    node = cfg.get('model', cfg) if prefix == 'model' and hasattr(cfg, 'get') else cfg
    found: List[PretrainedCheckpoint] = []
    _walk(node, prefix, found)
    return found


def _walk(node, path: str, found: List[PretrainedCheckpoint]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            here = f'{path}.{key}'
            if key == 'init_cfg':
                if is_pretrained_init(value):
                    found.append(PretrainedCheckpoint(f'{here}.checkpoint',
                                                      str(value.get('checkpoint')),
                                                      f'{here}=None'))
                elif isinstance(value, (list, tuple)):
                    for i, entry in enumerate(value):
                        if is_pretrained_init(entry):
                            found.append(PretrainedCheckpoint(
                                f'{here}.{i}.checkpoint', str(entry.get('checkpoint')),
                                f'remove entry {i} (Pretrained) from the list {here} in the '
                                'config'))
                continue
            if key == 'pretrained' and isinstance(value, str):
                found.append(PretrainedCheckpoint(here, value, f'{here}=None'))
                continue
            _walk(value, here, found)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            _walk(value, f'{path}.{i}', found)


def _hub_file(url: str) -> str:
    """The torch hub cache file ``load_state_dict_from_url`` reads for ``url``."""
    import torch.hub
    return osp.join(torch.hub.get_dir(), 'checkpoints', osp.basename(urlparse(url).path))


def _torchvision_url(name: str):
    """``(url, note)`` of a torchvision model name, as mmengine resolves it."""
    from mmengine.runner import checkpoint as ckpt
    note = ''
    try:
        urls = ckpt.get_torchvision_models()
    except ImportError:
        # mmengine needs torchvision for the table; its torchvision 0.12 part needs nothing
        import mmengine
        urls = mmengine.load(osp.join(mmengine.__path__[0], 'hub', 'torchvision_0.12.json'))
        note = ('torchvision is not installed, and mmengine imports it to resolve '
                'torchvision:// names (even for a cached file)')
    return urls.get(name), note


def locate_checkpoint(checkpoint: str) -> CheckpointLocation:
    """Where mmengine 0.10 reads ``checkpoint`` from, and whether that file is there.

    Reads no checkpoint and downloads nothing.

    Args:
        checkpoint (str): A local path, ``http(s)://`` URL, ``torchvision://NAME``,
            ``modelzoo://NAME``, ``open-mmlab://NAME``, ``openmmlab://NAME`` or
            ``mmcls://NAME``.

    Returns:
        CheckpointLocation: ``path`` None for other schemes (``s3://``, ``pavi://``, ...) and
        unknown names.

    Examples:
        >>> loc = locate_checkpoint('https://example.com/models/resnet50-0676ba61.pth')
        >>> osp.basename(loc.path), loc.url.endswith('resnet50-0676ba61.pth')
        ('resnet50-0676ba61.pth', True)
    """
    from mmengine.runner import checkpoint as ckpt

    def from_url(url: str, note: str = '') -> CheckpointLocation:
        path = _hub_file(url)
        return CheckpointLocation(path, url, osp.isfile(path), note)

    if checkpoint.startswith(_URL_PREFIXES):
        return from_url(checkpoint)
    if checkpoint.startswith(_TORCHVISION_PREFIXES):
        name = checkpoint.split('://', 1)[1]
        url, note = _torchvision_url(name)
        if url is None:
            return CheckpointLocation(None, None, False,
                                      f'{name!r} is not a torchvision model name mmengine '
                                      'knows')
        return from_url(url, note)
    if checkpoint.startswith(_OPENMMLAB_PREFIXES):
        name = checkpoint.split('://', 1)[1]
        name = ckpt.get_deprecated_model_names().get(name, name)
        entry = ckpt.get_external_models().get(name)
        if entry is None:
            return CheckpointLocation(None, None, False,
                                      f'{name!r} is not in mmengine\'s open-mmlab model list')
        if entry.startswith(_URL_PREFIXES):
            return from_url(entry)
        path = osp.join(ckpt._get_mmengine_home(), entry)
        return CheckpointLocation(path, None, osp.isfile(path))
    if checkpoint.startswith(_MMCLS_PREFIX):
        url = ckpt.get_mmcls_models().get(checkpoint[len(_MMCLS_PREFIX):])
        if url is None:
            return CheckpointLocation(None, None, False,
                                      'not in mmengine\'s mmcls model list')
        return from_url(url)
    if '://' in checkpoint:
        return CheckpointLocation(None, None, False,
                                  f'scheme {checkpoint.split("://")[0]}:// is not checked here')
    path = osp.expanduser(checkpoint)
    return CheckpointLocation(path, None, osp.isfile(path))


def _failed_checkpoint(error: BaseException) -> Optional[str]:
    """The checkpoint of the ``PretrainedInit`` call ``error`` came out of, if any."""
    from mmengine.model.weight_init import PretrainedInit
    for frame, _ in traceback.walk_tb(error.__traceback__):
        owner = frame.f_locals.get('self')
        if isinstance(owner, PretrainedInit):
            return str(owner.checkpoint)
    return None


def describe_failure(checkpoint: str, error: BaseException,
                     entries: List[PretrainedCheckpoint]) -> str:
    """The message of a :class:`PretrainedCheckpointError`.

    Args:
        checkpoint (str): The checkpoint that failed to load.
        error (BaseException): Why.
        entries (list[PretrainedCheckpoint]): The config's entries naming ``checkpoint``
            (none: it was set in code).

    Returns:
        str: Several lines: what failed and why, then how to fix it.
    """
    where = (', '.join(e.key for e in entries) if entries
             else 'not in the config: set in code')
    loc = locate_checkpoint(checkpoint)
    reason = f'{type(error).__name__}: {error}'
    lines = [f'turbox_mm: the pretrained checkpoint {checkpoint!r} ({where}) could not be '
             'loaded.']
    if loc.path is None:
        lines.append(f'It could not be located ({loc.note}); loading failed with {reason}.')
    elif loc.note:  # torchvision missing: mmengine cannot even resolve the name
        lines.append(f'{loc.note[0].upper()}{loc.note[1:]}: {reason}.')
        if loc.exists:
            lines.append(f'The file is in the torch hub cache: {loc.path}.')
        else:
            lines.append(f'The file is not in the torch hub cache ({loc.path}) either: fetch '
                         f'{loc.url} on a machine with network access.')
    elif loc.exists:
        lines.append(f'The file {loc.path} is there but loading it failed with {reason}; if '
                     'it is a partial or corrupt copy, delete it (it is downloaded again) or '
                     'replace it.')
    elif loc.url is not None:
        offline = ' (offline?)' if isinstance(error, OSError) else ''
        lines.append(f'It is not in the torch hub cache ({loc.path}) and downloading '
                     f'{loc.url} failed with {reason}{offline}.')
        lines.append(f'Copy it there from a machine with network access (e.g. `wget '
                     f'{loc.url} -P {osp.dirname(loc.path)}`; TORCH_HOME moves the cache), or:')
    else:
        lines.append(f'{loc.path} does not exist ({reason}).')
    name = osp.basename(loc.path) if loc.path else osp.basename(urlparse(checkpoint).path)
    target = loc.path if loc.exists and loc.note else f'/path/to/{name or "checkpoint.pth"}'
    keys = entries or [PretrainedCheckpoint('<key>', checkpoint, '<key>=None')]
    for entry in keys:
        lines.append(f'  point at a local copy: --cfg-options {entry.key}={target}')
    for entry in keys:
        if '=' in entry.off:
            lines.append(f'  or switch it off:      --cfg-options {entry.off}')
        else:
            lines.append(f'  or switch it off:      {entry.off}')
    return '\n'.join(lines)


@contextlib.contextmanager
def explain_pretrained_errors(cfg) -> Iterator[None]:
    """Re-raise a failure to load a pretrained checkpoint as a
    :class:`PretrainedCheckpointError` (chained to the original).

    Only errors raised from inside mmengine's ``PretrainedInit`` are re-raised; everything else
    passes through untouched.

    Args:
        cfg (dict | Config): The full config (to name the key of the checkpoint).

    Examples:
        >>> with explain_pretrained_errors(dict(model=dict())):  # doctest: +SKIP
        ...     runner = build_runner(cfg)
        ...     runner.train()
    """
    try:
        yield
    except PretrainedCheckpointError:
        raise
    except Exception as error:
        checkpoint = _failed_checkpoint(error)
        if checkpoint is None:
            raise
        entries = [e for e in pretrained_checkpoints(cfg) if e.checkpoint == checkpoint]
        raise PretrainedCheckpointError(describe_failure(checkpoint, error, entries)) from error
