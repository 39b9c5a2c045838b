#!/usr/bin/env bash
# scripts/gpu_check.sh [--dry-run] [--wheels DIR] OUTDIR [gpu-check options...]
#
# The GPU check in one call (runa_ood_node/tools/gpu_check.py says what it checks): every method's
# scorer on the GPU in fp32, fp16 (precision: auto) and bf16 against CPU fp32, GPU preprocessing
# against the CPU views, 1 / 10 / 50 boxes timed with CUDA events for ViT-B-32 and ViT-B-16, TensorRT
# where it imports; OUTDIR/gpu_check.json + OUTDIR/gpu_check.md (+ gpu_check.log), within about
# 6 minutes on an H100.
#
# For a machine whose image has CUDA PyTorch but neither ROS nor this project's other wheels: when
# `import open_clip` fails, the wheels of DIR (default .whl, made here by scripts/gpu_wheels.sh) are
# installed into a scratch folder (pip --no-index --no-deps --target) and put on PYTHONPATH; this
# checkout's package is used as source (PYTHONPATH), nothing of ROS is needed or imported.
#
#   here:        bash scripts/gpu_wheels.sh                 # .whl/, about 2.3 MiB
#   device tool: run(command="bash scripts/gpu_check.sh $OUT", carry=[".whl"], timeout_s=480)
#   CI / here:   bash scripts/gpu_check.sh --dry-run OUTDIR  # the same steps on the CPU, < 1 minute
#
# Environment: PYTHON (default python3), RUNA_GPU_CHECK_SITE (scratch install folder, default a
# temporary one), RUNA_GPU_CHECK_TIMEOUT (hard limit in seconds, default 420; the check's own
# budget, --budget-s, defaults to 330 s and skips remaining timings with a note instead).
# Exit status: gpu-check's (0 within tolerance, 1 failures in the report, 2 arguments, 3 no CUDA),
# 4 the wheels could not be installed, 124 the hard limit was hit (the report of the finished
# sections is in OUTDIR).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
DRY=()
WHEELS="$ROOT/.whl"
OUT=""
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=(--dry-run); shift ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    -h|--help) sed -n '2,27p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) EXTRA+=("$1"); shift ;;
    *) if [ -z "$OUT" ]; then OUT="$1"; else EXTRA+=("$1"); fi; shift ;;
  esac
done
if [ -z "$OUT" ]; then
  echo "usage: scripts/gpu_check.sh [--dry-run] [--wheels DIR] OUTDIR [gpu-check options]" >&2
  exit 2
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_check.log"
: > "$LOG"
say() { echo "[gpu_check.sh] $*" | tee -a "$LOG" >&2; }

if ! "$PY" -c "import open_clip" >/dev/null 2>&1; then
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  shopt -u nullglob
  if [ ${#wheels[@]} -eq 0 ]; then
    say "open_clip is not importable and $WHEELS holds no wheels: run scripts/gpu_wheels.sh where PyPI is reachable and carry the folder"
    exit 4
  fi
  SITE="${RUNA_GPU_CHECK_SITE:-$(mktemp -d /tmp/runa_gpu_site.XXXXXX)}"
  say "installing ${#wheels[@]} wheels from $WHEELS into $SITE"
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "${wheels[@]}" >>"$LOG" 2>&1; then
    say "pip could not install the wheels of $WHEELS (see $LOG)"
    exit 4
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# a scratch cache (text embeddings, exports), no downloads, unbuffered output for the log
export RUNA_OOD_CACHE_DIR="${RUNA_OOD_CACHE_DIR:-$(mktemp -d /tmp/runa_gpu_cache.XXXXXX)}"
export RUNA_OOD_OFFLINE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
cd "$ROOT"
set +e
timeout "${RUNA_GPU_CHECK_TIMEOUT:-420}" "$PY" -m runa_ood_node.tools.gpu_check --out "$OUT" \
  ${DRY[@]+"${DRY[@]}"} ${EXTRA[@]+"${EXTRA[@]}"} 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
set -e
say "exit $rc; report: $OUT/gpu_check.md, $OUT/gpu_check.json"
exit "$rc"
