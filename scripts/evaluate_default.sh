#!/usr/bin/env bash
# Every evaluation of the embedded default CoMeT (`smollm2-comet`) that its model card and README quote, in two
# lanes that can run side by side on two cores (each CLI resumes a partial result after any stop):
#   bash scripts/evaluate_default.sh a     # passkey 1k-32k (5 depths, SmolLM2 beside it), then the forgetting curve
#   bash scripts/evaluate_default.sh b     # passkey at 128k and 64k (5 depths), recall diagnostics, the 32k demo
#   bash scripts/evaluate_default.sh merge # after both: one 1k-128k passkey heatmap (passkey_1k_128k/)
#   bash scripts/evaluate_default.sh all   # both, one after the other, then the merge
# OUT (default results/default_eval_delay32: the shipped weights read with 256-token chunks and fold_delay=32) names
# the folder; every result lands in its own subfolder. results/default_eval_read256/ holds the same weights read with
# 256-token chunks without the delay, results/default_eval_stage4/ read with 64-token chunks (as trained),
# results/default_eval/ the previous default (recall stage 3). The CLIs resume a partial result only from
# the same weights (a fingerprint of config and safetensors); they refuse one written by others.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-results/default_eval_delay32}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"

lane_a() {
  "$PY" -m evaluation.passkey --model smollm2 smollm2-comet --lengths 1000 2000 4000 8000 16000 32000 \
    --num-depths 5 --samples 1 --output-dir "$OUT/passkey_1k_32k" --no-progress
  "$PY" -m evaluation.forgetting_curve --model smollm2-comet --protocol paper --grid log --max-length 8192 \
    --num-points 16 --samples 3 --output-dir "$OUT/forgetting_curve_paper" --no-progress
}

lane_b() {
  "$PY" -m evaluation.passkey --model smollm2-comet --lengths 128000 --num-depths 5 --samples 1 \
    --output-dir "$OUT/passkey_128k" --no-progress
  "$PY" -m evaluation.passkey --model smollm2-comet --lengths 64000 --num-depths 5 --samples 1 \
    --output-dir "$OUT/passkey_64k" --no-progress
  local folder
  folder=$("$PY" -m convert.comet_default)
  "$PY" -m scripts.recall_diagnostic "$folder" --distances 0 1 4 8 12 --samples 12 \
    --output "$OUT/diagnostic_inside_window.json"
  "$PY" -m scripts.recall_diagnostic "$folder" --boundary --distances 0 1 4 8 12 --samples 12 \
    --output "$OUT/diagnostic_boundary.json"
  # the passkey prompt's own filler (one sentence repeated), 6-10 chunks of it before the key
  "$PY" -m scripts.recall_diagnostic "$folder" --filler passkey --lead_chunks 6 10 --distances 1 4 8 \
    --samples 12 --output "$OUT/diagnostic_passkey_filler_lead6-10.json"
  "$PY" -m scripts.recall_diagnostic "$folder" --filler passkey --lead_chunks 6 10 --distances 16 24 \
    --samples 12 --output "$OUT/diagnostic_passkey_filler_lead6-10_far.json"
  "$PY" -m scripts.long_context_demo --threads "$OMP_NUM_THREADS" > "$OUT/demo_32k.txt.tmp"
  mv "$OUT/demo_32k.txt.tmp" "$OUT/demo_32k.txt"
}

merge() {
  "$PY" -m evaluation.passkey_merge "$OUT/passkey_1k_32k" "$OUT/passkey_64k" "$OUT/passkey_128k" \
    --output-dir "$OUT/passkey_1k_128k" --overwrite
}

case "${1:-all}" in
  a) lane_a ;;
  b) lane_b ;;
  merge) merge ;;
  all) lane_a; lane_b; merge ;;
  *) echo "usage: $0 [a|b|merge|all]" >&2; exit 2 ;;
esac
