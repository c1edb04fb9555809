"""Resume decisions are made once, on rank 0, for every rank (two gloo processes on the CPU)."""
import os

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from turbox_mm.engine.checkpoint_io import decided_on_rank0


def _rank(rank, out_dir, fail):
    # a file store in the test's own directory: no port that another test could take first
    dist.init_process_group('gloo', init_method=f'file://{out_dir}/store', rank=rank,
                            world_size=2)
    try:
        def decide():
            if rank != 0:
                raise AssertionError('decide() ran on a rank other than 0')
            if fail:
                raise ValueError('epoch_3.pth is damaged')
            return f'epoch_{rank + 2}.pth'  # what only rank 0 would answer
        try:
            result = decided_on_rank0(decide)
        except Exception as error:  # noqa: BLE001 - written for the parent to check
            result = f'{type(error).__name__}: {error}'
        with open(os.path.join(out_dir, f'rank{rank}.txt'), 'w') as f:
            f.write(result)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize('fail', [False, True])
def test_every_rank_gets_rank_zeros_decision_or_its_error(tmp_path, fail):
    mp.spawn(_rank, args=(str(tmp_path), fail), nprocs=2, join=True)
    got = [(tmp_path / f'rank{r}.txt').read_text() for r in (0, 1)]
    if not fail:
        assert got == ['epoch_2.pth', 'epoch_2.pth']
    else:
        assert got[0] == 'ValueError: epoch_3.pth is damaged'
        assert got[1] == ('RuntimeError: rank 0 failed to decide the checkpoint to resume: '
                          'ValueError: epoch_3.pth is damaged')


def test_a_single_process_just_decides():
    assert decided_on_rank0(lambda: 'iter_8.pth') == 'iter_8.pth'
