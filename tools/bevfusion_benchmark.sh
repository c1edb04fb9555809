#!/usr/bin/env bash
# BEVFusion, stock vs turbox, end to end (tools/benchmark.py) on a synthetic nuScenes with
# 1600x900 images, 10 sweeps a sample (about 340k points, as nuScenes) and the GT database that
# the lidar-only config's ObjectSample reads. Needs a GPU (sparse convolution).
#
# Usage: bash tools/bevfusion_benchmark.sh [OUT_DIR] [NAME ...]
#   lidar          the lidar-only stock config against its turbox twin
#   lidar-cam      the lidar-camera pair, like for like: both with turbox_mm's bev_pool, since
#                  upstream's project compiles its own CUDA bev_pool and our stock config
#                  otherwise pools in PyTorch (docs/benchmarks.md)
#   lidar-cam-ref  the lidar-camera stock config as shipped (PyTorch pooling), alone: the
#                  second, slower reference row
#   (default: lidar lidar-cam)
# Environment: PYTHON (default python3), ITERS / WARMUP (timed / untimed iterations),
# WORKERS (data generation processes), DATA_DIR (default data/), TIMEOUT (seconds a config may
# run, default 1200), PREPARE_ONLY=1 (make the data and stop), EXTRA (more benchmark.py
# arguments, e.g. --profile).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=${PYTHON:-python3}
out=${1:-work_dirs/bevfusion_benchmark}
shift || true
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(lidar lidar-cam)
root=${DATA_DIR:-data}/nuscenes_synth_bevfusion
# A dataset made before is reused only if its info files pass the format check (they are
# written atomically, so a file is whole or absent; the check catches an older format).
if [ -f "$root/nuscenes_infos_train.pkl" ] && [ -f "$root/nuscenes_dbinfos_train.pkl" ]; then
  "$py" tools/create_data.py check "$root/nuscenes_infos_train.pkl" \
    "$root/nuscenes_infos_val.pkl" || exit 2
else
  # 4 scenes x 12 keyframes, 10 sweeps of ~34k points each, six 1600x900 cameras
  "$py" tools/create_data.py synthetic --out "$root" --scenes 4 --frames 12 --sweeps 10 \
    --val-scenes 1 --image-size 1600x900 --workers "${WORKERS:-$(nproc)}" --no-progress
fi
export NUSCENES_ROOT
NUSCENES_ROOT=$(cd "$root" && pwd)/
if [ "${PREPARE_ONLY:-0}" = 1 ]; then
  echo "data ready: NUSCENES_ROOT=$NUSCENES_ROOT"
  exit 0
fi
lidar=configs/bevfusion/bevfusion_lidar_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d
cam=configs/bevfusion/bevfusion_lidar-cam_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d
common=(--iters "${ITERS:-30}" --warmup "${WARMUP:-8}" --timeout "${TIMEOUT:-1200}")
# shellcheck disable=SC2206  # EXTRA is a list of arguments
set -f  # no globbing: overrides such as modules=[a,head.layers.*] stay as written
extra=(${EXTRA:-})
set +f
for name in "${names[@]}"; do
  case "$name" in
    lidar)
      "$py" tools/benchmark.py "${lidar}_stock.py" "${lidar}_turbox.py" "${common[@]}" \
        --out "$out/$name" "${extra[@]}" ;;
    lidar-cam)
      "$py" tools/benchmark.py "${cam}_stock.py" "${cam}_turbox.py" "${common[@]}" \
        --out "$out/$name" --cfg-options model.view_transform.bev_pool_impl=turbox \
        "${extra[@]}" ;;
    lidar-cam-ref)
      "$py" tools/benchmark.py "${cam}_stock.py" "${common[@]}" --out "$out/$name" \
        "${extra[@]}" ;;
    *) echo "bevfusion_benchmark: unknown NAME $name (lidar, lidar-cam, lidar-cam-ref)" >&2
       exit 2 ;;
  esac
done
