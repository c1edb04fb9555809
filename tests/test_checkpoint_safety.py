"""Crash-safe checkpoints (turbox.system.atomic_checkpoints): failures injected at every step
of saving a checkpoint, then a resume. Nothing resumable may be lost.

The smoke config trains 3 epochs with one checkpoint an epoch and ``max_keep_ckpts=1`` (the
setting where mmengine's hook deletes epoch 2 before epoch 3 is written). Each case fails the
third save at one step (the write, the rename, the deletion of the outdated file) and checks
the folder, then resumes in a fresh runner.
"""
import copy
import errno
import os
import os.path as osp

import pytest
import torch
from mmengine.config import Config

from turbox_mm.engine import checkpoint_io
from turbox_mm.engine.checkpoint_io import readable_checkpoint
from turbox_mm.utils import atomic_files

SMOKE = 'configs/smoke/smoke_turbox.py'


def _cfg(work_dir, epochs=3, keep=1, resume=False, **system):
    cfg = Config.fromfile(SMOKE)
    cfg.work_dir = str(work_dir)
    _cfg.runs = getattr(_cfg, 'runs', 0) + 1  # mmengine names loggers by the second: unique
    cfg.experiment_name = f'safety_{os.getpid()}_{_cfg.runs}'

    cfg.train_cfg.max_epochs = epochs
    cfg.train_cfg.val_interval = 100
    cfg.train_dataloader.num_workers = 0
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=1,
                                        max_keep_ckpts=keep)
    cfg.default_hooks.logger.interval = 100
    cfg.log_level = 'WARNING'
    cfg.resume = resume
    cfg.turbox = dict(cfg.get('turbox', {}))
    # In-process runs: leave the test process's GC and cores alone, and skip compiling.
    cfg.turbox['system'] = dict(gc=False, cpu_affinity=False, huge_pages=False, **system)
    cfg.turbox['compile'] = dict(enable=False)
    cfg.turbox['loop'] = dict(pipelined=False)
    return cfg


def _train(cfg):
    from turbox_mm.engine.runner import TurboxRunner
    runner = TurboxRunner.from_cfg(copy.deepcopy(cfg))
    runner.train()
    return runner


def _last(work_dir):
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        return f.read().strip()


def _leftovers(work_dir):
    return [n for n in os.listdir(work_dir) if '.tmp-' in n]


def _fail_on(monkeypatch, target, name, error, when):
    """Make ``target.name`` raise ``error`` for the calls whose arguments satisfy ``when``."""
    real = getattr(target, name)

    def flaky(*args, **kwargs):
        if when(*args):
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, flaky)


def _resume_and_finish(work_dir):
    runner = _train(_cfg(work_dir, epochs=4, resume=True))
    assert runner.epoch == 4
    assert readable_checkpoint(osp.join(work_dir, 'epoch_4.pth')) is None
    assert _last(work_dir) == osp.join(work_dir, 'epoch_4.pth')
    return runner


def test_turbox_runner_swaps_in_the_safe_hook(tmp_path):
    runner = _train(_cfg(tmp_path, epochs=2))
    names = [type(h).__name__ for h in runner.hooks]
    assert 'TurboxCheckpointHook' in names and 'CheckpointHook' not in names
    assert sorted(os.listdir(tmp_path)).count('epoch_2.pth') == 1
    assert not osp.exists(tmp_path / 'epoch_1.pth')  # max_keep_ckpts=1, deleted after 2
    assert _last(tmp_path) == str(tmp_path / 'epoch_2.pth') and not _leftovers(tmp_path)
    off = _train(_cfg(tmp_path / 'off', epochs=1, atomic_checkpoints=False))
    assert 'CheckpointHook' in [type(h).__name__ for h in off.hooks]


