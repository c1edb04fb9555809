"""The tiny lidar-only BEVFusion, stock against turbox: the same first step.

Both runners are built and trained for one iteration as ``tools/train.py CONFIG --cfg-options
randomness.seed=0`` does (``build_runner``; the turbox one applies its ``turbox`` section:
``op_impl='turbox'`` on the detector and the head, the point-loader twins, fused AdamW, the
pipelined loop, ...), on the CPU in float32.

Why the seed: the configs set none (nor does upstream), so mmengine draws a new one per run,
and two unseeded runs start from other weights and other augmentations. Their first losses
then differ as much as those of two stock runs do (the tiny stock config's first logged loss
over seeds 0-3 on this data: 35.1, 13.9, 16.4, 20.9); with one seed, stock and turbox log the
same first loss.

Only the first step is compared: from the second on, turbox's fused AdamW (torch's fused
kernel, the stock config's for-loop AdamW rounds otherwise) moves the runs apart by rounding
(the second logged grad_norm: 174.1130 against 174.1057; stock with
``optim_wrapper.optimizer.fused=True`` logs turbox's numbers).
"""
import os
import os.path as osp
from unittest import mock

import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook

from conftest import ROOT, run_python

STOCK = osp.join(ROOT, 'configs/bevfusion/bevfusion_lidar_tiny_stock.py')
TURBOX = osp.join(ROOT, 'configs/bevfusion/bevfusion_lidar_tiny_turbox.py')
LOSS_KEYS = ('loss', 'loss_heatmap', 'layer_-1_loss_cls', 'layer_-1_loss_bbox')
# Relative tolerance of losses and gradients. Measured on this CPU: the losses and every
# gradient equal to the last bit (matched_ious, logged only, within 1e-7). The turbox runs keep
# mmcv's explicit attention (`exact_attention` below): turbox.ops.fast's
# scaled_dot_product_attention (fast_model.py, tested against it in test_fast_model.py) moves
# one gradient here by 2.0e-4 (decoder.0.norms.2.bias, a sum with cancellation) through
# rounding alone, which would hide a real regression of that size elsewhere.
RTOL = 1e-4


