#!/usr/bin/env bash
# Distributed training on one machine through PyTorch's own launcher (torchrun), as mmdet3d's
# tools/dist_train.sh does:
#
#   bash tools/dist_train.sh CONFIG NUM_PROCS [tools/train.py options ...]
#
# NNODES, NODE_RANK, MASTER_ADDR and PORT select a multi-node run (defaults: one node,
# 127.0.0.1:29500); PYTHON the interpreter (default: `python` on PATH, e.g. .venv/bin/python).
# On a CPU-only machine turbox configs (TurboxRunner) run with gloo as they are; stock
# mmengine cannot start a process group without CUDA.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash tools/dist_train.sh CONFIG NUM_PROCS [train.py options ...]" >&2
  exit 2
fi
config=$1
procs=$2
shift 2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PYTHONPATH="$(dirname "$here")${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m torch.distributed.run \
  --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${PORT:-29500}" \
  --nproc_per_node="$procs" \
  "$here/train.py" "$config" --launcher pytorch "$@"
