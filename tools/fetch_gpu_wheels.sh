#!/usr/bin/env bash
# Download, on a machine with network, the pure-Python wheels that mmdet3d 1.4 imports at
# start-up but that the offline GPU kit (../shared/device) lacks: without them every
# mmdet3d-scoped config fails there with "No module named 'pyquaternion'".
#
# Usage: bash tools/fetch_gpu_wheels.sh [DEST]      (DEST defaults to .whl, git-ignored)
# On the GPU machine, before running anything:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
set -euo pipefail
dest=${1:-.whl}
mkdir -p "$dest"
for pkg in pyquaternion nuscenes-devkit lyft_dataset_sdk descartes cachetools fire simplejpeg; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$dest" "$pkg" 2> >(grep -v 'is ignored: it is neither' >&2)
done
ls "$dest"
