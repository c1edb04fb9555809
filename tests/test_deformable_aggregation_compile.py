"""The deformable aggregation's GPU build: both Triton kernels compiled ahead of time for
sm_90 (no GPU needed), for every input dtype and as real launches specialise them."""
import pytest

from conftest import compile_for_sm90_in_subprocess

COMPILE_SCRIPT = r'''
import sys
from turbox_mm.ops.deformable_aggregation import triton_kernels as tk
from turbox_mm.testing.triton_aot import compile_variants


def pointers(kind, dtype):
    common = dict(feat_ptr=dtype, shape_ptr='*i32', start_ptr='*i64', loc_ptr=dtype,
                  w_ptr=dtype, pairs_ptr='*i32', count_ptr='*i32')
    if kind == 'fwd':
        return dict(common, out_ptr=dtype)
    return dict(common, gout_ptr=dtype, gfeat_ptr='*fp32', gloc_ptr='*fp32', gw_ptr=dtype)


KERNELS = (('fwd', tk._da_fwd_kernel), ('bwd', tk._da_bwd_kernel))
variants = []
for dtype in ('*fp32', '*fp16', '*bf16'):
    for ones in ((), ('A', 'G', 'CAMS', 'L')) if dtype == '*fp32' else ((), ):
        for kind, kernel in KERNELS:
            variants.append((kernel, dict(ACC=tk.tl.float32, BLOCK_S=4, BLOCK_G=4, BLOCK_J=8),
                             ones, pointers(kind, dtype)))
# every autotuning candidate as a launch at Sparse4D's and SparseDrive's sizes specialises it
# (module docstring of turbox_mm/testing/triton_aot.py): 6 cameras, 4 levels of a 256x704
# image at strides 4 to 32 (F = 6 x 14960 = 89760 feature rows), 256 channels in 8 groups of
# 32 (F, C and CPG multiples of 16), 13 (boxes) or 300 (map) keypoints (PC = 78 or 1800),
# 900 or 100 anchors, with denoising anchors 900 + 10 k (a multiple of 16 for some k);
# float32 (the model's), and float16 (the op's) once
for dtype, anchors_divisible in (('*fp32', False), ('*fp32', True), ('*fp16', False)):
    divisible = ('F', 'C', 'CPG') + (('A', ) if anchors_divisible else ())
    for kind, kernel in KERNELS:
        for config in tk.configs(kind, 256, 8):
            config = dict(config)
            warps = config.pop('num_warps')
            variants.append((kernel, dict(config, ACC=tk.tl.float32, BLOCK_J=32), (),
                             pointers(kind, dtype), dict(divisible=divisible, num_warps=warps)))
failures = compile_variants(variants, floats=())
print('\n'.join(failures) or 'all compiled')
sys.exit(1 if failures else 0)
'''


@pytest.mark.slow
def test_kernels_compile_for_sm90_for_every_dtype_and_specialisation(tmp_path):
    """The interpreter runs Python, not Triton's compiler: compile both kernels for the H200's
    sm_90, for every input dtype, with anchors, groups, cameras and levels at 1 (Triton makes
    an int argument equal to 1 a constant), and every autotuning candidate as a launch at
    Sparse4D's and SparseDrive's sizes specialises it (multiples of 16 marked)."""
    compile_for_sm90_in_subprocess(COMPILE_SCRIPT, tmp_path)
