#!/usr/bin/env bash
# Download, on a machine with network, the wheels that the offline GPU kit (../shared/device)
# lacks: the pure-Python ones mmdet3d 1.4 imports at start-up (without them every
# mmdet3d-scoped config fails there with "No module named 'pyquaternion'"), simplejpeg, and
# NVIDIA's nvImageCodec with the nvJPEG library it loads (the second GPU decoder of
# TurboxDet3DDataPreprocessor). The nvImageCodec wheel (25 MB, 70 MB unpacked) is cut down to
# what the JPEG path of Python 3.12 needs, so that the whole folder stays well inside the
# 64 MiB that travels with a GPU command.
#
# Usage: bash tools/fetch_gpu_wheels.sh [DEST]      (DEST defaults to .whl, git-ignored)
# On the GPU machine, before running anything:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
set -euo pipefail
dest=${1:-.whl}
mkdir -p "$dest"
fetch() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$1" "$2" 2> >(grep -v 'is ignored: it is neither' >&2)
}
for pkg in pyquaternion nuscenes-devkit lyft_dataset_sdk descartes cachetools fire simplejpeg \
    nvidia-nvjpeg; do
  fetch "$dest" "$pkg"
done
full=$(mktemp -d)
trap 'rm -rf "$full"' EXIT
fetch "$full" nvidia-nvimgcodec-cu13
python3 - "$full"/nvidia_nvimgcodec_cu13-*.whl "$dest" <<'PY'
"""Keep the package, its Python 3.12 module, the core library and the JPEG extensions."""
import os, sys, zipfile
src, dest = sys.argv[1], sys.argv[2]
keep_ext = ('libnvjpeg_ext', 'libjpeg_turbo_ext')
def wanted(name):
    if '.dist-info/' in name or name.endswith('__init__.py') and name.count('/') <= 2:
        return 'tools/' not in name
    if name.startswith('nvidia/nvimgcodec/nvimgcodec_impl.'):
        return '.cpython-312-' in name
    if name.startswith('nvidia/nvimgcodec/extensions/'):
        return os.path.basename(name).startswith(keep_ext)
    return name.startswith('nvidia/nvimgcodec/libnvimgcodec.so')
out = os.path.join(dest, os.path.basename(src))
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, 'w', zipfile.ZIP_DEFLATED) as zout:
    names = [n for n in zin.namelist() if wanted(n)]
    for name in names:
        data = zin.read(name)
        if name.endswith('.dist-info/RECORD'):  # list only what is left
            kept = set(names)
            data = b''.join(line + b'\n' for line in data.splitlines()
                            if line.split(b',')[0].decode() in kept)
        zout.writestr(zin.getinfo(name), data)
print(f'{out}: kept {len(names)} of {len(zin.namelist())} files')
PY
ls -la "$dest"
