"""The table of the ``turbox`` config section: every option, its default, its types and what it
does. :class:`~turbox_mm.engine.runner.TurboxRunner` and ``tools/train.py`` validate a config's
section against it (``check_options``); :mod:`.turbox_options` applies the validated section.
"""
from turbox_mm.utils.options import Option, Schema

TURBOX_OPTIONS: Schema = {
    'report': Option(True, (bool,), 'log the options in effect and what they changed'),
    'dataloader': {
        'pin_memory': Option(
            True, (bool,),
            'page-locked batches, so host-to-device copies can run asynchronously; '
            'skipped with a warning where no CUDA device is present'),
        'persistent_workers': Option(
            True, (bool,),
            'keep loader workers alive between epochs instead of restarting them; '
            'only where num_workers > 0'),
        'prefetch_factor': Option(
            None, (int, type(None)),
            'batches each worker prepares ahead; None keeps the loader\'s setting; '
            'only where num_workers > 0'),
        'timeout': Option(
            600, (int, float, type(None)),
            'seconds the main process waits for one batch before it fails, naming the '
            'sample each worker is on (a dead worker is named too); where num_workers > 0 '
            "and the loader sets no timeout of its own; None waits forever (torch's default)"),
    },
    'loop': {
        'pipelined': Option(
            True, (bool,),
            "replace mmengine's epoch- or iteration-based train loop by its pipelined twin: "
            'the next batch is copied to the GPU on a side stream during the current step'),
        'preprocess_ahead': Option(
            True, (bool,), 'also run the data preprocessor for the next batch ahead'),
        'cyclic_loader': Option(
            True, (bool,),
            'one loader iterator for the whole run (turbox_mm.CyclicBatchSampler around '
            "the config's sampler): no pipeline drain or restart between epochs; only with "
            'the pipelined loop and persistent loader workers'),
    },
    'optim': {
        'fused': Option(
            True, (bool,),
            "torch's fused Adam/AdamW/SGD kernels (turbox_mm.TurboxOptimWrapperConstructor); "
            'paramwise_cfg is kept; Adam/AdamW update in one launch per distinct set of '
            'hyper-parameters; other optimizers are left as configured'),
        'sync_free_clip': Option(
            True, (bool,),
            'gradient clipping without a host sync; the norm reaches the log asynchronously '
            '(turbox_mm.TurboxOptimWrapper / TurboxAmpOptimWrapper)'),
    },
    'ema': {
        'graph': Option(
            True, (bool,),
            "an EMAHook of custom_hooks with ExponentialMovingAverage becomes "
            'turbox_mm.TurboxEMAHook: the same weights, the update replayed as one CUDA graph'),
    },
    'sync_bn': Option(
        True, (bool,),
        'in distributed runs, SyncBN layers (and every BN when cfg.sync_bn is set) become '
        'turbox_mm.TurboxSyncBatchNorm: one packed collective per pass, no host syncs'),
    'system': {
        'cpu_affinity': Option(
            True, (bool,),
            'pin the main process and each loader worker to disjoint cores per local rank '
            '(turbox_mm.CPUAffinityHook); only where CUDA is present: CPU training keeps every '
            'core'),
        'gc': Option(
            True, (bool,),
            'freeze the heap built before training, automatic GC off, a full collection every '
            '`gc_interval` iterations on all ranks at once, early if memory grows '
            '(turbox_mm.GCHook)'),
        'gc_interval': Option(100, (int,), 'iterations between scheduled collections'),
        'huge_pages': Option(
            True, (bool,),
            "transparent huge pages for torch's large CPU buffers (THP_MEM_ALLOC_ENABLE), "
            'where the kernel offers them; set before the model is built'),
        'async_log': Option(
            True, (bool,),
            'losses and other training outputs reach the message hub without a host sync per '
            'iteration (turbox_mm.TurboxRuntimeInfoHook in place of mmengine\'s '
            'RuntimeInfoHook); every value arrives before the logger reads it, one wait per '
            'logging interval'),
        'atomic_checkpoints': Option(
            True, (bool,),
            'checkpoints and last_checkpoint written to a temporary file, fsync-ed and renamed '
            '(never a truncated file under the real name); mmengine\'s CheckpointHook becomes '
            'turbox_mm.TurboxCheckpointHook, which deletes outdated checkpoints only after the '
            'new one is saved; a resume from a damaged or missing newest checkpoint falls back '
            'to the newest whole one, with a warning naming both'),
    },
    'precision': {
        'tf32': Option(
            True, (bool,), 'float32 matmuls and convolutions on TF32 tensor cores '
            '(env_cfg.allow_tf32)'),
        'cudnn_benchmark': Option(
            True, (bool,), 'let cuDNN pick the fastest convolution algorithm per input shape '
            '(env_cfg.cudnn_benchmark); slower for inputs whose shape changes every step'),
    },
    'compile': {
        'enable': Option(True, (bool,), 'torch.compile chosen submodules (on first use)'),
        'modules': Option(
            'auto', (str, list, tuple),
            "dotted submodule paths, or 'auto' for those of backbone, neck, img_backbone, "
            'img_neck, pts_backbone, pts_neck the model has, plus the static parts its heads '
            "declare (turbox_compile_submodules; Sparse4D's head: anchor_encoder, layers.*, "
            "loss_reg; SparseDrive's motion-planning head: layers.*; MapTR's heads: "
            "decoder.layers.*; MapTR v1's perception transformer: encoder); torch's single layers "
            'stay eager'),
        'backend': Option('inductor', (str,), 'torch.compile backend'),
        'mode': Option(None, (str, type(None)), 'torch.compile mode',
                       choices=(None, 'default', 'reduce-overhead', 'max-autotune',
                                'max-autotune-no-cudagraphs')),
        'dynamic': Option(None, (bool, type(None)),
                          'torch.compile dynamic shapes (None: decided by torch)'),
        'fullgraph': Option(False, (bool,), 'fail instead of breaking the graph'),
        'options': Option(
            {}, (dict,), "Inductor settings for torch.compile(options=...), e.g. "
            "dict(combo_kernels=True) or {'triton.cudagraphs': True}; empty: none. Not with "
            'mode (torch takes one or the other)'),
        'recompile_limit': Option(
            16, (int, type(None)), "Dynamo's recompile limit per code object (torch's default "
            '8; None keeps it): a head compiled layer by layer calls one forward with several '
            "shapes (SparseDrive's attention: detection, map and motion-planning queries), and "
            'past the limit the next shape runs eagerly'),
        'eager_iters': Option(
            1, (int,), 'first training iterations run eagerly (turbox_mm.EagerWarmupHook): a '
            "temporal model's first iteration, with empty instance caches, has shapes no later "
            'one has, so compiling it is wasted warm-up'),
        'on_cpu': Option(False, (bool,),
                         'compile also where no CUDA device is present (slow to compile, '
                         'rarely worth it for CPU training)'),
    },
    'ops': {
        'fast': Option(
            True, (bool,),
            "modules with an op_impl choice run turbox_mm's kernels (op_impl='turbox'): "
            'the Triton deformable aggregation of Sparse4D; and, on the built model, the '
            'loss terms summed in one reduction, mmcv MultiheadAttention without the '
            'attention weights it discards (float32 training on CUDA over long key '
            "sequences on torch's math backend), and in-place activations right after "
            'nn.Linear made out of place (turbox_mm.engine.runner.fast_model)'),
    },
    'data': {
        'fast_pipeline': Option(
            True, (bool,),
            'the stock multi-view image pipeline becomes its turbox twin: libjpeg-turbo '
            'scaled decoding and one affine warp per image in the workers (uint8), '
            'photometric distortion and normalisation on the GPU '
            "(turbox_mm.TurboxDet3DDataPreprocessor); MapTR's LoadMapGT(impl='reference') "
            "reads the polylines precomputed by tools/create_data.py map-gt "
            "(impl='precomputed', the reference where the infos lack them)"),
        'gpu_decode': Option(
            False, (bool,),
            'with fast_pipeline: the workers pass the JPEG bytes and nvJPEG decodes on the GPU '
            '(turbox_mm.PackJpegBytes)'),
        'point_loaders': Option(
            True, (bool,),
            "mmdet3d's LoadPointsFromFile / LoadPointsFromMultiSweeps become "
            'turbox_mm.LoadPointsFromFileChecked / LoadPointsFromMultiSweepsFast in every '
            'pipeline: the same points, one buffer for the sweeps, a missing or cut file '
            'named in the error'),
    },
    'env': {
        'mp_start_method': Option(
            'fork', (str,), 'start method of loader worker processes (env_cfg.mp_cfg)',
            choices=('fork', 'spawn', 'forkserver')),
        'opencv_num_threads': Option(
            0, (int,), 'OpenCV threads per process; 0 stops OpenCV from competing with '
            'loader workers for cores (env_cfg.mp_cfg)'),
    },
}
