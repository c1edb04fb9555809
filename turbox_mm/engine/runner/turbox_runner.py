"""The runner that ``configs/_base_/turbox.py`` selects through ``runner_type``."""
import contextlib
import copy
import logging
import os.path as osp
import pickle
from typing import Dict, Iterator, List, Optional

import torch
from mmengine.config import Config, ConfigDict
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import DataLoader

from turbox_mm.engine.checkpoint_io import (decided_on_rank0, is_local_path, name_patterns,
                                            previous_checkpoints, readable_checkpoint,
                                            save_checkpoint_atomically)
from turbox_mm.datasets.loader_watchdog import name_stuck_samples, watch_dataloader
from turbox_mm.registry import RUNNERS
from turbox_mm.utils.hugepages import enable_huge_pages
from turbox_mm.utils.options import check_options
from turbox_mm.utils.sparse_conv import warn_slow_sparse_conv
from .fast_model import apply_fast_model
from .module_compiler import (compile_kwargs_from_options, compile_submodules,
                              set_recompile_limit, uses_cuda_graphs)
from .precision import apply_precision
from .turbox_options import TURBOX_OPTIONS, apply_turbox_options


def replays_graphs(names: List[str], compile_kwargs: Dict) -> bool:
    """Whether what ``compile_submodules`` compiled (``names``; methods are
    ``path:method``, compiled without CUDA graphs) replays CUDA graphs: a module was compiled
    with settings that replay them."""
    return any(':' not in name for name in names) and uses_cuda_graphs(compile_kwargs)


def accumulative_counts(optim_wrapper) -> int:
    """The largest gradient-accumulation count of an optimizer wrapper: a built one
    (mmengine's ``OptimWrapper``, or an ``OptimWrapperDict`` of several), its config, or a
    dict of configs (one per optimizer); 1 where none is set or nothing is given.

    Examples:
        >>> accumulative_counts(dict(type='OptimWrapper', accumulative_counts=4))
        4
        >>> accumulative_counts(dict(gen=dict(type='OptimWrapper'), disc=dict(
        ...     type='OptimWrapper', accumulative_counts=2)))
        2
        >>> accumulative_counts(None)
        1
    """
    counts = getattr(optim_wrapper, '_accumulative_counts', None)
    if counts is not None:
        return int(counts)
    if hasattr(optim_wrapper, 'optim_wrappers'):  # OptimWrapperDict
        return max([accumulative_counts(w) for w in optim_wrapper.optim_wrappers.values()],
                   default=1)
    if not isinstance(optim_wrapper, dict):
        return 1
    if 'accumulative_counts' in optim_wrapper:
        return int(optim_wrapper['accumulative_counts'] or 1)
    return max([accumulative_counts(v) for v in optim_wrapper.values()
                if isinstance(v, dict) or hasattr(v, '_accumulative_counts')], default=1)