@pytest.fixture(scope='module')
def tiny_lidar(tmp_path_factory):
    """2 train scenes of 3 frames, 2 sweeps of 16000 points (the train split of
    tests/test_bevfusion_configs.py's data): every class is in the GT database with enough
    points for ObjectSample's filters (with 4000 points some class is not, and ObjectSample
    fails)."""
    root = str(tmp_path_factory.mktemp('bevfusion_parity') / 'nuscenes') + '/'
    proc = run_python(['tools/create_data.py', 'synthetic', '--out', root, '--scenes', '2',
                       '--frames', '3', '--image-size', '320x180', '--points', '16000',
                       '--sweeps', '2', '--val-scenes', '0', '--workers', '1', '--no-progress'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


class FirstStep(Hook):
    """Records what the first training iteration starts from (weights, batch, the state of
    torch's generator, which the head's dropout draws from) and what it computes: the losses,
    the gradients (before clipping) and the logged gradient norm."""

    priority = 'LOWEST'  # after the runtime-info hook has put grad_norm into the message hub

    def __init__(self):
        self.weights = self.batch = self.rng = None
        self.losses = self.grads = self.grad_norm = None

    def before_train(self, runner):
        wrapper = runner.optim_wrapper
        backward = wrapper.backward

        def recording_backward(loss, **kwargs):
            backward(loss, **kwargs)
            if self.grads is None:
                self.grads = _grads(runner.model)

        wrapper.backward = recording_backward

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if batch_idx == 0:
            self.weights = {k: v.clone() for k, v in runner.model.state_dict().items()}
            self.batch = data_batch
            self.rng = torch.get_rng_state()

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if batch_idx == 0:
            self.losses = {k: float(v) for k, v in outputs.items()}
            self.grad_norm = float(runner.message_hub.get_scalar('train/grad_norm').current())


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _train_first_step(path, root, work_dir):
    """``tools/train.py CONFIG --cfg-options randomness.seed=0 train_cfg.max_iters=1`` (no
    validation, no checkpoint), recording the step; returns ``(runner, FirstStep)``."""
    from turbox_mm.engine.runner import build_runner
    os.environ['NUSCENES_ROOT'] = root
    try:
        cfg = Config.fromfile(path)
    finally:
        del os.environ['NUSCENES_ROOT']
    cfg.launcher = 'none'
    cfg.work_dir = str(work_dir)
    cfg.randomness = dict(seed=0)
    cfg.train_cfg.max_iters = 1
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.default_hooks.checkpoint = None
    runner = build_runner(cfg)
    step = FirstStep()
    runner.register_hook(step)
    runner.train()
    return runner, step


@pytest.fixture(scope='module')
def full_fp32():
    """Full float32 matmuls meanwhile: an earlier in-process run may have lowered torch's
    matmul precision, which on CPUs with bf16 units changes the arithmetic of the comparison."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision('highest')
    yield
    torch.set_float32_matmul_precision(saved)


@pytest.fixture(scope='module')
def exact_attention():
    """The turbox runs without fast_model's attention change (see RTOL): everything else of
    turbox.ops.fast stays on."""
    from turbox_mm.engine.runner import fast_model
    with mock.patch.object(fast_model, 'weightless_attention', lambda model: 0):
        yield


@pytest.fixture(scope='module')
def first_steps(tiny_lidar, tmp_path_factory, full_fp32, exact_attention):
    """The first training step of the stock and the turbox tiny config, one after the other in
    this process (each runner seeds the global generators when it is built)."""
    from turbox_mm.engine.runner import TurboxRunner
    work = tmp_path_factory.mktemp('bevfusion_parity_runs')
    stock = _train_first_step(STOCK, tiny_lidar, work / 'stock')
    turbox = _train_first_step(TURBOX, tiny_lidar, work / 'turbox')
    assert type(stock[0]) is not TurboxRunner and isinstance(turbox[0], TurboxRunner)
    # the turbox paths are the ones under test
    assert (stock[0].model.op_impl, stock[0].model.bbox_head.op_impl) == ('stock', 'stock')
    assert (turbox[0].model.op_impl, turbox[0].model.bbox_head.op_impl) == ('turbox', 'turbox')
    return stock, turbox


def _norm_invariant_params(model):
    """The biases whose exact gradient is zero because a BatchNorm in training mode directly
    follows their convolution or linear layer in an ``nn.Sequential`` (BEVFusion's
    ``dtransform`` and ``depthnet``): the norm subtracts each channel's batch mean, so a
    per-channel shift does not change its output, and the computed gradient is rounding
    alone. (A weight is not invariant: the norm's eps keeps a dependence on its scale.)"""
    from torch.nn.modules.batchnorm import _BatchNorm
    layers = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)
    names = set()
    for prefix, module in model.named_modules():
        if not isinstance(module, torch.nn.Sequential):
            continue
        children = list(module.named_children())
        for (name, layer), (_, after) in zip(children, children[1:]):
            if (isinstance(layer, layers) and isinstance(after, _BatchNorm) and after.training
                    and layer.bias is not None and layer.bias.requires_grad):
                names.add(f'{prefix}.{name}.bias' if prefix else f'{name}.bias')
    return names


def _assert_same_losses_and_gradients(losses, grads, reference, rtol=RTOL, floor=1e-6,
                                      zero=()):
    """Every loss term within ``rtol``; every gradient within ``rtol`` relative error per
    tensor, ``||g - g_ref|| / max(||g_ref||, floor ||g_ref||_all)``. The floor is for the
    gradients that are zero but for rounding (biases followed by a norm layer: about 1e-8
    here, against 1e-2 and more for every other tensor), whose relative error says nothing.
    The tensors named in ``zero`` are zero by construction (``_norm_invariant_params``): both
    runs' must be below ``1e-6 ||g_ref||_all``, and their rounding is not compared."""
    assert set(LOSS_KEYS) <= set(reference.losses)
    assert losses.keys() == reference.losses.keys()
    for key, value in reference.losses.items():
        assert losses[key] == pytest.approx(value, rel=rtol, abs=1e-6), key
    assert grads.keys() == reference.grads.keys()
    total = float(torch.stack([g.norm() for g in reference.grads.values()]).norm())
    assert set(zero) <= grads.keys(), sorted(set(zero) - grads.keys())
    for name in zero:
        assert float(grads[name].norm()) < 1e-6 * total, (name, float(grads[name].norm()))
        assert float(reference.grads[name].norm()) < 1e-6 * total, name
    floor = floor * total
    errors = {name: float((grads[name] - ref).norm()) / max(float(ref.norm()), floor)
              for name, ref in reference.grads.items() if name not in zero}
    assert max(errors.values()) < rtol, sorted(errors.items(), key=lambda kv: -kv[1])[:5]


def test_seeded_runs_start_alike_and_log_the_same_first_step(first_steps):
    """One seed: the turbox run starts from the stock run's weights and batch (the turbox
    options build nothing that draws from the generators before the model, the point-loader
    twins and the pipelined loop draw in stock's order) and logs the same first losses and
    gradient norm."""
    (_, stock), (_, turbox) = first_steps
    assert stock.weights.keys() == turbox.weights.keys()
    for key, value in stock.weights.items():
        assert torch.equal(value, turbox.weights[key]), key
    for a, b in zip(stock.batch['inputs']['points'], turbox.batch['inputs']['points'],
                    strict=True):
        assert torch.equal(a, b)
    for a, b in zip(stock.batch['data_samples'], turbox.batch['data_samples'], strict=True):
        assert torch.equal(a.gt_instances_3d.bboxes_3d.tensor, b.gt_instances_3d.bboxes_3d.tensor)
        assert torch.equal(a.gt_instances_3d.labels_3d, b.gt_instances_3d.labels_3d)
    assert torch.equal(stock.rng, turbox.rng)
    _assert_same_losses_and_gradients(turbox.losses, turbox.grads, stock)
    assert turbox.grad_norm == pytest.approx(stock.grad_norm, rel=RTOL)


def test_turbox_model_computes_the_stock_losses_and_gradients(first_steps):
    """The maths alone, whatever the draw order: the turbox model, given the stock run's
    initial weights, first batch and generator state, computes the stock run's losses and
    gradients (turbox: one batched voxelization, the head's batched targets, host-free loss
    normalisers)."""
    (_, stock), (turbox_runner, _) = first_steps
    model = turbox_runner.model
    model.load_state_dict(stock.weights)
    model.train()
    model.zero_grad(set_to_none=True)
    torch.set_rng_state(stock.rng)
    data = model.data_preprocessor(stock.batch, True)
    total, log_vars = model.parse_losses(model(**data, mode='loss'))
    total.backward()
    _assert_same_losses_and_gradients({k: float(v) for k, v in log_vars.items()}, _grads(model),
                                      stock)


# ---------------------------------------------------------------- camera + lidar

CAM_STOCK = osp.join(ROOT, 'configs/bevfusion/bevfusion_lidar-cam_tiny_stock.py')
CAM_TURBOX = osp.join(ROOT, 'configs/bevfusion/bevfusion_lidar-cam_tiny_turbox.py')


@pytest.fixture(scope='module')
def camera_first_steps(tmp_path_factory, full_fp32, exact_attention):
    """The tiny camera + lidar configs' first steps (the data of
    tests/test_bevfusion_lidar_cam_configs.py: no GT-paste, so 1500-point sweeps do)."""
    root = str(tmp_path_factory.mktemp('bevfusion_cam_parity') / 'nuscenes') + '/'
    proc = run_python(['tools/create_data.py', 'synthetic', '--out', root, '--scenes', '2',
                       '--frames', '3', '--image-size', '320x180', '--points', '1500',
                       '--sweeps', '2', '--val-scenes', '0', '--workers', '1', '--no-progress'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = tmp_path_factory.mktemp('bevfusion_cam_parity_runs')
    return (_train_first_step(CAM_STOCK, root, work / 'stock'),
            _train_first_step(CAM_TURBOX, root, work / 'turbox'))


def test_camera_configs_start_from_the_same_weights_and_compute_the_same_step(
        camera_first_steps):
    """One seed, the same initial weights (the Swin backbone initialises at the runner's
    ``init_weights``, after the train loop is built: the pipelined loop must leave torch's
    generator where mmengine's loop does), and the turbox model (batched depth image,
    ``bev_pool``, batched targets) computes the stock losses and gradients on the stock batch.
    The batches themselves differ by interpolation (``ImageAug3DTurbo``'s one warp)."""
    (_, stock), (turbox_runner, turbox) = camera_first_steps
    view = turbox_runner.model.view_transform
    assert (view.op_impl, view.bev_pool_impl) == ('turbox', 'turbox')
    for key, value in stock.weights.items():
        assert torch.equal(value, turbox.weights[key]), key
    model = turbox_runner.model
    model.load_state_dict(stock.weights)
    model.train()
    model.zero_grad(set_to_none=True)
    torch.set_rng_state(stock.rng)
    data = model.data_preprocessor(stock.batch, True)
    total, log_vars = model.parse_losses(model(**data, mode='loss'))
    total.backward()
    # The pooling sums in another order (bev_pool against an index_add), so the gradients of
    # the biases that a BatchNorm follows (zero but for rounding) differ in their rounding
    # (measured up to 5.7e-6 against a whole gradient's norm of 423, and machine-dependent):
    # they are checked as zeros, not compared.
    # The floor stays at 1e-4 of the whole gradient's norm for the small genuine gradients
    # (the Swin output norms' biases: 4e-4 relative error under a 1e-6 floor).
    zero = _norm_invariant_params(model)
    assert {'view_transform.dtransform.0.bias', 'view_transform.dtransform.3.bias',
            'view_transform.depthnet.0.bias'} <= zero, sorted(zero)
    _assert_same_losses_and_gradients({k: float(v) for k, v in log_vars.items()}, _grads(model),
                                      stock, floor=1e-4, zero=zero)
