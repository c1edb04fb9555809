#!/usr/bin/env bash
# mmdet3d 1.4's own nuScenes lidar configs, stock vs stock + configs/_base_/turbox.py
# (configs/mmdet3d/), end to end on a synthetic nuScenes with 10 sweeps a sample and the GT
# database that ObjectSample reads. Needs a GPU (sparse convolution, mmcv's CUDA ops).
#
# Usage: bash tools/lidar_benchmark.sh [OUT_DIR] [NAME ...]
#   NAME: centerpoint_voxel0075, centerpoint_pillar02, pointpillars (default: all three)
# Environment: PYTHON (default python3), ITERS / WARMUP (timed / untimed iterations),
# WORKERS (data generation processes), DATA_DIR (default data/), TIMEOUT (seconds a config
# may run, default 1200), PREPARE_ONLY=1 (make the data and stop).
#
# mmdet3d's configs read data/nuscenes/: the script links it to the synthetic set when
# nothing is there, and stops with a message when something else is.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=${PYTHON:-python3}
out=${1:-work_dirs/lidar_benchmark}
shift || true
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(centerpoint_voxel0075 centerpoint_pillar02 pointpillars)
data_dir=${DATA_DIR:-data}
root=$data_dir/nuscenes_synth_lidar
# A dataset made before is reused only if its info files pass the format check (they are
# written atomically, so a file is whole or absent; the check catches an older format).
if [ -f "$root/nuscenes_infos_train.pkl" ] && [ -f "$root/nuscenes_dbinfos_train.pkl" ]; then
  "$py" tools/create_data.py check "$root/nuscenes_infos_train.pkl" \
    "$root/nuscenes_infos_val.pkl" || exit 2
else
  # 4 scenes x 12 keyframes, 10 sweeps of ~34k points each (nuScenes' ~349k per sample)
  "$py" tools/create_data.py synthetic --out "$root" --scenes 4 --frames 12 --sweeps 10 \
    --val-scenes 1 --image-size 320x180 --workers "${WORKERS:-$(nproc)}" --no-progress
fi
link=data/nuscenes
target=$(cd "$root" && pwd)
if [ -L "$link" ] && [ "$(readlink -f "$link")" != "$(readlink -f "$target")" ]; then
  echo "lidar_benchmark: $link points to $(readlink -f "$link"), not to $target;" \
    "remove the link or point it there" >&2
  exit 2
elif [ -e "$link" ] && [ ! -L "$link" ]; then
  echo "lidar_benchmark: $link exists and is not a link; mmdet3d's configs would read it." \
    "Move it away to benchmark on the synthetic set." >&2
  exit 2
fi
mkdir -p data
ln -sfn "$target" "$link"
if [ "${PREPARE_ONLY:-0}" = 1 ]; then
  echo "data ready: $link -> $target"
  exit 0
fi
declare -A full=(
  [centerpoint_voxel0075]=centerpoint_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d
  [centerpoint_pillar02]=centerpoint_pillar02_second_secfpn_8xb4-cyclic-20e_nus-3d
  [pointpillars]=pointpillars_hv_secfpn_sbn-all_8xb4-2x_nus-3d
)
for name in "${names[@]}"; do
  cfg=${full[$name]:?unknown config name $name (valid: ${!full[*]})}
  "$py" tools/benchmark.py "configs/mmdet3d/${cfg}_stock.py" "configs/mmdet3d/${cfg}_turbox.py" \
    --iters "${ITERS:-30}" --warmup "${WARMUP:-8}" --out "$out/$name" \
    --timeout "${TIMEOUT:-1200}"
done