@RUNNERS.register_module()
class TurboxRunner(Runner):
    """An mmengine :class:`~mmengine.runner.Runner` that applies the config's ``turbox`` section.

    It validates the section against
    :data:`~turbox_mm.engine.runner.turbox_options.TURBOX_OPTIONS` (an unknown key or a wrong
    type fails at once, naming the key and the valid ones), rewrites the config accordingly and
    then builds and runs exactly as mmengine's runner does. Both mmengine-style launchers,
    ``tools/train.py`` here and mmdet3d's own, build it from ``runner_type``.

    Attributes:
        turbox_options (dict): The validated options, defaults filled in.
        turbox_changes (list[str]): What applying them changed in the config.

    Examples:
        >>> from mmengine.config import Config
        >>> cfg = Config.fromfile('configs/smoke/smoke_turbox.py')  # doctest: +SKIP
        >>> runner = TurboxRunner.from_cfg(cfg)  # doctest: +SKIP
        >>> runner.train()  # doctest: +SKIP
    """

    def __init__(self, *args, **kwargs) -> None:
        # The options are needed while mmengine's __init__ runs (setup_env, wrap_model).
        cfg = kwargs.get('cfg') or {}
        self.turbox_options = check_options(cfg.get('turbox'), TURBOX_OPTIONS)
        self.turbox_changes = []
        self._verified_checkpoint: Optional[str] = None  # see resume()
        self._eager_warmup_iters = 0  # set where something is compiled (_compile_and_wrap)
        self._cuda_graph_steps = False  # set where compiled in a CUDA-graph mode (same place)
        super().__init__(*args, **kwargs)

    def register_hooks(self, default_hooks=None, custom_hooks=None) -> None:
        """mmengine's hooks, then :class:`~turbox_mm.engine.hooks.EagerWarmupHook` where
        ``turbox.compile`` compiled a submodule and ``turbox.compile.eager_iters`` > 0, and
        :class:`~turbox_mm.engine.hooks.CudaGraphStepHook` where it compiled one in a mode that
        replays CUDA graphs; each unless the config lists one already.

        Args:
            default_hooks (dict, optional): As for mmengine's ``Runner.register_hooks``.
            custom_hooks (list, optional): As for mmengine's ``Runner.register_hooks``.
        """
        super().register_hooks(default_hooks, custom_hooks)
        if self._eager_warmup_iters:
            from turbox_mm.engine.hooks import EagerWarmupHook
            if not any(isinstance(hook, EagerWarmupHook) for hook in self._hooks):
                self.register_hook(EagerWarmupHook(self._eager_warmup_iters))
        if self._cuda_graph_steps:
            from turbox_mm.engine.hooks import CudaGraphStepHook
            if not any(isinstance(hook, CudaGraphStepHook) for hook in self._hooks):
                self.register_hook(CudaGraphStepHook())

    def setup_env(self, env_cfg: Dict) -> None:
        """mmengine's environment setup, then the precision keys of ``env_cfg``.

        See :func:`~turbox_mm.engine.runner.precision.apply_precision`; applied only where
        CUDA is present.
        """
        if (self.distributed and self.launcher == 'pytorch' and not torch.cuda.is_available()
                and not torch.distributed.is_initialized()):
            # mmengine's pytorch launcher calls torch.cuda.set_device unconditionally, so a
            # CPU-only machine (tests, debugging) cannot start a process group through it;
            # start the gloo group here and mmengine uses it as it is.
            backend = (env_cfg.get('dist_cfg') or {}).get('backend', 'gloo')
            if backend != 'gloo':
                print_log(f'env_cfg.dist_cfg.backend={backend!r} needs CUDA; using gloo on this '
                          'CPU-only machine', logger='current', level=logging.WARNING)
            torch.distributed.init_process_group(backend='gloo')
        super().setup_env(env_cfg)
        if torch.cuda.is_available():
            self.turbox_changes += apply_precision(env_cfg)
        elif env_cfg.get('allow_tf32') or env_cfg.get('matmul_precision'):
            # torch's matmul precision is global and reaches the CPU's oneDNN kernels too;
            # TF32 is a GPU feature, so CPU runs keep exact float32.
            self.turbox_changes.append('precision: no CUDA device, float32 stays exact')

    def build_dataloader(self, dataloader, seed: Optional[int] = None,
                         diff_rank_seed: bool = False):
        """mmengine's loader, watched: a stuck or dead worker fails naming its sample
        (``turbox.dataloader.timeout``, :mod:`turbox_mm.datasets.loader_watchdog`).

        Every loader the runner builds (train, val and test: mmengine's loops call this) comes
        through here, and mmengine builds and fully initialises the dataset here (with or
        without ``lazy_init``), so an info file that cannot be unpickled fails here, named.

        Raises:
            InfoFileError: An info file (``ann_file``) is truncated or damaged: the message
                names it and the check to run; the unpickling error is its ``__cause__``.
        """
        try:
            loader = Runner.build_dataloader(dataloader, seed=seed,
                                             diff_rank_seed=diff_rank_seed)
        except (pickle.UnpicklingError, EOFError) as exc:
            named = _named_info_file_error(exc, dataloader)
            if named is None:
                raise
            raise named from exc
        if isinstance(loader, DataLoader):
            watch_dataloader(loader, self.turbox_options['dataloader']['timeout'])
        return loader

    def wrap_model(self, model_wrapper_cfg: Optional[Dict], model: nn.Module) -> nn.Module:
        """Swap SyncBN and compile the chosen submodules, then wrap as mmengine does.

        In a distributed run with ``turbox.sync_bn``, torch's and mmcv's SyncBN layers become
        :class:`~turbox_mm.models.layers.TurboxSyncBatchNorm`; with ``cfg.sync_bn`` set
        (``--sync_bn``), every BN does, in place of mmengine's own conversion. First, with
        ``turbox.ops.fast``, the model-level changes of :mod:`.fast_model`.
        """
        if self.turbox_options['ops']['fast'] and not is_model_wrapper(model):
            self.turbox_changes += apply_fast_model(model)
        if not is_model_wrapper(model):
            warn_slow_sparse_conv(model, on_cuda=torch.cuda.is_available())
        if (self.distributed and self.turbox_options.get('sync_bn')
                and not is_model_wrapper(model)):
            from turbox_mm.models.layers import convert_sync_batchnorm
            convert_all = self.cfg.get('sync_bn') is not None
            model = convert_sync_batchnorm(model, sync_only=not convert_all)
            self.turbox_changes.append('SyncBN: turbox_mm.TurboxSyncBatchNorm for '
                                       + ('every BN (cfg.sync_bn)' if convert_all else
                                          'the SyncBN layers'))
            # mmengine would convert our layers back to torch's.
            saved, self.cfg.sync_bn = self.cfg.get('sync_bn'), None
            try:
                return self._compile_and_wrap(model_wrapper_cfg, model)
            finally:
                self.cfg.sync_bn = saved
        return self._compile_and_wrap(model_wrapper_cfg, model)

    def _compile_and_wrap(self, model_wrapper_cfg: Optional[Dict], model: nn.Module):
        if self.distributed and not torch.cuda.is_available():
            # mmengine passes device_ids=[LOCAL_RANK] to DDP, which refuses CPU modules.
            model_wrapper_cfg = dict(model_wrapper_cfg or dict(type='MMDistributedDataParallel'))
            model_wrapper_cfg.setdefault('device_ids', None)
        opts = self.turbox_options.get('compile')
        if opts and opts['enable'] and not is_model_wrapper(model):
            if torch.cuda.is_available() or opts['on_cpu']:
                kwargs = compile_kwargs_from_options(opts)
                names = compile_submodules(model, opts['modules'], **kwargs)
                done = ', '.join(names) or ("nothing (no submodule matched, or only torch's "
                                            'single layers, left eager)')
                self.turbox_changes.append(f'torch.compile: {done}')
                if replays_graphs(names, kwargs):
                    self._cuda_graph_steps = True
                    self.turbox_changes.append(
                        'torch.compile: the compiled modules replay CUDA graphs; each '
                        'iteration marks its start (turbox_mm.CudaGraphStepHook)')
                    accumulate = accumulative_counts(self.optim_wrapper)
                    if accumulate > 1:
                        print_log(f'turbox.compile: optim_wrapper.accumulative_counts='
                                  f'{accumulate} with CUDA graphs: a gradient made by one '
                                  "step's replayed graph lives in its pool, which the next "
                                  'step overwrites before the accumulation adds to it (torch '
                                  'raises "accessing tensor output of CUDAGraphs that has '
                                  'been overwritten"); use a mode without CUDA graphs',
                                  logger='current', level=logging.WARNING)
                if names and opts['recompile_limit'] is not None:
                    self.turbox_changes.append(set_recompile_limit(opts['recompile_limit']))
                if names and opts['eager_iters']:
                    if hasattr(torch.compiler, 'set_stance'):
                        self._eager_warmup_iters = opts['eager_iters']
                        self.turbox_changes.append(
                            f"torch.compile: the first {opts['eager_iters']} training "
                            'iteration(s) run eagerly (turbox_mm.EagerWarmupHook)')
                    else:
                        self.turbox_changes.append(
                            'torch.compile: compile.eager_iters ignored (torch '
                            f'{torch.__version__} has no torch.compiler.set_stance; 2.6+)')
            else:
                self.turbox_changes.append('torch.compile: skipped, no CUDA device '
                                           '(turbox.compile.on_cpu=True compiles anyway)')
        return super().wrap_model(model_wrapper_cfg, model)

    def save_checkpoint(self, *args, **kwargs) -> None:
        """mmengine's checkpoint, after grad norms still on their way to the log arrive;
        with ``turbox.system.atomic_checkpoints`` written atomically and durably
        (:func:`~turbox_mm.engine.checkpoint_io.save_checkpoint_atomically`)."""
        from turbox_mm.engine.loops.batch_prefetcher import flush_grad_norm
        flush_grad_norm(self)
        if not self.turbox_options['system']['atomic_checkpoints']:
            return super().save_checkpoint(*args, **kwargs)
        import mmengine.runner.runner as mmengine_runner

        original = mmengine_runner.save_checkpoint
        mmengine_runner.save_checkpoint = save_checkpoint_atomically
        try:
            return super().save_checkpoint(*args, **kwargs)
        finally:
            mmengine_runner.save_checkpoint = original

    def load_or_resume(self) -> None:
        """mmengine's, except that an automatic resume (``resume=True`` without a path)
        whose ``last_checkpoint`` is missing looks for the folder's checkpoints before starting
        from scratch, and says which it did (decided on rank 0 for every rank)."""
        if (not self._has_loaded and self._resume and self._load_from is None
                and self.turbox_options['system']['atomic_checkpoints']):
            self._load_from = decided_on_rank0(self._checkpoint_without_last_file)
        return super().load_or_resume()

    def _checkpoint_without_last_file(self) -> Optional[str]:
        from mmengine.runner.checkpoint import find_latest_checkpoint

        if find_latest_checkpoint(self.work_dir) is not None:
            return None  # mmengine's own resume finds it
        found = previous_checkpoints(self.work_dir, patterns=self._checkpoint_names())
        if found:
            print_log(f'turbox: {self.work_dir} has no last_checkpoint file; resuming '
                      f'from its newest checkpoint, {found[0]}', logger='current',
                      level=logging.WARNING)
            return found[0]
        print_log(f'turbox: resume was asked for, but {self.work_dir} holds no '
                  'checkpoint; training starts from scratch', logger='current',
                  level=logging.WARNING)
        return None

    def _checkpoint_names(self):
        """:func:`name_patterns` of the checkpoint hook's ``filename_tmpl`` (if it has one)."""
        for hook in self.hooks:
            if hasattr(hook, 'filename_tmpl') and hasattr(hook, 'by_epoch'):
                return name_patterns(hook.filename_tmpl, hook.by_epoch)
        return name_patterns()

    def load_checkpoint(self, filename: str, *args, **kwargs):
        """mmengine's, but a damaged local checkpoint is a named error (torch's own error
        names no file: an ``OSError`` or ``RuntimeError`` from deep inside its reader)."""
        if is_local_path(filename) and filename != self._verified_checkpoint:
            problem = readable_checkpoint(filename)
            if problem is not None and problem != 'the file does not exist':
                raise RuntimeError(f'turbox: cannot load checkpoint {filename}: {problem}')
        return super().load_checkpoint(filename, *args, **kwargs)

    def resume(self, filename: str, *args, **kwargs) -> None:
        """mmengine's resume; with ``turbox.system.atomic_checkpoints`` a damaged checkpoint
        (or, on an automatic resume, a missing one) falls back to the newest whole checkpoint
        of its folder, with a warning naming both. With none left it raises, naming the
        file and the damage. Rank 0 reads and checks the files and decides for every rank
        (:func:`~turbox_mm.engine.checkpoint_io.decided_on_rank0`)."""
        if self.turbox_options['system']['atomic_checkpoints'] and is_local_path(filename):
            filename = decided_on_rank0(lambda: self._whole_checkpoint(filename))
            # checked whole (on rank 0): load_checkpoint need not read it all once more
            self._verified_checkpoint = filename
        try:
            return super().resume(filename, *args, **kwargs)
        finally:
            self._verified_checkpoint = None

    def _whole_checkpoint(self, filename: str) -> str:
        """``filename`` if it is whole, else the newest whole one to fall back on (see
        :meth:`resume`)."""
        problem = readable_checkpoint(filename)
        explicit_missing = problem == 'the file does not exist' and self._load_from
        if problem is None or explicit_missing:
            return filename
        folder = osp.dirname(filename) or self.work_dir
        # an explicit path falls back only to earlier checkpoints of its kind
        older = previous_checkpoints(folder, exclude=filename,
                                     before=filename if self._load_from else None,
                                     patterns=self._checkpoint_names())
        # the newest whole one: each check reads a whole file, so stop at the first
        whole = next((p for p in older if readable_checkpoint(p) is None), None)
        if whole is None:
            raise RuntimeError(f'turbox: cannot resume from {filename}: {problem}; '
                               f'{folder} holds no other whole checkpoint')
        print_log(f'turbox: cannot resume from {filename} ({problem}); resuming from '
                  f'{whole} instead', logger='current', level=logging.WARNING)
        return whole

    def train(self) -> nn.Module:
        """mmengine's training; on an error, process-wide state the hooks changed (automatic
        GC, the frozen heap) is restored before the error propagates, and a loader worker's
        death names the sample it was on (:mod:`turbox_mm.datasets.loader_watchdog`)."""
        with self._restored_on_error():
            return super().train()

    def val(self) -> dict:
        """mmengine's validation; restores process-wide state on an error (see :meth:`train`)."""
        with self._restored_on_error():
            return super().val()

    def test(self) -> dict:
        """mmengine's test; restores process-wide state on an error (see :meth:`train`)."""
        with self._restored_on_error():
            return super().test()

    @contextlib.contextmanager
    def _restored_on_error(self) -> Iterator[None]:
        try:
            yield
        except BaseException as error:
            self._restore_process_state()
            named = name_stuck_samples(error)  # a loader worker died during the step
            if named is not None:
                raise named from error
            raise

    def _restore_process_state(self) -> None:
        """Let the GC hook switch automatic collection back on and unfreeze the heap (its
        ``after_run``, which mmengine does not call when a loop raises), and the eager
        warm-up hook give back Dynamo's stance."""
        from turbox_mm.engine.hooks import EagerWarmupHook, GCHook
        for hook in self.hooks:
            if isinstance(hook, EagerWarmupHook):
                hook.restore()
            if isinstance(hook, GCHook):
                try:
                    hook.after_run(self)
                except Exception as error:  # noqa: BLE001 - the loop's error comes first
                    print_log(f'turbox: could not restore GC after the failure: {error!r}',
                              logger='current', level=logging.WARNING)

    @classmethod
    def from_cfg(cls, cfg: Config) -> 'TurboxRunner':
        """Build a runner from a config, applying its ``turbox`` section first.

        Args:
            cfg (Config | ConfigDict | dict): The full config, as for
                :meth:`mmengine.runner.Runner.from_cfg`.

        Returns:
            TurboxRunner: The runner.
        """
        cfg = copy.deepcopy(cfg)
        if not isinstance(cfg, Config):
            cfg = Config(dict(cfg) if isinstance(cfg, ConfigDict) else cfg)
        options = check_options(cfg.get('turbox'), TURBOX_OPTIONS)
        changes = []
        if options['system']['huge_pages']:
            # Before the model and dataset allocate: torch reads the setting once.
            changes.append(enable_huge_pages().message)
        changes += apply_turbox_options(cfg, options)
        runner = super().from_cfg(cfg)
        runner.turbox_changes = changes + runner.turbox_changes
        if options['report']:
            summary = '\n'.join(f'  {line}' for line in runner.turbox_changes) or \
                '  (nothing to change)'
            print_log(f'turbox_mm: config changes\n{summary}', logger=runner.logger)
        return runner


