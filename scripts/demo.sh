#!/usr/bin/env bash
# Set everything up (idempotent) and run the main job: the end-to-end demo
# (bag from real photographs -> node -> per-box table, alert timeline, annotated PNGs in out/demo).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
# shellcheck disable=SC1091
source scripts/env.sh
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
exec runa-ood demo "$@"
