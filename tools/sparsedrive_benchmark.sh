#!/usr/bin/env bash
# SparseDrive, stock vs turbox, end to end (tools/benchmark.py) on a synthetic nuScenes with six
# 1600x900 images a sample and keyframe lidar points (the depth targets): Sparse4D's full-size
# benchmark data (tools/sparse4d_benchmark.sh makes the same), plus SparseDrive's k-means
# anchors.
#
# Usage: bash tools/sparsedrive_benchmark.sh [OUT_DIR] [NAME ...]
#   stage1      sparsedrive_small_stage1, like for like: both with turbox_mm's deformable
#               aggregation op in the det and map heads (upstream compiles its own CUDA op,
#               which no package ships; our stock op is the grid_sample procedure)
#   stage1-ref  the stage-1 stock config as shipped (grid_sample aggregation), alone: the
#               slower reference row
#   stage2      sparsedrive_small_stage2, like for like as stage1, from scratch (load_from off:
#               the benchmark times steps, it does not need the stage-1 weights)
#   tiny        the tiny stage-1 configs (CPU: a check that both build, train and agree; no
#               speed claim)
#   (default: stage1)
# Time: the turbox twins compile their heads during the warm-up iterations (the first
# iteration runs eagerly); on the H100 (2026-12-06) stage 2's turbox run took about 4 minutes
# in all, stage 1's stock and turbox runs together about 4.5 minutes. One stage per 600 s
# device call.
# Environment: PYTHON (default python3), ITERS / WARMUP (timed / untimed iterations),
# WORKERS (data generation processes), DATA_DIR (default data/), TIMEOUT (seconds a config may
# run, default 1800), PREPARE_ONLY=1 (make the data and stop), EXTRA (more benchmark.py
# arguments, e.g. --profile).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=${PYTHON:-python3}
out=${1:-work_dirs/sparsedrive_benchmark}
shift || true
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(stage1)
if [ "${names[*]}" = tiny ]; then
  root=${DATA_DIR:-data}/nuscenes_tiny
  gen=(--scenes 3 --frames 6 --image-size 320x180 --points 4000 --sweeps 0 --val-scenes 1)
  det_num=32; map_num=8
else
  root=${DATA_DIR:-data}/nuscenes_synth_sparse4d
  gen=(--scenes 8 --frames 20 --sweeps 0 --val-scenes 1)
  det_num=900; map_num=100
fi
# A dataset made before is reused only if its info files pass the format check (they are
# written atomically, so a file is whole or absent).
if [ -f "$root/nuscenes_infos_train.pkl" ] && [ -f "$root/nuscenes_infos_val.pkl" ]; then
  "$py" tools/create_data.py check "$root/nuscenes_infos_train.pkl" \
    "$root/nuscenes_infos_val.pkl" || exit 2
else
  "$py" tools/create_data.py synthetic --out "$root" "${gen[@]}" \
    --workers "${WORKERS:-$(nproc)}" --no-progress
fi
# The configs read kmeans/kmeans_det_900.npy and kmeans/kmeans_map_100.npy (upstream's names;
# for the tiny configs these files hold 32 and 8 anchors), stage 2 also the motion and
# planning modes (pooled where a synthetic class or command has too few complete futures).
tasks=(det map)
[[ " ${names[*]} " == *" stage2 "* ]] && tasks+=(motion plan)
for task in "${tasks[@]}"; do
  case "$task" in
    det) args=(--num "$det_num"); file=kmeans_det_900.npy ;;
    map) args=(--num "$map_num"); file=kmeans_map_100.npy ;;
    motion) args=(--short pool); file=kmeans_motion_6.npy ;;
    plan) args=(--short pool); file=kmeans_plan_6.npy ;;
  esac
  if [ ! -f "$root/kmeans/$file" ]; then
    "$py" tools/sparsedrive_anchors.py "$task" "$root/nuscenes_infos_train.pkl" \
      --out "$root/kmeans/$file" "${args[@]}"
  fi
done
export NUSCENES_ROOT
NUSCENES_ROOT=$(cd "$root" && pwd)/
if [ "${PREPARE_ONLY:-0}" = 1 ]; then
  echo "data ready: NUSCENES_ROOT=$NUSCENES_ROOT"
  exit 0
fi
s1=configs/sparsedrive/sparsedrive_small_stage1
s2=configs/sparsedrive/sparsedrive_small_stage2
tiny=configs/sparsedrive/sparsedrive_tiny_stage1
daf=(model.head.det_head.deformable_model.op_impl=turbox
     model.head.map_head.deformable_model.op_impl=turbox)
common=(--iters "${ITERS:-30}" --warmup "${WARMUP:-8}" --timeout "${TIMEOUT:-1800}")
# shellcheck disable=SC2206  # EXTRA is a list of arguments
set -f  # no globbing: overrides such as modules=[a,head.layers.*] stay as written
extra=(${EXTRA:-})
set +f
for name in "${names[@]}"; do
  case "$name" in
    stage1)
      "$py" tools/benchmark.py "${s1}_stock.py" "${s1}_turbox.py" "${common[@]}" \
        --out "$out/$name" --cfg-options "${daf[@]}" "${extra[@]}" ;;
    stage2)
      "$py" tools/benchmark.py "${s2}_stock.py" "${s2}_turbox.py" "${common[@]}" \
        --out "$out/$name" --cfg-options "${daf[@]}" load_from=None "${extra[@]}" ;;
    stage1-ref)
      "$py" tools/benchmark.py "${s1}_stock.py" "${common[@]}" --out "$out/$name" \
        "${extra[@]}" ;;
    tiny)
      "$py" tools/benchmark.py "${tiny}_stock.py" "${tiny}_turbox.py" --iters "${ITERS:-6}" \
        --warmup "${WARMUP:-2}" --timeout "${TIMEOUT:-1800}" --out "$out/$name" \
        "${extra[@]}" ;;
    *) echo "sparsedrive_benchmark: unknown NAME $name (stage1, stage1-ref, stage2, tiny)" >&2
       exit 2 ;;
  esac
done
