#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment with the OpenMMLab CPU stack and
# turbox_mm installed in editable mode.
#
# Usage: bash tools/setup_env.sh            # creates ./.venv
#        TURBOX_VENV=/path bash tools/setup_env.sh
#
# Environment:
#   PYTHON         interpreter to build the venv from (default: python3; 3.10 to 3.12).
#   TORCH_SPEC     torch requirement (default: torch==2.13.0, which the CPU machines serve as
#                  a local CPU build; on a CUDA machine pass the build you want, e.g.
#                  "torch==2.11.0 --index-url ...").
#   PIP_FIND_LINKS honoured as usual: point it at a folder of prebuilt wheels (for example
#                  ../shared/wheels with an mmcv-2.1.0 wheel) to skip the ~15-minute mmcv
#                  build. Without such a wheel mmcv 2.1.0 is built from its sdist.
#   MAX_JOBS       parallel compile jobs for the mmcv build (default: number of cores).
#
# The script is idempotent: a stamp file that hashes this script, setup.cfg and the
# constraints lets a second run finish in seconds when nothing changed.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${TURBOX_VENV:-$root/.venv}
py=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
constraints=$root/requirements/constraints.txt

log() { printf '[setup_env] %s\n' "$*"; }

stamp_key=$(cat "${BASH_SOURCE[0]}" "$root/setup.cfg" "$root/pyproject.toml" "$constraints" \
  | sha256sum | cut -c1-16)
stamp=$venv/.turbox-setup-$stamp_key
if [ -f "$stamp" ] && "$venv/bin/python" -c 'import turbox_mm, mmcv.ops, mmdet3d' 2>/dev/null; then
  log "environment $venv is up to date"
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  log "creating virtual environment $venv with $($py --version 2>&1)"
  "$py" -m venv "$venv"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip, with the lines some machines' pip configs print for index folders they lack filtered out.
pip_() {
  "$venv/bin/python" -m pip "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}
pip=(pip_)

log "build tools"
"${pip[@]}" install -q --upgrade "pip>=23" wheel ninja -c "$constraints" setuptools

log "torch ($torch_spec)"
# shellcheck disable=SC2086  # TORCH_SPEC may carry pip options on purpose
"${pip[@]}" install -q $torch_spec -c "$constraints" numpy

if ! "$venv/bin/python" -c 'import mmcv, mmcv.ops' 2>/dev/null; then
  log "mmcv 2.1.0 with ops (a prebuilt wheel from PIP_FIND_LINKS if there is one, else the" \
      "sdist is compiled: about 15 minutes on 2 cores)"
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    "${pip[@]}" install -q --no-build-isolation -c "$constraints" mmcv
fi

log "mmengine, mmdet, mmdet3d"
"${pip[@]}" install -q -c "$constraints" mmengine mmdet mmdet3d

log "turbox_mm (editable) with test extras"
"${pip[@]}" install -q --no-build-isolation -c "$constraints" -e "$root[test]"

"$venv/bin/python" - <<'PY'
import mmcv, mmcv.ops, mmdet, mmdet3d, mmengine, numpy, torch
import turbox_mm
print(f'[setup_env] ready: torch {torch.__version__}, numpy {numpy.__version__}, '
      f'mmengine {mmengine.__version__}, mmcv {mmcv.__version__}, mmdet {mmdet.__version__}, '
      f'mmdet3d {mmdet3d.__version__}, turbox_mm {turbox_mm.__version__}')
PY
rm -f "$venv"/.turbox-setup-*
touch "$stamp"
