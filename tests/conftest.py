"""Shared pytest setup: the `cuda` marker skips where no CUDA device is present."""
import contextlib
import glob
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Every turbox twin config we ship (tiny and full size), relative to ROOT.
TURBOX_CONFIGS = sorted(os.path.relpath(p, ROOT)
                        for p in glob.glob(os.path.join(ROOT, 'configs', '*', '*_turbox.py')))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA device')
    for item in items:
        if 'cuda' in item.keywords:
            item.add_marker(skip)


def compile_for_sm90_in_subprocess(script_text, tmp_path):
    """Run a script that compiles Triton kernels for sm_90 (no GPU needed) outside the
    interpreter; skip where Triton has no ptxas, fail with the script's report otherwise.

    The interpreter runs Python, not Triton's compiler: a kernel can pass every CPU test and
    still fail to compile for the GPU.
    """
    import pytest
    pytest.importorskip('triton.backends.nvidia')
    script = tmp_path / 'compile_kernels.py'
    script.write_text(script_text)
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    env['PYTHONPATH'] = ROOT
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=900)
    if 'ptxas' in proc.stderr and 'not found' in proc.stderr:
        pytest.skip('Triton has no ptxas here')
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


def run_python(args, cwd=ROOT, env=None, timeout=600):
    """Run ``python ARGS`` in a fresh process; return the completed process.

    A fresh process gives each training run its own mmengine global state (message hub,
    visualizer, default scope), as a user's command line would.
    """
    full_env = dict(os.environ)
    full_env['PYTHONPATH'] = ROOT + os.pathsep + full_env.get('PYTHONPATH', '')
    full_env.setdefault('PYTHONWARNINGS', 'ignore')
    if env:
        full_env.update(env)
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    return proc


