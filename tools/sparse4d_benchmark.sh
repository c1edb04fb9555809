#!/usr/bin/env bash
# The README's main job: a synthetic nuScenes, Sparse4D's k-means anchors, then the end-to-end
# benchmark of the stock and turbox Sparse4D v3 configs (tools/benchmark.py), ending with the
# table and the chart's path.
#
# Usage: bash tools/sparse4d_benchmark.sh [tiny|full|auto] [OUT_DIR]
#   tiny  the tiny configs on a small dataset (320x180 images): minutes on 2 CPU cores
#   full  the full-size configs (ResNet-50, 6 x 256x704, batch 6, fp16) on 1600x900 images;
#         needs a GPU
#   auto  full where CUDA is available, else tiny (the default)
# Environment: PYTHON (default python3), ITERS / WARMUP (timed / untimed iterations),
# WORKERS (data generation processes), DATA_DIR (where the datasets go, default data/),
# TIMEOUT (seconds a config may run, default 3600), PREPARE_ONLY=1 (make the data and stop),
# EXTRA (more benchmark.py arguments, e.g. the like-for-like row's
# `--cfg-options model.head.deformable_model.op_impl=turbox`, or a `--variant`).
# Datasets already generated are reused.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=${PYTHON:-python3}
size=${1:-auto}
out=${2:-work_dirs/sparse4d_benchmark}
data_dir=${DATA_DIR:-data}
if [ "$size" = auto ]; then
  if "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    size=full
  else
    size=tiny
  fi
fi
case "$size" in
  tiny)
    root=$data_dir/nuscenes_tiny
    gen=(--scenes 3 --frames 6 --image-size 320x180 --points 4000 --sweeps 0 --val-scenes 1)
    anchors=32
    configs=(configs/sparse4d/sparse4dv3_tiny_stock.py configs/sparse4d/sparse4dv3_tiny_turbox.py)
    iters=${ITERS:-12}; warmup=${WARMUP:-4} ;;
  full)
    root=$data_dir/nuscenes_synth_sparse4d
    # Camera-only training reads the keyframe points (depth targets), no sweeps.
    gen=(--scenes 8 --frames 20 --sweeps 0 --val-scenes 1)
    anchors=900
    configs=(configs/sparse4d/sparse4dv3_r50_8xb6-100e_nus-256x704_stock.py
             configs/sparse4d/sparse4dv3_r50_8xb6-100e_nus-256x704_turbox.py)
    iters=${ITERS:-50}; warmup=${WARMUP:-10} ;;
  *) echo "usage: bash tools/sparse4d_benchmark.sh [tiny|full|auto] [OUT_DIR]" >&2; exit 2 ;;
esac
# A dataset made before is reused only if its info files pass the format check (they are
# written atomically, so a file is whole or absent; the check catches an older format).
if [ -f "$root/nuscenes_infos_train.pkl" ]; then
  "$py" tools/create_data.py check "$root/nuscenes_infos_train.pkl" \
    "$root/nuscenes_infos_val.pkl" || exit 2
else
  "$py" tools/create_data.py synthetic --out "$root" "${gen[@]}" \
    --workers "${WORKERS:-$(nproc)}" --no-progress
fi
if [ ! -f "$root/nuscenes_kmeans900.npy" ]; then
  "$py" tools/sparse4d_anchors.py "$root/nuscenes_infos_train.pkl" \
    --out "$root/nuscenes_kmeans900.npy" --num "$anchors"
fi
export NUSCENES_ROOT
NUSCENES_ROOT=$(cd "$root" && pwd)/
if [ "${PREPARE_ONLY:-0}" = 1 ]; then
  echo "data ready: NUSCENES_ROOT=$NUSCENES_ROOT"
  exit 0
fi
# shellcheck disable=SC2206  # EXTRA is a list of arguments
set -f  # no globbing: overrides such as modules=[a,head.layers.*] stay as written
extra=(${EXTRA:-})
set +f
"$py" tools/benchmark.py "${configs[@]}" --iters "$iters" --warmup "$warmup" --out "$out" \
  --timeout "${TIMEOUT:-3600}" "${extra[@]}"
if [ "$size" = tiny ]; then
  cat <<'MSG'

This ran the tiny configs on the CPU: it shows that both configs build, train and agree
(same model maths, losses side by side above). It does not measure turbox's speed: turbox
moves work to the GPU (image augmentation, compiled kernels, CUDA streams and graphs), which a
CPU run cannot show, and a 2-core CPU shared with loader workers gives noisy times. The speed
numbers, measured on an H200, with their commands, are in docs/benchmarks.md.
MSG
fi
