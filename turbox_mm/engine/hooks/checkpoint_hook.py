"""``TurboxCheckpointHook``: mmengine's ``CheckpointHook`` that never deletes before it saves.

mmengine's hook, with ``max_keep_ckpts``, deletes the oldest checkpoint first, then saves the
new one, then writes ``last_checkpoint`` in place: a crash or a full disk while saving leaves
the old checkpoint gone, the new one truncated and ``last_checkpoint`` naming a missing file.
This hook keeps the same bookkeeping (the same ``keep_ckpt_ids`` in the message hub and in the
saved checkpoint) but orders the files: the new checkpoint is saved (atomically, by
:class:`~turbox_mm.engine.runner.TurboxRunner`), then ``last_checkpoint`` is replaced
atomically, and only then is the outdated checkpoint deleted. A failed deletion is a warning
naming the file; nothing resumable is lost at any step.
"""
import logging
import os.path as osp

from mmengine.dist import is_main_process
from mmengine.hooks import CheckpointHook
from mmengine.logging import print_log

from turbox_mm.engine.checkpoint_io import atomic_write_text
from turbox_mm.registry import HOOKS


@HOOKS.register_module()
class TurboxCheckpointHook(CheckpointHook):
    """``CheckpointHook`` with crash-safe ordering; the same arguments as mmengine's.

    Examples:
        >>> hook = TurboxCheckpointHook(interval=1, max_keep_ckpts=2)
        >>> hook.max_keep_ckpts
        2
    """

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
        atomic_write_text(osp.join(runner.work_dir, 'last_checkpoint'), self.last_ckpt)
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