def test_disk_full_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    def partial_then_full(obj, f, *args, **kwargs):
        f.write(b'PK\x03\x04 half a checkpoint')
        raise OSError(errno.ENOSPC, 'No space left on device')

    real = checkpoint_io.torch.save
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        return (partial_then_full if len(calls) == 3 else real)(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_io.torch, 'save', save)
    with pytest.raises(OSError, match='No space left'):
        _train(_cfg(tmp_path))
    monkeypatch.setattr(checkpoint_io.torch, 'save', real)
    assert readable_checkpoint(str(tmp_path / 'epoch_2.pth')) is None  # not deleted first
    assert not osp.exists(tmp_path / 'epoch_3.pth') and not _leftovers(tmp_path)
    assert _last(tmp_path) == str(tmp_path / 'epoch_2.pth')
    runner = _resume_and_finish(tmp_path)
    assert runner.iter == 32


def test_failed_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _fail_on(monkeypatch, checkpoint_io.os, 'replace', OSError(errno.EIO, 'Input/output error'),
             lambda src, dst: dst.endswith('epoch_3.pth'))
    with pytest.raises(OSError, match='Input/output error'):
        _train(_cfg(tmp_path))
    monkeypatch.undo()
    assert readable_checkpoint(str(tmp_path / 'epoch_2.pth')) is None
    assert not osp.exists(tmp_path / 'epoch_3.pth') and not _leftovers(tmp_path)
    assert _last(tmp_path) == str(tmp_path / 'epoch_2.pth')
    _resume_and_finish(tmp_path)


