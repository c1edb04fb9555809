#!/usr/bin/env bash
# One call on the lent GPU machine (docs/gpu.md): the offline kit, then the full-size Sparse4D
# stock-vs-turbox benchmark, a short training + nuScenes evaluation of the full-size turbox
# config, and the GPU tests, each under its own time limit, logs under $OUT.
#
#   bash tools/gpu_session.sh [bench] [eval] [ops] [lidar] [tests] [TEST_PATHS...]
#                                                               (default: bench tests)
#   ops    tools/benchmark.py --ops $OPS (default: every op)
#   lidar  tools/lidar_benchmark.sh $LIDAR (mmdet3d's own lidar configs; needs the kit's
#          spconv/ folder, which the phase installs)
#   bevfusion  tools/bevfusion_benchmark.sh $BEVFUSION (default: lidar lidar-cam; spconv too)
#   maptr  tools/maptr_benchmark.sh $MAPTR (default: v1 v2)
#   sparsedrive  tools/sparsedrive_benchmark.sh $SPARSEDRIVE (default: stage1)
# Environment: OUT (default gpu_out), ITERS / WARMUP (benchmark), BENCH_TIMEOUT / TEST_TIMEOUT
# / EVAL_TIMEOUT / OPS_TIMEOUT / LIDAR_TIMEOUT / BEVFUSION_TIMEOUT / MAPTR_TIMEOUT /
# SPARSEDRIVE_TIMEOUT (seconds for each phase),
# TIMEOUT (seconds per benchmarked config).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:-gpu_out}
# Benchmark folders go here and come back packed as one file ($OUT returns 8 files at most).
results=/tmp/gpu_results
mkdir -p "$out" "$results"
out=$(cd "$out" && pwd)
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(bench tests)
if [[ " $* " == *" lidar "* || " $* " == *" bevfusion "* ]]; then source .kit/setup.sh --spconv; else source .kit/setup.sh; fi
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
  2>&1 | grep -v 'already exists' || true
# The machine, first in the benchmark's log ($OUT takes 8 files at most).
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used --format=csv
  echo "cores: $(nproc)"; } | tee "$out/bench.log"
tests=()
for arg in "${phases[@]}"; do
  case "$arg" in bench|eval|ops|lidar|bevfusion|maptr|sparsedrive|tests) ;; *) tests+=("$arg") ;; esac
done
[ ${#tests[@]} -eq 0 ] && tests=(tests)
for phase in "${phases[@]}"; do
  case "$phase" in
    bench)
      DATA_DIR=/tmp/data PYTHON=python3 timeout "${BENCH_TIMEOUT:-420}" \
        bash tools/sparse4d_benchmark.sh full "$out" 2>&1 | tee -a "$out/bench.log" | tail -40 ;;
    eval)
      DATA_DIR=/tmp/data PYTHON=python3 PREPARE_ONLY=1 bash tools/sparse4d_benchmark.sh full
      NUSCENES_ROOT=/tmp/data/nuscenes_synth_sparse4d/ timeout "${EVAL_TIMEOUT:-240}" \
        python3 tools/train.py configs/sparse4d/sparse4dv3_r50_8xb6-100e_nus-256x704_turbox.py \
        --work-dir /tmp/eval_run --cfg-options train_cfg.max_iters=20 train_cfg.val_interval=20 \
        default_hooks.logger.interval=5 val_evaluator.metrics.tracking_threshold=0 \
        model.img_backbone.init_cfg=None 2>&1 | tee "$out/eval.log" \
        | grep -E 'Iter\(train\) \[20/|NDS:|mAP:|AMOTA|Error' | tail -8 ;;
    ops)
      # shellcheck disable=SC2086  # OPS is a list of names
      timeout "${OPS_TIMEOUT:-240}" python3 tools/benchmark.py --ops ${OPS:-} --out "$results/ops" \
        2>&1 | tee "$out/ops.log" | tail -25 ;;
    lidar)
      # shellcheck disable=SC2086  # LIDAR is a list of names
      DATA_DIR=/tmp/data PYTHON=python3 timeout "${LIDAR_TIMEOUT:-480}" \
        bash tools/lidar_benchmark.sh "$results/lidar" ${LIDAR:-} 2>&1 | tee "$out/lidar.log" \
        | grep -vE '^  \[' | tail -40 ;;
    bevfusion)
      # shellcheck disable=SC2086  # BEVFUSION is a list of names
      DATA_DIR=/tmp/data PYTHON=python3 timeout "${BEVFUSION_TIMEOUT:-540}" \
        bash tools/bevfusion_benchmark.sh "$results/bevfusion" ${BEVFUSION:-} 2>&1 \
        | tee "$out/bevfusion.log" | grep -vE '^  \[' | tail -40 ;;
    maptr)
      # shellcheck disable=SC2086  # MAPTR is a list of names
      DATA_DIR=/tmp/data PYTHON=python3 timeout "${MAPTR_TIMEOUT:-540}" \
        bash tools/maptr_benchmark.sh "$results/maptr" ${MAPTR:-} 2>&1 \
        | tee "$out/maptr.log" | grep -vE '^  \[' | tail -40 ;;
    sparsedrive)
      # shellcheck disable=SC2086  # SPARSEDRIVE is a list of names
      DATA_DIR=/tmp/data PYTHON=python3 timeout "${SPARSEDRIVE_TIMEOUT:-540}" \
        bash tools/sparsedrive_benchmark.sh "$results/sparsedrive" ${SPARSEDRIVE:-} 2>&1 \
        | tee "$out/sparsedrive.log" | grep -vE '^  \[' | tail -40 ;;
    tests)
      timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -m cuda -p no:cacheprovider \
        "${tests[@]}" 2>&1 | tee "$out/cuda_tests.log" | tail -15 ;;
  esac
done
# The results of the ops, lidar, bevfusion, maptr and sparsedrive phases (JSON, logs, charts,
# --profile's syncs.txt and profile.txt; no checkpoints), one archive.
if [ -n "$(ls -A "$results")" ]; then
  (cd "$results" && find . \( -name '*.json' -o -name '*.log' -o -name '*.png' -o -name '*.txt' \) \
    -size -4M -print0 | tar czf "$out/results.tgz" --null -T -)
fi
