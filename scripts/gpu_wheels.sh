#!/usr/bin/env bash
# scripts/gpu_wheels.sh [DIR]: download, HERE (where PyPI is reachable), the wheels that
# scripts/gpu_check.sh installs on a GPU machine that has no network. Default DIR: .whl (ignored by
# git; the device tool carries it with `carry: [".whl"]`).
#
# The GPU image (see /work/.library/device/KINDS.md, "Python packages already there") has CUDA
# PyTorch, torchvision, numpy, opencv-python-headless, pyyaml, tqdm, timm, huggingface-hub,
# safetensors, regex, onnx, onnxruntime and scikit-image, but not open_clip_torch nor its ftfy
# (whose one need is wcwidth). Those three, pure-Python, at the versions pinned in
# requirements/constraints.txt, for CPython 3.12 manylinux x86_64 (the machine's Python), with
# --no-deps: each need is named here on purpose. This project's own package travels as source
# with the working tree (gpu_check.sh puts the checkout on PYTHONPATH): no wheel for it.
# Nothing for ROS: the check never imports it.
#
# Afterwards the script lists every wheel's Requires-Dist so a need the image lacks is seen here,
# and fails when the folder holds more than 50 MiB or two versions of one package.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/.whl}"
PY="${PYTHON:-python3}"
MAX_MIB=50
# the packages the image lacks; versions from the project's pins
NAMES=(open_clip_torch ftfy wcwidth)

pin() {  # pin NAME -> NAME==VERSION from requirements/constraints.txt (case / -_ insensitive)
  local want line
  want="$(echo "$1" | tr 'A-Z_' 'a-z-')"
  while IFS= read -r line; do
    case "$line" in \#*|"") continue ;; esac
    if [ "$(echo "${line%%==*}" | tr 'A-Z_' 'a-z-')" = "$want" ]; then echo "$line"; return 0; fi
  done < "$ROOT/requirements/constraints.txt"
  echo "gpu_wheels: $1 is not pinned in requirements/constraints.txt" >&2
  return 1
}

mkdir -p "$DIR"
for name in "${NAMES[@]}"; do
  spec="$(pin "$name")"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DIR" "$spec"
done

echo "gpu_wheels: $DIR"
status=0
declare -A seen=()
for whl in "$DIR"/*.whl; do
  base="$(basename "$whl")"
  key="$(echo "${base%%-*}" | tr 'A-Z_' 'a-z-')"
  if [ -n "${seen[$key]:-}" ]; then
    echo "gpu_wheels: two versions of $key ($base and ${seen[$key]}): pip --no-index would stop; remove one" >&2
    status=1
  fi
  seen[$key]="$base"
  echo "  $base ($(du -k "$whl" | cut -f1) KiB) needs:"
  "$PY" - "$whl" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    reqs = [l.split(":", 1)[1].strip() for l in z.read(meta).decode().splitlines() if l.startswith("Requires-Dist:")]
print("    " + (", ".join(r for r in reqs if "extra ==" not in r) or "nothing"))
EOF
done
total_kib="$(du -sk "$DIR" | cut -f1)"
echo "gpu_wheels: ${total_kib} KiB in all (limit ${MAX_MIB} MiB; the device tool carries 64 MiB with the working tree)"
if [ "$total_kib" -gt $((MAX_MIB * 1024)) ]; then
  echo "gpu_wheels: $DIR is over ${MAX_MIB} MiB" >&2
  status=1
fi
exit $status