class _FullDisk:
    """An open file whose ``write`` stores half the bytes, then fails as a full disk does."""

    def __init__(self, file):
        self._file = file

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._file.close()

    def write(self, data):
        self._file.write(data[:len(data) // 2])
        self._file.flush()
        raise OSError(errno.ENOSPC, 'No space left on device')


@pytest.mark.parametrize('step', ['write', 'rename'])
def test_failed_last_checkpoint_write_keeps_both_checkpoints(tmp_path, monkeypatch, step):
    """The third save fails while ``last_checkpoint`` is written (a full disk half-way
    through the write, or the rename): the new checkpoint stays whole, ``last_checkpoint``
    still names the previous one (not deleted: deletion comes after), and a resume works."""
    writes = []
    if step == 'write':
        def full_disk_open(path, *args, **kwargs):
            file = open(path, *args, **kwargs)
            if 'last_checkpoint' in osp.basename(path):  # its temporary file
                writes.append(path)
                if len(writes) == 3:
                    return _FullDisk(file)
            return file

        monkeypatch.setattr(atomic_files, 'open', full_disk_open, raising=False)
    else:
        def third_last_checkpoint(src, dst):
            if osp.basename(dst) == 'last_checkpoint':
                writes.append(dst)
            return len(writes) == 3 and osp.basename(dst) == 'last_checkpoint'

        _fail_on(monkeypatch, atomic_files.os, 'replace',
                 OSError(errno.ENOSPC, 'No space left on device'), third_last_checkpoint)
    with pytest.raises(OSError, match='No space left'):
        _train(_cfg(tmp_path))
    monkeypatch.undo()
    assert len(writes) == 3
    assert readable_checkpoint(str(tmp_path / 'epoch_3.pth')) is None  # the new one: whole
    assert readable_checkpoint(str(tmp_path / 'epoch_2.pth')) is None  # the previous: kept
    assert _last(tmp_path) == str(tmp_path / 'epoch_2.pth') and not _leftovers(tmp_path)
    _resume_and_finish(tmp_path)  # from epoch 2, as last_checkpoint says


def test_failed_deletion_warns_and_loses_nothing(tmp_path, monkeypatch, capfd):
    from mmengine.fileio.backends import LocalBackend
    real = LocalBackend.remove

    def remove(self, path):
        if path.endswith('epoch_2.pth'):
            raise PermissionError(errno.EACCES, 'Permission denied', path)
        return real(self, path)

    monkeypatch.setattr(LocalBackend, 'remove', remove)
    _train(_cfg(tmp_path))
    log = ''.join(capfd.readouterr())  # mmengine's logger prints; it does not propagate
    assert 'could not delete the outdated checkpoint' in log and 'epoch_2.pth' in log
    assert readable_checkpoint(str(tmp_path / 'epoch_3.pth')) is None
    assert _last(tmp_path) == str(tmp_path / 'epoch_3.pth')


def test_a_killed_runs_partial_file_is_ignored_and_swept(tmp_path, capfd):
    """SIGKILL runs no cleanup: what it leaves is the temporary name, never the real one. The
    resume ignores it and the next training start removes it, saying so."""
    _train(_cfg(tmp_path, epochs=2))
    stale = tmp_path / '.epoch_3.pth.tmp-99999'
    stale.write_bytes(b'PK\x03\x04 killed here')
    assert checkpoint_io.previous_checkpoints(str(tmp_path)) == [str(tmp_path / 'epoch_2.pth')]
    capfd.readouterr()
    _resume_and_finish(tmp_path)
    assert not stale.exists()
    assert f'removing {stale}, a partial file of an earlier run' in ''.join(capfd.readouterr())


def _best_cfg(work_dir, epochs):
    cfg = _cfg(work_dir, epochs=epochs)
    cfg.train_cfg.val_interval = 1
    cfg.default_hooks.checkpoint.update(save_best='smoke/mse', rule='less')
    return cfg


def test_best_checkpoint_is_replaced_only_after_the_new_one_is_saved(tmp_path, monkeypatch):
    _train(_best_cfg(tmp_path, epochs=1))
    first_best = [n for n in os.listdir(tmp_path) if n.startswith('best_smoke_mse')]
    assert first_best == ['best_smoke_mse_epoch_1.pth']
    # the next best fails while it is written: the first best must survive
    _fail_on(monkeypatch, checkpoint_io.os, 'replace', OSError(errno.ENOSPC, 'No space left'),
             lambda src, dst: osp.basename(dst).startswith('best_smoke_mse_epoch_2'))
    cfg = _best_cfg(tmp_path, epochs=2)
    cfg.resume = True
    with pytest.raises(OSError, match='No space left'):
        _train(cfg)
    assert readable_checkpoint(str(tmp_path / 'best_smoke_mse_epoch_1.pth')) is None
    monkeypatch.undo()
    runner = _train(cfg)  # resumes epoch 1 and writes epoch 2's best, then deletes epoch 1's
    best = sorted(n for n in os.listdir(tmp_path) if n.startswith('best_smoke_mse'))
    assert runner.epoch == 2 and len(best) == 1 and not _leftovers(tmp_path)


def test_explicit_damaged_checkpoint_never_resumes_a_later_one(tmp_path):
    _train(_cfg(tmp_path, keep=3))
    (tmp_path / 'epoch_2.pth').write_bytes(b'PK\x03\x04 junk')
    assert checkpoint_io.previous_checkpoints(str(tmp_path), before=str(
        tmp_path / 'epoch_2.pth')) == [str(tmp_path / 'epoch_1.pth')]
    cfg = _cfg(tmp_path, epochs=3, keep=3, resume=True)
    cfg.load_from = str(tmp_path / 'epoch_2.pth')
    runner = _train(cfg)
    assert runner.epoch == 3  # resumed epoch 1 (not epoch 3), trained epochs 2 and 3


def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, capfd):
    _train(_cfg(tmp_path, keep=2))
    newest = tmp_path / 'epoch_3.pth'
    data = newest.read_bytes()
    newest.write_bytes(data[:len(data) // 2])  # truncated after the fact (bad disk, copy)
    capfd.readouterr()
    runner = _train(_cfg(tmp_path, epochs=4, keep=2, resume=True))
    log = ''.join(capfd.readouterr())
    assert f'cannot resume from {newest}' in log and 'epoch_2.pth instead' in log
    assert runner.epoch == 4


def test_missing_last_checkpoint_file_resumes_from_the_folder(tmp_path, capfd):
    _train(_cfg(tmp_path, epochs=2))
    os.remove(tmp_path / 'last_checkpoint')
    capfd.readouterr()
    runner = _train(_cfg(tmp_path, epochs=3, resume=True))
    assert 'has no last_checkpoint file; resuming from its newest checkpoint' in \
        ''.join(capfd.readouterr())
    assert runner.epoch == 3 and runner.iter == 24


def test_no_whole_checkpoint_left_is_a_named_error(tmp_path):
    _train(_cfg(tmp_path, epochs=1))
    (tmp_path / 'epoch_1.pth').write_bytes(b'PK\x03\x04 junk')
    with pytest.raises(RuntimeError, match=r'cannot resume from .*epoch_1\.pth: .*no other '
                                           r'whole checkpoint'):
        _train(_cfg(tmp_path, epochs=2, resume=True))


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    path = tmp_path / 'info.pkl'
    path.write_bytes(b'old')

    def boom(f):
        f.write(b'new, half')
        raise RuntimeError('interrupted')

    with pytest.raises(RuntimeError, match='interrupted'):
        atomic_files.atomic_write(str(path), boom, durable=True)
    assert path.read_bytes() == b'old' and not _leftovers(tmp_path)
    atomic_files.atomic_write_text(str(path), 'new', durable=True)
    assert path.read_text() == 'new'
    assert readable_checkpoint(str(tmp_path / 'none.pth')) == 'the file does not exist'
    torch.save({'a': torch.ones(3)}, tmp_path / 'ok.pth')
    assert readable_checkpoint(str(tmp_path / 'ok.pth')) is None


def test_durable_writes_fsync_the_file_then_its_folder(tmp_path, monkeypatch):
    """``durable=True``: the file is fsync-ed before the rename and its folder after it; for
    a checkpoint and ``last_checkpoint`` in training alike. ``durable=False``: no fsync."""
    real_fsync, real_replace, events = os.fsync, os.replace, []

    def fsync(fd):
        stat = os.fstat(fd)
        events.append(('fsync', (stat.st_dev, stat.st_ino)))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(('replace', osp.basename(dst)))
        return real_replace(src, dst)

    def node(path):  # a renamed file keeps its inode: the temporary file's is the final one's
        stat = os.stat(path)
        return stat.st_dev, stat.st_ino

    monkeypatch.setattr(atomic_files.os, 'fsync', fsync)
    monkeypatch.setattr(atomic_files.os, 'replace', replace)
    path = tmp_path / 'notes.txt'
    atomic_files.atomic_write_text(str(path), 'kept', durable=True)
    assert events == [('fsync', node(path)), ('replace', 'notes.txt'),
                      ('fsync', node(tmp_path))]
    events.clear()
    atomic_files.atomic_write_text(str(path), 'fast')
    assert events == [('replace', 'notes.txt')] and path.read_text() == 'fast'

    events.clear()
    _train(_cfg(tmp_path / 'run', epochs=1))
    run = tmp_path / 'run'
    for name in ('epoch_1.pth', 'last_checkpoint'):
        at = events.index(('replace', name))
        assert events[at - 1] == ('fsync', node(run / name)), (name, events)
        assert events[at + 1] == ('fsync', node(run)), (name, events)


def test_plain_resume_in_an_empty_folder_warns_and_trains_from_scratch(tmp_path, capfd):
    """``--resume`` without a path on a fresh work dir (a common auto-resume workflow) trains
    from scratch, but says so, naming the folder."""
    capfd.readouterr()
    runner = _train(_cfg(tmp_path, epochs=1, resume=True))
    log = ''.join(capfd.readouterr())
    assert (f'turbox: resume was asked for, but {tmp_path} holds no checkpoint; training '
            'starts from scratch') in log, log
    assert runner.epoch == 1 and runner.iter == 8
    assert _last(tmp_path) == str(tmp_path / 'epoch_1.pth')


def test_a_failing_run_restores_automatic_gc(tmp_path, monkeypatch):
    """The GC hook turns automatic collection off and freezes the heap for training; when the
    loop raises, the runner turns both back (mmengine calls no after_run then)."""
    import gc

    from turbox_mm.testing import SmokeModel
    cfg = _cfg(tmp_path, epochs=1)
    cfg.turbox['system']['gc'] = True
    calls = []
    real = SmokeModel.train_step

    def fail_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError('injected failure at iteration 3')
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SmokeModel, 'train_step', fail_third)
    assert gc.isenabled()
    with pytest.raises(RuntimeError, match='injected failure'):
        _train(cfg)
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_prefetch_factor_zero_is_a_named_error(tmp_path):
    cfg = _cfg(tmp_path, epochs=1)
    cfg.turbox['dataloader'] = dict(prefetch_factor=0)
    with pytest.raises(ValueError, match=r"'turbox.dataloader.prefetch_factor' must be None or "
                                         r'>= 1.*got 0'):
        _train(cfg)


@pytest.mark.parametrize('modules, match', [
    (['backbone_typo'], r"'backbone_typo' names no submodule of the model: 'backbone_typo' is "
                        r'not a key of cfg.model'),
    (['head..fc'], r"'head..fc' is not a dotted submodule path"),
    (['*.fc'], r"'\*.fc' starts with \*: the first part must name a submodule"),
    ('backbone', r"must be 'auto' or a list of submodule paths, got 'backbone'"),
])
def test_a_wrong_compile_modules_entry_fails_before_the_model_is_built(tmp_path, monkeypatch,
                                                                       modules, match):
    from turbox_mm.testing import SmokeModel
    cfg = _cfg(tmp_path, epochs=1)
    cfg.turbox['compile'] = dict(enable=True, modules=modules, on_cpu=True)

    def not_yet(*args, **kwargs):
        raise AssertionError('the model was built before the options were checked')

    monkeypatch.setattr(SmokeModel, '__init__', not_yet)
    with pytest.raises(ValueError, match=match):
        _train(cfg)


def test_an_unknown_compile_backend_fails_before_the_model_is_built(tmp_path, monkeypatch):
    from turbox_mm.testing import SmokeModel
    cfg = _cfg(tmp_path, epochs=1)
    cfg.turbox['compile'] = dict(enable=True, backend='inductr', on_cpu=True)

    def not_yet(*args, **kwargs):
        raise AssertionError('the model was built before the options were checked')

    monkeypatch.setattr(SmokeModel, '__init__', not_yet)
    with pytest.raises(ValueError, match=r"'turbox.compile.backend': torch.compile has no "
                                         r"backend 'inductr'; registered here: .*inductor"):
        _train(cfg)
    cfg.turbox['compile'] = dict(enable=False, backend='inductr')  # off: not checked
    monkeypatch.undo()
    _train(cfg)


def test_loading_a_damaged_checkpoint_names_it(tmp_path):
    _train(_cfg(tmp_path / 'a', epochs=1))
    damaged = tmp_path / 'a' / 'epoch_1.pth'
    data = damaged.read_bytes()
    damaged.write_bytes(data[:len(data) // 2])
    cfg = _cfg(tmp_path / 'b', epochs=1)
    cfg.load_from = str(damaged)
    with pytest.raises(RuntimeError, match=rf'cannot load checkpoint {damaged}: damaged'):
        _train(cfg)


def test_a_custom_filename_tmpl_is_found_without_last_checkpoint(tmp_path, capfd):
    cfg = _cfg(tmp_path, epochs=2, keep=2)
    cfg.default_hooks.checkpoint['filename_tmpl'] = 'ckpt_e{}.pth'
    _train(cfg)
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith('.pth')) == [
        'ckpt_e1.pth', 'ckpt_e2.pth']
    os.remove(tmp_path / 'last_checkpoint')
    (tmp_path / 'ckpt_e2.pth').write_bytes(b'PK\x03\x04 junk')  # and the newest is damaged
    capfd.readouterr()
    resume = _cfg(tmp_path, epochs=3, keep=2, resume=True)
    resume.default_hooks.checkpoint['filename_tmpl'] = 'ckpt_e{}.pth'
    runner = _train(resume)
    log = ''.join(capfd.readouterr())
    assert 'resuming from its newest checkpoint' in log and 'ckpt_e1.pth instead' in log
    assert runner.epoch == 3 and runner.iter == 24  # resumed after epoch 1, trained 2 and 3


def test_name_patterns_keep_the_default_names_and_kinds():
    patterns = checkpoint_io.name_patterns('model_{}_final.pth', by_epoch=False)
    names = ['model_5_final.pth', 'model_x_final.pth', 'epoch_2.pth', 'iter_9.pth', 'last.pth']
    found = [checkpoint_io._step_name(n, patterns) for n in names]
    assert found == [('iter', 5), None, ('epoch', 2), ('iter', 9), None]
    assert checkpoint_io.name_patterns('no_step.pth') == checkpoint_io.DEFAULT_PATTERNS
