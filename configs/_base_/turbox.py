# The one file to inherit to switch turbox_mm on. A turbox config is its stock twin plus this:
#
#     _base_ = ['./model_stock.py', '../_base_/turbox.py']
#
# mmengine refuses keys defined by two bases, so this file sets only keys that stock configs
# leave alone: `runner_type` and `turbox`. It sets no `custom_imports`, so it also combines
# with bases that have their own (mmdet3d's `projects/*` configs): mmengine's registry
# imports turbox_mm by itself when it looks up the `turbox_mm.`-prefixed `runner_type`, before
# the runner exists (turbox_mm's compatibility fixes apply from then on).
# A `turbox_mm::_base_/turbox.py` path resolves only where turbox_mm is imported before the
# config is read (tools/train.py and tools/test.py here do; a relative or absolute path to
# this file works everywhere).

# Validates and applies the `turbox` section below, then runs as mmengine's Runner does.
runner_type = 'turbox_mm.TurboxRunner'

# Every key is checked: an unknown one fails with the list of valid keys. The defaults are
# shown; a model config overrides any of them with `turbox = dict(...)`.
turbox = dict(
    # Log the options in effect and each change they made to the config.
    report=True,
    # Loader settings that are safe for every model: pinned batches (where CUDA is present),
    # workers that survive epoch boundaries, optional deeper prefetch, and a watchdog: a
    # batch that takes over `timeout` seconds, or a worker that dies, fails naming the sample.
    dataloader=dict(pin_memory=True, persistent_workers=True, prefetch_factor=None,
                    timeout=600),
    # Worker start method and OpenCV threads (written into env_cfg.mp_cfg).
    env=dict(mp_start_method='fork', opencv_num_threads=0),
    # The pipelined twin of the config's train loop: the next batch is copied and
    # preprocessed on a side CUDA stream during the current step; one loader iterator for
    # the whole run (turbox_mm.CyclicBatchSampler), so epochs never drain the pipeline.
    loop=dict(pipelined=True, preprocess_ahead=True, cyclic_loader=True),
    # Fused optimizer kernels (paramwise_cfg kept) and gradient clipping without host syncs.
    optim=dict(fused=True, sync_free_clip=True),
    # An EMAHook(ExponentialMovingAverage) in custom_hooks updates through one CUDA graph.
    ema=dict(graph=True),
    # Distributed runs: SyncBN (and every BN under --sync_bn) exchanges its statistics in one
    # packed collective without host syncs.
    sync_bn=True,
    # Host side: cores pinned per rank and worker (with CUDA), GC frozen and scheduled on
    # every rank at once, huge pages for large CPU buffers, training outputs logged without
    # a host sync per iteration.
    system=dict(cpu_affinity=True, gc=True, gc_interval=100, huge_pages=True, async_log=True),
    # TF32 matmuls/convolutions and cuDNN autotuning (env_cfg.allow_tf32, cudnn_benchmark).
    precision=dict(tf32=True, cudnn_benchmark=True),
    # Fast ops: modules with an op_impl choice run turbox_mm's kernels (Sparse4D's deformable
    # aggregation in Triton); on the built model, the losses summed in one reduction,
    # mmcv's MultiheadAttention through scaled_dot_product_attention (no discarded weights)
    # and in-place activations after nn.Linear made out of place (no in-place write to a view).
    ops=dict(fast=True),
    # The camera pipeline's turbox twin: libjpeg-turbo scaled decoding and one affine warp per
    # image in the workers, uint8 to the GPU, photometric distortion and normalisation there
    # (gpu_decode: the workers pass JPEG bytes, nvJPEG decodes). MapTR's map ground truth is
    # read precomputed from the infos (tools/create_data.py map-gt) where they carry it.
    # (point_loaders: mmdet3d's lidar loaders -> turbox twins, same points, files named on
    # error.)
    data=dict(fast_pipeline=True, gpu_decode=False, point_loaders=True),
    # torch.compile of the static, heavy submodules; falls back to eager with a warning.
    compile=dict(enable=True, modules='auto', backend='inductor', mode=None, dynamic=None,
                 fullgraph=False, on_cpu=False),
)
