#!/usr/bin/env bash
# The proving ground end to end, with the package's own tools only:
#   world (COCO splits + a bag) -> [--train: the CLIP, ~20 min] -> finetune (10 shots per ID class) for
#   each method -> calibrate (95% ID TPR) -> one `evaluate --method all --baselines` on the test split
#   (AUROC / FPR95 overall, near- and far-OOD, by box size on the 1280x720 frames, ROC plot).
# The heads and thresholds are written to calibration/proving_ground/ (committed: the demo and the CI
# gate read them); the evaluation to $PG_OUT/evaluate (default out/proving_ground/evaluate).
# Synthetic world, model trained here: evidence that the pipeline works, not real-world quality.
#
#   bash scripts/proving_ground.sh [--train] [--frames train=150,calibration=150,test=300]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
# shellcheck disable=SC1091
source scripts/env.sh
OUT="${PG_OUT:-out/proving_ground}"
FRAMES="train=150,calibration=150,test=300"
TRAIN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --train) TRAIN=1 ;;
    --frames) FRAMES="$2"; shift ;;
    *) echo "usage: $0 [--train] [--frames SPEC]" >&2; exit 2 ;;
  esac
  shift
done
PG=calibration/proving_ground
M=(--model runa-pg-vit --pretrained proving-ground --id-set "$PG/labels.yaml")

runa-ood proving-ground world --out "$OUT" --frames "$FRAMES"
if [ "$TRAIN" = 1 ]; then
  runa-ood proving-ground train
fi
# TagOOD's head reads every token in the box of a 672 px frame pass: the best of 448-896 px and of the
# token selections on the calibration split with this CLIP (docs/proving_ground.md)
declare -A OPTIONS=([tagood]="--method-option frame_size=672 --method-option selection=all")
HEADS=()
for m in runa uni-ood tagood; do
  # shellcheck disable=SC2086
  runa-ood finetune "${M[@]}" --method "$m" --annotations "$OUT/train/annotations.json" --shots 10 --seed 0 \
    --eval-images 0 --out "$PG/heads/$m" ${OPTIONS[$m]:-}
  runa-ood calibrate "${M[@]}" --method "$m" --head "$PG/heads/$m" \
    --annotations "$OUT/calibration/annotations.json" --out "$PG/thresholds/$m/thresholds.yaml"
  HEADS+=(--head "$m=$PG/heads/$m")
done
runa-ood evaluate "${M[@]}" --method all "${HEADS[@]}" --baselines \
  --annotations "$OUT/test/annotations.json" --out "$OUT/evaluate"
echo "proving ground: heads and thresholds in $PG/, evaluation in $OUT/evaluate (report.json, roc.png)"
