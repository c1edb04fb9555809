"""The temporal models compiled with ``compile.mode='reduce-overhead'`` (Inductor's CUDA graph
trees) on a GPU: the same losses and gradients as eager over temporal frames, whose instance
caches and queues outlive the step that made them (they must be copies, not views of a
graph's output pool, which the next step's replays overwrite)."""
import os.path as osp

import pytest
import torch

from conftest import (ROOT, assert_same_gradients, compiled_twin_agrees, config_with_root,
                      make_sparse4d_tiny, make_sparsedrive_stage2_tiny, turbox_applied)

pytestmark = pytest.mark.cuda

SPARSE4D = osp.join(ROOT, 'configs/sparse4d/sparse4dv3_tiny_turbox.py')
STAGE2 = osp.join(ROOT, 'configs/sparsedrive/sparsedrive_tiny_stage2_turbox.py')


def _graph_nodes():
    """The CUDA graphs Inductor's tree manager of this GPU recorded (0 where it has none)."""
    from torch._inductor import cudagraph_trees
    manager = cudagraph_trees.get_manager(torch.cuda.current_device(),
                                          create_if_none_exists=False)
    if manager is None:
        return 0
    todo, count = list(manager.get_roots()), 0
    while todo:
        node = todo.pop()
        count += 1
        todo.extend(child for children in node.children.values() for child in children)
    return count


@pytest.fixture
def no_tf32_convs():
    """Full float32 convolutions too (cuDNN allows TF32 by default; eager and compiled code
    may pick other algorithms, whose TF32 rounding would differ by about 1e-3)."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


def _agrees(cfg, steps):
    """Eager against the compiled twin under reduce-overhead on this GPU. Tolerances: Inductor
    fuses and reorders float32 sums (TF32 off here, matmuls and convolutions), so losses
    agree within 1e-3 relative, not bit for bit; gradients as conftest's
    assert_same_gradients (a wrong or overwritten tensor gives errors of order 1)."""
    from torch._dynamo.utils import counters
    names, frames = compiled_twin_agrees(cfg, steps=steps, grad_check=assert_same_gradients,
                                         backend='inductor', device='cuda',
                                         mode='reduce-overhead', mark_steps=True,
                                         rtol=1e-3, atol=1e-4)
    skips = dict(counters['inductor']).get('cudagraph_skips', 0)
    modules = [n for n in names if ':' not in n]  # the methods compile without graphs
    print(f'compiled {len(names)} paths ({len(modules)} modules), {frames}, cudagraph skips '
          f'{skips}, graphs recorded {_graph_nodes()}')
    # every compiled module ran as at least one recorded graph (its forward; the backward
    # and later shapes add more); a skipped one (TORCH_LOGS=perf_hints says why) falls short
    assert _graph_nodes() >= len(modules), (
        f'{_graph_nodes()} CUDA graphs recorded for {len(modules)} compiled modules '
        f'({skips} skipped)')
    return names


def test_sparse4d_under_cuda_graphs_agrees_with_eager(tmp_path, full_fp32, no_tf32_convs):
    root = make_sparse4d_tiny(tmp_path / 'nuscenes_tiny')
    cfg, _ = turbox_applied(config_with_root(SPARSE4D, root))
    names = _agrees(cfg, steps=4)
    assert 'head.instance_bank:cache' in names


def test_sparsedrive_stage2_under_cuda_graphs_agrees_with_eager(tmp_path, full_fp32, no_tf32_convs):
    root = make_sparsedrive_stage2_tiny(tmp_path / 'nuscenes_tiny2')
    cfg, _ = turbox_applied(config_with_root(STAGE2, root))
    names = _agrees(cfg, steps=5)
    assert 'head.motion_plan_head.instance_queue:get' in names
