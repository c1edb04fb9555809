#!/usr/bin/env bash
# MapTR, stock vs turbox, end to end (tools/benchmark.py) on a synthetic nuScenes with six
# 1600x900 images a sample, keyframe lidar points (v2's depth targets), the map expansion and
# the map ground truth precomputed into the infos (tools/create_data.py map-gt).
#
# Usage: bash tools/maptr_benchmark.sh [OUT_DIR] [NAME ...]
#   v1      maptr_tiny_r50_24e, like for like: both with turbox_mm's geometric kernel attention
#           op (upstream compiles its own CUDA extension, which no package ships and which does
#           not build on current PyTorch; our stock GKT is the PyTorch reference)
#   v1-ref  the v1 stock config as shipped (PyTorch GKT), alone: the slower reference row
#   v2      maptrv2_nusc_r50_24ep, like for like: both with turbox_mm's bev_pool (upstream
#           compiles BEVFusion's CUDA bev_pool; our stock pooling is the PyTorch procedure)
#   v2-ref  the v2 stock config as shipped (PyTorch pooling), alone
#   v2c     maptrv2_nusc_r50_24ep_w_centerline (four classes, 70 vectors), like for like as v2
#   (default: v1 v2)
# Environment: PYTHON (default python3), ITERS / WARMUP (timed / untimed iterations),
# WORKERS (data generation processes), DATA_DIR (default data/), TIMEOUT (seconds a config may
# run, default 1200), PREPARE_ONLY=1 (make the data and stop), EXTRA (more benchmark.py
# arguments, e.g. --profile).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=${PYTHON:-python3}
out=${1:-work_dirs/maptr_benchmark}
shift || true
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(v1 v2)
root=${DATA_DIR:-data}/nuscenes_synth_maptr
# A dataset made before is reused only if its info files pass the format check (they are
# written atomically, so a file is whole or absent; the check catches an older format).
if [ -f "$root/nuscenes_infos_train.pkl" ] && [ -f "$root/nuscenes_infos_val.pkl" ]; then
  "$py" tools/create_data.py check "$root/nuscenes_infos_train.pkl" \
    "$root/nuscenes_infos_val.pkl" || exit 2
else
  # 4 scenes x 12 keyframes (3 for training), six 1600x900 cameras, keyframe points only
  "$py" tools/create_data.py synthetic --out "$root" --scenes 4 --frames 12 --sweeps 0 \
    --val-scenes 1 --image-size 1600x900 --workers "${WORKERS:-$(nproc)}" --no-progress
fi
# v2 reads the map ground truth precomputed in the infos (map_annotation, as upstream's v2),
# v1's turbox twin too where it is there: cut it once with the reference vectoriser, for the
# four classes (which serve the three-class configs too). Samples that carry it already are
# kept, so for a reused dataset this only loads the infos (one cut for three classes by an
# older version of this script is an error that names --force: delete the dataset).
"$py" tools/create_data.py map-gt "$root/nuscenes_infos_train.pkl" \
  "$root/nuscenes_infos_val.pkl" --data-root "$root" --workers "${WORKERS:-$(nproc)}" \
  --classes divider ped_crossing boundary centerline --no-progress || exit 2
export NUSCENES_ROOT
NUSCENES_ROOT=$(cd "$root" && pwd)/
if [ "${PREPARE_ONLY:-0}" = 1 ]; then
  echo "data ready: NUSCENES_ROOT=$NUSCENES_ROOT"
  exit 0
fi
v1=configs/maptr/maptr_tiny_r50_24e
v2=configs/maptr/maptrv2_nusc_r50_24ep
v2c=configs/maptr/maptrv2_nusc_r50_24ep_w_centerline
gkt=model.bev_encoder.encoder.transformerlayers.attn_cfgs.1.attention.op_impl=turbox
common=(--iters "${ITERS:-30}" --warmup "${WARMUP:-8}" --timeout "${TIMEOUT:-1200}")
# shellcheck disable=SC2206  # EXTRA is a list of arguments
set -f  # no globbing: overrides such as modules=[a,head.layers.*] stay as written
extra=(${EXTRA:-})
set +f
for name in "${names[@]}"; do
  case "$name" in
    v1)
      "$py" tools/benchmark.py "${v1}_stock.py" "${v1}_turbox.py" "${common[@]}" \
        --out "$out/$name" --cfg-options "$gkt" "${extra[@]}" ;;
    v1-ref)
      "$py" tools/benchmark.py "${v1}_stock.py" "${common[@]}" --out "$out/$name" \
        "${extra[@]}" ;;
    v2)
      "$py" tools/benchmark.py "${v2}_stock.py" "${v2}_turbox.py" "${common[@]}" \
        --out "$out/$name" --cfg-options model.bev_encoder.bev_pool_impl=turbox \
        "${extra[@]}" ;;
    v2-ref)
      "$py" tools/benchmark.py "${v2}_stock.py" "${common[@]}" --out "$out/$name" \
        "${extra[@]}" ;;
    v2c)
      "$py" tools/benchmark.py "${v2c}_stock.py" "${v2c}_turbox.py" "${common[@]}" \
        --out "$out/$name" --cfg-options model.bev_encoder.bev_pool_impl=turbox \
        "${extra[@]}" ;;
    *) echo "maptr_benchmark: unknown NAME $name (v1, v1-ref, v2, v2-ref, v2c)" >&2
       exit 2 ;;
  esac
done