def _info_files(dataset_cfg) -> List[str]:
    """The ``ann_file`` of a dataset config and of the datasets it wraps (``dataset``,
    ``datasets``), joined with their ``data_root`` as mmengine's ``BaseDataset`` does."""
    from mmengine.fileio import join_path
    from mmengine.utils import is_abs
    found: List[str] = []
    if isinstance(dataset_cfg, (list, tuple)):
        for cfg in dataset_cfg:
            found += _info_files(cfg)
    elif isinstance(dataset_cfg, dict):
        ann_file, root = dataset_cfg.get('ann_file'), dataset_cfg.get('data_root')
        if isinstance(ann_file, str) and ann_file:
            found.append(join_path(root, ann_file) if root and not is_abs(ann_file)
                         else ann_file)
        found += _info_files(dataset_cfg.get('dataset'))
        found += _info_files(dataset_cfg.get('datasets'))
    return found


def _loading_dataset(exc: BaseException):
    """The innermost dataset (an object with a string ``ann_file``) on ``exc``'s traceback:
    the one whose loading failed, its ``ann_file`` already resolved."""
    tb, found = exc.__traceback__, None
    while tb is not None:
        owner = tb.tb_frame.f_locals.get('self')
        if isinstance(getattr(owner, 'ann_file', None), str) and owner.ann_file:
            found = owner
        tb = tb.tb_next
    return found


def _named_info_file_error(exc: BaseException, dataloader) -> Optional[Exception]:
    """A :class:`~turbox_mm.datasets.synthetic.InfoFileError` naming the info file whose
    unpickling raised ``exc`` while a loader's dataset was built; None where no info file
    can be named (``exc`` then propagates as it is)."""
    dataset = _loading_dataset(exc)
    if dataset is not None:
        files, owner = [dataset.ann_file], type(dataset).__name__
    else:
        cfg = dataloader.get('dataset') if isinstance(dataloader, dict) else None
        files = list(dict.fromkeys(_info_files(cfg)))
        owner = cfg.get('type', 'dataset') if isinstance(cfg, dict) else 'dataset'
    if not files:
        return None
    from turbox_mm.datasets.synthetic import InfoFileError
    which = files[0] if len(files) == 1 else 'one of ' + ', '.join(files)
    return InfoFileError(
        f'turbox: cannot read the info file {which} ({owner}): '
        f'{type(exc).__name__}: {exc}. The file is damaged, e.g. truncated by an '
        'interrupted write. Check it with `python tools/create_data.py check '
        f'{" ".join(files)}`, and regenerate it if the check fails.')