def make_tiny_synthetic(root, frames=3, sweeps=3, scenes=1, points=1500):
    """Write a tiny synthetic nuScenes (one scene of 320x180 images and 1500-point sweeps by
    default, every scene in the train split) with the CLI."""
    proc = run_python(['tools/create_data.py', 'synthetic', '--out', str(root), '--scenes',
                       str(scenes), '--frames', str(frames), '--image-size', '320x180',
                       '--points', str(points),
                       '--sweeps', str(sweeps), '--val-scenes', '0', '--workers', '1',
                       '--no-progress'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def make_sparse4d_tiny(root) -> str:
    """The tiny configs' data: 2 train scenes and 1 val scene of 6 frames, 320x180 images,
    and 32 k-means anchors."""
    root = str(root)
    proc = run_python(['tools/create_data.py', 'synthetic', '--out', root, '--scenes', '3',
                       '--frames', '6', '--image-size', '320x180', '--points', '4000',
                       '--sweeps', '0', '--val-scenes', '1', '--workers', '1', '--no-progress'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_python(['tools/sparse4d_anchors.py', f'{root}/nuscenes_infos_train.pkl', '--out',
                       f'{root}/nuscenes_kmeans900.npy', '--num', '32'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root + '/'


def make_sparsedrive_tiny(root) -> str:
    """The tiny SparseDrive configs' data: Sparse4D's tiny dataset (2 train scenes and 1 val
    scene of 6 frames) with SparseDrive's k-means anchors, 32 for detection and 8 for the
    map, where the configs look for them."""
    root = make_sparse4d_tiny(root)
    for task, num in (('det', 32), ('map', 8)):
        proc = run_python(['tools/sparsedrive_anchors.py', task,
                           f'{root}nuscenes_infos_train.pkl', '--out',
                           f'{root}kmeans/kmeans_{task}_{100 if task == "map" else 900}.npy',
                           '--num', str(num)])
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def make_sparsedrive_stage2_tiny(root) -> str:
    """The tiny SparseDrive stage-2 configs' data: 2 train scenes and 1 val scene of 14 frames
    (complete 6 s agent futures need 13), 320x180 images, and the four k-means anchor files
    (motion and planning pooled over groups: a tiny set lacks complete futures of some
    classes and commands)."""
    root = str(root).rstrip('/') + '/'
    proc = run_python(['tools/create_data.py', 'synthetic', '--out', root, '--scenes', '3',
                       '--frames', '14', '--image-size', '320x180', '--points', '4000',
                       '--sweeps', '0', '--val-scenes', '1', '--workers', '1', '--no-progress'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for task, name, extra in (('det', 'kmeans_det_900', ['--num', '32']),
                              ('map', 'kmeans_map_100', ['--num', '8']),
                              ('motion', 'kmeans_motion_6', ['--short', 'pool']),
                              ('plan', 'kmeans_plan_6', ['--short', 'pool'])):
        proc = run_python(['tools/sparsedrive_anchors.py', task,
                           f'{root}nuscenes_infos_train.pkl', '--out',
                           f'{root}kmeans/{name}.npy', *extra])
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def make_maptr_tiny(root, points=1000, map_gt=False, map_classes=None) -> str:
    """The tiny MapTR configs' data: 2 train scenes and 1 val scene of 3 frames, 320x180
    images, keyframe points and the map expansion; with ``map_gt``, the map ground truth
    precomputed into the infos (``create_data.py map-gt``, what v2's configs read), for
    ``map_classes`` (default: map-gt's)."""
    root = str(root).rstrip('/') + '/'
    proc = run_python(['tools/create_data.py', 'synthetic', '--out', root, '--scenes', '3',
                       '--frames', '3', '--image-size', '320x180', '--points', str(points),
                       '--sweeps', '0', '--val-scenes', '1', '--workers', '1', '--no-progress'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    if map_gt:
        proc = run_python(['tools/create_data.py', 'map-gt', root + 'nuscenes_infos_train.pkl',
                           root + 'nuscenes_infos_val.pkl', '--data-root', root,
                           '--workers', '1', '--no-progress']
                          + (['--classes', *map_classes] if map_classes else []))
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def logged_losses(work_dir, key='loss'):
    """Per-iteration training losses (or another logged scalar, ``key``) of every run in
    ``work_dir`` (mmengine's scalars.json)."""
    import json
    losses = {}
    for stamp in sorted(os.listdir(work_dir)):
        path = os.path.join(work_dir, stamp, 'vis_data', 'scalars.json')
        if os.path.isfile(path):
            with open(path) as f:
                for line in f:
                    rec = json.loads(line)
                    if key in rec:
                        losses[rec['iter']] = rec[key]
    return losses


@pytest.fixture(scope='session')
def root():
    return ROOT


# Triton kernels run on the CPU through Triton's interpreter where there is no GPU; the
# variable must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')


# -- end-to-end model tests (Sparse4D, SparseDrive) -------------------------------------------

def config_with_root(path, root):
    """The config at ``path`` with ``$NUSCENES_ROOT`` set to ``root`` while it is read."""
    from mmengine.config import Config
    os.environ['NUSCENES_ROOT'] = root
    try:
        return Config.fromfile(path)
    finally:
        del os.environ['NUSCENES_ROOT']


def turbox_applied(cfg):
    """The config as TurboxRunner leaves it (the `turbox` section applied), and the changes."""
    import copy

    from turbox_mm.engine.runner.turbox_options import TURBOX_OPTIONS, apply_turbox_options
    from turbox_mm.utils.options import check_options
    cfg = copy.deepcopy(cfg)
    changes = apply_turbox_options(cfg, check_options(cfg.get('turbox'), TURBOX_OPTIONS))
    return cfg, changes


def build_model(cfg):
    """The config's model, built in mmdet3d's scope and initialised."""
    from mmengine.registry import DefaultScope

    from turbox_mm.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmdet3d'):
        model = MODELS.build(cfg.model)
    model.init_weights()
    return model


def train_batches(cfg, num):
    """``num`` training batches of the config's pipeline (the batch sampler's first walks, or
    the sampler's first indices in batches where the config has no batch sampler)."""
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import DefaultScope

    from turbox_mm.registry import DATA_SAMPLERS, DATASETS
    loader = cfg.train_dataloader
    with DefaultScope.overwrite_default_scope('mmdet3d'):
        dataset = DATASETS.build(loader.dataset)
        if loader.get('batch_sampler'):
            sampler = DATA_SAMPLERS.build(dict(loader.batch_sampler, dataset=dataset, seed=0,
                                               world_size=1, rank=0,
                                               batch_size=loader.batch_size))
            stream = iter(sampler)
        else:  # batches as mmengine's loader cuts them (drop_last False: a smaller last one)
            order = list(DATA_SAMPLERS.build(dict(loader.sampler, dataset=dataset, seed=0)))
            size = loader.batch_size
            stream = iter([order[i:i + size] for i in range(0, len(order), size)])
    batches = []
    for step in range(num):
        items = next(stream, None)
        if items is None:
            raise ValueError(f'train_batches: {num} batches asked, the sampler gave {step}')
        batches.append(pseudo_collate([dataset[item] for item in items]))
    return batches


def first_step(model, batch):
    """Losses (detached) and gradients of one training step of ``model`` on a preprocessed
    ``batch``, seeded (torch and numpy at 0) so that two models draw the same randomness."""
    import numpy as np
    torch.manual_seed(0)
    np.random.seed(0)
    model.train()
    model.zero_grad()
    losses = model.loss(batch['inputs'], batch['data_samples'])
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


@contextlib.contextmanager
def stacked_layer_losses_only():
    """Fail if a turbox Sparse4D-style head computes its losses a decoder layer at a time
    (``Sparse4DHeadLosses._loss_layer_by_layer``, the fallback) instead of all layers in one
    call of each loss: the configs we ship stack."""
    from turbox_mm.models.sparse4d.head_losses import Sparse4DHeadLosses

    def refuse(self, *args, **kwargs):
        raise AssertionError(f'{type(self).__name__} fell back to the per-layer losses')

    real = Sparse4DHeadLosses._loss_layer_by_layer
    Sparse4DHeadLosses._loss_layer_by_layer = refuse
    try:
        yield
    finally:
        Sparse4DHeadLosses._loss_layer_by_layer = real


@contextlib.contextmanager
def no_matrix_products():
    """Fail on ``matmul``, the ``@`` operator, ``bmm``, ``mm``, ``tensordot`` and ``einsum``
    inside the block (``F.linear``, a layer's product, is allowed): the turbox geometry
    computes its small products by float32 multiply-adds, which TF32 (allowed by
    ``_base_/turbox.py``) cannot round."""
    from unittest import mock

    def refuse(*args, **kwargs):
        raise AssertionError('a matrix product in a path that must not have one')

    with mock.patch.object(torch, 'matmul', side_effect=refuse), \
            mock.patch.object(torch.Tensor, 'matmul', refuse), \
            mock.patch.object(torch.Tensor, '__matmul__', refuse), \
            mock.patch.object(torch.Tensor, '__rmatmul__', refuse), \
            mock.patch.object(torch, 'bmm', side_effect=refuse), \
            mock.patch.object(torch.Tensor, 'bmm', refuse), \
            mock.patch.object(torch, 'mm', side_effect=refuse), \
            mock.patch.object(torch.Tensor, 'mm', refuse), \
            mock.patch.object(torch, 'tensordot', side_effect=refuse), \
            mock.patch.object(torch, 'einsum', side_effect=refuse):
        yield


def relative_grad_errors(grads, reference):
    """``||g - g_ref|| / ||g_ref||`` per parameter."""
    return {name: float((grads[name] - reference[name]).norm()
                        / reference[name].norm().clamp_min(1e-12)) for name in reference}


def assert_same_gradients(grads, reference, total=1e-2, each=5e-2):
    """Two models' gradients agree: over all parameters together within ``total`` (relative
    norm of the difference) and per tensor within ``each``.

    Why so loose by default: where the two runs' forward values differ by float32 rounding
    (another kernel, another summation order), a pre-activation within that rounding of a
    ReLU's kink, or a sampling point within it of a pixel boundary, takes the other one-sided
    derivative, and the gradients behind it move by far more than rounding
    (aggregation_calls.py has a measured case: 6% in one tensor, with the kernel exact on its
    own inputs). Even 5e-2 is then no guarantee. So Sparse4D's and SparseDrive stage 1's
    parity tests compare parameter gradients only between runs with the same forward values
    (the same network; targets and losses computed differently), with tight bounds, and
    check the kernel on its own calls. Where the forward values still differ by rounding (a
    compiled twin; SparseDrive stage 2's motion head), the risk remains, and these bounds
    stand on the seeded draws measured there. A wrong kernel or loss gives errors of order 1.
    """
    assert grads.keys() == reference.keys()
    diff = sum(float((grads[n] - reference[n]).pow(2).sum()) for n in reference) ** 0.5
    norm = sum(float(reference[n].pow(2).sum()) for n in reference) ** 0.5
    errors = relative_grad_errors(grads, reference)
    worst = sorted(errors.items(), key=lambda kv: -kv[1])[:8]
    assert diff <= total * max(norm, 1e-12), (diff, norm, worst)
    assert max(errors.values()) < each, sorted(errors.items(), key=lambda kv: -kv[1])[:5]


def twin_agrees(cfg, change, steps: int = 3, rtol: float = 1e-5, atol: float = 1e-6,
                grad_check=None, eager_steps: int = 0, device: str = 'cpu',
                mark_steps: bool = False):
    """Train ``steps`` steps (temporal frames: the instance caches fill) of the config's model
    and of a copy that ``change(copy)`` altered, each on its own state, and check that both
    give the same losses and gradients at every step: ``grad_check(copy's, original's)``, by
    default each tensor within rtol 1e-4, atol 1e-5. Dropout and drop-path are switched off in
    both (a compiled graph draws its random numbers in another order). The copy's first
    ``eager_steps`` steps run with Dynamo's ``force_eager`` stance (as
    ``turbox.compile.eager_iters`` runs them). Both models live on
    ``device``; with ``mark_steps`` each step starts with
    ``torch.compiler.cudagraph_mark_step_begin()`` (as ``turbox_mm.CudaGraphStepHook`` does).
    After the last step the saved buffers (running statistics) must agree too, within the
    losses' tolerances (at least rtol 1e-4, atol 1e-5). Returns the changed copy."""
    import copy

    import numpy as np
    import torch
    torch.manual_seed(0)
    first = build_model(cfg).to(device)
    for module in first.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ('dropout', 'attn_drop', 'drop_prob'):  # float rates (DropPath's too)
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    second = copy.deepcopy(first)
    change(second)
    for step, data in enumerate(train_batches(cfg, steps)):
        results = []
        for model in (first, second):
            torch.manual_seed(step)
            np.random.seed(step)
            model.train()
            model.zero_grad()
            eager = model is second and step < eager_steps
            if mark_steps:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.compiler.set_stance('force_eager' if eager else 'default'):
                batch = model.data_preprocessor(copy.deepcopy(data), training=True)
                losses = model.loss(batch['inputs'], batch['data_samples'])
                sum(v for k, v in losses.items() if 'loss' in k).backward()
            grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            results.append(({k: v.detach() for k, v in losses.items()}, grads))
        (losses, grads), (c_losses, c_grads) = results
        assert losses.keys() == c_losses.keys()
        for key in losses:
            torch.testing.assert_close(c_losses[key], losses[key], rtol=rtol, atol=atol,
                                       msg=f'step {step}: {key}')
        assert grads.keys() == c_grads.keys()
        if grad_check is not None:
            grad_check(c_grads, grads)
            continue
        for key in grads:
            torch.testing.assert_close(c_grads[key], grads[key], rtol=1e-4, atol=1e-5,
                                       msg=f'step {step}: {key}')
    # the saved buffers after the last step (batch norms' running statistics and counts),
    # which training-mode outputs and gradients do not show
    saved = first.state_dict(keep_vars=True)
    buffers = {n: b for n, b in first.named_buffers() if n in saved}
    c_buffers = {n: b for n, b in second.named_buffers() if n in saved}
    assert buffers.keys() == c_buffers.keys()
    for key in buffers:
        torch.testing.assert_close(c_buffers[key], buffers[key], rtol=max(rtol, 1e-4),
                                   atol=max(atol, 1e-5), msg=f'buffer {key}')
    return second


def compiled_twin_agrees(cfg, steps: int = 3, grad_check=None, modules='auto',
                         backend: str = 'aot_eager', device: str = 'cpu', **twin_kwargs):
    """:func:`twin_agrees` with the copy compiled as ``turbox.compile`` compiles it by default
    (``modules``, default ``'auto'``, the first step eager, its recompile limit; Dynamo with the
    ``aot_eager`` backend by default: Dynamo's and AOTAutograd's tracing, no code generation);
    also checks that every frame Dynamo met was compiled (none ran eagerly after an error or
    past the recompile limit) and that no graph broke. ``twin_kwargs`` go to
    ``compile_submodules`` where they are ``torch.compile`` arguments (``mode``, ``dynamic``,
    ``options``, ``fullgraph``) and to :func:`twin_agrees` otherwise. Returns the compiled
    paths and Dynamo's frame counters."""
    import torch
    from torch._dynamo.utils import counters

    from turbox_mm.engine.runner.module_compiler import compile_submodules
    from turbox_mm.engine.runner.turbox_options import TURBOX_OPTIONS
    defaults = TURBOX_OPTIONS['compile']
    names = []
    compile_kwargs = {k: twin_kwargs.pop(k) for k in ('mode', 'dynamic', 'options', 'fullgraph')
                      if k in twin_kwargs}

    def compile_auto(model):
        torch._dynamo.reset()
        counters.clear()
        keys = list(model.state_dict())
        names.extend(compile_submodules(model, modules, backend=backend, **compile_kwargs))
        assert list(model.state_dict()) == keys

    with torch._dynamo.config.patch(recompile_limit=defaults['recompile_limit'].default):
        twin_agrees(cfg, compile_auto, steps, grad_check=grad_check,
                    eager_steps=defaults['eager_iters'].default, device=device, **twin_kwargs)
    frames = dict(counters['frames'])
    assert frames['total'] == frames['ok'] > 0, frames
    assert not counters['graph_break'], dict(counters['graph_break'])
    return names, frames


@pytest.fixture
def full_fp32():
    """Full float32 matmuls meanwhile: an earlier in-process run may have left torch's matmul
    precision lowered (TurboxRunner's TF32 policy), which on CPUs with bf16 units changes the
    arithmetic of a comparison."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision('highest')
    yield
    torch.set_float32_matmul_precision(saved)


def current_log_records():
    """``(logger, handler, records)``: the records mmengine's current logger emits from now
    on are appended to ``records`` (remove ``handler`` from ``logger`` when done)."""
    import logging

    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    return logger, handler, records
