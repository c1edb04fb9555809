#!/usr/bin/env bash
# Run a command on the GPU machine from a clean export of a commit instead of the working tree
# (which travels as it is, half-made edits of other writers included).
#
#   here:   git archive --format=tar.gz -o .kit/head.tgz HEAD && git rev-parse --short HEAD > .kit/head.rev
#   there:  bash tools/gpu_clean_run.sh 'MAPTR=v2 bash tools/gpu_session.sh maptr'   # carry: [".kit"]
#
# The export is unpacked into /tmp/clean, which gets the kit as .kit (a link); $OUT stays the
# device tool's folder, so the logs come back as usual.
set -uo pipefail
kit=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.kit" && pwd) || { echo "gpu_clean_run: no .kit" >&2; exit 2; }
[ -f "$kit/head.tgz" ] || { echo "gpu_clean_run: $kit/head.tgz missing (git archive, above)" >&2; exit 2; }
[ $# -eq 1 ] || { echo "usage: bash tools/gpu_clean_run.sh 'COMMAND'" >&2; exit 2; }
rm -rf /tmp/clean && mkdir -p /tmp/clean && tar xzf "$kit/head.tgz" -C /tmp/clean || exit 2
ln -s "$kit" /tmp/clean/.kit
cd /tmp/clean || exit 2
echo "gpu_clean_run: commit $(cat "$kit/head.rev" 2>/dev/null || echo '?') in /tmp/clean"
bash -c "$1"
