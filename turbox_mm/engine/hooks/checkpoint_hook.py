"""``TurboxCheckpointHook``: mmengine's ``CheckpointHook`` that never deletes before it saves.

mmengine's hook, with ``max_keep_ckpts``, deletes the oldest checkpoint first, then saves the
new one, then writes ``last_checkpoint`` in place: a crash or a full disk while saving leaves
the old checkpoint gone, the new one truncated and ``last_checkpoint`` naming a missing file.
This hook keeps the same bookkeeping (the same ``keep_ckpt_ids`` in the message hub and in the
saved checkpoint) but orders the files: the new checkpoint is saved (atomically, by
:class:`~turbox_mm.engine.runner.TurboxRunner`), then ``last_checkpoint`` is replaced
atomically, and only then is the outdated checkpoint deleted. The best checkpoint
(``save_best``) likewise: mmengine's logic runs unchanged, but the previous best file is
deleted only after the new one is saved. A failed deletion is a warning naming the file;
nothing resumable is lost at any step. Temporary files that a killed run left behind are
swept (with a warning) when training starts.

The price of this order: for a moment the folder holds one checkpoint more than
``max_keep_ckpts`` (plus the temporary file while it is written), so a disk with room for
exactly ``max_keep_ckpts`` checkpoints fails the save (and keeps the older ones) where
mmengine's order would have deleted first.
"""
import logging
import os
import os.path as osp
import re

from mmengine.dist import is_main_process
from mmengine.hooks import CheckpointHook
from mmengine.logging import print_log

from turbox_mm.utils.atomic_files import atomic_write_text
from turbox_mm.registry import HOOKS


@HOOKS.register_module()
class TurboxCheckpointHook(CheckpointHook):
    """``CheckpointHook`` with crash-safe ordering; the same arguments as mmengine's.

    Examples:
        >>> hook = TurboxCheckpointHook(interval=1, max_keep_ckpts=2)
        >>> hook.max_keep_ckpts
        2
    """

    def before_train(self, runner) -> None:
        """mmengine's, then the sweep of temporary files a killed run left behind."""
        super().before_train(runner)
        if not is_main_process():
            return
        leftover = re.compile(r'^\..+\.tmp-(\d+)$')
        for folder in {self.out_dir, runner.work_dir}:
            if not isinstance(folder, str) or not osp.isdir(folder):
                continue
            for name in os.listdir(folder):
                match = leftover.match(name)
                if match and int(match.group(1)) != os.getpid():
                    print_log(f'TurboxCheckpointHook: removing {osp.join(folder, name)}, a '
                              'partial file of an earlier run that was stopped while writing',
                              logger='current', level=logging.WARNING)
                    os.remove(osp.join(folder, name))

    def _save_best_checkpoint(self, runner, metrics) -> None:
        """mmengine's, with the previous best checkpoint deleted after the new one is saved."""
        backend, deferred = self.file_backend, []

        class _Deferring:
            """The file backend, except that deletions wait until the save has succeeded."""

            def __getattr__(self, name):
                return getattr(backend, name)

            def remove(self, path):
                deferred.append(path)

            def rmtree(self, path):
                deferred.append(path)

        self.file_backend = _Deferring()
        try:
            super()._save_best_checkpoint(runner, metrics)
        finally:
            self.file_backend = backend
        current = {getattr(self, 'best_ckpt_path', None), self.last_ckpt,
                   *getattr(self, 'best_ckpt_path_dict', {}).values()}
        for path in deferred:
            if path not in current:  # never the file just saved
                self._remove(path)

    def _save_checkpoint_with_step(self, runner, step, meta) -> None:
        outdated = None
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids
                                            and self.keep_ckpt_ids[-1] == step):
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                outdated = self.keep_ckpt_ids.popleft()
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))
        ckpt_filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, ckpt_filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        runner.save_checkpoint(self.out_dir, ckpt_filename, self.file_client_args,
                               save_optimizer=self.save_optimizer,
                               save_param_scheduler=self.save_param_scheduler, meta=meta,
                               by_epoch=self.by_epoch, backend_args=self.backend_args,
                               **self.args)
        if not is_main_process():
            return
        atomic_write_text(osp.join(runner.work_dir, 'last_checkpoint'), self.last_ckpt,
                          durable=True)
        if outdated is not None:
            self._remove(self.file_backend.join_path(self.out_dir,
                                                     self.filename_tmpl.format(outdated)))

    def _remove(self, path: str) -> None:
        """Delete an outdated checkpoint (a file, or a DeepSpeed folder); warn on failure."""
        try:
            if self.file_backend.isfile(path):
                self.file_backend.remove(path)
            elif self.file_backend.isdir(path):
                self.file_backend.rmtree(path)
        except OSError as error:
            print_log(f'TurboxCheckpointHook: could not delete the outdated checkpoint {path} '
                      f'({error}); the newer checkpoints are saved, delete it by hand',
                      logger='current', level=logging.WARNING)
